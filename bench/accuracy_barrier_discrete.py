"""Accuracy and speed of the learned GBM discrete-monitoring barrier law against the
reference Monte Carlo, with the Broadie-Glasserman-Kou shifted closed form beside it.

The ``gbm_barrier_discrete`` law (spectralmc_server/models/barrier/gbm_barrier_discrete,
trained with config/gbm_barrier_discrete.toml) learns the defective CF of X = log(S_T / F)
on the paths that were on the surviving side of the barrier at each of n equally spaced
dates (engine/processes/gbm_barrier_discrete.py); COS prices knock-outs from it and
knock-ins come by in-out parity against the Black-Scholes vanilla (engine/barrier_learned.py).

Held-out set: P parameter points from a Sobol sequence with its own scramble, each with
10 strikes (P x 10 options; 1,000 points by default, so 10,000 options): S = 1, vol in
[0.05, 1] (log), T in [0.05, 3] years (log), r in [-1%, 6%], q in [0, 4%], the barrier L/S
in [0.6, 0.95] (down) or [1.05, 1.6] (up), all four types, n in [1, 64] dates (log,
rounded), and per strike K/F in [0.8, 1.2] and call or put, no rebate.

Truth: the control-variate Monte Carlo (``discrete_out_mc``: antithetic normals, the
continuous knock-out on the same paths as control, its mean the closed form) with
--paths paths a point; its standard error is reported apart from the error. Error:
|price - truth| in basis points of spot (a knock-in's error is its knock-out's: the
vanilla is exact in both).

    python bench/accuracy_barrier_discrete.py --record      # 10,000 options, writes docs/
    python bench/accuracy_barrier_discrete.py --quick       # 500 options, a smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, publish, quantiles, table

from spectralmc_server.engine.barrier_analytic import barrier_price, bgk_shifted_level
from spectralmc_server.engine.barrier_learned import learned_barrier_prices
from spectralmc_server.engine.barrier_mc import BARRIER_TYPES, BarrierBatch, BarrierType
from spectralmc_server.engine.barrier_pricer import MC_PATHS, price_barriers
from spectralmc_server.engine.checkpoint import read_dir, run_facts
from spectralmc_server.engine.normals import sobol_engine
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.barrier_paths import Monitoring
from spectralmc_server.engine.processes.gbm_barrier_discrete import MAX_DATES, discrete_out_mc
from spectralmc_server.engine.reference import black_scholes
from spectralmc_server.engine.served import load_cf_model
from spectralmc_server.models import bundled_barrier_models

F64 = torch.float64
HELD_OUT_SEED = 2**31 + 211  # a scramble neither training (< 2^31) nor validation uses
STRIKES = 10  # options per parameter point
TRUTH_SEED = 2**31 + 212


def held_out(points: int) -> tuple[BarrierBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """P x STRIKES options, point-major; also the points' canonical theta (P, 5) of the
    law, their T (P,), and log(K/F) (P, STRIKES)."""
    u = sobol_engine(7 + 2 * STRIKES, HELD_OUT_SEED).draw(points, dtype=F64)
    vol = 0.05 * torch.exp(u[:, 0] * math.log(1.0 / 0.05))
    expiry = 0.05 * torch.exp(u[:, 1] * math.log(3.0 / 0.05))
    rate = -0.01 + 0.07 * u[:, 2]
    dividend = 0.04 * u[:, 3]
    kind_index = torch.clamp((u[:, 4] * 4).long(), max=3)
    kinds: list[BarrierType] = [BARRIER_TYPES[int(i)] for i in kind_index]
    up = torch.tensor([k.startswith("up") for k in kinds])
    level = torch.where(up, 1.05 + 0.55 * u[:, 5], 0.6 + 0.35 * u[:, 5])
    dates = torch.round(torch.exp(u[:, 6] * math.log(MAX_DATES))).clamp(1, MAX_DATES)
    kappa = 0.8 + 0.4 * u[:, 7 : 7 + STRIKES]  # (P, S)
    is_call = u[:, 7 + STRIKES :] < 0.5
    carry = rate - dividend
    forward = torch.exp(carry * expiry)

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(STRIKES)

    monitoring: tuple[Monitoring, ...] = tuple(int(n) for n in dates.repeat_interleave(STRIKES))
    batch = BarrierBatch(
        spot=torch.ones(points * STRIKES, dtype=F64),
        strike=(kappa * forward[:, None]).flatten(),
        level=rep(level),
        expiry=rep(expiry),
        rate=rep(rate),
        dividend=rep(dividend),
        rebate=torch.zeros(points * STRIKES, dtype=F64),
        is_call=is_call.flatten(),
        theta=rep(vol)[:, None],
        barrier_type=tuple(k for k in kinds for _ in range(STRIKES)),
        monitoring=monitoring,
    )
    s = vol * torch.sqrt(expiry)
    distance = torch.log(level).abs() / s
    theta = torch.stack([vol, carry, distance, torch.where(up, 1.0, -1.0), dates], 1)
    return batch, theta, expiry, torch.log(kappa)


def vanilla(batch: BarrierBatch) -> torch.Tensor:
    b = batch
    return black_scholes(b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)["price"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--points", type=int, default=1_000, help=f"parameter points, {STRIKES} options each (default 1,000)"
    )
    ap.add_argument("--paths", type=int, default=1 << 16, help="truth's paths a point (default 65,536)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the bundled gbm_barrier_discrete)")
    ap.add_argument("--quick", action="store_true", help="50 points, 2^14 paths: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    points, paths = (50, 1 << 14) if args.quick else (args.points, args.paths)
    torch.set_num_threads(1)
    ckpt = read_dir(args.model or bundled_barrier_models()["gbm_barrier_discrete"])
    model = load_cf_model(ckpt).requires_grad_(False)
    batch, theta, expiry, log_kappa = held_out(points)
    n = len(batch)
    money = torch.exp(-batch.rate * batch.expiry) * torch.exp((batch.rate - batch.dividend) * batch.expiry)  # D F
    t0 = time.perf_counter()
    truth = discrete_out_mc(
        theta, expiry, log_kappa, paths, is_call=batch.is_call.view(points, STRIKES), seed=TRUTH_SEED
    )
    truth_seconds = time.perf_counter() - t0
    van = vanilla(batch)
    out_true = truth["price"].flatten() * money
    true_price = torch.where(batch.is_in, van - out_true, out_true)
    truth_se = truth["se"].flatten() * money * 1e4
    with torch.no_grad():
        learned = learned_barrier_prices(model, batch, van)
    err = (learned["price"] - true_price).abs() * 1e4
    surv_err = (learned["survival"] - truth["survival"].repeat_interleave(STRIKES)).abs() * 1e4

    down = ~batch.is_up
    shifted = bgk_shifted_level(
        batch.level, batch.theta[:, 0], batch.expiry, theta[:, 4].repeat_interleave(STRIKES), down
    )
    bgk = barrier_price(
        list(batch.barrier_type),
        batch.is_call,
        batch.spot,
        batch.strike,
        shifted,
        batch.expiry,
        batch.rate,
        batch.dividend,
        batch.theta[:, 0],
        batch.rebate,
    )["price"]
    bgk_err = (bgk - true_price).abs() * 1e4

    rows: list[list[object]] = []
    dates = theta[:, 4].repeat_interleave(STRIKES)
    groups = {"all": torch.ones(n, dtype=torch.bool)}
    for kind in BARRIER_TYPES:
        groups[kind] = torch.tensor([k == kind for k in batch.barrier_type])
    groups["calls"], groups["puts"] = batch.is_call, ~batch.is_call
    for lo, hi in ((1, 1), (2, 8), (9, 32), (33, MAX_DATES)):
        groups[f"n in [{lo}, {hi}]"] = (dates >= lo) & (dates <= hi)
    for name, mask in groups.items():
        if not bool(mask.any()):
            continue
        p50, p95, mx = quantiles(err[mask])
        _, s95, _ = quantiles(surv_err[mask])
        _, t95, tmx = quantiles(truth_se[mask])
        _, b95, bmx = quantiles(bgk_err[mask])
        rows.append([name, int(mask.sum()), p50, p95, mx, s95, t95, tmx, b95, bmx])
    headers = [
        "options",
        "n",
        "price p50 bp",
        "p95 bp",
        "max bp",
        "survival p95 bp",
        "truth SE p95 bp",
        "truth SE max bp",
        "BGK p95 bp",
        "BGK max bp",
    ]

    # Speed, one torch thread: the learned law on every option at once; the served
    # reference Monte Carlo (engine/barrier_pricer.py, MC_PATHS paths, price only) on a
    # sample, and the time it would take at the model's p95 as its tolerance (3 standard
    # errors = p95: paths, so time, scale as (3 SE / p95)^2).
    def learned_run() -> None:
        with torch.no_grad():
            learned_barrier_prices(model, batch, vanilla(batch))

    learned_run()
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        learned_run()
    learned_us = (time.perf_counter() - t0) / reps / n * 1e6
    sample = torch.arange(0, n, max(1, n // 20))
    part = batch.take(sample)
    gbm = get_process("gbm")
    t0 = time.perf_counter()
    mc = price_barriers(gbm, part, ("price",))
    mc_us = (time.perf_counter() - t0) / len(sample) * 1e6
    _, p95, mx = quantiles(err)
    # 3 SE in bp of spot, their root mean square over the sample (a knock-in of a far
    # barrier has SE 0: the median would hide the options that need the paths)
    mc_bound_bp = float(mc.bounds["price"].square().mean().sqrt()) * 1e4
    at_tol = mc_us * (mc_bound_bp / p95) ** 2
    speed_rows = [
        ["learned law (COS on the defective CF), all options in one batch", learned_us, 1.0],
        [f"reference MC as served ({MC_PATHS:,} paths, 3 SE rms {mc_bound_bp:.1f} bp)", mc_us, mc_us / learned_us],
        [f"reference MC at the law's p95 ({p95:.2f} bp) as its 3 SE", at_tol, at_tol / learned_us],
    ]

    text = table(headers, rows)
    speed = table(["pricer (one torch thread)", "us per option", "x the learned law"], speed_rows)
    print(text)
    print()
    print(speed)
    verdict = (
        f"Targets (p95 <= 5 bp, max <= 25 bp of spot, against the reference MC): p95 {p95:.2f} bp, "
        f"max {mx:.2f} bp: {'met' if p95 <= 5 and mx <= 25 else 'not met'}. The truth's own standard "
        f"error: p95 {quantiles(truth_se)[1]:.2f} bp, max {float(truth_se.max()):.2f} bp "
        f"({paths:,} paths a point, {truth_seconds:.0f} s)."
    )
    print(verdict)
    worst = int(err.argmax())
    note = (
        f"Worst option: {batch.barrier_type[worst]} {'call' if bool(batch.is_call[worst]) else 'put'}, "
        f"n {batch.monitoring[worst]}, vol {float(batch.theta[worst, 0]):.3f}, T {float(batch.expiry[worst]):.3f}, "
        f"L/S {float(batch.level[worst]):.3f}, K/F {float(batch.strike[worst] / batch.forward[worst]):.3f}: "
        f"learned {float(learned['price'][worst]):.6f}, reference {float(true_price[worst]):.6f} "
        f"(SE {float(truth_se[worst]):.2f} bp)."
    )
    print(note)

    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from common import save_figure

        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        jitter = 1.0 + 0.08 * (torch.rand(n, generator=torch.Generator().manual_seed(0)) - 0.5)
        floor = 1e-3  # errors below it (knock-ins of a far barrier: both near 0) drawn at it
        ax[0].scatter(dates * jitter, err.clamp(min=floor), s=3, alpha=0.3, label="learned")
        ax[0].scatter(dates / jitter, bgk_err.clamp(min=floor), s=3, alpha=0.2, label="BGK shifted closed form")
        ax[0].set_xscale("log")
        ax[0].set_yscale("log")
        ax[0].set_xlabel("monitoring dates n")
        ax[0].set_ylabel("|price - reference MC|, bp of spot")
        ax[0].legend()
        ax[0].set_title("gbm_barrier_discrete and BGK against the reference")
        ax[1].hist(err.clamp(min=floor).log10(), bins=60, alpha=0.7, label="learned, |error|")
        positive = truth_se[truth_se > 0]  # 0 where the controls span the payoff (n = 1, a far barrier)
        ax[1].hist(positive.log10(), bins=60, alpha=0.5, label="reference's SE (where > 0)")
        ax[1].set_xlabel("log10 bp of spot")
        ax[1].legend()
        ax[1].set_title(f"{n} held-out options: p95 {p95:.2f} bp, max {mx:.2f} bp")
        save_figure(fig, path)

    args.plot = plot_file(args, "accuracy_barrier_discrete.png")
    run = run_facts(ckpt.manifest)
    state = ckpt.manifest["state"]
    trained_by = run["command"] or "spectralmc train --process gbm_barrier_discrete"
    body = (
        "### Learned GBM discrete-monitoring barrier law (`bench/accuracy_barrier_discrete.py`)\n\n"
        f"The `gbm_barrier_discrete` law against the control-variate reference Monte Carlo on {n:,} "
        f"held-out options ({points:,} parameter points x {STRIKES} strikes): S = 1, vol in [0.05, 1], "
        "T in [0.05, 3], r in [-1%, 6%], q in [0, 4%], K/F in [0.8, 1.2], L/S in [0.6, 0.95] (down) or "
        f"[1.05, 1.6] (up), all four types, calls and puts, n in [1, {MAX_DATES}] monitoring dates. "
        "Errors in bp of spot; knock-ins by in-out parity against Black-Scholes. BGK: the "
        "Broadie-Glasserman-Kou shifted closed form on the same options against the same reference.\n\n"
        f"Model: `{ckpt.content_hash}`, {state['step']} steps, "
        f"{state['paths_simulated']:.2e} paths, {run['elapsed_seconds'] / 60:.1f} min of training "
        f"(`{trained_by}`).\n\n"
        f"{text}\n\n{speed}\n\n{verdict} {note}"
    )
    publish(args, "accuracy_barrier_discrete", draw, body, image="learned GBM discrete barrier errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
