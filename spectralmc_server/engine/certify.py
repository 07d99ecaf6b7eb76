"""Certificates: a learned model's measured error over its whole domain, and the error
bound every answer it gives carries.

A certificate is made once per model version (at commit, or on demand with
``spectralmc store certify N``) from held-out points that no training or validation
draw uses: ``points`` parameter points (at least 4,096) from a scrambled Sobol sequence
with seed ``CERT_SEED`` over the model's domain, each with ``STRIKES_PER_POINT``
strikes across the model's certified moneyness range (one in each equal slice of
log K/F, at a random place in its slice), and every measure the server answers
(price, Greeks, digital, the distribution moments and quantiles at ``CERT_LEVELS``).
Each contract is compared with the process's truth: the closed forms (GBM), COS on the
analytic characteristic function (Heston, Merton) or the process's Monte-Carlo
reference (the arithmetic Asian, rough Bergomi), whose own standard error is added to
the observed error (three standard errors: the figure covers the learned error whenever
the reference is within 3 SE of the truth). Where that noise makes up a large part of
the worst errors (the worst 0.1% of a measure's, 3 SE at least a quarter of the error),
the points holding them are priced again with 16 times the paths (a quarter of the
standard error): the tail of a certificate, which its quality gate's ``max`` reads, is
then the model's error rather than the truth's noise (:func:`refine_truth`).

Errors are normalised by the measure's scale (:func:`measure_units`): price, vega,
theta and rho per unit of D F (the discounted forward, spot for a European without
dividends), delta per D F / S, gamma per D F / S^2, the digital per D, the mean, stdev
and quantiles per unit of F, skew and kurtosis as they are. With spot 1 and no rates
(how the points are priced), the normalised error of a price is its error in units of
spot: 1e-4 is one basis point.

A contract's bound is (error scale) x (cell figure) x (its unit), at least FLOOR x unit:

- The error scale: a least-squares fit of log(error) on a cubic in every domain
  coordinate and, for strike-dependent measures, log K/F (:func:`fit_scale`). It
  follows how the error grows and shrinks along all the dimensions, including those
  the cells do not split on (Heston's kappa, theta, xi, rho; Merton's jumps).
- The cells: ``GRID`` x ``GRID`` over the model's two main dimensions (its vol
  parameter and expiry, in the domain's sampling coordinates), times ``BANDS`` bands of
  log K/F for strike-dependent measures (or the certified quantile levels). A cell's
  figure is the ``COVERAGE`` (99.5%) quantile of the errors in it divided by their
  fitted scale, times ``MARGIN`` (1.1).

The cells make the bound hold where the scale model is off; the scale model keeps the
bound close to the error (a constant bound per cell would sit 10-30x above the median
error of a model with six parameters). The coverage this gives on fresh points and
market inputs is measured by ``bench/certify.py`` and ``tests/engine/test_certify.py``
(the target: the truth inside the bound for at least 99% of contracts anywhere in the
domain).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spectralmc_server.engine.certificate import (
    BANDS,
    CERT_FORMAT,
    CERT_LEVELS,
    COVERAGE,
    FLOOR,
    GRID,
    MARGIN,
    STRIKE_MEASURES,
    UNITS,
    BoundMap,
    CertificateError,
    GateLimit,
    _band_edges,
    _fmt,
    band_index,
    cell_index,
    certificate_hash,
    decode,
    encode,
    features,
    gate_failures,
    main_dims,
    measure_units,
    scale_of,
    summary,
)
from spectralmc_server.engine.checkpoint import CERTIFICATE_FILE
from spectralmc_server.engine.normals import sobol_engine
from spectralmc_server.engine.pricer import (
    DIST_MEASURES,
    MEASURES,
    MOMENT_MAX_SPREAD,
    SPREAD_MEASURES,
    OptionBatch,
)
from spectralmc_server.engine.processes.base import ModelDomain, Process
from spectralmc_server.engine.reference_pricers import reference_with_error

if TYPE_CHECKING:
    from spectralmc_server.engine.pricer import Pricer
    from spectralmc_server.engine.served import ServedModel

log = logging.getLogger(__name__)

# A scramble no training seed (< 2^31) and no validation set (2^31 + 7) uses.
CERT_SEED = 2**31 + 101
# A second scramble, for checking a certificate's coverage on points it never saw.
FRESH_SEED = 2**31 + 202
MIN_POINTS = 4096
STRIKES_PER_POINT = 13
MIN_CELL = 20  # errors a cell needs for its own quantile; thinner cells take their neighbours'
FIT_EPSILON = 1e-9  # keeps log(error) finite where an error is exactly 0
MC_SE_MULTIPLE = 3.0
CERT_MC_PATHS = 8192  # a simulated truth's paths (truth_pricer)
CERT_MC_SEED = 2**31 + 303  # ... and its seed: neither the served reference's nor any training's
# Where a simulated truth's noise dominates a certificate's worst errors, the truth is
# bought again, finer (refine_truth): the parameter points holding the worst REFINE_SHARE
# of a measure's errors, where 3 SE is at least REFINE_SE_SHARE of the error, are priced
# again with REFINE_PATHS paths (a quarter of the standard error) and another seed.
REFINE_SHARE = 0.001
REFINE_SE_SHARE = 0.25
REFINE_PATHS = 16 * CERT_MC_PATHS
REFINE_SEED = 2**31 + 404


def sample(
    process: Process, domain: ModelDomain, points: int, seed: int, *, carry_rates: bool = False
) -> tuple[OptionBatch, torch.Tensor, torch.Tensor]:
    """The held-out book: ``points`` Sobol points x ``STRIKES_PER_POINT`` strikes.
    Returns the batch, the quantile levels, and each contract's point index.

    ``carry_rates``: give each point a rate and dividend in [-2%, 8%] (a fresh book for
    checking that bounds scale with the market inputs as :func:`measure_units` says);
    otherwise spot 1 and no rates, so errors are in units of spot."""
    u = sobol_engine(domain.dims, seed).draw(points, dtype=torch.float64)
    theta, expiry = domain.from_unit(u)
    theta = process.canonical_params(theta)
    low, high = domain.certified_moneyness
    # One strike in each of STRIKES_PER_POINT equal slices of log K/F across the range, at
    # a random place in its slice: every strike of the range is certified, not a grid.
    jitter = torch.rand(points, STRIKES_PER_POINT, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pos = (torch.arange(STRIKES_PER_POINT, dtype=torch.float64) + jitter) / STRIKES_PER_POINT
    kappa = torch.exp(math.log(low) + (math.log(high) - math.log(low)) * pos).flatten()  # (points * J,)
    n = points * STRIKES_PER_POINT
    point = torch.arange(points).repeat_interleave(STRIKES_PER_POINT)
    theta_c, expiry_c = theta[point], expiry[point]
    if carry_rates:
        gen = torch.Generator().manual_seed(seed + 1)
        rate = (-0.02 + 0.10 * torch.rand(points, generator=gen, dtype=torch.float64))[point]
        dividend = (-0.02 + 0.10 * torch.rand(points, generator=gen, dtype=torch.float64))[point]
        spot = torch.exp(torch.randn(points, generator=gen, dtype=torch.float64))[point] * 100.0
    else:
        rate = torch.zeros(n, dtype=torch.float64)
        dividend = torch.zeros(n, dtype=torch.float64)
        spot = torch.ones(n, dtype=torch.float64)
    rate_index = process.rate_parameter()
    if rate_index is not None:  # an Asian's carry is r - q: the market inputs follow it
        carry = theta_c[:, rate_index]
        dividend = rate - carry
    fwd = spot * process.forward_ratio(theta_c, expiry_c, rate, dividend)
    k = kappa
    batch = OptionBatch(
        spot=spot,
        strike=k * fwd,
        expiry=expiry_c,
        rate=rate,
        dividend=dividend,
        is_call=k >= 1.0,  # out of the money: parity makes the call and put errors equal
        theta=theta_c,
    )
    return batch, torch.tensor(CERT_LEVELS, dtype=torch.float64), point


def errors(
    learned: Pricer,
    reference: Pricer,
    process: Process,
    batch: OptionBatch,
    levels: torch.Tensor,
    measures: frozenset[str] = frozenset(MEASURES),
    *,
    refine: Pricer | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Normalised errors |learned - truth| / unit (+ 3 SE of a Monte-Carlo truth), per
    measure ((n,), quantiles (n, Q); NaN where the measure is not served as learned),
    the learned values themselves, and how many parameter points ``refine`` priced
    again: a finer simulated truth for the points where the truth's noise dominates the
    worst errors (:func:`refine_truth`)."""
    got = learned.evaluate(batch, measures, levels)
    truth, stderr = reference_with_error(reference, batch, measures, levels)
    units = measure_units(batch, process)
    refined = 0
    if refine is not None and stderr:
        rows = noisy_worst_rows(got, truth, stderr, units)
        if len(rows):
            start = time.perf_counter()
            truth, stderr, refined = refine_truth(refine, batch, rows, truth, stderr, measures, levels)
            log.info(
                "certify: %d rows where the truth's noise dominates the worst errors; their %d points priced "
                "again with the finer truth in %.1f s",
                len(rows),
                refined,
                time.perf_counter() - start,
            )
    spread_ok = process.scale(batch.theta, batch.expiry) <= MOMENT_MAX_SPREAD
    out: dict[str, torch.Tensor] = {}
    for m in measures:
        unit = units[m] if m != "quantiles" else units[m][:, None]
        err = (got[m] - truth[m]).abs()
        if m in stderr:
            err = err + MC_SE_MULTIPLE * stderr[m]
        e = err / unit
        if m in SPREAD_MEASURES:
            e = torch.where(spread_ok, e, torch.full_like(e, float("nan")))
        out[m] = e
    return out, got, refined


def _point_rows(batch: OptionBatch, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every row sharing a parameter point (process parameters, expiry and market inputs)
    with one of ``rows``, sorted, and the number of those points: a simulated truth
    prices a point's strikes from the same paths, so a point costs what one of its rows
    does."""
    key = torch.cat([batch.theta, torch.stack([batch.expiry, batch.spot, batch.rate, batch.dividend], 1)], 1)
    _, point = torch.unique(key, dim=0, return_inverse=True)
    chosen = torch.zeros(int(point.max()) + 1 if len(point) else 0, dtype=torch.bool)
    chosen[point[rows]] = True
    return torch.nonzero(chosen[point]).flatten(), int(chosen.sum())


def noisy_worst_rows(
    got: Mapping[str, torch.Tensor],
    truth: Mapping[str, torch.Tensor],
    stderr: Mapping[str, torch.Tensor],
    units: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """The rows whose error is among the worst ``REFINE_SHARE`` of some measure's (by
    rank: the ceiling of that share of its finite errors), and of which the truth's
    ``MC_SE_MULTIPLE`` standard errors are at least ``REFINE_SE_SHARE`` (a quantile row
    counts by its worst level; a measure with no standard error, such as the mean F,
    picks none). Sorted indices."""
    picked: list[torch.Tensor] = []
    for m, se in stderr.items():
        if m not in got or m not in truth:
            continue
        unit = units[m] if se.dim() == 1 else units[m][:, None]
        noise = MC_SE_MULTIPLE * se / unit
        e = (got[m] - truth[m]).abs() / unit + noise
        if e.dim() > 1:  # quantiles: a row by its worst level, with that level's noise (-inf: none)
            e, at = torch.where(torch.isfinite(e), e, -math.inf).max(1)
            noise = noise.gather(1, at[:, None])[:, 0]
        ok = torch.nonzero(torch.isfinite(e)).flatten()
        if not len(ok):
            continue
        # the worst ceil(REFINE_SHARE x n) by rank (ties cannot widen the pick), where
        # the noise is there at all and is at least REFINE_SE_SHARE of the error
        worst = ok[torch.topk(e[ok], math.ceil(REFINE_SHARE * len(ok))).indices]
        keep = (noise[worst] > 0) & (noise[worst] >= REFINE_SE_SHARE * e[worst])
        picked.append(worst[keep])
    if not picked:
        return torch.zeros(0, dtype=torch.long)
    rows: torch.Tensor = torch.unique(torch.cat(picked))
    return rows


def refine_truth(
    fine: Pricer,
    batch: OptionBatch,
    rows: torch.Tensor,
    truth: Mapping[str, torch.Tensor],
    stderr: Mapping[str, torch.Tensor],
    measures: frozenset[str],
    levels: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """The truth and its standard errors with every row of the points of ``rows`` priced
    again by ``fine`` (every measure: a row keeps one truth), and the number of those
    points. A Monte-Carlo truth is batch-invariant, so each of those rows gets what
    ``fine`` gives it alone."""
    index, points = _point_rows(batch, rows)
    values, errs = reference_with_error(fine, batch.select(index), measures, levels)
    new_truth = {m: v.clone() for m, v in truth.items()}
    new_stderr = {m: v.clone() for m, v in stderr.items()}
    for m, v in values.items():
        if m in new_truth:
            new_truth[m][index] = v
    for m, v in errs.items():
        if m in new_stderr:
            new_stderr[m][index] = v
    return new_truth, new_stderr, points


def _cell_bounds(e: torch.Tensor, cell: torch.Tensor, n_cells: int) -> list[float | None]:
    """The COVERAGE quantile times MARGIN in each cell (None: too few errors there)."""
    out: list[float | None] = []
    finite = torch.isfinite(e)
    for c in range(n_cells):
        sel = e[(cell == c) & finite]
        out.append(_rule(sel) if len(sel) >= MIN_CELL else None)
    return out


def _rule(errors: torch.Tensor) -> float:
    """A cell's figure from its (scaled) errors: the COVERAGE quantile times MARGIN."""
    return float(torch.quantile(errors, COVERAGE)) * MARGIN


def fit_scale(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Least-squares fit of log(error + FIT_EPSILON) on the features: the error's scale across
    the whole domain, (F,). What the cells do not split on (Heston's kappa, theta, xi and
    rho; Merton's jumps; the strike within a band) it follows; the cells then take a
    quantile of the errors divided by this scale."""
    ok = torch.isfinite(e)
    y = torch.log(e[ok] + FIT_EPSILON)
    coef = torch.linalg.lstsq(x[ok], y[:, None]).solution[:, 0]
    # LAPACK's threaded solve differs from run to run in the last bits (measured: 1e-15
    # relative, or 1e-14 absolute where a coefficient is 0). Kept to 7 significant digits
    # and 9 decimals (of a log), the coefficients, so the cells and the certificate's
    # bytes, are the same every time (a flip needs a coefficient within 1e-14 of a
    # rounding boundary: about 1e-5 per coefficient at worst).
    return torch.tensor([float(f"{round(v, 9):.7g}") + 0.0 for v in coef.tolist()], dtype=torch.float64)


def _fill_thin(bounds: list[float | None], have: list[int], shape: tuple[int, ...]) -> list[float | None]:
    """Thin cells (fewer than MIN_CELL errors, but some) take the largest bound of the
    cells around them: never a bound from too few errors."""
    out = list(bounds)
    t = torch.tensor([math.nan if b is None else b for b in bounds], dtype=torch.float64).reshape(shape)
    counts = torch.tensor(have).reshape(shape)
    for flat, b in enumerate(bounds):
        if b is not None or have[flat] == 0:
            continue
        idx = list(torch.unravel_index(torch.tensor(flat), shape))
        i, j = int(idx[0]), int(idx[1])
        block = t[max(0, i - 1) : i + 2, max(0, j - 1) : j + 2]
        vals = block[torch.isfinite(block)]
        if counts.numel() and len(vals):
            out[flat] = float(vals.max())
        else:
            finite = t[torch.isfinite(t)]
            out[flat] = float(finite.max()) if len(finite) else None
    return out


def _nested(values: list[float | None], shape: tuple[int, ...]) -> Any:
    if len(shape) == 1:
        return values
    step = math.prod(shape[1:])
    return [_nested(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _summary(e: torch.Tensor) -> dict[str, float | None]:
    v = e[torch.isfinite(e)]
    if len(v) == 0:
        return {"p50": None, "p95": None, "max": None, "count": 0}
    q = torch.quantile(v, torch.tensor([0.5, 0.95], dtype=torch.float64))
    return {"p50": float(q[0]), "p95": float(q[1]), "max": float(v.max()), "count": len(v)}


def error_map(
    process: Process,
    domain: ModelDomain,
    batch: OptionBatch,
    errs: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """Per measure: summary figures, the error-scale model's coefficients and the cell
    figures (see the module docstring)."""
    i, j = cell_index(process, domain, batch.theta, batch.expiry)
    cell2 = i * GRID + j
    fwd = batch.spot * process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
    band = band_index(domain, torch.log(batch.strike / fwd))
    x_strike = features(process, domain, batch, strike=True)
    x_plain = features(process, domain, batch, strike=False)
    out: dict[str, Any] = {}
    for m, e in errs.items():
        entry: dict[str, Any] = {"unit": UNITS[m], **_summary(e)}
        if m == "quantiles":
            q = e.shape[1]
            coefs = [fit_scale(x_plain, e[:, lv]) for lv in range(q)]
            r = torch.stack([e[:, lv] / scale_of(x_plain, coefs[lv]) for lv in range(q)], 1)
            bounds: list[float | None] = []
            have: list[int] = []
            for c in range(GRID * GRID):
                for lv in range(q):
                    sel = r[:, lv][(cell2 == c) & torch.isfinite(r[:, lv])]
                    have.append(len(sel))
                    bounds.append(_rule(sel) if len(sel) >= MIN_CELL else None)
            shape: tuple[int, ...] = (GRID, GRID, q)
            entry["scale"] = [[float(v) for v in c] for c in coefs]
        elif m in STRIKE_MEASURES:
            coef = fit_scale(x_strike, e)
            r = e / scale_of(x_strike, coef)
            cell = cell2 * BANDS + band
            bounds = _cell_bounds(r, cell, GRID * GRID * BANDS)
            have = [int(((cell == c) & torch.isfinite(r)).sum()) for c in range(GRID * GRID * BANDS)]
            shape = (GRID, GRID, BANDS)
            entry["scale"] = [float(v) for v in coef]
        else:
            coef = fit_scale(x_plain, e)
            r = e / scale_of(x_plain, coef)
            bounds = _cell_bounds(r, cell2, GRID * GRID)
            have = [int(((cell2 == c) & torch.isfinite(r)).sum()) for c in range(GRID * GRID)]
            shape = (GRID, GRID)
            entry["scale"] = [float(v) for v in coef]
        entry["cells"] = _nested(_fill_thin(bounds, have, shape), shape)
        out[m] = entry
    return out


def heatmap(process: Process, domain: ModelDomain, batch: OptionBatch, e: torch.Tensor) -> dict[str, Any]:
    """The price error (normalised; x 1e4 is bp of spot) by cell of the main dimensions:
    p95 and max per cell, for people (``/ui``, ``store inspect``)."""
    i, j = cell_index(process, domain, batch.theta, batch.expiry)
    cell = i * GRID + j
    p95: list[float | None] = []
    worst: list[float | None] = []
    for c in range(GRID * GRID):
        sel = e[(cell == c) & torch.isfinite(e)]
        p95.append(float(torch.quantile(sel, 0.95)) if len(sel) else None)
        worst.append(float(sel.max()) if len(sel) else None)
    return {"measure": "price", "p95": _nested(p95, (GRID, GRID)), "max": _nested(worst, (GRID, GRID))}


def certify(served: ServedModel, *, points: int = MIN_POINTS, seed: int = CERT_SEED) -> dict[str, Any]:
    """The certificate of a served model (see the module docstring). Deterministic: the
    same model and seed give the same bytes (``encode``), so a certificate can be
    re-made and compared; callers time it themselves."""
    if points < MIN_POINTS:
        raise ValueError(f"a certificate needs at least {MIN_POINTS} points, got {points}")
    process, domain = served.process, served.domain
    batch, levels, _ = sample(process, domain, points, seed)
    truth = truth_pricer(served)
    fine = truth_pricer(served, REFINE_SEED, paths=REFINE_PATHS) if truth is not served.pricer.reference else None
    errs, _, refined = errors(served.pricer.learned, truth, process, batch, levels, refine=fine)
    a, b = main_dims(process, domain)
    ra, rb = domain.ranges[a], domain.ranges[b]
    edges_a = [float(x) for x in ra.from_unit(torch.linspace(0, 1, GRID + 1, dtype=torch.float64))]
    edges_b = [float(x) for x in rb.from_unit(torch.linspace(0, 1, GRID + 1, dtype=torch.float64))]
    return {
        "format": CERT_FORMAT,
        "model_hash": served.content_hash,
        "process": process.name,
        "sample": {
            "generator": "scrambled Sobol (LMS + digital shift)",
            "seed": seed,
            "points": points,
            "strikes_per_point": STRIKES_PER_POINT,
            "moneyness": list(domain.certified_moneyness),
            "levels": list(CERT_LEVELS),
            "truth": truth_name(process),
            **({"refined_points": refined} if fine is not None else {}),
        },
        "rule": {
            "coverage": COVERAGE,
            "margin": MARGIN,
            "min_cell": MIN_CELL,
            "mc_se_multiple": MC_SE_MULTIPLE,
            **(
                {"refine": {"share": REFINE_SHARE, "se_share": REFINE_SE_SHARE, "paths": REFINE_PATHS}}
                if fine is not None
                else {}
            ),
            "floor": FLOOR,
            "grid": GRID,
            "bands": BANDS,
        },
        "cells": {
            "dims": [ra.name, rb.name],
            "edges": [edges_a, edges_b],
            "band_edges": [float(x) for x in torch.exp(_band_edges(domain))],
        },
        "measures": error_map(process, domain, batch, errs),
        "heatmap": heatmap(process, domain, batch, errs["price"]),
    }


def truth_pricer(served: ServedModel, seed: int = CERT_MC_SEED, *, paths: int = CERT_MC_PATHS) -> Pricer:
    """What a certificate compares with: the served reference where it is analytic; for
    a simulated one, the same method with ``paths`` (default ``CERT_MC_PATHS``) paths
    in 8 groups, seeds ``seed + g`` of its own. With the served reference's 65,536 paths
    a certificate's 53,248 contracts would take about 90 minutes on this 2-core CPU (one
    of its 8 groups took 11); with 8,192 paths the truth's larger standard error is
    added to every error (3 SE), so it widens the bounds rather than hiding errors, and
    the points where that noise dominates the worst errors are priced again with
    ``REFINE_PATHS`` (:func:`refine_truth`)."""
    from spectralmc_server.engine.pricer import mc_reference_spectrum
    from spectralmc_server.engine.reference_pricers import MonteCarloReference

    if not isinstance(served.pricer.reference, MonteCarloReference):
        return served.pricer.reference
    spectrum = mc_reference_spectrum(served.process.name)
    return MonteCarloReference(served.process, spectrum, paths=paths, seed=seed)


def truth_name(process: Process) -> str:
    if process.name == "gbm":
        return "Black-Scholes closed forms"
    if process.has_analytic_cf:
        return "COS on the analytic characteristic function (2,048 terms)"
    if process.has_conditional:  # engine/reference.py forward_controlled_cf_y
        return (
            f"Monte Carlo reference (COS on the mixed CF estimate, the conditional forward as a control variate, "
            f"{CERT_MC_PATHS:,} paths in 8 groups: value and standard error; {REFINED}"
        )
    return (
        f"Monte Carlo reference (COS on a simulated CF, {CERT_MC_PATHS:,} paths in 8 groups: value and standard error; "
        f"{REFINED}"
    )


REFINED = f"{REFINE_PATHS:,} paths at the points where its noise dominates the worst errors)"


def certify_dir(path: Path, *, points: int = MIN_POINTS) -> tuple[dict[str, Any], float]:
    """Certify the checkpoint directory ``path`` in place (writes certificate.json through
    an atomic rewrite of the directory); returns the certificate and the seconds taken."""
    from dataclasses import replace

    from spectralmc_server.engine.checkpoint import read_dir, write_dir
    from spectralmc_server.engine.served import load_served_model

    ckpt = read_dir(path)
    served = load_served_model(ckpt, require_certificate=False)
    start = time.perf_counter()
    cert = certify(served, points=points)
    elapsed = time.perf_counter() - start
    write_dir(replace(ckpt, certificate=cert), path)
    return cert, elapsed


def main(argv: list[str] | None = None) -> int:
    """``python -m spectralmc_server.engine.certify DIR...``: certify checkpoint
    directories in place (how the bundled models' certificates are made)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m spectralmc_server.engine.certify", description=main.__doc__)
    ap.add_argument("dirs", nargs="+", type=Path, help="checkpoint directories")
    ap.add_argument("--points", type=int, default=MIN_POINTS, help=f"parameter points (at least {MIN_POINTS})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for d in args.dirs:
        cert, elapsed = certify_dir(d, points=args.points)
        print(f"{d}: certified in {elapsed:.1f} s ({certificate_hash(cert)})")
        for m, v in cert["measures"].items():
            figures = " ".join(f"{k} {_fmt(v.get(k))}" for k in ("p50", "p95", "max"))
            print(f"  {m:10s} {figures}  ({v['unit']})")
    return 0


__all__ = [
    "BANDS",
    "CERTIFICATE_FILE",
    "CERT_FORMAT",
    "CERT_LEVELS",
    "CERT_SEED",
    "COVERAGE",
    "DIST_MEASURES",
    "FRESH_SEED",
    "GRID",
    "MARGIN",
    "MIN_POINTS",
    "BoundMap",
    "CertificateError",
    "GateLimit",
    "certificate_hash",
    "certify",
    "decode",
    "encode",
    "errors",
    "gate_failures",
    "measure_units",
    "sample",
    "summary",
]


if __name__ == "__main__":
    raise SystemExit(main())
