"""The stream hub: client messages (subscribe, unsubscribe), and serving one WebSocket connection."""

from __future__ import annotations

import asyncio
import math

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import ValidationError

from spectralmc_server.pricing.schemas import (
    format_validation_error,
)
from spectralmc_server.service.stream.connection import Connection, Subscription, _field, _fingerprint
from spectralmc_server.service.stream.messages import ClientMessage, Subscribe, Unsubscribe
from spectralmc_server.service.stream.requotes import Requoting


class StreamHub(Requoting):
    """Every stream connection, the triggers that requote them, and topic publishing."""

    # -- client messages --------------------------------------------------------------------

    def handle(self, conn: Connection, raw: str) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            conn.error(None, "malformed", f"the message is not valid JSON: {exc}")
            return
        sub_id = data.get("id") if isinstance(data, dict) else None
        sub_id = sub_id if isinstance(sub_id, str) else None
        try:
            message = ClientMessage.model_validate({"message": data}).message
        except ValidationError as exc:
            details = [{**d, "field": _field(d["field"])} for d in format_validation_error(exc)]
            conn.error(sub_id, "invalid", f"{len(details)} invalid field(s)", details)
            return
        if isinstance(message, Unsubscribe):
            self.unsubscribe(conn, message.id)
        else:
            self.subscribe(conn, message)

    def subscribe(self, conn: Connection, spec: Subscribe) -> None:
        s = self.settings
        if spec.id in conn.subs:
            conn.error(spec.id, "conflict", f"subscription {spec.id!r} exists; unsubscribe it first or use another id")
            return
        if len(conn.subs) >= s.max_subscriptions:
            conn.error(spec.id, "too_many", f"at most {s.max_subscriptions} subscriptions per connection")
            return
        n = len(spec.contracts or ())
        if conn.contracts + n > s.max_contracts:
            conn.error(
                spec.id,
                "too_many",
                f"at most {s.max_contracts} contracts per connection ({conn.contracts} subscribed, {n} asked)",
            )
            return
        if spec.interval_seconds is not None and spec.interval_seconds < s.min_interval_seconds:
            conn.error(
                spec.id,
                "invalid",
                "interval too short",
                [{"field": "interval_seconds", "reason": f"at least {s.min_interval_seconds:g} s"}],
            )
            return
        if spec.topic is not None and spec.topic not in self.known_topics:
            known = sorted(self.known_topics)
            listed = ", ".join(repr(t) for t in known) if known else "none (no price job is declared)"
            conn.error(
                spec.id,
                "not_found",
                f"no price job publishes topic {spec.topic!r}; known topics: {listed}",
                [{"field": "topic", "reason": "no price job publishes it", "known": known}],
            )
            return
        if spec.contracts is not None:
            try:  # what /v1/price would refuse for the whole request, refused now
                spec.price_request(spec.val_datetime, None)
            except ValidationError as exc:
                conn.error(spec.id, "invalid", "the subscription cannot be priced", format_validation_error(exc))
                return
        needs = any(not c.is_explicit for c in spec.contracts or ())
        entries = tuple(self._intern(c) for c in spec.contracts or ())
        sub = Subscription(spec, _fingerprint(spec), needs, entries)
        conn.subs[spec.id] = sub
        conn.offer_control("subscribed", {"id": spec.id, "contracts": n, "topic": spec.topic})
        if spec.topic is not None:
            last = self.topics.get(spec.topic)
            if last is not None:
                sub.seq += 1
                conn.offer_quote(
                    sub.id,
                    orjson.dumps(
                        {
                            "type": "quote",
                            "id": sub.id,
                            "seq": sub.seq,
                            "reason": "subscribe",
                            "topic": spec.topic,
                            **last,
                        }
                    ),
                )
            return
        self.due(conn, sub, "subscribe")
        if spec.interval_seconds is not None:
            sub.ticker = asyncio.create_task(self._tick(conn, sub, spec.interval_seconds))

    async def _tick(self, conn: Connection, sub: Subscription, period: float) -> None:
        """Interval pushes on a fixed grid from the subscription's start (no drift); a
        tick the hub has not served yet is not queued twice."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        k = 1
        while True:
            await asyncio.sleep(max(0.0, start + k * period - loop.time()))
            self.due(conn, sub, "interval")
            k = max(k + 1, math.floor((loop.time() - start) / period) + 1)

    def unsubscribe(self, conn: Connection, sub_id: str) -> None:
        sub = conn.subs.pop(sub_id, None)
        if sub is None:
            conn.error(sub_id, "not_found", f"no subscription {sub_id!r} on this connection")
            return
        if sub.ticker is not None:
            sub.ticker.cancel()
        self._release(sub)
        conn.forget(sub_id)  # no quote for it may follow the "unsubscribed"
        conn.offer_control("unsubscribed", {"id": sub_id})

    def drop(self, conn: Connection) -> None:
        self.connections.discard(conn)
        conn.closed = True
        for sub in conn.subs.values():
            if sub.ticker is not None:
                sub.ticker.cancel()
            self._release(sub)
        conn.subs.clear()
        if conn.writer is not None:
            conn.writer.cancel()

    async def close_all(self, timeout: float = 1.0) -> None:
        """Shutdown: every client gets GOING_AWAY, all at once; a client that does not
        take the close frame within ``timeout`` (it stopped reading) is cut off."""
        conns = list(self.connections)

        async def close(conn: Connection) -> None:
            conn.close_reason = conn.close_reason or "shutdown"
            try:
                async with asyncio.timeout(timeout):
                    await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
            except Exception:
                conn.abort()

        await asyncio.gather(*(close(c) for c in conns))
        for conn in conns:
            self.drop(conn)


async def serve_connection(request: web.Request, hub: StreamHub) -> web.WebSocketResponse:
    """Run one WebSocket: only this task reads, the connection's writer task writes."""
    s = hub.settings
    ws = web.WebSocketResponse(heartbeat=s.heartbeat_seconds, max_msg_size=s.max_message_bytes)
    await ws.prepare(request)
    transport = request.transport

    def abort() -> None:
        if transport is not None:
            transport.abort()

    conn = Connection(ws, s, hub.metrics, abort)
    conn.writer = asyncio.create_task(conn.write())
    hub.connections.add(conn)
    reason = "client"
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                hub.handle(conn, msg.data)
            elif msg.type == WSMsgType.BINARY:
                conn.error(None, "malformed", "binary frames are not accepted; send JSON text")
            elif msg.type == WSMsgType.ERROR:
                reason = "error"
                break
        if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
            reason = "too_big"
    finally:
        hub.drop(conn)
        hub.metrics.stream_closed.labels(conn.close_reason or reason).inc()
    return ws
