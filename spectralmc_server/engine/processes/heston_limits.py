"""Where the Heston reference (COS on the analytic CF) is right: a torch-free check for
validation (a 422 naming ``xi`` outside it).

The reference prices Y = X / s on [-L, L] = [-64, 64] with 2,048 cosine terms, and with 4,
16 or 64 times that many where the series has not converged (engine/refined.py). Two
things can still defeat it inside the parameter bounds, both when the vol of vol is large
against the variance level (the variance is absorbed near zero on most paths, with rare
large excursions):

1. Resolution. Most of the mass sits in a spike narrower than even 131,072 terms resolve:
   the CF has not decayed at the top frequency w = 131,072 pi / (2L), i.e.
   |phi_X(w / s)| > ``TOP_CF``.
2. Range. The rare excursions make a tail so heavy that the mass beyond the window
   [-64 s, 64 s] is not negligible. Heston's tails are exponential in X:
   P(X < -a) ~ e^{-q* a} and E[e^X; X > a] ~ e^{-(p* - 1) a}, with q* and p* the critical
   moments, E[e^{wX}] finite at T exactly for w in (-q*, p*). Measured over the
   bounds (tests/engine/test_heston_reference_convergence.py), prices are within 1e-6 of
   the price scale wherever q* L s and (p* - 1) L s are at least ``TAIL_EXPONENT``; at
   v0 = 1e-4, kappa = 1e-3, theta = 4, xi = 2, rho = -0.99, T = 30, q* L s = 0.25 and
   the reference was 9.3e-4 of the price scale off (on [-512 s, 512 s] still 1.3e-5).

Whether E[e^{wX}] is finite at T: Andersen and Piterbarg (2007), "Moment explosions in
stochastic volatility models", Finance Stoch. 11: with b = kappa - rho xi w and
D = b^2 - xi^2 w (w - 1), the explosion time is infinite for D >= 0, b >= 0 (or
0 <= w <= 1), log((b - sqrt D) / (b + sqrt D)) / sqrt D for D > 0, b < 0, and
2 (pi 1{b > 0} - arctan(sqrt(-D) / b)) / sqrt(-D) for D < 0 (the first zero of h
below). Neither condition depends on
v0 or theta but through the spread s.
"""

from __future__ import annotations

import cmath
import math
from collections.abc import Mapping

REFERENCE_HALF_WIDTH = 64.0  # L of the reference's window (engine/pricer.py REFERENCE_SPECTRUM)
REFERENCE_TOP_TERMS = 2048 * 64  # the most terms the reference uses (engine/refined.py)
TOP_CF = 1e-2  # |phi_X| allowed at the top frequency of the largest series
TOP_CHECK_POINTS = 3  # the check reads the top frequency and the two below it
TAIL_MASS = 1e-5  # the most the window's tails may cost (Chernoff, units of the price scale)
CHERNOFF_EXPONENTS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # q L s tried in the tail bounds
CRITICAL_FRACTIONS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)  # and these fractions of q*
LOG_MONEYNESS_MAX = math.log(1e4)  # |log(K / F)| at most (processes/base.py MONEYNESS_BOUNDS)
CRITICAL_CAP = 1e12  # the largest critical moment sought
XI_LOW = 1e-3  # xi's lower bound (HestonProcess.param_bounds)


def explosion_time(w: float, kappa: float, xi: float, rho: float) -> float:
    """The T beyond which E[e^{wX_T}] is infinite (inf: never)."""
    if 0.0 <= w <= 1.0:
        return math.inf
    b = kappa - rho * xi * w
    d2 = b * b - xi * xi * w * (w - 1.0)
    if d2 >= 0.0:
        if b >= 0.0:
            return math.inf
        r = math.sqrt(d2)
        return -2.0 / b if r == 0.0 else math.log((b - r) / (b + r)) / r
    r = math.sqrt(-d2)
    if b == 0.0:
        return math.pi / r
    return 2.0 * ((math.pi if b > 0.0 else 0.0) - math.atan(r / b)) / r


def log_mgf(w: float, v0: float, kappa: float, theta: float, xi: float, rho: float, expiry: float) -> float:
    """log E[e^{wX_T}] for real w before its explosion time (inf at or after it).

    With b = kappa - rho xi w and d^2 = b^2 - xi^2 w (w - 1), the Riccati solution is
    kappa theta / xi^2 (b T - 2 log h) + v0 w (w - 1) S / h, S = sinh(dT/2) / d,
    h = cosh(dT/2) + b S (sin and cos of delta T / 2 for d = i delta), in real arithmetic
    and with e^{dT/2} factored out of h for real d."""
    if explosion_time(w, kappa, xi, rho) <= expiry:
        return math.inf
    b = kappa - rho * xi * w
    ww = w * (w - 1.0)
    d2 = b * b - xi * xi * ww
    t = expiry
    if d2 > 0.0:
        d = math.sqrt(d2)
        e = math.exp(-d * t)
        hs = 0.5 * (1.0 + e) + b * (1.0 - e) / (2.0 * d)  # h e^{-dT/2}
        if not hs > 0.0:  # at the explosion, to rounding
            return math.inf
        log_h = 0.5 * d * t + math.log(hs)
        s_over_h = (1.0 - e) / (2.0 * d) / hs
    elif d2 < 0.0:
        delta = math.sqrt(-d2)
        sn = math.sin(0.5 * delta * t) / delta
        h = math.cos(0.5 * delta * t) + b * sn
        if not h > 0.0:
            return math.inf
        log_h, s_over_h = math.log(h), sn / h
    else:
        h = 1.0 + 0.5 * b * t
        if not h > 0.0:
            return math.inf
        log_h, s_over_h = math.log(h), 0.5 * t / h
    return kappa * theta / (xi * xi) * (b * t - 2.0 * log_h) + v0 * ww * s_over_h


def critical_moment(side: int, kappa: float, xi: float, rho: float, expiry: float) -> float:
    """q* > 0 with E[e^{-qX_T}] (side -1) or E[e^{(1+q)X_T}] (side +1) finite exactly for
    q < q*, by bisection on the explosion time (``CRITICAL_CAP``: finite for every q up to it)."""

    def finite(q: float) -> bool:
        return explosion_time(-q if side < 0 else 1.0 + q, kappa, xi, rho) > expiry

    if finite(CRITICAL_CAP):
        return CRITICAL_CAP
    lo, hi = 0.0, CRITICAL_CAP
    while not finite(hi * 1e-3) and hi > 1e-12:  # bracket within three decades
        hi *= 1e-3
    lo = hi * 1e-3
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if finite(mid):
            lo = mid
        else:
            hi = mid
    return lo


def tail_masses(
    v0: float, kappa: float, theta: float, xi: float, rho: float, expiry: float, spread: float
) -> tuple[float, float]:
    """Bounds, in units of the price scale, on what the mass beyond the reference's
    window costs a price, from its left and its right tail.

    The cosine series extends the law evenly about the window's edges: mass at Y < -L
    is read at -2L - Y, mass at Y > L at 2L - Y (Y = X / s, L = 64). A put integrates
    over Y < y* = log(K / F) / s (calls are parity; a strike beyond the window is priced
    exactly). Mass from the left moved to -2L - Y < y* keeps nearly its payoff
    (K - S_T ~ K far left); moved past y*, i.e. from Y < -2L - y*, it is lost. Mass from
    the right moved below y*, from Y > 2L - y*, is paid up to K where the truth is 0.
    Either costs at most K x the mass; over the price scale max(F, K) and with
    m = min(L s, log 1e4) the largest |y* s| (``LOG_MONEYNESS_MAX``), Chernoff's bound at
    moment q of E[e^{-qX}] (left) or E[e^{qX}] (right) gives

        left  <= E[e^{-qX}] e^{-2 q L s} max(1, e^{(q - 1) m}),
        right <= E[e^{qX}] e^{-2 q L s} e^{q m},

    each minimised over q = l / (L s), l in ``CHERNOFF_EXPONENTS``, and fractions
    ``CRITICAL_FRACTIONS`` of the moment's critical value (beyond which it is infinite)."""
    ls = REFERENCE_HALF_WIDTH * spread
    m = min(ls, LOG_MONEYNESS_MAX)
    out = []
    for side in (-1, 1):
        top = critical_moment(side, kappa, xi, rho, expiry) + (0.0 if side < 0 else 1.0)
        qs = [lam / ls for lam in CHERNOFF_EXPONENTS if lam / ls < top]
        qs += [f * top for f in CRITICAL_FRACTIONS]
        best = 1.0
        for q in sorted(qs):
            log_m = log_mgf(side * q, v0, kappa, theta, xi, rho, expiry) - 2.0 * q * ls
            log_m += max(0.0, (q - 1.0) * m) if side < 0 else q * m
            best = min(best, math.exp(min(log_m, 0.0)))
            if best <= TAIL_MASS:
                break
        out.append(best)
    return out[0], out[1]


def heston_cf_abs(u: float, v0: float, kappa: float, theta: float, xi: float, rho: float, expiry: float) -> float:
    """|phi_X(u)| for real u, by the little-trap form (as processes/heston.py's heston_cf)."""
    iu = 1j * u
    b = kappa - rho * xi * iu
    d = cmath.sqrt(b * b + xi * xi * (iu + u * u))
    bm, bp = b - d, b + d
    g = bm / bp
    edt = cmath.exp(-d * expiry)
    c = kappa * theta / (xi * xi) * (bm * expiry - 2.0 * cmath.log((1.0 - g * edt) / (1.0 - g)))
    dd = bm / (xi * xi) * (1.0 - edt) / (1.0 - g * edt)
    return math.exp((c + dd * v0).real)


def _fails(v0: float, kappa: float, theta: float, xi: float, rho: float, expiry: float, spread: float) -> str | None:
    """Why the reference cannot price this point (None: it can)."""
    left, right = tail_masses(v0, kappa, theta, xi, rho, expiry, spread)
    if left > TAIL_MASS:
        return "the left tail is too heavy for the reference's window"
    if right > TAIL_MASS:
        return "the right tail is too heavy for the reference's window"
    top = REFERENCE_TOP_TERMS * math.pi / (2.0 * REFERENCE_HALF_WIDTH) / spread
    for j in range(TOP_CHECK_POINTS):
        u = top * (REFERENCE_TOP_TERMS - 1 - j) / REFERENCE_TOP_TERMS
        if not heston_cf_abs(u, v0, kappa, theta, xi, rho, expiry) <= TOP_CF:
            return "most of the law is a spike narrower than the reference resolves"
    return None


def check_reference_limits(params: Mapping[str, float], expiry: float, spread: float) -> None:
    """Raise ValueError naming xi and its largest admissible value here where the
    reference cannot price the point (see the module's docstring)."""
    v0, kappa, theta, xi, rho = (params[n] for n in ("v0", "kappa", "theta", "xi", "rho"))
    why = _fails(v0, kappa, theta, xi, rho, expiry, spread)
    if why is None:
        return
    # The spread does not depend on xi; both conditions weaken as xi falls. The largest
    # admissible xi by bisection in log xi (only on this refusal path).
    lo, hi = XI_LOW, xi
    if _fails(v0, kappa, theta, lo, rho, expiry, spread) is not None:
        raise ValueError(
            f"xi must be at most {XI_LOW:g} at these v0, kappa, theta, rho and expiry, got {xi!r}: {why} "
            "(vol of vol large against the variance level)"
        )
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if _fails(v0, kappa, theta, mid, rho, expiry, spread) is None:
            lo = mid
        else:
            hi = mid
    raise ValueError(
        f"xi must be at most {lo:.4g} at these v0, kappa, theta, rho and expiry, got {xi!r}: {why} "
        "(vol of vol large against the variance level)"
    )


__all__ = ["check_reference_limits", "explosion_time", "heston_cf_abs"]
