"""The barrier references (engine/barrier_pricer.py) against QuantLib: accuracy and speed.

1. GBM, continuous monitoring: our closed form (engine/barrier_analytic.py, Reiner-
   Rubinstein) against QuantLib's AnalyticBarrierEngine on N random contracts: S = 100,
   barrier in [0.6, 0.95] S (down) or [1.05, 1.6] S (up), K/F in [0.8, 1.2], T = d/365
   for a whole number of days d in [18, 730] (T in [0.05, 2]), vol in [0.1, 0.6],
   r in [0, 0.05], q in [0, 0.03], the four barrier types x call/put in turn, rebate 0.
   Error = |ours - QuantLib| in basis points of spot. Speed: ours as one batch (price
   only, and all 8 measures), QuantLib one option at a time with one engine reused
   (its spot, rates and vol are quotes the loop sets), each the best of 3 runs.
2. GBM, n = 12 and n = 52 equally spaced monitoring dates: our Monte Carlo (MC_PATHS
   paths in MC_GROUPS groups, bound = 3 standard errors) against the continuous closed
   form at the Broadie-Glasserman-Kou shifted barrier, on a few random contracts drawn
   as in 1. BGK is itself an approximation (error o(1/sqrt n)), worst with the barrier
   within a few steps' standard deviation of spot: the ``dist`` column says how many.
3. Heston, continuous monitoring: our Monte Carlo (QE-M paths, frozen-variance bridge,
   BARRIER_STEPS steps) against QuantLib's FdHestonBarrierEngine on a fine grid (its
   convergence checked against a grid twice as fine in every direction on one case),
   down-and-out and up-and-out calls and puts at the money, barriers 0.8 S and 1.2 S.

Our pricers run on one torch thread (torch.set_num_threads(1)); QuantLib is single-
threaded. Timings vary ~2.5x between VMs: the ratios are what carries over.

    python bench/barrier_reference.py --record     # full run, writes docs/
    python bench/barrier_reference.py --quick      # smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import QuantLib as ql  # noqa: N813 (the library's conventional alias)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, publish, save_figure, table

from spectralmc_server.engine.barrier_analytic import barrier_price, bgk_shifted_level
from spectralmc_server.engine.barrier_mc import BARRIER_TYPES, BarrierBatch, BarrierType
from spectralmc_server.engine.barrier_pricer import (
    BARRIER_MEASURES,
    MC_GROUPS,
    MC_PATHS,
    MC_SE_MULTIPLE,
    BarrierAnswer,
    price_barriers,
)
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.barrier_paths import BARRIER_STEPS, Monitoring

F64 = torch.float64
SPOT = 100.0
BP = 1e4 / SPOT  # money -> basis points of spot
EVAL_DATE = ql.Date(15, 1, 2024)
QL_KIND = {
    "down-and-out": ql.Barrier.DownOut,
    "up-and-out": ql.Barrier.UpOut,
    "down-and-in": ql.Barrier.DownIn,
    "up-and-in": ql.Barrier.UpIn,
}
SHORT = {"down-and-out": "DO", "up-and-out": "UO", "down-and-in": "DI", "up-and-in": "UI"}
FD_GRID = (200, 400, 100)  # FdHestonBarrierEngine (tGrid, xGrid, vGrid)
FD_CHECK_GRID = (400, 800, 200)
T = TypeVar("T")


def best_of(fn: Callable[[], T], repeat: int = 3) -> tuple[float, T]:
    """(the least wall time of ``repeat`` runs in seconds, the last run's result)."""
    best = math.inf
    out = fn()
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x, q)) if len(x) else math.nan


# -- contracts ----------------------------------------------------------------------------


def random_contracts(n: int, seed: int, monitoring: Monitoring = "continuous") -> tuple[BarrierBatch, list[int]]:
    """n GBM contracts (the four types x call/put in turn) and their whole-day expiries."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)

    days = torch.randint(18, 731, (n,), generator=g)
    expiry = days.to(F64) / 365.0
    vol, rate, div = uniform(0.1, 0.6), uniform(0.0, 0.05), uniform(0.0, 0.03)
    kf = uniform(0.8, 1.2)
    down_level, up_level = uniform(0.6, 0.95), uniform(1.05, 1.6)
    i = torch.arange(n)
    types: list[BarrierType] = [BARRIER_TYPES[int(k)] for k in i % 4]
    is_up = torch.tensor([t.startswith("up") for t in types])
    spot = torch.full((n,), SPOT, dtype=F64)
    batch = BarrierBatch(
        spot=spot,
        strike=SPOT * torch.exp((rate - div) * expiry) * kf,
        level=SPOT * torch.where(is_up, up_level, down_level),
        expiry=expiry,
        rate=rate,
        dividend=div,
        rebate=torch.zeros(n, dtype=F64),
        is_call=(i // 4) % 2 == 0,
        theta=vol[:, None],
        barrier_type=tuple(types),
        monitoring=(monitoring,) * n,
    )
    return batch, [int(d) for d in days]


def with_monitoring(batch: BarrierBatch, monitoring: Monitoring) -> BarrierBatch:
    return BarrierBatch(
        spot=batch.spot,
        strike=batch.strike,
        level=batch.level,
        expiry=batch.expiry,
        rate=batch.rate,
        dividend=batch.dividend,
        rebate=batch.rebate,
        is_call=batch.is_call,
        theta=batch.theta,
        barrier_type=batch.barrier_type,
        monitoring=(monitoring,) * len(batch),
    )


def label(batch: BarrierBatch, i: int) -> str:
    return f"{SHORT[batch.barrier_type[i]]} {'call' if bool(batch.is_call[i]) else 'put'}"


# -- 1. GBM continuous: closed form vs AnalyticBarrierEngine --------------------------------


def quantlib_analytic(batch: BarrierBatch, days: Sequence[int]) -> list[float]:
    """AnalyticBarrierEngine prices, one option at a time, one engine whose inputs are
    quotes (flat Actual/365 (Fixed) curves, continuous compounding)."""
    ql.Settings.instance().evaluationDate = EVAL_DATE
    dc = ql.Actual365Fixed()
    spot_q, rate_q, div_q, vol_q = (ql.SimpleQuote(0.0) for _ in range(4))
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(spot_q),
        ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, ql.QuoteHandle(div_q), dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, ql.QuoteHandle(rate_q), dc)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(EVAL_DATE, ql.NullCalendar(), ql.QuoteHandle(vol_q), dc)),
    )
    engine = ql.AnalyticBarrierEngine(process)
    rows = zip(
        batch.spot.tolist(),
        batch.strike.tolist(),
        batch.level.tolist(),
        batch.rate.tolist(),
        batch.dividend.tolist(),
        batch.theta[:, 0].tolist(),
        batch.is_call.tolist(),
        batch.barrier_type,
        days,
        strict=True,
    )
    call, put = ql.Option.Call, ql.Option.Put
    out = []
    for s, k, lvl, r, q, v, c, kind, d in rows:
        spot_q.setValue(s)
        rate_q.setValue(r)
        div_q.setValue(q)
        vol_q.setValue(v)
        option = ql.BarrierOption(
            QL_KIND[kind], lvl, 0.0, ql.PlainVanillaPayoff(call if c else put, k), ql.EuropeanExercise(EVAL_DATE + d)
        )
        option.setPricingEngine(engine)
        out.append(option.NPV())
    return out


@dataclass(frozen=True)
class AnalyticResult:
    n: int
    err_bp: torch.Tensor
    by_type: list[list[object]]
    t_ours: float
    t_ours_all: float
    t_ql: float


def analytic_part(n: int) -> AnalyticResult:
    gbm = get_process("gbm")
    batch, days = random_contracts(n, seed=1)
    t_ours, ours = best_of(lambda: price_barriers(gbm, batch, ["price"]))
    t_all, _ = best_of(lambda: price_barriers(gbm, batch, BARRIER_MEASURES))
    t_ql, ql_prices = best_of(lambda: quantlib_analytic(batch, days))
    if set(ours.method) != {"analytic"}:
        raise SystemExit(f"expected the closed form for every row, got {sorted(set(ours.method))}")
    err = (ours.values["price"] - torch.tensor(ql_prices, dtype=F64)).abs() * BP
    rows: list[list[object]] = [["all", n, quantile(err, 0.5), quantile(err, 0.95), float(err.max())]]
    for kind in BARRIER_TYPES:
        for call in (True, False):
            sel = torch.tensor([t == kind for t in batch.barrier_type]) & (batch.is_call == call)
            e = err[sel]
            name = f"{kind} {'call' if call else 'put'}"
            rows.append([name, len(e), quantile(e, 0.5), quantile(e, 0.95), float(e.max())])
    return AnalyticResult(n, err, rows, t_ours, t_all, t_ql)


# -- 2. GBM discrete: MC vs BGK -------------------------------------------------------------


@dataclass(frozen=True)
class DiscreteResult:
    rows: list[list[object]]
    speed: list[tuple[int, float, float]]  # (n, s per contract price only, all 8 measures)
    ratio: list[float]  # |MC - BGK| / bound, every contract and n
    gap_bp: list[float]
    bound_bp: list[float]
    indep_within: int  # (contract, n) where |MC - indep| <= sqrt(bound^2 + indep bound^2)
    indep_bound_bp: float  # the largest 3-SE bound of the independent MC
    indep_seconds: float


def brute_force(batch: BarrierBatch, dates: int, paths: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent check of the discrete Monte Carlo: exact GBM log-steps at the n dates
    from torch.randn (not the engine's normals), the plain knock indicator, no control
    variate. (prices, 3 standard errors), (B,) each, in money."""
    g = torch.Generator().manual_seed(seed)
    b = len(batch)
    vol = batch.theta[:, 0]
    dt = batch.expiry / dates
    drift = ((batch.rate - batch.dividend - 0.5 * vol * vol) * dt)[:, None, None]
    scale = (vol * torch.sqrt(dt))[:, None, None]
    log_level = torch.log(batch.level / batch.spot)[:, None]
    up = batch.is_up[:, None]
    knock_out = ~batch.is_in[:, None]
    sign = torch.where(batch.is_call, 1.0, -1.0).to(F64)[:, None]
    total = torch.zeros(b, dtype=F64)
    total_sq = torch.zeros(b, dtype=F64)
    chunk = 1 << 14
    for lo in range(0, paths, chunk):
        z = torch.randn(b, min(chunk, paths - lo), dates, generator=g, dtype=F64)
        x = torch.cumsum(drift + scale * z, dim=2)  # log(S_t / S) at the dates
        hit = torch.where(up, (x >= log_level[:, :, None]).any(2), (x <= log_level[:, :, None]).any(2))
        pay = (sign * (batch.spot[:, None] * torch.exp(x[:, :, -1]) - batch.strike[:, None])).clamp(min=0.0)
        pay = pay * torch.where(knock_out, ~hit, hit)
        total += pay.sum(1)
        total_sq += (pay * pay).sum(1)
    mean = total / paths
    var = (total_sq / paths - mean * mean).clamp(min=0.0) * paths / (paths - 1)
    disc = batch.discount
    return disc * mean, 3.0 * disc * torch.sqrt(var / paths)


def discrete_part(n: int, dates: Sequence[int], indep_paths: int) -> DiscreteResult:
    gbm = get_process("gbm")
    base, _ = random_contracts(n, seed=2)
    vol, down = base.theta[:, 0], ~base.is_up
    cols: dict[int, tuple[BarrierAnswer, torch.Tensor, torch.Tensor]] = {}
    speed: list[tuple[int, float, float]] = []
    indep: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    t_indep = 0.0
    for m in dates:
        batch = with_monitoring(base, m)
        t0 = time.perf_counter()
        ans = price_barriers(gbm, batch, ["price"])
        t_price = time.perf_counter() - t0
        t0 = time.perf_counter()
        price_barriers(gbm, batch, BARRIER_MEASURES)
        t_all = time.perf_counter() - t0
        shifted = bgk_shifted_level(base.level, vol, base.expiry, m, down)
        bgk = barrier_price(
            list(base.barrier_type),
            base.is_call,
            base.spot,
            base.strike,
            shifted,
            base.expiry,
            base.rate,
            base.dividend,
            vol,
        )["price"]
        dist = torch.log(base.level / base.spot).abs() / (vol * torch.sqrt(base.expiry / m))
        t0 = time.perf_counter()
        indep[m] = brute_force(batch, m, indep_paths, seed=100 + m)
        t_indep += time.perf_counter() - t0
        cols[m] = (ans, bgk, dist)
        speed.append((m, t_price / n, t_all / n))
    rows: list[list[object]] = []
    ratio, gaps, bounds = [], [], []
    within, indep_bound = 0, 0.0
    for i in range(n):
        row: list[object] = [
            label(base, i),
            float(base.level[i] / SPOT),
            float(base.expiry[i]),
            float(vol[i]),
        ]
        for m in dates:
            ans, bgk, dist = cols[m]
            mc, bound = float(ans.values["price"][i]), float(ans.bounds["price"][i])
            gap = abs(mc - float(bgk[i]))
            ref, ref_bound = float(indep[m][0][i]), float(indep[m][1][i])
            row += [float(dist[i]), mc, bound * BP, gap * BP, abs(mc - ref) * BP]
            within += abs(mc - ref) <= math.hypot(bound, ref_bound)
            indep_bound = max(indep_bound, ref_bound * BP)
            ratio.append(gap / bound if bound > 0 else (0.0 if gap == 0 else math.inf))
            gaps.append(gap * BP)
            bounds.append(bound * BP)
        rows.append(row)
    return DiscreteResult(rows, speed, ratio, gaps, bounds, within, indep_bound, t_indep)


# -- 3. Heston continuous: MC vs FdHestonBarrierEngine ---------------------------------------


@dataclass(frozen=True)
class HestonCase:
    params: tuple[float, float, float, float, float]  # v0, kappa, theta, xi, rho
    set_name: str
    kind: BarrierType
    is_call: bool
    days: int
    rate: float
    dividend: float
    strike: float = SPOT
    spot: float = SPOT

    @property
    def level(self) -> float:
        return 0.8 * self.spot if self.kind.startswith("down") else 1.2 * self.spot

    @property
    def name(self) -> str:
        return f"{self.set_name} {SHORT[self.kind]} {'call' if self.is_call else 'put'}"


SET_A = (0.04, 1.5, 0.04, 0.5, -0.7)
SET_B = (0.0175, 1.5768, 0.0398, 0.5751, -0.5711)  # Fang & Oosterlee (2008)
HESTON_CASES = tuple(
    HestonCase(params, name, kind, call, days, r, q)
    for params, name, days, r, q in ((SET_A, "A", 182, 0.03, 0.01), (SET_B, "B", 365, 0.02, 0.0))
    for call in (True, False)
    for kind in ("down-and-out", "up-and-out")
)
QUICK_HESTON = (HESTON_CASES[0], HESTON_CASES[1])  # set A's down-and-out and up-and-out calls


def heston_batch(case: HestonCase) -> BarrierBatch:
    def one(x: float) -> torch.Tensor:
        return torch.tensor([x], dtype=F64)

    return BarrierBatch(
        spot=one(case.spot),
        strike=one(case.strike),
        level=one(case.level),
        expiry=one(case.days / 365.0),
        rate=one(case.rate),
        dividend=one(case.dividend),
        rebate=one(0.0),
        is_call=torch.tensor([case.is_call]),
        theta=torch.tensor([case.params], dtype=F64),
        barrier_type=(case.kind,),
        monitoring=("continuous",),
    )


def fd_price(case: HestonCase, grid: tuple[int, int, int]) -> float:
    """FdHestonBarrierEngine (its default Hundsdorfer ADI scheme, no damping steps) on
    flat Actual/365 (Fixed) curves."""
    ql.Settings.instance().evaluationDate = EVAL_DATE
    dc = ql.Actual365Fixed()
    rts = ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, case.rate, dc))
    qts = ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, case.dividend, dc))
    v0, kappa, theta, xi, rho = case.params
    process = ql.HestonProcess(rts, qts, ql.QuoteHandle(ql.SimpleQuote(case.spot)), v0, kappa, theta, xi, rho)
    payoff = ql.PlainVanillaPayoff(ql.Option.Call if case.is_call else ql.Option.Put, case.strike)
    option = ql.BarrierOption(QL_KIND[case.kind], case.level, 0.0, payoff, ql.EuropeanExercise(EVAL_DATE + case.days))
    option.setPricingEngine(ql.FdHestonBarrierEngine(ql.HestonModel(process), *grid, 0))
    return float(option.NPV())


@dataclass(frozen=True)
class HestonResult:
    rows: list[list[object]]
    t_mc: list[float]
    t_fd: list[float]
    diff_bp: list[float]
    bound_bp: list[float]
    check: str


def heston_part(cases: Sequence[HestonCase]) -> HestonResult:
    heston = get_process("heston")
    rows: list[list[object]] = []
    t_mc, t_fd, diffs, bounds = [], [], [], []
    for case in cases:
        batch = heston_batch(case)
        t0 = time.perf_counter()
        ans = price_barriers(heston, batch, ["price"])
        t_mc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fd = fd_price(case, FD_GRID)
        t_fd.append(time.perf_counter() - t0)
        mc, bound = float(ans.values["price"][0]), float(ans.bounds["price"][0])
        diffs.append((mc - fd) * BP)
        bounds.append(bound * BP)
        rows.append([case.name, case.days, case.level, mc, bound, fd, diffs[-1], bound * BP, t_mc[-1], t_fd[-1]])
        print(f"  {case.name}: MC {mc:.4f} +- {bound:.4f} ({t_mc[-1]:.1f} s), FD {fd:.4f} ({t_fd[-1]:.1f} s)")
    # the case whose payoff jumps at the barrier (an up-and-out call) converges slowest
    probe = next((c for c in cases if c.kind == "up-and-out" and c.is_call), cases[0])
    coarse = fd_price(probe, FD_GRID)
    t0 = time.perf_counter()
    fine = fd_price(probe, FD_CHECK_GRID)
    t_fine = time.perf_counter() - t0
    check = (
        f"FD convergence on {probe.name}: grid (t, x, v) = {FD_GRID} gives {coarse:.5f}, "
        f"{FD_CHECK_GRID} gives {fine:.5f} ({t_fine:.0f} s): {abs(fine - coarse) * BP:.2g} bp of spot apart."
    )
    return HestonResult(rows, t_mc, t_fd, diffs, bounds, check)


# -- the plot ---------------------------------------------------------------------------------


def draw(path: Path, err_bp: torch.Tensor, speeds: Sequence[tuple[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    floor = 1e-14
    logged = torch.log10(err_bp.clamp(min=floor)).numpy()
    axes[0].hist(logged, bins=50, color="tab:blue")
    axes[0].set_xlabel(f"log10 |closed form - QuantLib| (bp of spot; 0 shown as {floor:g})")
    axes[0].set_ylabel("contracts")
    axes[0].set_title(f"GBM continuous, {len(err_bp):,} random contracts")
    names = [n for n, _ in speeds]
    axes[1].barh(names, [s for _, s in speeds], color="tab:orange")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("seconds per option (log scale)")
    axes[1].invert_yaxis()
    axes[1].set_title("speed, one thread")
    save_figure(fig, path)


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contracts", type=int, default=10_000, help="random GBM contracts against the closed form")
    ap.add_argument("--discrete", type=int, default=16, help="GBM contracts with monitoring dates (MC vs BGK)")
    ap.add_argument(
        "--indep-paths", type=int, default=1 << 20, help="paths of the independent brute-force check of the discrete MC"
    )
    ap.add_argument("--quick", action="store_true", help="small sets: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    cases: Sequence[HestonCase] = HESTON_CASES
    if args.quick:
        args.contracts, args.discrete, args.indep_paths, cases = 500, 4, 1 << 18, QUICK_HESTON
    args.plot = plot_file(args, "barrier_reference.png")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    print("torch threads: 1 (torch.set_num_threads(1)); QuantLib single-threaded")

    # 1.
    a = analytic_part(args.contracts)
    acc_table = table(
        ["GBM continuous: closed form vs AnalyticBarrierEngine", "contracts", "p50 bp", "p95 bp", "max bp"], a.by_type
    )
    n = a.n
    speed_rows: list[list[object]] = [
        ["ours, closed form, one batch, price", n, a.t_ours, a.t_ours / n * 1e6, n / a.t_ours, a.t_ql / a.t_ours],
        [
            "ours, closed form, one batch, all 8 measures",
            n,
            a.t_ours_all,
            a.t_ours_all / n * 1e6,
            n / a.t_ours_all,
            a.t_ql / a.t_ours_all,
        ],
        ["QuantLib AnalyticBarrierEngine, loop, price", n, a.t_ql, a.t_ql / n * 1e6, n / a.t_ql, 1.0],
    ]
    speed_table = table(
        ["engine (best of 3)", "options", "seconds", "us per option", "options/s", "speed vs QuantLib"], speed_rows
    )
    print(acc_table)
    print(speed_table)
    print(f"({time.perf_counter() - t_start:.0f} s so far)")

    # 2.
    dates = (12, 52)
    d = discrete_part(args.discrete, dates, args.indep_paths)
    heads = ["contract", "L/S", "T", "vol"]
    for m in dates:
        heads += [f"dist n={m}", f"MC n={m}", "bound bp", "MC-BGK bp", "MC-indep bp"]
    disc_table = table(heads, d.rows)
    disc_speed = table(
        ["monitoring", "contracts", "s/contract, price", "s/contract, all 8 measures"],
        [[f"n = {m}", args.discrete, tp, ta] for m, tp, ta in d.speed],
    )
    within = sum(r <= 1.0 for r in d.ratio)
    disc_note = (
        f"|MC - BGK| within the MC's bound on {within} of {len(d.ratio)} (contract, n); "
        f"largest |MC - BGK| {max(d.gap_bp):.3g} bp, largest bound {max(d.bound_bp):.3g} bp, "
        f"median |MC - BGK| / bound {sorted(d.ratio)[len(d.ratio) // 2]:.2g}. "
        f"Against the independent brute-force MC ({args.indep_paths:,} paths, its 3 SE at most "
        f"{d.indep_bound_bp:.3g} bp, {d.indep_seconds:.0f} s in all): within the combined bound "
        f"sqrt(bound^2 + its bound^2) on {d.indep_within} of {len(d.ratio)}."
    )
    print(disc_table)
    print(disc_speed)
    print(disc_note)
    print(f"({time.perf_counter() - t_start:.0f} s so far)")

    # 3.
    h = heston_part(cases)
    heston_table = table(
        ["contract", "days", "L", "MC", "+- 3 SE", "FD", "MC-FD bp", "bound bp", "MC s", "FD s"], h.rows
    )
    worst = max(range(len(h.diff_bp)), key=lambda i: abs(h.diff_bp[i]))
    heston_note = (
        f"{h.check} Largest |MC - FD| {abs(h.diff_bp[worst]):.2g} bp ({h.rows[worst][0]}, bound "
        f"{h.bound_bp[worst]:.2g} bp); within the bound on "
        f"{sum(abs(x) <= b for x, b in zip(h.diff_bp, h.bound_bp, strict=True))} of {len(h.diff_bp)}."
    )
    print(heston_table)
    print(heston_note)

    mean_mc, mean_fd = sum(h.t_mc) / len(h.t_mc), sum(h.t_fd) / len(h.t_fd)
    speeds: list[tuple[str, float]] = [
        ("GBM closed form (ours), one batch, price", a.t_ours / n),
        ("GBM closed form (ours), one batch, all 8 measures", a.t_ours_all / n),
        ("GBM AnalyticBarrierEngine (QuantLib), price", a.t_ql / n),
        *[(f"GBM MC (ours), n = {m}, price", tp) for m, tp, _ in d.speed],
        *[(f"GBM MC (ours), n = {m}, all 8 measures", ta) for m, _, ta in d.speed],
        (f"Heston MC (ours), {BARRIER_STEPS} steps, price", mean_mc),
        (f"Heston FdHestonBarrierEngine {FD_GRID}, price", mean_fd),
    ]
    summary_table = table(["method", "seconds per option"], [[name, t] for name, t in speeds])
    print(summary_table)
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")

    body = f"""### Barrier references against QuantLib (`bench/barrier_reference.py`)

Our pricers (engine/barrier_pricer.py `price_barriers`) on one torch thread
(`torch.set_num_threads(1)`), QuantLib (single-threaded) in the same process. Timings vary
about 2.5x between VMs of the same kind: compare the ratios, not the seconds. Total run
{total:.0f} s.

**GBM, continuous monitoring**: the closed form (Reiner-Rubinstein, engine/barrier_analytic.py)
against QuantLib's AnalyticBarrierEngine on {n:,} random contracts: S = 100, barrier in
[0.6, 0.95] S (down) or [1.05, 1.6] S (up), K/F in [0.8, 1.2], T = days/365 in [0.05, 2],
vol in [0.1, 0.6], r in [0, 0.05], q in [0, 0.03], the four types x call/put in turn,
rebate 0. Columns: p50 / p95 / max of |ours - QuantLib| in basis points of spot.

{acc_table}

Speed, best of 3 runs: ours one batch of all {n:,} contracts; QuantLib one option at a time
(a new BarrierOption per contract, one engine reused, its spot, rates and vol set through
quotes). "speed vs QuantLib" = QuantLib's time / the engine's time.

{speed_table}

**GBM, n = 12 and n = 52 monitoring dates**: our Monte Carlo ({MC_PATHS:,} paths in
{MC_GROUPS} groups; its bound is {MC_SE_MULTIPLE:g} standard errors of the group means)
against the continuous closed form at the Broadie-Glasserman-Kou shifted barrier, itself an
approximation (error o(1/sqrt n)), least accurate with the barrier a few steps' standard
deviation from spot: `dist` = |log(L/S)| / (vol sqrt(T/n)). `MC` the price (money, S = 100),
`bound bp` the MC's bound and `MC-BGK bp` the absolute gap, both in bp of spot. As BGK is
not exact, `MC-indep bp` is the absolute gap to an independent brute-force Monte Carlo
({args.indep_paths:,} paths of exact GBM steps at the dates from `torch.randn`, the plain
knock indicator, no control variate), which has no bias of its own.

{disc_table}

{disc_note}

Time per contract, one batch of {args.discrete} contracts per n (the rows share the normals):

{disc_speed}

**Heston, continuous monitoring**: our Monte Carlo ({MC_PATHS:,} paths, QE-M with a
frozen-variance bridge over {BARRIER_STEPS} steps, whose bias bench/barrier_bias.py puts at
about 2 bp of spot at most) against QuantLib's FdHestonBarrierEngine on the grid (t, x, v) =
{FD_GRID}, at the money (K = S = 100), L = 80 (down) or 120 (up), rebate 0.
Set A: v0 = theta = 0.04, kappa 1.5, xi 0.5, rho -0.7, r 3%, q 1%, T = 182/365.
Set B (Fang & Oosterlee 2008): v0 0.0175, kappa 1.5768, theta 0.0398, xi 0.5751,
rho -0.5711, r 2%, q 0, T = 1. `MC` and `+- 3 SE` in money, `MC-FD bp` and `bound bp`
in bp of spot, `MC s` and `FD s` the seconds for that one contract (MC: price only, one
contract per call).

{heston_table}

{heston_note}

Seconds per option by method:

{summary_table}"""
    publish(args, "barrier_reference", lambda p: draw(p, a.err_bp, speeds), body, "barrier_reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
