"""Heston stochastic volatility: Andersen's QE-M scheme and the stable analytic CF.

dS/S = (r - q) dt + sqrt(v) dW_S,  dv = kappa (theta - v) dt + xi sqrt(v) dW_v,
d<W_S, W_v> = rho dt. Parameters (v0, kappa, theta, xi, rho).

Simulation (Andersen 2008, "Simple and efficient simulation of the Heston stochastic
volatility model", J. Comp. Finance 11(3)): the variance takes the quadratic-exponential
(QE) step with switching level psi_c = 1.5, the log-price the scheme's central
discretisation (gamma1 = gamma2 = 1/2), and the drift constant K0 is replaced by the
martingale-corrected K0* so that E[exp(X_{t+dt}) | X_t, v_t] = exp(X_t) exactly: the
simulated forward is a martingale step by step, whatever dt. Where the correction does
not exist (A >= 1/(2a) or A >= beta, possible only for rho > 0 with large xi and dt),
the uncorrected K0 is used. Two normals per time step: one for the variance (in the
exponential branch it becomes a uniform through the normal CDF), one for the price.
The normals of each kind are laid out as a Brownian path by a Brownian bridge (the
first normal sets the path's end), which makes quasi-random normals effective.

CF: the "little Heston trap" form (Albrecher, Mayer, Schoutens and Tistaert 2007),
which has no branch-cut discontinuity for any maturity:
  d = sqrt((rho xi i u - kappa)^2 + xi^2 (i u + u^2)),  b = kappa - rho xi i u,
  g = (b - d) / (b + d),
  C = kappa theta / xi^2 [(b - d) T - 2 log((1 - g e^{-dT}) / (1 - g))],
  D = (b - d) / xi^2 (1 - e^{-dT}) / (1 - g e^{-dT}),
  phi_X(u) = exp(C + D v0)  for X = log(S_T / F).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch

from spectralmc_server.engine import kernels
from spectralmc_server.engine.processes import spec
from spectralmc_server.engine.processes.base import EXPIRY, ModelDomain, ParameterRange, Process
from spectralmc_server.engine.processes.bridge import bridge_plan, brownian_bridge
from spectralmc_server.engine.processes.heston_limits import check_reference_limits
from spectralmc_server.engine.processes.spec import Floats

PSI_C = 1.5  # Andersen's switching level between the quadratic and exponential steps


def heston_arguments(
    theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel's parameter table (B, 6) and bridge plan (steps, 3) int32 /
    (steps, 3), in the dtype and on the device of the normals ``z`` (kernels.heston_x_cuda)."""
    kernels.check_steps(steps)  # at most MAX_FUSED_STEPS
    params = torch.cat([theta.to(z.dtype), expiry.to(z.dtype)[:, None]], dim=1).contiguous()
    plan = bridge_plan(steps)
    idx = torch.tensor([[p, lo, hi] for p, lo, hi, *_ in plan], dtype=torch.int32, device=z.device)
    w = torch.tensor([[wl, wr, sd] for *_, wl, wr, sd in plan], dtype=z.dtype, device=z.device)
    return params, idx, w


class HestonProcess(Process):
    """Heston (1993) under the pricing measure, simulated with QE-M in ``steps`` steps."""

    name = "heston"
    param_names = ("v0", "kappa", "theta", "xi", "rho")
    has_analytic_cf = True
    has_companion = True

    def __init__(self, steps: int = 16, *, bridge: bool = True) -> None:
        self.steps = steps
        self.bridge = bridge  # False: normals in time order (for measuring what the bridge buys)
        self.normals_per_path = 2 * steps

    # Vols of 0.1% to 200%, mean reversion from a 1,000-year to a week's half-life, rho
    # short of +-1 (where the variance becomes a deterministic function of the spot).
    # xi at most 3: at xi = 5 (the other parameters ordinary) the COS reference's delta
    # and digital were 1.1e-3 off QuantLib's AnalyticHestonEngine and its gamma 0.8% of
    # e^{-qT} / (S s); at xi = 3, 1.1e-5 and 0.2% (tests/engine/test_bounds_sweep.py).
    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {
        "v0": (1e-6, 4.0),
        "kappa": (1e-3, 50.0),
        "theta": (1e-6, 4.0),
        "xi": (1e-3, 3.0),
        "rho": (-0.99, 0.99),
    }

    def check_spread(self, params: dict[str, float], expiry: float, spread: float) -> None:
        """Refuse, naming xi, where the vol of vol is so large against the variance level
        that the reference cannot price the law: a spike narrower than its largest cosine
        series resolves, or tails too heavy for its window (processes/heston_limits.py)."""
        check_reference_limits(params, expiry, spread)

    def default_domain(self) -> ModelDomain:
        return ModelDomain(
            ranges=(
                ParameterRange(name="v0", low=0.01, high=0.25, scale="log"),
                ParameterRange(name="kappa", low=0.5, high=5.0, scale="log"),
                ParameterRange(name="theta", low=0.01, high=0.25, scale="log"),
                ParameterRange(name="xi", low=0.1, high=1.0, scale="log"),
                ParameterRange(name="rho", low=-0.9, high=0.3),
                ParameterRange(name=EXPIRY, low=0.05, high=3.0, scale="log"),
            )
        )

    def vol_parameter(self) -> tuple[int, Literal["identity", "sqrt"]]:
        # vega: d price / d sqrt(v0), per 1.00 of instantaneous vol
        return 0, "sqrt"

    def scale(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        """sqrt(int_0^T E[v_t] dt) = sqrt(theta T + (v0 - theta)(1 - e^{-kappa T}) / kappa)."""
        v0, kappa, mean_v = theta[:, 0], theta[:, 1], theta[:, 2]
        integral = mean_v * expiry + (v0 - mean_v) * (-torch.expm1(-kappa * expiry)) / kappa
        return torch.sqrt(integral)

    def scale_math(self, theta: Sequence[float], expiry: float) -> float:
        return spec.heston_scale(theta, expiry)

    def scale_np(self, theta: Floats, expiry: Floats) -> Floats:
        return spec.heston_scale_np(theta, expiry)

    def simulate_x(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.steps <= kernels.MAX_FUSED_STEPS and kernels.use_fused(z, theta, expiry):
            params, idx, w = heston_arguments(theta, expiry, z, self.steps)
            return kernels.heston_x_cuda(z, params, idx, w, self.steps, self.bridge)  # one launch, all steps
        n = self.steps
        dtype = z.dtype
        th = theta.to(dtype)
        v0, kappa, mean_v, xi, rho = (th[:, i, None] for i in range(5))  # each (B, 1)
        dt = (expiry.to(dtype) / n)[:, None]  # (B, 1)
        zv = brownian_bridge(z[..., :n]) if self.bridge else z[..., :n]  # (B, N, n) variance, time order
        zx = brownian_bridge(z[..., n:]) if self.bridge else z[..., n:]  # (B, N, n) price, time order
        ekt = torch.exp(-kappa * dt)  # (B, 1)
        c1 = xi * xi * ekt * (1.0 - ekt) / kappa  # s^2 = c1 v + c2
        c2 = mean_v * xi * xi * (1.0 - ekt) ** 2 / (2.0 * kappa)
        k1 = 0.5 * dt * (kappa * rho / xi - 0.5) - rho / xi
        k2 = 0.5 * dt * (kappa * rho / xi - 0.5) + rho / xi
        k3 = 0.5 * dt * (1.0 - rho * rho)
        k0 = -rho * kappa * mean_v * dt / xi
        big_a = k2 + 0.5 * k3  # A (K4 = K3 with gamma1 = gamma2)
        v = v0.expand(-1, z.shape[1]).clone()  # (B, N)
        x = torch.zeros_like(v)
        for i in range(n):
            m = mean_v + (v - mean_v) * ekt
            s2 = c1 * v + c2
            psi = s2 / (m * m)
            quad = psi <= PSI_C
            # quadratic branch: v' = a (b + Z)^2
            inv = 2.0 / psi.clamp(min=1e-12)
            b2 = (inv - 1.0 + torch.sqrt(inv) * torch.sqrt((inv - 1.0).clamp(min=0.0))).clamp(min=0.0)
            a = m / (1.0 + b2)
            # exponential branch: v' = 0 w.p. p, else Exp(beta)
            p = ((psi - 1.0) / (psi + 1.0)).clamp(0.0, 1.0)
            beta = (1.0 - p) / m
            zi = zv[..., i]
            v_quad = a * (torch.sqrt(b2) + zi) ** 2
            u = torch.special.ndtr(zi)
            # log((1 - p) / (1 - u)) with 1 - u as log_ndtr(-z): float32 ndtr is 0 past z ~ 5.7
            # (and coarse past 5), which made v' infinite
            log_tail = torch.special.log_ndtr(-zi)
            v_exp = torch.where(u <= p, torch.zeros_like(u), (torch.log1p(-p) - log_tail) / beta)
            v_next = torch.where(quad, v_quad, v_exp)
            # Martingale correction: K0* = -log E[exp(A v')] - (K1 + K3/2) v.
            ok_q = big_a * a < 0.5
            ok_e = big_a < beta
            mq = torch.exp(big_a * b2 * a / (1.0 - 2.0 * big_a * a).clamp(min=1e-12)) / torch.sqrt(
                (1.0 - 2.0 * big_a * a).clamp(min=1e-12)
            )
            me = p + beta * (1.0 - p) / (beta - big_a).clamp(min=1e-12)
            log_m = torch.where(quad, torch.log(mq), torch.log(me))
            ok = torch.where(quad, ok_q, ok_e)
            k0_star = torch.where(ok, -log_m - (k1 + 0.5 * k3) * v, k0)
            var = (k3 * (v + v_next)).clamp(min=0.0)
            x = x + k0_star + k1 * v + k2 * v_next + torch.sqrt(var) * zx[..., i]
            v = v_next
        return x

    def companion_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GBM with Heston's scale s driven by W_S(T) / sqrt(T) = rho W_v + sqrt(1 - rho^2) W_perp,
        both read off the same normals: with the bridge, normal 0 of each kind is its
        Brownian path's end point over sqrt(steps), so Zc = rho z_v0 + sqrt(1 - rho^2) z_x0
        is exactly standard normal. Close to X when the variance is nearly deterministic
        (small xi); the regression coefficient is estimated per frequency, so a weak
        companion costs nothing."""
        n = self.steps
        rho = theta[:, 4].to(z.dtype)[:, None]  # (B, 1)
        if self.bridge:  # normal 0 of each kind is its path's end point over sqrt(steps)
            zv, zx = z[..., 0], z[..., n]
        else:
            zv, zx = z[..., :n].sum(-1) / n**0.5, z[..., n:].sum(-1) / n**0.5
        zc = rho * zv + torch.sqrt(1.0 - rho * rho) * zx  # (B, N)
        s = self.scale(theta, expiry)
        sc = s.to(z.dtype)[:, None]
        return -0.5 * sc * sc + sc * zc, s

    def analytic_cf_x(self, u: torch.Tensor, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        return heston_cf(u, theta, expiry)


def heston_cf(u: torch.Tensor, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """phi_X(u) for X = log(S_T / F): u (B, K) real, theta (B, 5), T (B,) -> complex (B, K).

    Differentiable in theta and T (the pricer takes vega, theta and calibration
    gradients through it).
    """
    cdt = torch.complex128 if u.dtype == torch.float64 else torch.complex64
    v0, kappa, mean_v, xi, rho = (theta[:, i, None] for i in range(5))  # (B, 1)
    t = expiry[:, None]
    iu = torch.complex(torch.zeros_like(u), u)  # (B, K)
    b = kappa - rho * xi * iu
    d = torch.sqrt(b * b + xi * xi * (iu + u * u).to(cdt))
    bm, bp = b - d, b + d
    g = bm / bp
    edt = torch.exp(-d * t)
    one = torch.ones((), dtype=cdt, device=u.device)
    log_term = torch.log((one - g * edt) / (one - g))
    c = kappa * mean_v / (xi * xi) * (bm * t - 2.0 * log_term)
    dd = bm / (xi * xi) * (one - edt) / (one - g * edt)
    return torch.exp(c + dd * v0)


def heston_feller(theta: torch.Tensor) -> torch.Tensor:
    """2 kappa theta / xi^2: variance stays positive when >= 1 (informational)."""
    return 2.0 * theta[:, 1] * theta[:, 2] / (theta[:, 3] ** 2)


def heston_explosion_time(n: float, theta: torch.Tensor) -> torch.Tensor:
    """T*(n) (B,): the first time E[S_T^n] is infinite (Andersen & Piterbarg 2007, "Moment
    explosions in stochastic volatility models", Finance Stoch. 11), inf where it never is.

    With beta = kappa - rho xi n and D = beta^2 - xi^2 n (n - 1) the Riccati equation
    B' = n (n - 1) / 2 - beta B + xi^2 B^2 / 2 blows up at
      D >= 0, beta >= 0: never;
      D > 0, beta < 0: log((|beta| + sqrt D) / (|beta| - sqrt D)) / sqrt D;
      D = 0, beta < 0: 2 / |beta|;
      D < 0: (pi + 2 arctan(beta / sqrt(-D))) / sqrt(-D).
    (A&P write the same with their b = rho xi n - kappa = -beta.)"""
    _, kappa, _, xi, rho = (theta[:, i] for i in range(5))
    beta = kappa - rho * xi * n
    disc = beta * beta - xi * xi * (n * (n - 1.0))
    d = torch.sqrt(disc.clamp(min=0.0))
    w = torch.sqrt((-disc).clamp(min=0.0))
    inf = torch.full_like(beta, math.inf)
    neg_beta = (-beta).clamp(min=1e-300)
    hyperbolic = torch.where(
        d > 0, torch.log1p(2.0 * d / (neg_beta - d).clamp(min=1e-300)) / d.clamp(min=1e-300), 2.0 / neg_beta
    )
    real = torch.where(beta >= 0, inf, hyperbolic)
    trig = (math.pi + 2.0 * torch.atan(beta / w.clamp(min=1e-300))) / w.clamp(min=1e-300)
    return torch.where(disc < 0, trig, real)


def heston_log_mgf(n: float, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """log E[e^{n X}] = A(T) + B(T) v0 (B,) for real n >= 2, X = log(S_T / F); +inf from the
    explosion time T*(n) on (:func:`heston_explosion_time`).

    The closed form of ``heston_cf`` at u = -i n, written in real arithmetic: with beta,
    D as there, the Riccati solution y(t) = e^{-beta t / 2} (cosh(d t / 2) + beta
    sinh(d t / 2) / d), d = sqrt(D) (cos and sin of sqrt(-D) t / 2 where D < 0), gives
    B = -2 y' / (xi^2 y) and A = -2 kappa theta log(y) / xi^2. Where D > 0 the form is the
    decaying one, with beta - d = xi^2 n (n - 1) / (beta + d) so that the 1 / xi^2 cancels
    algebraically (small xi loses nothing):
      A = kappa theta [r T - 2 log1p(xi^2 r (1 - e^{-dT}) / (2 d)) / xi^2],  r = n (n - 1) / (beta + d),
      B = n (n - 1) (1 - e^{-dT}) / (d (1 + e^{-dT}) + beta (1 - e^{-dT})).
    """
    v0, kappa, mean_v, xi, rho = (theta[:, i] for i in range(5))
    t = expiry
    nn = n * (n - 1.0)
    beta = kappa - rho * xi * n
    disc = beta * beta - xi * xi * nn
    xi2 = xi * xi
    # D > 0
    d = torch.sqrt(disc.clamp(min=0.0))
    dpos = torch.where(disc > 0, d, torch.ones_like(d))
    one_minus = -torch.expm1(-dpos * t)  # 1 - e^{-dT}
    e = 1.0 - one_minus
    r = nn / torch.where(disc > 0, beta + dpos, torch.ones_like(d))
    z = xi2 * r * one_minus / (2.0 * dpos)
    z_ok = z > -1.0
    zs = torch.where(z_ok, z, torch.zeros_like(z))
    a_pos = kappa * mean_v * (r * t - 2.0 * torch.log1p(zs) / xi2)
    den_pos = dpos * (1.0 + e) + beta * one_minus
    b_pos = nn * one_minus / torch.where(z_ok, den_pos, torch.ones_like(den_pos))
    # D <= 0
    w = torch.sqrt((-disc).clamp(min=0.0))
    x = 0.5 * w * t
    sinc = torch.where(x > 0, torch.sin(x) / torch.where(x > 0, x, torch.ones_like(x)), torch.ones_like(x))
    c = 0.5 * beta * t
    den = torch.cos(x) + c * sinc
    den_ok = den > 0
    dens = torch.where(den_ok, den, torch.ones_like(den))
    a_neg = -2.0 * kappa * mean_v / xi2 * (torch.log(dens) - c)
    b_neg = nn * 0.5 * t * sinc / dens
    log_m = torch.where(disc > 0, a_pos + b_pos * v0, a_neg + b_neg * v0)
    alive = t < heston_explosion_time(n, theta)
    return torch.where(alive, log_m, torch.full_like(log_m, math.inf))


def heston_log_moments(theta: torch.Tensor, expiry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b3, b4) of R = S_T / F, each (B,), as engine/moments.py takes them: a = log E[R^2],
    b3 = log E[R^3] - 3a, b4 = log E[R^4] - 6a (+inf where the moment explodes). The
    differences cancel the lognormal part in floating point, not algebraically: their
    absolute error is ~1e-16 of log E[R^4] (about 6 s^2), which skew and kurtosis see
    divided by s^3 and s^4 against values of order s and s^2."""
    a = heston_log_mgf(2.0, theta, expiry)
    l3 = heston_log_mgf(3.0, theta, expiry)
    l4 = heston_log_mgf(4.0, theta, expiry)
    inf = torch.full_like(a, math.inf)
    return a, torch.where(torch.isfinite(l3), l3 - 3.0 * a, inf), torch.where(torch.isfinite(l4), l4 - 6.0 * a, inf)


__all__ = [
    "PSI_C",
    "HestonProcess",
    "heston_cf",
    "heston_explosion_time",
    "heston_feller",
    "heston_log_mgf",
    "heston_log_moments",
]
