"""Typed errors raised by handlers and turned into JSON answers by one middleware.

Body: ``{"error": {"code": ..., "message": ..., "details": [...]}}``.
"""

from __future__ import annotations

from typing import Any

from spectralmc_server.store.objects import StoreUnavailableError


class APIError(Exception):
    """An answer other than success; ``status`` is the HTTP status."""

    status = 500
    code = "internal"

    def __init__(
        self, message: str, *, details: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class MalformedRequest(APIError):
    status, code = 400, "malformed"


class Unauthorized(APIError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str, *, realm: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})


class Forbidden(APIError):
    status, code = 403, "forbidden"


class NotFound(APIError):
    status, code = 404, "not_found"


class MethodNotAllowed(APIError):
    status, code = 405, "method_not_allowed"


class Conflict(APIError):
    status, code = 409, "conflict"


class TooLarge(APIError):
    status, code = 413, "too_large"


class UnsupportedMediaType(APIError):
    status, code = 415, "unsupported_media_type"


class Invalid(APIError):
    status, code = 422, "invalid"


class NoMarketData(Invalid):
    """The snapshot a request names does not exist (422)."""

    code = "no_market_data"


class Unavailable(APIError):
    """Overloaded, shutting down or not ready: try again later."""

    status, code = 503, "unavailable"

    def __init__(self, message: str, retry_after: int = 1, *, code: str = "unavailable") -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.code = code


def store_unavailable(exc: BaseException, *, retry_after: int = 1, message: str | None = None) -> Unavailable:
    """The 503 ``store_unavailable`` for a failed read of the object store (the client may
    retry; nothing is wrong with its request): ``message``, by default
    ``market data unavailable: <error>`` (``<type>: <error>`` for an error that is not a
    StoreUnavailableError, whose message already names the cause, e.g. ``store refused
    access (AccessDenied)`` or ``store throttled (SlowDown)``: store/s3.py)."""
    cause = str(exc) if isinstance(exc, StoreUnavailableError) else f"{type(exc).__name__}: {exc}"
    text = message if message is not None else f"market data unavailable: {cause}"
    return Unavailable(text, retry_after, code="store_unavailable")


class DeadlineExceeded(APIError):
    status, code = 504, "deadline_exceeded"


class EngineFailure(APIError):
    """The compute engine failed on valid input: a bug, not the client's fault."""

    status, code = 500, "engine_failure"
