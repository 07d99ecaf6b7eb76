"""Torch-free twins of the processes' closed forms that validating a request needs.

The engine computes the spread s(theta, T) (``Process.scale``) and the forward ratio F / S
(``Process.forward_ratio``) on tensors. A request is validated with the same formulas
(pricing/schemas.py one contract at a time, pricing/columns.py a book at a time), here
without torch: a scalar twin in ``math`` for one contract and a vectorised twin in numpy
for a book, each the torch formula's operations in the torch formula's order.

How close they are (tests/engine/test_process_twins.py, float64, over each process's
param_bounds and EXPIRY_BOUNDS). With torch's own sqrt, exp and expm1 in place of math's
and numpy's, every twin is the torch formula bit for bit (rounding and clamping of the
fixings, and T6's sum in ATen's order, included). With their own, the last bits differ:
torch's CPU kernels compute float64 sqrt, exp and expm1 with their own vectorised code
(also for a one-element tensor), an ulp off the correctly rounded value on ~0.8%, ~3%
and ~2% of arguments, where math's are correctly rounded (sqrt) or all but (glibc's exp
and expm1), and numpy's are the same or, on an AVX-512 CPU, torch's exp bit for bit.
Measured: gbm and asian scale (T1, T4) up to 2 ulp, merton scale (T3) and e^{(r - q) T}
(T5) 1 ulp, the asian forward ratio (T6, 64 exponentials) 4 ulp; heston scale (T2) up to
1.8e-13 relative, where v0 << theta and its two terms nearly cancel (1 ulp where they add).

A bound is checked on these values with slack: the columnar validator hands every row
within ``BORDER`` (1e-9 relative) of a bound to the row validator (pricing/columns.py),
so the numpy and ``math`` twins never give a book and its rows different verdicts.

The twins take parameters within the process's param_bounds (the validators check those
first); outside them the ``math`` twins may raise where torch would answer inf or nan.
This module imports neither torch nor anything of the engine (the package's __init__
still imports the torch processes: a process without torch imports this file alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]

MAX_FIXINGS = 64  # an Asian's fixings: at most this many (a path takes this many normals)

# ATen's CPU sum of a contiguous float64 row of MAX_FIXINGS terms: four accumulators of
# four lanes, accumulator k lane l adding terms 16 i + 4 k + l for i = 0..3 in turn; then
# the accumulators in turn; then the lanes in turn (torch 2.13, whatever the CPU's SIMD
# width; tests/engine/test_process_twins.py checks the order against torch.sum).
_LANES = 4
_ACCUMULATORS = 4
_ROUNDS = MAX_FIXINGS // (_LANES * _ACCUMULATORS)


def _sqrt(x: float) -> float:
    """sqrt, nan below 0 (as torch)."""
    return math.sqrt(x) if x >= 0.0 else math.nan


# -- scalar twins (math) ------------------------------------------------------------------


def gbm_scale(theta: Sequence[float], expiry: float) -> float:
    """T1, GBMProcess.scale: vol sqrt(T)."""
    return theta[0] * _sqrt(expiry)


def heston_scale(theta: Sequence[float], expiry: float) -> float:
    """T2, HestonProcess.scale: sqrt(theta T + (v0 - theta)(1 - e^{-kappa T}) / kappa)."""
    v0, kappa, mean_v = theta[0], theta[1], theta[2]
    integral = mean_v * expiry + (v0 - mean_v) * (-math.expm1(-kappa * expiry)) / kappa
    return _sqrt(integral)


def merton_scale(theta: Sequence[float], expiry: float) -> float:
    """T3, MertonProcess.scale: sqrt((sigma^2 + lambda (mu_j^2 + sigma_j^2)) T)."""
    sigma, lam, mu_j, sigma_j = theta[0], theta[1], theta[2], theta[3]
    return _sqrt((sigma * sigma + lam * (mu_j * mu_j + sigma_j * sigma_j)) * expiry)


def fixing_count(fixings: float) -> float:
    """asian.fixing_count: n rounded (half to even, as torch.round) and clamped to
    [1, MAX_FIXINGS], as a float."""
    if math.isnan(fixings):
        return math.nan
    n = float(round(fixings)) if math.isfinite(fixings) else fixings
    return min(max(n, 1.0), float(MAX_FIXINGS))


def geometric_scale(theta: Sequence[float], expiry: float) -> float:
    """T4, asian.geometric_scale (AsianProcess.scale): vol sqrt(T (n + 1)(2n + 1) / (6 n^2))
    for theta = (vol, carry, fixings)."""
    n = fixing_count(theta[2])
    return theta[0] * _sqrt(expiry * (n + 1.0) * (2.0 * n + 1.0) / (6.0 * n * n))


def forward_ratio(rate: float, dividend: float, expiry: float) -> float:
    """T5, Process.forward_ratio of a European: e^{(r - q) T}."""
    return math.exp((rate - dividend) * expiry)


def sum_fixings(terms: Sequence[float]) -> float:
    """The sum of MAX_FIXINGS terms, added in ATen's CPU order (see _LANES above)."""
    acc = [[0.0] * _LANES for _ in range(_ACCUMULATORS)]
    for i in range(_ROUNDS):
        for k, lanes in enumerate(acc):
            base = (i * _ACCUMULATORS + k) * _LANES
            for lane in range(_LANES):
                lanes[lane] += terms[base + lane]
    total = acc[0]
    for lanes in acc[1:]:
        total = [a + b for a, b in zip(total, lanes, strict=True)]
    out = 0.0
    for value in total:
        out += value
    return out


def average_forward_ratio(theta: Sequence[float], expiry: float) -> float:
    """T6, asian.average_forward_ratio (AsianProcess.forward_ratio): F_A / S =
    (1/n) sum_{i <= n} e^{b t_i}, t_i = i T / n, for theta = (vol, carry b, fixings)."""
    carry, n = theta[1], fixing_count(theta[2])
    terms = [0.0] * MAX_FIXINGS
    for i in range(1, MAX_FIXINGS + 1):
        if float(i) <= n:
            terms[i - 1] = math.exp(carry * (float(i) * expiry / n))
    return sum_fixings(terms) / n


# -- vectorised twins (numpy) ---------------------------------------------------------------


def _column(theta: Floats, j: int) -> Floats:
    return np.ascontiguousarray(theta[:, j], dtype=np.float64)


def gbm_scale_np(theta: Floats, expiry: Floats) -> Floats:
    """T1 for theta (B, 1), T (B,) -> (B,)."""
    with np.errstate(invalid="ignore"):
        out: Floats = _column(theta, 0) * np.sqrt(expiry)
    return out


def heston_scale_np(theta: Floats, expiry: Floats) -> Floats:
    """T2 for theta (B, 5), T (B,) -> (B,)."""
    v0, kappa, mean_v = _column(theta, 0), _column(theta, 1), _column(theta, 2)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        integral = mean_v * expiry + (v0 - mean_v) * (-np.expm1(-kappa * expiry)) / kappa
        out: Floats = np.sqrt(integral)
    return out


def merton_scale_np(theta: Floats, expiry: Floats) -> Floats:
    """T3 for theta (B, 4), T (B,) -> (B,)."""
    sigma, lam, mu_j, sigma_j = (_column(theta, j) for j in range(4))
    with np.errstate(invalid="ignore", over="ignore"):
        out: Floats = np.sqrt((sigma * sigma + lam * (mu_j * mu_j + sigma_j * sigma_j)) * expiry)
    return out


def fixing_count_np(theta: Floats) -> Floats:
    """fixing_count for theta (B, 3) -> (B,)."""
    out: Floats = np.clip(np.round(_column(theta, 2)), 1.0, float(MAX_FIXINGS))
    return out


def geometric_scale_np(theta: Floats, expiry: Floats) -> Floats:
    """T4 for theta (B, 3), T (B,) -> (B,)."""
    n = fixing_count_np(theta)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out: Floats = _column(theta, 0) * np.sqrt(expiry * (n + 1.0) * (2.0 * n + 1.0) / (6.0 * n * n))
    return out


def forward_ratio_np(rate: Floats, dividend: Floats, expiry: Floats) -> Floats:
    """T5 for (B,) arrays."""
    with np.errstate(invalid="ignore", over="ignore"):
        out: Floats = np.exp((rate - dividend) * expiry)
    return out


def sum_fixings_np(terms: Floats) -> Floats:
    """Each row of (B, MAX_FIXINGS) summed in ATen's CPU order (as :func:`sum_fixings`)."""
    blocks = terms.reshape(len(terms), _ROUNDS, _ACCUMULATORS, _LANES)
    acc = blocks[:, 0]
    for i in range(1, _ROUNDS):
        acc = acc + blocks[:, i]
    total = acc[:, 0]
    for k in range(1, _ACCUMULATORS):
        total = total + acc[:, k]
    out = total[:, 0]
    for lane in range(1, _LANES):
        out = out + total[:, lane]
    return np.ascontiguousarray(out)


def average_forward_ratio_np(theta: Floats, expiry: Floats) -> Floats:
    """T6 for theta (B, 3), T (B,) -> (B,)."""
    n = fixing_count_np(theta)[:, None]  # (B, 1)
    i = np.arange(1, MAX_FIXINGS + 1, dtype=np.float64)[None, :]  # (1, M)
    mask = i <= n
    t_max = np.asarray(expiry, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        t = np.where(mask, i * t_max / n, t_max)
        growth = np.where(mask, np.exp(_column(theta, 1)[:, None] * t), 0.0)
        out: Floats = sum_fixings_np(growth) / n[:, 0]
    return out


__all__ = [
    "MAX_FIXINGS",
    "average_forward_ratio",
    "average_forward_ratio_np",
    "fixing_count",
    "fixing_count_np",
    "forward_ratio",
    "forward_ratio_np",
    "gbm_scale",
    "gbm_scale_np",
    "geometric_scale",
    "geometric_scale_np",
    "heston_scale",
    "heston_scale_np",
    "merton_scale",
    "merton_scale_np",
    "sum_fixings",
    "sum_fixings_np",
]
