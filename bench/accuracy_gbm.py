"""Accuracy of the GBM model against the Black-Scholes closed form.

A fixed held-out grid (default 25 vols x 24 expiries, linear over vol in [0.05, 1.0] and
T in [0.02, 3.0]; 600 points) times 13 strikes K/F in [0.7, 1.3] times put and call,
with S = 100 and r = q = 0 so the error in basis points of spot is 1e4 |price - BS| / S.
Engines: the learned model (bundled unless --model), COS on the exact CF with the
model's own grid (same K and L), and plain Monte Carlo with 10^4, 10^5 and 10^6 paths.
Also reports the Greeks and distribution measures of the model, the "equivalent MC
paths" (paths plain MC needs to match the model's p95 error, from c / sqrt(N) fitted
to the three MC runs) and the error-versus-training-time curve from the model's
manifest.

    python bench/accuracy_gbm.py --record        # full run, writes docs/
    python bench/accuracy_gbm.py --quick         # smoke test (small grid, small MC)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, output_args, plot_file, quantiles, record, save_figure, table

from spectralmc_server.engine.checkpoint import read_dir, run_facts, timed_history
from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.pricer import OptionBatch, SpectralPricer
from spectralmc_server.engine.processes import GBMProcess
from spectralmc_server.engine.reference import (
    analytic_cf_y,
    black_scholes,
    lognormal_moments,
    lognormal_quantiles,
    mc_european,
)
from spectralmc_server.engine.served import Evaluation, load_served_model
from spectralmc_server.models import bundled_models

F64 = torch.float64
STRIKES = torch.linspace(0.7, 1.3, 13, dtype=F64)
LEVELS = torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99], dtype=F64)
GREEKS = ("price", "delta", "gamma", "vega", "theta", "rho", "digital")


def grid(n_vol: int, n_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    vol = torch.linspace(0.05, 1.0, n_vol, dtype=F64)
    t = torch.linspace(0.02, 3.0, n_t, dtype=F64)
    vv, tt = torch.meshgrid(vol, t, indexing="ij")
    return vv.flatten(), tt.flatten()


def options(vol: torch.Tensor, t: torch.Tensor) -> OptionBatch:
    """Every (vol, T) point times 13 strikes times put and call; S = 100, r = q = 0."""
    p, k = len(vol), len(STRIKES)
    n = p * k * 2
    rep = torch.arange(n) // (2 * k)
    kappa = STRIKES[(torch.arange(n) // 2) % k]
    zeros = torch.zeros(n, dtype=F64)
    return OptionBatch(
        spot=torch.full((n,), 100.0, dtype=F64),
        strike=100.0 * kappa,
        expiry=t[rep],
        rate=zeros,
        dividend=zeros,
        is_call=(torch.arange(n) % 2) == 1,
        theta=vol[rep][:, None],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled gbm model)")
    ap.add_argument("--vols", type=int, default=25)
    ap.add_argument("--expiries", type=int, default=24)
    ap.add_argument("--mc", default="1e4,1e5,1e6", help="comma-separated MC path counts")
    ap.add_argument("--quick", action="store_true", help="small grid and MC: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.vols, args.expiries, args.mc = 5, 4, "1e3,4e3"
    mc_paths = [int(float(x)) for x in args.mc.split(",")]
    model_dir = args.model or bundled_models()["gbm"]
    ckpt = read_dir(model_dir, need_training=False)
    served = load_served_model(ckpt, require_certificate=False)
    gbm = GBMProcess()
    vol, t = grid(args.vols, args.expiries)
    batch = options(vol, t)
    n_points, n_opt = len(vol), len(batch)
    bs = black_scholes(
        batch.spot, batch.strike, batch.expiry, batch.rate, batch.dividend, batch.theta[:, 0], batch.is_call
    )

    rows: list[list[Any]] = []
    errors: dict[str, torch.Tensor] = {}

    t0 = time.perf_counter()
    # the network's own accuracy (the served pricer would swap the rare learned price
    # that breaks a model-free bound for the reference)
    measures = frozenset({*GREEKS, "mean", "stdev", "skew", "kurtosis", "quantiles"})
    # (the moments are measured over the whole grid: past a spread of 1 the server answers
    # them by the closed forms, and this table shows why)
    if not bool(served.pricer.servable(batch, frozenset(GREEKS)).all()):
        raise SystemExit("the held-out grid must lie inside the model's domain and K/F range")
    ev = Evaluation(served.pricer.learned.evaluate(batch, measures, LEVELS), torch.ones(len(batch), dtype=torch.bool))
    t_model = time.perf_counter() - t0
    errors["model"] = (ev.values["price"] - bs["price"]).abs() / batch.spot * 1e4
    spec = served.pricer.learned.spectrum
    cos = SpectralPricer(gbm, spec, lambda th, tt: analytic_cf_y(gbm, spec, th, tt)).evaluate(
        batch, frozenset({"price"})
    )
    errors["cos_exact"] = (cos["price"] - bs["price"]).abs() / batch.spot * 1e4

    # Plain MC on the same (vol, T) points; puts and calls from their own payoffs.
    k = len(STRIKES)
    log_m = torch.log(STRIKES)[None, :].repeat(1, 2).expand(n_points, 2 * k)  # (P, 2k): puts then calls
    calls = torch.cat([torch.zeros(k, dtype=torch.bool), torch.ones(k, dtype=torch.bool)])[None, :].expand(n_points, -1)
    mc_time: dict[int, float] = {}
    for i, n in enumerate(mc_paths):
        t0 = time.perf_counter()
        res = mc_european(gbm, vol[:, None], t, log_m, n, is_call=calls, seed=1000 + i)
        mc_time[n] = time.perf_counter() - t0
        price = 100.0 * res.price  # (P, 2k), S = F = 100
        mc = torch.empty(n_opt, dtype=F64)
        mc[0::2] = price[:, :k].flatten()  # options() interleaves put, call per strike
        mc[1::2] = price[:, k:].flatten()
        errors[f"mc_{n:.0e}"] = (mc - bs["price"]).abs() / batch.spot * 1e4

    for name, err in errors.items():
        p50, p95, mx = quantiles(err)
        rows.append([name, p50, p95, mx])
    print(f"held-out grid: {n_points} (vol, T) points x {k} strikes x put/call = {n_opt} options")
    price_table = table(["engine", "p50 bp", "p95 bp", "max bp"], rows)
    print(price_table)

    # Equivalent MC paths: p95(N) ~ c / sqrt(N), c fitted (geometric mean) on the MC runs.
    c = math.exp(sum(math.log(quantiles(errors[f"mc_{n:.0e}"])[1] * math.sqrt(n)) for n in mc_paths) / len(mc_paths))
    model_p95 = quantiles(errors["model"])[1]
    equiv = (c / model_p95) ** 2
    print(f"equivalent plain-MC paths for the model's p95 error: {equiv:.3g} (c = {c:.3g} bp * sqrt(paths))")

    # Greeks and distribution measures of the model against closed forms.
    greek_rows = []
    scale = {"price": 100.0, "delta": 1.0, "gamma": 1.0, "vega": 100.0, "theta": 100.0, "rho": 100.0, "digital": 1.0}
    units = {
        "price": "bp of spot",
        "delta": "abs",
        "gamma": "abs",
        "vega": "bp of spot per vol",
        "theta": "bp of spot per year",
    }
    for g in GREEKS:
        err = (ev.values[g] - bs[g]).abs() / scale[g] * (1e4 if g in ("price", "vega", "theta", "rho") else 1.0)
        greek_rows.append([g, units.get(g, "bp of spot per unit rate" if g == "rho" else "abs"), *quantiles(err)])
    measure_table = table(["measure", "error unit", "p50", "p95", "max"], greek_rows)
    print(measure_table)

    # Distribution measures depend on (vol, T) only: one row per point, by s = vol sqrt(T),
    # model against plain MC sample statistics with the largest path count.
    first = torch.arange(0, n_opt, 2 * k)
    s_pt = (batch.theta[:, 0] * torch.sqrt(batch.expiry))[first]
    fwd_pt = batch.forward[first]
    exact = {**lognormal_moments(fwd_pt, s_pt), "quantiles": lognormal_quantiles(fwd_pt, s_pt, LEVELS)}
    sample = mc_distribution(s_pt, fwd_pt, mc_paths[-1])
    dist_rows = []
    buckets = [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 2.0)]
    for lo, hi in buckets:
        sel = (s_pt > lo) & (s_pt <= hi)
        for m in ("stdev", "skew", "kurtosis", "quantiles"):
            rel_model = ((ev.values[m][first] - exact[m]) / exact[m]).abs()[sel]
            rel_mc = ((sample[m] - exact[m]) / exact[m]).abs()[sel]
            dist_rows.append([f"{lo} < s <= {hi}", m, *quantiles(rel_model)[1:], quantiles(rel_mc)[1]])
    dist_table = table(
        ["s = vol sqrt(T)", "measure", "model p95 rel", "model max rel", f"MC {mc_paths[-1]:.0e} p95 rel"], dist_rows
    )
    print(dist_table)

    # Where the model's error sits: worst points.
    per_point = errors["model"].view(n_points, -1).max(1).values
    worst = torch.topk(per_point, min(5, n_points))
    worst_rows = [
        [f"{float(vol[i]):.3f}", f"{float(t[i]):.3f}", f"{float(vol[i] * t[i].sqrt()):.3f}", float(e)]
        for e, i in zip(worst.values, worst.indices, strict=True)
    ]
    worst_table = table(["vol", "T", "s = vol sqrt(T)", "max bp over strikes"], worst_rows)
    print(worst_table)

    history = timed_history(ckpt.manifest)  # validations with their wall-clock seconds
    state = ckpt.manifest["state"]
    plot_path = plot_file(args, "accuracy_gbm.png")
    plot(plot_path, vol, t, per_point, history, {n: quantiles(errors[f"mc_{n:.0e}"])[1] for n in mc_paths}, args)
    print(f"plot: {plot_path}")

    if args.record:
        run = run_facts(ckpt.manifest)  # command and seconds: in "run", or where older manifests kept them
        train_cmd = run["command"] or "(not recorded)"
        body = f"""### GBM accuracy (bundled model)

Model `{model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir}`,
content hash `{ckpt.content_hash}`, trained with `{train_cmd}`:
{state["step"]} steps, {state["paths_simulated"]:.3g} paths, {run["elapsed_seconds"] / 60:.1f} min of training.
Held-out grid: {args.vols} vols (linear 0.05..1.0) x {args.expiries} expiries (linear 0.02..3.0) =
{n_points} points, x 13 strikes K/F in [0.7, 1.3] x put/call = {n_opt} options, S = 100, r = q = 0.
Error = |price - Black-Scholes| in basis points of spot. Model inference for all {n_opt} options
with every measure: {t_model:.2f} s. MC wall time: {", ".join(f"{n:.0e} paths {mc_time[n]:.1f} s" for n in mc_paths)}.

{price_table}

Equivalent plain-MC paths for the model's p95 error: **{equiv:.3g}** (fit p95 = {c:.3g} bp / sqrt(N)).

Greeks of the model vs closed forms on the same options:

{measure_table}

Distribution measures of S_T per (vol, T) point (relative errors; quantiles 1%..99%;
the mean is the forward exactly, for every model). They weight the tails by e^{{2X}},
e^{{3X}}, e^{{4X}}, which the learned CF pins down less well as s grows; plain MC with the
most paths is shown for scale:

{dist_table}

Worst (vol, T) points of the model:

{worst_table}

![accuracy](img/accuracy_gbm.png)
"""
        record("accuracy_gbm", body)
    return 0


def mc_distribution(s: torch.Tensor, fwd: torch.Tensor, n_paths: int, chunk: int = 8) -> dict[str, torch.Tensor]:
    """Sample stdev, skew, excess kurtosis and quantiles of S_T from plain MC, per point
    (torch.quantile takes at most 2^24 values, hence the chunks of 8 points)."""
    out: dict[str, list[torch.Tensor]] = {"stdev": [], "skew": [], "kurtosis": [], "quantiles": []}
    for i in range(0, len(s), chunk):
        sc = s[i : i + chunk]
        cfg = NormalsConfig(seed=77, mode="pseudo", antithetic=False, rows=n_paths, dims=len(sc), dtype="float64")
        z = generate_block(cfg, i, torch.device("cpu"))  # (N, c)
        st = fwd[i : i + chunk] * torch.exp(-0.5 * sc * sc + sc * z)  # (N, c)
        c = st - st.mean(0)
        var = c.square().mean(0)
        out["stdev"].append(var.sqrt())
        out["skew"].append(c.pow(3).mean(0) / var**1.5)
        out["kurtosis"].append(c.pow(4).mean(0) / var**2 - 3.0)
        out["quantiles"].append(torch.quantile(st, LEVELS, dim=0).t())
        del z, st, c
    return {k: torch.cat(v) for k, v in out.items()}


def plot(
    path: Path,
    vol: torch.Tensor,
    t: torch.Tensor,
    per_point: torch.Tensor,
    history: list[dict[str, float]],
    mc_p95: dict[int, float],
    args: argparse.Namespace,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    img = per_point.view(args.vols, args.expiries).numpy()
    im = ax1.imshow(
        img.T,
        origin="lower",
        aspect="auto",
        extent=(float(vol.min()), float(vol.max()), float(t.min()), float(t.max())),
        cmap="viridis",
    )
    fig.colorbar(im, ax=ax1, label="max |error| over strikes, bp of spot")
    ax1.set_xlabel("vol")
    ax1.set_ylabel("T (years)")
    ax1.set_title("Model error over the held-out grid")
    if history:
        minutes = [h["elapsed_seconds"] / 60 for h in history]
        ax2.plot(minutes, [h["p95_bp"] for h in history], label="model p95 (validation grid)")
        ax2.plot(minutes, [h["max_bp"] for h in history], label="model max (validation grid)", alpha=0.7)
    for n, v in mc_p95.items():
        ax2.axhline(v, ls="--", lw=1, color="grey")
        ax2.text(0, v, f" MC {n:.0e} p95", va="bottom", fontsize=8, color="grey")
    ax2.axhline(5.0, color="red", lw=1, label="target p95 5 bp")
    ax2.set_yscale("log")
    ax2.set_xlabel("training time (minutes)")
    ax2.set_ylabel("error, bp of spot")
    ax2.set_title("Error vs training time")
    ax2.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
