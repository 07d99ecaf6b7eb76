"""Declarative real-time jobs (``[[jobs]]`` in the config; example: config/jobs.toml).

- ``price``: every N seconds, price a named portfolio at the namespace's latest
  snapshot and publish the answer to a stream topic (``{"op": "subscribe", "topic": T}``).
- ``derive``: every N seconds, build a new snapshot from the namespace's latest one
  (``implied_vol_surface``: invert each option quote to a Black vol and grid them into a
  surface; marketdata/surfaces.py) and store it under the same val_datetime with a later
  data_asof and its lineage (the job, and the key and hash of its input).

Scheduling: ticks sit on a fixed grid ``start + k * every_seconds`` (no drift). A tick
that finds the previous run still going is skipped (``overlap``); ticks the loop was too
late for are skipped (``late``), not run in a burst. Every run is counted and timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from spectralmc_server.marketdata.objects import MarketSnapshot, VolSurface
from spectralmc_server.marketdata.store import SnapshotRecord, canonical, iso
from spectralmc_server.marketdata.surfaces import implied_vol_surface
from spectralmc_server.pricing.schemas import Contract, PriceRequest
from spectralmc_server.service.errors import APIError, NoMarketData
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import DeriveJob, PriceJob

log = logging.getLogger(__name__)
RECENT = 32  # runs kept per job for /v1/jobs


class UnchangedError(Exception):
    """The run found nothing new to do."""


@dataclass
class RunRecord:
    scheduled: float  # Unix time of the tick
    started: float
    finished: float | None = None
    outcome: str | None = None  # success | unchanged | error
    message: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "scheduled": self.scheduled,
            "started": self.started,
            "finished": self.finished,
            "outcome": self.outcome,
            "message": self.message,
        }


@dataclass
class Schedule:
    """Runs ``action`` on a drift-free grid, never two at once."""

    name: str
    every_seconds: float
    action: Callable[[], Awaitable[str | None]]  # returns a note for the run record
    metrics: Metrics
    runs: deque[RunRecord] = field(default_factory=lambda: deque(maxlen=RECENT))
    counts: dict[str, int] = field(default_factory=lambda: {"success": 0, "unchanged": 0, "error": 0})
    skipped: dict[str, int] = field(default_factory=lambda: {"overlap": 0, "late": 0})
    last_success: float | None = None
    _running: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start_loop, start_wall = loop.time(), time.time()
        period = self.every_seconds
        k = 1
        try:
            while True:
                await asyncio.sleep(max(0.0, start_loop + k * period - loop.time()))
                now = loop.time()
                lag = now - (start_loop + k * period)
                if self._running is not None and not self._running.done():
                    self.skipped["overlap"] += 1
                    self.metrics.job_skipped.labels(self.name, "overlap").inc()
                else:
                    self.metrics.job_lag_seconds.labels(self.name).observe(lag)
                    record = RunRecord(scheduled=start_wall + k * period, started=time.time())
                    self.runs.append(record)
                    self._running = asyncio.create_task(self._one(record), name=f"job:{self.name}")
                behind = math.floor((now - start_loop) / period)  # the last tick already due
                if behind > k:
                    self.skipped["late"] += behind - k
                    self.metrics.job_skipped.labels(self.name, "late").inc(behind - k)
                k = max(k, behind) + 1
        finally:
            if self._running is not None:
                self._running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._running

    async def _one(self, record: RunRecord) -> None:
        t0 = time.perf_counter()
        try:
            record.message = await self.action()
            record.outcome = "success"
            self.last_success = time.time()
        except UnchangedError as exc:
            record.outcome, record.message = "unchanged", str(exc)
        except asyncio.CancelledError:
            record.outcome, record.message = "error", "cancelled at shutdown"
            raise
        except Exception as exc:
            record.outcome = "error"
            record.message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
            log.warning("job %s failed: %s", self.name, record.message)
        finally:
            record.finished = time.time()
            self.counts[record.outcome or "error"] += 1
            self.metrics.job_runs.labels(self.name, record.outcome or "error").inc()
            self.metrics.job_seconds.labels(self.name).observe(time.perf_counter() - t0)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "every_seconds": self.every_seconds,
            "runs": dict(self.counts),
            "skipped": dict(self.skipped),
            "last_success": self.last_success,
            "running": self._running is not None and not self._running.done(),
            "recent": [r.describe() for r in self.runs],
        }


def price_action(
    job: PriceJob,
    contracts: list[Contract],
    market: MarketData,
    price: Callable[[PriceRequest], Awaitable[dict[str, Any]]],
    publish: Callable[[str, dict[str, Any]], int],
) -> Callable[[], Awaitable[str | None]]:
    topic = job.topic or job.name
    by_reference = any(not c.is_explicit for c in contracts)

    async def action() -> str | None:
        vdt = asof = None
        if by_reference:
            latest = await market.store.latest(job.namespace)
            if latest is None:
                raise NoMarketData(f"no snapshot in namespace {job.namespace!r} yet")
            vdt, asof = latest.val_datetime, latest.data_asof
        request = PriceRequest(
            namespace=job.namespace, val_datetime=vdt, data_asof=asof, measures=job.measures, contracts=contracts
        )
        answer = await price(request)
        sent = publish(topic, {"job": job.name, "priced_at": iso(datetime.now(UTC)), **answer})
        return f"published to topic {topic!r} ({sent} subscriptions)"

    return action


async def derive_input(job: DeriveJob, market: MarketData) -> tuple[SnapshotRecord, MarketSnapshot]:
    """The namespace's latest snapshot, which a derive job builds on; ``NoMarketData``
    when there is none, ``UnchangedError`` when it is the job's own output."""
    latest = await market.store.latest(job.namespace)
    if latest is None:
        raise NoMarketData(f"no snapshot in namespace {job.namespace!r} yet")
    if (latest.lineage or {}).get("job") == job.name:
        raise UnchangedError(f"the latest snapshot ({iso(latest.data_asof)}) is this job's own output")
    return latest, await market.load(latest)


def derive_action(job: DeriveJob, market: MarketData) -> Callable[[], Awaitable[str | None]]:
    async def action() -> str | None:
        latest, snapshot = await derive_input(job, market)
        missing = [u for u in job.underlyings if not snapshot.option_quotes.get(u)]
        if missing:
            raise ValueError(f"no option quotes for {', '.join(missing)} in {_where(latest)}")

        def build() -> dict[str, VolSurface]:
            return {
                u: implied_vol_surface(snapshot, u, snapshot.option_quotes[u], job.strike_kind) for u in job.underlyings
            }

        surfaces = await asyncio.to_thread(build)
        derived = snapshot.model_copy(update={"vol_surfaces": {**snapshot.vol_surfaces, **surfaces}})
        lineage = {"job": job.name, "kind": "derive", "derive": job.derive, "underlyings": job.underlyings}
        stored = await store_derived(market.put, latest, snapshot, derived, lineage)
        if stored is None:
            # the latest snapshot already holds these surfaces (say another job derived
            # from this job's output): storing it again would only make two jobs chase
            raise UnchangedError(f"the latest snapshot ({iso(latest.data_asof)}) already holds what this job derives")
        return f"stored {iso(stored[0].data_asof)} ({stored[0].hash})"

    return action


Put = Callable[[str, datetime, datetime, MarketSnapshot, dict[str, Any] | None], Awaitable[tuple[SnapshotRecord, bool]]]


async def store_derived(
    put: Put,
    record: SnapshotRecord,
    snapshot: MarketSnapshot,
    derived: MarketSnapshot,
    lineage: dict[str, Any],
) -> tuple[SnapshotRecord, bool] | None:
    """Store ``derived`` (built from ``snapshot``, stored as ``record``) under the same
    val_datetime with a later data_asof, its lineage naming its input and when it was
    produced; re-checked like a PUT. None when it equals ``snapshot`` (nothing new)."""
    derived = MarketSnapshot.model_validate(derived.model_dump())
    if canonical(derived) == canonical(snapshot):
        return None
    now = datetime.now(UTC)
    asof = max(now, record.data_asof + timedelta(microseconds=1))
    lineage = {**lineage, "inputs": [record.key()], "produced_at": iso(now)}
    return await put(record.namespace, record.val_datetime, asof, derived, lineage)


def _where(record: SnapshotRecord) -> str:
    return f"{record.namespace}/{iso(record.val_datetime)} as of {iso(record.data_asof)}"
