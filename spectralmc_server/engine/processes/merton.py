"""Merton (1976) jump-diffusion: exact terminal simulation and the analytic CF.

dS/S = (r - q - lambda k) dt + sigma dW + (J - 1) dN, N Poisson with intensity lambda,
log J ~ N(mu_j, sigma_j^2), k = E[J - 1] = exp(mu_j + sigma_j^2 / 2) - 1. Parameters
(sigma, lambda, mu_j, sigma_j). For X = log(S_T / F):
  X = -(sigma^2 / 2 + lambda k) T + sigma sqrt(T) Z1 + n mu_j + sqrt(n) sigma_j Z2,
  n ~ Poisson(lambda T),
which is exact: given n jumps, their log sizes sum to N(n mu_j, n sigma_j^2). The count
comes from a third normal through the normal CDF and the inverse Poisson CDF, so a
path takes three normals from the shared pool and no other randomness.
  phi_X(u) = exp(T [-i u (sigma^2 / 2 + lambda k) - sigma^2 u^2 / 2
                    + lambda (exp(i u mu_j - sigma_j^2 u^2 / 2) - 1)]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch

from spectralmc_server.engine.processes import spec
from spectralmc_server.engine.processes.base import EXPIRY, ModelDomain, ParameterRange, Process
from spectralmc_server.engine.processes.spec import Floats

MAX_JUMPS = 40  # counts above this are cut (P(n > 40) < 1e-30 for lambda T <= 3)


SPIKE_MIN_WIDTH = 0.05  # the narrowest Gaussian component served, in spreads
SPIKE_MAX_JUMP_MEAN = 14.0  # lambda T past which the jump-free paths weigh < e^-14 ~ 1e-6


class MertonProcess(Process):
    """Merton jump-diffusion under the pricing measure."""

    name = "merton"
    param_names = ("sigma", "lambda", "mu_j", "sigma_j")
    normals_per_path = 3
    has_analytic_cf = True
    has_companion = True

    # At most 20 jumps a year on average, each of log-size mean within +-2 and stdev 2.
    # sigma at least 1%: below, the jump-free paths (e^{-lambda T} of them) make a spike
    # the reference's 2,048 COS terms do not resolve (sigma 0.001, lambda 0.5: delta 5.6e-3
    # off, gamma 26% of e^{-qT} / (S s); sigma 0.01: 1.1e-5 and 0.3%;
    # tests/engine/test_bounds_sweep.py).
    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {
        "sigma": (0.01, 5.0),
        "lambda": (0.0, 20.0),
        "mu_j": (-2.0, 2.0),
        "sigma_j": (0.0, 2.0),
    }

    def default_domain(self) -> ModelDomain:
        return ModelDomain(
            ranges=(
                ParameterRange(name="sigma", low=0.1, high=0.5, scale="log"),
                ParameterRange(name="lambda", low=0.0, high=1.0),
                ParameterRange(name="mu_j", low=-0.2, high=0.1),
                ParameterRange(name="sigma_j", low=0.02, high=0.25),
                ParameterRange(name=EXPIRY, low=0.1, high=3.0, scale="log"),
            )
        )

    def check_spread(self, params: dict[str, float], expiry: float, spread: float) -> None:
        """The paths with few jumps are Gaussians of width sqrt(sigma^2 T + n sigma_j^2);
        the reference's COS series (2,048 terms on +-64 spreads) resolves widths down to
        about a tenth of the spread. A narrower one with weight (no jumps: e^{-lambda T};
        sigma_j = 0: every jump count) is a spike it would smear: refused."""
        sigma, lam, sigma_j = params["sigma"], params["lambda"], params["sigma_j"]
        narrow = sigma * math.sqrt(expiry)
        significant = sigma_j == 0.0 or lam * expiry < SPIKE_MAX_JUMP_MEAN
        if significant and narrow < SPIKE_MIN_WIDTH * spread:
            raise ValueError(
                f"sigma must be at least {SPIKE_MIN_WIDTH:g} x the spread / sqrt(T) = "
                f"{SPIKE_MIN_WIDTH * spread / math.sqrt(expiry):.4g} here, got {sigma!r}: paths with no jump "
                "(or jumps of fixed size) form a spike narrower than the reference resolves"
            )

    def vol_parameter(self) -> tuple[int, Literal["identity", "sqrt"]]:
        return 0, "identity"  # vega: d price / d sigma

    def scale(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        """sqrt((sigma^2 + lambda (mu_j^2 + sigma_j^2)) T): the standard deviation of the
        diffusion plus the second moment of the jumps."""
        sigma, lam, mu_j, sigma_j = theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3]
        return torch.sqrt((sigma * sigma + lam * (mu_j * mu_j + sigma_j * sigma_j)) * expiry)

    def scale_math(self, theta: Sequence[float], expiry: float) -> float:
        return spec.merton_scale(theta, expiry)

    def scale_np(self, theta: Floats, expiry: Floats) -> Floats:
        return spec.merton_scale_np(theta, expiry)

    def simulate_x(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = z.dtype
        sigma, lam, mu_j, sigma_j = (theta[:, i, None].to(dtype) for i in range(4))  # (B, 1)
        t = expiry.to(dtype)[:, None]
        k = torch.expm1(mu_j + 0.5 * sigma_j * sigma_j)
        n = poisson_inverse(torch.special.ndtr(z[..., 2].to(torch.float64)), (lam * t).to(torch.float64)).to(dtype)
        drift = -(0.5 * sigma * sigma + lam * k) * t
        return drift + sigma * torch.sqrt(t) * z[..., 0] + n * mu_j + torch.sqrt(n) * sigma_j * z[..., 1]

    def companion_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusion part alone, driven by the same normal Z1: GBM with s_c = sigma sqrt(T)."""
        s = theta[:, 0] * torch.sqrt(expiry)
        sc = s.to(z.dtype)[:, None]
        return -0.5 * sc * sc + sc * z[..., 0], s

    def analytic_cf_x(self, u: torch.Tensor, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        return merton_cf(u, theta, expiry)


def poisson_inverse(u: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Inverse Poisson CDF: the least n with P(N <= n) >= u, for u (B, N), mean (B, 1)."""
    n = torch.zeros_like(u)
    pmf = torch.exp(-mean).expand_as(u)
    cdf = pmf.clone()
    for j in range(1, MAX_JUMPS + 1):
        n = n + (u > cdf).to(u.dtype)
        pmf = pmf * mean / j
        cdf = cdf + pmf
    return n


def merton_cf(u: torch.Tensor, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """phi_X(u) for X = log(S_T / F): u (B, K) real, theta (B, 4), T (B,) -> complex (B, K)."""
    sigma, lam, mu_j, sigma_j = (theta[:, i, None] for i in range(4))
    t = expiry[:, None]
    k = torch.expm1(mu_j + 0.5 * sigma_j * sigma_j)
    jump = torch.exp(torch.complex(-0.5 * sigma_j * sigma_j * u * u, mu_j * u)) - 1.0
    re = -0.5 * sigma * sigma * u * u
    im = -u * (0.5 * sigma * sigma + lam * k)
    return torch.exp(t * (torch.complex(re, im) + lam * jump))


def merton_log_moments(theta: torch.Tensor, expiry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b3, b4) of R = S_T / F, each (B,): a = log E[R^2], b3 = log E[R^3] - 3a,
    b4 = log E[R^4] - 6a (engine/moments.py), from the CF at u = -i n:
      log E[R^n] = T [n (n - 1) sigma^2 / 2 + lambda (J_n - n k)],  J_n = e^{n mu_j + n^2 sigma_j^2 / 2} - 1.
    The diffusion cancels from b3 and b4 algebraically: b3 = lambda T (J_3 - 3 J_2 + 3 J_1)
    and b4 = lambda T (J_4 - 6 J_2 + 8 J_1), J_1 = k."""
    sigma, lam, mu_j, sigma_j = (theta[:, i] for i in range(4))
    v_j = sigma_j * sigma_j
    j1, j2, j3, j4 = (torch.expm1(n * mu_j + 0.5 * n * n * v_j) for n in (1.0, 2.0, 3.0, 4.0))
    a = expiry * (sigma * sigma + lam * (j2 - 2.0 * j1))
    b3 = lam * expiry * (j3 - 3.0 * j2 + 3.0 * j1)
    b4 = lam * expiry * (j4 - 6.0 * j2 + 8.0 * j1)
    return a, b3, b4
