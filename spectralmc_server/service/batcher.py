"""Batcher: admission by estimated cost, dynamic batching and bounded jobs in
front of the compute worker.

Cost. The queue learns what the worker's time goes to: a pricing job costs a fixed
overhead plus, per contract, the seconds of its cost class (process; method: ``cvnn``
inside the served model's domain, ``reference`` outside; tier: the heaviest kind of
measure asked for), a calibration slice costs the seconds per quote-evaluation of its
class. Every job's measured wall and CPU time updates the estimates (:class:`CostModel`).

Admission. At submit a request's wait is estimated as the work queued and in flight,
plus one online-training step, plus its own compute. When that exceeds
``admission_fraction`` of the request's deadline it is refused at once with 503
``overloaded`` and Retry-After (the seconds until enough of that work has drained)
instead of waiting to time out. An idle queue admits anything (its jobs are bounded,
and running it corrects the estimate). The queue is also bounded in requests and
contracts, and in concurrent calibrations.

Jobs. Requests are grouped by (models, namespace, val_datetime, data_asof): one batch
prices one market-data key. A job holds at most ``max_batch_contracts`` contracts and
about ``max_job_seconds`` of compute (at the work's own cost, its CPU time: a worker
slowed by a busy event loop gains nothing from smaller jobs), so a large request is
split into chunks priced one after another (at most one in flight per request) and
other batches run between them. Each request is priced with one snapshot of model versions and one
resolved market-data snapshot, taken at its first chunk; the chunks' answers are joined
into the bytes an unsplit answer has (the engine is batch-invariant). A calibration runs
in the engine in slices, one slice per job.

The engine is reached through an :class:`~spectralmc_server.service.engine.EngineClient`
(in this process or in its own): jobs go as Books, answers come back per request. When
the engine is lost, everything queued or in flight is answered 503 ``engine_unavailable``
at once, and new work is refused the same way until an engine is back.

Order. Jobs go in arrival order, except that work behind a request that is being split
(or a calibration) may go first while that request's slack (its deadline, less the work
that must run before it finishes) covers it: a one-contract request does not wait for a
20,000-contract one, and the large one still finishes in time. Work whose client has
gone or whose deadline has passed is dropped before it is computed, and between chunks.
Two jobs are kept on the worker so it never idles between them (up to eight while the
event loop is slow to hear that one ended); it runs them in order, so versions never go
backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np

from spectralmc_server.engine.pricer import PRICE_MEASURES
from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.engine.view import ModelView
from spectralmc_server.engine_service.messages import (
    EngineDead,
    FitFailed,
    FitReport,
    FitSpec,
    Head,
    ModelId,
    PriceJob,
    PriceResult,
    Skipped,
    SliceDone,
    WireEntry,
)
from spectralmc_server.marketdata.calibration import SurfaceError
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.pricing.book import Book, LazyContracts, book_of, book_of_requests, processes, sliced
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.resolve import needs_market_data
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service.engine import EngineClient
from spectralmc_server.service.errors import (
    APIError,
    DeadlineExceeded,
    EngineFailure,
    Invalid,
    NoMarketData,
    Unavailable,
)
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import QueueSettings

log = logging.getLogger(__name__)
GroupKey = tuple[tuple[str, ...], str, datetime | None, datetime | None]
ClassKey = tuple[str, str, str]  # (process, method, tier)
Resolved = tuple[SnapshotRecord, MarketSnapshot]

SLOTS = 2  # jobs in flight (the worker runs them in order, so it never waits for the next)
MAX_SLOTS = 8  # ... up to this many while the event loop is slow to hear that one has ended
SHARED_BOOK_MAX = 256  # requests smaller than this share their job's one book (PriceJob.book)
MAX_PRESSURE = 50.0  # the most a job overrunning its estimate scales the queue's by
HICCUP_SECONDS = 0.02  # an overrun shorter than this says nothing
FILL_WORTH = 10  # a batch waits max_wait_seconds to fill only when its job is shorter than this many times that
MANY_LEVELS = 8  # more quantile levels than this: tier quantiles_many
# Starting points of the learned costs (seconds per contract, per quote-evaluation for
# fits; seconds per job of a tier), on the optimistic side: a class not yet measured gets
# jobs of at most PROBE_CONTRACTS of its contracts, RAMP times more each job after, so a
# wrong prior costs a few short jobs (the reference of a process without a closed form
# is a Monte Carlo, ~0.1 s a contract, hence the small probe there).
PRIOR_UNIT_SECONDS = {
    "price": 5e-6,
    "tangents": 2e-5,
    "distribution": 4e-5,
    "quantiles_many": 3e-4,
    "fit": 5e-5,
}
PRIOR_JOB_SECONDS = {"price": 1e-3, "tangents": 3e-3, "distribution": 5e-3, "quantiles_many": 1e-2}
MAX_RETRY_AFTER = 60
PRIOR_FIT_EVALUATIONS = 30.0
PROBE_CONTRACTS = {"cvnn": 64, "reference": 4}
RAMP = 4  # each job that measures a class may hold RAMP times more of it than the last
RAMPED = 3  # jobs after which a class's estimate is trusted (no more slow start)
# The learned pricer evaluates blocks of 64 rows: a smaller chunk costs as much as 64.
MIN_CHUNK = {"cvnn": 64, "reference": 1}
EFFICIENCY = 4  # a chunk holds at least this many times its job's fixed cost in contracts


def group_key(request: PriceRequest) -> GroupKey:
    models = tuple(sorted(processes(request)))
    return models, request.namespace, request.val_datetime, request.data_asof


def tier_of(request: PriceRequest) -> str:
    """The heaviest kind of measure asked for (its cost per contract differs by ~50x)."""
    m = set(request.measures)
    if "quantiles" in m and len(request.levels) > MANY_LEVELS:
        return "quantiles_many"
    if m & {"stdev", "skew", "kurtosis", "quantiles"}:
        return "distribution"
    if m & {"vega", "theta"}:
        return "tangents"
    return "price"


# -- the cost model ---------------------------------------------------------------------


@dataclass
class _Unit:
    """One class's seconds per unit, as log(seconds): from the worker's wall time (what
    a job takes now) and from its CPU time (what the work itself costs)."""

    wall: float
    cpu: float
    samples: int = 0
    at: float = field(default_factory=time.monotonic)


class CostModel:
    """Worker seconds of a pricing job: per tier of measures in it, a fixed overhead
    (``PRIOR_JOB_SECONDS``), plus ``sum_k contracts_k * unit_k`` over its cost classes;
    of a calibration slice: ``evaluations * quotes * unit``.

    After each job its measured time, less the overheads, is shared among its classes
    in proportion to their estimates (what classes still being measured leave
    unexplained goes to them), and each class's implied seconds per unit moves its
    estimates in log space by ``WEIGHT`` of the way, each step at most ``STEP`` times (a
    class's first ``RAMPED`` jobs, which are small, by up to ``FIRST_STEP``), so one
    stalled job (torch's first call) moves it only so far. Two estimates are kept: from
    the wall time, what admission uses (it includes the worker waiting for the GIL while
    the event loop is busy; it rises the whole step at once and falls by ``WEIGHT``, so
    admission errs on the side of refusing), and from the computing thread's CPU time, the work itself,
    which sizes jobs (a worker slowed for everyone gains nothing from smaller jobs but
    more fixed costs; torch's intra-op threads are not counted, so it errs low). The
    wall estimate relaxes toward the CPU one with a half-life of ``HALF_LIFE`` seconds
    while the class is not measured: work refused while the worker was slow is admitted
    again later."""

    WEIGHT = 0.3
    STEP = 4.0
    FIRST_STEP = 30.0
    HALF_LIFE = 60.0

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.units: dict[ClassKey, _Unit] = {}
        self.fit_evaluations = PRIOR_FIT_EVALUATIONS  # mean evaluations of a finished fit

    def _unit(self, key: ClassKey, usual: bool = False) -> float:
        u = self.units.get(key)
        if u is None:
            return PRIOR_UNIT_SECONDS[key[2]]
        if usual:
            return math.exp(u.cpu)
        relax = 0.5 ** ((time.monotonic() - u.at) / self.HALF_LIFE)
        return math.exp(u.cpu + (u.wall - u.cpu) * relax)

    def unit(self, key: ClassKey) -> float:
        """Seconds per unit of ``key`` now (for admission)."""
        return self._unit(key)

    def samples(self, key: ClassKey) -> int:
        """Jobs that have measured this class."""
        u = self.units.get(key)
        return 0 if u is None else u.samples

    def overhead(self, tiers: Any) -> float:
        """The fixed seconds of one job pricing these tiers."""
        return sum(PRIOR_JOB_SECONDS[t] for t in set(tiers))

    def seconds(self, counts: Mapping[ClassKey, int], *, usual: bool = False) -> float:
        """Seconds of these contracts now, or (``usual``) of the work itself."""
        return sum(n * self._unit(k, usual) for k, n in counts.items())

    def fit_seconds(self, key: ClassKey, evaluations: float, quotes: int, *, usual: bool = False) -> float:
        return evaluations * quotes * self._unit(key, usual)

    def _step(self, current: float, implied: float, first: bool, rise: float) -> float:
        limit = math.log(self.FIRST_STEP if first else self.STEP)
        target = min(max(math.log(max(implied, 1e-12)), current - limit), current + limit)
        weight = 1.0 if first else (rise if target > current else self.WEIGHT)
        return current + weight * (target - current)

    def _update(self, key: ClassKey, wall: float, cpu: float) -> None:
        u = self.units.get(key)
        if u is None:
            prior = math.log(PRIOR_UNIT_SECONDS[key[2]])
            u = self.units[key] = _Unit(prior, prior)
        first = u.samples < RAMPED  # its first jobs set it
        # admission's estimate rises at once (up to STEP a job: a burst that holds the
        # GIL slows the worker many times over within a second) and falls by WEIGHT
        u.wall = self._step(math.log(self._unit(key)), wall, first, 1.0)
        u.cpu = self._step(u.cpu, cpu, first, self.WEIGHT)
        u.samples += 1
        u.at = time.monotonic()
        if self.metrics is not None:
            self.metrics.queue_unit_seconds.labels(*key).set(math.exp(u.wall))

    def observe(self, counts: Mapping[ClassKey, int], seconds: float, cpu_seconds: float | None = None) -> None:
        """A pricing job with ``counts`` contracts per class took ``seconds`` (and
        ``cpu_seconds`` of its thread; None: as many)."""
        parts = {k: n * self._unit(k) for k, n in counts.items() if n > 0}
        if not parts or not math.isfinite(seconds) or seconds <= 0:
            return
        cpu = seconds if cpu_seconds is None or not math.isfinite(cpu_seconds) else min(cpu_seconds, seconds)
        fixed = self.overhead(k[2] for k in parts)
        wall_work, cpu_work = max(seconds - fixed, 0.1 * seconds), max(cpu - fixed, 0.1 * cpu)
        new = {k for k in parts if self.samples(k) < RAMPED}
        if new and len(new) < len(parts):  # the classes still being measured take the surprise
            known = sum(p for k, p in parts.items() if k not in new)
            known_cpu = sum(n * self._unit(k, usual=True) for k, n in counts.items() if k not in new)
            wall_work, cpu_work = max(wall_work - known, 0.05 * wall_work), max(cpu_work - known_cpu, 0.05 * cpu_work)
            parts = {k: p for k, p in parts.items() if k in new}
        total = sum(parts.values())
        for key, part in parts.items():
            share = part / total / counts[key]
            self._update(key, wall_work * share, cpu_work * share)

    def observe_slice(
        self, key: ClassKey, evaluations: int, quotes: int, seconds: float, cpu_seconds: float | None = None
    ) -> None:
        """A calibration slice did ``evaluations`` of ``quotes`` quotes in ``seconds``."""
        if evaluations > 0 and quotes > 0 and math.isfinite(seconds) and seconds > 0:
            cpu = seconds if cpu_seconds is None else min(max(cpu_seconds, 0.0), seconds)
            units = evaluations * quotes
            self._update(key, seconds / units, max(cpu, 0.1 * seconds) / units)

    def observe_fit(self, evaluations: int) -> None:
        self.fit_evaluations = 0.8 * self.fit_evaluations + 0.2 * evaluations


# -- what is queued ---------------------------------------------------------------------


Mask = np.ndarray[Any, np.dtype[np.bool_]]


def _inside(book: Book, served: ModelView, strike_measures: bool) -> Mask:
    """Which contracts of ``book`` (all of the served model's process) the learned model
    is expected to answer: inside the domain's box and, for strike measures, its
    certified K/F. Contracts by reference count as inside (resolved later)."""
    lo, hi = served.expiry_range
    ranges = served.param_ranges
    t = book.expiry_years
    by_ref = np.isnan(t) | np.isnan(book.spot)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        inside = (lo <= t) & (t <= hi)
        theta = book.theta(book.process[0])
        names = PROCESSES[book.process[0]].param_names
        for name, low, high in ranges:
            col = theta[:, names.index(name)] if name in names else np.full(len(book), np.nan)
            inside &= (low <= col) & (col <= high)
        kf = served.moneyness
        if strike_measures:
            carry = np.nan_to_num(book.rate, nan=0.0) - np.nan_to_num(book.dividend, nan=0.0)
            ratio = np.exp(carry * t)
            averaged = ~np.isnan(book.fixings)
            if averaged.any():  # the average's forward over n equally spaced fixings
                n = book.fixings
                step = carry * t / n
                mean = np.exp(step) * np.expm1(carry * t) / (n * np.expm1(step))
                ratio = np.where(averaged, np.where(np.abs(step) < 1e-12, 1.0, mean), ratio)
            kappa = book.strike / (book.spot * ratio)
            inside &= (kf[0] <= kappa) & (kappa <= kf[1])
    return inside | by_ref


# Below this many contracts classification reads the contract objects one by one (numpy's
# per-call cost is ~30 us; a contract ~2 us); tests/service/test_classify.py checks the
# two readings agree.
VECTOR_MIN_CONTRACTS = 32


def _classify_each(
    request: PriceRequest, models: Mapping[str, ModelView], tier: str, strike_measures: bool
) -> list[tuple[int, ClassKey]]:
    runs: list[tuple[int, ClassKey]] = []
    current: ClassKey | None = None
    for i, c in enumerate(request.contracts):
        served = models.get(c.process)
        if served is None:
            method = "reference"
        elif c.expiry_years is None or c.spot is None:
            method = "cvnn"  # by reference: resolved later, assumed inside
        else:
            lo, hi = served.expiry_range
            ranges = served.param_ranges
            t = c.expiry_years
            inside = lo <= t <= hi
            if inside:
                if len(ranges) == 1 and c.vol is not None:
                    inside = ranges[0][1] <= c.vol <= ranges[0][2]
                else:
                    params = c.process_params()
                    inside = all(low <= params.get(name, math.nan) <= high for name, low, high in ranges)
            if inside and strike_measures:
                kf = served.moneyness
                carry = (c.rate or 0.0) - (c.dividend or 0.0)
                fixings = c.fixings
                if fixings is None:
                    ratio = math.exp(carry * t)
                else:  # the average's forward over n equally spaced fixings
                    step = carry * t / fixings
                    ratio = (
                        1.0
                        if abs(step) < 1e-12
                        else math.exp(step) * math.expm1(carry * t) / (fixings * math.expm1(step))
                    )
                inside = kf[0] <= c.strike / (c.spot * ratio) <= kf[1]
            method = "cvnn" if inside else "reference"
        key = (c.process, method, tier)
        if key != current:
            if current is not None:
                runs.append((i, current))
            current = key
    assert current is not None  # a request has at least one contract
    runs.append((len(request.contracts), current))
    return runs


def classify(request: PriceRequest, models: Mapping[str, ModelView]) -> list[tuple[int, ClassKey]]:
    """The request's contracts as runs ``(end, class)`` in order: the method each is
    expected to get (inside the domain's box and certified strikes: cvnn). An estimate:
    contracts by reference count as cvnn, and the engine may still send a contract to the
    reference (a learned price outside its bounds); measured jobs correct the rest."""
    tier = tier_of(request)
    strike_measures = bool(set(request.measures) & set(PRICE_MEASURES))
    if len(request.contracts) < VECTOR_MIN_CONTRACTS and not isinstance(request.contracts, LazyContracts):
        return _classify_each(request, models, tier, strike_measures)
    book = book_of(request)
    n = len(book)
    keys: list[ClassKey] = []
    codes = np.zeros(n, dtype=np.intp)
    for name, index in book.by_process().items():
        served = models.get(name)
        if served is None:
            cvnn = np.zeros(len(index), dtype=np.bool_)
        else:
            cvnn = _inside(book if len(index) == n else book.take(index), served, strike_measures)
        base = len(keys)
        keys += [(name, "reference", tier), (name, "cvnn", tier)]
        codes[index] = base + cvnn.astype(np.intp)
    ends = [*(np.flatnonzero(np.diff(codes)) + 1).tolist(), n]
    return [(end, keys[int(codes[end - 1])]) for end in ends]


def _counts(runs: list[tuple[int, ClassKey]], start: int, end: int) -> Counter[ClassKey]:
    out: Counter[ClassKey] = Counter()
    begin = 0
    for stop, key in runs:
        lo, hi = max(begin, start), min(stop, end)
        if hi > lo:
            out[key] += hi - lo
        begin = stop
        if begin >= end:
            break
    return out


@dataclass(eq=False)
class Pending:
    """One queued pricing request (priced in one or more chunks)."""

    key: GroupKey
    request: PriceRequest
    contracts: int
    future: asyncio.Future[dict[str, Any]]
    deadline: float  # loop time
    connected: Callable[[], bool]
    enqueued: float = field(default_factory=time.perf_counter)
    needs_market: bool = False  # has contracts by reference: resolved once per request
    runs: list[tuple[int, ClassKey]] = field(default_factory=list)
    tier: str = "price"  # tier_of(request)
    margin: float = 0.0  # the share of the deadline admission keeps free
    next: int = 0  # the first contract not yet sent to the worker
    busy: bool = False  # a chunk is on the worker
    queued: bool = True  # in the queue (some of it not yet sent to the worker)
    closed: bool = False  # answered, failed or dropped
    slowdown: float = 1.0  # measured / estimated time of its last chunk computed alone (>= 1)
    parts: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, ModelId] | None = None  # its one snapshot of model versions (its lease)
    req: int = 0  # its id at the engine (for all its chunks)
    dispatched: bool = False  # a chunk was sent to the engine: it must be forgotten there
    resolved: Resolved | None = None  # its one market-data snapshot
    columnar: bool = False  # answered with columns (a columnar or Arrow book), not rows

    def remaining(self) -> Counter[ClassKey]:
        return _counts(self.runs, self.next, self.contracts)


@dataclass(eq=False)
class FitItem:
    """One queued or running calibration, computed in slices."""

    fit_id: int
    future: asyncio.Future[FitReport]
    cls: ClassKey  # (process, method, "fit")
    quotes: int
    max_evaluations: int
    deadline: float  # loop time (= time.monotonic for the hook on the fit's thread)
    connected: Callable[[], bool]
    margin: float = 0.0
    enqueued: float = field(default_factory=time.perf_counter)
    busy: bool = False
    queued: bool = True
    closed: bool = False
    iterations: int = 0  # as of its last slice
    evaluations: int = 0
    finished: bool = False  # the engine is done with it


Item = Pending | FitItem


@dataclass(eq=False)
class _Slice:
    item: Pending
    start: int
    end: int
    counts: Counter[ClassKey]


@dataclass(eq=False)
class _Job:
    estimate: float  # seconds
    dispatched: float = field(default_factory=time.perf_counter)
    started: float | None = None  # perf_counter on the worker
    ended: float | None = None


def _engine_down(reason: str) -> Unavailable:
    return Unavailable(f"the compute engine is down: {reason}", 5, code="engine_unavailable")


def _ceil_seconds(seconds: float) -> int:
    """A Retry-After: whole seconds, at least 1, at most MAX_RETRY_AFTER."""
    return min(max(1, math.ceil(seconds - 1e-9)), MAX_RETRY_AFTER) if math.isfinite(seconds) else MAX_RETRY_AFTER


def merge_answers(parts: list[dict[str, Any]], models: Mapping[str, Any] | None) -> dict[str, Any]:
    """A request's chunk answers as the one answer it would have had unsplit: results
    in order, and the model identities in the order the Valuer writes them (by process)."""
    if len(parts) == 1:
        return parts[0]
    answer = dict(parts[0])
    identities: dict[str, Any] = {}
    for part in parts:
        for name, identity in part["models"].items():
            identities.setdefault(name, identity)
    if "columns" in answer:  # a columnar answer: each column joined (lists, or float64 arrays)
        answer["columns"] = {
            name: np.concatenate([p["columns"][name] for p in parts])
            if isinstance(first, np.ndarray)
            else [x for p in parts for x in p["columns"][name]]
            for name, first in parts[0]["columns"].items()
        }
    else:
        answer["results"] = [row for p in parts for row in p["results"]]
    process_of = {served.name: process for process, served in (models or {}).items()}
    answer["models"] = {k: identities[k] for k in sorted(identities, key=lambda k: (process_of.get(k, k), k))}
    answer["market_data"] = answer.pop("market_data")  # keys in the unsplit answer's order
    return answer


class Batcher:
    """Admits, batches and splits work for the :class:`ComputeWorker` (run :meth:`run`
    as a task)."""

    def __init__(
        self,
        settings: QueueSettings,
        engine: EngineClient,
        metrics: Metrics,
        market: MarketData | None = None,
    ) -> None:
        self.settings = settings
        self.market = market
        self.engine = engine
        self.models = engine.models
        engine.lost_listeners.append(self.engine_lost)
        self._ids = itertools.count(1)  # requests' and calibrations' ids at the engine
        self.metrics = metrics
        self.cost = CostModel(metrics)
        self._items: deque[Item] = deque()
        self._contracts = 0  # contracts queued, not yet sent to the worker
        self._queued: Counter[ClassKey] = Counter()  # the same, by cost class
        self._keys: Counter[GroupKey] = Counter()  # queued requests by batch key
        self._fits: set[FitItem] = set()  # queued or running
        self._large: set[Item] = set()  # queued requests of several jobs (or being split), calibrations
        self._wake = asyncio.Event()
        self._jobs: set[_Job] = set()
        self._inflight: set[asyncio.Task[None]] = set()
        self._plans: dict[int, list[_Slice]] = {}  # in flight, by id of their job
        self.closed = False
        self._stopped = False
        self._slots = SLOTS  # jobs kept on the worker (more while the event loop lags)
        self._lag = 0.0  # EWMA: seconds from a job's end on the worker to the loop hearing of it
        self._job_time = 0.01  # EWMA: seconds of a job on the worker
        metrics.queue_estimated_wait.set_function(self.estimated_wait)

    @property
    def depth(self) -> tuple[int, int]:
        """Queued requests (with work not yet sent to the worker) and their contracts."""
        return len(self._items), self._contracts

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
        expected = min(max(self.cost.fit_evaluations, 2.0), float(fit.max_evaluations))
        left = max(expected - fit.evaluations, 2.0)
        return self.cost.fit_seconds(fit.cls, left, fit.quotes)

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
    ) -> asyncio.Future[FitReport]:
        """Queue a calibration: the engine fits ``spec`` in slices of about
        ``max_job_seconds`` (between which other jobs run). At most ``max_calibrations``
        at once; the deadline stops it between iterations (504); a surface it cannot fit
        fails the future with :class:`~spectralmc_server.marketdata.calibration.SurfaceError`."""
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
            2 * spec.max_iterations + 1,
            deadline,
            connected,
            margin=(1.0 - s.admission_fraction) * timeout,
        )
        self._admit(self._fit_remaining(item), timeout, f"this calibration ({quotes} quotes)")
        try:
            self.engine.fit_start(item.fit_id, replace(spec, deadline=deadline))
        except EngineDead as exc:
            raise _engine_down(str(exc)) from None
        self._items.append(item)
        self._fits.add(item)
        self._large.add(item)
        self._pump()
        self._wake.set()
        return future

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

    def _first_job_seconds(self, item: Item) -> float:
        if isinstance(item, FitItem):
            return min(
                self._fit_remaining(item),
                max(self.settings.max_job_seconds, self.cost.fit_seconds(item.cls, 2, item.quotes)),
            )
        overhead = self.cost.overhead([item.tier])
        return min(self._item_seconds(item), self.settings.max_job_seconds) + overhead

    def _choose(self) -> tuple[Item, float] | None:
        """The next job's lead item and the slack it may use (inf: no one to protect):
        the oldest item, unless it is being split (or computing) and its slack, and that
        of everything passed, covers a later item's job."""
        loop_now = asyncio.get_running_loop().time()
        cum = self._inflight_seconds()
        slack = math.inf
        passed = False
        for item in list(self._items):
            if not self._alive(item, loop_now):
                continue
            if not item.busy:
                first = self._first_job_seconds(item)
                if not passed or first <= slack:
                    return item, slack
            cum += self._fit_remaining(item) if isinstance(item, FitItem) else self._item_seconds(item)
            own = item.deadline - loop_now - item.margin - cum
            if own >= 0:  # one that will be late anyway is not protected (no cascade)
                slack = min(slack, own)
            passed = True
        return None

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
            self._start_batch(self._plan(lead, slack))
        return None

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
        except EngineDead as exc:
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
        except EngineDead as exc:
            for sl in plan:
                if not sl.item.future.done():
                    sl.item.future.set_exception(_engine_down(str(exc)))
                self._close(sl.item)
            return
        except Exception as exc:  # valid requests that the engine could not price: a bug
            # (the engine has marked itself failed: health fails, an orchestrator restarts it)
            log.error("batch of %d requests failed: %s: %s", len(plan), type(exc).__name__, exc)
            for sl in plan:
                if not sl.item.future.done():
                    sl.item.future.set_exception(EngineFailure("the pricing engine failed: JobFailedError"))
                self._close(sl.item)
            return
        finally:
            for sl in plan:
                sl.item.busy = False
        job.started, job.ended = result.started, result.ended
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
        seconds, cpu = result.ended - result.started, result.cpu
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
        if not computed:
            return
        self._learn(computed, answers, seconds, cpu)
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
        except EngineDead as exc:
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
        if done.evaluations > 0:
            self.cost.observe_slice(fit.cls, done.evaluations, fit.quotes, done.ended - done.started, done.cpu)
        if not done.finished:
            if fit.future.done() and not fit.closed:  # given up on while computing
                self._close(fit)
            return
        fit.finished = True
        outcome = done.outcome
        if isinstance(outcome, FitReport):
            self.cost.observe_fit(fit.evaluations)
            if not fit.future.done():
                fit.future.set_result(outcome)
        elif isinstance(outcome, FitFailed) and outcome.kind == "deadline":
            if not fit.future.done():
                fit.future.set_exception(
                    DeadlineExceeded(
                        f"the calibration was stopped after {outcome.iterations} iterations: its deadline passed "
                        "(send a longer X-Request-Timeout, a lower max_iterations or a smaller surface)",
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
                    item.future.set_exception(
                        Unavailable(
                            f"market data unavailable: {type(exc).__name__}: {exc}", 1, code="store_unavailable"
                        )
                    )
                self._close(item)
            return
        for item in needing:
            item.resolved = resolved

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
