"""Bearer tokens: the one parser and checker behind every route that needs a token.

``Authorization: Bearer <token>`` (RFC 6750). The scheme is case-insensitive (RFC 7235
section 2.1: ``bearer``, ``BEARER`` and ``Bearer`` are the same scheme); the token is
compared in constant time. A missing header, another scheme, an empty token, more than
one Authorization header (ambiguous: which one counts?) or a token anywhere else (a
query string's ``access_token`` is never read) is 401 with ``WWW-Authenticate: Bearer
realm="<the route's realm>"``; a wrong token is 403. Spaces around the scheme and the
token are ignored.

A route accepts up to two tokens at once (the current one and, during a rotation, the
previous one: settings ``admin_token`` / ``admin_token_previous`` and
``marketdata.write_token`` / ``marketdata.write_token_previous``), so tokens rotate
without a window of refusals (docs/operations.md, "Rotate the tokens"). The given token
is compared with both slots, always both and in full: SHA-256 digests of equal length
through :func:`hmac.compare_digest`, the results combined without short-circuit, so the
time taken says neither which token matched, nor how long either is, nor whether a
previous token is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from aiohttp import hdrs, web
from pydantic import SecretStr

from spectralmc_server.service.errors import Forbidden, Unauthorized

ADMIN_REALM = "spectralmc-admin"
MARKETDATA_REALM = "spectralmc-marketdata"
MAX_TOKENS = 2  # the current token and, during a rotation, the previous one
# fills an unused slot so that every check hashes and compares twice; never accepted
_UNUSED_SLOT = secrets.token_hex(32)


def bearer(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``; None without exactly one such
    header (none, several, another scheme, or nothing after the scheme)."""
    headers = request.headers.getall(hdrs.AUTHORIZATION, [])
    if len(headers) != 1:
        return None
    scheme, _, token = headers[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def accepted_tokens(current: SecretStr, previous: SecretStr | None) -> tuple[str, ...]:
    """The token values a route accepts: ``current``, and ``previous`` when set."""
    if previous is None:
        return (current.get_secret_value(),)
    return current.get_secret_value(), previous.get_secret_value()


def _matches(given: str, tokens: Sequence[str]) -> bool:
    """Whether ``given`` is one of ``tokens`` (one or two), in time that depends on
    neither: every slot is hashed and compared, and the results OR-ed."""
    if not 1 <= len(tokens) <= MAX_TOKENS:
        raise ValueError(f"between 1 and {MAX_TOKENS} tokens, got {len(tokens)}")
    digest = hashlib.sha256(given.encode()).digest()
    slots = [*tokens, *[_UNUSED_SLOT] * (MAX_TOKENS - len(tokens))]
    found = 0
    for i, token in enumerate(slots):
        same = hmac.compare_digest(digest, hashlib.sha256(token.encode()).digest())
        found |= int(same) & int(i < len(tokens))
    return found == 1


def require_token(request: web.Request, secret: str | Sequence[str], *, realm: str, what: str) -> None:
    """Let the request through only with ``secret`` (one token, or the tokens of
    :func:`accepted_tokens`) as its bearer token: 401 naming ``realm`` without a bearer
    token, 403 with another one. ``what`` names the action in the messages (e.g.
    "market-data writes")."""
    given = bearer(request)
    if given is None:
        raise Unauthorized(f"{what} need 'Authorization: Bearer <token>'", realm=realm)
    if not _matches(given, (secret,) if isinstance(secret, str) else secret):
        raise Forbidden(f"the token does not allow {what}")
