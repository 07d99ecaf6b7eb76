"""Exact moments of R = S_T / F (an Asian's A / F_A) for the reference pricers.

The reference answers stdev, skew and excess kurtosis from log E[R^n], n = 2, 3, 4
(E[R] = 1 under the pricing measure), which each process has in closed form or by an
exact recursion: Merton from its CF at u = -i n, Heston from the Riccati equations at
real argument (with the moment-explosion time past which E[R^n] is infinite), the
arithmetic Asian by a recursion over its fixings (engine/processes/{merton,heston,asian}.py).
No quadrature against a density is involved, so heavy tails, mass beyond a COS window
and the Asian's simulated CF do not bias these moments.

From a = log E[R^2], b3 = log E[R^3] - 3a and b4 = log E[R^4] - 6a, with y = e^a:
  var = expm1(a)
  m3 = e^{3a} expm1(b3) + expm1(a)^2 (y + 2)
  m4 = e^{6a} expm1(b4) - 4 e^{3a} expm1(b3) + expm1(a)^2 (y^4 + 2 y^3 + 3 y^2 - 3)
  excess kurtosis = [e^{6a} expm1(b4) - 4 e^{3a} expm1(b3)] / var^2
                    + expm1(4a) + 2 expm1(3a) + 3 expm1(2a)
  skew = m3 / var^{3/2}.
For a lognormal b3 = b4 = 0 and these are its closed forms (reference.lognormal_moments);
a process's b3 and b4 carry only what is not lognormal, computed directly where the
algebra allows (Merton: the diffusion cancels exactly), so nothing large cancels in floats.

Everything is elementwise over rows: a row's numbers do not depend on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from spectralmc_server.engine.processes.asian import asian_log_moments
from spectralmc_server.engine.processes.heston import heston_explosion_time, heston_log_moments
from spectralmc_server.engine.processes.merton import merton_log_moments

LogMoments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
MomentFunction = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""(theta (B, P), T (B,)) float64 -> {"stdev": stdev of R, "skew", "kurtosis"} (B,) each."""

ORDER = {"stdev": 2, "skew": 3, "kurtosis": 4}  # the highest moment of R each measure needs
BIG = 100.0  # past this log E[R^2], ratios are taken in logs (e^{6a} overflows from a ~ 118)


def _log_expm1(a: torch.Tensor) -> torch.Tensor:
    """log(e^a - 1) for a > 0, without overflow for large a."""
    big = a > 30.0
    return torch.where(big, a + torch.log1p(-torch.exp(-a)), torch.log(torch.expm1(torch.where(big, 1.0, a))))


def stats_from_log_moments(a: torch.Tensor, b3: torch.Tensor, b4: torch.Tensor) -> dict[str, torch.Tensor]:
    """stdev, skew and excess kurtosis of R from (a, b3, b4) (see the module docstring),
    each (B,); +inf where the moment a measure needs is infinite (or beyond float64)."""
    var = torch.expm1(a)
    small = a < BIG
    a_s = torch.where(small, a, torch.zeros_like(a))
    var_s = torch.where(small, var, torch.ones_like(a))
    lv = _log_expm1(torch.where(small, torch.ones_like(a), a))
    # e^{3a} / var^{3/2} and e^{6a} / var^2, directly where they fit, else through logs
    r3 = torch.where(small, torch.exp(3.0 * a_s) / var_s**1.5, torch.exp(3.0 * a - 1.5 * lv))
    r6 = torch.where(small, torch.exp(6.0 * a_s) / (var_s * var_s), torch.exp(6.0 * a - 2.0 * lv))
    e3, e4 = torch.expm1(b3), torch.expm1(b4)
    y = torch.exp(a)
    root = torch.where(small, torch.sqrt(var), torch.exp(0.5 * lv))  # sqrt(var) without overflow
    skew = r3 * e3 + root * (y + 2.0)
    # 4 e^{3a} expm1(b3) / var^2 = 4 r3 e3 / sqrt(var)
    kurt = r6 * e4 - 4.0 * r3 * e3 / root + torch.expm1(4 * a) + 2 * torch.expm1(3 * a) + 3 * torch.expm1(2 * a)
    inf = torch.full_like(a, math.inf)
    stdev = root  # finite up to a ~ 1419
    finite2 = torch.isfinite(a) & torch.isfinite(stdev)
    finite3 = finite2 & torch.isfinite(b3) & torch.isfinite(skew)
    finite4 = finite3 & torch.isfinite(b4) & torch.isfinite(kurt)
    return {
        "stdev": torch.where(finite2, stdev, inf),
        "skew": torch.where(finite3, skew, inf),
        "kurtosis": torch.where(finite4, kurt, inf),
    }


def gbm_log_moments(theta: torch.Tensor, expiry: torch.Tensor) -> LogMoments:
    """(s^2, 0, 0): the lognormal (the GBM reference uses its closed forms directly)."""
    s2 = theta[:, 0] * theta[:, 0] * expiry
    return s2, torch.zeros_like(s2), torch.zeros_like(s2)


LOG_MOMENTS: dict[str, Callable[[torch.Tensor, torch.Tensor], LogMoments]] = {
    "gbm": gbm_log_moments,
    "heston": heston_log_moments,
    "merton": merton_log_moments,
    "asian": asian_log_moments,
}


def exact_moments(process: str) -> MomentFunction:
    """The exact moments of a process's R as a :data:`MomentFunction`."""
    log_moments = LOG_MOMENTS[process]

    def moments(theta: torch.Tensor, expiry: torch.Tensor) -> dict[str, torch.Tensor]:
        th = theta.detach().to(torch.float64)
        return stats_from_log_moments(*log_moments(th, expiry.detach().to(torch.float64)))

    return moments


def moment_refusal(
    process: str, theta: torch.Tensor, expiry: torch.Tensor, measures: Iterable[str]
) -> tuple[int, str, str] | None:
    """The first row whose requested moment (stdev, skew, kurtosis) is not a finite float64,
    as (row, measure, reason), or None. A moment that explodes (Heston: E[S_T^n] is infinite
    from T*(n) on) is named as such; a finite one past float64's range as that."""
    asked = [m for m in ("stdev", "skew", "kurtosis") if m in set(measures)]
    if not asked or not len(expiry) or process == "gbm":
        return None
    th, t = theta.to(torch.float64), expiry.to(torch.float64)
    stats = exact_moments(process)(th, t)
    for m in asked:
        bad = ~torch.isfinite(stats[m])
        if not bool(bad.any()):
            continue
        row = int(torch.nonzero(bad)[0, 0])
        n = ORDER[m]
        if process == "heston":
            t_star = float(heston_explosion_time(float(n), th[row : row + 1])[0])
            if float(t[row]) >= t_star:
                return (
                    row,
                    m,
                    f"{m} is infinite for these parameters: E[S_T^{n}] explodes before expiry "
                    f"(moment explosion at T = {t_star:.4g} years)",
                )
        return (
            row,
            m,
            f"{m} is too large to represent for these parameters: E[S_T^{n}] / F^{n} is beyond float64's range",
        )
    return None


__all__ = [
    "LOG_MOMENTS",
    "ORDER",
    "MomentFunction",
    "exact_moments",
    "gbm_log_moments",
    "moment_refusal",
    "stats_from_log_moments",
]
