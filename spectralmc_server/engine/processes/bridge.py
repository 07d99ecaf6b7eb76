"""Brownian-bridge construction of Brownian increments from independent normals.

With quasi-random normals the first coordinates of a point are the best distributed,
so they should decide what matters most. The bridge uses normal 0 for the path's end
point, normal 1 for its midpoint, then the quarter points and so on, each drawn from
its conditional law given its two neighbours. The increments it returns are jointly
i.i.d. N(0, 1) exactly like the input (the map is an orthogonal change of basis of
the same Brownian path), so any scheme consuming them is unchanged in law.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=64)
def bridge_plan(n: int) -> tuple[tuple[int, int, int, float, float, float], ...]:
    """For W at grid points 1..n (W_0 = 0) with unit spacing: the order in which each
    point is drawn, as (point, left, right, weight_left, weight_right, stdev); left 0
    is the origin, right -1 means unconstrained (the end point)."""
    plan: list[tuple[int, int, int, float, float, float]] = [(n, 0, -1, 0.0, 0.0, math.sqrt(n))]
    intervals = [(0, n)]
    while intervals:
        nxt = []
        for lo, hi in intervals:
            if hi - lo < 2:
                continue
            mid = (lo + hi) // 2
            wl = (hi - mid) / (hi - lo)
            wr = (mid - lo) / (hi - lo)
            sd = math.sqrt((mid - lo) * (hi - mid) / (hi - lo))
            plan.append((mid, lo, hi, wl, wr, sd))
            nxt += [(lo, mid), (mid, hi)]
        intervals = nxt
    return tuple(plan)


def brownian_bridge(z: torch.Tensor) -> torch.Tensor:
    """z (..., n) i.i.d. normals in bridge order -> (..., n) i.i.d. normal increments in
    time order (W_{i+1} - W_i for a unit-spaced path)."""
    n = z.shape[-1]
    if n == 1:
        return z
    w = torch.zeros((*z.shape[:-1], n + 1), dtype=z.dtype, device=z.device)  # W_0..W_n
    for k, (pt, lo, hi, wl, wr, sd) in enumerate(bridge_plan(n)):
        if hi < 0:
            w[..., pt] = sd * z[..., k]
        else:
            w[..., pt] = wl * w[..., lo] + wr * w[..., hi] + sd * z[..., k]
    return w[..., 1:] - w[..., :-1]
