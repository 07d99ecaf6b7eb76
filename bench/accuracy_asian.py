"""Accuracy and speed of the bundled arithmetic-Asian model against the control-variate
MC reference, side by side with QuantLib.

Held-out set: P points of a scrambled Sobol sequence (a scramble neither training nor
validation uses) over the model's domain (vol, carry = r - q, fixings n rounded to an
integer, T), times 13 strikes K/F_A in [0.7, 1.3], times put and call; S = 100,
q = 1%, r = carry + q. Truth: E[(K - A)^+] by Monte Carlo with the geometric-average
put as a control variate (engine/processes/asian.py asian_put_mc, antithetic, 2^15
paths by default), calls by parity; its own standard error is reported. Error:
|price - truth| in basis points of spot.

Also measured: the reference the server uses outside the domain (COS on a Monte-Carlo
CF, engine/reference.py MonteCarloCF) on a subset; inference time per option; and
QuantLib on options whose fixings fall on whole days (T = n m / 365): ChoiAsianEngine
(discrete arithmetic, a spectral expansion) and MCDiscreteArithmeticAPEngine with the
geometric control variate at a tolerance equal to the model's p95, time per option.

    python bench/accuracy_asian.py --record        # full run, writes docs/
    python bench/accuracy_asian.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_models import HELD_OUT_SEED, STRIKES, plot
from common import ROOT, output_args, plot_file, quantiles, record, table, timeit

from spectralmc_server.engine.checkpoint import read_dir, run_facts, timed_history
from spectralmc_server.engine.normals import sobol_engine
from spectralmc_server.engine.pricer import OptionBatch
from spectralmc_server.engine.processes.asian import asian_put_mc, average_forward_ratio
from spectralmc_server.engine.reference_pricers import reference_pricer
from spectralmc_server.engine.served import Evaluation, ServedModel, load_served_model
from spectralmc_server.models import bundled_models

F64 = torch.float64
SPOT, DIV = 100.0, 0.01


def held_out(served: ServedModel, points: int) -> OptionBatch:
    """points x 13 strikes x put/call, each point's options consecutive."""
    domain = served.domain
    u = sobol_engine(domain.dims, HELD_OUT_SEED).draw(points, dtype=F64)
    theta, t = domain.from_unit(u)
    return options(served.process.canonical_params(theta), t)


def options(theta: torch.Tensor, t: torch.Tensor) -> OptionBatch:
    k = len(STRIKES)
    n = theta.shape[0] * k * 2
    rep = torch.arange(n) // (2 * k)
    kappa = STRIKES[(torch.arange(n) // 2) % k]
    fa = SPOT * average_forward_ratio(theta, t)[rep]
    return OptionBatch(
        spot=torch.full((n,), SPOT, dtype=F64),
        strike=fa * kappa,
        expiry=t[rep],
        rate=theta[rep, 1] + DIV,
        dividend=torch.full((n,), DIV, dtype=F64),
        is_call=(torch.arange(n) % 2) == 1,
        theta=theta[rep],
    )


def truth(batch: OptionBatch, paths: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Control-variate MC prices and standard errors of every option (money)."""
    fa = batch.spot * average_forward_ratio(batch.theta, batch.expiry)
    disc = torch.exp(-batch.rate * batch.expiry)
    price = torch.empty(len(batch), dtype=F64)
    stderr = torch.empty(len(batch), dtype=F64)
    # options come in runs of 26 per point: one MC per point for its 26 strikes
    step, chunk = 2 * len(STRIKES), 64
    n_points = len(batch) // step
    for p0 in range(0, n_points, chunk):
        idx = torch.arange(p0 * step, min(n_points, p0 + chunk) * step).view(-1, step)  # (B, 26)
        first = idx[:, 0]
        log_kappa = torch.log(batch.strike[idx] / fa[idx])
        put, se = asian_put_mc(batch.theta[first], batch.expiry[first], log_kappa, paths, seed=7)
        scale = disc[idx] * fa[idx]
        p = scale * put + torch.where(batch.is_call[idx], disc[idx] * (fa[idx] - batch.strike[idx]), 0.0)
        price[idx.flatten()] = p.flatten()
        stderr[idx.flatten()] = (scale * se).flatten()
    return price, stderr


def quantlib_side(served: ServedModel, points: int, tolerance: float, paths: int) -> dict[str, Any]:
    """Puts and calls at K = F_A on points with whole-day fixings: QuantLib's Choi and
    control-variate MC engines against the same truth as the model."""
    import QuantLib as ql  # noqa: N813 (the library's conventional alias)

    domain = served.domain
    u = sobol_engine(domain.dims, HELD_OUT_SEED + 1).draw(points, dtype=F64)
    theta, t = domain.from_unit(u)
    theta = served.process.canonical_params(theta)
    n_fix = theta[:, 2].round().long()
    days = torch.clamp((t * 365 / n_fix).round(), min=1).long() * n_fix  # a multiple of n
    t = days.to(F64) / 365.0
    rows: list[int] = []
    for i in range(points):  # the at-the-average-forward put and call of each point
        rows += [i * 2 * len(STRIKES) + 12, i * 2 * len(STRIKES) + 13]
    batch = options(theta, t).select(torch.tensor(rows))
    true, _ = truth_rows(batch, paths)
    ours = served.pricer.evaluate(batch, frozenset({"price"})).values["price"]
    today = ql.Date(27, 11, 2026)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    out: dict[str, list[float]] = {k: [] for k in ("choi_t", "choi_err", "mc_t", "mc_err", "ours_err")}
    for j in range(len(batch)):
        i = j // 2
        vol, carry = float(theta[i, 0]), float(theta[i, 1])
        n, d = int(n_fix[i]), int(days[i])
        process = ql.BlackScholesMertonProcess(
            ql.QuoteHandle(ql.SimpleQuote(SPOT)),
            ql.YieldTermStructureHandle(ql.FlatForward(today, DIV, dc)),
            ql.YieldTermStructureHandle(ql.FlatForward(today, carry + DIV, dc)),
            ql.BlackVolTermStructureHandle(ql.BlackConstantVol(today, ql.NullCalendar(), vol, dc)),
        )
        dates = [today + d * k // n for k in range(1, n + 1)]
        right = ql.Option.Call if bool(batch.is_call[j]) else ql.Option.Put
        option = ql.DiscreteAveragingAsianOption(
            ql.Average.Arithmetic,
            dates,
            ql.PlainVanillaPayoff(right, float(batch.strike[j])),
            ql.EuropeanExercise(dates[-1]),
        )
        for name, engine in (
            ("choi", ql.ChoiAsianEngine(process)),
            (
                "mc",
                ql.MCDiscreteArithmeticAPEngine(
                    process, "pseudorandom", controlVariate=True, requiredTolerance=tolerance, seed=42
                ),
            ),
        ):
            option.setPricingEngine(engine)
            t0 = time.perf_counter()
            value = option.NPV()
            out[f"{name}_t"].append(time.perf_counter() - t0)
            out[f"{name}_err"].append(abs(value - float(true[j])) / SPOT * 1e4)
        out["ours_err"].append(abs(float(ours[j]) - float(true[j])) / SPOT * 1e4)
    return out


def truth_rows(batch: OptionBatch, paths: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The truth for options in no particular layout: one MC per option."""
    fa = batch.spot * average_forward_ratio(batch.theta, batch.expiry)
    disc = torch.exp(-batch.rate * batch.expiry)
    log_kappa = torch.log(batch.strike / fa)[:, None]
    put, se = asian_put_mc(batch.theta, batch.expiry, log_kappa, paths, seed=7)
    price = disc * fa * put[:, 0] + torch.where(batch.is_call, disc * (fa - batch.strike), 0.0)
    return price, disc * fa * se[:, 0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled asian model)")
    ap.add_argument("--points", type=int, default=400, help="held-out parameter points")
    ap.add_argument("--paths", type=int, default=1 << 15, help="paths of the MC truth per point")
    ap.add_argument("--reference-points", type=int, default=20, help="points priced by the out-of-domain reference")
    ap.add_argument("--ql-points", type=int, default=5, help="points priced by QuantLib side by side (put and call)")
    ap.add_argument("--speed-points", type=int, default=4096, help="distinct points for the inference timing")
    ap.add_argument("--quick", action="store_true", help="small sets: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.points, args.paths, args.reference_points, args.ql_points, args.speed_points = 8, 1 << 12, 1, 1, 64
    model_dir = args.model or bundled_models()["asian"]
    ckpt = read_dir(model_dir, need_training=False)
    served = load_served_model(ckpt, require_certificate=False)
    batch = held_out(served, args.points)
    n_opt = len(batch)
    t0 = time.perf_counter()
    true, stderr = truth(batch, args.paths)
    t_truth = time.perf_counter() - t0
    # the network's own accuracy (the served pricer would swap the rare learned price
    # that breaks a model-free bound for the reference)
    if not bool(served.pricer.servable(batch, frozenset({"price"})).all()):
        raise SystemExit("the held-out set must lie inside the model's domain and K/F range")
    ev = Evaluation(
        served.pricer.learned.evaluate(batch, frozenset({"price"})), torch.ones(len(batch), dtype=torch.bool)
    )
    err = (ev.values["price"] - true).abs() / SPOT * 1e4
    se_bp = stderr / SPOT * 1e4

    ref_rows = torch.arange(min(args.reference_points, args.points) * 2 * len(STRIKES))
    ref_batch = batch.select(ref_rows)
    t0 = time.perf_counter()
    ref = reference_pricer(served.process).evaluate(ref_batch, frozenset({"price"}))["price"]
    t_ref = time.perf_counter() - t0
    err_ref = (ref - true[ref_rows]).abs() / SPOT * 1e4
    quiet = se_bp <= 0.2
    rows = [
        ["learned model (cvnn)", n_opt, *quantiles(err)],
        ["learned, options whose truth has se <= 0.2 bp", int(quiet.sum()), *quantiles(err[quiet])],
        ["learned, error beyond 3 truth se (0 if within)", n_opt, *quantiles((err - 3 * se_bp).clamp(min=0))],
        ["server's out-of-domain reference (COS on a 2^16-path MC CF)", len(ref_rows), *quantiles(err_ref)],
        ["truth's own standard error", n_opt, *quantiles(se_bp)],
    ]
    print(f"held-out: {args.points} points x 13 strikes x put/call = {n_opt} options; truth {t_truth:.0f} s")
    acc_table = table(["engine vs control-variate MC truth", "options", "p50 bp", "p95 bp", "max bp"], rows)
    print(acc_table)

    bucket_rows = []
    n_fix = batch.theta[:, 2]
    for lo, hi in [(2, 4), (5, 12), (13, 32), (33, 64)]:
        sel = (n_fix >= lo) & (n_fix <= hi)
        if bool(sel.any()):
            bucket_rows.append([f"{lo} to {hi} fixings", int(sel.sum()), *quantiles(err[sel])])
    bucket_table = table(["fixings", "options", "p50 bp", "p95 bp", "max bp"], bucket_rows)
    print(bucket_table)

    speed_set = held_out(served, args.speed_points)
    distinct = speed_set.select(torch.arange(0, len(speed_set), 26))
    measures = frozenset({"price"})
    t_distinct = timeit(lambda: served.pricer.evaluate(distinct, measures), repeat=5, quick=args.quick)
    t_shared = timeit(lambda: served.pricer.evaluate(batch, measures), repeat=3, quick=args.quick)
    t_greeks = timeit(
        lambda: served.pricer.evaluate(batch, frozenset({"price", "delta", "gamma", "vega", "theta", "rho"})),
        repeat=3,
        quick=args.quick,
    )
    p95 = quantiles(err)[1]
    ql_out = quantlib_side(served, args.ql_points, p95 * SPOT / 1e4, args.paths)
    n_ql = len(ql_out["choi_t"])
    speed_rows = [
        ["learned: distinct (theta, T) per option, price", len(distinct), t_distinct / len(distinct) * 1e6],
        ["learned: 26 options per (theta, T), price", n_opt, t_shared / n_opt * 1e6],
        ["learned: 26 options per (theta, T), price + 5 Greeks", n_opt, t_greeks / n_opt * 1e6],
        ["server's out-of-domain reference, 26 options per point, price", len(ref_rows), t_ref / len(ref_rows) * 1e6],
        ["QuantLib ChoiAsianEngine", n_ql, 1e6 * sum(ql_out["choi_t"]) / n_ql],
        [
            f"QuantLib MCDiscreteArithmeticAPEngine + control variate, tolerance = model p95 ({p95:.2g} bp)",
            n_ql,
            1e6 * sum(ql_out["mc_t"]) / n_ql,
        ],
    ]
    speed_table = table(["engine", "options", "us per option"], speed_rows)
    print(speed_table)
    ql_errors = (
        f"On the {n_ql} QuantLib options (whole-day fixings, K = F_A) against the same truth: "
        f"learned max {max(ql_out['ours_err']):.2g} bp; Choi max {max(ql_out['choi_err']):.2g} bp; "
        f"QuantLib MC p50 {sorted(ql_out['mc_err'])[n_ql // 2]:.2g} bp, max {max(ql_out['mc_err']):.2g} bp."
    )
    print(ql_errors)

    history = timed_history(ckpt.manifest)  # validations with their wall-clock seconds
    state = ckpt.manifest["state"]
    plot_path = plot_file(args, "accuracy_asian.png")
    plot(plot_path, "asian", err, batch.expiry, history)
    print(f"plot: {plot_path}")
    if args.record:
        run = run_facts(ckpt.manifest)  # command and seconds: in "run", or where older manifests kept them
        train_cmd = run["command"] or "(not recorded)"
        domain = ", ".join(
            f"{r.name} in [{r.low:g}, {r.high:g}]{' (log)' if r.scale == 'log' else ''}" for r in served.domain.ranges
        )
        body = f"""### Asian accuracy and speed (bundled model)

Model `{model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir}`,
content hash `{ckpt.content_hash}`, trained with `{train_cmd}`:
{state["step"]} steps, {state["paths_simulated"]:.3g} paths, {run["elapsed_seconds"] / 60:.1f} min of training
(2 torch threads). Domain: {domain}.
Held-out: {args.points} Sobol points x 13 strikes K/F_A in [0.7, 1.3] x put/call = {n_opt} options,
S = 100, q = 1%, r = carry + q. Truth: control-variate MC with {args.paths:,} antithetic paths per
point ({t_truth:.0f} s). Error = |price - truth| in basis points of spot.

{acc_table}

By number of fixings:

{bucket_table}

Speed (median of repeated runs, one process, 2 threads):

{speed_table}

{ql_errors}

![accuracy](img/accuracy_asian.png)
"""
        record("accuracy_asian", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
