"""The batcher's jobs on the engine: submitting a plan, settling its answers, calibration
slices, market-data resolution."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from spectralmc_server.engine_service.messages import (
    EngineDeadError,
    FitFailed,
    FitReport,
    Head,
    PriceJob,
    PriceResult,
    Skipped,
    SliceDone,
    WireEntry,
)
from spectralmc_server.pricing.book import book_of, book_of_requests, sliced
from spectralmc_server.pricing.calibration import SurfaceError
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service.batcher.choosing import Choosing
from spectralmc_server.service.batcher.costs import ClassKey, correction_key
from spectralmc_server.service.batcher.items import (
    FitItem,
    Pending,
    _engine_down,
    _Job,
    _Slice,
    merge_answers,
)
from spectralmc_server.service.batcher.state import SHARED_BOOK_MAX
from spectralmc_server.service.errors import (
    APIError,
    DeadlineExceeded,
    EngineFailure,
    Invalid,
    NoMarketData,
    store_unavailable,
)

log = logging.getLogger(__name__)


class Computing(Choosing):
    # -- computing ----------------------------------------------------------------------

    def _submit(self, plan: list[_Slice]) -> tuple[asyncio.Future[PriceResult], list[_Slice]]:
        """Send the job to the engine (a failed future when the engine is down), and the
        slices sent: those whose client has gone by now are left out (and the engine
        skips those forgotten before the job begins)."""
        entries: list[WireEntry] = []
        sent: list[_Slice] = []
        requests: list[PriceRequest] = []
        for sl in plan:
            item = sl.item
            if item.closed or item.future.done() or not item.connected():
                continue
            r = item.request
            requests.append(sliced(r, sl.start, sl.end) if sl.start or sl.end < item.contracts else r)
            entries.append(
                WireEntry(
                    req=item.req,
                    head=Head(
                        r.namespace,
                        r.val_datetime,
                        r.data_asof,
                        tuple(r.measures),
                        None if r.quantile_levels is None else tuple(r.quantile_levels),
                    ),
                    book=None,
                    offset=sl.start,
                    columnar=item.columnar,
                    market=item.resolved if item.needs_market else None,
                )
            )
            item.dispatched = True
            sent.append(sl)
        # Small requests share one book (one set of columns to pickle and send, built in
        # one pass over their contracts); a large one keeps its own (no copy into a join).
        small = [k for k, r in enumerate(requests) if len(r.contracts) < SHARED_BOOK_MAX]
        if len(small) < 2:
            small = []
        shared = {k: (0, 0) for k in small}
        at = 0
        for k in small:
            n = len(requests[k].contracts)
            shared[k] = (at, at + n)
            at += n
        job_book = book_of_requests([requests[k] for k in small]) if small else None
        entries = [
            replace(e, rows=shared[k]) if k in shared else replace(e, book=book_of(requests[k]))
            for k, e in enumerate(entries)
        ]
        if not entries:  # nothing left to compute
            empty: asyncio.Future[PriceResult] = asyncio.get_running_loop().create_future()
            now = time.perf_counter()
            empty.set_result(PriceResult((), {}, now, now, 0.0))
            return empty, sent
        try:
            return self.engine.price(PriceJob(tuple(entries), job_book)), sent
        except EngineDeadError as exc:
            dead: asyncio.Future[PriceResult]
            dead = asyncio.get_running_loop().create_future()
            dead.set_exception(exc)
            return dead, sent

    async def _compute(
        self,
        plan: list[_Slice],
        job: _Job,
        submitted: tuple[asyncio.Future[PriceResult], list[_Slice]] | None,
        failed: dict[int, RequestRefusedError],
    ) -> None:
        try:
            await self._settle(plan, job, submitted, failed)
        finally:
            self._finished(job)

    async def _settle(
        self,
        plan: list[_Slice],
        job: _Job,
        submitted: tuple[asyncio.Future[PriceResult], list[_Slice]] | None,
        failed: dict[int, RequestRefusedError],
    ) -> None:
        if submitted is None:
            await self._resolve([sl.item for sl in plan])
            submitted = self._submit(plan)
        pending, sent = submitted
        try:
            result = await pending
        except EngineDeadError as exc:
            self._fail_all(plan, _engine_down(str(exc)))
            return
        except Exception as exc:  # valid requests that the engine could not price: a bug
            # (the engine has marked itself failed: health fails, an orchestrator restarts it)
            log.error("batch of %d requests failed: %s: %s", len(plan), type(exc).__name__, exc)
            self._fail_all(plan, EngineFailure("the pricing engine failed: JobFailedError"))
            return
        finally:
            for sl in plan:
                sl.item.busy = False
        job.started, job.ended = result.started, result.ended
        computed, answers = self._outcomes(sent, result, failed)
        self._settle_failed(plan, computed, failed)
        if not computed:
            return
        self._learn(computed, answers, result.ended - result.started, result.cpu)
        for sl, answer in zip(computed, answers, strict=True):
            item = sl.item
            if item.closed or item.future.done():
                self._close(item)
                continue
            item.parts.append(answer)
            if sl.end >= item.contracts:
                item.future.set_result(merge_answers(item.parts, item.models))
                item.parts = []
                self._close(item)

    def _fail_all(self, plan: list[_Slice], error: Exception) -> None:
        for sl in plan:
            if not sl.item.future.done():
                sl.item.future.set_exception(error)
            self._close(sl.item)

    @staticmethod
    def _outcomes(
        sent: list[_Slice], result: PriceResult, failed: dict[int, RequestRefusedError]
    ) -> tuple[list[_Slice], list[dict[str, Any]]]:
        """The slices computed and their answers; refusals into ``failed``; each request's
        lease (the versions its first computed slice used) kept for its later slices."""
        computed: list[_Slice] = []
        answers: list[dict[str, Any]] = []
        for sl, outcome in zip(sent, result.outcomes, strict=True):
            if isinstance(outcome, Skipped):
                continue
            lease = result.models.get(sl.item.req)
            if lease is not None and sl.item.models is None:
                sl.item.models = lease
            if isinstance(outcome, RequestRefusedError):
                failed[id(sl.item)] = outcome
            else:
                computed.append(sl)
                answers.append(outcome)
        return computed, answers

    def _settle_failed(
        self, plan: list[_Slice], computed: list[_Slice], failed: dict[int, RequestRefusedError]
    ) -> None:
        """Refused requests answered (422: invalid, or no market data); slices skipped by
        the engine (their client went, or their deadline passed) counted and closed."""
        for sl in plan:
            err = failed.get(id(sl.item))
            if err is not None:
                if not sl.item.future.done():
                    kind = NoMarketData if err.market else Invalid
                    sl.item.future.set_exception(kind(err.message, details=err.details))
                self._close(sl.item)
        done = {id(sl) for sl in computed}
        for sl in plan:
            if id(sl) not in done and id(sl.item) not in failed:
                self._alive(sl.item, asyncio.get_running_loop().time())  # counts and settles it
                if not sl.item.closed and sl.item.future.done():
                    self._close(sl.item)

    def _learn(self, computed: list[_Slice], answers: list[dict[str, Any]], seconds: float, cpu: float) -> None:
        """Metrics of a computed job, and its time into the cost model (by the classes
        the contracts were given at submit, which is what estimates are made from: the
        rare contract the engine sends elsewhere is part of its class's cost)."""
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.batch_requests.observe(len(computed))
        self.metrics.batch_contracts.observe(sum(sl.end - sl.start for sl in computed))
        priced: Counter[tuple[str, str]] = Counter()
        classes: Counter[ClassKey] = Counter()
        for sl, answer in zip(computed, answers, strict=True):
            if "columns" in answer:
                priced.update(zip(answer["columns"]["model"], answer["columns"]["method"], strict=True))
            else:
                priced.update((row["model"], row["method"]) for row in answer["results"])
            classes.update(sl.counts)
        for (model, method), count in priced.items():
            self.metrics.contracts_priced.labels(model, method).inc(count)
        self.cost.observe(classes, seconds, cpu)
        if len(computed) == 1 and seconds > 0:  # alone in its job: how far its classification was off
            sl = computed[0]
            predicted = self.cost.overhead([sl.item.tier]) + self.cost.seconds(sl.counts)
            sl.item.slowdown = min(max(seconds / predicted, 1.0), 1e4) if predicted > 0 else 1.0

    async def _run_slice(self, fit: FitItem, job: _Job) -> None:
        try:
            await self._fit_slice(fit, job)
        finally:
            self._finished(job)

    async def _fit_slice(self, fit: FitItem, job: _Job) -> None:
        try:
            done: SliceDone = await self.engine.fit_slice(fit.fit_id, self.settings.max_job_seconds)
        except EngineDeadError as exc:
            fit.finished = True
            if not fit.future.done():
                fit.future.set_exception(_engine_down(str(exc)))
            self._close(fit)
            return
        finally:
            fit.busy = False
        job.started, job.ended = done.started, done.ended
        fit.iterations = done.iterations
        fit.evaluations += done.evaluations
        fit.reference_done += done.reference_paths
        # the slice's time: its evaluations', and its corrections' Monte Carlo (a class of its own)
        ref = min(done.reference_seconds, done.ended - done.started)
        ref_cpu = min(done.reference_cpu, done.cpu)
        if done.evaluations > 0:
            wall, cpu = done.ended - done.started - ref, done.cpu - ref_cpu
            self.cost.observe_slice(fit.cls, done.evaluations, fit.quotes, wall, cpu)
        if done.reference_paths > 0:
            self.cost.observe_slice(correction_key(fit.cls), done.reference_paths, 1, ref, ref_cpu)
        if not done.finished:
            if fit.future.done() and not fit.closed:  # given up on while computing
                self._close(fit)
            return
        fit.finished = True
        outcome = done.outcome
        if isinstance(outcome, FitReport):
            self.cost.observe_fit(fit.evaluations / (1 + fit.corrections))
            if not fit.future.done():
                fit.future.set_result(outcome)
        elif isinstance(outcome, FitFailed) and outcome.kind == "deadline":
            if not fit.future.done():
                fit.future.set_exception(
                    DeadlineExceeded(
                        f"the calibration was stopped after {outcome.iterations} iterations: its deadline passed "
                        "(send a longer X-Request-Timeout, a lower max_iterations or a smaller surface"
                        + (", fewer corrections or correction_paths)" if fit.corrections else ")"),
                        headers=self._retry_after(),
                    )
                )
            self.metrics.dropped.labels("deadline").inc()
        elif not fit.future.done():  # the fit's own errors (a surface it cannot fit) go to the caller
            message = "no outcome" if outcome is None else outcome.message
            error: Exception = (
                SurfaceError(message)
                if outcome is not None and outcome.kind == "surface"
                else (EngineFailure(f"the calibration failed: {message}"))
            )
            fit.future.set_exception(error)
        self._close(fit)

    async def _resolve(self, items: list[Pending]) -> None:
        """The market-data snapshot of every request in the job that prices by reference
        and has none yet: one resolution for all (they share a key), kept by each request
        for its later chunks. A failure answers just those requests."""
        needing = [i for i in items if i.needs_market and i.resolved is None and not i.closed]
        if not needing:
            return
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
            resolved = await self.market.resolve(first.namespace, first.val_datetime, first.data_asof)
        except APIError as exc:
            for item in needing:
                if not item.future.done():
                    item.future.set_exception(type(exc)(exc.message, details=exc.details))
                self._close(item)
            return
        except Exception as exc:  # the store failed: a 503 for these requests, not a dead engine
            log.warning("snapshot resolution failed: %s: %s", type(exc).__name__, exc)
            for item in needing:
                if not item.future.done():
                    item.future.set_exception(store_unavailable(exc))
                self._close(item)
            return
        for item in needing:
            item.resolved = resolved
