"""Calibrate a process's parameters to a snapshot's implied-volatility surface.

Every node of the underlying's surface (expiry x strike or moneyness) is one quote: its
forward comes from the snapshot's spot and curves, its Black vol from the grid. The
fit runs through the served learned model where one is given (its CF and exact
derivatives in one pass), through COS on the analytic CF otherwise (a process without
one, rough Bergomi, needs its model), with the parameters kept inside the model's
domain. Each process has its start heuristic (STARTS; several starts are screened and
the fit runs from the best). The report gives the fitted parameters and, per quote,
the market vol, the model's implied vol and their difference.

The use case behind ``POST /v1/calibrate``, the ``calibrate`` derive job and
``spectralmc calibrate``; the Levenberg-Marquardt fit itself is engine/fit.py.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson
import torch

from spectralmc_server.engine.fit import (
    CalibrationError,
    CalibrationResult,
    Quotes,
    calibrate,
    heston_start,
    model_prices,
    rbergomi_starts,
)
from spectralmc_server.engine.pricer import REFERENCE_SPECTRUM
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.base import ParameterRange, Process
from spectralmc_server.engine.reference import analytic_cf_y
from spectralmc_server.marketdata.black import NoImpliedVolError, implied_vol
from spectralmc_server.marketdata.objects import MarketSnapshot, ModelParams, VolSurface
from spectralmc_server.pricing.calibratable import (
    CALIBRATABLE,
    CORRECTION_PATHS,
    MAX_CORRECTION_PATHS,
    MAX_CORRECTIONS,
    MIN_CORRECTION_PATHS,
)

if TYPE_CHECKING:  # the served network's modules (and torch) only where a fit runs: lazy_torch.py
    from spectralmc_server.engine.served import ServedModel

StartFunction = Callable[[Quotes, tuple[ParameterRange, ...]], list[dict[str, float]]]


def _heston_starts(quotes: Quotes, bounds: tuple[ParameterRange, ...]) -> list[dict[str, float]]:
    return [heston_start(quotes, bounds)]


# Per calibratable process (pricing/calibratable.py), its starts from the surface: one
# start, or several that the fit screens by their errors (engine/fit.py).
STARTS: dict[str, StartFunction] = {"heston": _heston_starts, "rbergomi": rbergomi_starts}
# Per process, the fit's vega floor as a fraction of the at-the-money vega (engine/fit.py
# Quotes.with_vega_floor). Rough Bergomi's call wing is thin where rho is strongly
# negative and eta large: 1.5 to 2 standard deviations above the money a quote's vega
# is well under 1% of the at-the-money one, so the learned model's price error of about
# 1 bp of the forward there is hundreds of bp of vol (bench/calibration_rbergomi.py).
VEGA_FLOOR: dict[str, float] = {"heston": 0.0, "rbergomi": 0.1}
MIN_QUOTES = 8  # a 5-parameter fit on fewer nodes than this is not worth reporting
MAX_ARBITRAGE_SHOWN = 3
# Reference corrections of a learned fit (calibrate_snapshot ``corrections``; their limits
# are in pricing/calibratable.py): the k-th correction's Monte Carlo on the normals of
# stream CORRECTION_SEED + k.
CORRECTION_SEED = 8_000_000
# A correction's progress hook: called with 0 as a reference pricing starts and with the
# paths it added over all expiries after each of its Monte Carlo chunks, so a caller run
# in slices (engine_service/core.py) pauses or stops there.
Progress = Callable[[int], None]


class SurfaceError(ValueError):
    """The snapshot's surface cannot be calibrated to: missing, arbitrage, outside the model."""


@dataclass(frozen=True)
class QuoteNode:
    expiry_years: float
    strike: float
    forward: float


@dataclass(frozen=True)
class Correction:
    """One reference correction of a learned fit: at ``params`` (the fit so far) the
    process's reference priced every quote; its difference from the learned model's
    price there shifted the quotes, and the model fitted again from ``params``."""

    params: dict[str, float]
    max_abs_shift: float  # the largest |reference - model| over the quotes, in units of the forward
    max_stderr: float  # the reference's largest standard error there (0: an exact reference)
    paths: int | None  # per expiry (a Monte Carlo reference), None for an exact one
    seconds: float

    def describe(self) -> dict[str, Any]:
        return {
            "at": self.params,
            "max_abs_shift": self.max_abs_shift,
            "max_stderr": self.max_stderr,
            "paths": self.paths,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class CalibrationReport:
    underlying: str
    process: str
    method: str  # cvnn (through the learned model) or reference (analytic CF)
    model: dict[str, Any] | None  # name, version, content_hash of the learned model used
    result: CalibrationResult
    nodes: list[QuoteNode]
    quotes: Quotes
    # reference corrections (in order) and the last one's price shift per quote: the
    # model's price of a corrected fit is the learned model's plus this shift
    corrections: tuple[Correction, ...] = ()
    shift: torch.Tensor | None = None

    def model_price(self) -> torch.Tensor:
        """Per quote, the fitted model's price (normalised like Quotes.price): the learned
        model's, plus the last correction's shift where the fit was corrected."""
        return self.result.model_price if self.shift is None else self.result.model_price + self.shift

    def per_quote(self) -> list[dict[str, Any]]:
        out = []
        prices = self.model_price()
        for i, node in enumerate(self.nodes):
            lm = float(self.quotes.log_moneyness[i])
            price = float(prices[i])
            try:
                model_vol: float | None = implied_vol(price, 1.0, math.exp(lm), node.expiry_years, 1.0, lm > 0)
            except NoImpliedVolError:
                model_vol = None
            market = float(self.quotes.vol[i])
            out.append(
                {
                    "expiry_years": node.expiry_years,
                    "strike": node.strike,
                    "forward": node.forward,
                    "market_vol": market,
                    "model_vol": model_vol,
                    "vol_error": None if model_vol is None else model_vol - market,
                }
            )
        return out

    def describe(self) -> dict[str, Any]:
        quotes = self.per_quote()
        errors = [abs(q["vol_error"]) for q in quotes if q["vol_error"] is not None]
        r = self.result
        return {
            "underlying": self.underlying,
            "process": self.process,
            "method": self.method,
            "model": self.model,
            "params": r.params,
            "start": r.start,
            "fit": {
                "quotes": len(quotes),
                "rmse_vol": math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None,
                "max_abs_vol_error": max(errors) if errors else None,
                "iterations": r.iterations,
                "evaluations": r.evaluations,
                "seconds": r.seconds + sum(c.seconds for c in self.corrections),
                "converged": r.converged,
                # only where asked for (the CLI's --corrections): the fit as it always was otherwise
                **({"corrections": [c.describe() for c in self.corrections]} if self.corrections else {}),
            },
            "quotes": quotes,
        }

    def quotes_hash(self) -> str:
        """SHA-256 of the quotes fitted (expiry, strike, forward, market vol per node):
        what the fit depends on, whichever snapshot carried them."""
        nodes = [[n.expiry_years, n.strike, n.forward, float(self.quotes.vol[i])] for i, n in enumerate(self.nodes)]
        return "sha256:" + hashlib.sha256(orjson.dumps(nodes)).hexdigest()

    def model_params(self) -> ModelParams:
        """The fitted set as a snapshot's ``model_params[underlying][process]``.

        Its content depends only on the quotes and the model (no timing, no snapshot
        key, no job name): the same fit stored twice is the same bytes, so jobs that
        refit each other's output settle. Which snapshot it came from is the stored
        record's lineage."""
        d = self.describe()
        fit = {k: d[k] for k in ("method", "model", "start")} | {k: v for k, v in d["fit"].items() if k != "seconds"}
        if "corrections" in fit:
            fit["corrections"] = [{k: v for k, v in c.items() if k != "seconds"} for c in fit["corrections"]]
        fit["quotes_detail"] = d["quotes"]
        fit["fitted_to"] = {"underlying": self.underlying, "quotes_hash": self.quotes_hash()}
        return ModelParams(params=self.result.params, fit=fit)


def surface_quotes(
    snapshot: MarketSnapshot, underlying: str, *, allow_arbitrage: bool = False
) -> tuple[Quotes, list[QuoteNode]]:
    """Every node of ``underlying``'s surface as a quote (expiries in years from the
    snapshot's val_datetime, as the surface stores them)."""
    surface = snapshot.vol_surfaces.get(underlying)
    if surface is None:
        raise SurfaceError(f"no vol surface for {underlying} in the snapshot (vol_surfaces)")
    forward = snapshot.forward_fn(underlying)
    if forward is None:
        raise SurfaceError(f"no forward for {underlying}: the snapshot needs its spot and discounting curve")
    if not allow_arbitrage:
        found = surface.arbitrage(forward)
        if found:
            shown = "; ".join(str(f) for f in found[:MAX_ARBITRAGE_SHOWN])
            more = f" (and {len(found) - MAX_ARBITRAGE_SHOWN} more)" if len(found) > MAX_ARBITRAGE_SHOWN else ""
            raise SurfaceError(
                f"the {underlying} surface has {len(found)} arbitrage violation(s): {shown}{more}; "
                "fix the surface or pass allow_arbitrage"
            )
    nodes: list[QuoteNode] = []
    lms, ts, vols = [], [], []
    for i, t in enumerate(surface.expiries_years):
        f = forward(t)
        for j, x in enumerate(surface.strikes):
            k = x if surface.strike_kind == "strike" else x * f
            nodes.append(QuoteNode(expiry_years=t, strike=k, forward=f))
            lms.append(math.log(k / f))
            ts.append(t)
            vols.append(surface.vols[i][j])
    f64 = torch.float64
    quotes = Quotes.from_vols(torch.tensor(ts, dtype=f64), torch.tensor(lms, dtype=f64), torch.tensor(vols, dtype=f64))
    return quotes, nodes


def calibrate_snapshot(
    snapshot: MarketSnapshot,
    underlying: str,
    process_name: str,
    served: ServedModel | None,
    *,
    allow_arbitrage: bool = False,
    max_iterations: int = 100,
    on_iteration: Callable[[int, int], None] | None = None,
    corrections: int = 0,
    correction_paths: int = CORRECTION_PATHS,
    on_reference: Progress | None = None,
) -> CalibrationReport:
    """Fit ``process_name`` to ``underlying``'s surface (see the module docstring);
    ``on_iteration`` is the optimiser's hook (engine/fit.py). ``corrections`` (a fit
    through a learned model only) corrects it that many times by the process's
    reference (:func:`reference_quote_prices`; the Monte Carlo's ``correction_paths``
    per expiry): the model then fits the quotes less its own error at the fit so far, so
    the fit tends to the reference's own (measured: bench/calibration_rbergomi.py);
    ``on_reference`` is the corrections' progress hook (:data:`Progress`)."""
    if process_name not in CALIBRATABLE:
        raise SurfaceError(f"calibration supports {', '.join(CALIBRATABLE)}, not {process_name!r}")
    if not 0 <= corrections <= MAX_CORRECTIONS:
        raise SurfaceError(f"corrections: 0 to {MAX_CORRECTIONS}, got {corrections}")
    if not MIN_CORRECTION_PATHS <= correction_paths <= MAX_CORRECTION_PATHS:
        raise SurfaceError(
            f"correction paths: {MIN_CORRECTION_PATHS} to {MAX_CORRECTION_PATHS}, got {correction_paths}"
        )
    from spectralmc_server.engine.cvnn import CFModel  # here: imported where torch is not (lazy_torch.py)

    process = get_process(process_name)
    learned = served is not None and isinstance(served.pricer.learned.raw_cf, CFModel)
    if not learned and not process.has_analytic_cf:
        raise SurfaceError(no_reference_fit(process_name))
    quotes, nodes = surface_quotes(snapshot, underlying, allow_arbitrage=allow_arbitrage)
    if len(quotes) < MIN_QUOTES:
        raise SurfaceError(f"the {underlying} surface has {len(quotes)} nodes; calibration needs at least {MIN_QUOTES}")
    model = None
    bounds: tuple[ParameterRange, ...]
    cf: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if served is not None and isinstance(served.pricer.learned.raw_cf, CFModel):
        net = served.pricer.learned.raw_cf
        domain, spectrum = served.domain, served.pricer.learned.spectrum
        lo, hi = domain.ranges[-1].low, domain.ranges[-1].high
        outside = sorted({n.expiry_years for n in nodes if not lo <= n.expiry_years <= hi})
        if outside:
            raise SurfaceError(
                f"surface expiries {', '.join(f'{t:g}' for t in outside)} years lie outside the {served.name} "
                f"model's domain [{lo:g}, {hi:g}]"
            )
        bounds = domain.ranges[:-1]
        cf = net
        tangents = net.forward_with_tangents if net.supports_tangents() else None
        method = "cvnn"
        model = {"name": served.name, "version": served.version, "content_hash": served.content_hash}
    else:
        spectrum = REFERENCE_SPECTRUM
        bounds = process.default_domain().ranges[:-1]
        cf = _analytic_cf(process)
        tangents = None
        method = "reference"
    if corrections and method != "cvnn":
        raise SurfaceError("corrections correct a fit through a learned model; this one is through the reference")
    weighted = quotes.with_vega_floor(VEGA_FLOOR[process_name])

    def fit(q: Quotes, starts: list[dict[str, float]]) -> CalibrationResult:
        return calibrate(
            cf,
            process,
            spectrum,
            q,
            bounds,
            starts,
            max_iterations=max_iterations,
            tangents=tangents,
            on_iteration=on_iteration,
        )

    try:
        result = fit(weighted, STARTS[process_name](quotes, bounds))
        result, done, shift = corrected_fit(
            fit, process_name, result, quotes, weighted, corrections, correction_paths, on_reference
        )
    except CalibrationError as exc:
        raise SurfaceError(str(exc)) from None
    return CalibrationReport(underlying, process_name, method, model, result, nodes, quotes, done, shift)


def corrected_fit(
    fit: Callable[[Quotes, list[dict[str, float]]], CalibrationResult],
    process_name: str,
    result: CalibrationResult,
    quotes: Quotes,
    weighted: Quotes,
    corrections: int,
    paths: int,
    progress: Progress | None = None,
) -> tuple[CalibrationResult, tuple[Correction, ...], torch.Tensor | None]:
    """``result`` corrected ``corrections`` times by the reference (calibrate_snapshot):
    the final fit, the corrections and the last one's price shift per quote."""
    done: list[Correction] = []
    shift: torch.Tensor | None = None
    exact = get_process(process_name).has_analytic_cf
    for k in range(corrections):
        t0 = time.perf_counter()
        ref, stderr = reference_quote_prices(process_name, result.params, quotes, paths, k, progress)
        shift = ref - result.model_price
        at = dict(result.params)
        w = weighted
        result = fit(Quotes(w.expiry, w.log_moneyness, w.price - shift, w.vega, w.vol), [at])
        seconds = time.perf_counter() - t0
        done.append(Correction(at, float(shift.abs().max()), float(stderr.max()), None if exact else paths, seconds))
    return result, tuple(done), shift


ReferencePrices: TypeAlias = (  # a string: this module is imported where torch is not (lazy_torch.py)
    "Callable[[Process, torch.Tensor, Quotes, int, int, Progress | None], tuple[torch.Tensor, torch.Tensor]]"
)


def reference_quote_prices(
    process_name: str,
    params: dict[str, float],
    quotes: Quotes,
    paths: int,
    correction: int = 0,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every quote's out-of-the-money price (normalised like Quotes.price) at ``params``
    by the process's reference (REFERENCE_PRICES), with its standard error; ``progress``
    hears it start and, for a Monte Carlo, its chunks (:data:`Progress`)."""
    process = get_process(process_name)
    theta = torch.tensor([params[n] for n in process.param_names], dtype=torch.float64)
    if progress is not None:
        progress(0)
    return REFERENCE_PRICES[process_name](process, theta, quotes, paths, correction, progress)


def correction_paths_total(process_name: str, expiries: int, paths: int) -> int:
    """The Monte Carlo paths of one correction over a surface of ``expiries`` expiries
    (what its progress hook adds up to): none where the reference is exact."""
    return 0 if get_process(process_name).has_analytic_cf else expiries * paths


def _analytic_prices(
    process: Process, theta: torch.Tensor, quotes: Quotes, paths: int, correction: int, progress: Progress | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """COS on the analytic CF: exact, so standard errors 0 (``paths``, ``correction``
    and ``progress`` unused)."""
    expiries, rows = torch.unique(quotes.expiry, return_inverse=True)
    with torch.no_grad():
        price = model_prices(
            _analytic_cf(process), process, REFERENCE_SPECTRUM, theta, expiries, rows, quotes.log_moneyness
        )
    return price, torch.zeros_like(price)


def _rbergomi_prices(
    process: Process, theta: torch.Tensor, quotes: Quotes, paths: int, correction: int, progress: Progress | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rough Bergomi's reference Monte Carlo (engine/rbergomi_reference.py: the hybrid
    scheme the model learned, mixed estimator with control variates), ``paths`` per
    expiry on the normals of stream CORRECTION_SEED + ``correction``."""
    from spectralmc_server.engine.rbergomi_reference import rbergomi_european_mc

    expiries, rows = torch.unique(quotes.expiry, return_inverse=True)
    # (E, J) log-moneyness, each expiry's quotes in order, a short row padded with its last
    width = int(torch.bincount(rows).max())
    grid = torch.empty(len(expiries), width, dtype=torch.float64)
    slot = torch.zeros_like(rows)  # each quote's place in its expiry's row
    for e in range(len(expiries)):
        at = torch.nonzero(rows == e).flatten()
        slot[at] = torch.arange(len(at))
        vals = quotes.log_moneyness[at]
        grid[e] = torch.cat([vals, vals[-1:].expand(width - len(vals))])
    res = rbergomi_european_mc(
        theta[None, :].expand(len(expiries), -1),
        expiries,
        grid,
        paths,
        is_call=grid > 0,
        seed=CORRECTION_SEED + correction,
        on_chunk=progress,
    )
    return res.price[rows, slot], res.stderr[rows, slot]


# Per calibratable process, the reference that corrects a fit through its learned model.
REFERENCE_PRICES: dict[str, ReferencePrices] = {"heston": _analytic_prices, "rbergomi": _rbergomi_prices}
for _table in (STARTS, VEGA_FLOOR, REFERENCE_PRICES):
    if set(_table) != set(CALIBRATABLE):  # pragma: no cover (a process added to one list only)
        raise ImportError(f"calibration tables {sorted(_table)} differ from CALIBRATABLE {sorted(CALIBRATABLE)}")


def _analytic_cf(process: Process) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The process's analytic CF on the reference spectrum's grid."""
    return functools.partial(analytic_cf_y, process, REFERENCE_SPECTRUM)


def no_reference_fit(process_name: str) -> str:
    """Why ``process_name`` cannot be fitted without its learned model."""
    return f"{process_name} has no analytic characteristic function: calibrating it needs a served {process_name} model"


def model_surface(
    served: ServedModel, params: dict[str, float], expiries: list[float], moneyness: list[float]
) -> VolSurface:
    """The Black vol surface (moneyness K/F x expiry) the served learned model implies at
    ``params``, priced exactly as a calibration through it prices (COS on the network's
    CF): a surface whose fit through the same model must give ``params`` back."""
    from spectralmc_server.engine.cvnn import CFModel

    net = served.pricer.learned.raw_cf
    if not isinstance(net, CFModel):
        raise TypeError(f"the {served.name} model has no learned CF")
    f64 = torch.float64
    rows = [(t, m) for t in expiries for m in moneyness]
    lm = torch.log(torch.tensor([r[1] for r in rows], dtype=f64))
    t_all = torch.tensor([r[0] for r in rows], dtype=f64)
    uniq, index = torch.unique(t_all, return_inverse=True)
    theta = torch.tensor([params[n] for n in served.process.param_names], dtype=f64)
    with torch.no_grad():
        price = model_prices(net, served.process, served.pricer.learned.spectrum, theta, uniq, index, lm)
    vols = [implied_vol(float(price[i]), 1.0, rows[i][1], rows[i][0], 1.0, rows[i][1] > 1.0) for i in range(len(rows))]
    grid = [vols[i * len(moneyness) : (i + 1) * len(moneyness)] for i in range(len(expiries))]
    return VolSurface(strike_kind="moneyness", expiries_years=expiries, strikes=moneyness, vols=grid)


def synthetic_surface(
    process_name: str,
    params: dict[str, float],
    expiries: list[float],
    moneyness: list[float],
    *,
    rate: float = 0.0,
    dividend: float = 0.0,
) -> VolSurface:
    """The Black vol surface (moneyness K/F x expiry) a process implies, priced by COS
    on its analytic CF: the truth a calibration must recover."""
    from spectralmc_server.engine.pricer import OptionBatch
    from spectralmc_server.engine.reference_pricers import reference_pricer

    process = get_process(process_name)
    rows = [(t, m) for t in expiries for m in moneyness]
    f64 = torch.float64
    t = torch.tensor([r[0] for r in rows], dtype=f64)
    fwd = 100.0 * torch.exp(torch.tensor(rate - dividend, dtype=f64) * t)
    strike = fwd * torch.tensor([r[1] for r in rows], dtype=f64)
    is_call = torch.tensor([r[1] > 1.0 for r in rows])
    theta = torch.tensor([[params[n] for n in process.param_names]] * len(rows), dtype=f64)
    n = len(rows)
    batch = OptionBatch(
        spot=torch.full((n,), 100.0, dtype=f64),
        strike=strike,
        expiry=t,
        rate=torch.full((n,), rate, dtype=f64),
        dividend=torch.full((n,), dividend, dtype=f64),
        is_call=is_call,
        theta=theta,
    )
    price = reference_pricer(process).evaluate(batch, frozenset({"price"}))["price"]
    vols = [
        implied_vol(
            float(price[i]), float(fwd[i]), float(strike[i]), rows[i][0], math.exp(-rate * rows[i][0]), bool(is_call[i])
        )
        for i in range(n)
    ]
    grid = [vols[i * len(moneyness) : (i + 1) * len(moneyness)] for i in range(len(expiries))]
    return VolSurface(strike_kind="moneyness", expiries_years=expiries, strikes=moneyness, vols=grid)
