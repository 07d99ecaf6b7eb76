"""Accuracy and speed of the bundled rough Bergomi model against the reference Monte Carlo.

Held-out set: P points of a scrambled Sobol sequence (a scramble neither training nor
validation uses) over the model's domain (H, eta, rho, xi0, T), times 13 strikes K/F in
[0.7, 1.3], times put and call; S = 100, r = 3%, q = 1%. Truth: the reference Monte
Carlo on the same scheme (engine/rbergomi_reference.py rbergomi_european_mc: the hybrid
scheme in 256 steps, the mixed estimator given W, antithetic pairs and two control
variates, 2^16 paths a point by default); its own standard error is reported beside the
error. Error: |price - truth| in basis points of spot, and the implied-vol error in vol
points (Black vol of the out-of-the-money option; options whose truth is under 1 bp of
the forward are left out of that row, where a vol is ill-defined).

Speed: the learned pricer per option at distinct parameter points (one option each) and
at shared ones (26 options a point), next to the reference Monte Carlo run with the
paths that bring its standard error to the model's p95 (the same tolerance): options/s
and the ratio.

    python bench/accuracy_rbergomi.py --record        # full run, writes docs/
    python bench/accuracy_rbergomi.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_models import DIV, SPOT, STRIKES, held_out, plot
from common import ROOT, output_args, plot_file, quantiles, record, table, timeit

from spectralmc_server.engine.checkpoint import read_dir, run_facts, timed_history
from spectralmc_server.engine.rbergomi_reference import black_undiscounted, rbergomi_european_mc
from spectralmc_server.engine.served import Evaluation, load_served_model
from spectralmc_server.models import bundled_models

F64 = torch.float64
P95_TARGET, MAX_TARGET = 5.0, 25.0  # bp of spot (issue 21)
K = len(STRIKES)
# The truth is re-priced with --fine-paths at the points of the worst REFINE_SHARE of the
# options whose truth's 3 SE is at least REFINE_SE_SHARE of their error: there the
# truth's own noise is a large part of the error measured (engine/certify.py's
# noisy_worst_rows has the same test over a smaller share, ranking error + 3 SE, the
# certificate's error; here the error alone is ranked, since a max of it is what the
# target bounds). An option
# outside that set has an error under the set's smallest, so the max measured after it is
# the model's, not the truth's noise.
REFINE_SHARE = 0.01
REFINE_SE_SHARE = 0.25
FINE_SEED = 12345  # neither the base truth's (7) nor the timing runs' (99)


def truth(theta: torch.Tensor, t: torch.Tensor, paths: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Prices and standard errors (points, 26) in money, the held-out layout."""
    log_kappa = torch.log(STRIKES).repeat_interleave(2)[None, :].expand(len(t), 2 * K).contiguous()
    is_call = (torch.arange(2 * K) % 2 == 1)[None, :].expand(len(t), 2 * K)
    out_p, out_s = [], []
    for i in range(0, len(t), 32):
        sl = slice(i, i + 32)
        mc = rbergomi_european_mc(theta[sl], t[sl], log_kappa[sl], paths, is_call=is_call[sl], seed=seed)
        out_p.append(mc.price)
        out_s.append(mc.stderr)
    scale = (SPOT * torch.exp(-DIV * t))[:, None]  # D F = S e^{-q T}
    return torch.cat(out_p) * scale, torch.cat(out_s) * scale


def refine(
    err: torch.Tensor, se_bp: torch.Tensor, theta: torch.Tensor, t: torch.Tensor, fine_paths: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The points to re-price (their indices) and their finer truth (prices and standard
    errors, (n, 26) in money), or None where no worst option's error is noise-dominated."""
    worst = err.argsort(descending=True)[: max(1, math.ceil(REFINE_SHARE * len(err)))]
    noisy = worst[3.0 * se_bp[worst] >= REFINE_SE_SHARE * err[worst]]
    points = torch.unique(noisy // (2 * K))
    if len(points) == 0:
        return points, None, None
    fine, fine_se = truth(theta[points], t[points], fine_paths, seed=FINE_SEED)
    return points, fine, fine_se


def implied_vol(price_fwd: torch.Tensor, kappa: torch.Tensor, t: torch.Tensor, is_call: torch.Tensor) -> torch.Tensor:
    """Black vol of undiscounted prices in units of the forward, by bisection (NaN where
    the price is outside the no-arbitrage bounds)."""
    sign = torch.where(is_call, -1.0, 1.0).to(F64)
    lo = torch.full_like(price_fwd, 1e-4)
    hi = torch.full_like(price_fwd, 5.0)
    one = torch.ones_like(price_fwd)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        p = black_undiscounted(one, kappa, mid * mid * t, sign)
        high = p > price_fwd
        hi = torch.where(high, mid, hi)
        lo = torch.where(high, lo, mid)
    vol = 0.5 * (lo + hi)
    intrinsic = (sign * (kappa - 1.0)).clamp(min=0.0)
    bad = (price_fwd <= intrinsic) | (price_fwd >= torch.where(is_call, one, kappa))
    return torch.where(bad, torch.full_like(vol, float("nan")), vol)


def mc_time_per_point(theta: torch.Tensor, t: torch.Tensor, paths: int) -> float:
    """Seconds a point (its 26 options) takes the reference MC with ``paths`` paths."""
    paths = max(4, 2 * math.ceil(paths / 2))
    t0 = time.perf_counter()
    truth(theta, t, paths, seed=99)
    return (time.perf_counter() - t0) / len(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled rbergomi model)")
    ap.add_argument("--points", type=int, default=200, help="held-out parameter points (x 26 options)")
    ap.add_argument("--paths", type=int, default=1 << 16, help="paths of the reference truth per point")
    ap.add_argument("--speed-points", type=int, default=2048, help="distinct points for the inference timing")
    ap.add_argument("--mc-points", type=int, default=8, help="points the reference MC is timed on at the model's p95")
    ap.add_argument("--fine-paths", type=int, default=1 << 18, help="paths of the truth where it is refined")
    ap.add_argument("--quick", action="store_true", help="small sets: a smoke test")
    output_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.points, args.paths, args.speed_points, args.mc_points, args.fine_paths = 4, 1 << 10, 64, 2, 1 << 12
    model_dir = args.model or bundled_models()["rbergomi"]
    ckpt = read_dir(model_dir, need_training=False)
    served = load_served_model(ckpt, require_certificate=False)
    theta, t, batch = held_out(served, args.points)
    n_opt = len(batch)
    t0 = time.perf_counter()
    base, base_se = truth(theta, t, args.paths)
    t_truth = time.perf_counter() - t0
    if not bool(served.pricer.servable(batch, frozenset({"price"})).all()):
        raise SystemExit("the held-out set must lie inside the model's domain and K/F range")
    learned = served.pricer.learned.evaluate(batch, frozenset({"price"}))
    ev = Evaluation(learned, torch.ones(n_opt, dtype=torch.bool))
    price = ev.values["price"]
    err_base = (price - base.flatten()).abs() / SPOT * 1e4
    t0 = time.perf_counter()
    refined, fine, fine_se = refine(err_base, base_se.flatten() / SPOT * 1e4, theta, t, args.fine_paths)
    t_refine = time.perf_counter() - t0
    true, stderr = base.clone(), base_se.clone()
    if fine is not None and fine_se is not None:
        true[refined], stderr[refined] = fine, fine_se
    true, stderr = true.flatten(), stderr.flatten()
    err = (price - true).abs() / SPOT * 1e4
    se_bp = stderr / SPOT * 1e4
    refined_note = (
        f"the truth re-priced with {args.fine_paths:,} paths at {len(refined)} points (those of the worst "
        f"{REFINE_SHARE:.0%} of the options whose truth's 3 SE is at least {REFINE_SE_SHARE:g} of their error; "
        f"{t_refine:.0f} s)"
    )

    # implied vols of the out-of-the-money side, in vol points
    df = SPOT * torch.exp(-DIV * batch.expiry)  # D F
    kappa = STRIKES[(torch.arange(n_opt) // 2) % K]
    otm = torch.where(kappa < 1.0, ~batch.is_call, batch.is_call)
    vol_true = implied_vol(true / df, kappa, batch.expiry, batch.is_call)
    vol_ours = implied_vol(price / df, kappa, batch.expiry, batch.is_call)
    keep = otm & (true / df >= 1e-4) & vol_true.isfinite() & vol_ours.isfinite()
    vol_err = (vol_ours - vol_true).abs()[keep] * 100.0

    quiet = se_bp <= 0.5
    rows = [
        [f"learned model (cvnn), truth {args.paths:,} paths a point", n_opt, *quantiles(err_base)],
        [f"learned model (cvnn), truth refined at {len(refined)} points", n_opt, *quantiles(err)],
        ["learned, options whose truth has se <= 0.5 bp", int(quiet.sum()), *quantiles(err[quiet])],
        ["learned, error beyond 3 truth se (0 if within)", n_opt, *quantiles((err - 3 * se_bp).clamp(min=0))],
        ["truth's own standard error", n_opt, *quantiles(se_bp)],
    ]
    print(f"held-out: {args.points} points x 13 strikes x put/call = {n_opt} options; truth {t_truth:.0f} s")
    print(f"refined: {refined_note}")
    acc_table = table(["learned vs reference MC", "options", "p50 bp", "p95 bp", "max bp"], rows)
    print(acc_table)
    vol_table = table(
        ["implied vol (OTM side, truth >= 1 bp of F)", "options", "p50 vol pts", "p95 vol pts", "max vol pts"],
        [["learned vs reference MC", int(keep.sum()), *quantiles(vol_err)]],
    )
    print(vol_table)
    bucket_rows = []
    h = batch.theta[:, 0]
    eta = batch.theta[:, 1]
    for name, sel in [
        ("H < 0.1", h < 0.1),
        ("H >= 0.1", h >= 0.1),
        ("eta < 2", eta < 2.0),
        ("eta >= 2", eta >= 2.0),
        ("T < 0.25", batch.expiry < 0.25),
        ("T >= 0.25", batch.expiry >= 0.25),
    ]:
        if bool(sel.any()):
            bucket_rows.append([name, int(sel.sum()), *quantiles(err[sel])])
    bucket_table = table(["slice", "options", "p50 bp", "p95 bp", "max bp"], bucket_rows)
    print(bucket_table)

    # speed
    _, _, speed_set = held_out(served, args.speed_points)
    distinct = speed_set.select(torch.arange(0, len(speed_set), 2 * K))
    measures = frozenset({"price"})
    # the learned path: what the server runs for a contract inside the domain whose
    # learned price keeps the model-free bounds (the rest go to the reference, counted)
    t_distinct = timeit(lambda: served.pricer.learned.evaluate(distinct, measures), repeat=5, quick=args.quick) / len(
        distinct
    )
    t_shared = timeit(lambda: served.pricer.learned.evaluate(batch, measures), repeat=3, quick=args.quick) / n_opt
    ok = served.pricer._learned(batch, measures, None)[0]  # the served pricer's own check
    fell_back = (
        f"The served pricer sends {int((~ok).sum())} of the {n_opt} held-out options to the reference "
        "(a learned price past a model-free bound)."
    )
    print(fell_back)
    p95 = quantiles(err)[1]
    # paths for the reference's standard error to reach the model's p95, per point: the
    # median over the held-out set of paths x (se / p95)^2
    need = float(torch.quantile(args.paths * (se_bp.view(-1, 2 * K).max(1).values / p95) ** 2, 0.5))
    m = min(args.mc_points, args.points)
    t_mc_point = mc_time_per_point(theta[:m], t[:m], int(need))
    speed_rows = [
        ["learned: distinct (theta, T) per option, price", len(distinct), t_distinct * 1e6, 1.0 / t_distinct],
        ["learned: 26 options per (theta, T), price", n_opt, t_shared * 1e6, 1.0 / t_shared],
        [
            f"reference MC at se = model p95 ({p95:.2g} bp; {int(need):,} paths), one option per point",
            m,
            t_mc_point * 1e6,
            1.0 / t_mc_point,
        ],
        [
            "reference MC at se = model p95, 26 options per point",
            m * 2 * K,
            t_mc_point / (2 * K) * 1e6,
            2 * K / t_mc_point,
        ],
    ]
    speed_table = table(["engine", "options", "us per option", "options/s"], speed_rows)
    print(speed_table)
    ratio_distinct = t_mc_point / t_distinct
    ratio_shared = (t_mc_point / (2 * K)) / t_shared
    ratios = (
        f"Learned over reference MC at equal tolerance: {ratio_distinct:,.0f}x faster at distinct points, "
        f"{ratio_shared:,.0f}x with 26 options a point."
    )
    print(ratios)

    history = timed_history(ckpt.manifest)
    plot_path = plot_file(args, "accuracy_rbergomi.png")
    plot(plot_path, "rbergomi", err, batch.expiry, history, targets=(P95_TARGET, MAX_TARGET), truth_se=se_bp)
    print(f"plot: {plot_path}")
    if args.record:
        run = run_facts(ckpt.manifest)
        train_cmd = run["command"] or "(not recorded)"
        state = ckpt.manifest["state"]
        domain = ", ".join(
            f"{r.name} in [{r.low:g}, {r.high:g}]{' (log)' if r.scale == 'log' else ''}" for r in served.domain.ranges
        )
        met = "met" if p95 <= P95_TARGET and float(err.max()) <= MAX_TARGET else "not met"
        body = f"""### Rough Bergomi accuracy and speed (bundled model)

Model `{model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir}`,
content hash `{ckpt.content_hash}`, trained with `{train_cmd}`:
{state["step"]} steps, {state["paths_simulated"]:.3g} paths, {run["elapsed_seconds"] / 60:.1f} min of training
(2 torch threads). Domain: {domain}.
Held-out: {args.points} Sobol points x 13 strikes K/F in [0.7, 1.3] x put/call = {n_opt} options,
S = 100, r = 3%, q = 1%. Truth: the reference MC on the same 256-step hybrid scheme, {args.paths:,} paths
a point (mixed estimator, antithetic, two control variates; {t_truth:.0f} s), then {refined_note}:
where the truth's noise is a large part of the worst errors, a finer truth measures the model's own.
The rows below the first are against the refined truth. Error = |price - truth| in
basis points of spot. Targets p95 <= {P95_TARGET:g} bp, max <= {MAX_TARGET:g} bp (against the refined
truth): **{met}**.

{acc_table}

{vol_table}

By slice:

{bucket_table}

Speed (median of repeated runs, one process, 2 threads):

{speed_table}

{ratios} {fell_back}

![accuracy](img/accuracy_rbergomi.png)
"""
        record("accuracy_rbergomi", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
