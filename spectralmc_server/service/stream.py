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
seq and data never go backwards. A subscription to a topic no price job publishes is
refused (``not_found``, naming the known topics).

Requotes are merged: every subscription due in one round (new subscriptions, a
snapshot, a model swap, intervals falling due together) is grouped by what one request
must share (namespace, val_datetime, data_asof, measures, quantile levels, by reference
or not), and each group is priced in as few queue requests as possible: at most
``merge_contracts`` distinct contracts each, identical contracts of many subscriptions
priced once under a hub-wide id, the answer's rows mapped back to each subscription's
own ids. Each subscription gets the quote it would have got alone. A request the queue
refuses as overloaded is retried (after the hub's other requests; a merged one refused
SPLIT_AFTER times in a row as two halves) with backoff for ``overload_retry_seconds``
in all; one that fails naming a contract is split (the subscriptions holding it priced
alone, the rest in halves) so one subscription's bad contract fails only its own
quote; one that misses its deadline (a costly measure set) is priced again in requests
sized to take ``merge_seconds`` at the pace it showed, and that measure set's requests
stay capped until answers show they can grow. The hub holds at most
``max_inflight_requests`` requests and ``max_inflight_contracts`` contracts in the
queue at once, so its backlog waits in the hub, not against any request's deadline.

Each connection has one writer task and a bounded send queue: at most one pending
quote per subscription (a newer one replaces it: ``coalesced``) and at most
``control_queue`` error messages. A stalled client costs nothing but its own queue,
and after ``send_timeout_seconds`` blocked on one send it is disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
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
from spectralmc_server.pricing.schemas import (
    MAX_QUANTILE_LEVELS,
    NAMESPACE_PATTERN,
    Contract,
    Measure,
    PriceRequest,
    format_validation_error,
)
from spectralmc_server.rfc3339 import DateTime
from spectralmc_server.service.errors import APIError, DeadlineExceeded, Invalid, NoMarketData, Unavailable
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import StreamSettings

log = logging.getLogger(__name__)
NOTHING_SEEN = (datetime.min.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))
Price = Callable[[PriceRequest], Awaitable[dict[str, Any]]]
RETRY_FIRST_SECONDS = 0.02  # backoff of a merged request the queue refused: doubling from this
RETRY_MAX_SECONDS = 1.0  # ... up to this (the queue's own Retry-After is 1 s by default)
SPLIT_AFTER = 3  # refusals in a row after which a merged request is retried as two halves
CONTRACT_FIELD = re.compile(r"^contracts\[(\d+)\]")


def _default_measures() -> list[Measure]:
    return ["price"]


class Subscribe(BaseModel):
    # strict like PriceRequest: a boolean or a string is never a number, times are RFC 3339
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

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
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    op: Literal["unsubscribe"]
    id: str = Field(min_length=1, max_length=128)


class ClientMessage(BaseModel):
    message: Annotated[Subscribe | Unsubscribe, Field(discriminator="op")]


@dataclass(eq=False)
class Interned:
    """One distinct contract (its terms without the id), shared by every subscription
    holding it; ``contract`` is it under the hub's id, unique among live contracts, so
    merged requests hold it once."""

    key: bytes
    contract: Contract
    refs: int = 0


@dataclass(eq=False)
class Subscription:
    spec: Subscribe
    fingerprint: bytes  # equal for subscriptions that ask for the same quotes
    needs_market: bool
    entries: tuple[Interned, ...] = ()  # spec.contracts[i] is entries[i] under the subscription's id
    seq: int = 0
    ticker: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.spec.id


Item = tuple["Connection", Subscription, str]  # a subscription due for a quote, and why
GroupKey = tuple[str, datetime | None, datetime | None, tuple[str, ...], tuple[float, ...] | None, bool]


class InflightBudget:
    """How much of the valuation queue the hub holds at once: at most ``max_requests``
    requests and ``max_contracts`` contracts (a larger request waits until it is alone).
    A request acquired ``alone`` waits for the others (and goes before any that come
    after it) and holds the queue to itself, so its time is its own."""

    def __init__(self, max_requests: int, max_contracts: int) -> None:
        self.max_requests = max_requests
        self.max_contracts = max_contracts
        self.requests = 0
        self.contracts = 0
        self.alone = False
        self.waiting_alone = 0
        self._freed = asyncio.Event()

    def _fits(self, n: int, alone: bool) -> bool:
        if self.requests == 0:
            return alone or self.waiting_alone == 0
        if alone or self.alone or self.waiting_alone:
            return False
        return self.requests < self.max_requests and self.contracts + n <= self.max_contracts

    async def acquire(self, n: int, alone: bool = False) -> None:
        self.waiting_alone += alone
        try:
            while not self._fits(n, alone):
                self._freed.clear()
                await self._freed.wait()
        finally:
            self.waiting_alone -= alone
            self._freed.set()  # those waiting behind it look again
        self.requests += 1
        self.contracts += n
        self.alone = alone

    def release(self, n: int) -> None:
        self.requests -= 1
        self.contracts -= n
        self.alone = False
        self._freed.set()


@dataclass
class Retry:
    """What the queue refused as overloaded, retried: one merged request and the parts
    it is split into share one limit (``overload_retry_seconds`` from the first refusal)
    and one backoff."""

    give_up: float | None = None
    delay: float = RETRY_FIRST_SECONDS


class SplitRefused(Exception):  # noqa: N818
    """A merged request refused SPLIT_AFTER times in a row: smaller ones may fit (a queue
    that admits by estimated cost takes a smaller request sooner)."""


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
        self.declared: set[str] = set()  # topics the price jobs publish
        self._interned: dict[bytes, Interned] = {}  # the distinct contracts of live subscriptions
        self._next_id = 0
        self._budget = InflightBudget(settings.max_inflight_requests, settings.max_inflight_contracts)
        self.queue_requests = 0  # requests the hub submitted to the queue (each retry counted)
        # (measures, quantile levels, by reference) -> distinct contracts per merged request,
        # for a measure set whose merged request missed its deadline
        self._caps: dict[tuple[tuple[str, ...], tuple[float, ...] | None, bool], int] = {}
        self.overload_retries = 0  # of which retries after an 'overloaded' refusal

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

    def models_changed(self, _model: str, _version: int) -> None:
        self._all = "model"
        self._trigger()

    def due(self, conn: Connection, sub: Subscription, reason: str) -> None:
        self._due[(id(conn), sub.id)] = (conn, sub, reason)
        self._trigger()

    @property
    def subscriptions(self) -> int:
        return sum(len(c.subs) for c in self.connections)

    @property
    def distinct_contracts(self) -> int:
        """Distinct contract terms held by live subscriptions (each priced once per round)."""
        return len(self._interned)

    def declare_topic(self, topic: str) -> None:
        """A price job publishes ``topic``: subscriptions to it are accepted."""
        self.declared.add(topic)

    @property
    def known_topics(self) -> set[str]:
        return self.declared | self.topics.keys()

    def _intern(self, contract: Contract) -> Interned:
        key = orjson.dumps(contract.model_dump(mode="json", exclude={"id"}), option=orjson.OPT_SORT_KEYS)
        entry = self._interned.get(key)
        if entry is None:
            self._next_id += 1
            entry = self._interned[key] = Interned(key, contract.model_copy(update={"id": f"k{self._next_id}"}))
        entry.refs += 1
        return entry

    def _release(self, sub: Subscription) -> None:
        for entry in sub.entries:
            entry.refs -= 1
            if entry.refs == 0 and self._interned.get(entry.key) is entry:
                del self._interned[entry.key]

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

    async def requote(self, work: list[Item]) -> None:
        """Quote every subscription in ``work``: grouped by what one request must share,
        each group priced in as few merged queue requests as possible, and every
        subscription's quote queued on its connection."""
        if not work:
            return
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

        # group key -> fingerprint -> the subscriptions asking exactly that
        groups: dict[GroupKey, dict[bytes, list[Item]]] = {}
        for item in work:
            conn, sub, _ = item
            spec = sub.spec
            val_datetime, data_asof = spec.val_datetime, None
            if sub.needs_market and spec.val_datetime is None:
                err = failed.get(spec.namespace)
                record = latest.get(spec.namespace)
                if err is None and record is None:
                    err = NoMarketData(f"no market-data snapshot in namespace {spec.namespace!r} yet")
                if err is not None:
                    conn.error(sub.id, err.code, err.message, err.details)
                    continue
                assert record is not None
                val_datetime, data_asof = record.val_datetime, record.data_asof
            levels = None if spec.quantile_levels is None else tuple(spec.quantile_levels)
            key = (spec.namespace, val_datetime, data_asof, tuple(spec.measures), levels, sub.needs_market)
            groups.setdefault(key, {}).setdefault(sub.fingerprint, []).append(item)
        await asyncio.gather(*(self._group(key, list(prints.values())) for key, prints in groups.items()))

    def _limit(self, key: GroupKey) -> int:
        """Distinct contracts per merged request of this group: ``merge_contracts``, or
        less for a measure set whose requests have missed their deadline (see _learn)."""
        return min(self.settings.merge_contracts, self._caps.get(key[3:], self.settings.merge_contracts))

    async def _group(self, key: GroupKey, prints: list[list[Item]], below: int | None = None) -> None:
        """One group's fingerprint groups in merged requests of at most ``_limit`` (and
        fewer than ``below``) distinct contracts each."""
        jobs: list[asyncio.Task[None]] = []
        start = 0
        try:
            while start < len(prints):
                limit = self._limit(key) if below is None else min(self._limit(key), below - 1)
                chunk, start = self._take(prints, start, limit)
                jobs.append(asyncio.create_task(self._merged(key, chunk)))
            await asyncio.gather(*jobs)
        finally:
            for job in jobs:  # the round was cancelled (shutdown): so are its requests
                job.cancel()

    @staticmethod
    def _take(prints: list[list[Item]], start: int, limit: int) -> tuple[list[list[Item]], int]:
        """Fingerprint groups from ``start`` holding at most ``limit`` distinct contracts
        (at least one group); the chunk and where the next one starts."""
        chunk: list[list[Item]] = []
        held: set[Interned] = set()
        for i in range(start, len(prints)):
            fresh = {entry for entry in prints[i][0][1].entries if entry not in held}
            if chunk and len(held) + len(fresh) > limit:
                break
            chunk.append(prints[i])
            held |= fresh
        return chunk, start + len(chunk)

    async def _merged(self, key: GroupKey, chunk: list[list[Item]], retry: Retry | None = None) -> None:
        """Price the fingerprint groups of ``chunk`` (one group key) in one request: each
        distinct contract once under its hub id, the rows handed back under each
        subscription's own ids."""
        if len(chunk) == 1:
            await self._alone(key, chunk[0], retry)
            return
        namespace, val_datetime, data_asof, _, _, _ = key
        index: dict[Interned, int] = {}
        for members in chunk:
            for entry in members[0][1].entries:
                index.setdefault(entry, len(index))
        spec = chunk[0][0][1].spec
        try:
            request = PriceRequest.model_validate(
                {
                    "namespace": namespace,
                    "val_datetime": val_datetime,
                    "data_asof": data_asof,
                    "measures": spec.measures,
                    "quantile_levels": spec.quantile_levels,
                    "contracts": [entry.contract for entry in index],
                }
            )
        except ValidationError:  # each subscription validated alone: price them apart
            await self._split(key, chunk, None)
            return
        retry = retry or Retry()
        try:
            answer = await self._price(request, key, retry, split=True)
        except SplitRefused:
            await self._split(key, chunk, None, retry)
            return
        except DeadlineExceeded as exc:
            if len(index) > 1:  # smaller requests, sized by the time this one took (_learn)
                await self._group(key, chunk, below=len(index))
                return
            for members in chunk:
                for conn, sub, _ in members:
                    conn.error(sub.id, exc.code, exc.message, exc.details)
            return
        except APIError as exc:
            culprit = self._culprit(exc, list(index))
            if culprit is not False:  # it names a contract: only its holders may fail
                await self._split(key, chunk, culprit)
                return
            for members in chunk:
                for conn, sub, _ in members:
                    conn.error(sub.id, exc.code, exc.message, exc.details)
            return
        rows: list[dict[str, Any]] = answer["results"]
        # A response names the model of each process that answered a row with the network
        # (rows name the process), in process-name order; a subscription's quote names
        # those of its own rows. Models are named after their process unless configured
        # otherwise; then the order tells which is which.
        learned = sorted({row["model"] for row in rows if row["method"] == "cvnn"})
        identities = list(answer["models"].items())
        if len(learned) != len(identities):
            log.warning("merged answer names models %s for processes %s: pricing apart", answer["models"], learned)
            await asyncio.gather(*(self._alone(key, members) for members in chunk))
            return
        if set(answer["models"]) == set(learned):
            model_of = {proc: (proc, answer["models"][proc]) for proc in learned}
        else:
            model_of = dict(zip(learned, identities, strict=True))
        for members in chunk:
            sub = members[0][1]
            mine = zip(sub.entries, sub.spec.contracts or (), strict=True)
            own = [{**rows[index[entry]], "id": c.id} for entry, c in mine]
            used = {row["model"] for row in own if row["method"] == "cvnn"}
            models = {name: identity for proc, (name, identity) in model_of.items() if proc in used}
            self._deliver(members, {**answer, "results": own, "models": models})

    @staticmethod
    def _culprit(exc: APIError, contracts: list[Interned]) -> Interned | Literal[False] | None:
        """For a request-level failure naming a contract (422 with ``contracts[i]``): the
        contract (None when the index is not one); False for a failure that every
        subscription of the request would have alone (no snapshot, overloaded, ...)."""
        if not isinstance(exc, Invalid):
            return False
        fields = [str(d.get("field") or "") for d in exc.details]
        if not any(f.startswith("contracts") for f in fields):
            return False
        for f in fields:
            m = CONTRACT_FIELD.match(f)
            if m is not None and int(m.group(1)) < len(contracts):
                return contracts[int(m.group(1))]
        return None

    async def _split(
        self, key: GroupKey, chunk: list[list[Item]], culprit: Interned | None, retry: Retry | None = None
    ) -> None:
        """A merged request failed for one of its subscriptions (or was refused again and
        again): those holding the contract it named are priced alone (each gets exactly
        its own answer) and the rest in two halves, so k bad subscriptions cost
        O(k log n) requests."""
        suspects = [m for m in chunk if culprit is not None and culprit in m[0][1].entries]
        rest = [m for m in chunk if not (culprit is not None and culprit in m[0][1].entries)]
        jobs = [self._alone(key, members) for members in suspects]
        if len(rest) > 1:
            half = len(rest) // 2
            jobs += [self._merged(key, rest[:half], retry), self._merged(key, rest[half:], retry)]
        elif rest:
            jobs.append(self._alone(key, rest[0], retry))
        await asyncio.gather(*jobs)

    async def _alone(self, key: GroupKey, members: list[Item], retry: Retry | None = None) -> None:
        """Subscriptions asking for the same thing: their own request, as if alone."""
        _, val_datetime, data_asof, _, _, _ = key
        try:
            request = members[0][1].spec.price_request(val_datetime, data_asof)
            answer = await self._price(request, key, retry or Retry())
        except APIError as exc:
            for conn, sub, _ in members:
                conn.error(sub.id, exc.code, exc.message, exc.details)
            return
        except ValidationError as exc:
            for conn, sub, _ in members:
                conn.error(sub.id, "invalid", "the subscription cannot be priced", format_validation_error(exc))
            return
        self._deliver(members, answer)

    async def _price(self, request: PriceRequest, key: GroupKey, retry: Retry, split: bool = False) -> dict[str, Any]:
        """One queue request within the hub's in-flight budget, its time learned (_learn).
        Refused as overloaded, it is retried alone (after the hub's other requests: an
        idle queue admits even a request it deems costly) with ``retry``'s backoff, from
        RETRY_FIRST_SECONDS doubling to RETRY_MAX_SECONDS, until ``overload_retry_seconds``
        after its first refusal; then the refusal is the answer. With ``split`` (a merged
        request), SPLIT_AFTER refusals in a row raise SplitRefused instead."""
        n = len(request.contracts)
        loop = asyncio.get_running_loop()
        alone = False
        refusals = 0
        while True:
            await self._budget.acquire(n, alone=alone)
            self.queue_requests += 1
            sent = loop.time()
            try:
                answer = await self.price(request)
            except DeadlineExceeded:
                self._learn(key, n, loop.time() - sent, missed=True)
                raise
            except Unavailable as exc:
                if exc.code != "overloaded":
                    raise
                if retry.give_up is None:
                    retry.give_up = loop.time() + self.settings.overload_retry_seconds
                if loop.time() >= retry.give_up:
                    if self.settings.overload_retry_seconds > 0:
                        raise Unavailable(
                            f"{exc.message} (the stream retried for {self.settings.overload_retry_seconds:g} s)",
                            code="overloaded",
                        ) from None
                    raise
            else:
                self._learn(key, n, loop.time() - sent)
                return answer
            finally:
                self._budget.release(n)
            self.overload_retries += 1
            await asyncio.sleep(min(retry.delay, retry.give_up - loop.time()))
            retry.delay = min(2 * retry.delay, RETRY_MAX_SECONDS)
            refusals += 1
            if split and refusals >= SPLIT_AFTER:
                raise SplitRefused
            alone = True

    def _learn(self, key: GroupKey, n: int, seconds: float, *, missed: bool = False) -> None:
        """A request of ``n`` contracts of this measure set took ``seconds`` (``missed``:
        and then missed its deadline). A miss caps the set's merged requests at the
        contracts that take ``merge_seconds`` at that pace (below ``n``: the deadline is
        well above ``merge_seconds``); an answer within ``merge_seconds`` lets the cap
        grow to what would take ``merge_seconds`` at its pace. A request's time is a
        fixed part plus a part per contract, so n * merge_seconds / seconds contracts take
        at most merge_seconds after an answer that came within it, and answers never
        shrink the cap: only misses do."""
        kind = key[3:]
        target = int(n * self.settings.merge_seconds / max(seconds, 1e-9))
        cap = self._caps.get(kind)
        if missed:
            self._caps[kind] = max(1, min(n - 1, target, self.settings.merge_contracts if cap is None else cap))
        elif cap is not None and seconds <= self.settings.merge_seconds and target > cap:
            if target >= self.settings.merge_contracts:
                del self._caps[kind]
            else:
                self._caps[kind] = target

    @staticmethod
    def _deliver(members: list[Item], answer: dict[str, Any]) -> None:
        for conn, sub, reason in members:
            if conn.subs.get(sub.id) is not sub:
                continue  # unsubscribed meanwhile
            sub.seq += 1
            conn.offer_quote(
                sub.id, orjson.dumps({"type": "quote", "id": sub.id, "seq": sub.seq, "reason": reason, **answer})
            )

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
