"""What limits the GBM model's accuracy: noise in the targets, or fitting?

Short training runs with the bundled configuration (default 10,000 steps each), changing
one thing at a time, all scored on the held-out grid of accuracy_gbm.py:

- variance reduction of the MC targets: scrambled Sobol vs pseudo-random normals, with
  and without antithetics;
- no noise at all: the analytic CF as the target (``targets = "exact"``), which bounds
  what fitting alone achieves in the same number of steps;
- fewer or more parameter points per step (the same number of steps).

    python bench/ablation_gbm.py --record
    python bench/ablation_gbm.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_gbm import grid, options
from common import ROOT, output_args, plot_file, quantiles, record, save_figure, table

from spectralmc_server.engine.reference import black_scholes
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.engine.trainer import TrainConfig, Trainer

VARIANTS: dict[str, dict[str, Any]] = {
    "bundled config (sobol + antithetic)": {},
    "sobol, no antithetic": {"antithetic": False},
    "pseudo + antithetic": {"normals_mode": "pseudo"},
    "pseudo, no antithetic": {"normals_mode": "pseudo", "antithetic": False},
    "exact CF targets (no noise)": {"targets": "exact"},
    "B = 16 points per step": {"batch_points": 16},
    "B = 256 points per step": {"batch_points": 256},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "default.toml")
    ap.add_argument("--quick", action="store_true")
    output_args(ap)
    args = ap.parse_args(argv)
    base = tomllib.loads(args.config.read_text())["train"]
    n_vol, n_t = (25, 24)
    if args.quick:
        args.steps, n_vol, n_t = 30, 4, 3
        base = {**base, "network": {**base["network"], "width": 16, "depth": 2}}
    vol, t = grid(n_vol, n_t)
    batch = options(vol, t)
    bs = black_scholes(
        batch.spot, batch.strike, batch.expiry, batch.rate, batch.dividend, batch.theta[:, 0], batch.is_call
    )

    rows: list[list[Any]] = []
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, change in VARIANTS.items():
        cfg = TrainConfig.model_validate(
            {**base, **change, "schedule_steps": args.steps, "validate_every": max(args.steps // 12, 1)}
        )
        trainer = Trainer(cfg)
        t0 = time.perf_counter()
        trainer.run(args.steps)
        seconds = time.perf_counter() - t0
        curves[name] = [(v.step, v.p95_bp) for v in trainer.history]
        served = load_served_model(trainer.checkpoint(), require_certificate=False)
        trainer.close()
        err = (served.pricer.evaluate(batch, frozenset({"price"})).values["price"] - bs["price"]).abs() / 100 * 1e4
        p50, p95, mx = quantiles(err)
        rows.append([name, p50, p95, mx, seconds])
        print(f"{name}: p95 {p95:.2f} bp, max {mx:.2f} bp, {seconds:.0f} s", flush=True)

    result = table(["variant", "held-out p50 bp", "p95 bp", "max bp", "train s"], rows)
    print(result)
    plot_path = plot_file(args, "ablation_gbm.png")
    plot(plot_path, curves)
    print(f"plot: {plot_path}")
    if args.record:
        record(
            "ablation_gbm",
            f"""### What limits accuracy (GBM ablation)

{args.steps} steps per run, the bundled configuration (`config/default.toml`) with one
change per row, scored on the held-out grid of the accuracy benchmark ({len(vol)}
points x 13 strikes x put/call).

{result}

![ablation](img/ablation_gbm.png)
""",
        )
    return 0


def plot(path: Path, curves: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation p95 error, bp of spot")
    ax.set_title("GBM: what limits accuracy")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
