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

Rough Bergomi has neither: E[S_T^n] for n >= 2 has no closed form, and for rho < 0
it is infinite where n > 1 / (1 - rho^2) (Gassiat 2019, "On the martingale property in
the rough Bergomi model", Electron. Commun. Probab. 24) and finite where n < 1 / (1 -
rho^2) (arXiv:2606.07482): finite only where rho^2 > (n - 1) / n, the boundary counted
as infinite. The stdev needs rho < -0.707, the skew rho < -0.816, the kurtosis rho <
-0.866. Where a moment is infinite the request is refused (:func:`moment_refusal`);
where it is finite the learned model answers it (quadrature against its density, up to
MOMENT_MAX_SPREAD) and beyond that the Monte-Carlo reference does (quadrature against
its simulated density, with a standard error), as for any process with no exact moments
(:func:`exact_moments_or_none`). The mean, E[S_T] = F (E[X] = -xi0 T / 2 on the scheme's
grid), is exact for every process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeAlias

import torch

from spectralmc_server.engine.processes.asian import asian_log_moments
from spectralmc_server.engine.processes.heston import heston_explosion_time, heston_log_moments
from spectralmc_server.engine.processes.merton import merton_log_moments

# (aliases as strings: this module is imported where torch is not, lazy_torch.py)
LogMoments: TypeAlias = "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"
MomentFunction: TypeAlias = "Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]"
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


def rbergomi_moment_finite(theta: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) bool: E[S_T^n] finite under rough Bergomi with theta (B, 4) = (H, eta, rho,
    xi0), n >= 1, rho < 0 (the process's bounds): n < 1 / (1 - rho^2), i.e. rho^2 >
    (n - 1) / n (see the module docstring); always for n = 1 (S is a true martingale)."""
    rho = theta[:, 2].to(torch.float64)
    return rho * rho * n > n - 1


# Processes whose moments of S_T explode for some parameters, with no exact moments to
# tell it from: (theta, n) -> (B,) bool, E[S_T^n] finite.
FINITE_MOMENT: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"rbergomi": rbergomi_moment_finite}


def exact_moments_or_none(process: str) -> MomentFunction | None:
    """:func:`exact_moments` where the process has them (:data:`LOG_MOMENTS`), else None
    (rough Bergomi: a reference answers its moments by quadrature, with a standard error)."""
    return exact_moments(process) if process in LOG_MOMENTS else None


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
    finite_moment = FINITE_MOMENT.get(process)
    if finite_moment is not None:
        for m in asked:
            n = ORDER[m]
            bad = ~finite_moment(th, n)
            if bool(bad.any()):
                row = int(torch.nonzero(bad)[0, 0])
                rho = float(th[row, 2])
                return (
                    row,
                    m,
                    f"{m} is infinite for these parameters: E[S_T^{n}] is infinite under rough Bergomi "
                    f"unless rho^2 > {n - 1}/{n} (rho < {-math.sqrt((n - 1) / n):.4f}); rho is {rho:g}",
                )
        return None
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
    "FINITE_MOMENT",
    "LOG_MOMENTS",
    "ORDER",
    "MomentFunction",
    "exact_moments",
    "exact_moments_or_none",
    "gbm_log_moments",
    "moment_refusal",
    "rbergomi_moment_finite",
    "stats_from_log_moments",
]
