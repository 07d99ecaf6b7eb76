"""Bearer tokens: the one parser and checker behind every route that needs a token.

``Authorization: Bearer <token>`` (RFC 6750). The scheme is case-insensitive (RFC 7235
section 2.1: ``bearer``, ``BEARER`` and ``Bearer`` are the same scheme); the token is
compared in constant time. A missing header, another scheme, an empty token, more than
one Authorization header (ambiguous: which one counts?) or a token anywhere else (a
query string's ``access_token`` is never read) is 401 with ``WWW-Authenticate: Bearer
realm="<the route's realm>"``; a wrong token is 403. Spaces around the scheme and the
token are ignored.
"""

from __future__ import annotations

import hmac

from aiohttp import hdrs, web

from spectralmc_server.service.errors import Forbidden, Unauthorized

ADMIN_REALM = "spectralmc-admin"
MARKETDATA_REALM = "spectralmc-marketdata"


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


def require_token(request: web.Request, secret: str, *, realm: str, what: str) -> None:
    """Let the request through only with ``secret`` as its bearer token: 401 naming
    ``realm`` without a bearer token, 403 with another one. ``what`` names the action
    in the messages (e.g. "market-data writes")."""
    given = bearer(request)
    if given is None:
        raise Unauthorized(f"{what} need 'Authorization: Bearer <token>'", realm=realm)
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise Forbidden(f"the token does not allow {what}")
