"""Rough Bergomi (engine/processes/rbergomi.py): the hybrid scheme's discretisation bias,
its Volterra approximation against the exact scheme, the reference's variance reduction,
and the simulator's speed.

1. Bias by step count. Each point's out-of-the-money options at log K/F = -s, 0, +s
   (s = sqrt(xi0 T); puts, puts, calls) are priced on n steps and on 4n steps. The coarse
   grid's normals are the fine grid's: Z_perp, the first n bridge normals (which fix W on
   the coarse grid: a coarse path is the fine path seen on the coarse grid) and n - 1
   of the fine residual normals. The difference coarse - fine is averaged over paths
   with both grids' controls (their means are exactly 0) as control variates; its
   standard error SE is printed with it. Prices are the mixed estimator (Black given W),
   antithetic, in bp of the forward.
2. Hybrid against exact on one grid: the same normals drive both (the exact scheme's
   Cholesky factor takes the increments first, so W is the same path), and the
   difference is the hybrid scheme's Volterra approximation alone.
3. Variance reduction of the reference Monte Carlo at equal paths: VRF = SE(plain)^2 /
   SE(technique)^2, and per unit of time.
4. Speed of RoughBergomiProcess.simulate_x (the trainer's call): paths per second over a
   batch of points of different T, float32 and float64, normals given (and with their
   generation).

    python bench/rbergomi_bias.py              # 2^16 paths per point (a few minutes on 2 cores)
    python bench/rbergomi_bias.py --quick      # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table

from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.processes.rbergomi import DEFAULT_STEPS, RoughBergomiProcess, hybrid_paths
from spectralmc_server.engine.rbergomi_reference import (
    ControlledMean,
    Estimator,
    exact_paths,
    pair_average,
    payoff_samples,
    rbergomi_european_mc,
    rbergomi_normals,
)

F64 = torch.float64
CPU = torch.device("cpu")
# (H, eta, rho, xi0, T): a grid over H and eta at T = 1, the expiry range at a typical
# point, and the domain's roughest corner at both ends of the expiry range.
BIAS_POINTS = [
    *((h, eta, -0.9, 0.04, 1.0) for h in (0.025, 0.05, 0.1, 0.2, 0.5) for eta in (0.5, 1.5, 2.5, 4.0)),
    (0.1, 1.9, -0.9, 0.04, 0.03),
    (0.1, 1.9, -0.9, 0.04, 0.25),
    (0.1, 1.9, -0.9, 0.04, 2.0),
    (0.025, 4.0, -0.95, 0.16, 0.03),
    (0.025, 4.0, -0.95, 0.16, 2.0),
]
VR_POINTS = [(0.1, 1.9, -0.9, 0.04, 1.0), (0.3, 1.0, -0.5, 0.09, 0.5), (0.05, 2.5, -0.7, 0.02, 0.1)]
VR_TECHNIQUES: list[tuple[str, Estimator, bool, bool]] = [
    ("plain", "plain", False, False),
    ("antithetic", "plain", True, False),
    ("mixed", "mixed", False, False),
    ("mixed + antithetic", "mixed", True, False),
    ("mixed + antithetic + CV", "mixed", True, True),
]


def strikes(theta: torch.Tensor, expiry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log K/F = -s, 0, +s (B, 3) and the put sign (B, 1, 3): puts, puts, calls."""
    s = torch.sqrt(theta[:, 3] * expiry)
    log_k = torch.stack([-s, torch.zeros_like(s), s], dim=1)
    sign = torch.tensor([1.0, 1.0, -1.0], dtype=F64)[None, None, :].expand(len(s), 1, 3)
    return log_k, sign


def as_tensors(points: Sequence[tuple[float, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([p[:4] for p in points], dtype=F64), torch.tensor([p[4] for p in points], dtype=F64)


def bias_by_steps(
    points: Sequence[tuple[float, ...]], coarse: list[int], fine: int, paths: int, chunk: int
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """coarse - fine per point and strike, with its standard error, for each coarse n;
    and the fine price with its standard error (bp)."""
    theta, expiry = as_tensors(points)
    log_k, sign = strikes(theta, expiry)
    kappa = torch.exp(log_k)[:, None, :]
    fine_acc, diff_acc = ControlledMean(), {n: ControlledMean() for n in coarse}
    for block in range(max(1, paths // chunk)):
        z = rbergomi_normals(7, block, chunk, len(points), fine, antithetic=True, device=CPU)
        pay_f, c_f = (
            pair_average(x)
            for x in payoff_samples(theta, expiry, hybrid_paths(theta, expiry, z, fine), kappa, sign, "mixed")
        )
        fine_acc.add(pay_f, c_f)
        for n in coarse:
            zc = torch.cat([z[..., : n + 1], z[..., fine + 1 : fine + n]], dim=-1)  # Z_perp, bridge, residuals
            paths_c = hybrid_paths(theta, expiry, zc, n)
            pay_c, c_c = (pair_average(x) for x in payoff_samples(theta, expiry, paths_c, kappa, sign, "mixed"))
            diff_acc[n].add(pay_c - pay_f, torch.cat([c_c, c_f], dim=-1))
    out = {}
    for n, acc in diff_acc.items():
        r = acc.result()
        out[n] = (r.price * 1e4, r.stderr * 1e4)
    f = fine_acc.result()
    return out, (f.price * 1e4, f.stderr * 1e4)


def hybrid_against_exact(
    points: Sequence[tuple[float, ...]], steps: int, paths: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """hybrid - exact on the same normals and grid (bp), with its standard error."""
    theta, expiry = as_tensors(points)
    log_k, sign = strikes(theta, expiry)
    kappa = torch.exp(log_k)[:, None, :]
    acc = ControlledMean()
    for block in range(max(1, paths // chunk)):
        z = rbergomi_normals(8, block, chunk, len(points), steps, antithetic=True, device=CPU)
        pay_h, c_h = (
            pair_average(x)
            for x in payoff_samples(theta, expiry, hybrid_paths(theta, expiry, z, steps), kappa, sign, "mixed")
        )
        pay_e, c_e = (
            pair_average(x)
            for x in payoff_samples(theta, expiry, exact_paths(theta, expiry, z, steps), kappa, sign, "mixed")
        )
        acc.add(pay_h - pay_e, torch.cat([c_h, c_e], dim=-1))
    r = acc.result()
    return r.price * 1e4, r.stderr * 1e4


def variance_reduction(steps: int, paths: int) -> list[list[object]]:
    """VRF per technique, point and strike at equal paths, and each technique's time per
    path against plain Monte Carlo's (after a warm-up call)."""
    theta, expiry = as_tensors(VR_POINTS)
    log_k, sign = strikes(theta, expiry)
    is_call = (sign[:, 0, :] < 0).expand(len(VR_POINTS), 3)
    rows: list[list[object]] = []
    base: torch.Tensor | None = None
    base_time = 0.0
    for name, estimator, antithetic, cv in VR_TECHNIQUES:
        elapsed = 0.0
        for n_paths, seed in ((64, 2), (paths, 3)):  # a warm-up call, then the measured one
            t0 = time.perf_counter()
            r = rbergomi_european_mc(
                theta, expiry, log_k, n_paths, is_call=is_call, steps=steps, estimator=estimator,
                antithetic=antithetic, control_variate=cv, seed=seed,
            )  # fmt: skip
            elapsed = time.perf_counter() - t0
        var = r.stderr.square()
        if base is None:
            base, base_time = var, elapsed
        vrf = base / var  # (P, 3)
        for p in range(len(VR_POINTS)):
            factors = [f"{float(vrf[p, k]):.1f}" for k in range(3)]
            rows.append([name, _point(VR_POINTS[p]), *factors, f"{elapsed / base_time:.2f}"])
    return rows


def speed(steps: int, points: int, paths: int) -> list[list[object]]:
    process = RoughBergomiProcess(steps)
    theta = torch.tensor([[0.1, 1.9, -0.9, 0.04]] * points, dtype=F64)
    expiry = torch.logspace(-1.5, 0.3, points, dtype=F64)  # 0.03 .. 2 years
    rows: list[list[object]] = []
    for dtype in ("float32", "float64"):
        cfg = NormalsConfig(
            seed=1, mode="pseudo", antithetic=True, rows=paths, dims=points * process.normals_per_path, dtype=dtype
        )
        t0 = time.perf_counter()
        block = generate_block(cfg, 0, CPU)
        gen = time.perf_counter() - t0
        z = block.view(paths, points, -1).transpose(0, 1)
        process.simulate_x(theta, expiry, z)  # warm
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            process.simulate_x(theta, expiry, z)
            best = min(best, time.perf_counter() - t0)
        total = points * paths
        rows.append([dtype, steps, points, paths, f"{total / best:,.0f}", f"{total / (best + gen):,.0f}"])
    return rows


def _point(p: tuple[float, ...]) -> str:
    return f"H {p[0]:g}, eta {p[1]:g}, rho {p[2]:g}, xi0 {p[3]:g}, T {p[4]:g}"


def _cells(value: torch.Tensor, err: torch.Tensor, p: int) -> list[str]:
    return [f"{float(value[p, k]):+.2f} ± {float(err[p, k]):.2f}" for k in range(value.shape[1])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="the grid measured (fine grid: 4x)")
    ap.add_argument("--paths", type=int, default=1 << 16, help="paths per point (antithetic pairs count twice)")
    ap.add_argument("--quick", action="store_true", help="few points, few paths, a coarse grid")
    ap.add_argument("--only", choices=["bias", "exact", "vr", "speed"], action="append", help="run these parts only")
    args = ap.parse_args(argv)
    steps, paths = args.steps, args.paths
    points, exact_points = BIAS_POINTS, BIAS_POINTS[:20]
    if args.quick:
        steps, paths, points, exact_points = 32, 2048, BIAS_POINTS[8:10], BIAS_POINTS[8:10]
    chunk = max(2, min(paths, (1 << 24) // (len(points) * 8 * steps * 2)))
    chunk -= chunk % 2
    print(f"machine: {machine()}")
    parts = set(args.only or ["bias", "exact", "vr", "speed"])

    if "bias" in parts:
        coarse = sorted({max(steps // 4, 2), max(steps // 2, 2), steps})
        t0 = time.perf_counter()
        diffs, (fine_price, fine_err) = bias_by_steps(points, coarse, 4 * steps, paths, chunk)
        took = time.perf_counter() - t0
        print(f"\n1. bias of n steps against {4 * steps} steps, bp of the forward (K/F = e^-s, 1, e^s)")
        print(f"   {paths} paths per point, {took:.0f} s")
        rows = []
        for p, pt in enumerate(points):
            for n in coarse:
                rows.append([_point(pt), n, *_cells(diffs[n][0], diffs[n][1], p)])
            rows.append([_point(pt), f"price at {4 * steps}", *_cells(fine_price, fine_err, p)])
        print(table(["point", "steps", "put -s", "put ATM", "call +s"], rows))

    if "exact" in parts:
        t0 = time.perf_counter()
        he, he_err = hybrid_against_exact(exact_points, steps, paths, chunk)
        took = time.perf_counter() - t0
        print(f"\n2. hybrid - exact on {steps} steps, same normals, bp ({paths} paths, {took:.0f} s)")
        rows = [[_point(pt), *_cells(he, he_err, p)] for p, pt in enumerate(exact_points)]
        print(table(["point", "put -s", "put ATM", "call +s"], rows))

    if "vr" in parts:
        vr_paths = paths if not args.quick else 1024
        print(
            f"\n3. variance reduction of the reference MC ({steps} steps, {vr_paths} paths): VRF = SE(plain)^2 / SE^2"
        )
        headers = ["technique", "point", "put -s", "put ATM", "call +s", "time / plain time"]
        print(table(headers, variance_reduction(steps, vr_paths)))

    if "speed" in parts:
        print(f"\n4. speed of simulate_x ({steps} steps, {torch.get_num_threads()} threads), paths per second")
        sp = speed(steps, 4 if args.quick else 16, 1024 if args.quick else 4096)
        print(table(["dtype", "steps", "points", "paths/point", "normals given", "with generation"], sp))
    print("plot: none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
