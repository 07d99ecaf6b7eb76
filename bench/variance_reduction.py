"""Variance reduction in the training targets, measured per technique and per process.

Part 1, variance reduction factor (VRF): for P parameter points (a scrambled Sobol set
over each process's default domain) and N paths per point, the FFT estimate of phi_Y is
computed R times from independent normal blocks; its mean squared error against the
analytic CF (over points, frequencies k >= 1 and repetitions) is compared with plain
i.i.d. normals: VRF = MSE(pseudo) / MSE(technique). Techniques: antithetic pairs;
digitally shifted Sobol normals (Heston: in time order, then laid out by the Brownian
bridge); Sobol + bridge + antithetics; the control variate (a Gaussian companion on the
same normals, regression coefficient per frequency, estimated from the same paths);
and everything together. (The unit coefficient, beta = 1, is what the Asian model
trains with: the regression's O(1/N) bias is measured in tests/engine/test_spectrum.py.)

Part 2, accuracy per minute of training: short Heston runs with the same network, seed
and number of steps, targets from (a) i.i.d. normals, (b) Sobol + bridge + antithetics,
(c) (b) plus the control variate; the held-out validation p95 and the time each took.

    python bench/variance_reduction.py --record         # full run (about 10 minutes)
    python bench/variance_reduction.py --quick          # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, record, save_figure, table

from spectralmc_server.engine.cvnn import NetworkConfig
from spectralmc_server.engine.normals import NormalsConfig, NormalsMode, generate_block, sobol_engine
from spectralmc_server.engine.processes import GBMProcess, HestonProcess, MertonProcess
from spectralmc_server.engine.processes.base import Process
from spectralmc_server.engine.reference import analytic_cf_y
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.engine.trainer import TrainConfig, Trainer, mc_targets

SPECTRUM = SpectrumConfig(n_freq=64, half_width=10.0, n_bins=1024)

# name, normals mode, antithetic, bridge (Heston only), control variate
TECHNIQUES: list[tuple[str, NormalsMode, bool, bool, bool]] = [
    ("pseudo (i.i.d.)", "pseudo", False, True, False),
    ("antithetic", "pseudo", True, True, False),
    ("sobol, time order", "sobol_shift", False, False, False),
    ("sobol + bridge", "sobol_shift", False, True, False),
    ("sobol + bridge + antithetic", "sobol_shift", True, True, False),
    ("control variate", "pseudo", False, True, True),
    ("all: sobol + bridge + antithetic + CV", "sobol_shift", True, True, True),
]


def target_mse(
    process: Process, points: int, paths: int, reps: int, mode: NormalsMode, antithetic: bool, cv: bool
) -> float:
    domain = process.default_domain()
    u = sobol_engine(domain.dims, 4242).draw(points, dtype=torch.float64)
    theta, expiry = domain.from_unit(u)
    true = analytic_cf_y(process, SPECTRUM, theta, expiry)  # (P, K)
    total = 0.0
    for r in range(reps):
        cfg = NormalsConfig(
            seed=99, mode=mode, antithetic=antithetic, rows=paths, dims=points * process.normals_per_path
        )
        z = generate_block(cfg, r, torch.device("cpu"))  # (N, P d) float32, as in training
        est = mc_targets(process, SPECTRUM, theta, expiry, z, cv, "regression").to(torch.complex128)
        total += float((est[:, 1:] - true[:, 1:]).abs().square().mean())
    return total / reps


def train_curve(steps: int, mode: NormalsMode, antithetic: bool, cv: bool) -> list[dict[str, Any]]:
    """Validation history of a short Heston run (same seed, network, schedule and steps)."""
    cfg = TrainConfig(
        process="heston",
        batch_points=128,
        paths=256,
        normals_mode=mode,
        antithetic=antithetic,
        control_variate=cv,
        control_coefficient="regression",
        lr=2e-3,
        schedule_steps=steps,
        validate_every=100,
        validation_points=512,
        network=NetworkConfig(width=128, depth=4, head="log_cf", baseline="gaussian"),
    )
    trainer = Trainer(cfg)
    try:
        trainer.run(steps)
        if not trainer.history or trainer.history[-1].step != trainer.step:
            trainer.validate()
        return [v.as_dict() for v in trainer.history]
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=64)
    ap.add_argument("--paths", type=int, default=512)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=1500, help="per Heston training run (0: skip part 2)")
    ap.add_argument("--quick", action="store_true")
    output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.points, args.paths, args.reps, args.train_steps = 8, 64, 2, 20
    processes: list[tuple[str, Process]] = [
        ("gbm", GBMProcess()),
        ("heston", HestonProcess()),
        ("merton", MertonProcess()),
    ]
    rows: list[list[Any]] = []
    vrf: dict[str, list[float]] = {}
    for pname, proc in processes:
        base = None
        for name, mode, anti, bridge, cv in TECHNIQUES:
            p = HestonProcess(bridge=bridge) if pname == "heston" else proc
            if pname == "gbm" and cv:
                continue  # GBM is its own companion: the CV would be exact, not a measurement
            if pname != "heston" and not bridge:
                continue  # the bridge orders a path's normals; GBM and Merton take one step
            mse = target_mse(p, args.points, args.paths, args.reps, mode, anti, cv)
            base = mse if base is None else base
            label = name if pname == "heston" else name.replace(" + bridge", "")
            rows.append([pname, label, mse, base / mse])
            vrf.setdefault(pname, []).append(base / mse)
    vrf_table = table(["process", "targets", "MSE of phi_Y per frequency", "VRF vs i.i.d."], rows)
    print(f"{args.points} points x {args.paths} paths, {args.reps} repetitions, K = {SPECTRUM.n_freq}")
    print(vrf_table)

    curves: dict[str, list[dict[str, Any]]] = {}
    curve_rows: list[list[Any]] = []
    if args.train_steps > 0:
        runs: list[tuple[str, NormalsMode, bool, bool]] = [
            ("i.i.d. normals", "pseudo", False, False),
            ("sobol + bridge + antithetic", "sobol_shift", True, False),
            ("sobol + bridge + antithetic + CV", "sobol_shift", True, True),
        ]
        for label, mode, anti, cv in runs:
            hist = train_curve(args.train_steps, mode, anti, cv)
            curves[label] = hist
            last = hist[-1]
            curve_rows.append([label, last["step"], last["elapsed_seconds"] / 60, last["p95_bp"], last["max_bp"]])
        print(table(["Heston targets", "steps", "minutes", "val p95 bp", "val max bp"], curve_rows))

    plot_path = plot_file(args, "variance_reduction.png")
    plot(plot_path, rows, curves)
    print(f"plot: {plot_path}")
    if args.record:
        curve_table = (
            table(["Heston targets", "steps", "minutes", "val p95 bp", "val max bp"], curve_rows) if curve_rows else ""
        )
        body = f"""### Variance reduction in the training targets

Part 1: the FFT estimate of phi_Y for {args.points} Sobol points over each default domain,
{args.paths} paths per point (float32, as in training), {args.reps} independent blocks;
MSE against the analytic CF over points, frequencies k = 1..63 and repetitions;
VRF = MSE(i.i.d.) / MSE(technique). Heston uses 16 QE-M steps (32 normals per path);
"time order" feeds the Sobol normals to the steps in order, "bridge" lays them out as a
Brownian bridge. The control variate is each process's Gaussian companion on the same
normals (Heston: GBM with Heston's scale driven by rho W_v + sqrt(1 - rho^2) W_perp at T;
Merton: the diffusion part alone), regressed per frequency.

{vrf_table}

Part 2: Heston trained for {args.train_steps} steps per row (B = 128, N = 256, width 128,
depth 4, the same seed and learning-rate schedule), held-out validation error of the EMA
model against COS on the analytic CF (512 Sobol points x 13 strikes); "minutes" is the
run's own training time, so error per minute can be read off with the cost of each
technique included:

{curve_table}

![variance reduction](img/variance_reduction.png)
"""
        record("variance_reduction", body)
    return 0


def plot(path: Path, rows: list[list[Any]], curves: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    labels = [f"{r[0]}: {r[1]}" for r in rows]
    ax1.barh(range(len(rows)), [r[3] for r in rows], color="tab:blue")
    ax1.set_yticks(range(len(rows)), labels, fontsize=7)
    ax1.set_xscale("log")
    ax1.set_xlabel("variance reduction factor vs i.i.d. normals")
    ax1.invert_yaxis()
    for label, hist in curves.items():
        ax2.plot([h["elapsed_seconds"] / 60 for h in hist], [h["p95_bp"] for h in hist], label=label)
    ax2.set_yscale("log")
    ax2.set_xlabel("training time (minutes)")
    ax2.set_ylabel("Heston validation p95, bp of spot")
    if curves:
        ax2.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
