"""ValuationQueue: dynamic batching in front of the compute worker.

Requests are grouped by (models, namespace, val_datetime, data_asof): one batch prices
one market-data key with one version of each model. A batch waits at most
``max_wait_seconds`` to fill and holds at most ``max_batch_contracts`` (a larger
request is a batch of its own). The queue is bounded: past ``max_pending_requests`` or
``max_pending_contracts`` a request is refused with 503 and Retry-After instead of
growing the queue. Work whose client has gone or whose deadline has passed is dropped
before it is computed. Two batches may be in flight so the worker never idles between
them; the worker runs them in order, so versions never go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from spectralmc_server.engine.pricer import ServedModel
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.service.errors import (
    APIError,
    DeadlineExceeded,
    EngineFailure,
    Invalid,
    NoMarketData,
    Unavailable,
)
from spectralmc_server.service.marketdata import MarketData, explicit_request, needs_market_data
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.service.models import ModelHost
from spectralmc_server.service.schemas import PriceRequest
from spectralmc_server.service.valuation import RequestError, Valuer
from spectralmc_server.service.worker import ComputeWorker, EngineDead
from spectralmc_server.settings import QueueSettings

log = logging.getLogger(__name__)
GroupKey = tuple[tuple[str, ...], str, datetime | None, datetime | None]


@dataclass(eq=False)
class Pending:
    """One queued request."""

    key: GroupKey
    request: PriceRequest
    contracts: int
    future: asyncio.Future[dict[str, Any]]
    deadline: float  # loop time
    connected: Callable[[], bool]
    enqueued: float = field(default_factory=time.perf_counter)
    needs_market: bool = False  # has contracts by reference: resolved once per batch


def group_key(request: PriceRequest) -> GroupKey:
    models = tuple(sorted({c.process for c in request.contracts}))
    return models, request.namespace, request.val_datetime, request.data_asof


class ValuationQueue:
    """Batches requests for the :class:`ComputeWorker` (run :meth:`run` as a task)."""

    def __init__(
        self,
        settings: QueueSettings,
        worker: ComputeWorker,
        host: ModelHost,
        metrics: Metrics,
        market: MarketData | None = None,
    ) -> None:
        self.settings = settings
        self.market = market
        self.worker = worker
        self.host = host
        self.metrics = metrics
        self._items: deque[Pending] = deque()
        self._contracts = 0
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(2)  # batches in flight
        self._inflight: set[asyncio.Task[None]] = set()
        self.closed = False

    @property
    def depth(self) -> tuple[int, int]:
        """Queued requests and contracts (not counting batches already computing)."""
        return len(self._items), self._contracts

    def submit(
        self, request: PriceRequest, *, timeout: float, connected: Callable[[], bool]
    ) -> asyncio.Future[dict[str, Any]]:
        """Queue a validated request; the future resolves to its response dict."""
        s = self.settings
        n = len(request.contracts)
        if self.closed:
            self.metrics.dropped.labels("shutting_down").inc()
            raise Unavailable("the server is shutting down", s.retry_after_seconds, code="shutting_down")
        if len(self._items) >= s.max_pending_requests or self._contracts + n > s.max_pending_contracts:
            self.metrics.dropped.labels("overloaded").inc()
            raise Unavailable(
                f"overloaded: {len(self._items)} requests ({self._contracts} contracts) queued; "
                f"bounds are {s.max_pending_requests} requests and {s.max_pending_contracts} contracts",
                s.retry_after_seconds,
                code="overloaded",
            )
        loop = asyncio.get_running_loop()
        item = Pending(
            group_key(request),
            request,
            n,
            loop.create_future(),
            loop.time() + timeout,
            connected,
            needs_market=needs_market_data(request),
        )
        self._items.append(item)
        self._contracts += n
        self._arrived.set()
        return item.future

    def _take(self) -> list[Pending]:
        """The oldest request's key: every queued request with it, in order, up to the
        batch limit (a request larger than the limit goes alone)."""
        first = self._items[0]
        limit = self.settings.max_batch_contracts
        batch: list[Pending] = []
        rest: deque[Pending] = deque()
        total = 0
        for item in self._items:
            if item.key == first.key and (not batch or total + item.contracts <= limit):
                batch.append(item)
                total += item.contracts
            else:
                rest.append(item)
        self._items = rest
        self._contracts -= total
        return batch

    def _live(self, batch: list[Pending]) -> list[Pending]:
        now = asyncio.get_running_loop().time()
        live = []
        for item in batch:
            if not item.connected():  # first: a handler cancelled on disconnect also cancels its future
                item.future.cancel()
                self.metrics.dropped.labels("disconnected").inc()
            elif item.future.done():  # the handler gave up (deadline) and cancelled it
                self.metrics.dropped.labels("deadline").inc()
            elif now >= item.deadline:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
                self.metrics.dropped.labels("deadline").inc()
            else:
                live.append(item)
        return live

    async def run(self) -> None:
        """The batcher loop: forever, until cancelled."""
        wait = self.settings.max_wait_seconds
        while True:
            while not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            if not self._items:  # drained while waiting for a slot
                self._slots.release()
                continue
            first = self._items[0]
            waited = time.perf_counter() - first.enqueued
            if wait > 0 and waited < wait and self._contracts < self.settings.max_batch_contracts:
                await asyncio.sleep(wait - waited)
            batch = self._live(self._take())
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._compute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _compute(self, batch: list[Pending]) -> None:
        try:
            start = time.perf_counter()
            for item in batch:
                self.metrics.queue_wait_seconds.observe(start - item.enqueued)
            host = self.host
            resolved = await self._resolve(batch)
            batch = [i for i in batch if not i.future.done()]
            failed: dict[int, RequestError] = {}

            def job() -> tuple[list[Pending], list[dict[str, Any]], dict[str, ServedModel], float]:
                # On the worker, just before computing: the batch may have waited behind a
                # training step or another batch, and its clients may have gone meanwhile
                # (reading transport and future state from this thread is a plain read).
                live = [i for i in batch if i.connected() and not i.future.done()]
                t0 = time.perf_counter()
                requests: list[PriceRequest] = []
                markets: list[dict[str, Any] | None] = []
                priced: list[Pending] = []
                for i in live:  # contracts by reference get their inputs from the one snapshot
                    if i.needs_market and resolved is not None:
                        try:
                            requests.append(explicit_request(i.request, *resolved))
                        except RequestError as exc:
                            failed[id(i)] = exc
                            continue
                        markets.append(resolved[0].key())
                    else:
                        requests.append(i.request)
                        markets.append(None)
                    priced.append(i)
                models = host.snapshot()  # one version per model for the whole batch
                answers = Valuer(models).value_many(requests) if requests else []
                for answer, market in zip(answers, markets, strict=True):
                    answer["market_data"] = market
                return priced, answers, models, time.perf_counter() - t0

            try:
                computed, answers, _, seconds = await self.worker.submit(job)
            except EngineDead as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(Unavailable(f"the compute engine is down: {exc}", 5))
                return
            except Exception as exc:  # valid requests that the engine could not price: a bug
                self.worker.mark_failed(f"batch failed: {type(exc).__name__}: {exc}")
                log.exception("batch of %d requests failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(EngineFailure(f"the pricing engine failed: {type(exc).__name__}"))
                return
            for item in batch:
                err = failed.get(id(item))
                if err is not None and not item.future.done():
                    detail = {"field": err.field, "reason": err.reason}
                    item.future.set_exception(NoMarketData(str(err), details=[detail]))
            done = {id(i) for i in computed} | failed.keys()
            skipped = [i for i in batch if id(i) not in done]
            self._live(skipped)  # counts them (disconnected or deadline) and settles them
            if not computed:
                return
            self.metrics.batch_seconds.observe(seconds)
            self.metrics.batch_requests.observe(len(computed))
            self.metrics.batch_contracts.observe(sum(i.contracts for i in computed))
            priced = Counter((row["model"], row["method"]) for answer in answers for row in answer["results"])
            for (model, method), count in priced.items():
                self.metrics.contracts_priced.labels(model, method).inc(count)
            for item, answer in zip(computed, answers, strict=True):
                if not item.future.done():
                    item.future.set_result(answer)
        finally:
            self._slots.release()

    async def _resolve(self, batch: list[Pending]) -> tuple[SnapshotRecord, MarketSnapshot] | None:
        """The batch's one snapshot, when a request in it prices by reference (every
        request in a batch names the same key). A failure answers just those requests."""
        needing = [i for i in batch if i.needs_market]
        if not needing:
            return None
        first = needing[0].request
        try:
            if self.market is None:
                raise Invalid(
                    "this server has no market data", details=[{"field": "contracts", "reason": "by reference"}]
                )
            if first.val_datetime is None:  # the route refuses these; kept for direct callers
                raise Invalid(
                    "contracts by reference need val_datetime",
                    details=[{"field": "val_datetime", "reason": "required with underlying/expiry contracts"}],
                )
            return await self.market.resolve(first.namespace, first.val_datetime, first.data_asof)
        except APIError as exc:
            for item in needing:
                if not item.future.done():
                    item.future.set_exception(type(exc)(exc.message, details=exc.details))
        except Exception as exc:  # the store failed: a 503 for these requests, not a dead engine
            log.warning("snapshot resolution failed: %s: %s", type(exc).__name__, exc)
            for item in needing:
                if not item.future.done():
                    item.future.set_exception(
                        Unavailable(
                            f"market data unavailable: {type(exc).__name__}: {exc}", 1, code="store_unavailable"
                        )
                    )
        return None

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, then wait until everything queued has been answered."""
        self.closed = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (self._items or self._inflight) and loop.time() < end:
            await asyncio.sleep(0.01)
        return not (self._items or self._inflight)

    async def stop(self) -> None:
        for task in list(self._inflight):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for item in self._items:
            if not item.future.done():
                item.future.set_exception(Unavailable("the server stopped before this request was priced", 1))
        self._items.clear()
        self._contracts = 0
