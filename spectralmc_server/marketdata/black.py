"""Black's formula in plain float arithmetic, and its inversion (implied volatility).

Market-data work (arbitrage checks, implied-vol surfaces) runs off the compute worker,
on small inputs, so it uses ``math`` rather than torch.
"""

from __future__ import annotations

import math


def _ncdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def black_forward(forward: float, strike: float, total_sd: float, is_call: bool) -> float:
    """Undiscounted Black price; ``total_sd`` = sigma * sqrt(t)."""
    if total_sd <= 0.0:
        intrinsic = forward - strike if is_call else strike - forward
        return max(intrinsic, 0.0)
    d1 = math.log(forward / strike) / total_sd + 0.5 * total_sd
    d2 = d1 - total_sd
    if is_call:
        return forward * _ncdf(d1) - strike * _ncdf(d2)
    return strike * _ncdf(-d2) - forward * _ncdf(-d1)


class NoImpliedVolError(ValueError):
    """A price outside the no-arbitrage bounds has no implied volatility."""


def implied_vol(
    price: float, forward: float, strike: float, t: float, discount: float, is_call: bool, *, tol: float = 1e-12
) -> float:
    """The Black vol that reproduces a discounted option ``price``.

    Newton steps in sigma, kept inside a shrinking bracket (bisection when a step would
    leave it), so it converges for every price strictly between the bounds.
    """
    undiscounted = price / discount
    intrinsic = max(forward - strike, 0.0) if is_call else max(strike - forward, 0.0)
    upper = forward if is_call else strike
    if not intrinsic < undiscounted < upper:
        raise NoImpliedVolError(
            f"price {price:g} is outside the no-arbitrage bounds ({intrinsic * discount:g}, {upper * discount:g})"
        )
    lo, hi = 1e-9, 10.0
    if black_forward(forward, strike, hi * math.sqrt(t), is_call) < undiscounted:
        raise NoImpliedVolError(f"price {price:g} needs a vol above {hi:g}")
    sigma = 0.3
    sqrt_t = math.sqrt(t)
    for _ in range(200):
        value = black_forward(forward, strike, sigma * sqrt_t, is_call) - undiscounted
        if abs(value) <= tol * undiscounted:  # relative: tiny out-of-the-money prices too
            return sigma
        if value > 0:
            hi = sigma
        else:
            lo = sigma
        d1 = math.log(forward / strike) / (sigma * sqrt_t) + 0.5 * sigma * sqrt_t
        vega = forward * math.exp(-0.5 * d1 * d1) / math.sqrt(2 * math.pi) * sqrt_t
        step = sigma - value / vega if vega > 1e-300 else math.nan
        sigma = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-15:
            return sigma
    return sigma
