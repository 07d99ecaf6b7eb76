"""The batcher: its entries (price, submit, submit_fit), its loop and the jobs it starts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from spectralmc_server.engine_service.messages import (
    EngineDeadError,
    FitReport,
    FitSpec,
)
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.resolve import needs_market_data
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service.batcher.computing import Computing
from spectralmc_server.service.batcher.costs import ClassKey
from spectralmc_server.service.batcher.items import (
    FitItem,
    Pending,
    _ceil_seconds,
    _counts,
    _engine_down,
    _Job,
    _Slice,
    classify,
    group_key,
    tier_of,
)
from spectralmc_server.service.batcher.state import FILL_WORTH, MAX_SLOTS, PIPELINE_CONTRACTS, SLOTS
from spectralmc_server.service.errors import (
    DeadlineExceeded,
    Unavailable,
)


class Batcher(Computing):
    """Admits, batches and splits work for the engine (run :meth:`run` as a task)."""

    def engine_lost(self, reason: str) -> None:
        """The engine is gone: everything queued or in flight is answered 503
        ``engine_unavailable`` now (nothing waits for a deadline)."""
        for item in list(self._items) + list(self._fits) + [sl.item for plan in self._plans.values() for sl in plan]:
            if not item.future.done():
                item.future.set_exception(_engine_down(reason))
                self.metrics.dropped.labels("engine_unavailable").inc()
            self._close(item)

    # -- submitting ---------------------------------------------------------------------

    def submit(
        self, request: PriceRequest, *, timeout: float, connected: Callable[[], bool], columnar: bool = False
    ) -> asyncio.Future[dict[str, Any]]:
        """Queue a validated request; the future resolves to its response dict (with
        ``columns`` in place of ``results`` when ``columnar``)."""
        s = self.settings
        n = len(request.contracts)
        self._check_open()
        if len(self._items) >= s.max_pending_requests or self._contracts + n > s.max_pending_contracts:
            self.metrics.dropped.labels("overloaded").inc()
            raise Unavailable(
                f"overloaded: {len(self._items)} requests ({self._contracts} contracts) queued; "
                f"bounds are {s.max_pending_requests} requests and {s.max_pending_contracts} contracts",
                s.retry_after_seconds,
                code="overloaded",
            )
        runs = classify(request, self.models.current.snapshot())
        counts = _counts(runs, 0, n)

        work = self.cost.seconds(counts)
        jobs = max(math.ceil(n / s.max_batch_contracts), math.ceil(work / s.max_job_seconds))
        self._admit(work + self.cost.overhead([tier_of(request)]) * jobs, timeout, f"this request ({n} contracts)")
        large = jobs > 1
        loop = asyncio.get_running_loop()
        item = Pending(
            group_key(request),
            request,
            n,
            loop.create_future(),
            loop.time() + timeout,
            connected,
            needs_market=needs_market_data(request),
            runs=runs,
            tier=runs[0][1][2],
            margin=(1.0 - s.admission_fraction) * timeout,
            columnar=columnar,
            req=next(self._ids),
        )
        item.future.add_done_callback(lambda f: self._given_up(item, f))
        self._items.append(item)
        if large:
            self._large.add(item)
        self._contracts += n
        self._queued.update(counts)
        self._keys[item.key] += 1
        if self._pump() is not None:  # at once where it can start (the event loop may be busy)
            self._wake.set()
        return item.future

    async def price(
        self, request: PriceRequest, deadline: float, connected: Callable[[], bool], *, columnar: bool = False
    ) -> dict[str, Any]:
        """The one way to price (REST, stream requotes, jobs): queue ``request`` under the
        batcher's bounds and admission, and await its answer until ``deadline`` (the event
        loop's clock). Raises 503 ``overloaded`` / ``shutting_down`` at once, 504 with
        Retry-After past the deadline (the queued work is then dropped, never computed),
        503 ``engine_unavailable`` when the engine is down, 422 for what only the engine
        could find (a snapshot that lacks an input). With ``columnar`` the answer has
        ``columns`` (the columnar answer, docs/api.md) in place of ``results``."""
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            self.metrics.dropped.labels("deadline").inc()
            raise DeadlineExceeded("the deadline passed before the request was queued", headers=self._retry_after())
        future = self.submit(request, timeout=timeout, connected=connected, columnar=columnar)
        try:
            async with asyncio.timeout_at(deadline):  # cancels the future: the batcher then skips it
                return await future
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer within the {timeout:g} s deadline", headers=self._retry_after()
            ) from None

    def submit_fit(
        self,
        spec: FitSpec,
        *,
        method: str,
        quotes: int,
        timeout: float,
        connected: Callable[[], bool],
        reference_paths: int = 0,
    ) -> asyncio.Future[FitReport]:
        """Queue a calibration: the engine fits ``spec`` in slices of about
        ``max_job_seconds`` (between which other jobs run), its reference corrections
        too (``reference_paths``: their Monte Carlo paths in all, paused between chunks).
        At most ``max_calibrations`` at once; the deadline stops it between iterations
        or chunks (504); a surface it cannot fit fails the future with
        :class:`~spectralmc_server.pricing.calibration.SurfaceError`."""
        s = self.settings
        self._check_open()
        running = [f for f in self._fits if not f.closed]
        if len(running) >= s.max_calibrations:
            self.metrics.dropped.labels("calibration_limit").inc()
            left = sum(self._fit_remaining(f) for f in running)
            raise Unavailable(
                f"overloaded: {len(running)} calibration(s) running, the limit is {s.max_calibrations}",
                _ceil_seconds(left),
                code="overloaded",
            )
        if len(self._items) >= s.max_pending_requests:
            self.metrics.dropped.labels("overloaded").inc()
            raise Unavailable(
                f"overloaded: {len(self._items)} requests queued; the bound is {s.max_pending_requests}",
                s.retry_after_seconds,
                code="overloaded",
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # the loop's clock is time.monotonic, the engine's too
        cls: ClassKey = (spec.process, method, "fit")
        future: asyncio.Future[FitReport] = loop.create_future()
        item = FitItem(
            next(self._ids),
            future,
            cls,
            quotes,
            (2 * spec.max_iterations + 1) * (1 + spec.corrections),
            deadline,
            connected,
            margin=(1.0 - s.admission_fraction) * timeout,
            corrections=spec.corrections,
            reference_paths=reference_paths,
        )
        self._admit(self._fit_remaining(item), timeout, f"this calibration ({quotes} quotes)")
        try:
            self.engine.fit_start(item.fit_id, replace(spec, deadline=deadline))
        except EngineDeadError as exc:
            raise _engine_down(str(exc)) from None
        self._items.append(item)
        self._fits.add(item)
        self._large.add(item)
        self._pump()
        self._wake.set()
        return future

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """The batcher loop: forever, until cancelled. Jobs also start as soon as one
        ends (:meth:`_pump` from the job's own task), so a busy event loop does not leave
        the worker idle between jobs."""
        while True:
            self._wake.clear()
            fill = self._pump()
            if fill is not None:
                await asyncio.sleep(fill)  # let the batch fill
                continue
            await self._wake.wait()

    def _pump(self) -> float | None:
        """Start jobs while a slot is free and work is ready; the seconds to wait for the
        next batch to fill, or None."""
        wait = self.settings.max_wait_seconds
        while len(self._jobs) < self._slots:
            busy = len(self._jobs) >= self.engine.parallel  # a job would queue behind another
            if busy and self._contracts < PIPELINE_CONTRACTS:
                return None  # too few contracts queued for a job worth queueing (_mostly_overhead)
            chosen = self._choose()
            if chosen is None:
                return None
            lead, slack = chosen
            if isinstance(lead, FitItem):
                self._start_slice(lead)
                continue
            waited = time.perf_counter() - lead.enqueued
            small = self._first_job_seconds(lead) < FILL_WORTH * wait  # batching it with others pays
            if small and lead.next == 0 and waited < wait and self._contracts < self.settings.max_batch_contracts:
                return wait - waited
            plan = self._plan(lead, slack)
            if busy and slack == math.inf and self._mostly_overhead(plan):
                # it starts when the running job ends (_finished), with what came meanwhile;
                # one that passes a request being split (finite slack) goes now, as before
                return None
            self._start_batch(plan)
        return None

    def _mostly_overhead(self, plan: list[_Slice]) -> bool:
        """Whether ``plan``'s job would be mostly its fixed cost (a few small requests):
        such a job is not queued behind a running one but waits for it to end, and takes
        what has come meanwhile. On a machine whose cores the HTTP loop and the engine
        share, small jobs sent back to back spend the engine's time on fixed costs
        (measured: ~2 ms a learned-model job, of 1 or of 64 contracts alike) and take it
        from the loop. Counted in contracts: the cost model's per-contract estimates
        absorb the fixed cost of small jobs, so they cannot tell."""
        return sum(sl.end - sl.start for sl in plan) < PIPELINE_CONTRACTS

    def _start_batch(self, plan: list[_Slice]) -> None:
        now = time.perf_counter()
        for sl in plan:
            item = sl.item
            if sl.start == 0:
                self.metrics.queue_wait_seconds.observe(now - item.enqueued)
            item.busy = True
            self._contracts -= sl.end - sl.start
            self._queued.subtract(sl.counts)
            item.next = sl.end
            if item.next >= item.contracts:  # all of it is on its way
                self._unqueue(item)
            else:  # being split (whatever it was estimated at submit)
                self._large.add(item)
        self._queued = +self._queued
        estimate = self.cost.overhead(sl.item.tier for sl in plan) + sum(
            self.cost.seconds(sl.counts) * sl.item.slowdown for sl in plan
        )
        job = _Job(estimate)
        self._jobs.add(job)
        self._plans[id(job)] = plan
        failed: dict[int, RequestRefusedError] = {}
        submitted = None  # to the engine at once, unless market data must be resolved first
        if not any(sl.item.needs_market and sl.item.resolved is None for sl in plan):
            submitted = self._submit(plan)
        self._track(job, self._compute(plan, job, submitted, failed))

    def _start_slice(self, fit: FitItem) -> None:
        fit.busy = True
        fit.slices += 1
        job = _Job(self._first_job_seconds(fit))
        self._jobs.add(job)
        self._track(job, self._run_slice(fit, job))

    def _track(self, job: _Job, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._inflight.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._inflight.discard(t)
            self._jobs.discard(job)
            self._wake.set()

        task.add_done_callback(done)

    def _finished(self, job: _Job) -> None:
        """``job`` is off the worker: start the next at once. How long the event loop
        took to hear of it, against how long jobs take, sets how many jobs are kept on
        the worker: a loop busy with a burst of requests must not leave it idle."""
        if job.started is not None and job.ended is not None:
            lag = max(time.perf_counter() - job.ended, 0.0)
            self._lag += 0.3 * (lag - self._lag)
            self._job_time += 0.3 * (job.ended - job.started - self._job_time)
            extra = math.ceil(self._lag / max(self._job_time, 1e-3))
            self._slots = min(SLOTS + extra, MAX_SLOTS)
        self._jobs.discard(job)
        self._plans.pop(id(job), None)
        if not self._stopped:
            self._pump()
        self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, then wait until everything queued has been answered."""
        self.closed = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (self._items or self._inflight) and loop.time() < end:
            await asyncio.sleep(0.01)
        return not (self._items or self._inflight)

    async def stop(self) -> None:
        self._stopped = True
        for task in list(self._inflight):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for item in list(self._items) + list(self._fits):
            if not item.future.done():
                item.future.set_exception(Unavailable("the server stopped before this request was priced", 1))
            self._close(item)
        self._items.clear()
        self._contracts = 0
        self._queued.clear()
        self._keys.clear()
        self._large.clear()
