"""GBM with a discretely monitored knock-out barrier: the law a discrete barrier model learns.

The barrier is checked on n equally spaced dates t_k = k T / n, k = 1..n (expiry included,
t = 0 not), as engine/processes/barrier_paths.py and the reference Monte Carlo define it.
The model learns the defective characteristic function of X = log(S_T / F) on the event
that S was on the surviving side of L at every date,

    phi(u) = E[exp(i u X) 1{survived}],    phi(0) = P(survived),

and prices it as the continuous law does (engine/barrier_learned.py). Its parameters are
those of the continuous law (engine/processes/gbm_barrier.py: vol, carry, distance
|log(L / S)| / s, side) and the number of dates n, an integer in [1, MAX_DATES] (sampled
on a log scale and rounded, as the Asian's fixings are).

Simulation. The log-price is exact at the dates: a path takes MAX_DATES normals, a point
with n dates uses the first n in time order (the increments of W over each interval,
scaled by sqrt(T / n)), and the rest are masked. The weight is the indicator that every
date is on the surviving side; unlike the continuous law's bridge weight it is not
smooth in the parameters, which makes the training targets noisier (more paths or steps
for the same accuracy), not biased.

Validation truth (``reference_put``): Monte Carlo (:func:`discrete_out_mc`) with three
control variates whose means are closed forms. On the same simulated dates the Brownian
bridge between consecutive dates gives each path's exact probability of surviving the
continuous barrier; that payoff's mean is the Reiner-Rubinstein closed form, close to the
discrete one for many dates, and closer still with the barrier moved away by the
Broadie-Glasserman-Kou shift. The barrier watched at expiry alone (:func:`terminal_out`)
is close for few dates or a far barrier.

Beyond MAX_DATES a contract is priced by the reference Monte Carlo (engine/
barrier_pricer.py): a path costs one normal per date, so a law of daily monitoring over
years would cost 4 to 12 times this one's training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch

from spectralmc_server.engine.barrier_analytic import BGK_BETA
from spectralmc_server.engine.processes.barrier_paths import crossing_survival
from spectralmc_server.engine.processes.base import ModelDomain, ParameterRange
from spectralmc_server.engine.processes.gbm_barrier import GBMBarrierProcess

MAX_DATES = 64  # monitoring dates a discrete law learns (a path takes this many normals)
CONTROL_SHIFTS = (0.0, BGK_BETA)  # the reference's continuous controls: the barrier, then BGK's


def date_count(theta: torch.Tensor) -> torch.Tensor:
    """n per point (B,) as float, rounded and clamped to [1, MAX_DATES]."""
    return torch.round(theta[:, 4]).clamp(1, MAX_DATES)


def discrete_paths(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    z: torch.Tensor,
    *,
    share: bool = False,
    continuous: bool = True,
    shifts: tuple[float, ...] = (0.0,),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """theta (B, 5) = (vol, carry, distance, side, n), T (B,), normals z (B, N, MAX_DATES)
    -> (X_T (B, N), discrete survival indicator (B, N), continuous survival (B, N, H) or
    None without ``continuous``).

    The continuous survival is the product over the n intervals of the bridge's
    probability of not crossing (barrier_paths.crossing_survival), exact for GBM: its
    mean over paths is the continuous barrier's survival. Column h watches the barrier
    moved away from the spot by ``shifts[h]`` vol sqrt(T / n) (0: the barrier itself;
    the Broadie-Glasserman-Kou constant: the shifted barrier that approximates the
    discrete one). With ``share`` the paths are under the share measure (W^S = W - vol t:
    each unit increment shifted by vol sqrt(dt)), as GBMBarrierProcess.share_weights.
    """
    dtype = z.dtype
    n = date_count(theta).to(dtype)[:, None]  # (B, 1)
    vol = theta[:, 0].to(dtype)[:, None]
    mu = theta[:, 1].to(dtype)[:, None]
    up = theta[:, 3] > 0
    side = torch.where(up, -1.0, 1.0).to(dtype)[:, None]  # d = side (l - b)
    t = expiry.to(dtype)[:, None]
    s = vol * torch.sqrt(t)
    b = -side * theta[:, 2].to(dtype)[:, None] * s  # log(L / S): below 0 down, above 0 up
    dt = t / n  # (B, 1)
    k = torch.arange(1, MAX_DATES + 1, dtype=dtype, device=z.device)[None, :]  # (1, M)
    mask = (k <= n)[:, None, :]  # (B, 1, M) real dates
    inc = z[..., :MAX_DATES]
    if share:
        inc = inc + (vol * torch.sqrt(dt))[..., None]
    walk = torch.cumsum(inc, dim=-1) * torch.sqrt(dt)[..., None]  # W(t_k) (B, N, M)
    tk = (dt * k)[:, None, :]  # (B, 1, M)
    lk = (mu - 0.5 * vol * vol)[..., None] * tk + vol[..., None] * walk  # log(S_k / S)
    dk = side[..., None] * (lk - b[..., None])  # signed distance, > 0 surviving
    alive = ((dk > 0) | ~mask).all(dim=-1)  # (B, N)
    last = (n.long() - 1).expand(-1, dk.shape[1])[..., None]  # (B, N, 1)
    x = torch.gather(lk, -1, last)[..., 0] - mu * t
    if not continuous:
        return x, alive.to(dtype), None
    d_prev = torch.cat([(-side * b)[..., None].expand(-1, dk.shape[1], 1), dk[..., :-1]], dim=-1)
    step = (vol * torch.sqrt(dt))[..., None]  # (B, 1, 1)
    conts = []
    for shift in shifts:
        cross = crossing_survival(d_prev + shift * step, dk + shift * step, (vol * vol * dt)[..., None])
        conts.append(torch.where(mask, cross, torch.ones_like(cross)).prod(dim=-1))
    return x, alive.to(dtype), torch.stack(conts, -1)


class GBMBarrierDiscreteProcess(GBMBarrierProcess):
    """GBM killed where S is on the far side of L on one of n equally spaced dates:
    theta = (vol, carry, distance, side, dates)."""

    name = "gbm_barrier_discrete"
    param_names = ("vol", "carry", "distance", "side", "dates")
    normals_per_path = MAX_DATES

    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {
        **GBMBarrierProcess.param_bounds,
        "dates": (1.0, float(MAX_DATES)),
    }

    def default_domain(self) -> ModelDomain:
        """The continuous law's ranges, with the dates before the expiry."""
        *law, expiry = super().default_domain().ranges
        dates = ParameterRange(name="dates", low=1.0, high=float(MAX_DATES), scale="log")
        return ModelDomain(ranges=(*law, dates, expiry))

    def canonical_params(self, theta: torch.Tensor) -> torch.Tensor:
        """The side rounded to -1 (down) or +1 (up), the dates to an integer in [1, MAX_DATES]."""
        out = super().canonical_params(theta[:, :4])
        return torch.cat([out, date_count(theta)[:, None].to(theta)], 1)

    def simulate_weighted(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X (B, N) and the survival indicators (B, N) from normals z (B, N, MAX_DATES)."""
        x, alive, _ = discrete_paths(theta, expiry, z, continuous=False)
        return x, alive

    def share_weights(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The survival indicators (B, N) under the share measure: their mean is the share
        mass E[e^X 1{survived}]."""
        return discrete_paths(theta, expiry, z, share=True, continuous=False)[1]

    def reference_put(self, theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
        """E[(kappa - e^X)^+ 1{survived}] (B, J) by the control-variate Monte Carlo
        (2^15 paths a point)."""
        return discrete_out_mc(theta, expiry, log_kappa, 1 << 15, seed=17)["price"]


def terminal_out(
    theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor, calls: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The knock-out watched at expiry only (n = 1), in closed form: E[payoff 1{S_T on the
    surviving side}] over the forward (B, J) (a put, or a call where ``calls``) and the
    survival probability (B,). X ~ N(-s^2/2, s^2) survives on an interval of X: above
    b - mu T for a down barrier, below it for an up barrier; the payoff restricts it to
    one side of log(kappa), and E[e^X 1{X in (a, c)}] = N((c + s^2/2) / s) - N((a + s^2/2) / s)
    (the share measure), P(X in (a, c)) = N((c - m) / s) - N((a - m) / s)."""
    vol, carry, distance, side = theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3]
    s = (vol * torch.sqrt(expiry))[:, None]
    m = -0.5 * s * s
    edge = (torch.where(side > 0, 1.0, -1.0) * distance * s[:, 0] - carry * expiry)[:, None]  # b - mu T
    inf = torch.full_like(edge, math.inf)
    lo, hi = torch.where(side[:, None] > 0, -inf, edge), torch.where(side[:, None] > 0, edge, inf)

    def mass(a: torch.Tensor, c: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        c = torch.maximum(a, c)
        out: torch.Tensor = torch.special.ndtr((c - m - shift) / s) - torch.special.ndtr((a - m - shift) / s)
        return out

    kappa = torch.exp(log_kappa)
    zero = torch.zeros_like(s)
    put = kappa * mass(lo, torch.minimum(hi, log_kappa), zero) - mass(lo, torch.minimum(hi, log_kappa), s * s)
    call_lo = torch.maximum(lo, log_kappa)
    call = mass(call_lo, hi, s * s) - kappa * mass(call_lo, hi, zero)
    return torch.where(calls, call, put), mass(lo, hi, zero)[:, 0]


def barrier_level(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """The barrier L / S of the law's canonical parameters: exp(+-distance vol sqrt(T)),
    above spot for an up barrier (side > 0), below for a down one."""
    vol, distance, side = theta[:, 0], theta[:, 2], theta[:, 3]
    return torch.exp(torch.where(side > 0, 1.0, -1.0) * distance * vol * torch.sqrt(expiry))


def _control_means(
    theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor, calls: torch.Tensor
) -> torch.Tensor:
    """The exact means (B, J + 1, C) of :func:`discrete_out_mc`'s controls, each payoff
    then the survival: the continuous knock-out at the barrier and at the BGK-shifted
    barrier (CONTROL_SHIFTS), then the knock-out watched at expiry only (S = 1,
    r = carry, q = 0, so D F = 1)."""
    from spectralmc_server.engine.barrier_analytic import barrier_out_price, survival_probability

    b, j = log_kappa.shape
    vol, carry, side = theta[:, 0], theta[:, 1], theta[:, 3]
    level = barrier_level(theta, expiry)
    one, zero = torch.ones_like(expiry), torch.zeros_like(expiry)
    down = side < 0

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x[:, None].expand(b, j).flatten()

    def continuous(at: torch.Tensor) -> torch.Tensor:
        strike = (torch.exp(log_kappa) * torch.exp(carry * expiry)[:, None]).flatten()
        args = (rows(one), strike, rows(at), rows(expiry), rows(carry), rows(zero), rows(vol))
        price = barrier_out_price(rows(down), calls.flatten(), *args).view(b, j)
        return torch.cat([price, survival_probability(down, one, at, expiry, carry, zero, vol)[:, None]], 1)

    terminal, terminal_survival = terminal_out(theta, expiry, log_kappa, calls)
    step = vol * torch.sqrt(expiry / date_count(theta))  # moved away from spot by shift x step
    moved = [level * torch.exp(torch.where(down, -shift * step, shift * step)) for shift in CONTROL_SHIFTS]
    return torch.stack([*(continuous(at) for at in moved), torch.cat([terminal, terminal_survival[:, None]], 1)], -1)


def discrete_out_mc(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    log_kappa: torch.Tensor,
    n_paths: int,
    *,
    is_call: torch.Tensor | None = None,
    seed: int = 0,
    control_variate: bool = True,
    block_paths: int = 1 << 13,
    max_elements: int = 1 << 23,
) -> dict[str, torch.Tensor]:
    """Discrete knock-outs over the forward by Monte Carlo: keys ``price`` and ``se``
    (B, J), E[(kappa - e^X)^+ 1{survived}] (a put) or, where ``is_call`` (B, J) is True,
    E[(e^X - kappa)^+ 1{survived}], and ``survival`` and ``survival_se`` (B,), the
    probability of surviving the n dates.

    Antithetic pseudo-random normals and, by default, three control variates per
    estimate, the same payoff (1 for the survival) weighted by
    - each path's probability of surviving the continuous barrier (the Brownian bridge
      between consecutive dates), whose mean is the Reiner-Rubinstein closed form
      (engine/barrier_analytic.py): close to the discrete one for many dates;
    - the same for the barrier moved away by the Broadie-Glasserman-Kou shift
      (bgk_shifted_level), whose mean is the closed form there: closer still;
    - the indicator that S_T is on the surviving side, whose mean is
      :func:`terminal_out`: close for few dates or a far barrier;
    their coefficients estimated per point and strike by least squares on the same
    paths. Every row takes the same normals in the same blocks of ``block_paths``,
    whatever the batch, so a row's answer does not depend on the others (bit for bit)."""
    from spectralmc_server.engine.normals import NormalsConfig, generate_block

    theta = GBMBarrierDiscreteProcess().canonical_params(theta)
    b, j = log_kappa.shape
    calls = torch.zeros(b, j, dtype=torch.bool) if is_call is None else is_call.expand(b, j)
    exact = _control_means(theta, expiry, log_kappa, calls)  # (B, J + 1, C)
    carry, side = theta[:, 1], theta[:, 3]
    level = barrier_level(theta, expiry)
    controls = exact.shape[-1]
    kappa = torch.exp(log_kappa)[:, None, :]  # (B, 1, J)
    sign = torch.where(calls, -1.0, 1.0).to(kappa)[:, None, :]  # put: kappa - e^X; call: e^X - kappa
    edge = (torch.log(level) - carry * expiry)[:, None]  # b - mu T
    up = (side > 0)[:, None]
    # Sums over paths of y = (target, its C controls) and of y y^T, per estimate.
    s1 = torch.zeros(b, j + 1, 1 + controls, dtype=torch.float64)
    s2 = torch.zeros(b, j + 1, 1 + controls, 1 + controls, dtype=torch.float64)
    per_chunk = max(1, max_elements // (block_paths * MAX_DATES))
    blocks = max(1, -(-n_paths // block_paths))
    for block in range(blocks):
        cfg = NormalsConfig(
            seed=seed, mode="pseudo", antithetic=True, rows=block_paths, dims=MAX_DATES, dtype="float64"
        )
        z = generate_block(cfg, block, theta.device)[None]  # (1, paths, M): every row's normals
        for lo in range(0, b, per_chunk):
            sl = slice(lo, min(b, lo + per_chunk))
            zs = z.expand(sl.stop - sl.start, -1, -1)
            x, alive, cont = discrete_paths(theta[sl], expiry[sl], zs, shifts=CONTROL_SHIFTS)
            assert cont is not None
            at_end = torch.where(up[sl], x < edge[sl], x > edge[sl]).to(x.dtype)
            payoff = (sign[sl] * (kappa[sl] - torch.exp(x)[..., None])).clamp(min=0.0)  # (b, paths, J)
            payoff = torch.cat([payoff, torch.ones_like(payoff[..., :1])], -1)  # survival last
            w = torch.stack([alive, *cont.unbind(-1), at_end], -1)  # (b, paths, 1 + C)
            # y = payoff w per estimate, so sum y y^T = sum payoff^2 w w^T: two batched matmuls
            ww = (w[..., :, None] * w[..., None, :]).flatten(2)  # (b, paths, (1 + C)^2)
            s1[sl] += torch.bmm(payoff.transpose(1, 2), w)
            s2[sl] += torch.bmm(payoff.square().transpose(1, 2), ww).view(s2[sl].shape)
    n = float(blocks * block_paths)
    mean = s1 / n
    cov = s2 / n - mean[..., :, None] * mean[..., None, :]  # (B, J + 1, 1 + C, 1 + C)
    if control_variate:
        gg = cov[..., 1:, 1:]
        ga = cov[..., 1:, 0:1]
        beta = torch.linalg.pinv(gg, hermitian=True) @ ga  # (B, J + 1, C, 1): least squares, a
        beta = beta[..., 0]  # singular gg (a control constant or equal to another) is fine
        est = mean[..., 0] - (beta * (mean[..., 1:] - exact)).sum(-1)
        var = (cov[..., 0, 0] - (beta * ga[..., 0]).sum(-1)).clamp(min=0.0)
    else:
        est, var = mean[..., 0], cov[..., 0, 0].clamp(min=0.0)
    se = torch.sqrt(var / n)
    return {"price": est[:, :j], "se": se[:, :j], "survival": est[:, j], "survival_se": se[:, j]}


__all__ = [
    "MAX_DATES",
    "GBMBarrierDiscreteProcess",
    "barrier_level",
    "date_count",
    "discrete_out_mc",
    "discrete_paths",
    "terminal_out",
]
