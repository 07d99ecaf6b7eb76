"""Request bodies: what every route that reads one accepts.

- ``Content-Type`` must say JSON: ``application/json`` or ``application/<x>+json``, with
  no charset or ``charset=utf-8``; anything else, a missing header included, is 415.
  ``POST /v1/price`` also takes an Apache Arrow IPC stream,
  ``application/vnd.apache.arrow.stream`` (:func:`read_price_body`).
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
from typing import Literal

from aiohttp import hdrs, web

from spectralmc_server.pricing.arrow import ARROW_STREAM
from spectralmc_server.service import keys
from spectralmc_server.service.errors import MalformedRequest, TooLarge, UnsupportedMediaType

INFLATE_CHUNK = 1 << 20  # bytes of output per inflate step
CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}  # Content-Encoding -> format
SEND_JSON = "send 'Content-Type: application/json' with a JSON body"
SEND_ARROW = f"or 'Content-Type: {ARROW_STREAM}' with an Arrow IPC stream"
BodyKind = Literal["json", "arrow"]


def _unsupported_type(reason: str, *, arrow: bool = False) -> UnsupportedMediaType:
    what = f"JSON or an Arrow IPC stream: {SEND_JSON} {SEND_ARROW}" if arrow else f"JSON: {SEND_JSON}"
    return UnsupportedMediaType(
        f"the body must be {what}",
        details=[{"field": "header:Content-Type", "reason": reason}],
    )


def body_kind(request: web.Request, *, arrow: bool = False) -> BodyKind:
    """``json`` when ``Content-Type`` is ``application/json`` or ``application/<x>+json``
    (parameters: only ``charset=utf-8``); with ``arrow``, ``arrow`` when it is
    ``application/vnd.apache.arrow.stream`` (parameters ignored); else 415."""
    raw = request.headers.get(hdrs.CONTENT_TYPE)
    if raw is None or not raw.strip():
        raise _unsupported_type("missing", arrow=arrow)
    mime, *params = raw.split(";")
    kind, _, subtype = mime.strip().lower().partition("/")
    if arrow and f"{kind}/{subtype}" == ARROW_STREAM:
        return "arrow"
    if kind != "application" or not (subtype == "json" or (subtype.endswith("+json") and len(subtype) > 5)):
        expected = f"application/json or application/<x>+json{f' or {ARROW_STREAM}' if arrow else ''}"
        if arrow and subtype.startswith("vnd.apache.arrow"):
            expected = f"{ARROW_STREAM}: the IPC stream format (not the file format)"
        raise _unsupported_type(f"got {raw!r}: {expected}", arrow=arrow)
    for param in params:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise _unsupported_type(f"got {raw!r}: JSON is UTF-8 (charset=utf-8 or none)", arrow=arrow)
    return "json"


def check_json_type(request: web.Request) -> None:
    """415 unless ``Content-Type`` is ``application/json`` or ``application/<x>+json``
    (parameters: only ``charset=utf-8``)."""
    body_kind(request)


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
    return await _read(request)


async def read_price_body(request: web.Request) -> tuple[BodyKind, bytes]:
    """:func:`read_body` for a body that may also be an Arrow IPC stream: its kind by
    ``Content-Type`` and its bytes (inflated as a JSON body would be)."""
    kind = body_kind(request, arrow=True)
    return kind, await _read(request)


async def _read(request: web.Request) -> bytes:
    fmt = content_coding(request)
    try:
        raw = await request.read()  # 413 past client_max_size (max_body_bytes), as sent
    except web.RequestPayloadError as exc:  # Content-Length not met, bad chunked framing
        raise MalformedRequest(f"the body could not be read: {exc}") from None
    if fmt is None or not raw:
        return raw
    limit = request.app[keys.SETTINGS].max_body_bytes
    return await asyncio.to_thread(inflate, raw, fmt, limit)
