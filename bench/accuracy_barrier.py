"""Accuracy and speed of the learned GBM barrier model against the closed form.

The bundled ``gbm_barrier`` model (spectralmc_server/models/barrier/gbm_barrier, trained
with config/gbm_barrier.toml) learns the defective CF of X = log(S_T / F) on the paths
that never touched a continuously monitored barrier (engine/processes/gbm_barrier.py);
COS prices knock-outs from it and knock-ins come by in-out parity against the
Black-Scholes vanilla (engine/barrier_learned.py).

Held-out set (the issue's): N options from a Sobol sequence with its own scramble, S = 1,
vol in [0.05, 1] (log), T in [0.05, 3] years (log), r in [-1%, 6%], q in [0, 4%], K/F in
[0.8, 1.2], the barrier L/S in [0.6, 0.95] (down) or [1.05, 1.6] (up), all four types,
calls and puts, no rebate. Truth: Reiner-Rubinstein (engine/barrier_analytic.py, itself
checked against QuantLib's AnalyticBarrierEngine to 5e-11 bp by bench/barrier_reference.py).
Error: |price - truth| in basis points of spot; the survival probability's error in bp
(of probability) beside it.

    python bench/accuracy_barrier.py --record        # 10,000 options, writes docs/
    python bench/accuracy_barrier.py --quick         # 2,000 options, a smoke test
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

from spectralmc_server.engine.barrier_analytic import barrier_price
from spectralmc_server.engine.barrier_learned import learned_barrier_prices
from spectralmc_server.engine.barrier_mc import BARRIER_TYPES, BarrierBatch, BarrierType
from spectralmc_server.engine.checkpoint import read_dir, run_facts
from spectralmc_server.engine.normals import sobol_engine
from spectralmc_server.engine.processes.barrier_paths import Monitoring
from spectralmc_server.engine.reference import black_scholes
from spectralmc_server.engine.served import load_cf_model
from spectralmc_server.models import bundled_barrier_models

F64 = torch.float64
HELD_OUT_SEED = 2**31 + 101  # a scramble neither training (< 2^31) nor validation uses


def held_out(n: int) -> BarrierBatch:
    """n options, the issue's held-out domain."""
    u = sobol_engine(8, HELD_OUT_SEED).draw(n, dtype=F64)
    vol = 0.05 * torch.exp(u[:, 0] * math.log(1.0 / 0.05))
    expiry = 0.05 * torch.exp(u[:, 1] * math.log(3.0 / 0.05))
    rate = -0.01 + 0.07 * u[:, 2]
    dividend = 0.04 * u[:, 3]
    kappa = 0.8 + 0.4 * u[:, 4]
    kind_index = torch.clamp((u[:, 5] * 4).long(), max=3)
    kinds: tuple[BarrierType, ...] = tuple(BARRIER_TYPES[int(i)] for i in kind_index)
    up = torch.tensor([k.startswith("up") for k in kinds])
    level = torch.where(up, 1.05 + 0.55 * u[:, 6], 0.6 + 0.35 * u[:, 6])
    is_call = u[:, 7] < 0.5
    spot = torch.ones(n, dtype=F64)
    forward = torch.exp((rate - dividend) * expiry)
    continuous: Monitoring = "continuous"
    monitoring = (continuous,) * n
    return BarrierBatch(
        spot=spot,
        strike=kappa * forward,
        level=level.to(F64),
        expiry=expiry.to(F64),
        rate=rate.to(F64),
        dividend=dividend.to(F64),
        rebate=torch.zeros(n, dtype=F64),
        is_call=is_call,
        theta=vol.to(F64)[:, None],
        barrier_type=kinds,
        monitoring=monitoring,
    )


def closed_form(batch: BarrierBatch) -> dict[str, torch.Tensor]:
    return barrier_price(
        list(batch.barrier_type),
        batch.is_call,
        batch.spot,
        batch.strike,
        batch.level,
        batch.expiry,
        batch.rate,
        batch.dividend,
        batch.theta[:, 0],
        batch.rebate,
    )


def vanilla(batch: BarrierBatch) -> torch.Tensor:
    b = batch
    return black_scholes(b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)["price"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--options", type=int, default=10_000, help="held-out options (default 10,000)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the bundled gbm_barrier)")
    ap.add_argument("--quick", action="store_true", help="2,000 options: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    n = 2_000 if args.quick else args.options
    torch.set_num_threads(1)
    ckpt = read_dir(args.model or bundled_barrier_models()["gbm_barrier"])
    model = load_cf_model(ckpt).requires_grad_(False)
    batch = held_out(n)
    truth = closed_form(batch)
    van = vanilla(batch)
    with torch.no_grad():
        learned = learned_barrier_prices(model, batch, van)
    err = (learned["price"] - truth["price"]).abs() * 1e4
    surv_err = (learned["survival"] - truth["survival"]).abs() * 1e4
    state = ckpt.manifest["state"]

    rows: list[list[object]] = []
    groups = {"all": torch.ones(n, dtype=torch.bool)}
    for kind in BARRIER_TYPES:
        groups[kind] = torch.tensor([k == kind for k in batch.barrier_type])
    groups["calls"], groups["puts"] = batch.is_call, ~batch.is_call
    for name, mask in groups.items():
        p50, p95, mx = quantiles(err[mask])
        _, s95, smx = quantiles(surv_err[mask])
        rows.append([name, int(mask.sum()), p50, p95, mx, s95, smx])
    headers = ["options", "n", "price p50 bp", "p95 bp", "max bp", "survival p95 bp", "survival max bp"]

    # Speed: the learned model against the closed form, the same 10,000 options, one thread.
    def learned_run() -> None:
        with torch.no_grad():
            learned_barrier_prices(model, batch, vanilla(batch))

    def closed_run() -> None:
        closed_form(batch)

    timings = {}
    pricers = (
        ("learned model (COS on the defective CF)", learned_run),
        ("closed form (Reiner-Rubinstein)", closed_run),
    )
    for label, fn in pricers:
        fn()
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            fn()
        timings[label] = (time.perf_counter() - t0) / reps / n * 1e6
    speed_rows = [[label, us] for label, us in timings.items()]

    text = table(headers, rows)
    speed = table(["pricer (one torch thread, batch of all options)", "us per option"], speed_rows)
    print(text)
    print()
    print(speed)
    p50, p95, mx = quantiles(err)
    verdict = (
        f"Targets (p95 <= 5 bp, max <= 25 bp of spot): p95 {p95:.2f} bp, max {mx:.2f} bp: "
        f"{'met' if p95 <= 5 and mx <= 25 else 'not met'}."
    )
    print(verdict)
    worst = int(err.argmax())
    note = (
        f"Worst option: {batch.barrier_type[worst]} {'call' if bool(batch.is_call[worst]) else 'put'}, "
        f"vol {float(batch.theta[worst, 0]):.3f}, T {float(batch.expiry[worst]):.3f}, "
        f"L/S {float(batch.level[worst]):.3f}, "
        f"K/F {float(batch.strike[worst] / batch.forward[worst]):.3f}: learned {float(learned['price'][worst]):.6f}, "
        f"closed form {float(truth['price'][worst]):.6f}."
    )
    print(note)

    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from common import save_figure

        s = batch.theta[:, 0] * torch.sqrt(batch.expiry)
        distance = torch.log(batch.level / batch.spot) / s
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        ax[0].scatter(distance.clamp(-6, 6), err, s=3, alpha=0.4)
        ax[0].set_xlabel("barrier distance log(L/S) / (vol sqrt(T)), clamped to +-6")
        ax[0].set_ylabel("|learned - closed form|, bp of spot")
        ax[0].set_title("gbm_barrier: error by barrier distance")
        ax[1].hist(err.clamp(min=1e-4).log10(), bins=60)
        ax[1].set_xlabel("log10 error (bp of spot)")
        ax[1].set_title(f"{n} held-out options: p95 {p95:.2f} bp, max {mx:.2f} bp")
        save_figure(fig, path)

    args.plot = plot_file(args, "accuracy_barrier.png")
    run = run_facts(ckpt.manifest)  # command and seconds: in "run", or where older manifests kept them
    trained_by = run["command"] or "spectralmc train --process gbm_barrier"
    body = (
        "### Learned GBM barrier model (`bench/accuracy_barrier.py`)\n\n"
        "The `gbm_barrier` law (not served: the closed form it is measured against is exact and "
        "faster) against Reiner-Rubinstein on the issue's held-out set: S = 1, vol in [0.05, 1], "
        "T in [0.05, 3], r in [-1%, 6%], q in [0, 4%], K/F in [0.8, 1.2], L/S in [0.6, 0.95] (down) "
        "or [1.05, 1.6] (up), all four types, calls and puts, continuous monitoring. Errors in bp "
        "of spot; knock-ins by in-out parity against Black-Scholes.\n\n"
        f"Model: `{ckpt.content_hash}`, {state['step']} steps, "
        f"{state['paths_simulated']:.2e} paths, {run['elapsed_seconds'] / 60:.1f} min of training "
        f"(`{trained_by}`).\n\n"
        f"{text}\n\n{speed}\n\n{verdict} {note}"
    )
    publish(args, "accuracy_barrier", draw, body, image="learned GBM barrier errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
