"""Arithmetic-average Asian options under GBM: the law of the average, simulated exactly.

The average A = (1/n) sum_i S(t_i) over n equally spaced fixings t_i = i T / n has no
closed-form CF. Its forward is F_A = E[A] = S (1/n) sum_i e^{b t_i} with carry b = r - q,
and X = log(A / F_A) has E[e^X] = 1 and a law that depends on (vol, b, n, T) only:

  A / F_A = sum_i w_i exp(-vol^2 t_i / 2 + vol W(t_i)),  w_i = e^{b t_i} / sum_j e^{b t_j}.

So the carry is a model input here (it sets the weights), unlike for European options.
The geometric average G = (prod_i S(t_i))^{1/n} is lognormal, which gives both the scale
s (the standard deviation of log G: vol sqrt(T (n + 1)(2n + 1) / (6 n^2))) and the
control variate: X_c = -s^2/2 + vol (1/n) sum_i W(t_i) is exactly N(-s^2/2, s^2) and
shares every normal with X.

Parameters: vol, carry, fixings (n, used rounded to an integer in [1, MAX_FIXINGS]).
A path takes MAX_FIXINGS normals; a point with n fixings uses the first n, in time
order (increments of W over each fixing interval).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch

from spectralmc_server.engine import kernels
from spectralmc_server.engine.processes import spec
from spectralmc_server.engine.processes.base import EXPIRY, VOL_BOUNDS, ModelDomain, ParameterRange, Process
from spectralmc_server.engine.processes.spec import MAX_FIXINGS, Floats


def fixing_count(theta: torch.Tensor) -> torch.Tensor:
    """n per point (B,) as float, rounded and clamped to [1, MAX_FIXINGS]."""
    return torch.round(theta[:, 2]).clamp(1, MAX_FIXINGS)


def fixing_grid(theta: torch.Tensor, expiry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixing times t_i = i T / n (B, MAX_FIXINGS) and the mask of real fixings (i <= n)."""
    n = fixing_count(theta)[:, None]  # (B, 1)
    i = torch.arange(1, MAX_FIXINGS + 1, dtype=expiry.dtype, device=expiry.device)[None, :]  # (1, M)
    mask = i <= n
    t = torch.where(mask, i * expiry[:, None] / n, expiry[:, None])  # padding sits at T (weight 0)
    return t, mask


def average_weights(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """w_i = e^{b t_i} / sum_j e^{b t_j} over the real fixings, 0 beyond (B, MAX_FIXINGS)."""
    t, mask = fixing_grid(theta, expiry)
    growth = torch.where(mask, torch.exp(theta[:, 1:2] * t), torch.zeros_like(t))
    return growth / growth.sum(1, keepdim=True)


def average_forward_ratio(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """F_A / S = (1/n) sum_i e^{b t_i} (B,)."""
    t, mask = fixing_grid(theta, expiry)
    growth = torch.where(mask, torch.exp(theta[:, 1:2] * t), torch.zeros_like(t))
    return growth.sum(1) / fixing_count(theta)


def geometric_scale(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """Standard deviation of log G: vol sqrt(T (n + 1)(2n + 1) / (6 n^2))."""
    n = fixing_count(theta)
    return theta[:, 0] * torch.sqrt(expiry * (n + 1.0) * (2.0 * n + 1.0) / (6.0 * n * n))


def asian_arguments(theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's parameter table (B, 4) = vol, T, n, s_geo and forward weights
    (B, MAX_FIXINGS), in the dtype of the normals ``z`` (kernels.asian_x_cuda)."""
    n = fixing_count(theta)
    cols = [theta[:, 0], expiry, n, geometric_scale(theta, expiry)]
    params = torch.stack([c.to(z.dtype) for c in cols], dim=1).contiguous()
    weights = average_weights(theta, expiry).to(z.dtype).contiguous()
    return params, weights


class AsianProcess(Process):
    """The arithmetic average of GBM over n equally spaced fixings up to the expiry."""

    name = "asian"
    param_names = ("vol", "carry", "fixings")
    normals_per_path = MAX_FIXINGS
    has_analytic_cf = False
    has_companion = True
    averages = True

    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {
        "vol": VOL_BOUNDS,
        "carry": (-2.0, 2.0),
        "fixings": (1.0, float(MAX_FIXINGS)),
    }

    def default_domain(self) -> ModelDomain:
        return ModelDomain(
            ranges=(
                ParameterRange(name="vol", low=0.05, high=1.0, scale="log"),
                ParameterRange(name="carry", low=-0.1, high=0.1),
                ParameterRange(name="fixings", low=2.0, high=float(MAX_FIXINGS), scale="log"),
                ParameterRange(name=EXPIRY, low=0.05, high=3.0, scale="log"),
            )
        )

    @property
    def market_param_names(self) -> tuple[str, ...]:
        return ("vol",)  # carry = rate - dividend; fixings from the contract

    def forward_ratio(
        self, theta: torch.Tensor, expiry: torch.Tensor, rate: torch.Tensor, dividend: torch.Tensor
    ) -> torch.Tensor:
        """F_A / S: the average's forward, through the carry parameter (= rate - dividend)."""
        return average_forward_ratio(theta, expiry)

    def forward_ratio_math(self, theta: Sequence[float], expiry: float, rate: float, dividend: float) -> float:
        return spec.average_forward_ratio(theta, expiry)

    def forward_ratio_np(self, theta: Floats, expiry: Floats, rate: Floats, dividend: Floats) -> Floats:
        return spec.average_forward_ratio_np(theta, expiry)

    def rate_parameter(self) -> int | None:
        return 1  # the carry

    def check_params(self, params: dict[str, float]) -> None:
        super().check_params(params)
        fixings = params["fixings"]
        if not float(fixings).is_integer():
            raise ValueError(f"fixings must be an integer in [1, {MAX_FIXINGS}], got {fixings}")

    def vol_parameter(self) -> tuple[int, Literal["identity", "sqrt"]]:
        return 0, "identity"

    def scale(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        return geometric_scale(theta, expiry)

    def scale_math(self, theta: Sequence[float], expiry: float) -> float:
        return spec.geometric_scale(theta, expiry)

    def scale_np(self, theta: Floats, expiry: Floats) -> Floats:
        return spec.geometric_scale_np(theta, expiry)

    def canonical_params(self, theta: torch.Tensor) -> torch.Tensor:
        """Fixing counts are integers: sampled points are rounded before use."""
        out = theta.clone()
        out[:, 2] = fixing_count(theta)
        return out

    def reference_put(self, theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
        """E[(kappa - A / F_A)^+] by the control-variate MC (2^15 paths)."""
        return asian_put_mc(theta, expiry, log_kappa, 1 << 15, seed=11)[0]

    def _paths(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log(S(t_i) / F(t_i)) at every fixing (B, N, M) and the fixing mask (B, M)."""
        dtype = z.dtype
        t, mask = fixing_grid(theta, expiry)
        n = fixing_count(theta)
        dt = (expiry / n).to(dtype)[:, None, None]  # (B, 1, 1)
        vol = theta[:, 0].to(dtype)[:, None, None]
        w = torch.cumsum(z[..., :MAX_FIXINGS] * torch.sqrt(dt), dim=-1)  # (B, N, M): W(t_i)
        return -0.5 * vol * vol * t.to(dtype)[:, None, :] + vol * w, mask

    def simulate_x(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if kernels.use_fused(z, theta, expiry):
            return kernels.asian_x_cuda(z, *asian_arguments(theta, expiry, z), companion=False)[0]
        log_ratio, _ = self._paths(theta, expiry, z)
        weights = average_weights(theta, expiry).to(z.dtype)[:, None, :]  # (B, 1, M), 0 past n
        # log sum_i w_i exp(l_i), stabilised by the largest term
        top = log_ratio.max(-1, keepdim=True).values
        return top[..., 0] + torch.log((weights * torch.exp(log_ratio - top)).sum(-1))

    def simulate_with_companion(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """X and X_c from one fused pass over each path's normals on a CUDA device."""
        if kernels.use_fused(z, theta, expiry):
            x, xc = kernels.asian_x_cuda(z, *asian_arguments(theta, expiry, z), companion=True)
            assert xc is not None
            return x, (xc, geometric_scale(theta, expiry))
        return self.simulate_x(theta, expiry, z), self.companion_x(theta, expiry, z)

    def companion_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X_c = -s^2/2 + vol (1/n) sum_i W(t_i): the log geometric average centred to a
        mean-one exponential, exactly N(-s^2/2, s^2)."""
        log_ratio, mask = self._paths(theta, expiry, z)
        t, _ = fixing_grid(theta, expiry)
        n = fixing_count(theta).to(z.dtype)[:, None]
        vol = theta[:, 0].to(z.dtype)[:, None]
        # vol W(t_i) = log_ratio + vol^2 t_i / 2
        vw = (log_ratio + 0.5 * (vol * vol)[:, :, None] * t.to(z.dtype)[:, None, :]) * mask.to(z.dtype)[:, None, :]
        s = geometric_scale(theta, expiry)
        sc = s.to(z.dtype)[:, None]
        return -0.5 * sc * sc + vw.sum(-1) / n, s


def geometric_put(theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
    """E[(kappa - G / F_A)^+] in closed form (B, J) for kappa = e^{log_kappa} (B, J):
    log(G / F_A) is normal with mean m = (1/n) sum_i (log(F_i / F_A) - vol^2 t_i / 2) and
    variance s^2 (geometric_scale)."""
    t, mask = fixing_grid(theta, expiry)
    n = fixing_count(theta)
    log_fi = torch.where(mask, theta[:, 1:2] * t, torch.zeros_like(t))  # log(F_i / S)
    vol = theta[:, 0:1]
    m = (torch.where(mask, log_fi - 0.5 * vol * vol * t, torch.zeros_like(t))).sum(1) / n
    m = m - torch.log(average_forward_ratio(theta, expiry))  # (B,)
    s = geometric_scale(theta, expiry)[:, None]
    fwd = torch.exp(m[:, None] + 0.5 * s * s)  # E[G / F_A]
    kappa = torch.exp(log_kappa)
    d1 = (torch.log(fwd / kappa) + 0.5 * s * s) / s
    d2 = d1 - s
    put: torch.Tensor = kappa * torch.special.ndtr(-d2) - fwd * torch.special.ndtr(-d1)
    return put


def asian_log_moments(theta: torch.Tensor, expiry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b3, b4) of R = A / F_A, each (B,), as engine/moments.py takes them: a = log E[R^2],
    b3 = log E[R^3] - 3a, b4 = log E[R^4] - 6a, exactly (no simulation).

    R = sum_i w_i L_i with L_i = M_1 ... M_i, the M_k = exp(vol dW_k - vol^2 dt / 2)
    independent lognormal gross returns over the fixing intervals (the first from 0 to
    t_1 = dt = T / n), so R = M_1 Y_1 with Y_k = w_k + M_{k+1} Y_{k+1}, Y_n = w_n. With
    mu_k = E[Y_k] = sum_{i >= k} w_i, c_j = E[M^j] - 1 = expm1(j (j - 1) vol^2 dt / 2) and
    e_k^m = E[Y_k^m] / mu_k^m - 1, the binomial expansion of E[Y_k^m] gives
      e_k^m = sum_{j=2}^{m} C(m, j) p^{m-j} q^j (c_j + e_{k+1}^j + c_j e_{k+1}^j),
    p = w_k / mu_k, q = mu_{k+1} / mu_k (p + q = 1; the j = 0, 1 terms vanish): a sum of
    positive terms, so E[R^m] - 1 = c_m + e_1^m + c_m e_1^m (mu_1 = 1) has no cancellation.
    O(MAX_FIXINGS m^2) elementwise operations; rows past their n fixings are no-ops."""
    w = average_weights(theta, expiry)  # (B, M), 0 past n
    mu = torch.flip(torch.cumsum(torch.flip(w, [1]), 1), [1])  # mu_k = sum_{i >= k} w_i
    dt = expiry / fixing_count(theta)
    v = theta[:, 0] * theta[:, 0] * dt
    c = {j: torch.expm1(0.5 * j * (j - 1) * v) for j in (2, 3, 4)}
    zero = torch.zeros_like(v)
    e = {2: zero, 3: zero, 4: zero}  # e_{k+1}^m
    binom = {(2, 2): 1.0, (3, 2): 3.0, (3, 3): 1.0, (4, 2): 6.0, (4, 3): 4.0, (4, 4): 1.0}
    for k in range(MAX_FIXINGS - 1, -1, -1):
        mk = mu[:, k]
        nxt = mu[:, k + 1] if k + 1 < MAX_FIXINGS else zero
        real = mk > 0
        safe = torch.where(real, mk, torch.ones_like(mk))
        p = torch.where(real, w[:, k] / safe, torch.ones_like(mk))
        q = torch.where(real, nxt / safe, zero)
        grow = {j: c[j] + e[j] + c[j] * e[j] for j in (2, 3, 4)}
        new = {}
        for m in (2, 3, 4):
            total = zero
            for j in range(2, m + 1):
                total = total + binom[m, j] * p ** (m - j) * q**j * grow[j]
            new[m] = total
        e = new
    raw = {m: torch.log1p(c[m] + e[m] + c[m] * e[m]) for m in (2, 3, 4)}  # log E[R^m]
    a = raw[2]
    return a, raw[3] - 3.0 * a, raw[4] - 6.0 * a


__all__ = [
    "MAX_FIXINGS",
    "AsianProcess",
    "asian_log_moments",
    "average_forward_ratio",
    "average_weights",
    "fixing_count",
    "fixing_grid",
    "geometric_put",
    "geometric_scale",
]


def asian_put_mc(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    log_kappa: torch.Tensor,
    n_paths: int,
    *,
    seed: int = 0,
    control_variate: bool = True,
    chunk: int = 1 << 16,
    max_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for arithmetic Asians: E[(kappa - A / F_A)^+] (B, J) by Monte Carlo
    with antithetic pseudo-random normals and, by default, the geometric-average put as
    a control variate (closed form, correlation above 0.99 with the arithmetic payoff),
    its coefficient estimated per point and strike. Returns (price, standard error),
    in units of F_A (multiply by D F_A for money)."""
    from spectralmc_server.engine.normals import NormalsConfig, generate_block

    process = AsianProcess()
    b, j = log_kappa.shape
    kappa = torch.exp(log_kappa)[:, None, :]  # (B, 1, J)
    sums = {k: torch.zeros(b, j, dtype=torch.float64) for k in ("a", "g", "aa", "gg", "ag")}
    done, block = 0, 0
    while done < n_paths:
        rows = min(chunk, n_paths - done, max(2, max_elements // (b * MAX_FIXINGS)))
        rows += rows % 2
        cfg = NormalsConfig(seed=seed, mode="pseudo", antithetic=True, rows=rows, dims=b * MAX_FIXINGS, dtype="float64")
        z = generate_block(cfg, block, theta.device).view(rows, b, MAX_FIXINGS).transpose(0, 1)  # (B, rows, M)
        a = (kappa - torch.exp(process.simulate_x(theta, expiry, z))[..., None]).clamp(min=0.0)  # (B, rows, J)
        xc, _ = process.companion_x(theta, expiry, z)
        log_g = xc + _geometric_log_shift(theta, expiry)[:, None]  # log(G / F_A) per path
        g = (kappa - torch.exp(log_g)[..., None]).clamp(min=0.0)
        sums["a"] += a.sum(1)
        sums["g"] += g.sum(1)
        sums["aa"] += (a * a).sum(1)
        sums["gg"] += (g * g).sum(1)
        sums["ag"] += (a * g).sum(1)
        done += rows
        block += 1
    n = float(done)
    mean_a, mean_g = sums["a"] / n, sums["g"] / n
    var_a = (sums["aa"] / n - mean_a**2).clamp(min=0.0)
    if not control_variate:
        return mean_a, torch.sqrt(var_a / n)
    var_g = (sums["gg"] / n - mean_g**2).clamp(min=1e-300)
    cov = sums["ag"] / n - mean_a * mean_g
    beta = cov / var_g
    exact_g = geometric_put(theta, expiry, log_kappa)
    price = mean_a - beta * (mean_g - exact_g)
    var = (var_a - cov * cov / var_g).clamp(min=0.0)
    return price, torch.sqrt(var / n)


def _geometric_log_shift(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """log(G / F_A) - X_c: the constant that turns the companion into the geometric
    average over the average's forward (B,)."""
    t, mask = fixing_grid(theta, expiry)
    n = fixing_count(theta)
    vol = theta[:, 0:1]
    m = torch.where(mask, theta[:, 1:2] * t - 0.5 * vol * vol * t, torch.zeros_like(t)).sum(1) / n
    s = geometric_scale(theta, expiry)
    return m - torch.log(average_forward_ratio(theta, expiry)) + 0.5 * s * s
