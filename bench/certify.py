"""Certified answers (issue 17): does each bundled model's certificate bound its learned
answers on contracts it never saw, how tight are the bounds, and what does certifying cost?

Per model (``--models``, default all four bundled ones):

1. Certify the model from scratch, as the server ships it: ``certify(served,
   points=--points)`` (engine/certify.py: ``points`` scrambled Sobol points x 13 strikes,
   every measure against the truth; per cell the 99.5% quantile of error / fitted error
   scale, x 1.1). Timed.
2. Draw a fresh book the certificate never saw: ``sample(..., --fresh-points,
   FRESH_SEED, carry_rates=True)``, other Sobol points, with rates and dividends in
   [-2%, 8%] and spots 100 e^{N(0,1)}, so the scaling of a cell's figure by the
   contract's own unit (``measure_units``) is tested too, not only the cell figures.
3. Price it with the raw network (``served.pricer.learned``), with the truth (closed
   forms for GBM, COS on the analytic CF for Heston and Merton, the grouped Monte-Carlo
   reference with its standard errors for the Asian) and look up every contract's bound
   (``BoundMap(certificate).bounds``).

Coverage of a measure: the fraction of the contracts the learned model would answer it
for (``ModelPricer.servable``: inside the domain and certified K/F range, and a spread
of at most 1 for stdev, skew and kurtosis) with |learned - truth| <= bound. Against a
Monte-Carlo truth a contract counts as covered when |learned - truth| <= bound + 3 SE
(the truth is only known to within its standard error SE). A missing bound (NaN) is a
miss. Strike-free measures (mean, stdev, skew, kurtosis, quantiles) count each point
once, quantiles once per (point, level). The worst cell is the certificate cell (grid
cell x strike band, or x quantile level) of lowest coverage among those holding at
least ``MIN_FRESH_CELL`` fresh contracts; "cells < 99%" counts the cells whose misses
are too many for 99% coverage at the 1% level of a binomial test (a cell of ~100
contracts with two misses is not evidence of a bad bound; one with eight is).

Bounds and errors are quoted per unit of the measure (``UNITS``: a price per D F, so
x 1e4 is bp of the discounted forward, ~spot), the price bound also in bp of spot.
"bound / error" is the median bound over the median realised error (the target: at
most 5). Times are wall-clock seconds on this machine, with beside them a baseline run
in the same process (a fixed float64 matrix product, ``baseline_seconds``) and the
ratio, since one machine's figure differs from another's by 2.5x.

    python bench/certify.py --record          # all four models (takes a while: the Asian)
    python bench/certify.py --models gbm      # one model
    python bench/certify.py --quick           # smoke test: GBM, the least points
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, record, save_figure, table

from spectralmc_server.engine.certificate import (
    BANDS,
    GRID,
    STRIKE_MEASURES,
    UNITS,
    BoundMap,
    band_index,
    cell_index,
    measure_units,
)
from spectralmc_server.engine.certify import (
    CERT_MC_SEED,
    CERT_SEED,
    FRESH_SEED,
    MIN_POINTS,
    STRIKES_PER_POINT,
    certify,
    sample,
    truth_pricer,
)
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.pricer import MEASURES, OptionBatch
from spectralmc_server.engine.reference_pricers import reference_with_error
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.models import bundled_models

F64 = torch.float64
MODELS = ("gbm", "heston", "merton", "asian")
# Issue 17's targets.
TARGET_COVERAGE = 0.99
TARGET_PRICE_BP = {"gbm": 5.0, "merton": 5.0, "heston": 15.0, "asian": 15.0}
TARGET_RATIO = 5.0
TARGET_SECONDS = 60.0  # per closed-form model (the Asian's time is reported)
COVERAGE_MEASURES = ("price", "delta")  # the coverage target names these
MC_SE_MULTIPLE = 3.0
MIN_FRESH_CELL = 20
CELL_P_VALUE = 0.01
# The off-grid book: a quarter of the fresh points, another scramble, strikes anywhere.
OFF_GRID_SHARE = 4
OFF_GRID_SEED = FRESH_SEED + 1
FRESH_MC_SEED = CERT_MC_SEED + 100  # a simulated truth's seeds on the fresh books
BASELINE_SIZE = 1024
BASELINE_PRODUCTS = 16


def baseline_seconds() -> float:
    """A fixed workload for this machine's speed: 16 float64 products of 1024 x 1024
    matrices (34 GFLOP), the median of 3 runs after a warm-up."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(BASELINE_SIZE, BASELINE_SIZE, generator=gen, dtype=F64)
    b = torch.randn(BASELINE_SIZE, BASELINE_SIZE, generator=gen, dtype=F64)

    def work() -> None:
        for _ in range(BASELINE_PRODUCTS):
            torch.mm(a, b)

    work()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def binomial_tail(misses: int, n: int, p: float) -> float:
    """P(X >= misses) for X ~ Binomial(n, p): how surprising a cell's misses are if its
    true coverage were 1 - p."""
    if misses <= 0:
        return 1.0
    total = 0.0
    for k in range(misses, n + 1):
        log_term = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        log_term += k * math.log(p) + (n - k) * math.log1p(-p)
        total += math.exp(log_term)
    return min(1.0, total)


@dataclass
class MeasureResult:
    """Coverage and tightness of one measure's bounds on the fresh book."""

    measure: str
    count: int
    coverage: float
    missing: int  # contracts with no bound (NaN)
    nonfinite: int  # contracts whose learned or true value is not finite (NaN error)
    worst_cell: float
    worst_cell_n: int
    bad_cells: int  # cells whose misses reject 99% coverage (binomial, CELL_P_VALUE)
    cells: int
    median_bound: float
    median_error: float
    p95_error: float
    max_error: float
    worst_miss: float  # max over contracts of error / bound (> 1: outside its bound)

    @property
    def ratio(self) -> float:
        return self.median_bound / self.median_error if self.median_error > 0 else math.inf


@dataclass
class ModelResult:
    name: str
    content_hash: str
    points: int
    fresh_points: int
    baseline_seconds: float  # the fixed workload, just before certifying
    certify_seconds: float
    certify_cpu_seconds: float  # CPU time over all threads (less sensitive to other load)
    learned_seconds: float
    reference_seconds: float
    price_bound_bp: float  # median price bound, bp of spot
    reproduces_bundled: bool | None  # None: no bundled certificate with these points
    measures: dict[str, MeasureResult] = field(default_factory=dict)
    off_grid: dict[str, MeasureResult] = field(default_factory=dict)  # strikes off the 13-strike grid
    certificate: dict[str, Any] = field(default_factory=dict)


def cells_of(served: ServedModel, batch: Any, measure: str, n_levels: int) -> torch.Tensor:
    """Each fresh contract's certificate cell for ``measure`` ((n,), quantiles (n, Q)):
    the same (vol, expiry) grid and strike bands the certificate's figures are kept in."""
    i, j = cell_index(served.process, served.domain, batch.theta, batch.expiry)
    cell = i * GRID + j
    if measure in STRIKE_MEASURES:
        fwd = batch.spot * served.process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
        return cell * BANDS + band_index(served.domain, torch.log(batch.strike / fwd))
    if measure == "quantiles":
        return cell[:, None] * n_levels + torch.arange(n_levels)[None, :]
    return cell


def measure_result(
    m: str, err: torch.Tensor, bound: torch.Tensor, slack: torch.Tensor, unit: torch.Tensor, cell: torch.Tensor
) -> MeasureResult:
    """Figures of one measure over the contracts given (all flattened alike)."""
    covered = err <= bound + slack  # NaN bound or error: a miss
    e, b = err / unit, bound / unit
    finite_b = b[torch.isfinite(b)]
    e = e[torch.isfinite(e)]  # a non-finite learned or true value: a miss, counted apart
    q_err = torch.quantile(e, torch.tensor([0.5, 0.95], dtype=F64)) if len(e) else torch.full((2,), math.nan)
    worst, worst_n, bad, n_cells = 1.0, 0, 0, 0
    for c in torch.unique(cell).tolist():
        sel = cell == c
        n = int(sel.sum())
        if n < MIN_FRESH_CELL:
            continue
        n_cells += 1
        hits = int(covered[sel].sum())
        if hits / n < worst or worst_n == 0:
            worst, worst_n = hits / n, n
        if binomial_tail(n - hits, n, 1.0 - TARGET_COVERAGE) < CELL_P_VALUE:
            bad += 1
    ratio = err / (bound + slack)
    return MeasureResult(
        measure=m,
        count=len(err),
        coverage=float(covered.double().mean()) if len(err) else math.nan,
        missing=int((~torch.isfinite(bound)).sum()),
        nonfinite=int((~torch.isfinite(err)).sum()),
        worst_cell=worst,
        worst_cell_n=worst_n,
        bad_cells=bad,
        cells=n_cells,
        median_bound=float(finite_b.median()) if len(finite_b) else math.nan,
        median_error=float(q_err[0]),
        p95_error=float(q_err[1]),
        max_error=float(e.max()) if len(e) else math.nan,
        worst_miss=float(ratio[torch.isfinite(ratio)].max()) if bool(torch.isfinite(ratio).any()) else math.nan,
    )


def off_grid(process: Any, domain: Any, points: int, seed: int) -> tuple[OptionBatch, torch.Tensor]:
    """A fresh book whose strikes lie anywhere in the certified K/F range, not on the 13
    strikes every certification (and ``sample``) point uses: K/F uniform in log K/F."""
    batch, levels, _ = sample(process, domain, points, seed, carry_rates=True)
    low, high = domain.certified_moneyness
    gen = torch.Generator().manual_seed(seed)
    kappa = torch.exp(
        math.log(low) + (math.log(high) - math.log(low)) * torch.rand(len(batch), generator=gen, dtype=F64)
    )
    fwd = batch.spot * process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
    return replace(batch, strike=kappa * fwd, is_call=kappa >= 1.0), levels


def score(
    served: ServedModel,
    cert: dict[str, Any],
    batch: OptionBatch,
    levels: torch.Tensor,
    measures: tuple[str, ...],
    one_per_point: torch.Tensor,
) -> tuple[dict[str, MeasureResult], float, float, torch.Tensor]:
    """Price ``batch`` with the network and the truth, look up the certificate's bounds:
    the figures per measure, the two pricing times and the price bounds."""
    process, domain = served.process, served.domain
    asked = frozenset(measures)
    t0 = time.perf_counter()
    learned = served.pricer.learned.evaluate(batch, asked, levels)
    learned_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the certificate's truth method, with seeds of its own (a simulated truth's noise on
    # the fresh book is independent of the one the certificate saw)
    truth, stderr = reference_with_error(truth_pricer(served, seed=FRESH_MC_SEED), batch, asked, levels)
    reference_seconds = time.perf_counter() - t0
    bounds = BoundMap(cert, process, domain).bounds(batch, asked, levels)
    units = measure_units(batch, process)
    results: dict[str, MeasureResult] = {}
    for m in measures:
        rows = served.pricer.servable(batch, frozenset({m}))
        if m not in STRIKE_MEASURES:
            rows &= one_per_point
        err = (learned[m] - truth[m]).abs()[rows]
        bound = bounds[m][rows]
        slack = MC_SE_MULTIPLE * stderr[m][rows] if m in stderr else torch.zeros_like(err)
        unit = units[m][rows]
        cell = cells_of(served, batch.select(torch.nonzero(rows).flatten()), m, len(levels))
        if m == "quantiles":
            unit = unit[:, None].expand_as(err)
        results[m] = measure_result(m, err.flatten(), bound.flatten(), slack.flatten(), unit.flatten(), cell.flatten())
    price = bounds["price"].clone()
    price[~served.pricer.servable(batch, frozenset({"price"}))] = math.nan
    return results, learned_seconds, reference_seconds, price


def run_model(name: str, points: int, fresh_points: int) -> ModelResult:
    ckpt = read_dir(bundled_models()[name], need_training=False)
    served = load_served_model(ckpt, require_certificate=False)
    process, domain = served.process, served.domain

    baseline = baseline_seconds()  # just before: the machine's speed at this moment
    t0, c0 = time.perf_counter(), time.process_time()
    cert = certify(served, points=points, seed=CERT_SEED)
    certify_seconds, certify_cpu = time.perf_counter() - t0, time.process_time() - c0
    reproduces: bool | None = None
    bundled = ckpt.certificate
    if bundled is not None and bundled.get("sample", {}).get("points") == points:
        reproduces = bundled["measures"] == cert["measures"]

    batch, levels, _ = sample(process, domain, fresh_points, FRESH_SEED, carry_rates=True)
    first = torch.arange(len(batch)) % STRIKES_PER_POINT == 0  # one row per point
    results, learned_seconds, reference_seconds, price = score(served, cert, batch, levels, MEASURES, first)
    price_bp = float((price / batch.spot).nanmedian()) * 1e4

    strike_measures = tuple(m for m in MEASURES if m in STRIKE_MEASURES)
    off_batch, off_levels = off_grid(process, domain, max(1, fresh_points // OFF_GRID_SHARE), OFF_GRID_SEED)
    off, _, _, _ = score(
        served, cert, off_batch, off_levels, strike_measures, torch.ones(len(off_batch), dtype=torch.bool)
    )
    return ModelResult(
        name=name,
        content_hash=served.content_hash,
        points=points,
        fresh_points=fresh_points,
        baseline_seconds=baseline,
        certify_seconds=certify_seconds,
        certify_cpu_seconds=certify_cpu,
        learned_seconds=learned_seconds,
        reference_seconds=reference_seconds,
        price_bound_bp=price_bp,
        reproduces_bundled=reproduces,
        measures=results,
        off_grid=off,
        certificate=cert,
    )


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def sci(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3g}"


def measure_table(res: ModelResult) -> str:
    rows = []
    for m, r in res.measures.items():
        ratio = "n/a (error 0)" if math.isinf(r.ratio) else f"{r.ratio:.2f}"
        off = res.off_grid.get(m)
        rows.append(
            [
                m,
                UNITS[m],
                r.count,
                pct(r.coverage),
                f"{r.missing} / {r.nonfinite}",
                "n/a" if off is None else f"{pct(off.coverage)} of {off.count}",
                f"{pct(r.worst_cell)} of {r.worst_cell_n}" if r.cells else f"n/a (no cell of {MIN_FRESH_CELL})",
                f"{r.bad_cells} / {r.cells}",
                sci(r.median_bound),
                sci(r.median_error),
                ratio,
                sci(r.p95_error),
                sci(r.max_error),
                sci(r.worst_miss),
            ]
        )
    return table(
        [
            "measure",
            "unit",
            "contracts",
            "coverage",
            "no bound / NaN error",
            "off-grid strikes",
            "worst cell",
            "cells < 99%",
            "median bound",
            "median error",
            "bound / error",
            "p95 error",
            "max error",
            "max error / bound",
        ],
        rows,
    )


def summary_table(results: list[ModelResult]) -> str:
    rows = []
    for r in results:
        low = min(r.measures.values(), key=lambda x: x.coverage)
        finite = [x for x in r.measures.values() if not math.isinf(x.ratio)]
        high = max(finite, key=lambda x: x.ratio)
        rows.append(
            [
                r.name,
                f"{r.points} x {STRIKES_PER_POINT}",
                f"{r.certify_seconds:.1f} s = {r.certify_seconds / r.baseline_seconds:.1f}x baseline "
                f"({r.baseline_seconds:.2f} s); CPU {r.certify_cpu_seconds:.1f} s",
                f"{r.fresh_points} x {STRIKES_PER_POINT}",
                f"{r.learned_seconds:.1f} s / {r.reference_seconds:.1f} s",
                pct(r.measures["price"].coverage),
                pct(r.measures["delta"].coverage),
                f"{pct(low.coverage)} ({low.measure})",
                f"{pct(r.off_grid['price'].coverage)} / {pct(r.off_grid['delta'].coverage)}",
                f"{r.price_bound_bp:.2f} (<= {TARGET_PRICE_BP[r.name]:g})",
                f"{high.ratio:.2f} ({high.measure})",
                "n/a" if r.reproduces_bundled is None else ("yes" if r.reproduces_bundled else "NO"),
            ]
        )
    return table(
        [
            "model",
            "certified on",
            "certification time",
            "fresh book",
            "fresh: learned / truth",
            "price coverage",
            "delta coverage",
            "lowest coverage",
            "off-grid strikes: price / delta",
            "median price bound, bp of spot",
            "largest bound / error",
            "bundled certificate reproduced",
        ],
        rows,
    )


def target_lines(results: list[ModelResult]) -> list[str]:
    """Each of the issue's targets, met or missed, with the figure."""
    out = []
    for r in results:
        for m in COVERAGE_MEASURES:
            c = r.measures[m].coverage
            out.append(f"{r.name} {m} coverage >= 99%: {pct(c)} ({'met' if c >= TARGET_COVERAGE else 'MISSED'})")
        off = [x for x in r.off_grid.values() if x.coverage < TARGET_COVERAGE]
        if off:
            out.append(
                f"{r.name} off-grid strikes (beyond the issue's fresh book) under 99%: "
                + ", ".join(f"{x.measure} {pct(x.coverage)}" for x in off)
            )
        others = [x for x in r.measures.values() if x.measure not in COVERAGE_MEASURES and x.coverage < TARGET_COVERAGE]
        if others:
            out.append(
                f"{r.name} other measures under 99%: " + ", ".join(f"{x.measure} {pct(x.coverage)}" for x in others)
            )
        limit = TARGET_PRICE_BP[r.name]
        out.append(
            f"{r.name} median price bound <= {limit:g} bp of spot: {r.price_bound_bp:.2f} bp "
            f"({'met' if r.price_bound_bp <= limit else 'MISSED'})"
        )
        wide = [x for x in r.measures.values() if not math.isinf(x.ratio) and x.ratio > TARGET_RATIO]
        out.append(
            f"{r.name} median bound <= 5x median error: "
            + (
                "met for every measure"
                if not wide
                else "MISSED for " + ", ".join(f"{x.measure} {x.ratio:.2f}x" for x in wide)
            )
        )
        if r.name == "asian":
            out.append(
                f"asian certification time (reported, no target): {r.certify_seconds:.1f} s wall, "
                f"{r.certify_seconds / r.baseline_seconds:.1f}x baseline, {r.certify_cpu_seconds:.1f} s CPU"
            )
        else:
            ok = r.certify_seconds <= TARGET_SECONDS
            out.append(
                f"{r.name} certification <= 60 s: {r.certify_seconds:.1f} s wall ({'met' if ok else 'MISSED'}), "
                f"{r.certify_seconds / r.baseline_seconds:.1f}x baseline, {r.certify_cpu_seconds:.1f} s CPU"
            )
    return out


def plot(path: Path, results: list[ModelResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = [m for m in MEASURES if m != "mean"]  # the mean is the forward exactly: error 0
    x = torch.arange(len(names), dtype=F64).numpy()
    width = 0.8 / max(1, len(results))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    for k, r in enumerate(results):
        off = x - 0.4 + width * (k + 0.5)
        cov = [100 * r.measures[m].coverage for m in names]
        worst = [100 * r.measures[m].worst_cell if r.measures[m].cells else math.nan for m in names]
        ax1.bar(off, cov, width, label=f"{r.name} (all contracts)")
        ax1.scatter(off, worst, marker="v", color="black", s=14, zorder=3)
        ratio = [r.measures[m].ratio for m in names]
        ax2.bar(off, ratio, width, label=r.name)
    ax1.axhline(100 * TARGET_COVERAGE, color="red", lw=1, label="target 99%")
    ax1.scatter([], [], marker="v", color="black", s=14, label="worst cell")
    lowest = min((100 * r.measures[m].worst_cell for r in results for m in names if r.measures[m].cells), default=90)
    ax1.set_ylim(min(90.0, lowest - 1.0), 100.5)
    ax1.set_ylabel("coverage on the fresh book, %")
    ax1.set_title("Fresh held-out contracts inside their certified bound")
    ax1.legend(fontsize=8, ncol=3, loc="lower left")
    ax2.axhline(TARGET_RATIO, color="red", lw=1, label="target 5x")
    ax2.set_yscale("log")
    ax2.set_ylabel("median bound / median error")
    ax2.set_xticks(x, names, rotation=30)
    ax2.legend(fontsize=8, ncol=5)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated bundled models")
    ap.add_argument("--points", type=int, default=MIN_POINTS, help="certification points (each x 13 strikes)")
    ap.add_argument("--fresh-points", type=int, default=4096, help="fresh held-out points (each x 13 strikes)")
    ap.add_argument("--quick", action="store_true", help="GBM, the least points, a small fresh book: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.points, args.fresh_points = "gbm", MIN_POINTS, 256
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(names) - set(bundled_models())
    if unknown:
        raise SystemExit(f"no bundled model named {sorted(unknown)}")

    results: list[ModelResult] = []
    tables: dict[str, str] = {}
    for name in names:
        res = run_model(name, args.points, args.fresh_points)
        results.append(res)
        tables[name] = measure_table(res)
        print(
            f"\n{name} (hash {res.content_hash[:19]}): certified on {res.points} points in "
            f"{res.certify_seconds:.1f} s ({res.certify_cpu_seconds:.1f} s CPU; baseline {res.baseline_seconds:.2f} s);"
            f" fresh book {res.fresh_points} points: learned "
            f"{res.learned_seconds:.1f} s, truth {res.reference_seconds:.1f} s"
        )
        print(tables[name])
    summary = summary_table(results)
    print(summary)
    targets = target_lines(results)
    for line in targets:
        print("  " + line)

    plot_path = plot_file(args, "certify.png")
    plot(plot_path, results)
    print(f"plot: {plot_path}")

    if args.record:
        sections = "\n\n".join(
            f"#### {r.name}\n\nHash `{r.content_hash}`. Certified on {r.points} points x "
            f"{STRIKES_PER_POINT} strikes in {r.certify_seconds:.1f} s; fresh book of "
            f"{r.fresh_points} points x {STRIKES_PER_POINT} strikes.\n\n{tables[r.name]}"
            for r in results
        )
        rule = (
            "|learned - truth| <= bound + 3 SE of the Monte-Carlo truth"
            if "asian" in names
            else "|learned - truth| <= bound"
        )
        body = f"""### Certified answers: coverage and tightness of the error bounds (issue 17)

Each model is certified from scratch (`certify`, seed `CERT_SEED`), then checked on a
fresh book it never saw (`sample(..., FRESH_SEED, carry_rates=True)`: other Sobol
points, rates and dividends in [-2%, 8%], spots 100 e^N(0,1)). Coverage = the fraction
of contracts the learned model would answer with |learned - truth| <= bound (the
Asian's truth is Monte Carlo: covered when {rule}); a contract with no bound is a
miss, and so is one whose learned or true value is not finite ("NaN error"; the error
quantiles are over the finite ones). Bounds and errors are per unit of the measure
(`UNITS`; a price per D F, so x 1e4 is bp of the discounted forward). Worst cell: the certificate cell (vol x expiry
grid x strike band, or x quantile level) with the lowest coverage among those with at
least {MIN_FRESH_CELL} fresh contracts; cells < 99%: cells whose misses reject 99%
coverage (binomial test at {CELL_P_VALUE:g}). Max error / bound > 1 is how far the worst
miss lies outside its bound.

Off-grid strikes: a second fresh book ({OFF_GRID_SHARE}x fewer points, scramble
`FRESH_SEED + 1`) whose strikes lie anywhere in the certified K/F range (uniform in log
K/F), not on the 13-strike grid that both the certification book and `sample` use; it
is beyond the issue's definition of the fresh book and shows how the bounds hold
between the certified strikes (and across the strike bands' edges).

Times: wall-clock seconds; beside them, the same process's time for a fixed float64
matrix product (16 x 1024^3) measured just before each certification ("baseline"), their
ratio, and the certification's CPU time over all threads (the load other processes put
on the machine changes the wall time, much less the CPU time).

{summary}

Targets:

{chr(10).join("- " + line for line in targets)}

{sections}

![certify](img/certify.png)
"""
        record("certify", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
