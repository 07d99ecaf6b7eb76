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
Measured: gbm and asian scale (T1, T4) up to 2 ulp, merton and rough Bergomi scale (T3,
T7) and e^{(r - q) T} (T5) 1 ulp, the asian forward ratio (T6, 64 exponentials) 4 ulp;
heston scale (T2) up to 1.8e-13 relative, where v0 << theta and its two terms nearly
cancel (1 ulp where they add).

A bound is checked on these values with slack: the columnar validator hands every row
within ``BORDER`` (1e-9 relative) of a bound to the row validator (pricing/columns.py),
so the numpy and ``math`` twins never give a book and its rows different verdicts.

The twins take parameters within the process's param_bounds (the validators check those
first); outside them the ``math`` twins may raise where torch would answer inf or nan.

On them stands :func:`servable_np` (and :func:`servable_one` for one contract): which
contracts a served learned model may answer (``ModelPricer.servable``, engine/served.py),
so that admission can tell without torch. The domain's box is compared as the engine
compares it, bit for bit; the spread bound MOMENT_MAX_SPREAD and the certified K/F bounds
on the twins' values, so a contract within a few ulp of one of those (1.8e-13 relative
at most, Heston's spread) may get a different verdict from the engine's
(tests/engine/test_servable_twin.py: none did, on books straddling every bound).

This module imports neither torch nor anything of the engine (the package's __init__
still imports the torch processes: a process without torch imports this file alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]

MAX_FIXINGS = 64  # an Asian's fixings: at most this many (a path takes this many normals)
# A learned model's stdev, skew and kurtosis come from quadrature against its COS
# density, whose tails it under-weights as the spread s grows (docs/method.md): it
# answers them up to this s. The references' are exact (engine/moments.py), but a
# request for them past this s is still refused for processes other than GBM (422,
# pricing/valuation.py check_request).
MOMENT_MAX_SPREAD = 1.0
# K/F from a strike and a forward carries rounding (0.7 + 12 * 0.05 > 1.3): the certified
# K/F bounds are widened by this much, relative (ModelPricer.servable, engine/served.py).
MONEYNESS_SLACK = 1e-12

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


def rbergomi_scale(theta: Sequence[float], expiry: float) -> float:
    """T7, RoughBergomiProcess.scale: sqrt(xi0 T) for theta = (H, eta, rho, xi0)."""
    return _sqrt(theta[3] * expiry)


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


def rbergomi_scale_np(theta: Floats, expiry: Floats) -> Floats:
    """T7 for theta (B, 4), T (B,) -> (B,)."""
    with np.errstate(invalid="ignore"):
        out: Floats = np.sqrt(_column(theta, 3) * expiry)
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


# -- what a learned model may answer ----------------------------------------------------------

ScaleNp = Callable[[Floats, Floats], Floats]
ForwardRatioNp = Callable[[Floats, Floats, Floats, Floats], Floats]
Scale = Callable[[Sequence[float], float], float]
ForwardRatio = Callable[[Sequence[float], float, float, float], float]


def _european_ratio_np(theta: Floats, expiry: Floats, rate: Floats, dividend: Floats) -> Floats:
    return forward_ratio_np(rate, dividend, expiry)


def _average_ratio_np(theta: Floats, expiry: Floats, rate: Floats, dividend: Floats) -> Floats:
    return average_forward_ratio_np(theta, expiry)


def _european_ratio(theta: Sequence[float], expiry: float, rate: float, dividend: float) -> float:
    return forward_ratio(rate, dividend, expiry)


def _average_ratio(theta: Sequence[float], expiry: float, rate: float, dividend: float) -> float:
    return average_forward_ratio(theta, expiry)


# Each process's Process.scale and Process.forward_ratio, by its name (engine/processes/):
# an Asian's strike is on the average, whose forward is F_A (carry and fixings in theta).
_BY_PROCESS: Mapping[str, tuple[ScaleNp, ForwardRatioNp, Scale, ForwardRatio]] = {
    "gbm": (gbm_scale_np, _european_ratio_np, gbm_scale, _european_ratio),
    "heston": (heston_scale_np, _european_ratio_np, heston_scale, _european_ratio),
    "merton": (merton_scale_np, _european_ratio_np, merton_scale, _european_ratio),
    "asian": (geometric_scale_np, _average_ratio_np, geometric_scale, _average_ratio),
    "rbergomi": (rbergomi_scale_np, _european_ratio_np, rbergomi_scale, _european_ratio),
}
SCALE_NP: Mapping[str, ScaleNp] = {name: fs[0] for name, fs in _BY_PROCESS.items()}
FORWARD_RATIO_NP: Mapping[str, ForwardRatioNp] = {name: fs[1] for name, fs in _BY_PROCESS.items()}
SCALE: Mapping[str, Scale] = {name: fs[2] for name, fs in _BY_PROCESS.items()}
FORWARD_RATIO: Mapping[str, ForwardRatio] = {name: fs[3] for name, fs in _BY_PROCESS.items()}


def _known(process: str) -> None:
    if process not in SCALE_NP:
        raise ValueError(f"unknown process {process!r}: known processes are {', '.join(sorted(SCALE_NP))}")


def servable_np(
    process: str,
    theta: Floats,
    expiry: Floats,
    spot: Floats,
    strike: Floats,
    rate: Floats,
    dividend: Floats,
    *,
    lows: Floats,
    highs: Floats,
    certified_moneyness: tuple[float, float],
    qualified: bool,
    spread_measures: bool,
    price_measures: bool,
) -> npt.NDArray[np.bool_]:
    """ModelPricer.servable of a book without torch: (n,) bool, where the served learned
    model of ``process`` may answer.

    - ``theta`` (n, P): the parameters in the process's ``param_names`` order; ``expiry``,
      ``spot``, ``strike``, ``rate`` and ``dividend`` (n,).
    - ``lows``, ``highs`` (P + 1,): the domain's closed box, ``[r.low for r in
      domain.ranges]`` and the like (``ModelView.box()``, engine/view.py): the parameters
      then expiry last. The engine compares theta's column i with the domain's range i
      (``ModelDomain.contains``), so does this; a domain's ranges are named and ordered as
      its process's parameters (the trainer checks).
    - ``certified_moneyness``: ``domain.certified_moneyness``, the K/F bounds;
      ``qualified``: ``ModelPricer.qualified`` (False: nothing is servable).
    - ``spread_measures``: the request asks for one of SPREAD_MEASURES (stdev, skew,
      kurtosis), which the learned model answers up to a spread of MOMENT_MAX_SPREAD;
      ``price_measures``: for one of PRICE_MEASURES, answered inside the K/F bounds
      (engine/pricer.py).

    NaN anywhere a verdict needs fails it (as in torch). The spread and K/F are the numpy
    twins above, a few ulp from torch's: within that of a bound the verdict may differ.
    """
    _known(process)
    theta = np.asarray(theta, dtype=np.float64)
    expiry = np.asarray(expiry, dtype=np.float64)
    lows = np.asarray(lows, dtype=np.float64)
    highs = np.asarray(highs, dtype=np.float64)
    n = len(expiry)
    if theta.ndim != 2 or theta.shape[0] != n or lows.shape != (theta.shape[1] + 1,) or highs.shape != lows.shape:
        raise ValueError(
            f"need theta (n, P), expiry (n,) and lows, highs (P + 1,): got theta {theta.shape}, "
            f"expiry {expiry.shape}, lows {lows.shape}, highs {highs.shape}"
        )
    if not qualified:
        return np.zeros(n, dtype=np.bool_)
    inside: npt.NDArray[np.bool_] = (expiry >= lows[-1]) & (expiry <= highs[-1])
    for i in range(theta.shape[1]):
        inside &= (theta[:, i] >= lows[i]) & (theta[:, i] <= highs[i])
    if spread_measures:
        inside &= SCALE_NP[process](theta, expiry) <= MOMENT_MAX_SPREAD
    if price_measures:
        low, high = certified_moneyness
        spot, strike = np.asarray(spot, dtype=np.float64), np.asarray(strike, dtype=np.float64)
        rate, dividend = np.asarray(rate, dtype=np.float64), np.asarray(dividend, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            kappa = strike / (spot * FORWARD_RATIO_NP[process](theta, expiry, rate, dividend))
        inside &= (kappa >= low * (1 - MONEYNESS_SLACK)) & (kappa <= high * (1 + MONEYNESS_SLACK))
    return inside


def servable_one(
    process: str,
    theta: Sequence[float],
    expiry: float,
    spot: float,
    strike: float,
    rate: float,
    dividend: float,
    *,
    lows: Sequence[float],
    highs: Sequence[float],
    certified_moneyness: tuple[float, float],
    qualified: bool,
    spread_measures: bool,
    price_measures: bool,
) -> bool:
    """:func:`servable_np` of one contract, on the ``math`` twins (same arguments, each
    array a row of it). The twins see only parameters inside the box; the market inputs
    must be as the validators admit them (spot > 0, a finite forward), or this may raise
    where torch would answer inf or nan."""
    _known(process)
    if len(lows) != len(theta) + 1 or len(highs) != len(lows):
        raise ValueError(f"need lows and highs of len(theta) + 1 = {len(theta) + 1}, got {len(lows)}, {len(highs)}")
    if not qualified or not lows[-1] <= expiry <= highs[-1]:
        return False
    if not all(lo <= x <= hi for x, lo, hi in zip(theta, lows[:-1], highs[:-1], strict=True)):
        return False
    if spread_measures and not SCALE[process](theta, expiry) <= MOMENT_MAX_SPREAD:
        return False
    if price_measures:
        low, high = certified_moneyness
        kappa = strike / (spot * FORWARD_RATIO[process](theta, expiry, rate, dividend))
        return low * (1 - MONEYNESS_SLACK) <= kappa <= high * (1 + MONEYNESS_SLACK)
    return True


__all__ = [
    "FORWARD_RATIO",
    "FORWARD_RATIO_NP",
    "MAX_FIXINGS",
    "MOMENT_MAX_SPREAD",
    "MONEYNESS_SLACK",
    "SCALE",
    "SCALE_NP",
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
    "rbergomi_scale",
    "rbergomi_scale_np",
    "servable_np",
    "servable_one",
    "sum_fixings",
    "sum_fixings_np",
]
