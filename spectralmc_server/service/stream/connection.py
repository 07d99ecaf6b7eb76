"""A stream connection and what the hub keeps per subscription: interned contracts, the
in-flight budget, retries, the bounded send queue."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from spectralmc_server.pricing.schemas import (
    Contract,
    PriceRequest,
)
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.service.stream.messages import Subscribe
from spectralmc_server.settings import StreamSettings

log = logging.getLogger(__name__)
NOTHING_SEEN = (datetime.min.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))
Price = Callable[[PriceRequest], Awaitable[dict[str, Any]]]
RETRY_FIRST_SECONDS = 0.02  # backoff of a merged request the queue refused: doubling from this
RETRY_MAX_SECONDS = 1.0  # ... up to this (the queue's own Retry-After is 1 s by default)
SPLIT_AFTER = 3  # refusals in a row after which a merged request is retried as two halves
CONTRACT_FIELD = re.compile(r"^contracts\[(\d+)\]")


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


class SplitRefusedError(Exception):
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
