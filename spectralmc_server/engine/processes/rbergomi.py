"""Rough Bergomi (Bayer, Friz and Gatheral 2016, "Pricing under rough volatility",
Quant. Finance 16(6)), simulated by the hybrid scheme of Bennedsen, Lunde and Pakkanen
(2017, "Hybrid scheme for Brownian semistationary processes", Finance Stoch. 21).

Parameters (H, eta, rho, xi0): the Hurst index, the vol of vol, the spot-vol
correlation and a flat forward variance curve. With a = H - 1/2 and the
Riemann-Liouville Volterra process Y_t = int_0^t (t - s)^a dW_s (Var Y_t = t^{2H} / (2H)),

  V_t = xi0 exp(eta sqrt(2H) Y_t - eta^2 t^{2H} / 2),     E[V_t] = xi0,
  dX = -V/2 dt + sqrt(V) dB,  B = rho W + sqrt(1 - rho^2) W_perp,  X = log(S_T / F).

The grid: a fixed number n of steps per path (``steps``, default DEFAULT_STEPS), dt = T / n,
so every point of a batch, whatever its T, takes the same normals and its paths are one
rectangular tensor (the scheme is self-similar: Y on dt = T / n is T^H times Y on 1 / n).
(A fixed number of steps per year would give short expiries few steps and make a batch
ragged.) Measured against 1,024 steps (docs/method.md, bench/rbergomi_bias.py): n = 256
is within about 2 bp of the forward where eta <= 1.5, or H >= 0.2 and eta <= 2.5, 5 to
10 bp where H <= 0.1 and eta >= 2.5, tens of bp where H <= 0.05 and eta = 4; almost all
of it is the Euler sums' time discretisation (the hybrid scheme is within 0.5 bp of the
exact Volterra law on the same grid).

Hybrid scheme, kappa = 1. In units of dt^H and with e_j = dW_j / sqrt(dt) the increments,
  Y(t_m) / dt^H = e_m / (a + 1) + r xi_m + sum_{k=2}^{m} g_k e_{m-k+1},
  g_k = (k^{a+1} - (k-1)^{a+1}) / (a + 1) = b_k^a,  b_k = ((k^{a+1} - (k-1)^{a+1}) / (a+1))^{1/a},
  r^2 = 1/(2a + 1) - 1/(a + 1)^2:
the first cell's Volterra integral and its increment are drawn from their exact joint
law (covariance dt^{a+1} / (a + 1), variances dt and dt^{2a+1} / (2a + 1)), the other
cells take the power kernel at BLP's optimal points b_k. The sum is a convolution of the
increments with the kernel (g_1 = 1/(a+1), g_2, ...), done by FFT (torch.fft, length the
power of two >= 2n): O(n log n) per path, batched over points and paths, on whichever
device the normals are on.

The compensator uses the scheme's own variance of Y(t_m) (dt^{2H} (1/(2H) + sum_{k=2}^m
g_k^2), a little below t_m^{2H} / (2H)), so E[V(t_m)] = xi0 exactly on the grid.

Log price: Euler with the variance at each step's start (V(t_0) = xi0),
  I_V = sum_m V(t_m) dt,  I_W = sum_m sqrt(V(t_m)) dW_{m+1}  (m = 0 .. n - 1),
  X = -I_V / 2 + rho I_W + sqrt((1 - rho^2) I_V) Z_perp.
Given W, sum_m sqrt(V(t_m)) dW_perp_{m+1} is exactly N(0, I_V), so one normal Z_perp
replaces the n increments of W_perp without changing the law of X. V(t_m) does not
depend on dW_{m+1}, so e^X is an exact martingale on the grid: E[e^X] = 1.

Normals per path (2n): z[..., 0] = Z_perp; z[..., 1 : n + 1] the increments of W, laid
out by a Brownian bridge (normal 1 sets W(T) / sqrt(T)); z[..., n + 1 : 2n] the first
cells' residuals xi_1 .. xi_{n-1} (the last cell's Y(t_n) is not needed).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from spectralmc_server.engine.processes import spec
from spectralmc_server.engine.processes.base import EXPIRY, ModelDomain, ParameterRange, Process
from spectralmc_server.engine.processes.bridge import bridge_plan
from spectralmc_server.engine.processes.spec import Floats

DEFAULT_STEPS = 256
PARAM_NAMES = ("H", "eta", "rho", "xi0")


# -- the Brownian bridge, a level at a time --------------------------------------------------


@functools.lru_cache(maxsize=16)
def bridge_levels(n: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """processes/bridge.py's plan for n points grouped into levels whose points depend
    only on earlier levels: per level (points, lefts, rights, normal indices, weight_left,
    weight_right, stdev) as tuples, so a level is drawn by one vectorised step."""
    depth = {0: 0}
    levels: dict[int, list[tuple[float, ...]]] = {}
    for k, (pt, lo, hi, wl, wr, sd) in enumerate(bridge_plan(n)):
        level = 0 if hi < 0 else max(depth[lo], depth[hi]) + 1
        depth[pt] = level
        levels.setdefault(level, []).append((pt, lo, max(hi, 0), k, wl, wr, sd))
    return tuple(tuple(zip(*levels[i], strict=True)) for i in sorted(levels))


def bridge_increments(z: torch.Tensor) -> torch.Tensor:
    """z (..., n) in bridge order -> (..., n) i.i.d. unit increments in time order: the
    same map as processes/bridge.py's brownian_bridge, in log2(n) + 1 tensor steps instead
    of n (for a power of two n each level is a contiguous slice of z and an interleave)."""
    n = z.shape[-1]
    if n & (n - 1):
        return _bridge_by_levels(z)
    w = torch.stack([torch.zeros_like(z[..., 0]), math.sqrt(n) * z[..., 0]], dim=-1)  # W_0, W_n
    while w.shape[-1] <= n:  # w holds W on a dyadic grid, 2^l intervals at level l
        width = w.shape[-1] - 1  # intervals
        sd = math.sqrt(n / (4.0 * width))  # a midpoint's stdev given its neighbours
        mids = 0.5 * (w[..., :-1] + w[..., 1:]) + sd * z[..., width : 2 * width]
        w = torch.cat([torch.stack([w[..., :-1], mids], dim=-1).flatten(-2), w[..., -1:]], dim=-1)
    return w[..., 1:] - w[..., :-1]


def _bridge_by_levels(z: torch.Tensor) -> torch.Tensor:
    """bridge_increments for any n: each level of the plan gathered and scattered by index."""
    n = z.shape[-1]
    w = torch.zeros((*z.shape[:-1], n + 1), dtype=z.dtype, device=z.device)  # W_0 .. W_n
    for pts, lo, hi, ks, wl, wr, sd in bridge_levels(n):
        idx, left, right, k = (torch.tensor(v, dtype=torch.long, device=z.device) for v in (pts, lo, hi, ks))
        c_left, c_right, c_sd = (torch.tensor(v, dtype=z.dtype, device=z.device) for v in (wl, wr, sd))
        w[..., idx] = c_left * w[..., left] + c_right * w[..., right] + c_sd * z[..., k]
    return w[..., 1:] - w[..., :-1]


# -- the hybrid scheme -------------------------------------------------------------------------


def hybrid_kernel(hurst: torch.Tensor, steps: int) -> torch.Tensor:
    """g_1 .. g_n (B, n) float64: g_1 = 1/(a+1) (the first cell's regression on its
    increment), g_k = b_k^a = (k^{a+1} - (k-1)^{a+1}) / (a+1) for k >= 2, a = H - 1/2."""
    a = (hurst.to(torch.float64) - 0.5)[:, None]  # (B, 1)
    k = torch.arange(1, steps + 1, dtype=torch.float64, device=hurst.device)[None, :]  # (1, n)
    g: torch.Tensor = (k ** (a + 1.0) - (k - 1.0) ** (a + 1.0)) / (a + 1.0)
    return g


def hybrid_variance(hurst: torch.Tensor, steps: int) -> torch.Tensor:
    """The scheme's Var Y(t_m) / dt^{2H} for m = 1 .. n-1 (B, n-1) float64:
    1/(2H) + sum_{k=2}^{m} g_k^2 (the exact value is m^{2H} / (2H))."""
    g = hybrid_kernel(hurst, steps)
    first = (1.0 / (2.0 * hurst.to(torch.float64)))[:, None]
    tail = torch.cumsum(g[:, 1 : steps - 1] ** 2, dim=1)  # sum_{k=2}^{m} for m = 2 .. n-1
    return torch.cat([first, first + tail], dim=1)


def hybrid_volterra(hurst: torch.Tensor, e: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """Y(t_1) .. Y(t_{n-1}) in units of dt^H (B, N, n-1) by the hybrid scheme from unit
    increments e (B, N, n) and first-cell residual normals xi (B, N, n-1), in e's dtype."""
    n = e.shape[-1]
    a = hurst.to(torch.float64) - 0.5  # (B,)
    g = hybrid_kernel(hurst, n).to(e.dtype)  # (B, n)
    size = 1 << (2 * n - 1).bit_length()  # FFT length, a power of two >= 2n: no wrap-around
    spectrum = torch.fft.rfft(g, n=size)[:, None, :]  # (B, 1, size/2 + 1)
    conv: torch.Tensor = torch.fft.irfft(torch.fft.rfft(e, n=size) * spectrum, n=size)[..., : n - 1]  # (B, N, n-1)
    resid = (a.abs() / ((a + 1.0) * torch.sqrt(2.0 * a + 1.0))).to(e.dtype)[:, None, None]  # r
    return conv + resid * xi


# -- from the Volterra process to the log price ------------------------------------------------


@dataclass(frozen=True)
class VariancePaths:
    """What X depends on, per path (each (B, N)): I_V = int V dt, I_W = int sqrt(V) dW
    (left-point sums) and the normal Z_perp of the orthogonal part."""

    int_v: torch.Tensor
    int_w: torch.Tensor
    z_perp: torch.Tensor


def split_normals(z: torch.Tensor, steps: int, bridge: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (B, N, 2n) -> Z_perp (B, N), unit increments of W in time order (B, N, n) and the
    residual normals (B, N, n-1)."""
    if z.shape[-1] < 2 * steps:
        raise ValueError(f"rough Bergomi with {steps} steps takes {2 * steps} normals per path, got {z.shape[-1]}")
    w_normals = z[..., 1 : steps + 1]
    e = bridge_increments(w_normals) if bridge else w_normals
    return z[..., 0], e, z[..., steps + 1 : 2 * steps]


def variance_paths(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    e: torch.Tensor,
    z_perp: torch.Tensor,
    y: torch.Tensor,
    var_y: torch.Tensor,
) -> VariancePaths:
    """I_V and I_W from unit increments e (B, N, n), the Volterra process y = Y(t_m) / dt^H
    (B, N, n-1) at t_1 .. t_{n-1} and the variance var_y (B, n-1) its compensator uses."""
    dtype, n = e.dtype, e.shape[-1]
    h, eta, xi0 = (theta[:, i].to(torch.float64) for i in (0, 1, 3))
    dt = expiry.to(torch.float64) / n
    u = eta * torch.sqrt(2.0 * h) * dt**h  # eta sqrt(2H) dt^H (B,)
    drift = (-0.5 * u[:, None] ** 2 * var_y).to(dtype)[:, None, :]  # (B, 1, n-1)
    half = torch.exp(0.5 * (u.to(dtype)[:, None, None] * y + drift))  # sqrt(V / xi0) at t_1 .. t_{n-1}
    sqrt_xi0 = torch.sqrt(xi0).to(dtype)[:, None]  # (B, 1)
    sum_v = 1.0 + (half * half).sum(-1)  # sum_m V(t_m) / xi0, V(t_0) = xi0
    sum_w = e[..., 0] + (half * e[..., 1:]).sum(-1)  # sum_m sqrt(V(t_m) / xi0) e_{m+1}
    dtc = dt.to(dtype)[:, None]
    return VariancePaths(
        int_v=sqrt_xi0 * sqrt_xi0 * dtc * sum_v, int_w=sqrt_xi0 * torch.sqrt(dtc) * sum_w, z_perp=z_perp
    )


def hybrid_paths(
    theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, steps: int, *, bridge: bool = True
) -> VariancePaths:
    """theta (B, 4), T (B,), normals z (B, N, 2 steps) -> the hybrid scheme's I_V, I_W, Z_perp."""
    z_perp, e, xi = split_normals(z, steps, bridge)
    h = theta[:, 0]
    return variance_paths(theta, expiry, e, z_perp, hybrid_volterra(h, e, xi), hybrid_variance(h, steps))


def log_price(theta: torch.Tensor, paths: VariancePaths) -> torch.Tensor:
    """X = -I_V / 2 + rho I_W + sqrt((1 - rho^2) I_V) Z_perp (B, N)."""
    rho = theta[:, 2].to(paths.int_v.dtype)[:, None]
    return -0.5 * paths.int_v + rho * paths.int_w + torch.sqrt((1.0 - rho * rho) * paths.int_v) * paths.z_perp


def conditional_law(theta: torch.Tensor, paths: VariancePaths) -> tuple[torch.Tensor, torch.Tensor]:
    """The law of X given W, Gaussian: (mean, variance) (B, N) = (rho I_W - I_V / 2,
    (1 - rho^2) I_V). exp(mean + variance / 2) = exp(rho I_W - rho^2 I_V / 2) is the
    forward given W (mean one over W: the mixed estimator's spot)."""
    rho = theta[:, 2].to(paths.int_v.dtype)[:, None]
    return rho * paths.int_w - 0.5 * paths.int_v, (1.0 - rho * rho) * paths.int_v


# -- the process ---------------------------------------------------------------------------------


class RoughBergomiProcess(Process):
    """Rough Bergomi with a flat forward variance, by the hybrid scheme in ``steps`` steps."""

    name = "rbergomi"
    param_names = PARAM_NAMES
    has_analytic_cf = False
    has_companion = True
    has_conditional = True  # X given W is Gaussian: conditional_x

    # What the reference (Monte Carlo on this scheme) is measured on: bench/rbergomi_bias.py.
    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {
        "H": (0.025, 0.5),
        "eta": (0.5, 4.0),
        "rho": (-0.95, -0.1),
        "xi0": (0.01, 0.16),
    }
    expiry_bounds = (0.03, 2.0)

    def __init__(self, steps: int = DEFAULT_STEPS, *, bridge: bool = True) -> None:
        if steps < 2:
            raise ValueError(f"rough Bergomi needs at least 2 steps, got {steps}")
        self.steps = steps
        self.bridge = bridge  # False: the increments' normals in time order
        self.normals_per_path = 2 * steps

    def default_domain(self) -> ModelDomain:
        b = self.param_bounds
        return ModelDomain(
            ranges=(
                ParameterRange(name="H", low=b["H"][0], high=b["H"][1], scale="log"),
                ParameterRange(name="eta", low=b["eta"][0], high=b["eta"][1], scale="log"),
                ParameterRange(name="rho", low=b["rho"][0], high=b["rho"][1]),
                ParameterRange(name="xi0", low=b["xi0"][0], high=b["xi0"][1], scale="log"),
                ParameterRange(name=EXPIRY, low=self.expiry_bounds[0], high=self.expiry_bounds[1], scale="log"),
            )
        )

    def check_params(self, params: dict[str, float]) -> None:
        """Unknown and missing names, then each value against :attr:`param_bounds`; the
        message starts with the parameter's name."""
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a parameter of rbergomi (takes {', '.join(self.param_names)})")
        missing = [p for p in self.param_names if p not in params]
        if missing:
            raise ValueError(f"{missing[0]} is missing (rbergomi takes {', '.join(self.param_names)})")
        super().check_params(params)

    def vol_parameter(self) -> tuple[int, Literal["identity", "sqrt"]]:
        return 3, "sqrt"  # vega: per 1.00 of sqrt(xi0)

    def scale(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        """sqrt(E[int_0^T V dt]) = sqrt(xi0 T)."""
        return torch.sqrt(theta[:, 3] * expiry)

    def scale_math(self, theta: Sequence[float], expiry: float) -> float:
        return spec.rbergomi_scale(theta, expiry)

    def scale_np(self, theta: Floats, expiry: Floats) -> Floats:
        return spec.rbergomi_scale_np(theta, expiry)

    def paths(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> VariancePaths:
        return hybrid_paths(theta, expiry, z, self.steps, bridge=self.bridge)

    def simulate_x(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return log_price(theta, self.paths(theta, expiry, z))

    def conditional_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian law of X given W per path: (mean, variance) (B, N) = (rho I_W -
        I_V / 2, (1 - rho^2) I_V). Its CF, exp(i u mean - u^2 variance / 2), averaged over
        paths is an unbiased estimate of phi_X(u) with less noise than exp(i u X) (the
        mixed estimator). Z_perp, normal 0, is not used."""
        return conditional_law(theta, self.paths(theta, expiry, z))

    def companion_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GBM with the scale s = sqrt(xi0 T) driven by Zc = rho W(T) / sqrt(T) +
        sqrt(1 - rho^2) Z_perp, from the same normals (with the bridge W(T) / sqrt(T) is
        normal 1): exactly standard normal, and X's limit as eta -> 0."""
        n = self.steps
        rho = theta[:, 2].to(z.dtype)[:, None]
        w_end = z[..., 1] if self.bridge else z[..., 1 : n + 1].sum(-1) / math.sqrt(n)
        zc = rho * w_end + torch.sqrt(1.0 - rho * rho) * z[..., 0]
        s = self.scale(theta, expiry)
        sc = s.to(z.dtype)[:, None]
        return -0.5 * sc * sc + sc * zc, s

    def reference_put(self, theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
        """E[(kappa - e^X)^+] (B, J) by the reference Monte Carlo on this scheme (mixed
        estimator, antithetic, control variates; engine/rbergomi_reference.py)."""
        from spectralmc_server.engine.rbergomi_reference import REFERENCE_PATHS, rbergomi_european_mc

        return rbergomi_european_mc(theta, expiry, log_kappa, REFERENCE_PATHS, steps=self.steps, seed=11).price


__all__ = [
    "DEFAULT_STEPS",
    "PARAM_NAMES",
    "RoughBergomiProcess",
    "VariancePaths",
    "bridge_increments",
    "bridge_levels",
    "conditional_law",
    "hybrid_kernel",
    "hybrid_paths",
    "hybrid_variance",
    "hybrid_volterra",
    "log_price",
    "split_normals",
    "variance_paths",
]
