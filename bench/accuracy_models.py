"""Accuracy and speed of a learned model beyond GBM (Heston, Merton) against the truth.

Held-out set: P points of a scrambled Sobol sequence (a scramble neither training nor
validation uses) over the model's declared domain, times 13 strikes K/F in [0.7, 1.3],
times put and call; S = 100, r = 3%, q = 1%. Truth: COS on the analytic CF with 2,048
terms on [-64 s, 64 s] (engine/pricer.py REFERENCE_SPECTRUM; it matches QuantLib's
AnalyticHestonEngine to 1e-12 at ordinary points, 2.5e-4 at the fattest-tailed
corner). Error: |price - truth| in basis points of spot.

Side by side in the same run (Heston): QuantLib's AnalyticHestonEngine and its
MCEuropeanHestonEngine at the model's own p95 accuracy, time per option. Merton:
QuantLib has no jump-diffusion engine in its Python bindings, so its side is Merton's
series of Black-Scholes prices through QuantLib's BlackCalculator.

Used by bench/accuracy_heston.py and bench/accuracy_merton.py.
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

from common import ROOT, output_args, plot_file, quantiles, record, save_figure, table, timeit

from spectralmc_server.engine.checkpoint import read_dir, run_facts, timed_history
from spectralmc_server.engine.normals import sobol_engine
from spectralmc_server.engine.pricer import OptionBatch, SpectralPricer
from spectralmc_server.engine.reference import analytic_cf_y
from spectralmc_server.engine.reference_pricers import reference_pricer
from spectralmc_server.engine.served import Evaluation, load_served_model
from spectralmc_server.models import bundled_models

F64 = torch.float64
STRIKES = torch.linspace(0.7, 1.3, 13, dtype=F64)
SPOT, RATE, DIV = 100.0, 0.03, 0.01
HELD_OUT_SEED = 20261127


def held_out(served: Any, points: int) -> tuple[torch.Tensor, torch.Tensor, OptionBatch]:
    domain = served.domain
    u = sobol_engine(domain.dims, HELD_OUT_SEED).draw(points, dtype=F64)
    theta, t = domain.from_unit(u)
    k = len(STRIKES)
    n = points * k * 2
    rep = torch.arange(n) // (2 * k)
    kappa = STRIKES[(torch.arange(n) // 2) % k]
    fwd = SPOT * torch.exp((RATE - DIV) * t[rep])
    batch = OptionBatch(
        spot=torch.full((n,), SPOT, dtype=F64),
        strike=fwd * kappa,
        expiry=t[rep],
        rate=torch.full((n,), RATE, dtype=F64),
        dividend=torch.full((n,), DIV, dtype=F64),
        is_call=(torch.arange(n) % 2) == 1,
        theta=theta[rep],
    )
    return theta, t, batch


def ql_heston(batch: OptionBatch, idx: list[int], p95_price: float) -> dict[str, Any]:
    """QuantLib on the options ``idx``: analytic engine and MC at the model's p95."""
    import QuantLib as ql  # noqa: N813 (the library's conventional alias)

    today = ql.Date(27, 11, 2026)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    r = ql.YieldTermStructureHandle(ql.FlatForward(today, RATE, dc))
    q = ql.YieldTermStructureHandle(ql.FlatForward(today, DIV, dc))
    spot = ql.QuoteHandle(ql.SimpleQuote(SPOT))
    out: dict[str, Any] = {"analytic": [], "mc": [], "mc_err": [], "analytic_err": []}
    ref = reference_pricer(load_process("heston"))
    for i in idx:
        days = max(1, round(float(batch.expiry[i]) * 365))
        t = days / 365.0
        th = [float(x) for x in batch.theta[i]]
        sub = OptionBatch(
            batch.spot[i : i + 1],
            batch.strike[i : i + 1],
            torch.tensor([t], dtype=F64),
            batch.rate[i : i + 1],
            batch.dividend[i : i + 1],
            batch.is_call[i : i + 1],
            batch.theta[i : i + 1],
        )
        truth = float(ref.evaluate(sub, frozenset({"price"}))["price"][0])
        process = ql.HestonProcess(r, q, spot, th[0], th[1], th[2], th[3], th[4])
        right = ql.Option.Call if bool(batch.is_call[i]) else ql.Option.Put
        option = ql.VanillaOption(
            ql.PlainVanillaPayoff(right, float(batch.strike[i])), ql.EuropeanExercise(today + days)
        )
        t0 = time.perf_counter()
        option.setPricingEngine(ql.AnalyticHestonEngine(ql.HestonModel(process)))
        value = option.NPV()
        out["analytic"].append(time.perf_counter() - t0)
        out["analytic_err"].append(abs(value - truth) / SPOT * 1e4)
        t0 = time.perf_counter()
        option.setPricingEngine(
            ql.MCEuropeanHestonEngine(
                process, "pseudorandom", timeSteps=16, antitheticVariate=True, requiredTolerance=p95_price, seed=42
            )
        )
        value = option.NPV()
        out["mc"].append(time.perf_counter() - t0)
        out["mc_err"].append(abs(value - truth) / SPOT * 1e4)
    return out


def ql_merton(batch: OptionBatch, idx: list[int]) -> dict[str, Any]:
    """Merton's series sum_n P(n) Black(F_n, K, sd_n) with QuantLib's BlackCalculator:
    P Poisson with mean lambda T, F_n = E[S_T | n jumps] = F e^{-lambda k T} (1 + k)^n and
    sd_n^2 = sigma^2 T + n sigma_j^2."""
    import QuantLib as ql  # noqa: N813 (the library's conventional alias)

    out: dict[str, Any] = {"analytic": [], "analytic_err": []}
    ref = reference_pricer(load_process("merton"))
    truth = ref.evaluate(batch.select(torch.tensor(idx)), frozenset({"price"}))["price"]
    for j, i in enumerate(idx):
        sigma, lam, mu_j, sigma_j = (float(x) for x in batch.theta[i])
        t, k = float(batch.expiry[i]), float(batch.strike[i])
        kk = math.expm1(mu_j + 0.5 * sigma_j**2)
        fwd = SPOT * math.exp((RATE - DIV) * t)
        right = ql.Option.Call if bool(batch.is_call[i]) else ql.Option.Put
        t0 = time.perf_counter()
        total, term = 0.0, math.exp(-lam * t)
        for n in range(60):
            if n:
                term *= lam * t / n
            var = sigma**2 * t + n * sigma_j**2
            # forward given n jumps: F e^{n (mu_j + sigma_j^2/2) - lam k T}
            f_n = fwd * math.exp(n * (mu_j + 0.5 * sigma_j**2) - lam * kk * t)
            calc = ql.BlackCalculator(ql.PlainVanillaPayoff(right, k), f_n, math.sqrt(var), math.exp(-RATE * t))
            total += term * calc.value()
        out["analytic"].append(time.perf_counter() - t0)
        out["analytic_err"].append(abs(total - float(truth[j])) / SPOT * 1e4)
    return out


def load_process(name: str) -> Any:
    from spectralmc_server.engine.processes import get_process

    return get_process(name)


def run(process_name: str, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help=f"checkpoint directory (default: the bundled {process_name} model)")
    ap.add_argument("--points", type=int, default=1000, help="held-out parameter points")
    ap.add_argument("--ql-options", type=int, default=20, help="options priced by QuantLib side by side")
    ap.add_argument("--speed-points", type=int, default=4096, help="distinct points for the inference timing")
    ap.add_argument("--quick", action="store_true", help="small sets: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.points, args.ql_options, args.speed_points = 16, 2, 64
    model_dir = args.model or bundled_models()[process_name]
    ckpt = read_dir(model_dir, need_training=False)
    served = load_served_model(ckpt, require_certificate=False)
    process = served.process
    _, _, batch = held_out(served, args.points)
    n_opt = len(batch)
    truth = reference_pricer(process).evaluate(batch, frozenset({"price"}))["price"]
    # the network's own accuracy (the served pricer would swap the rare learned price
    # that breaks a model-free bound for the reference)
    if not bool(served.pricer.servable(batch, frozenset({"price"})).all()):
        raise SystemExit("the held-out set must lie inside the model's domain and K/F range")
    ev = Evaluation(
        served.pricer.learned.evaluate(batch, frozenset({"price"})), torch.ones(len(batch), dtype=torch.bool)
    )
    err = (ev.values["price"] - truth).abs() / SPOT * 1e4
    spec = served.pricer.learned.spectrum
    own = SpectralPricer(process, spec, lambda th, tt: analytic_cf_y(process, spec, th, tt)).evaluate(
        batch, frozenset({"price"})
    )["price"]
    err_own = (own - truth).abs() / SPOT * 1e4
    rows = [
        ["learned model (cvnn)", *quantiles(err)],
        [f"COS on the analytic CF, the model's grid (K = {spec.n_freq}, L = {spec.half_width:g})", *quantiles(err_own)],
    ]
    print(f"held-out: {args.points} points x 13 strikes x put/call = {n_opt} options")
    acc_table = table(["engine vs COS reference (K = 2048, L = 64)", "p50 bp", "p95 bp", "max bp"], rows)
    print(acc_table)

    # by expiry bucket: where the error sits
    per_opt_t = batch.expiry
    buckets = [(0.0, 0.25), (0.25, 1.0), (1.0, 3.01)]
    bucket_rows = []
    for lo, hi in buckets:
        sel = (per_opt_t > lo) & (per_opt_t <= hi)
        if bool(sel.any()):
            bucket_rows.append([f"{lo} < T <= {hi}", int(sel.sum()), *quantiles(err[sel])])
    bucket_table = table(["expiry", "options", "p50 bp", "p95 bp", "max bp"], bucket_rows)
    print(bucket_table)

    # inference speed: distinct points (one option each) and 26 options per point
    _, _, speed_set = held_out(served, args.speed_points)
    distinct = speed_set.select(torch.arange(0, len(speed_set), 26))  # one option per (theta, T)
    measures = frozenset({"price"})
    t_distinct = timeit(lambda: served.pricer.evaluate(distinct, measures), repeat=5, quick=args.quick)
    t_shared = timeit(lambda: served.pricer.evaluate(batch, measures), repeat=3, quick=args.quick)
    t_greeks = timeit(
        lambda: served.pricer.evaluate(batch, frozenset({"price", "delta", "gamma", "vega", "theta", "rho"})),
        repeat=3,
        quick=args.quick,
    )
    speed_rows = [
        ["distinct (theta, T) per option, price", len(distinct), t_distinct / len(distinct) * 1e6],
        ["26 options per (theta, T), price", n_opt, t_shared / n_opt * 1e6],
        ["26 options per (theta, T), price + 5 Greeks", n_opt, t_greeks / n_opt * 1e6],
    ]

    # QuantLib side by side
    p95 = quantiles(err)[1]
    stride = max(1, n_opt // max(args.ql_options, 1))
    idx = list(range(0, n_opt, stride))[: args.ql_options]
    if process_name == "heston":
        ql_out = ql_heston(batch, idx, p95 * SPOT / 1e4)
        speed_rows.append(
            ["QuantLib AnalyticHestonEngine (one option per model)", len(idx), 1e6 * sum(ql_out["analytic"]) / len(idx)]
        )
        speed_rows.append(
            [
                f"QuantLib MCEuropeanHestonEngine, tolerance = model p95 ({p95:.2g} bp)",
                len(idx),
                1e6 * sum(ql_out["mc"]) / len(idx),
            ]
        )
        ql_errors = (
            f"QuantLib's errors against the same reference on these {len(idx)} options: analytic "
            f"max {max(ql_out['analytic_err']):.2g} bp; MC p50 "
            f"{sorted(ql_out['mc_err'])[len(idx) // 2]:.2g} bp, max {max(ql_out['mc_err']):.2g} bp."
        )
    else:
        ql_out = ql_merton(batch, idx)
        speed_rows.append(
            ["Merton series with QuantLib BlackCalculator", len(idx), 1e6 * sum(ql_out["analytic"]) / len(idx)]
        )
        ql_errors = (
            f"The QuantLib series against the reference on these {len(idx)} options: max "
            f"{max(ql_out['analytic_err']):.2g} bp."
        )
    speed_table = table(["engine", "options", "us per option"], speed_rows)
    print(speed_table)
    print(ql_errors)

    history = timed_history(ckpt.manifest)  # validations with their wall-clock seconds
    state = ckpt.manifest["state"]
    plot_path = plot_file(args, f"accuracy_{process_name}.png")
    plot(plot_path, process_name, err, batch.expiry, history)
    print(f"plot: {plot_path}")
    if args.record:
        run = run_facts(ckpt.manifest)  # command and seconds: in "run", or where older manifests kept them
        train_cmd = run["command"] or "(not recorded)"
        domain = ", ".join(
            f"{r.name} in [{r.low:g}, {r.high:g}]{' (log)' if r.scale == 'log' else ''}" for r in served.domain.ranges
        )
        body = f"""### {process_name.capitalize()} accuracy and speed (bundled model)

Model `{model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir}`,
content hash `{ckpt.content_hash}`, trained with `{train_cmd}`:
{state["step"]} steps, {state["paths_simulated"]:.3g} paths, {run["elapsed_seconds"] / 60:.1f} min of training
(one torch thread). Domain: {domain}.
Held-out: {args.points} Sobol points x 13 strikes K/F in [0.7, 1.3] x put/call = {n_opt} options,
S = 100, r = 3%, q = 1%. Error = |price - COS reference| in basis points of spot.

{acc_table}

By expiry:

{bucket_table}

Speed (median of repeated runs, one process, 2 threads):

{speed_table}

{ql_errors}

![accuracy](img/accuracy_{process_name}.png)
"""
        record(f"accuracy_{process_name}", body)
    return 0


def plot(
    path: Path,
    name: str,
    err: torch.Tensor,
    expiry: torch.Tensor,
    history: list[dict[str, float]],
    *,
    targets: tuple[float, float] = (10.0, 50.0),
    truth_se: torch.Tensor | None = None,
) -> None:
    """Held-out error per option against T (with the truth's standard error where it is
    simulated) beside the validation error against training time; ``targets`` the p95
    and max lines in bp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    ax1.scatter(expiry.numpy(), err.numpy(), s=2, alpha=0.3, label="|learned - truth|")
    if truth_se is not None:
        ax1.scatter(expiry.numpy(), truth_se.numpy(), s=1, alpha=0.2, color="grey", label="truth's standard error")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("T (years)")
    ax1.set_ylabel("|error|, bp of spot")
    ax1.axhline(targets[0], color="red", lw=1, label=f"p95 target {targets[0]:g} bp")
    ax1.axhline(targets[1], color="darkred", lw=1, ls="--", label=f"max target {targets[1]:g} bp")
    ax1.legend(fontsize=8)
    ax1.set_title(f"{name}: held-out error per option")
    if history:
        minutes = [h["elapsed_seconds"] / 60 for h in history]
        ax2.plot(minutes, [h["p95_bp"] for h in history], label="p95 (validation set)")
        ax2.plot(minutes, [h["max_bp"] for h in history], label="max (validation set)", alpha=0.7)
        ax2.set_yscale("log")
        ax2.set_xlabel("training time (minutes)")
        ax2.set_ylabel("error, bp of spot")
        ax2.legend(fontsize=8)
        ax2.set_title("error vs training time")
    save_figure(fig, path)
