"""Typed errors of the client, mapped from the server's JSON error body.

Every error the server answers is ``{"error": {"code", "message", "details"}}`` with an
HTTP status (docs/api.md, "HTTP errors"); :func:`error_from_answer` turns one into the
matching subclass of :class:`SpectralMCError`::

    try:
        client.price([{"id": "c1", "right": "call", "strike": -1.0, ...}])
    except InvalidRequest as exc:
        exc.code      # "invalid"
        exc.details   # [{"field": "contracts[0].strike", "reason": "..."}]
    except Unavailable as exc:
        time.sleep(exc.retry_after or 1)

The family is chosen by the code first (``no_market_data``, ``overloaded``, ...), then by
the status, so a code the client does not know still lands in its status's family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

# The error classes (the package re-exports them); error_from_answer, error_from_code and
# parse_retry_after are for the client's own modules.
__all__ = [
    "Conflict",
    "ConnectionFailed",
    "DeadlineExceeded",
    "Forbidden",
    "InvalidRequest",
    "NoMarketData",
    "NotFound",
    "Overloaded",
    "ServerError",
    "SpectralMCError",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
]

MAX_RETRY_AFTER = 300.0  # the longest Retry-After the client takes (seconds); a longer one is cut to it


class SpectralMCError(Exception):
    """An answer other than success, or no answer at all.

    - ``status``: the HTTP status (None when there was no HTTP answer: a stream error
      message, a connection failure, a check made by the client before sending).
    - ``code``: the server's error code (``invalid``, ``no_market_data``, ``overloaded``,
      ``deadline_exceeded``, ...; ``connection_failed`` for no answer).
    - ``message``: the server's one-line message.
    - ``details``: the server's details, e.g. ``[{"field": "contracts[3].vol", "reason": ...}]``.
    - ``retry_after``: seconds from the ``Retry-After`` header (503 and 504; at most
      ``MAX_RETRY_AFTER``, 300), else None.
    - ``subscription``: on a stream, the subscription the error is about (else None).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        subscription: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details: list[dict[str, Any]] = list(details or [])
        self.retry_after = retry_after
        self.subscription = subscription

    def __str__(self) -> str:
        head = f"{self.status} {self.code}" if self.status is not None else self.code
        fields = "; ".join(f"{d['field']}: {d.get('reason', '')}" for d in self.details[:5] if "field" in d)
        return f"{head}: {self.message}" + (f" ({fields})" if fields else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class InvalidRequest(SpectralMCError):
    """The request is wrong: 422 ``invalid`` (``details`` names each field), 400
    ``malformed``, and the other 4xx about the request's form (405, 408, 414, 415, 417,
    431). Sending it again as it is will not help."""


class NoMarketData(InvalidRequest):
    """422 ``no_market_data``: no snapshot for the key, or it lacks what a contract needs
    (``details`` names ``contracts[i]``)."""


class TooLarge(InvalidRequest):
    """413 ``too_large``: the body is over the server's size limit, or a request holds
    more than its contract limit (the client splits books, so this means a chunk size
    above the server's limit)."""


class Unauthorized(SpectralMCError):
    """401 ``unauthorized``: no (or a malformed) bearer token where one is needed."""


class Forbidden(Unauthorized):
    """403 ``forbidden``: a wrong token (or, for admin routes, none configured)."""


class NotFound(SpectralMCError):
    """404 ``not_found``: an unknown route, model, version, snapshot or stream topic."""


class Conflict(SpectralMCError):
    """409 ``conflict`` (on a stream: a subscription id already in use)."""


class Unavailable(SpectralMCError):
    """503: the server cannot take the request now (``shutting_down``, ``not_ready``,
    ``not_serving``, ``store_unavailable``, ``overloaded``); ``retry_after`` says when
    to try again."""


class Overloaded(Unavailable):
    """503 ``overloaded``: the queue is full or the request would not fit its deadline;
    try again after ``retry_after`` seconds, or with smaller requests or a longer
    ``request_timeout``."""


class DeadlineExceeded(SpectralMCError):
    """504 ``deadline_exceeded``: no answer within the request's deadline
    (``X-Request-Timeout``); ``retry_after`` is the server's estimate of its backlog."""


class ServerError(SpectralMCError):
    """500 (``engine_failure``, ``internal``) or another 5xx: the server's fault."""


class ConnectionFailed(SpectralMCError):
    """No HTTP answer: the connection was refused, reset or timed out on the client's
    side, or a stream could not reconnect within its reconnect window."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("code", "connection_failed")
        super().__init__(message, **kwargs)


_BY_CODE: dict[str, type[SpectralMCError]] = {
    "invalid": InvalidRequest,
    "malformed": InvalidRequest,
    "no_market_data": NoMarketData,
    "too_large": TooLarge,
    "too_many": InvalidRequest,  # stream: past the connection's subscription or contract limit
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "overloaded": Overloaded,
    "shutting_down": Unavailable,
    "not_ready": Unavailable,
    "not_serving": Unavailable,
    "store_unavailable": Unavailable,
    "unhealthy": Unavailable,
    "deadline_exceeded": DeadlineExceeded,
    "engine_failure": ServerError,
    "internal": ServerError,
    "connection_failed": ConnectionFailed,
}


def _by_status(status: int | None) -> type[SpectralMCError]:
    if status is None:
        return SpectralMCError
    if status == 401:
        return Unauthorized
    if status == 403:
        return Forbidden
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status == 413:
        return TooLarge
    if status == 503:
        return Unavailable
    if status == 504:
        return DeadlineExceeded
    if 400 <= status < 500:
        return InvalidRequest
    if status >= 500:
        return ServerError
    return SpectralMCError


def error_from_code(
    code: str,
    message: str,
    *,
    status: int | None = None,
    details: list[dict[str, Any]] | None = None,
    retry_after: float | None = None,
    subscription: str | None = None,
) -> SpectralMCError:
    """The typed error for a server error ``code`` (its ``status`` when the code is not
    one the client knows)."""
    cls = _BY_CODE.get(code) or _by_status(status)
    return cls(message, status=status, code=code, details=details, retry_after=retry_after, subscription=subscription)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds, at most ``MAX_RETRY_AFTER`` (the server sends whole
    seconds, at most 60; a larger value, from a proxy say, is cut to the cap so that a
    stream never waits unboundedly). An HTTP date, a value that does not parse, a
    negative one, ``inf`` or ``nan`` gives None."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


def error_from_answer(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> SpectralMCError:
    """The typed error for an HTTP answer with a status other than 2xx. A body that is
    not the server's JSON error (a proxy's page, say) keeps its first 200 characters as
    the message, under code ``http_error``."""
    retry_after = parse_retry_after((headers or {}).get("Retry-After"))
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        details = err.get("details")
        return error_from_code(
            err["code"],
            str(err.get("message") or err["code"]),
            status=status,
            details=[d for d in details if isinstance(d, dict)] if isinstance(details, list) else [],
            retry_after=retry_after,
        )
    text = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    cls = _by_status(status)
    return cls(text, status=status, code="http_error", retry_after=retry_after)
