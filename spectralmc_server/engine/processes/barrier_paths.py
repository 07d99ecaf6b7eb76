"""Paths that watch a single barrier: terminal X = log(S_T / F) and a survival weight.

Coordinates. The processes simulate the driftless X_t = log(S_t / F_t), F_t = S_0 e^{mu t},
mu = r - q, whose law depends on (theta, t) only. The barrier is on the spot, S_t = L,
so it is watched in the log-price that carries the drift,
  l_t = log(S_t / S_0) = X_t + mu t,     barrier at  b = log(L / S_0)
(b < 0 for a down barrier, b > 0 for an up barrier). mu is an input per row (``drift``):
the terminal law of X does not depend on it, the survival event does. A path's signed
distance to the barrier is d_t = l_t - b (down) or b - l_t (up), positive on the
surviving side.

Continuous monitoring. Given its two ends, a Brownian motion with constant drift and
volatility sigma over [t_i, t_{i+1}] is a Brownian bridge, and the bridge stays on the
surviving side with probability (Karatzas & Shreve, "Brownian Motion and Stochastic
Calculus", 2nd ed., 1991, section 4.3; Glasserman, "Monte Carlo Methods in Financial
Engineering", 2004, section 6.4)
  p_i = 1 - exp(-2 d_i d_{i+1} / (sigma^2 (t_{i+1} - t_i)))   if d_i > 0 and d_{i+1} > 0,
  p_i = 0                                                      otherwise.
A path's weight is w = prod_i p_i, the conditional probability, given the simulated
points, that S never touched L: E[f(X) w] = E[f(X) 1{survive}] for any payoff f. Weighting
by that probability instead of drawing the event keeps every estimate smooth in the
parameters, the barrier and the drift (no indicator moves as they move), so prices, their
Greeks and the defective CF E[e^{iuX} w] the trainer learns are smooth targets.

* GBM: log S has constant drift and volatility, so the bridge given the two ends is exact
  and one step over [0, T] gives the exact survival probability of each path.
* Heston: the variance is frozen over each step at the value at its start,
  sigma_i^2 = v_{t_i} (``bridge_variance="left"``, the default), or at the average of the
  two ends (``"average"``). The bias this leaves falls about as 1 / steps, Gobet's order
  one for bridged schemes with a state-dependent volatility (E. Gobet, "Weak
  approximation of killed diffusion using Euler schemes", Stoch. Proc. Appl. 87, 2000):
  with rho != 0 the variance moves with the price inside the step (leverage), so given
  its ends the log-price is not a Brownian bridge of any fixed variance. Measured
  (bench/barrier_bias.py, against FdHestonBarrierEngine and on the same paths against 512
  steps, spot 100): 4 to 37 bp of spot at 8 steps, up to ~4 bp at 64, up to ~2 bp at 128
  (down-and-out calls too high, up-and-out calls too low). "left" and "average" differ by
  at most 0.004 at 32 steps and 0.001 at 64, and freezing the path's own integrated
  variance over each step (read off a 512-step path) leaves the same bias: the choice of
  frozen variance is not what matters, the step count is. "left" is kept: it needs no
  look-ahead.

Discrete monitoring at n dates t_k = k T / n, k = 1..n (expiry included, t = 0 not): the
weight is 1 if d_{t_k} > 0 at every date, else 0. GBM is simulated exactly at the dates
(n normals, laid out by the Brownian bridge so normal 0 sets the end point: terminal X is
then GBMProcess.simulate_x of normal 0). Heston takes m = ceil(steps / n) QE steps between
dates (n m steps in all).

Heston scheme. HestonProcess.simulate_x runs Andersen's QE-M loop fused, returning only
X_T, so the same scheme is written here as a step function (:func:`_qe_step`): QE
variance step with switching level psi_c = 1.5, central log-price discretisation
(gamma1 = gamma2 = 1/2) and the martingale-corrected K0* (Andersen 2008, "Simple and
efficient simulation of the Heston stochastic volatility model", J. Comp. Finance 11(3)),
with the same normals layout (normals 0..n-1 the variance's, n..2n-1 the price's, each
through the Brownian bridge). On the same normals its terminal X is bit for bit that of
HestonProcess(n)'s torch loop (tests/engine/test_barrier_mc.py).

Normals ``z`` are (B, N, d), one set per row, or (N, d), shared by every row (broadcast);
d is :func:`barrier_normals_per_path`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from spectralmc_server.engine.processes.base import Process
from spectralmc_server.engine.processes.bridge import brownian_bridge
from spectralmc_server.engine.processes.heston import PSI_C

Monitoring = Literal["continuous"] | int
"""``"continuous"`` or the number n >= 1 of equally spaced monitoring dates up to expiry."""

BridgeVariance = Literal["left", "average"]

BARRIER_STEPS = 128
"""Heston time steps over [0, T] for continuous monitoring (and the least number of steps
for discrete monitoring). The frozen-variance bridge's bias falls about as 1 / steps;
bench/barrier_bias.py measures it at ~2 bp of spot at most at 128 steps (~4 bp at 64,
4 to 37 bp at 8) on its cases: about 0.3% of the option's price at most."""


def check_monitoring(monitoring: Monitoring) -> None:
    """Raise ValueError unless ``monitoring`` is "continuous" or a positive int."""
    if monitoring == "continuous":
        return
    if isinstance(monitoring, bool) or not isinstance(monitoring, int) or monitoring < 1:
        raise ValueError(f"monitoring must be 'continuous' or a positive number of dates, got {monitoring!r}")


def heston_grid(monitoring: Monitoring, steps: int = BARRIER_STEPS) -> tuple[int, int]:
    """(time steps over [0, T], steps between monitoring dates) of the Heston paths:
    (steps, 1) for continuous monitoring (every step bridged), (n m, m) with
    m = ceil(steps / n) for n dates."""
    check_monitoring(monitoring)
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if monitoring == "continuous":
        return steps, 1
    n = int(monitoring)
    every = max(1, math.ceil(steps / n))
    return n * every, every


def barrier_normals_per_path(process: Process, monitoring: Monitoring, steps: int = BARRIER_STEPS) -> int:
    """Normals one path takes: GBM 1 (continuous) or n (n dates); Heston 2 per time step."""
    check_monitoring(monitoring)
    if process.name == "gbm":
        return 1 if monitoring == "continuous" else int(monitoring)
    if process.name == "heston":
        return 2 * heston_grid(monitoring, steps)[0]
    raise ValueError(f"barrier paths are simulated for gbm and heston, not {process.name!r}")


def crossing_survival(d0: torch.Tensor, d1: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """P(a Brownian bridge from signed distance d0 to d1 with variance ``var`` over the
    step never reaches 0) = 1 - exp(-2 d0 d1 / var) where d0, d1 > 0, else 0.

    Written as -expm1(-2 d0 d1 / var), accurate for paths close to the barrier; var = 0
    (a frozen zero variance) gives 1 where both ends survive."""
    alive = (d0 > 0) & (d1 > 0)
    ratio = 2.0 * d0 * d1 / var
    return torch.where(alive, -torch.expm1(-ratio), torch.zeros_like(ratio))


def _side(is_up: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """+1 for a down barrier, -1 for an up barrier (B, 1): d = side (l - b)."""
    return torch.where(is_up, -1.0, 1.0).to(like)[:, None]


def gbm_barrier_paths(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    drift: torch.Tensor,
    log_barrier: torch.Tensor,
    is_up: torch.Tensor,
    z: torch.Tensor,
    monitoring: Monitoring,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GBM paths: theta (B, 1) vol, T (B,), drift mu = r - q (B,), b = log(L / S_0) (B,),
    is_up (B,) bool, z (B, N, d) or (N, d) -> (X_T (B, N), survival weight (B, N)).

    Continuous: X = -s^2/2 + s z_0 with s = sigma sqrt(T) and, the bridge over [0, T]
    being exact, w = 1 - exp(-2 d_0 d_T / s^2) (both ends on the surviving side), the
    exact conditional survival probability. n dates: W on the grid from the Brownian
    bridge of z_0..z_{n-1}, l_{t_k} = (mu - sigma^2 / 2) t_k + sigma W_{t_k}, w the
    indicator that every d_{t_k} > 0.
    """
    check_monitoring(monitoring)
    dtype = z.dtype
    vol = theta[:, 0].to(dtype)[:, None]  # (B, 1)
    t = expiry.to(dtype)[:, None]
    mu = drift.to(dtype)[:, None]
    b = log_barrier.to(dtype)[:, None]
    side = _side(is_up, vol)  # (B, 1)
    s = vol * torch.sqrt(t)
    if monitoring == "continuous":
        x = -0.5 * s * s + s * z[..., 0]  # (B, N)
        d0 = -side * b  # (B, 1): l_0 = 0
        d1 = side * (x + mu * t - b)  # (B, N)
        return x, crossing_survival(d0, d1, s * s)
    n = int(monitoring)
    dt = t / n
    w_inc = brownian_bridge(z[..., :n])  # (B or 1.., N, n) unit increments in time order
    k = torch.arange(1, n + 1, dtype=dtype, device=z.device)  # (n,)
    walk = torch.cumsum(w_inc, dim=-1)  # W_{t_k} / sqrt(dt)
    tk = dt[..., None] * k  # (B, 1, n)
    l_path = (mu[..., None] - 0.5 * vol[..., None] ** 2) * tk + (vol * torch.sqrt(dt))[..., None] * walk  # (B, N, n)
    alive = (side[..., None] * (l_path - b[..., None]) > 0).all(dim=-1)  # (B, N)
    x = -0.5 * s * s + s * z[..., 0]  # the walk's end, sigma W_T = s z_0, without the cumsum's rounding
    return x, alive.to(dtype)


@dataclass(frozen=True)
class _QEConstants:
    """Per-row constants of one QE-M step of length dt, each (B, 1)."""

    kappa: torch.Tensor
    mean_v: torch.Tensor
    ekt: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    k0: torch.Tensor
    k1: torch.Tensor
    k2: torch.Tensor
    k3: torch.Tensor
    big_a: torch.Tensor


def _qe_constants(theta: torch.Tensor, dt: torch.Tensor) -> _QEConstants:
    """The step constants of HestonProcess.simulate_x: theta (B, 5), dt (B, 1)."""
    kappa, mean_v, xi, rho = (theta[:, i, None] for i in range(1, 5))  # each (B, 1)
    ekt = torch.exp(-kappa * dt)
    k1 = 0.5 * dt * (kappa * rho / xi - 0.5) - rho / xi
    k2 = 0.5 * dt * (kappa * rho / xi - 0.5) + rho / xi
    k3 = 0.5 * dt * (1.0 - rho * rho)
    return _QEConstants(
        kappa=kappa,
        mean_v=mean_v,
        ekt=ekt,
        c1=xi * xi * ekt * (1.0 - ekt) / kappa,  # s^2 = c1 v + c2
        c2=mean_v * xi * xi * (1.0 - ekt) ** 2 / (2.0 * kappa),
        k0=-rho * kappa * mean_v * dt / xi,
        k1=k1,
        k2=k2,
        k3=k3,
        big_a=k2 + 0.5 * k3,  # A (K4 = K3 with gamma1 = gamma2)
    )


def _qe_step(
    c: _QEConstants, x: torch.Tensor, v: torch.Tensor, zv: torch.Tensor, zx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One QE-M step (x, v) -> (x', v'), (B, N) each, driven by normals zv, zx (the
    arithmetic of HestonProcess.simulate_x, step for step).

    Variance: m = theta + (v - theta) e^{-kappa dt}, s^2 = c1 v + c2, psi = s^2 / m^2;
    psi <= 1.5: v' = a (sqrt(b^2) + zv)^2 with b^2 = 2/psi - 1 + sqrt(2/psi) sqrt(2/psi - 1),
    a = m / (1 + b^2); else v' = 0 with probability p = (psi - 1) / (psi + 1), otherwise
    log((1 - p) / (1 - U)) / beta, beta = (1 - p) / m, U = N(zv), with log(1 - U) =
    log_ndtr(-zv) (float32's ndtr(-zv) is 0 past zv ~ 5.7).
    Price: x' = x + K0* + K1 v + K2 v' + sqrt(K3 (v + v')) zx with
    K0* = -log E[exp(A v')] - (K1 + K3 / 2) v (the martingale correction), K0 where the
    moment does not exist.
    """
    m = c.mean_v + (v - c.mean_v) * c.ekt
    s2 = c.c1 * v + c.c2
    psi = s2 / (m * m)
    quad = psi <= PSI_C
    inv = 2.0 / psi.clamp(min=1e-12)
    b2 = (inv - 1.0 + torch.sqrt(inv) * torch.sqrt((inv - 1.0).clamp(min=0.0))).clamp(min=0.0)
    a = m / (1.0 + b2)
    p = ((psi - 1.0) / (psi + 1.0)).clamp(0.0, 1.0)
    beta = (1.0 - p) / m
    v_quad = a * (torch.sqrt(b2) + zv) ** 2
    u = torch.special.ndtr(zv)
    log_tail = torch.special.log_ndtr(-zv)  # log(1 - u), finite in float32 (HestonProcess.simulate_x)
    v_exp = torch.where(u <= p, torch.zeros_like(u), (torch.log1p(-p) - log_tail) / beta)
    v_next = torch.where(quad, v_quad, v_exp)
    big_a = c.big_a
    ok_q = big_a * a < 0.5
    ok_e = big_a < beta
    mq = torch.exp(big_a * b2 * a / (1.0 - 2.0 * big_a * a).clamp(min=1e-12)) / torch.sqrt(
        (1.0 - 2.0 * big_a * a).clamp(min=1e-12)
    )
    me = p + beta * (1.0 - p) / (beta - big_a).clamp(min=1e-12)
    log_m = torch.where(quad, torch.log(mq), torch.log(me))
    ok = torch.where(quad, ok_q, ok_e)
    k0_star = torch.where(ok, -log_m - (c.k1 + 0.5 * c.k3) * v, c.k0)
    var = (c.k3 * (v + v_next)).clamp(min=0.0)
    x_next = x + k0_star + c.k1 * v + c.k2 * v_next + torch.sqrt(var) * zx
    return x_next, v_next


def heston_barrier_paths(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    drift: torch.Tensor,
    log_barrier: torch.Tensor,
    is_up: torch.Tensor,
    z: torch.Tensor,
    monitoring: Monitoring,
    *,
    steps: int = BARRIER_STEPS,
    bridge_variance: BridgeVariance = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heston QE-M paths: theta (B, 5) = (v0, kappa, theta, xi, rho), T (B,), drift
    mu = r - q (B,), b = log(L / S_0) (B,), is_up (B,) bool, z (B, N, 2 n) or (N, 2 n) with
    n = heston_grid(monitoring, steps)[0] -> (X_T (B, N), survival weight (B, N)).

    Continuous: w = prod_i (1 - exp(-2 d_i d_{i+1} / (sigma_i^2 dt))) with the variance
    frozen over each step, sigma_i^2 = v_{t_i} ("left") or (v_{t_i} + v_{t_{i+1}}) / 2
    ("average"). n dates: w = 1{d > 0 at every date}.
    """
    n, every = heston_grid(monitoring, steps)
    if z.shape[-1] < 2 * n:
        raise ValueError(f"need {2 * n} normals per path, got {z.shape[-1]}")
    continuous = monitoring == "continuous"
    dtype = z.dtype
    th = theta.to(dtype)
    dt = (expiry.to(dtype) / n)[:, None]  # (B, 1)
    mu = drift.to(dtype)[:, None]
    b = log_barrier.to(dtype)[:, None]
    side = _side(is_up, dt)  # (B, 1)
    c = _qe_constants(th, dt)
    zv = brownian_bridge(z[..., :n])  # (.., N, n) variance normals, time order
    zx = brownian_bridge(z[..., n : 2 * n])  # (.., N, n) price normals, time order
    paths = z.shape[-2]
    v = th[:, 0, None].expand(-1, paths).clone()  # (B, N)
    x = torch.zeros_like(v)
    w = torch.ones_like(v)
    d = (-side * b).expand(-1, paths)  # (B, N): l_0 = 0
    for i in range(n):
        x_next, v_next = _qe_step(c, x, v, zv[..., i], zx[..., i])
        d_next = side * (x_next + mu * (dt * (i + 1)) - b)  # (B, N)
        if continuous:
            frozen = v if bridge_variance == "left" else 0.5 * (v + v_next)
            w = w * crossing_survival(d, d_next, frozen * dt)
        elif (i + 1) % every == 0:
            w = w * (d_next > 0).to(dtype)
        x, v, d = x_next, v_next, d_next
    return x, w


def simulate_barrier(
    process: Process,
    theta: torch.Tensor,
    expiry: torch.Tensor,
    drift: torch.Tensor,
    log_barrier: torch.Tensor,
    is_up: torch.Tensor,
    z: torch.Tensor,
    monitoring: Monitoring,
    *,
    steps: int = BARRIER_STEPS,
    bridge_variance: BridgeVariance = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_T, survival weight), each (B, N), of ``process`` (gbm or heston): see
    :func:`gbm_barrier_paths` and :func:`heston_barrier_paths` (``steps`` and
    ``bridge_variance`` are Heston's)."""
    if process.name == "gbm":
        return gbm_barrier_paths(theta, expiry, drift, log_barrier, is_up, z, monitoring)
    if process.name == "heston":
        return heston_barrier_paths(
            theta, expiry, drift, log_barrier, is_up, z, monitoring, steps=steps, bridge_variance=bridge_variance
        )
    raise ValueError(f"barrier paths are simulated for gbm and heston, not {process.name!r}")


__all__ = [
    "BARRIER_STEPS",
    "BridgeVariance",
    "Monitoring",
    "barrier_normals_per_path",
    "check_monitoring",
    "crossing_survival",
    "gbm_barrier_paths",
    "heston_barrier_paths",
    "heston_grid",
    "simulate_barrier",
]
