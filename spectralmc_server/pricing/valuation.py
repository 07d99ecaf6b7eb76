"""Turn a validated :class:`PriceRequest` into a response, through the served models.

Shared by ``spectralmc price`` and the HTTP service. Contracts are grouped by process,
priced in one batch per process, and answered in request order. The same request
against the same model versions gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import torch

from spectralmc_server.engine.barrier_mc import BarrierBatch
from spectralmc_server.engine.barrier_pricer import barrier_batch, price_barriers
from spectralmc_server.engine.certificate import RELATIVE_MEASURES, UNITS
from spectralmc_server.engine.moments import moment_refusal
from spectralmc_server.engine.pricer import MOMENT_MAX_SPREAD, PRICE_MEASURES, SPREAD_MEASURES, clamp_to_bounds
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.spec import servable_np
from spectralmc_server.engine.reference_pricers import reference_bounds, reference_pricer, reference_with_error
from spectralmc_server.engine.view import ModelView
from spectralmc_server.marketdata.store import iso
from spectralmc_server.pricing.book import Book, all_explicit, book_of, book_of_requests, cached_book, processes
from spectralmc_server.pricing.schemas import BARRIER_MEASURE_NAMES, PriceRequest

if TYPE_CHECKING:  # the network's modules (and torch) only where a model is served: lazy_torch.py
    from spectralmc_server.engine.served import ServedModel


class RequestError(ValueError):
    """A request that validated but cannot be answered; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str, *, market: bool = True) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.market = market  # True: the market data is missing or unusable (no_market_data)


def check_inputs(request: PriceRequest) -> None:
    """What can be refused before any pricing: contracts by reference need the
    val_datetime that names their snapshot."""
    if request.val_datetime is None and not all_explicit(request):
        raise RequestError(
            "val_datetime",
            "contracts by reference (underlying/expiry) need val_datetime to name their market-data snapshot",
        )


def check_explicit(request: PriceRequest) -> None:
    """The Valuer prices explicit inputs only; contracts by reference must have been
    resolved against a snapshot first (the server's batcher does this)."""
    if all_explicit(request):
        return
    for i, c in enumerate(request.contracts):
        if not c.is_explicit:
            raise RequestError(
                f"contracts[{i}]",
                "prices by underlying/expiry need a market-data snapshot, and none is available "
                "here; send the request to a server with market data, or give spot, expiry_years, "
                "rate, dividend and vol instead",
            )


# Processes without an analytic CF are priced outside their model by simulation (about
# 0.4 s per distinct point on one core): a request may send at most this many distinct
# points there, so one request cannot hold the worker for minutes.
MAX_SIMULATED_REFERENCE_POINTS = 32
# Distinct points a request may send to the analytic reference at 32,768 terms or more
# (engine/refined.py: ~70 ms a point at 131,072 terms, against ~0.5 ms at 2,048).
MAX_REFINED_REFERENCE_POINTS = 64


class NonFiniteResultError(RuntimeError):
    """A pricer returned a non-finite number for valid input: a bug, never served."""


def _check_finite(
    values: Mapping[str, torch.Tensor],
    measures: Sequence[str],
    ids: Sequence[str],
    withheld: Mapping[str, torch.Tensor],
) -> None:
    for m in measures:
        v = values[m]
        ok = torch.isfinite(v).reshape(v.shape[0], -1).all(1)
        if m in withheld:
            ok |= withheld[m]  # withheld on purpose: null with a warning
        if not bool(ok.all()):
            bad = ids[int(torch.nonzero(~ok)[0, 0])]
            raise NonFiniteResultError(f"{m} of contract {bad!r} is not finite")


def check_request(request: PriceRequest, models: Mapping[str, ModelView]) -> None:
    """What an explicit request must satisfy before pricing, beyond its schema, checked
    without torch (the HTTP process admits by it, lazy_torch.py): barriers, a bounded
    simulated-reference cost (:func:`check_cost`), higher moments only where the spread
    allows them. Whether those moments are finite needs the exact moments, in torch:
    :func:`check_moments`, which the engine runs (pricing/door.py ``value_batch``).
    Raises RequestError (a 422 naming the contract)."""
    check_barriers(request)
    if SPREAD_MEASURES & set(request.measures):
        for name, index in book_of(request).by_process().items():
            if name == "gbm":  # the lognormal moments are closed forms at any spread
                continue
            for i in index.tolist():
                c = request.contracts[i]
                if not c.is_explicit:
                    continue
                s = c.spread()
                if s > MOMENT_MAX_SPREAD:
                    raise RequestError(
                        f"contracts[{i}]",
                        f"stdev, skew and kurtosis are answered for a spread of log(S_T/F) up to "
                        f"{MOMENT_MAX_SPREAD:g} (docs/method.md); this {c.process} contract's is {s:.4g}",
                        market=False,
                    )
    check_cost(request, models)


def check_barriers(request: PriceRequest) -> None:
    """Refuse (RequestError) what barrier contracts are not priced for: a distribution
    measure (the law of a knocked-out price is not a distribution: its mass is the
    survival probability), or more than ``MAX_SIMULATED_REFERENCE_POINTS`` contracts
    that only Monte Carlo can price (Heston, or monitoring dates).

    A request whose Book is not built yet and that has no barrier builds none here: the
    batcher joins small requests' contracts into one Book per job (book_of_requests),
    and a Book per request only for this check cost 11-16 us of a one-contract
    request, more than its schema validation (~11 us; measured)."""
    if cached_book(request) is None and all(c.barrier is None for c in request.contracts):
        return
    book = book_of(request)
    rows = book.barrier_rows()
    if not rows.any():
        return
    first = int(np.flatnonzero(rows)[0])
    refused = [m for m in request.measures if m not in BARRIER_MEASURE_NAMES]
    if refused:
        raise RequestError(
            "measures",
            f"{', '.join(refused)} are not defined for a barrier contract (contracts[{first}]): a knocked-out law "
            f"is not a distribution; barrier contracts take {', '.join(BARRIER_MEASURE_NAMES)}",
            market=False,
        )
    assert book.barrier is not None
    simulated = sum(
        1
        for p, b in zip(book.process, book.barrier, strict=True)
        if b is not None and not (p == "gbm" and b.monitoring == "continuous")
    )
    if simulated > MAX_SIMULATED_REFERENCE_POINTS:
        raise RequestError(
            "contracts",
            f"{simulated} barrier contracts are priced by Monte Carlo (heston, or monitoring dates; seconds each); "
            f"at most {MAX_SIMULATED_REFERENCE_POINTS} per request: split the request",
            market=False,
        )


def check_moments(request: PriceRequest) -> None:
    """Refuse (RequestError, a 422 naming the contract) a request for stdev, skew or
    kurtosis where that moment of S_T is infinite (Heston's moment explosion: E[S_T^n] is
    infinite from a time T*(n) on) or finite but beyond float64: an infinite moment is
    never served as a number or a null. The exact moments are the reference's
    (engine/moments.py); a refused request reaches no model, learned or reference."""
    asked = SPREAD_MEASURES & set(request.measures)
    if not asked:
        return
    book = book_of(request)
    for name, index in book.by_process().items():
        if name == "gbm":  # the lognormal's moments are finite and fit float64 within the bounds
            continue
        part = book.take(index)
        explicit = ~(np.isnan(part.spot) | np.isnan(part.expiry_years))
        rows = np.flatnonzero(explicit)
        if not len(rows):
            continue
        theta = torch.from_numpy(np.ascontiguousarray(part.theta(name)[rows], dtype=np.float64))
        expiry = torch.from_numpy(np.ascontiguousarray(part.expiry_years[rows], dtype=np.float64))
        refusal = moment_refusal(name, theta, expiry, asked)
        if refusal is not None:
            row, _, reason = refusal
            raise RequestError(f"contracts[{int(index[rows[row]])}]", reason, market=False)


def check_cost(request: PriceRequest, models: Mapping[str, ModelView]) -> None:
    """Refuse (RequestError) a request whose reference work is unbounded: more than
    ``MAX_SIMULATED_REFERENCE_POINTS`` distinct (parameters, expiry) points that only a
    simulated reference can answer."""
    if all(get_process(name).has_analytic_cf for name in processes(request)):
        return
    book = book_of(request)
    measures = frozenset(request.measures)
    for name, index in book.by_process().items():
        if get_process(name).has_analytic_cf:
            continue
        part = book.take(index)
        explicit = ~(np.isnan(part.spot) | np.isnan(part.expiry_years))
        if not explicit.all():
            part = part.take(np.flatnonzero(explicit))
        if not len(part):
            continue
        theta, expiry = part.theta(name), part.expiry_years
        served = models.get(name)
        outside = np.ones(len(part), dtype=np.bool_)
        if served is not None:  # the engine's servable, without torch (engine/processes/spec.py)
            lows, highs = served.box()
            outside = ~servable_np(
                name,
                theta,
                expiry,
                part.spot,
                part.strike,
                np.nan_to_num(part.rate, nan=0.0),  # absent: 0, as the engine's batch has it
                np.nan_to_num(part.dividend, nan=0.0),
                lows=lows,
                highs=highs,
                certified_moneyness=served.moneyness,
                qualified=served.qualified,
                spread_measures=bool(measures & SPREAD_MEASURES),
                price_measures=bool(measures & set(PRICE_MEASURES)),
            )
        points = {(*row, t) for row, t in zip(theta[outside].tolist(), expiry[outside].tolist(), strict=True)}
        if len(points) > MAX_SIMULATED_REFERENCE_POINTS:
            raise RequestError(
                "contracts",
                f"{len(points)} distinct {name} points (parameters and expiry) lie outside the served model's "
                f"domain or certified strike range, where each is priced by simulation (~0.4 s each); at most "
                f"{MAX_SIMULATED_REFERENCE_POINTS} per request: split the request",
                market=False,
            )


class Valuer:
    """Prices requests with the models it holds (one per process name); a process with
    no model here is answered by its reference pricer (``method: reference``).

    :meth:`value_many` prices several requests in one batch per (measures, levels) and
    process. Each contract's answer depends only on the contract and the model version
    (the pricer evaluates in fixed-shape chunks), so batching never changes a byte.
    """

    def __init__(self, models: Mapping[str, ServedModel]) -> None:
        self.models = dict(models)

    def value(self, request: PriceRequest) -> dict[str, Any]:
        return self.value_many([request])[0]

    def value_many(self, requests: Sequence[PriceRequest], columnar: Sequence[bool] = ()) -> list[dict[str, Any]]:
        """One answer per request. Where ``columnar[i]`` is true, request i's answer has
        ``columns`` (the columnar answer: pricing/columns.py ``answer_column_names``,
        numbers as float64 arrays with NaN where the row answer has null) in place of
        ``results``, built from the engine's arrays without a dict per contract; its
        numbers are the row answer's, bit for bit (tests/service/test_columnar_answers.py)."""
        for r in requests:
            check_explicit(r)
        flat = {i for i, c in enumerate(columnar) if c}
        flat_owners = np.array(sorted(flat), dtype=np.intp)
        tables = {i: _AnswerTable(requests[i]) for i in flat}
        answers = [_empty_answer(r) for r in requests]
        groups: dict[tuple[tuple[str, ...], tuple[float, ...]], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((tuple(r.measures), r.levels), []).append(i)
        for (measure_list, level_values), members in groups.items():
            # the group's requests as one book: row r belongs to request owner[r], at its row at[r]
            group = book_of_requests([requests[i] for i in members])
            sizes = [len(requests[i].contracts) for i in members]
            owner = np.repeat(np.array(members, dtype=np.intp), sizes)
            at = np.concatenate([np.arange(k, dtype=np.intp) for k in sizes])
            for proc_name, index in sorted(group.by_process().items()):
                part = group if len(index) == len(group) else group.take(index)
                priced = self._price(proc_name, part, measure_list, level_values)
                owners, places = owner[index], at[index]
                as_rows = np.flatnonzero(~np.isin(owners, flat_owners)) if flat else np.arange(len(index))
                for k, i, j in zip(as_rows.tolist(), owners[as_rows].tolist(), places[as_rows].tolist(), strict=True):
                    answers[i]["results"][j] = priced.row(k)
                for i, table in tables.items():
                    priced.fill(table, owners == i, places)
                if priced.identity is not None:  # the version that answered, per request
                    for i in np.unique(owners[np.array(priced.learned, dtype=np.bool_)]).tolist():
                        answers[i]["models"][priced.model] = priced.identity
        for i, table in tables.items():
            answer = answers[i]
            del answer["results"]
            answer["columns"] = table.columns()
            answer["models"] = answer.pop("models")  # the row answer's key order: columns, models, market_data
            answer["market_data"] = answer.pop("market_data")
        return answers

    def _price(
        self, proc_name: str, part: Book, measure_list: tuple[str, ...], level_values: tuple[float, ...]
    ) -> _Priced:
        """One process's contracts of a group priced: by its served model, or by the
        reference where none is served; barrier contracts by the barrier pricers."""
        barrier = part.barrier_rows()
        if barrier.any():
            return self._price_with_barriers(proc_name, part, measure_list, level_values, barrier)
        if "survival" in measure_list:  # no barrier: nothing can knock it out
            rest = tuple(m for m in measure_list if m != "survival")
            priced = self._price_plain(proc_name, part, rest, level_values) if rest else None
            return _with_survival(priced, proc_name, part, measure_list, level_values)
        return self._price_plain(proc_name, part, measure_list, level_values)

    def _price_with_barriers(
        self,
        proc_name: str,
        part: Book,
        measure_list: tuple[str, ...],
        level_values: tuple[float, ...],
        barrier: np.ndarray[Any, np.dtype[np.bool_]],
    ) -> _Priced:
        """A part with barrier contracts: those by the barrier pricers (closed form or
        Monte Carlo, engine/barrier_pricer.py), the others as any contract."""
        n = len(part)
        priced = _Priced(proc_name, part.id, measure_list, [repr(q) for q in level_values])
        values = {m: torch.zeros(n, dtype=torch.float64) for m in measure_list}
        bounds = {m: torch.zeros(n, dtype=torch.float64) for m in measure_list}
        learned = [False] * n
        methods = [""] * n
        plain = np.flatnonzero(~barrier)
        if len(plain):
            sub = self._price(proc_name, part.take(plain), measure_list, level_values)
            at = torch.from_numpy(plain)
            for m in measure_list:
                values[m][at] = sub.values[m]
                bounds[m][at] = sub.bounds[m]
            for m, w in sub.withheld.items():
                priced.withheld.setdefault(m, torch.zeros(n, dtype=torch.bool))[at] = w
            for k, i in enumerate(plain.tolist()):
                learned[i], methods[i] = sub.learned[k], sub.methods[k]
            priced.tolerance, priced.model, priced.identity = sub.tolerance, sub.model, sub.identity
        rows = np.flatnonzero(barrier)
        answer = price_barriers(get_process(proc_name), barrier_batch_of(part.take(rows), proc_name), measure_list)
        at = torch.from_numpy(rows)
        for m in measure_list:
            values[m][at] = answer.values[m]
            bounds[m][at] = answer.bounds[m]
        for k, i in enumerate(rows.tolist()):
            methods[i] = answer.method[k]
        priced.values, priced.bounds, priced.learned, priced.method_of = values, bounds, learned, methods
        _check_finite(priced.values, measure_list, priced.ids, priced.withheld)
        priced.columns()
        return priced

    def _price_plain(
        self, proc_name: str, part: Book, measure_list: tuple[str, ...], level_values: tuple[float, ...]
    ) -> _Priced:
        measures = frozenset(measure_list)
        levels = torch.tensor(level_values, dtype=torch.float64)
        process = get_process(proc_name)
        batch = part.option_batch(proc_name)
        served = self.models.get(proc_name)
        priced = _Priced(proc_name, part.id, measure_list, [repr(q) for q in level_values])
        if served is not None:
            ev = served.pricer.evaluate(batch, measures, levels)
            priced.values, priced.bounds, priced.withheld = ev.values, ev.bounds, ev.withheld
            priced.learned = ev.learned.tolist()
            priced.tolerance = served.pricer.tolerance
            if any(priced.learned):
                priced.model = served.name
                priced.identity = {"version": served.version, "content_hash": served.content_hash}
        else:
            reference = reference_pricer(process)
            values, stderr = reference_with_error(reference, batch, measures, levels)
            priced.bounds = reference_bounds(reference, process, batch, values, stderr)
            clamp_to_bounds(values, batch, process)
            priced.values = values
            priced.learned = [False] * len(batch)
        _check_finite(priced.values, measure_list, priced.ids, priced.withheld)
        priced.columns()
        return priced


def _with_survival(
    priced: _Priced | None,
    proc_name: str,
    part: Book,
    measure_list: tuple[str, ...],
    level_values: tuple[float, ...],
) -> _Priced:
    """``priced`` (the other measures, or None) with survival 1 for contracts without a
    barrier: exact, so its bound is 0."""
    n = len(part)
    out = _Priced(proc_name, part.id, measure_list, [repr(q) for q in level_values])
    if priced is not None:
        out.values, out.bounds, out.withheld = dict(priced.values), dict(priced.bounds), priced.withheld
        out.learned, out.tolerance, out.model, out.identity = (
            priced.learned,
            priced.tolerance,
            priced.model,
            priced.identity,
        )
        out.method_of = priced.method_of
    else:
        out.learned = [False] * n
        out.method_of = ["analytic"] * n
    out.values["survival"] = torch.ones(n, dtype=torch.float64)
    out.bounds["survival"] = torch.zeros(n, dtype=torch.float64)
    out.columns()
    return out


def barrier_batch_of(book: Book, process: str) -> BarrierBatch:
    """The barrier pricers' batch of a book whose contracts all have a barrier."""
    options = book.option_batch(process)
    assert book.barrier is not None
    barriers = [b for b in book.barrier if b is not None]
    return barrier_batch(
        spot=options.spot,
        strike=options.strike,
        expiry=options.expiry,
        rate=options.rate,
        dividend=options.dividend,
        is_call=options.is_call,
        theta=options.theta,
        level=[b.level for b in barriers],
        rebate=[b.rebate for b in barriers],
        barrier_type=[b.type for b in barriers],
        monitoring=["continuous" if b.dates == 0 else b.dates for b in barriers],
    )


def _empty_answer(r: PriceRequest) -> dict[str, Any]:
    return {
        "namespace": r.namespace,
        "val_datetime": None if r.val_datetime is None else iso(r.val_datetime),
        "data_asof": None if r.data_asof is None else iso(r.data_asof),
        "results": [None] * len(r.contracts),
        "models": {},
        "market_data": None,
    }


@dataclass
class _Priced:
    """One process's part of a group, priced: its values, bounds and withheld measures
    as tensors and as lists, turned into row answers or columns."""

    process: str
    ids: list[str]
    measure_list: tuple[str, ...]
    level_keys: list[str]
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    bounds: dict[str, torch.Tensor] = field(default_factory=dict)
    withheld: dict[str, torch.Tensor] = field(default_factory=dict)
    learned: list[bool] = field(default_factory=list)
    tolerance: Mapping[str, float] = field(default_factory=dict)
    model: str = ""
    identity: dict[str, Any] | None = None
    cols: dict[str, list[Any]] = field(default_factory=dict)
    bound_cols: dict[str, list[Any]] = field(default_factory=dict)
    held: dict[str, list[bool]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    method_of: list[str] | None = None  # per row, where not every row is cvnn or reference

    def columns(self) -> None:
        ml = self.measure_list
        self.cols = {m: self.values[m].tolist() for m in ml}
        self.bound_cols = {m: self.bounds[m].tolist() for m in ml}
        # in the request's order of measures: a row's warnings are the same bytes every run
        w = self.withheld
        self.held = {m: w[m].tolist() for m in ml if m in w and bool(w[m].any())}
        self.methods = (
            self.method_of if self.method_of is not None else ["cvnn" if x else "reference" for x in self.learned]
        )

    def warning(self, m: str, k: int) -> str:
        return _withheld_warning(m, self.bound_cols[m][k], self.tolerance, self.process)

    def row(self, k: int) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.ids[k], "model": self.process, "method": self.methods[k]}
        error_bound: dict[str, Any] = {}
        for m in self.measure_list:
            v, b = self.cols[m][k], self.bound_cols[m][k]
            # a NaN bound (no certified figure: an uncertified network served by an engine
            # test, a level outside the certified ones) is null
            if m == "quantiles":
                row[m] = dict(zip(self.level_keys, v, strict=True))
                error_bound[m] = {q: _bound(x) for q, x in zip(self.level_keys, b, strict=True)}
            else:
                row[m] = v
                error_bound[m] = None if math.isnan(b) else b
        row["error_bound"] = error_bound
        for m, mask in self.held.items():
            if mask[k]:
                row.setdefault("warnings", []).append(self.warning(m, k))
                row[m] = None
                error_bound[m] = None
        return row

    def fill(self, table: _AnswerTable, mine: np.ndarray[Any, np.dtype[np.bool_]], at: np.ndarray[Any, Any]) -> None:
        table.fill(mine, at, self.process, self.methods, self.values, self.bounds)
        for m, mask in self.held.items():  # withheld: null with a warning, as in a row
            for k in np.flatnonzero(mine & np.array(mask, dtype=np.bool_)).tolist():
                table.withhold(int(at[k]), m, self.warning(m, k))


FloatArray = np.ndarray[Any, np.dtype[np.float64]]


class _AnswerTable:
    """A columnar answer being filled, one process group at a time."""

    def __init__(self, request: PriceRequest) -> None:
        n = len(request.contracts)
        self.ids = book_of(request).id
        self.model: np.ndarray[Any, np.dtype[np.object_]] = np.full(n, None, dtype=object)
        self.method: np.ndarray[Any, np.dtype[np.object_]] = np.full(n, None, dtype=object)
        self.warnings: list[list[str] | None] = [None] * n
        self.keys = [repr(q) for q in request.levels]
        self.measures = list(request.measures)
        self.values: dict[str, FloatArray] = {}
        self.bounds: dict[str, FloatArray] = {}
        for m in self.measures:
            shape = (n, len(self.keys)) if m == "quantiles" else (n,)
            self.values[m] = np.full(shape, np.nan)
            self.bounds[m] = np.full(shape, np.nan)

    def fill(
        self,
        mine: np.ndarray[Any, np.dtype[np.bool_]],
        at: np.ndarray[Any, np.dtype[np.intp]],
        process: str,
        methods: list[str],
        values: Mapping[str, torch.Tensor],
        bounds: Mapping[str, torch.Tensor],
    ) -> None:
        """The rows of one process group that belong to this request (``mine``), at
        their places ``at`` in the request; ``methods`` is the group's per-row method, as
        in its row answers (``_Priced.methods``)."""
        sel = np.flatnonzero(mine)
        if not len(sel):
            return
        where = at[sel]
        self.model[where] = process
        self.method[where] = np.array(methods, dtype=object)[sel]
        for m in self.measures:
            self.values[m][where] = values[m].cpu().numpy()[sel]
            self.bounds[m][where] = bounds[m].cpu().numpy()[sel]

    def withhold(self, j: int, measure: str, warning: str) -> None:
        self.values[measure][j] = np.nan
        self.bounds[measure][j] = np.nan
        if self.warnings[j] is None:
            self.warnings[j] = []
        got = self.warnings[j]
        assert got is not None
        got.append(warning)

    def columns(self) -> dict[str, Any]:
        cols: dict[str, Any] = {"id": self.ids, "model": self.model.tolist(), "method": self.method.tolist()}
        bound_cols: dict[str, Any] = {}
        for m in self.measures:
            if m == "quantiles":
                for c, key in enumerate(self.keys):
                    cols[f"quantiles.{key}"] = self.values[m][:, c].copy()
                    bound_cols[f"error_bound.quantiles.{key}"] = self.bounds[m][:, c].copy()
            else:
                cols[m] = self.values[m]
                bound_cols[f"error_bound.{m}"] = self.bounds[m]
        cols.update(bound_cols)
        cols["warnings"] = self.warnings
        return cols


def _bound(x: float) -> float | None:
    return None if math.isnan(x) else x


def _withheld_warning(measure: str, bound: Any, tolerance: Mapping[str, float], process: str) -> str:
    """The warning beside a learned measure withheld because its bound passed tolerance."""
    worst = max(bound) if isinstance(bound, list) else bound  # quantiles: the widest level
    tol = tolerance.get(measure, float("nan"))
    limit = f"{tol:g} of the value" if measure in RELATIVE_MEASURES else f"{tol:g} x {UNITS[measure]}"
    figure = "not certified" if math.isnan(worst) else f"{worst:.4g}"  # NaN: the certificate has no figure here
    return (
        f"{measure}: not answered: the model's certified error bound here is {figure}, past the tolerance "
        f"({limit}); the {process} reference is a simulation the server does not run in its place"
    )


def dumps(response: dict[str, Any]) -> bytes:
    """Response bytes: deterministic for the same response."""
    return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
