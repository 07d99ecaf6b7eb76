"""The HTTP edge: the aiohttp server every request meets before the app, in production
(``spectralmc serve``: :func:`run_app`) and in the tests (the same :class:`EdgeAppRunner`).

- :func:`handler_args` (the app's ``handler_args``, so every runner gets them): no
  request decompression on the event loop (``auto_decompress`` off; service/body.py
  inflates off the loop, bounded), the idle keep-alive timeout, the request-line and
  header-field limits.
- :class:`EdgeRequestHandler`: what aiohttp's parser refuses (a URL or header over its
  limit, both Content-Length and Transfer-Encoding, a bad header, not HTTP at all) is
  answered with the JSON error body every route uses and the right 4xx status, not
  aiohttp's plain text (so is a 417 for an unknown ``Expect``, raised by aiohttp before
  the app's middleware); and a request head (request line and headers) not complete
  ``header_read_timeout_seconds`` after its first byte gets 408 and the connection is
  closed (slowloris). A connection that sends nothing is closed after
  ``keepalive_timeout_seconds`` (aiohttp's keep-alive timer: from the connection's
  start and after each answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from spectralmc_server.service import keys
from spectralmc_server.settings import Settings

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 4096  # bytes of the request line's URL (414 past it); the API's longest is < 200
MAX_HEADER_FIELD = 8190  # bytes of one header (431 past it), aiohttp's default
MAX_HEADERS = 128  # headers per request (431 past it), aiohttp's default
# a LineTooLong names the limit it broke: the two differ to tell a URL from a header

CODES = {
    400: "malformed",
    408: "request_timeout",
    413: "too_large",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal",
    504: "deadline_exceeded",
}


def handler_args(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of every connection's handler (``web.Application(handler_args=)``)."""
    return {
        "auto_decompress": False,
        "keepalive_timeout": settings.keepalive_timeout_seconds,
        "max_line_size": MAX_REQUEST_LINE,
        "max_field_size": MAX_HEADER_FIELD,
        "max_headers": MAX_HEADERS,
    }


def error_body(status: int, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    code = CODES.get(status, "http_error")
    return orjson.dumps({"error": {"code": code, "message": message, "details": details or []}})


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0].strip().rstrip(":") if text.strip() else ""
    return line[:limit]


class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection handler with JSON parser errors and a header-read timeout."""

    __slots__ = ("_header_read_timeout", "_header_timer")

    def __init__(
        self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, header_read_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._header_read_timeout = header_read_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    # -- the header-read timeout ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        # between requests (none yet, or the handler waits for the next one) every byte
        # is part of a request head; while a request is handled, bytes may be its body
        waiting = before == 0 or (self._waiter is not None and not self._waiter.done())
        super().data_received(data)
        if self._request_count != before:  # a head is complete (or refused): its timer is done
            self._cancel_header_timer()
        elif waiting and data and self._header_timer is None and not self._upgraded:
            self._header_timer = self._loop.call_later(self._header_read_timeout, self._header_timed_out, before)

    def _header_timed_out(self, count: int) -> None:
        self._header_timer = None
        transport = self.transport
        if self._request_count != count or self._force_close or transport is None or transport.is_closing():
            return
        log.info("closing a connection whose request head took over %g s", self._header_read_timeout)
        body = error_body(408, f"the request line and headers did not arrive within {self._header_read_timeout:g} s")
        head = (
            "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)
        self.force_close()  # closes the transport once the answer is written

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    # -- JSON errors from the parser, and from aiohttp itself -----------------------------

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # an HTTPException raised before the app's middleware (an unknown Expect header:
        # 417) is answered as JSON like everything else
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-type", "content-length")}
            text = resp.text or resp.reason
            resp = web.Response(
                status=resp.status, body=error_body(resp.status, text), content_type="application/json", headers=headers
            )
        return await super().finish_response(request, resp, start_time)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own: logs, and raises ConnectionError once an answer has started
        super().handle_error(request, status, exc, message)
        status, text, details = self._describe(status, exc, message)
        body = error_body(status, text, details)
        resp = web.Response(status=status, body=body, content_type="application/json", headers={"Connection": "close"})
        resp.force_close()  # the parser cannot go on: this connection ends here
        return resp

    def _describe(
        self, status: int, exc: BaseException | None, message: str | None
    ) -> tuple[int, str, list[dict[str, Any]]]:
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else None
            if limit == self.max_line_size != self.max_field_size:
                return 414, f"the request URL is over the {self.max_line_size} byte limit", []
            field = {"field": "headers", "reason": f"at most {self.max_field_size} bytes per header"}
            return 431, f"a request header is over the {self.max_field_size} byte limit", [field]
        if isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower():
            field = {"field": "headers", "reason": f"at most {self.max_headers} headers"}
            return 431, f"more than {self.max_headers} request headers", [field]
        if status == 500:
            return 500, "internal error (logged on the server)", []
        if status == 504:
            return 504, "no answer within the request's deadline", []
        reason = exc.message if isinstance(exc, HttpProcessingError) else (message or "")
        return status, f"malformed HTTP request: {_first_line(reason) or 'unparsable'}", []


class EdgeServer(web.Server):
    """aiohttp's low-level server whose connections are :class:`EdgeRequestHandler`."""

    def __init__(self, handler: Any, *, header_read_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_read_timeout = header_read_timeout

    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, header_read_timeout=self.header_read_timeout, **self._kwargs)


class EdgeAppRunner(web.AppRunner):
    """``web.AppRunner`` serving the app through :class:`EdgeServer`; the header-read
    timeout comes from the app's settings."""

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # the app started, and aiohttp's server for it
        return EdgeServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            header_read_timeout=self.app[keys.SETTINGS].header_read_timeout_seconds,
            **base._kwargs,
        )


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    shutdown_timeout: float,
    on_start: Callable[[str], None],
    reuse_port: bool,
    unix_path: str | None,
) -> None:
    runner = EdgeAppRunner(app, handle_signals=True, shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        if unix_path is not None:  # after the TCP site: a worker that answers here listens on TCP
            await web.UnixSite(runner, unix_path).start()
        on_start(f"listening on {site.name}")
        while True:  # until SIGTERM or SIGINT (GracefulExit)
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()


def _cancel_tasks(tasks: set[asyncio.Task[Any]], loop: asyncio.AbstractEventLoop) -> None:
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {"message": "unhandled exception at shutdown", "exception": task.exception(), "task": task}
            )


def run_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    on_start: Callable[[str], None],
    reuse_port: bool = False,
    unix_path: str | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down gracefully: ``web.run_app``
    (same loop handling: the main task is cancelled and its cleanup awaited first, then
    what is left) with :class:`EdgeAppRunner`. Start-up errors propagate.

    ``reuse_port``: bind with SO_REUSEPORT (HTTP workers share the port); ``unix_path``:
    also serve on that Unix socket (how HTTP workers reach one another)."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, host, port, shutdown_timeout, on_start, reuse_port, unix_path))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_tasks(asyncio.all_tasks(loop), loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
