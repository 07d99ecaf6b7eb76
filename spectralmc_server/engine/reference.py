"""Truth to measure against: Black-Scholes closed forms, COS on analytic CFs, brute MC.

These price what a learned model must match, answer contracts outside a model's
domain (flagged ``"method": "reference"``), and are what tests and benchmarks compare
with. All closed forms are vectorised float64 torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.processes.base import Process
from spectralmc_server.engine.spectrum import SpectrumConfig

_SQRT_2PI = math.sqrt(2.0 * math.pi)


def _npdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / _SQRT_2PI


def black_scholes(
    spot: torch.Tensor,
    strike: torch.Tensor,
    expiry: torch.Tensor,
    rate: torch.Tensor,
    dividend: torch.Tensor,
    vol: torch.Tensor,
    is_call: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Black-Scholes-Merton price and Greeks of European options, all (n,) float64.

    ``vol`` and ``expiry`` must be positive (tiny values are fine: the limits are the
    discounted intrinsic value); at exactly zero the formulas are 0/0.

    Keys: price, delta, gamma, vega (per 1.00 vol), theta (-dV/dT per year), rho
    (per 1.00 rate), digital (cash-or-nothing paying 1 on the same side of the strike).
    """
    s = vol * torch.sqrt(expiry)
    disc = torch.exp(-rate * expiry)
    qdisc = torch.exp(-dividend * expiry)
    fwd = spot * torch.exp((rate - dividend) * expiry)
    d1 = (torch.log(fwd / strike) + 0.5 * s * s) / s
    d2 = d1 - s
    nd1, nd2 = torch.special.ndtr(d1), torch.special.ndtr(d2)
    nmd1, nmd2 = torch.special.ndtr(-d1), torch.special.ndtr(-d2)
    call = disc * (fwd * nd1 - strike * nd2)
    put = disc * (strike * nmd2 - fwd * nmd1)
    pdf1 = _npdf(d1)
    gamma = qdisc * pdf1 / (spot * s)
    vega = spot * qdisc * pdf1 * torch.sqrt(expiry)
    common = -spot * qdisc * pdf1 * vol / (2.0 * torch.sqrt(expiry))
    theta_call = common - rate * strike * disc * nd2 + dividend * spot * qdisc * nd1
    theta_put = common + rate * strike * disc * nmd2 - dividend * spot * qdisc * nmd1
    # Our theta is -dV/dT; the textbook theta above is dV/dt = -dV/dT already.
    return {
        "price": torch.where(is_call, call, put),
        "delta": torch.where(is_call, qdisc * nd1, -qdisc * nmd1),
        "gamma": gamma,
        "vega": vega,
        "theta": torch.where(is_call, theta_call, theta_put),
        "rho": torch.where(is_call, strike * expiry * disc * nd2, -strike * expiry * disc * nmd2),
        "digital": torch.where(is_call, disc * nd2, disc * nmd2),
    }


def lognormal_moments(forward: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, stdev, skew and excess kurtosis of S_T = F exp(-s^2/2 + s Z)."""
    v = s * s
    em1 = torch.expm1(v)  # e^{s^2} - 1, accurate for small s
    e = em1 + 1.0
    return {
        "mean": forward,
        "stdev": forward * torch.sqrt(em1),
        "skew": (e + 2.0) * torch.sqrt(em1),
        # e^{4v} + 2e^{3v} + 3e^{2v} - 6 without the cancellation for small v
        "kurtosis": torch.expm1(4 * v) + 2 * torch.expm1(3 * v) + 3 * torch.expm1(2 * v),
    }


def lognormal_quantiles(forward: torch.Tensor, s: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles of S_T, (n, Q) for levels (Q,)."""
    z = torch.special.ndtri(levels.to(torch.float64))[None, :]
    return forward[:, None] * torch.exp(-0.5 * (s * s)[:, None] + s[:, None] * z)


def analytic_cf_y(
    process: Process, spectrum: SpectrumConfig, theta: torch.Tensor, expiry: torch.Tensor
) -> torch.Tensor:
    """phi_Y on the spectrum's grid from the process's analytic CF: phi_Y(w) = phi_X(w / s)."""
    s = process.scale(theta, expiry)[:, None]  # (B, 1)
    w = spectrum.frequencies(device=theta.device)[None, :]  # (1, K)
    phi = process.analytic_cf_x(w / s, theta, expiry)
    if phi is None:
        raise ValueError(f"process {process.name!r} has no analytic characteristic function")
    return phi


@dataclass(frozen=True)
class MCResult:
    """A Monte-Carlo price with its standard error (same shape)."""

    price: torch.Tensor
    stderr: torch.Tensor


def mc_european(
    process: Process,
    theta: torch.Tensor,
    expiry: torch.Tensor,
    log_moneyness: torch.Tensor,
    n_paths: int,
    *,
    is_call: torch.Tensor | None = None,
    seed: int = 0,
    first_block: int = 0,
    max_elements: int = 1 << 24,
) -> MCResult:
    """Plain MC of normalised European payoffs for each (theta_b, T_b).

    theta (B, P), T (B,), log_moneyness log(K/F) (B, J) and ``is_call`` (B, J) (puts
    where omitted). Prices are E[(kappa - e^X)^+] for puts and E[(e^X - kappa)^+] for
    calls, in units of the forward (multiply by D F for money). Paths are i.i.d.
    (pseudo-random normals, no antithetics), so the standard error is the textbook
    sample one. Blocks ``first_block, first_block + 1, ...`` of the stream ``seed`` are
    used; callers pricing several batches independently pass disjoint block ranges.
    When no path pays off, price and standard error are both 0. Work is chunked so
    no temporary exceeds ``max_elements`` float64 values.
    """
    if n_paths < 2:
        raise ValueError(f"need at least 2 paths for a standard error, got {n_paths}")
    b, j = log_moneyness.shape
    d = process.normals_per_path
    kappa = torch.exp(log_moneyness)  # (B, J)
    sign = torch.ones_like(kappa) if is_call is None else torch.where(is_call, -1.0, 1.0).to(kappa)  # put +1
    total = torch.zeros_like(kappa)
    total_sq = torch.zeros_like(kappa)
    chunk = max(2, min(n_paths, max_elements // max(b * max(j, d), 1)))
    done, block = 0, first_block
    while done < n_paths:
        rows = min(chunk, n_paths - done)
        cfg = NormalsConfig(seed=seed, mode="pseudo", antithetic=False, rows=rows, dims=b * d, dtype="float64")
        z = generate_block(cfg, block, theta.device).view(rows, b, d).transpose(0, 1)  # (B, rows, d)
        st = torch.exp(process.simulate_x(theta, expiry, z))  # (B, rows): S_T / F
        for col in range(j):
            payoff = (sign[:, col, None] * (kappa[:, col, None] - st)).clamp_(min=0.0)  # (B, rows)
            total[:, col] += payoff.sum(1)
            total_sq[:, col] += payoff.square().sum(1)
        done += rows
        block += 1
    mean = total / n_paths
    var = (total_sq / n_paths - mean * mean).clamp(min=0.0) * n_paths / (n_paths - 1)
    return MCResult(mean, torch.sqrt(var / n_paths))
