"""Store garbage collection under a lease: on a schedule, and for the admin route.

Every real GC of a model (not a dry run) holds that model's lease in the store
(``models/NAME/leases/gc.json``, store/lease.py): the schedule here, ``POST
/v1/admin/models/{name}/gc`` and ``spectralmc store gc --yes`` alike, so two never run
at once on one model, whichever replica or machine starts them.

The schedule (``[store_gc]``, ``interval_seconds`` > 0) runs rounds at the Unix times
that are multiples of the interval, so every replica tries at the same moment. In a
round, for each served model in turn: a replica that finds the lease held skips
(``skipped_lease_held``); one that finds the round already done by another replica
skips (``skipped_not_due``: the lease's ``last_round``, written by the replica that
completed it, is this round); the one that takes the lease runs GC (``keep``,
``protect``, and the version this replica serves, which is never collected under it)
and releases it naming the round. A round whose GC fails (``failed``) is tried again
by a replica that comes later in the same round, and by the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from spectralmc_server.service import keys
from spectralmc_server.settings import StoreGCSettings
from spectralmc_server.store.audit import GCReport
from spectralmc_server.store.lease import LeaseHeldError, holder_name
from spectralmc_server.store.versions import VersionStore

log = logging.getLogger(__name__)

SCHEDULE_OUTCOMES = ("done", "skipped_lease_held", "skipped_not_due", "failed")
ADMIN_OUTCOMES = ("done", "skipped_lease_held", "failed")
RECENT = 256  # round records kept per process (tests and logs read them)


class GCMetrics:
    """The GC families, on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter(
            "spectralmc_store_gc_runs",
            "Store GC runs of a model by trigger (schedule, admin) and outcome: done, skipped_lease_held "
            "(another holder had the model's GC lease), skipped_not_due (another replica ran this round), failed",
            ["model", "trigger", "outcome"],
            registry=registry,
        )
        self.collected = Counter(
            "spectralmc_store_gc_collected_versions",
            "Versions whose content this process's GC runs collected",
            ["model"],
            registry=registry,
        )
        self.deleted = Counter(
            "spectralmc_store_gc_deleted_objects",
            "Objects (content blobs, certificate links) this process's GC runs deleted",
            ["model"],
            registry=registry,
        )
        self.freed = Counter(
            "spectralmc_store_gc_freed_bytes", "Bytes this process's GC runs deleted", ["model"], registry=registry
        )
        self.last_run = Gauge(
            "spectralmc_store_gc_last_run_timestamp_seconds",
            "Unix time this process last completed a GC of the model (absent: never; the replicas' max is the store's)",
            ["model"],
            registry=registry,
        )

    def prepare(self, models: Iterable[str], scheduled: bool) -> None:
        """Every series at zero from the start (rate() and increase() need one)."""
        for model in models:
            for outcome in ADMIN_OUTCOMES:
                self.runs.labels(model, "admin", outcome)
            for outcome in SCHEDULE_OUTCOMES if scheduled else ():
                self.runs.labels(model, "schedule", outcome)
            for family in (self.collected, self.deleted, self.freed):
                family.labels(model)

    def done(self, report: GCReport, trigger: str) -> None:
        m = report.model
        self.runs.labels(m, trigger, "done").inc()
        self.collected.labels(m).inc(len(report.collected_versions))
        self.deleted.labels(m).inc(len(report.deleted_objects))
        self.freed.labels(m).inc(report.bytes_freed)
        self.last_run.labels(m).set(time.time())


@dataclass
class RoundRecord:
    """One model's part of one scheduled round, as this replica saw it."""

    tick: float  # the round: the Unix time it was due
    model: str
    outcome: str = ""
    started: float = 0.0  # Unix times
    finished: float = 0.0
    message: str = ""


class StoreGC:
    """The GC of the served models' stores, under their leases (the module docstring)."""

    def __init__(
        self,
        settings: StoreGCSettings,
        stores: dict[str, VersionStore],
        metrics: GCMetrics,
        serving: Callable[[str], Iterable[int]] = lambda name: (),
        holder: str | None = None,
    ) -> None:
        self.settings = settings
        self.stores = stores
        self.metrics = metrics
        self.serving = serving  # the versions this replica serves of a model: never collected here
        # unique, also for two apps in one process: "gc schedule on api-1 pid 7 #3fa2c1"
        self.holder = holder or f"{holder_name('gc schedule')} #{secrets.token_hex(3)}"
        self.records: deque[RoundRecord] = deque(maxlen=RECENT)
        metrics.prepare(stores, settings.interval_seconds > 0)

    # -- one GC under the lease -----------------------------------------------------------

    async def collect(
        self,
        name: str,
        trigger: str,
        *,
        keep: int,
        protect: Iterable[int] = (),
        min_keep: int = 1,
        grace_seconds: float = 3600.0,
        holder: str | None = None,
    ) -> GCReport:
        """A real GC of model ``name`` holding its lease; LeaseHeldError (counted as
        skipped_lease_held) when another holder has it. Counted by ``trigger``."""
        vs = self.stores[name]
        lease = vs.gc_lease(holder or self.holder, self.settings.lease_ttl_seconds)
        try:
            async with lease.hold():
                report = await vs.gc(
                    keep, protect=protect, min_keep=min_keep, dry_run=False, grace_seconds=grace_seconds
                )
        except LeaseHeldError:
            self.metrics.runs.labels(name, trigger, "skipped_lease_held").inc()
            raise
        except BaseException:
            self.metrics.runs.labels(name, trigger, "failed").inc()
            raise
        self.metrics.done(report, trigger)
        return report

    # -- the schedule ---------------------------------------------------------------------

    def next_tick(self, now: float, after: float | None) -> float:
        """The next round: the first multiple of the interval after ``now`` (and after the
        round ``after``, so a loop that wakes a little early runs no round twice)."""
        period = self.settings.interval_seconds
        tick = (math.floor(now / period) + 1) * period
        return tick if after is None else max(tick, after + period)

    async def run(self) -> None:
        """Rounds until cancelled (shutdown)."""
        last: float | None = None
        while True:
            now = time.time()
            tick = self.next_tick(now, last)
            await asyncio.sleep(tick - now)
            await self.run_round(tick)
            last = tick

    async def run_round(self, tick: float) -> list[RoundRecord]:
        """Round ``tick`` for every served model, one after another."""
        out = []
        for name in self.stores:
            record = RoundRecord(tick, name, started=time.time())
            try:
                record.outcome, record.message = await self._scheduled(name, tick)
            finally:
                record.finished = time.time()
                self.records.append(record)
            out.append(record)
        return out

    async def _scheduled(self, name: str, tick: float) -> tuple[str, str]:
        vs = self.stores[name]
        s = self.settings
        lease = vs.gc_lease(self.holder, s.lease_ttl_seconds)
        protect = sorted({*s.protect.get(name, ()), *self.serving(name)})
        try:
            current = await lease.read()  # a round already done needs no write
            if current is not None and self._done(current.last_round, tick):
                self.metrics.runs.labels(name, "schedule", "skipped_not_due").inc()
                return "skipped_not_due", f"round done by {current.holder}"
            async with lease.hold() as holding:
                state = holding.state
                if state is not None and self._done(state.last_round, tick):  # done between the read and now
                    self.metrics.runs.labels(name, "schedule", "skipped_not_due").inc()
                    return "skipped_not_due", "round done by another replica"
                report = await vs.gc(s.keep, protect=protect, dry_run=False, grace_seconds=s.grace_seconds)
                holding.last_round = tick
        except LeaseHeldError as exc:
            self.metrics.runs.labels(name, "schedule", "skipped_lease_held").inc()
            log.debug("store GC of %s: round skipped: %s", name, exc)
            return "skipped_lease_held", str(exc)
        except Exception as exc:
            self.metrics.runs.labels(name, "schedule", "failed").inc()
            message = f"{type(exc).__name__}: {exc}"
            log.warning("store GC of %s failed: %s", name, message)
            return "failed", message
        self.metrics.done(report, "schedule")
        if report.collected_versions or report.deleted_objects:
            log.info(
                "store GC of %s: collected the content of versions %s (%d objects, %d bytes); retained %s",
                name,
                report.collected_versions,
                len(report.deleted_objects),
                report.bytes_freed,
                report.retained,
            )
        return "done", f"collected {report.collected_versions}"

    def _done(self, last_round: float | None, tick: float) -> bool:
        """Round ``tick`` was completed (by anyone): the lease names it, or a later one.
        Half an interval of slack: replicas whose intervals differ still compare sanely."""
        return last_round is not None and last_round > tick - self.settings.interval_seconds / 2


STORE_GC = web.AppKey("store_gc", StoreGC)


def _serving(app: web.Application) -> Callable[[str], list[int]]:
    def versions(name: str) -> list[int]:
        return [
            m.served.version
            for m in app[keys.MODELS].current.models
            if m.name == name and m.served is not None and m.served.version is not None
        ]

    return versions


async def store_gc_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (after the engine: the served models are known): the GC service,
    its metrics, and the schedule's task when ``store_gc.interval_seconds`` > 0."""
    s = app[keys.SETTINGS].store_gc
    gc = StoreGC(s, app[keys.STORES], GCMetrics(app[keys.METRICS].registry), _serving(app))
    app[STORE_GC] = gc
    task = None
    if s.interval_seconds > 0:
        what = f"keep {s.keep}, lease {s.lease_ttl_seconds:g} s"
        log.info("store GC every %g s (%s) as %r", s.interval_seconds, what, gc.holder)
        task = asyncio.create_task(gc.run(), name="store-gc")
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
