"""The batcher's choice of the next job: what is alive, what leads, how a request is sliced and what joins it."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from typing import Any

from spectralmc_server.service.batcher.costs import EFFICIENCY, MIN_CHUNK, PROBE_CONTRACTS, RAMP, RAMPED, ClassKey
from spectralmc_server.service.batcher.estimates import Estimates
from spectralmc_server.service.batcher.items import FitItem, Item, Pending, _ceil_seconds, _Slice
from spectralmc_server.service.errors import (
    DeadlineExceeded,
)


class Choosing(Estimates):
    # -- choosing the next job ----------------------------------------------------------

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(_ceil_seconds(self.estimated_wait()))}

    def retry_after(self) -> dict[str, str]:
        """The Retry-After header of a 504 or 503 answered outside the queue (a handler's
        own deadline): when the work now ahead should have drained."""
        return self._retry_after()

    def _unqueue(self, item: Item) -> None:
        """``item`` leaves the queue: nothing of it is left to send to the worker."""
        if not item.queued:
            return
        item.queued = False
        self._large.discard(item)
        with contextlib.suppress(ValueError):
            self._items.remove(item)
        if isinstance(item, Pending):
            if item.next < item.contracts:
                self._contracts -= item.contracts - item.next
                self._queued.subtract(item.remaining())
                self._queued = +self._queued
                item.next = item.contracts
            self._keys[item.key] -= 1
            if self._keys[item.key] <= 0:
                del self._keys[item.key]

    def _given_up(self, item: Pending, future: asyncio.Future[dict[str, Any]]) -> None:
        """Its handler gave up (the client went, or its deadline passed): a chunk already
        sent to the engine but not begun is skipped there."""
        if future.cancelled() and item.dispatched and not item.closed:
            self.engine.forget([item.req])

    def _close(self, item: Item) -> None:
        """``item`` is done with: answered, failed or dropped."""
        if item.closed:
            return
        item.closed = True
        self._unqueue(item)
        if isinstance(item, FitItem):
            self._fits.discard(item)
            if not item.finished:  # its thread in the engine unwinds
                item.finished = True
                self.engine.fit_cancel(item.fit_id)
        elif item.dispatched:  # its lease (and any chunk not begun) goes
            self.engine.forget([item.req])

    def _alive(self, item: Item, now: float) -> bool:
        """False (and the item settled and counted) when its client has gone, it has
        been given up on, or its deadline has passed."""
        if item.closed:
            return False
        if not item.connected():  # first: a handler cancelled on disconnect also cancels its future
            item.future.cancel()
            self.metrics.dropped.labels("disconnected").inc()
        elif item.future.done():  # the handler gave up (deadline) and cancelled it
            self.metrics.dropped.labels("deadline").inc()
        elif now >= item.deadline:
            what = "calibration" if isinstance(item, FitItem) else "request"
            done = (
                f" after {item.iterations} iterations"
                if isinstance(item, FitItem)
                else (f" after {item.next} of {item.contracts} contracts" if item.next else " while it was queued")
            )
            item.future.set_exception(
                DeadlineExceeded(f"the {what}'s deadline passed{done}", headers=self._retry_after())
            )
            self.metrics.dropped.labels("deadline").inc()
        else:
            return True
        self._close(item)
        return False

    def _choose(self) -> tuple[Item, float] | None:
        """The next job's lead item and the slack it may use (inf: no one to protect):
        the oldest item, unless it is being split (or computing) and its slack, and that
        of everything passed, covers a later item's job. A calibration that has had a
        slice counts as being split between its slices: its next slice goes after the
        later items its slack covers, else a fit's slices, each started as the last one
        ends, would hold the worker until it is done. One with no slack left (its
        remaining work would end past its deadline less its margin) is not passed: it
        runs, and its deadline decides."""
        loop_now = asyncio.get_running_loop().time()
        cum = self._inflight_seconds()
        slack = math.inf
        passed = False
        deferred: tuple[Item, float] | None = None  # a started calibration's next slice
        for item in list(self._items):
            if not self._alive(item, loop_now):
                continue
            fit = item if isinstance(item, FitItem) else None
            rest = 0.0 if fit is None else self._fit_remaining(fit)  # a request's: once passed
            if not item.busy:
                first = self._first_job_seconds(item)
                ahead = item.deadline - loop_now - item.margin - (cum + rest)
                if fit is not None and fit.slices and deferred is None and ahead >= 0:
                    deferred = (fit, slack)
                elif not passed or first <= slack:
                    return item, slack
            cum += rest if isinstance(item, FitItem) else self._item_seconds(item)
            own = item.deadline - loop_now - item.margin - cum
            if own >= 0:  # one that will be late anyway is not protected (no cascade)
                slack = min(slack, own)
            passed = True
        return deferred

    def _ramp_cap(self, key: ClassKey) -> int | None:
        """The most contracts of ``key`` one job may hold while its cost is still being
        measured (a slow start: PROBE_CONTRACTS, then RAMP times more per job), or None."""
        samples = self.cost.samples(key)
        return PROBE_CONTRACTS.get(key[1], 1) * RAMP**samples if samples < RAMPED else None

    def _slice(self, item: Pending, max_contracts: int, max_seconds: float) -> _Slice:
        """The item's next chunk within the limits (at least one contract)."""
        start = item.next
        end = start
        seconds = 0.0
        counts: Counter[ClassKey] = Counter()
        begin = 0
        for stop, key in item.runs:
            lo = max(begin, end)
            begin = stop
            if stop <= lo:
                continue
            method = key[1]
            # sized at the worker's usual speed: when it runs slow for everyone (a busy
            # event loop holding the GIL) smaller jobs would only add fixed costs
            unit = self.cost.seconds({key: 1}, usual=True) * item.slowdown
            room = max_seconds - seconds
            take = min(stop - lo, max_contracts - (end - start), int(room / unit) if unit > 0 else stop - lo)
            if end == start:  # enough that the job's fixed cost stays a small part of it
                floor = max(MIN_CHUNK.get(method, 1), math.ceil(EFFICIENCY * self.cost.overhead([key[2]]) / unit))
                take = max(take, min(stop - lo, floor, max_contracts))
            cap = self._ramp_cap(key)
            if cap is not None:
                take = min(take, cap - counts[key])
            if take <= 0:
                break
            seconds += take * unit
            counts[key] += take
            end = lo + take
            if end < stop:
                break
        return _Slice(item, start, end, counts)

    def _plan(self, lead: Pending, slack: float) -> list[_Slice]:
        """The lead's next chunk, and whole queued requests of its key after it, within
        the job's limits (and the slack of any request it passes, and the slow start of
        classes still being measured)."""
        s = self.settings
        budget = min(s.max_job_seconds, slack) - self.cost.overhead([lead.tier])
        first = self._slice(lead, s.max_batch_contracts, max(budget, 0.0))
        plan = [first]
        contracts = first.end - first.start
        seconds = self.cost.seconds(first.counts, usual=True) * lead.slowdown  # jobs sized at the usual speed
        if contracts >= s.max_batch_contracts or seconds >= budget:
            return plan
        classes = Counter(first.counts)
        loop_now = asyncio.get_running_loop().time()
        seen_lead = False
        for item in list(self._items):
            if item is lead:
                seen_lead = True
                continue
            if not seen_lead or not isinstance(item, Pending) or item.busy or item.key != lead.key or item.next:
                continue
            wanted = item.remaining()
            cost = self.cost.seconds(wanted, usual=True) * item.slowdown
            if contracts + item.contracts > s.max_batch_contracts or seconds + cost > budget:
                continue
            caps = {k: self._ramp_cap(k) for k in wanted}
            if any(cap is not None and classes[k] + wanted[k] > cap for k, cap in caps.items()):
                continue
            if not self._alive(item, loop_now):
                continue
            plan.append(_Slice(item, 0, item.contracts, wanted))
            classes.update(wanted)
            contracts += item.contracts
            seconds += cost
        return plan
