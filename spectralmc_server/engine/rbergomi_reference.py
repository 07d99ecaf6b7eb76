"""Reference prices for rough Bergomi (engine/processes/rbergomi.py): Monte Carlo with
standard errors, on the hybrid scheme or on an exact simulation of the Gaussian pair.

Exact scheme. On the grid t_m = m dt the vector (dW_1 .. dW_n, Y(t_1) .. Y(t_{n-1})) is
Gaussian; in units of sqrt(dt) and dt^H its covariance depends on H and n only:
  Cov(e_j, e_k) = delta_jk,
  Cov(Y_m, e_j) = ((m - j + 1)^{a+1} - (m - j)^{a+1}) / (a + 1) for j <= m, else 0,
  Cov(Y_i, Y_k) = int_0^i (i - u)^a (k - u)^a du = d^{2a+1} F_a(i / d),  d = k - i > 0,
  F_a(r) = int_0^r x^a (1 + x)^a dx  (i^{2a+1} / (2a + 1) where i = k),
which is s^{a+1} t^a / (a + 1) 2F1(1, -a; a + 2; s / t) (Bayer, Friz and Gatheral). F_a is
integrated numerically, without scipy: Gauss-Jacobi (weight x^a, nodes by Golub-Welsch) on
[0, min(r, 1)], then Gauss-Legendre on the panels [2^{j-1}, 2^j]; on each panel the
integrand's singularities lie at least a panel width away, so 24 nodes reach float64
rounding (tests/engine/test_rbergomi.py checks it against mpmath's 2F1). The Cholesky
factor of the joint covariance, ordered increments first, is [[I, 0], [C_ye, L]] with
L the Cholesky factor of the Schur complement C_yy - C_ye C_ye^T (the law of Y given W):
the increments are the pool's normals as they are, exactly as in the hybrid scheme, and
Y = C_ye e + L xi. (The hybrid scheme keeps C_ye exactly, its g_k, and replaces L by the
first cell's residual alone.) At H = 1/2 the complement vanishes (Y = W), and so where
Cholesky fails the factor is the symmetric square root from an eigendecomposition. The
compensator is the exact t^{2H}; the log price is the same Euler sum as the hybrid's.
O(n^2) per path: a check, not a production scheme.

Monte Carlo (``rbergomi_european_mc``), in units of the forward, each with a standard error:
- ``estimator="plain"``: payoffs of e^X;
- ``estimator="mixed"`` (Romano and Touzi 1997; McCrickerd and Pakkanen 2018): given W,
  X is normal, so the payoff's conditional expectation is Black's formula with forward
  exp(rho I_W - rho^2 I_V / 2) and total variance (1 - rho^2) I_V. Unbiased, and it
  removes the orthogonal noise;
- ``antithetic``: each path with its mirror (-z), the pair averaged;
- ``control_variate``: the conditional forward f (mean 1 exactly: the scheme is a
  martingale on the grid) and I_V / (xi0 T) (mean 1 exactly: the compensator is the
  scheme's own variance), with their regression coefficients estimated per point and
  strike (an O(1/N) bias, far below the standard error at reference path counts).
The measured variance-reduction factors are in docs/method.md (bench/rbergomi_bias.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.processes.rbergomi import (
    DEFAULT_STEPS,
    VariancePaths,
    conditional_law,
    hybrid_paths,
    log_price,
    split_normals,
    variance_paths,
)
from spectralmc_server.engine.reference import MCResult

Scheme = Literal["hybrid", "exact"]
Estimator = Literal["plain", "mixed"]
Arr = npt.NDArray[np.float64]

REFERENCE_PATHS = 1 << 15  # the process's reference_put: paths per point (antithetic pairs count twice)
GAUSS_NODES = 24  # per panel of the Volterra covariance's quadrature


# -- the Volterra covariance -----------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def gauss_jacobi(power: float, nodes: int = GAUSS_NODES) -> tuple[Arr, Arr]:
    """Nodes and weights on [0, 1] for the weight x^power (power > -1), by Golub-Welsch
    on the Jacobi matrix of the weight (1 - y)^0 (1 + y)^power on [-1, 1]."""
    alpha, beta = 0.0, power
    k = np.arange(nodes, dtype=np.float64)
    s = 2.0 * k + alpha + beta
    diag = np.where(
        k == 0, (beta - alpha) / (alpha + beta + 2.0), (beta**2 - alpha**2) / np.where(k == 0, 1.0, s * (s + 2.0))
    )
    j = k[1:]
    sj = 2.0 * j + alpha + beta
    off = np.sqrt(4.0 * j * (j + alpha) * (j + beta) * (j + alpha + beta) / (sj**2 * (sj + 1.0) * (sj - 1.0)))
    lam, vec = np.linalg.eigh(np.diag(diag) + np.diag(off, 1) + np.diag(off, -1))
    mu0 = (
        2.0 ** (alpha + beta + 1.0) * math.gamma(alpha + 1.0) * math.gamma(beta + 1.0) / math.gamma(alpha + beta + 2.0)
    )
    weights = mu0 * vec[0] ** 2
    # x = (1 + y) / 2: x^power dx = 2^{-power-1} (1 + y)^power dy
    return (1.0 + lam) / 2.0, weights * 2.0 ** (-power - 1.0)


def volterra_f(power: float, r: Arr) -> Arr:
    """F(r) = int_0^r x^a (1 + x)^a dx for r > 0 (any shape), a = ``power`` in (-1/2, 0]."""
    r = np.asarray(r, dtype=np.float64)
    flat = r.reshape(-1)
    xj, wj = gauss_jacobi(power)
    first = np.minimum(flat, 1.0)[:, None]  # [0, min(r, 1)]: x = first y, x^a = first^a y^a
    total = first[:, 0] ** (power + 1.0) * ((1.0 + first * xj[None, :]) ** power * wj[None, :]).sum(1)
    top = float(flat.max(initial=1.0))
    panels = max(0, math.ceil(math.log2(top)))
    if panels:
        xl, wl = np.polynomial.legendre.leggauss(GAUSS_NODES)
        lo = 2.0 ** np.arange(panels, dtype=np.float64)  # (P,): [1, 2], [2, 4], ...
        a = lo[None, :]
        b = np.clip(flat[:, None], a, 2.0 * a)  # (M, P): empty where r <= lo
        half = 0.5 * (b - a)
        x = (a + half)[..., None] + half[..., None] * xl  # (M, P, G)
        total = total + (half[..., None] * wl * (x * (1.0 + x)) ** power).sum((1, 2))
    out: Arr = total.reshape(r.shape)
    return out


def volterra_covariance(hurst: float, steps: int) -> Arr:
    """Cov(Y(t_i), Y(t_k)) / dt^{2H} for i, k = 1 .. steps - 1 (exact, by quadrature)."""
    a = hurst - 0.5
    m = np.arange(1, steps, dtype=np.float64)
    i, k = np.minimum(m[:, None], m[None, :]), np.maximum(m[:, None], m[None, :])
    d = k - i
    off = d > 0
    cov = np.where(off, 0.0, i ** (2.0 * a + 1.0) / (2.0 * a + 1.0))
    dd = d[off]
    cov[off] = dd ** (2.0 * a + 1.0) * volterra_f(a, i[off] / dd)
    return cov


def volterra_increment_covariance(hurst: float, steps: int) -> Arr:
    """Cov(Y(t_m) / dt^H, dW_j / sqrt(dt)) (steps - 1, steps), m = 1 .. n-1, j = 1 .. n."""
    a = hurst - 0.5
    m = np.arange(1, steps, dtype=np.float64)[:, None]
    j = np.arange(1, steps + 1, dtype=np.float64)[None, :]
    lag = np.clip(m - j, 0.0, None)
    out: Arr = np.where(j <= m, ((lag + 1.0) ** (a + 1.0) - lag ** (a + 1.0)) / (a + 1.0), 0.0)
    return out


@functools.lru_cache(maxsize=16)
def exact_factor(hurst: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_ye (n-1, n), L (n-1, n-1)) float64 on the CPU: Y(t_1 .. t_{n-1}) / dt^H =
    C_ye e + L xi is exact in law for i.i.d. unit normals e (increments) and xi."""
    c_ye = torch.from_numpy(volterra_increment_covariance(hurst, steps))
    schur = torch.from_numpy(volterra_covariance(hurst, steps)) - c_ye @ c_ye.T
    factor, info = torch.linalg.cholesky_ex(schur)
    if int(info) != 0:  # H near 1/2: the complement is (numerically) singular
        lam, vec = torch.linalg.eigh(schur)
        factor = vec * torch.sqrt(lam.clamp(min=0.0))[None, :]
    return c_ye, factor


def exact_volterra(hurst: torch.Tensor, e: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """Y(t_1) .. Y(t_{n-1}) in units of dt^H (B, N, n-1), exact in law, from unit
    increments e (B, N, n) and independent normals xi (B, N, n-1)."""
    n = e.shape[-1]
    out = torch.empty_like(xi)
    for b, h in enumerate(hurst.tolist()):
        c_ye, factor = (m.to(device=e.device, dtype=e.dtype) for m in exact_factor(float(h), n))
        out[b] = e[b] @ c_ye.T + xi[b] @ factor.T
    return out


def exact_paths(
    theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, steps: int, *, bridge: bool = True
) -> VariancePaths:
    """As rbergomi.hybrid_paths with the exact Gaussian pair and the exact compensator."""
    z_perp, e, xi = split_normals(z, steps, bridge)
    h = theta[:, 0]
    m = torch.arange(1, steps, dtype=torch.float64, device=theta.device)[None, :]
    var_y = m ** (2.0 * h.to(torch.float64))[:, None] / (2.0 * h.to(torch.float64))[:, None]  # m^{2H} / (2H)
    return variance_paths(theta, expiry, e, z_perp, exact_volterra(h, e, xi), var_y)


def scheme_paths(
    scheme: Scheme, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, steps: int, *, bridge: bool = True
) -> VariancePaths:
    if scheme == "hybrid":
        return hybrid_paths(theta, expiry, z, steps, bridge=bridge)
    if scheme == "exact":
        return exact_paths(theta, expiry, z, steps, bridge=bridge)
    raise ValueError(f"scheme must be 'hybrid' or 'exact', got {scheme!r}")


# -- Monte Carlo -------------------------------------------------------------------------------


def black_undiscounted(
    forward: torch.Tensor, kappa: torch.Tensor, total_var: torch.Tensor, put_sign: torch.Tensor
) -> torch.Tensor:
    """Black's price in units of the forward: put (put_sign +1) kappa N(-d2) - f N(-d1),
    call (-1) f N(d1) - kappa N(d2); total variance > 0."""
    sd = torch.sqrt(total_var)
    d1 = (torch.log(forward / kappa) + 0.5 * total_var) / sd
    d2 = d1 - sd
    price: torch.Tensor = put_sign * (
        kappa * torch.special.ndtr(-put_sign * d2) - forward * torch.special.ndtr(-put_sign * d1)
    )
    return price


def payoff_samples(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    paths: VariancePaths,
    kappa: torch.Tensor,
    put_sign: torch.Tensor,
    estimator: Estimator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per path: the payoff's estimate (B, N, J) (``plain``: the payoff of e^X; ``mixed``:
    its expectation given W) and the two controls (B, N, 2), whose exact mean is 0:
    the forward (e^X, or its expectation given W) less 1, and I_V / (xi0 T) - 1."""
    xi0t = (theta[:, 3] * expiry).to(paths.int_v.dtype)[:, None]
    if estimator == "mixed":
        mean, var = conditional_law(theta, paths)
        forward = torch.exp(mean + 0.5 * var)  # (B, N)
        pay = black_undiscounted(forward[..., None], kappa, var[..., None], put_sign)
    elif estimator == "plain":
        forward = torch.exp(log_price(theta, paths))
        pay = (put_sign * (kappa - forward[..., None])).clamp(min=0.0)
    else:
        raise ValueError(f"estimator must be 'plain' or 'mixed', got {estimator!r}")
    controls = torch.stack([forward - 1.0, paths.int_v / xi0t - 1.0], dim=-1)
    return pay, controls


class ControlledMean:
    """Running sums for the mean of samples y (B, N, J) corrected by controls c (B, N, K)
    of exact mean zero: y - beta c with beta = Cov(y, c) Cov(c)^{-1} per point and
    column, estimated from the same samples (an O(1/N) bias); K = 0 is the plain mean."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, y: torch.Tensor, c: torch.Tensor) -> None:
        parts = {
            "y": y.sum(1),
            "yy": (y * y).sum(1),
            "c": c.sum(1),
            "cc": torch.einsum("bni,bnk->bik", c, c),
            "yc": torch.einsum("bnj,bnk->bjk", y, c),
        }
        for key, value in parts.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += y.shape[1]

    def result(self) -> MCResult:
        n, s = float(self.count), self.sums
        mean_y, mean_c = s["y"] / n, s["c"] / n
        var = s["yy"] / n - mean_y * mean_y
        k = mean_c.shape[-1]
        if k:
            cov_cc = s["cc"] / n - mean_c[:, :, None] * mean_c[:, None, :]  # (B, K, K)
            cov_yc = s["yc"] / n - mean_y[..., None] * mean_c[:, None, :]  # (B, J, K)
            beta = cov_yc @ torch.linalg.pinv(cov_cc, rtol=1e-12, hermitian=True)  # (B, J, K)
            mean_y = mean_y - (beta * mean_c[:, None, :]).sum(-1)
            var = var - (beta * cov_yc).sum(-1)
        var = var.clamp(min=0.0) * n / max(n - 1.0 - k, 1.0)
        return MCResult(mean_y, torch.sqrt(var / n))


def pair_average(x: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) -> (B, N/2, ...): each path averaged with its antithetic mirror, which
    sits N/2 rows later in a block drawn with ``antithetic=True``."""
    half = x.shape[1] // 2
    return 0.5 * (x[:, :half] + x[:, half:])


def rbergomi_normals(
    seed: int, block: int, rows: int, points: int, steps: int, *, antithetic: bool, device: torch.device
) -> torch.Tensor:
    """Block ``block`` of pseudo-random float64 normals as (points, rows, 2 steps)."""
    cfg = NormalsConfig(
        seed=seed, mode="pseudo", antithetic=antithetic, rows=rows, dims=points * 2 * steps, dtype="float64"
    )
    return generate_block(cfg, block, device).view(rows, points, 2 * steps).transpose(0, 1)


def rbergomi_european_mc(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    log_moneyness: torch.Tensor,
    n_paths: int,
    *,
    is_call: torch.Tensor | None = None,
    steps: int = DEFAULT_STEPS,
    scheme: Scheme = "hybrid",
    estimator: Estimator = "mixed",
    antithetic: bool = True,
    control_variate: bool = True,
    bridge: bool = True,
    seed: int = 0,
    first_block: int = 0,
    max_elements: int = 1 << 23,
    on_chunk: Callable[[int], None] | None = None,
) -> MCResult:
    """E[(kappa - e^X)^+] (puts) or E[(e^X - kappa)^+] (calls, ``is_call`` (B, J)) per
    point, (B, J) in units of the forward (multiply by D F for money), with its standard
    error. theta (B, 4) = (H, eta, rho, xi0), T (B,), log_moneyness log(K/F) (B, J).

    Pseudo-random float64 normals, blocks ``first_block, ...`` of the stream ``seed``
    (disjoint block ranges give independent estimates); with ``antithetic`` a block's
    second half mirrors its first and a pair counts as one sample. Work is chunked so
    that no temporary holds more than about ``max_elements`` numbers; ``on_chunk(n)``,
    after each chunk, hears the paths it added over all points (rows times B): a caller
    that must pause between chunks (a calibration's correction, run in slices) or stop
    there (by raising) does it in that hook. Any eta > 0 is accepted (the process's
    param_bounds are for contracts)."""
    if n_paths < 4:
        raise ValueError(f"need at least 4 paths for a standard error, got {n_paths}")
    b, j = log_moneyness.shape
    kappa = torch.exp(log_moneyness.to(torch.float64))[:, None, :]  # (B, 1, J)
    put_sign = torch.ones_like(kappa) if is_call is None else torch.where(is_call, -1.0, 1.0).to(kappa)[:, None, :]
    width = 2 * (1 << (2 * steps - 1).bit_length()) + j  # numbers per path: the FFT's, the payoffs
    chunk = max(4, min(n_paths, max_elements // max(b * width, 1)))
    chunk -= chunk % 2
    acc = ControlledMean()
    done, block = 0, first_block
    while done < n_paths:
        rows = min(chunk, n_paths - done)
        rows += rows % 2
        z = rbergomi_normals(seed, block, rows, b, steps, antithetic=antithetic, device=theta.device)
        paths = scheme_paths(scheme, theta, expiry, z, steps, bridge=bridge)
        pay, controls = payoff_samples(theta, expiry, paths, kappa, put_sign, estimator)
        if antithetic:  # rows r and r + rows/2 are mirrors: one sample per pair
            pay, controls = pair_average(pay), pair_average(controls)
        acc.add(pay, controls if control_variate else controls[..., :0])
        done += rows
        block += 1
        if on_chunk is not None:
            on_chunk(rows * b)
    return acc.result()


__all__ = [
    "REFERENCE_PATHS",
    "ControlledMean",
    "Estimator",
    "Scheme",
    "black_undiscounted",
    "exact_factor",
    "exact_paths",
    "exact_volterra",
    "gauss_jacobi",
    "pair_average",
    "payoff_samples",
    "rbergomi_european_mc",
    "rbergomi_normals",
    "scheme_paths",
    "volterra_covariance",
    "volterra_f",
    "volterra_increment_covariance",
]
