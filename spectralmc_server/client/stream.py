"""The client's quote stream (:class:`Stream`): ``/v1/stream`` across reconnects,
subscriptions sent again after each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import aiohttp
import orjson

from spectralmc_server.client.errors import (
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidRequest,
    ServerError,
    Unavailable,
    error_from_code,
)

if TYPE_CHECKING:
    from spectralmc_server.client.aio import AsyncClient

Time = str | datetime


def _time(value: Time | None) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


log = logging.getLogger("spectralmc_server.client")
# Errors after which a stream tries to connect again (anything else will not heal by waiting).
TRANSIENT = (ConnectionFailed, Unavailable, ServerError, DeadlineExceeded)


class Stream:
    """Quotes from ``/v1/stream``, across reconnects. An async iterator of the server's
    quote messages (``{"type": "quote", "id", "seq", "reason", "results", ...}``, as in
    docs/api.md); the connection opens on ``async with`` or the first iteration.

    - ``subscribed`` / ``unsubscribed`` acknowledgements are consumed; a quote for a
      subscription this stream no longer holds is dropped.
    - An ``error`` message for a subscription the server refused (``invalid``,
      ``not_found``, ``conflict``, ``too_many``; or about a message the server could not
      read) raises the typed error (``.subscription`` names it) and the subscription is
      forgotten. An error about a quote of an accepted subscription (``no_market_data``,
      ``overloaded``, ...) is logged and skipped: the subscription stays and its next
      trigger quotes it again. With ``yield_errors=True`` every error message is
      yielded instead (a dict with ``"type": "error"``).
    - When the connection drops (server restart: close 1001, reset, or missed
      heartbeats) the stream connects again with backoff (from ``reconnect_initial``
      doubling to ``reconnect_max`` seconds, with jitter, at least the server's
      ``Retry-After``) and sends its subscriptions again; the server answers each with a
      fresh ``reason: "subscribe"`` quote and its ``seq`` starts again at 1. It keeps
      trying until ``reconnect_for`` seconds without a connection have passed (None:
      never; the last try comes at that limit), then raises :class:`ConnectionFailed`. A
      timeout around an iteration (``asyncio.wait_for``, ``SyncStream.get(timeout)``)
      does not restart that clock nor the backoff: the next iteration goes on with them.
      The first connection is not retried: its failure raises.
    - ``reconnects`` counts the reconnections so far.

    One task iterates a stream; others may call :meth:`subscribe` and :meth:`unsubscribe`.
    """

    def __init__(
        self,
        client: AsyncClient,
        subscriptions: Sequence[Mapping[str, Any]],
        *,
        yield_errors: bool,
        heartbeat: float,
        reconnect_initial: float,
        reconnect_max: float,
        reconnect_for: float | None,
    ) -> None:
        self._client = client
        self._subs: dict[str, dict[str, Any]] = {}
        self._acked: set[str] = set()
        for sub in subscriptions:
            self._add(sub)
        self._yield_errors = yield_errors
        self._heartbeat = heartbeat
        self._initial = reconnect_initial
        self._max = reconnect_max
        self._reconnect_for = reconnect_for
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._lock = asyncio.Lock()
        self._closing = asyncio.Event()
        self._opened = False
        self._closed = False
        self.reconnects = 0
        # The outage being reconnected from, kept on the stream (not in _reconnect) so that
        # a caller's timeout, which cancels _reconnect, neither restarts the backoff nor
        # the reconnect_for clock: when it began (loop time; None when connected), the
        # next backoff step, and the loop time of the next try (None: try now).
        self._down_since: float | None = None
        self._delay = reconnect_initial
        self._retry_at: float | None = None

    @property
    def subscriptions(self) -> list[str]:
        """The ids this stream holds (and sends again after a reconnect)."""
        return list(self._subs)

    def _add(self, subscription: Mapping[str, Any]) -> dict[str, Any]:
        sub = {k: v for k, v in subscription.items() if k != "op"}
        sub_id = sub.get("id")
        if not isinstance(sub_id, str) or not sub_id:
            raise InvalidRequest(
                "a subscription needs an 'id' (a non-empty string)",
                code="invalid",
                details=[{"field": "id", "reason": f"got {sub_id!r}"}],
            )
        if sub_id in self._subs:
            raise Conflict(f"subscription {sub_id!r} exists on this stream", code="conflict", subscription=sub_id)
        if isinstance(sub.get("val_datetime"), datetime):
            sub["val_datetime"] = _time(sub["val_datetime"])
        message = {"op": "subscribe", **sub}
        self._subs[sub_id] = message
        return message

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def connect(self) -> None:
        """Open the connection now (the first iteration does it otherwise): raises the
        typed error when the server cannot be reached or refuses the upgrade."""
        if not self._opened:
            await self._open()

    async def _open(self) -> None:
        async with self._lock:
            if self._closed or self._ws is not None:
                return
            ws = await self._client._ws_connect(self._heartbeat)
            try:
                self._acked.clear()
                for message in self._subs.values():
                    await ws.send_str(orjson.dumps(message).decode())
            except BaseException:
                await ws.close()
                raise
            if self._closed:  # close() ran while this connected: it could not see ws
                await ws.close()
                return
            self._ws = ws
            self._opened = True

    async def _reconnect(self) -> None:
        """Connect again after the connection dropped: tries with backoff until one
        succeeds, the stream is closed, or ``reconnect_for`` seconds of outage have passed
        (then ConnectionFailed; iterating again starts a new outage). Cancelling it (a
        caller's timeout) keeps the outage's clock and backoff: the next call goes on."""
        loop = asyncio.get_running_loop()
        if self._down_since is None:
            self._down_since = loop.time()
            self._delay = self._initial
            self._retry_at = None
        while not self._closed:
            if self._retry_at is not None:
                wait = self._retry_at - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):  # close() ends the wait
                        await asyncio.wait_for(self._closing.wait(), wait)
                    continue
                self._retry_at = None
            try:
                await self._open()
            except TRANSIENT as exc:
                now = loop.time()
                wait = self._delay * random.uniform(0.5, 1.0)
                if exc.retry_after is not None:
                    wait = max(wait, exc.retry_after)
                self._delay = min(self._delay * 2, self._max)
                if self._reconnect_for is not None:
                    left = self._down_since + self._reconnect_for - now
                    if left <= 0:
                        self._down_since = None
                        raise ConnectionFailed(
                            f"the stream could not reconnect within {self._reconnect_for:g} s: {exc}",
                        ) from exc
                    wait = min(wait, left)  # the last try comes when reconnect_for is up
                log.debug("stream reconnect failed (%s); next try in %.2f s", exc, wait)
                self._retry_at = now + wait
            else:
                self._down_since = None
                self._retry_at = None
                if self._closed:  # closed while connecting: _open kept no connection
                    return
                self.reconnects += 1
                log.info("stream reconnected (%d subscription(s) sent again)", len(self._subs))
                return

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._closed:
                raise StopAsyncIteration
            ws = self._ws
            if ws is None:
                if self._opened:
                    await self._reconnect()
                else:
                    await self._open()
                continue
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                out = self._handle(orjson.loads(msg.data))
                if out is not None:
                    return out
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                await self._lost(ws, f"closed by the server (code {ws.close_code})")
            elif msg.type == aiohttp.WSMsgType.ERROR:
                await self._lost(ws, f"error: {msg.data}")

    async def _lost(self, ws: aiohttp.ClientWebSocketResponse, why: str) -> None:
        async with self._lock:
            if self._ws is ws:
                self._ws = None
        await ws.close()
        if not self._closed:
            log.info("stream connection lost (%s); reconnecting", why)

    def _handle(self, message: Any) -> dict[str, Any] | None:
        if not isinstance(message, dict):
            return None
        kind, sub_id = message.get("type"), message.get("id")
        if kind == "quote":
            return message if sub_id in self._subs else None
        if kind == "subscribed" and isinstance(sub_id, str):
            self._acked.add(sub_id)
            return None
        if kind != "error":
            return None
        refused = sub_id is None or (sub_id in self._subs and sub_id not in self._acked)
        if not refused and sub_id not in self._subs:
            return None  # about a subscription this stream already dropped
        if refused and sub_id is not None:
            del self._subs[sub_id]  # not sent again after a reconnect
        if self._yield_errors:
            return message
        details = message.get("details")
        err = error_from_code(
            str(message.get("code") or "error"),
            str(message.get("message") or ""),
            details=details if isinstance(details, list) else [],
            subscription=sub_id if isinstance(sub_id, str) else None,
        )
        if refused:
            raise err
        log.warning("stream: no quote for subscription %r: %s", sub_id, err)
        return None

    async def subscribe(self, subscription: Mapping[str, Any]) -> None:
        """Add a subscription (sent now when connected, and after every reconnect)."""
        async with self._lock:
            message = self._add(subscription)
            await self._send(message)

    async def unsubscribe(self, sub_id: str) -> None:
        """Drop a subscription: no quote for it is yielded from now on."""
        async with self._lock:
            if self._subs.pop(sub_id, None) is None:
                return
            self._acked.discard(sub_id)
            await self._send({"op": "unsubscribe", "id": sub_id})

    async def _send(self, message: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return  # sent with the others when the stream connects
        # a connection that is going: the reader reconnects and sends every subscription
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            await ws.send_str(orjson.dumps(message).decode())

    async def close(self) -> None:
        """Close the connection; iteration ends (StopAsyncIteration)."""
        self._closed = True
        self._closing.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
