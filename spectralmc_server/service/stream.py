"""WebSocket ``/v1/stream``: subscriptions and quotes pushed as data and models change.

Client messages (JSON text)::

    {"op": "subscribe", "id": "s1", "namespace": "default", "contracts": [...],
     "measures": [...], "interval_seconds": 1.0}          # or "topic": "<job topic>"
    {"op": "unsubscribe", "id": "s1"}

Server messages: ``{"type": "subscribed", ...}``, ``{"type": "quote", "id", "seq",
"reason", "results", "models", "market_data", ...}`` and ``{"type": "error", "id",
"code", "message", "details"}``. A bad message gets an error and the connection stays.

Quotes are pushed on subscribe, on each new snapshot for the namespace (stored here or,
found by polling the namespace's latest ref, through another replica), on each model
version change and every ``interval_seconds``. One hub task computes them in order, so
seq and data never go backwards; subscriptions asking for the same thing are priced once.

Each connection has one writer task and a bounded send queue: at most one pending
quote per subscription (a newer one replaces it: ``coalesced``) and at most
``control_queue`` error messages. A stalled client costs nothing but its own queue,
and after ``send_timeout_seconds`` blocked on one send it is disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.rfc3339 import DateTime
from spectralmc_server.service.errors import APIError, NoMarketData, Unavailable
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.service.schemas import (
    MAX_QUANTILE_LEVELS,
    NAMESPACE_PATTERN,
    Contract,
    Measure,
    PriceRequest,
    format_validation_error,
)
from spectralmc_server.settings import StreamSettings

log = logging.getLogger(__name__)
NOTHING_SEEN = (datetime.min.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))
Price = Callable[[PriceRequest], Awaitable[dict[str, Any]]]


def _default_measures() -> list[Measure]:
    return ["price"]


class Subscribe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["subscribe"]
    id: str = Field(min_length=1, max_length=128)
    namespace: str = Field("default", pattern=NAMESPACE_PATTERN)
    val_datetime: DateTime | None = None  # None: the namespace's latest snapshot
    contracts: list[Contract] | None = Field(None, min_length=1)
    topic: str | None = Field(None, min_length=1, max_length=64)
    measures: list[Measure] = Field(default_factory=_default_measures, min_length=1)
    quantile_levels: list[Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, max_length=MAX_QUANTILE_LEVELS
    )
    interval_seconds: float | None = Field(None, gt=0, le=86_400, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_source(self) -> Subscribe:
        if (self.contracts is None) == (self.topic is None):
            raise ValueError("give exactly one of 'contracts' (quote these) or 'topic' (a price job's stream)")
        if self.topic is not None and self.interval_seconds is not None:
            raise ValueError("a topic is pushed by its job; 'interval_seconds' applies to contracts only")
        return self

    def price_request(self, val_datetime: datetime | None, data_asof: datetime | None) -> PriceRequest:
        """The request this subscription prices (raises ValidationError like /v1/price)."""
        return PriceRequest.model_validate(
            {
                "namespace": self.namespace,
                "val_datetime": val_datetime,
                "data_asof": data_asof,
                "measures": self.measures,
                "quantile_levels": self.quantile_levels,
                "contracts": self.contracts,
            }
        )


class Unsubscribe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["unsubscribe"]
    id: str = Field(min_length=1, max_length=128)


class ClientMessage(BaseModel):
    message: Annotated[Subscribe | Unsubscribe, Field(discriminator="op")]


@dataclass(eq=False)
class Subscription:
    spec: Subscribe
    fingerprint: bytes  # equal for subscriptions that ask for the same quotes
    needs_market: bool
    seq: int = 0
    ticker: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.spec.id


def _field(path: str) -> str:
    """``message.subscribe.contracts[0].strike`` -> ``contracts[0].strike``."""
    for prefix in ("message.subscribe", "message.unsubscribe", "message"):
        if path == prefix:
            return "(message)"
        if path.startswith(prefix + "."):
            return path[len(prefix) + 1 :]
    return path


def _fingerprint(spec: Subscribe) -> bytes:
    return orjson.dumps(
        spec.model_dump(mode="json", exclude={"id", "op", "interval_seconds"}), option=orjson.OPT_SORT_KEYS
    )


class Connection:
    """One client: its subscriptions and its bounded send queue (drained by one writer)."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        settings: StreamSettings,
        metrics: Metrics,
        abort: Callable[[], None] = lambda: None,
    ) -> None:
        self.ws = ws
        self.abort = abort  # drops the TCP connection at once (a client that does not read)
        self.close_reason: str | None = None  # set when the server closes it (stalled, shutdown)
        self.settings = settings
        self.metrics = metrics
        self.subs: dict[str, Subscription] = {}
        self._quotes: OrderedDict[str, bytes] = OrderedDict()  # newest quote per subscription
        self._control: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def contracts(self) -> int:
        return sum(len(s.spec.contracts or ()) for s in self.subs.values())

    @property
    def queued(self) -> int:
        return len(self._quotes) + len(self._control)

    def offer_quote(self, sub_id: str, payload: bytes) -> None:
        if self.closed:
            return
        if sub_id in self._quotes:
            self.metrics.stream_dropped.labels("coalesced").inc()
        self._quotes[sub_id] = payload
        self._wake.set()

    def offer_control(self, kind: str, body: dict[str, Any]) -> None:
        if self.closed:
            return
        if len(self._control) >= self.settings.control_queue:
            self._control.popleft()
            self.metrics.stream_dropped.labels("control_overflow").inc()
        self._control.append((kind, orjson.dumps({"type": kind, **body})))
        self._wake.set()

    def forget(self, sub_id: str) -> None:
        """Drop an unsent quote of a subscription that has gone."""
        self._quotes.pop(sub_id, None)

    def error(self, sub_id: str | None, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        self.offer_control("error", {"id": sub_id, "code": code, "message": message, "details": details or []})

    async def write(self) -> None:
        """The writer task: sends queued messages in order, errors first."""
        timeout = self.settings.send_timeout_seconds
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._control or self._quotes:
                if self._control:
                    kind, payload = self._control.popleft()
                else:
                    kind, payload = "quote", self._quotes.popitem(last=False)[1]
                try:
                    async with asyncio.timeout(timeout):
                        await self.ws.send_str(payload.decode())
                except TimeoutError:
                    log.info("closing a stream client stalled for %.0f s", timeout)
                    self.close_reason = "stalled"
                    self.closed = True
                    self.abort()
                    return
                except ConnectionError:
                    self.closed = True
                    return
                self.metrics.stream_messages.labels(kind).inc()


class StreamHub:
    """Every stream connection, the triggers that requote them, and topic publishing."""

    def __init__(
        self,
        settings: StreamSettings,
        metrics: Metrics,
        price: Price,
        market: MarketData,
        poll_seconds: float,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.price = price
        self.market = market
        self.poll_seconds = poll_seconds
        self.connections: set[Connection] = set()
        self.topics: dict[str, dict[str, Any]] = {}  # topic -> last published body
        self._namespaces: dict[str, str] = {}  # namespace -> pending reason
        self._all: str | None = None  # pending reason for every subscription (model change)
        self._due: dict[tuple[int, str], tuple[Connection, Subscription, str]] = {}
        self._wake = asyncio.Event()
        self._seen: dict[str, tuple[datetime, datetime]] = {}  # namespace -> latest key seen
        self._trigger_time: float | None = None

    # -- triggers (called on the loop; none of them blocks) --------------------------------

    def _trigger(self) -> None:
        if self._trigger_time is None:
            self._trigger_time = time.perf_counter()
        self._wake.set()

    def snapshot_stored(self, record: SnapshotRecord) -> None:
        seen = self._seen.get(record.namespace)
        if seen is None or record.sort_key() > seen:
            self._seen[record.namespace] = record.sort_key()
        self._namespaces[record.namespace] = "snapshot"
        self._trigger()

    def models_changed(self, _version: int) -> None:
        self._all = "model"
        self._trigger()

    def due(self, conn: Connection, sub: Subscription, reason: str) -> None:
        self._due[(id(conn), sub.id)] = (conn, sub, reason)
        self._trigger()

    @property
    def subscriptions(self) -> int:
        return sum(len(c.subs) for c in self.connections)

    # -- the hub's tasks --------------------------------------------------------------------

    async def run(self) -> None:
        """Requote whatever the triggers name, one round at a time."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            started, self._trigger_time = self._trigger_time, None
            namespaces, self._namespaces = self._namespaces, {}
            everyone, self._all = self._all, None
            due, self._due = self._due, {}
            work: dict[tuple[int, str], tuple[Connection, Subscription, str]] = {}
            for conn in list(self.connections):
                for sub in list(conn.subs.values()):
                    if sub.spec.contracts is None:
                        continue
                    if everyone is not None:
                        work[(id(conn), sub.id)] = (conn, sub, everyone)
                    elif sub.spec.namespace in namespaces and sub.needs_market:
                        work[(id(conn), sub.id)] = (conn, sub, namespaces[sub.spec.namespace])
            for key, item in due.items():
                work.setdefault(key, item)
            try:
                await self.requote(list(work.values()))
            except Exception:
                log.exception("stream requote failed")
            if started is not None and work:
                self.metrics.stream_publish_seconds.observe(time.perf_counter() - started)

    async def watch(self) -> None:
        """Find snapshots stored through other replicas: poll the latest ref of every
        namespace someone streams from."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            names = {s.spec.namespace for c in self.connections for s in c.subs.values() if s.needs_market}
            for ns in sorted(names):
                try:
                    latest = await self.market.store.latest(ns)
                except Exception as exc:  # the store is down: try again next time
                    log.debug("latest snapshot poll of %s failed: %s", ns, exc)
                    continue
                if latest is None:
                    continue
                seen = self._seen.get(ns)
                if seen is None:
                    self._seen[ns] = latest.sort_key()
                elif latest.sort_key() > seen:
                    self.snapshot_stored(latest)

    async def requote(self, work: list[tuple[Connection, Subscription, str]]) -> None:
        """Price each distinct subscription once and queue the quote on every connection."""
        if not work:
            return
        groups: dict[bytes, list[tuple[Connection, Subscription, str]]] = {}
        for item in work:
            groups.setdefault(item[1].fingerprint, []).append(item)
        latest: dict[str, SnapshotRecord | None] = {}
        failed: dict[str, APIError] = {}
        for _, sub, _ in work:
            ns = sub.spec.namespace
            if not (sub.needs_market and sub.spec.val_datetime is None) or ns in latest or ns in failed:
                continue
            try:
                record = latest[ns] = await self.market.store.latest(ns)
            except Exception as exc:  # the store is down: these subscriptions get an error
                failed[ns] = Unavailable(
                    f"market data unavailable: {type(exc).__name__}: {exc}", 1, code="store_unavailable"
                )
                continue
            seen = self._seen.get(ns)
            if record is None:  # nothing yet: the first snapshot (even via a replica) is news
                self._seen.setdefault(ns, NOTHING_SEEN)
            elif seen is None or record.sort_key() > seen:
                self._seen[ns] = record.sort_key()

        async def one(members: list[tuple[Connection, Subscription, str]]) -> None:
            spec = members[0][1].spec
            try:
                if members[0][1].needs_market and spec.val_datetime is None:
                    if spec.namespace in failed:
                        raise failed[spec.namespace]
                    record = latest.get(spec.namespace)
                    if record is None:
                        raise NoMarketData(f"no market-data snapshot in namespace {spec.namespace!r} yet")
                    request = spec.price_request(record.val_datetime, record.data_asof)
                else:
                    request = spec.price_request(spec.val_datetime, None)
                answer = await self.price(request)
            except APIError as exc:
                for conn, sub, _ in members:
                    conn.error(sub.id, exc.code, exc.message, exc.details)
                return
            except ValidationError as exc:
                for conn, sub, _ in members:
                    conn.error(sub.id, "invalid", "the subscription cannot be priced", format_validation_error(exc))
                return
            for conn, sub, reason in members:
                if conn.subs.get(sub.id) is not sub:
                    continue  # unsubscribed meanwhile
                sub.seq += 1
                conn.offer_quote(
                    sub.id, orjson.dumps({"type": "quote", "id": sub.id, "seq": sub.seq, "reason": reason, **answer})
                )

        await asyncio.gather(*(one(m) for m in groups.values()))

    def publish(self, topic: str, body: dict[str, Any]) -> int:
        """Send a job's result to every subscription of ``topic``; how many got it."""
        self.topics[topic] = body
        sent = 0
        for conn in list(self.connections):
            for sub in conn.subs.values():
                if sub.spec.topic == topic:
                    sub.seq += 1
                    conn.offer_quote(
                        sub.id,
                        orjson.dumps(
                            {"type": "quote", "id": sub.id, "seq": sub.seq, "reason": "job", "topic": topic, **body}
                        ),
                    )
                    sent += 1
        return sent

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
        needs = any(not c.is_explicit for c in spec.contracts or ())
        sub = Subscription(spec, _fingerprint(spec), needs)
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
        conn.forget(sub_id)  # no quote for it may follow the "unsubscribed"
        conn.offer_control("unsubscribed", {"id": sub_id})

    def drop(self, conn: Connection) -> None:
        self.connections.discard(conn)
        conn.closed = True
        for sub in conn.subs.values():
            if sub.ticker is not None:
                sub.ticker.cancel()
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
