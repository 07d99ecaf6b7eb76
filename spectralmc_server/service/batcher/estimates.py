"""The batcher's estimates: the wait ahead of new work, and admission by them."""

from __future__ import annotations

import asyncio
import math
import time

from spectralmc_server.service.batcher.costs import correction_key
from spectralmc_server.service.batcher.items import FitItem, Item, Pending, _ceil_seconds, _engine_down
from spectralmc_server.service.batcher.state import HICCUP_SECONDS, MAX_PRESSURE, BatcherState
from spectralmc_server.service.errors import (
    Unavailable,
)


class Estimates(BatcherState):
    # -- estimates ----------------------------------------------------------------------

    def _inflight_seconds(self) -> float:
        """What is left of the jobs on the worker; a job past its estimate (a burst that
        keeps the event loop, and so the GIL, busy slows the worker at once, before the
        learned costs can follow) is assumed to need as long again as it has overrun.
        The oldest job counts from when it was sent (the worker thread may be waiting
        for the GIL to take it up)."""
        now = time.perf_counter()
        oldest = min(self._jobs, key=lambda j: j.dispatched, default=None)
        total = 0.0
        for job in self._jobs:
            start = job.started if job.started is not None else (job.dispatched if job is oldest else None)
            if start is None:
                total += job.estimate
            else:
                elapsed = now - start
                total += max(job.estimate - elapsed, elapsed - job.estimate)
        return total

    def pressure(self) -> float:
        """How much slower than estimated the worker runs right now (1 to MAX_PRESSURE):
        the oldest job's expected time on the worker (or waiting for the worker thread to
        take it up), as long again as it has overrun, over its estimate, once it overruns
        by more than a GIL hiccup. A burst that
        keeps the event loop, and so the GIL, busy slows the worker at once; the learned
        costs follow only as jobs end."""
        oldest = min(self._jobs, key=lambda j: j.dispatched, default=None)
        if oldest is None or oldest.estimate <= 0:
            return 1.0
        elapsed = time.perf_counter() - (oldest.started if oldest.started is not None else oldest.dispatched)
        if elapsed < oldest.estimate + HICCUP_SECONDS:
            return 1.0
        return min((2 * elapsed - oldest.estimate) / oldest.estimate, MAX_PRESSURE)  # as long again to go

    def _fit_remaining(self, fit: FitItem) -> float:
        """A calibration's estimated compute to go: the fit and each correction's re-fit
        at the usual evaluations of a fit, and what is left of its corrections' Monte Carlo."""
        fits = 1 + fit.corrections
        expected = min(max(self.cost.fit_evaluations, 2.0) * fits, float(fit.max_evaluations))
        left = max(expected - fit.evaluations, 2.0)
        paths = max(fit.reference_paths - fit.reference_done, 0)
        reference = self.cost.fit_seconds(correction_key(fit.cls), paths, 1) if paths else 0.0
        return self.cost.fit_seconds(fit.cls, left, fit.quotes) + reference

    def _queued_seconds(self) -> float:
        s = self.settings
        work = self.cost.seconds(self._queued)
        per_job = max((self.cost.overhead([k[2]]) for k in self._queued), default=0.0)
        jobs = max(
            len(self._keys), math.ceil(self._contracts / s.max_batch_contracts), math.ceil(work / s.max_job_seconds)
        )
        fits = sum(self._fit_remaining(f) for f in self._fits if not f.closed)
        return work + jobs * per_job + fits

    def estimated_wait(self, own: float = 0.0) -> float:
        """Seconds before the own compute of a new request of ``own`` seconds would
        start: the work in flight and queued, and a training step the worker may be in.
        Of a request being split (or a calibration) whose slack allows it to be passed,
        only one job and as much again as the new request's own compute counts: the new
        request goes between its jobs."""
        queued = self._queued_seconds()
        inflight = self._inflight_seconds()
        if self._large:
            now = asyncio.get_running_loop().time()
            worst = inflight + queued
            for item in self._large:
                if item.deadline - now - item.margin - worst < own:  # its slack, at the worst, does not allow it
                    continue
                if isinstance(item, FitItem):
                    counted = self._fit_remaining(item)
                else:
                    rest = self._item_seconds(item)
                    counted = rest + math.ceil(rest / self.settings.max_job_seconds) * self.cost.overhead([item.tier])
                queued -= max(counted - own - self._first_job_seconds(item), 0.0)
        return inflight + max(queued, 0.0) * self.pressure() + self.engine.training_delay

    def _item_seconds(self, item: Pending) -> float:
        return self.cost.seconds(item.remaining()) * item.slowdown

    def _admit(self, own: float, timeout: float, what: str) -> None:
        """Refuse (503 overloaded, Retry-After) work that would not finish in time: its
        own estimated compute ``own`` after the estimated wait. With nothing queued or
        computing anything is admitted: there is nothing to wait for, its jobs are
        bounded (others interleave), its deadline stops it, and running it corrects the
        estimate where that was stale."""
        s = self.settings
        if not (self._jobs or self._items):
            return
        own *= self.pressure()
        ahead = self.estimated_wait(own)
        budget = timeout * s.admission_fraction
        if ahead + own <= budget:
            return
        if own > budget:  # too much even alone: admitted once the queue is idle
            self.metrics.dropped.labels("too_costly").inc()
            raise Unavailable(
                f"overloaded: {what} needs an estimated {own:.3g} s of compute, more than {s.admission_fraction:g} "
                f"of its {timeout:g} s deadline, and {ahead:.3g} s of work is ahead of it; send a longer "
                "X-Request-Timeout or smaller requests",
                _ceil_seconds(ahead),
                code="overloaded",
            )
        self.metrics.dropped.labels("estimated_wait").inc()
        raise Unavailable(
            f"overloaded: an estimated {ahead:.3g} s of work is ahead; with its own {own:.3g} s {what} would not "
            f"finish within {s.admission_fraction:g} of its {timeout:g} s deadline",
            _ceil_seconds(min(ahead, ahead + own - budget)),
            code="overloaded",
        )

    def _check_open(self) -> None:
        if self.closed:
            self.metrics.dropped.labels("shutting_down").inc()
            raise Unavailable("the server is shutting down", self.settings.retry_after_seconds, code="shutting_down")
        if not self.engine.alive:
            self.metrics.dropped.labels("engine_unavailable").inc()
            raise _engine_down(self.engine.status.failure or "not running")

    def _first_job_seconds(self, item: Item) -> float:
        if isinstance(item, FitItem):
            return min(
                self._fit_remaining(item),
                max(self.settings.max_job_seconds, self.cost.fit_seconds(item.cls, 2, item.quotes)),
            )
        overhead = self.cost.overhead([item.tier])
        return min(self._item_seconds(item), self.settings.max_job_seconds) + overhead
