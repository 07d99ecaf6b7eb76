"""What the batcher queues: cost classes of a request's contracts, queued requests and
calibrations, job slices; merging a split request's answers."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from spectralmc_server.engine.pricer import PRICE_MEASURES
from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.engine.view import ModelView
from spectralmc_server.engine_service.messages import (
    FitReport,
    ModelId,
)
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.pricing.book import Book, LazyContracts, book_of, processes
from spectralmc_server.pricing.schemas import Contract, PriceRequest
from spectralmc_server.service.batcher.costs import ClassKey
from spectralmc_server.service.errors import (
    Unavailable,
)

GroupKey = tuple[tuple[str, ...], str, datetime | None, datetime | None]
Resolved = tuple[SnapshotRecord, MarketSnapshot]
MANY_LEVELS = 8  # more quantile levels than this: tier quantiles_many
MAX_RETRY_AFTER = 60


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
        if c.barrier is not None:
            key = barrier_class(c.process, c.barrier.monitoring == "continuous", tier)
        else:
            key = (c.process, _method_of(c, models.get(c.process), strike_measures), tier)
        if key != current:
            if current is not None:
                runs.append((i, current))
            current = key
    assert current is not None  # a request has at least one contract
    runs.append((len(request.contracts), current))
    return runs


def _method_of(c: Contract, served: ModelView | None, strike_measures: bool) -> str:
    """The method a contract without a barrier is expected to get: cvnn inside its served
    model's box (and certified strikes), else reference."""
    if served is None:
        return "reference"
    if c.expiry_years is None or c.spot is None:
        return "cvnn"  # by reference: resolved later, assumed inside
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
            ratio = 1.0 if abs(step) < 1e-12 else math.exp(step) * math.expm1(carry * t) / (fixings * math.expm1(step))
        inside = kf[0] <= c.strike / (c.spot * ratio) <= kf[1]
    return "cvnn" if inside else "reference"


def barrier_class(process: str, continuous: bool, tier: str) -> ClassKey:
    """A barrier contract's cost class: the closed form (gbm, continuous monitoring) or
    Monte Carlo, apart from the process's vanilla classes."""
    return (f"{process}-barrier", "analytic" if process == "gbm" and continuous else "reference", tier)


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
    if book.barrier is not None:  # barrier contracts: their own classes (closed form, Monte Carlo)
        for i, (name, b) in enumerate(zip(book.process, book.barrier, strict=True)):
            if b is not None:
                key = barrier_class(name, b.monitoring == "continuous", tier)
                if key not in keys:
                    keys.append(key)
                codes[i] = keys.index(key)
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
    slices: int = 0  # started so far
    corrections: int = 0  # reference corrections: each a re-fit (and for a Monte Carlo, its paths)
    reference_paths: int = 0  # the corrections' Monte Carlo paths in all (over every expiry)
    reference_done: int = 0  # of those, computed so far


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
