"""Request bodies: what every route that reads one accepts.

- ``Content-Type`` must say JSON: ``application/json`` or ``application/<x>+json``, with
  no charset or ``charset=utf-8``; anything else, a missing header included, is 415.
- ``Content-Encoding`` may be absent, ``identity``, ``gzip`` (``x-gzip``) or ``deflate``;
  anything else is 415. The server never inflates on the parser (its ``auto_decompress``
  is off, service/edge.py): a compressed body is read as sent (at most
  ``max_body_bytes``) and inflated here, on a worker thread, ``INFLATE_CHUNK`` bytes at a
  time, counting the inflated bytes against ``max_body_bytes`` too: a body that would
  inflate past it is 413 as soon as it gets there, whatever its ratio (a "gzip bomb"
  costs at most ``max_body_bytes`` of inflation, off the event loop).
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import hdrs, web

from spectralmc_server.service import keys
from spectralmc_server.service.errors import MalformedRequest, TooLarge, UnsupportedMediaType

INFLATE_CHUNK = 1 << 20  # bytes of output per inflate step
CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}  # Content-Encoding -> format
SEND_JSON = "send 'Content-Type: application/json' with a JSON body"


def _unsupported_type(reason: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"the body must be JSON: {SEND_JSON}",
        details=[{"field": "header:Content-Type", "reason": reason}],
    )


def check_json_type(request: web.Request) -> None:
    """415 unless ``Content-Type`` is ``application/json`` or ``application/<x>+json``
    (parameters: only ``charset=utf-8``)."""
    raw = request.headers.get(hdrs.CONTENT_TYPE)
    if raw is None or not raw.strip():
        raise _unsupported_type("missing")
    mime, *params = raw.split(";")
    kind, _, subtype = mime.strip().lower().partition("/")
    if kind != "application" or not (subtype == "json" or (subtype.endswith("+json") and len(subtype) > 5)):
        raise _unsupported_type(f"got {raw!r}: application/json or application/<x>+json")
    for param in params:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise _unsupported_type(f"got {raw!r}: JSON is UTF-8 (charset=utf-8 or none)")


def content_coding(request: web.Request) -> str | None:
    """The body's compression format (``gzip``, ``deflate``), None when not compressed;
    415 for a coding the server does not inflate (or more than one)."""
    codings = [
        c.strip().lower() for value in request.headers.getall(hdrs.CONTENT_ENCODING, ()) for c in value.split(",")
    ]
    codings = [c for c in codings if c not in ("", "identity")]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in CODINGS:
        return CODINGS[codings[0]]
    raise UnsupportedMediaType(
        f"Content-Encoding {', '.join(codings)} is not accepted: send the body as is, or gzip or deflate it",
        details=[{"field": "header:Content-Encoding", "reason": "one of gzip, deflate, identity (or none)"}],
    )


def inflate(data: bytes, fmt: str, limit: int) -> bytes:
    """``data`` inflated (``fmt``: ``gzip``, or ``deflate``: zlib-wrapped or raw), at most
    ``limit`` bytes of output: 413 past it, 400 when it does not inflate."""
    if fmt == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif data[:1] and (data[0] & 0x0F) == 8 and int.from_bytes(data[:2], "big") % 31 == 0:
        wbits = zlib.MAX_WBITS  # RFC 9110's deflate: a zlib stream
    else:
        wbits = -zlib.MAX_WBITS  # what some clients send as deflate: a raw stream
    inflater = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    size = 0
    pending = data
    try:
        # each step either inflates INFLATE_CHUNK bytes or uses up the input
        for _ in range(limit // INFLATE_CHUNK + 3):
            piece = inflater.decompress(pending, INFLATE_CHUNK)
            size += len(piece)
            if size > limit:
                raise TooLarge(
                    f"the body inflates to more than the {limit} byte limit",
                    details=[{"field": "header:Content-Encoding", "reason": f"inflated size over {limit} bytes"}],
                )
            parts.append(piece)
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and not piece):
                break
    except zlib.error as exc:
        raise MalformedRequest(f"the {fmt} body does not inflate: {exc}") from None
    if not inflater.eof:
        raise MalformedRequest(f"the {fmt} body is truncated")
    if inflater.unused_data:
        raise MalformedRequest(f"the {fmt} body has {len(inflater.unused_data)} bytes after its end")
    return b"".join(parts)


async def read_body(request: web.Request) -> bytes:
    """The body, JSON by its ``Content-Type``, inflated when it is compressed: 415 for
    another type or coding, 413 past ``max_body_bytes`` (as sent or inflated), 400 for a
    compressed body that does not inflate or a body cut short."""
    check_json_type(request)
    fmt = content_coding(request)
    try:
        raw = await request.read()  # 413 past client_max_size (max_body_bytes), as sent
    except web.RequestPayloadError as exc:  # Content-Length not met, bad chunked framing
        raise MalformedRequest(f"the body could not be read: {exc}") from None
    if fmt is None or not raw:
        return raw
    limit = request.app[keys.SETTINGS].max_body_bytes
    return await asyncio.to_thread(inflate, raw, fmt, limit)
