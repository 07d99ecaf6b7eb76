"""Speed of GBM pricing: the learned model vs closed form vs COS on the exact CF vs MC.

Two workloads of 10^4 European options, measured in one run on one machine:
  A. distinct: every option has its own (vol, T) (random in the model's domain);
  B. shared:   10^4 strikes over 100 (vol, T) points (100 strikes each).
Engines: the learned model through the public pricer (price only, and price with all
Greeks), the vectorised Black-Scholes closed form, COS on the exact CF with the model's
grid, and plain MC with 10^5 paths. Also MC throughput (paths/s) and training
throughput (parameter points/s and paths/s) with the model's own training config.

    python bench/speed_gbm.py --record
    python bench/speed_gbm.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, record, save_figure, table, timeit

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.pricer import OptionBatch, SpectralPricer
from spectralmc_server.engine.processes import GBMProcess
from spectralmc_server.engine.reference import analytic_cf_y, black_scholes, mc_european
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.models import bundled_models

F64 = torch.float64
PRICE = frozenset({"price"})
GREEKS = frozenset({"price", "delta", "gamma", "vega", "theta", "rho"})


def workload(n: int, n_points: int, seed: int) -> OptionBatch:
    """n options over n_points distinct (vol, T) inside [0.05, 1] x [0.02, 3]."""
    g = torch.Generator().manual_seed(seed)
    vol = 0.05 + 0.95 * torch.rand(n_points, generator=g, dtype=F64)
    t = 0.02 + 2.98 * torch.rand(n_points, generator=g, dtype=F64)
    point = torch.arange(n) % n_points
    return OptionBatch(
        spot=torch.full((n,), 100.0, dtype=F64),
        strike=100.0 * (0.7 + 0.6 * torch.rand(n, generator=g, dtype=F64)),
        expiry=t[point],
        rate=torch.full((n,), 0.03, dtype=F64),
        dividend=torch.full((n,), 0.01, dtype=F64),
        is_call=torch.rand(n, generator=g) < 0.5,
        theta=vol[point][:, None],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled gbm model)")
    ap.add_argument("--options", type=int, default=10_000)
    ap.add_argument("--mc-paths", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.options, args.mc_paths, args.repeat = 500, 2_000, 2
    n = args.options
    ckpt = read_dir(args.model or bundled_models()["gbm"], need_training=False)
    served = load_served_model(ckpt)
    model = served.pricer.learned
    gbm = GBMProcess()
    spec = model.spectrum
    cos = SpectralPricer(gbm, spec, lambda th, t: analytic_cf_y(gbm, spec, th, t))
    cases = {"A distinct (vol, T)": workload(n, n, 1), "B 100 (vol, T) x 100 strikes": workload(n, max(n // 100, 1), 2)}

    results: dict[str, dict[str, float]] = {}
    for case, b in cases.items():
        r: dict[str, float] = {}
        with torch.inference_mode():
            r["model: price"] = timeit(partial(served.pricer.evaluate, b, PRICE), repeat=args.repeat)
        r["model: price + 5 Greeks"] = timeit(
            partial(served.pricer.evaluate, b, GREEKS), repeat=max(args.repeat // 2, 1)
        )
        bs_args = (b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)
        r["closed form (BS)"] = timeit(partial(black_scholes, *bs_args), repeat=args.repeat)
        with torch.inference_mode():
            r["COS on exact CF"] = timeit(partial(cos.evaluate, b, PRICE), repeat=args.repeat)
        log_m = torch.log(b.strike / b.forward)[:, None]
        t0 = time.perf_counter()
        mc_european(gbm, b.theta, b.expiry, log_m, args.mc_paths, is_call=b.is_call[:, None], seed=7)
        r[f"MC {args.mc_paths:.0e} paths"] = time.perf_counter() - t0
        results[case] = r

    names = list(next(iter(results.values())))
    rows = [[name, *(results[c][name] / n * 1e6 for c in cases)] for name in names]
    speed_table = table(["engine", *(f"{c}: us/option" for c in cases)], rows)
    print(f"{n} options per workload")
    print(speed_table)

    # MC throughput: paths per second for one (vol, T) point and one strike.
    b = cases["A distinct (vol, T)"]
    paths_per_s = args.mc_paths * n / results["A distinct (vol, T)"][f"MC {args.mc_paths:.0e} paths"]
    # Training throughput with the model's own training configuration.
    cfg = TrainConfig.model_validate({**ckpt.manifest["training"], "validate_every": 10**9})
    trainer = Trainer(cfg)
    steps = 3 if args.quick else 40
    trainer.run(2)
    t0 = time.perf_counter()
    trainer.run(steps)
    dt = time.perf_counter() - t0
    trainer.close()
    train_rows = [
        ["MC simulation + payoff (A, 10^5 paths)", f"{paths_per_s:.3g} paths/s"],
        ["training step (B x N)", f"{cfg.batch_points} x {cfg.paths}, {dt / steps * 1e3:.1f} ms/step"],
        ["training: parameter points", f"{cfg.batch_points * steps / dt:.3g} points/s"],
        ["training: paths", f"{cfg.batch_points * cfg.paths * steps / dt:.3g} paths/s"],
    ]
    through_table = table(["throughput", "value"], train_rows)
    print(through_table)

    plot_path = plot_file(args, "speed_gbm.png")
    plot(plot_path, results, n)
    print(f"plot: {plot_path}")
    if args.record:
        body = f"""### GBM speed

{n} European options per workload, all inputs as float64 tensors (no JSON), median of
{args.repeat} runs after a warm-up (MC: one run). Model: `{ckpt.content_hash[:23]}...`
({served.manifest["model"]["network"]["width"]} wide, {served.manifest["model"]["network"]["depth"]} deep,
K = {spec.n_freq}). "5 Greeks" = delta, gamma, vega, theta, rho (vega and theta by autograd).

{speed_table}

{through_table}

![speed](img/speed_gbm.png)
"""
        record("speed_gbm", body)
    return 0


def plot(path: Path, results: dict[str, dict[str, float]], n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    cases = list(results)
    names = list(results[cases[0]])
    width = 0.8 / len(cases)
    for i, c in enumerate(cases):
        vals: list[Any] = [results[c][name] / n * 1e6 for name in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=c)
    ax.set_xticks([j + width * (len(cases) - 1) / 2 for j in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("microseconds per option")
    ax.set_title(f"GBM pricing speed, {n} options")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
