"""Heston with a continuously monitored knock-out barrier: the law a Heston barrier model
learns.

The model learns the defective characteristic function of X = log(S_T / F) on the
surviving paths, phi(u) = E[exp(i u X) 1{survived}], as the GBM laws do (engine/
processes/gbm_barrier.py), with Heston's parameters (v0, kappa, theta, xi, rho), the
carry r - q, the barrier's distance |log(L / S)| / s in units of the vanilla's spread
s = sqrt(int_0^T E[v_t] dt) (HestonProcess.scale), learned up to 5 and clamped there, and
its side (down or up, rounded to -1 or +1).

Paths: Andersen's QE-M scheme in ``STEPS`` steps, each weighted by the Brownian bridge's
probability of not crossing the barrier with the variance frozen over the step at its
start (engine/processes/barrier_paths.heston_barrier_paths). That is not exact: with
rho != 0 the variance moves with the price inside a step. bench/barrier_bias.py measures
the bias against FdHestonBarrierEngine and finer grids at up to ~4 bp of spot with 64
steps (~2 bp with 128); 64 is the law's, half the reference Monte Carlo's 128, for half
the training cost.

The share mass E[e^X 1{survived}] (the call's parity term) is the mean of e^X w on the
same paths: under the share measure Heston's variance has another drift, so the GBM
law's shifted normals do not carry over, and e^X has a moderate variance here (s <= 0.9
in the domain).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from spectralmc_server.engine.processes import spec
from spectralmc_server.engine.processes.barrier_paths import heston_barrier_paths
from spectralmc_server.engine.processes.base import EXPIRY, ModelDomain, ParameterRange, Process
from spectralmc_server.engine.processes.gbm_barrier import MAX_DISTANCE
from spectralmc_server.engine.processes.heston import HestonProcess
from spectralmc_server.engine.processes.spec import Floats

STEPS = 64  # QE steps over [0, T], each bridged with its variance frozen
_HESTON = HestonProcess()


def heston_barrier_theta(
    heston: torch.Tensor, carry: torch.Tensor, spot: torch.Tensor, level: torch.Tensor, expiry: torch.Tensor
) -> torch.Tensor:
    """theta (B, 8) = (v0, kappa, theta, xi, rho, carry, distance, side) of contracts with
    Heston parameters (B, 5); the distance |log(L / S)| / s clamped to MAX_DISTANCE
    (differentiable in spot, level and the parameters inside)."""
    s = _HESTON.scale(heston, expiry)
    signed = (torch.log(level / spot) / s).clamp(-MAX_DISTANCE, MAX_DISTANCE)
    side = torch.where(signed > 0, 1.0, -1.0).to(signed)
    return torch.cat([heston, carry[:, None], signed.abs()[:, None], side[:, None]], 1)


class HestonBarrierProcess(Process):
    """Heston killed where S touches L: theta = (v0, kappa, theta, xi, rho, carry,
    distance, side)."""

    name = "heston_barrier"
    param_names = ("v0", "kappa", "theta", "xi", "rho", "carry", "distance", "side")
    normals_per_path = 2 * STEPS
    defective = True

    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {
        **HestonProcess.param_bounds,
        "carry": (-1.0, 1.0),
        "distance": (0.0, MAX_DISTANCE),
        "side": (-1.0, 1.0),
    }

    def default_domain(self) -> ModelDomain:
        heston = _HESTON.default_domain().ranges[:5]  # v0, kappa, theta, xi, rho as the vanilla's
        return ModelDomain(
            ranges=(
                *heston,
                ParameterRange(name="carry", low=-0.1, high=0.1),
                ParameterRange(name="distance", low=0.0, high=MAX_DISTANCE),
                ParameterRange(name="side", low=-1.0, high=1.0),
                ParameterRange(name=EXPIRY, low=0.05, high=3.0, scale="log"),
            )
        )

    def scale(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        return _HESTON.scale(theta[:, :5], expiry)

    def scale_math(self, theta: Sequence[float], expiry: float) -> float:
        return spec.heston_scale(theta[:5], expiry)

    def scale_np(self, theta: Floats, expiry: Floats) -> Floats:
        return spec.heston_scale_np(theta[:, :5], expiry)

    def canonical_params(self, theta: torch.Tensor) -> torch.Tensor:
        """The side rounded to -1 (down) or +1 (up)."""
        side = torch.where(theta[:, 7] > 0, 1.0, -1.0).to(theta)
        return torch.cat([theta[:, :7], side[:, None]], 1)

    def _paths(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up = theta[:, 7] > 0
        s = self.scale(theta, expiry)
        log_barrier = torch.where(up, theta[:, 6], -theta[:, 6]) * s
        return heston_barrier_paths(theta[:, :5], expiry, theta[:, 5], log_barrier, up, z, "continuous", steps=STEPS)

    def simulate_weighted(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X (B, N) and the survival weights (B, N) from normals z (B, N, 2 STEPS)."""
        return self._paths(theta, expiry, z)

    def share_weights(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """e^X w (B, N): its mean is the share mass E[e^X 1{survived}]."""
        x, w = self._paths(theta, expiry, z)
        return torch.exp(x) * w

    def weighted_with_share(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """X, the survival weights and e^X w (each (B, N)) from one simulation."""
        x, w = self._paths(theta, expiry, z)
        return x, w, torch.exp(x) * w

    def simulate_x(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self._paths(theta, expiry, z)[0]

    def reference_put(self, theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
        """E[(kappa - e^X)^+ 1{survived}] (B, J) by Monte Carlo on the law's own paths
        (2^14 antithetic pseudo-random paths a point; :func:`heston_out_mc`)."""
        vanilla = vanilla_over_forward(theta, expiry, log_kappa)
        return heston_out_mc(theta, expiry, log_kappa, 1 << 14, vanilla=vanilla, seed=23)["price"]


def vanilla_over_forward(
    theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor, is_call: torch.Tensor | None = None
) -> torch.Tensor:
    """E[(kappa - e^X)^+] (or the call where ``is_call``) (B, J) under Heston, by the
    process's reference pricer (COS on the analytic CF) on S = 1, r = carry, q = 0, where
    D F = 1."""
    from spectralmc_server.engine.pricer import OptionBatch
    from spectralmc_server.engine.reference_pricers import reference_pricer

    b, j = log_kappa.shape
    calls = torch.zeros(b, j, dtype=torch.bool) if is_call is None else is_call.expand(b, j)

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x[:, None].expand(b, j).flatten()

    carry = theta[:, 5]
    one = torch.ones(b * j, dtype=torch.float64, device=theta.device)
    options = OptionBatch(
        spot=one,
        strike=(torch.exp(log_kappa) * torch.exp(carry * expiry)[:, None]).flatten(),
        expiry=rows(expiry),
        rate=rows(carry),
        dividend=0.0 * one,
        is_call=calls.flatten(),
        theta=theta[:, :5].repeat_interleave(j, 0),
    )
    return reference_pricer(_HESTON).evaluate(options, frozenset({"price"}))["price"].view(b, j)


def heston_out_mc(
    theta: torch.Tensor,
    expiry: torch.Tensor,
    log_kappa: torch.Tensor,
    n_paths: int,
    *,
    is_call: torch.Tensor | None = None,
    vanilla: torch.Tensor | None = None,
    seed: int = 0,
    steps: int = STEPS,
    block_paths: int = 1 << 12,
    max_elements: int = 1 << 22,
) -> dict[str, torch.Tensor]:
    """Heston knock-outs over the forward by Monte Carlo on the frozen-variance bridge
    (``steps`` QE steps): ``price`` and ``se`` (B, J), the put E[(kappa - e^X)^+ w] or,
    where ``is_call``, the call; ``survival`` and ``survival_se`` (B,). Antithetic
    pseudo-random normals, the same for every row in blocks of ``block_paths``, so a
    row's answer does not depend on the batch (bit for bit). With ``vanilla`` (B, J), the
    exact E[payoff] over the forward (COS on the analytic CF), the unweighted payoff of
    the same paths is a control variate for the prices, its coefficient fitted per
    point and strike (strong where the barrier is far)."""
    from spectralmc_server.engine.normals import NormalsConfig, generate_block

    theta = HestonBarrierProcess().canonical_params(theta)
    b, j = log_kappa.shape
    calls = torch.zeros(b, j, dtype=torch.bool) if is_call is None else is_call.expand(b, j)
    kappa = torch.exp(log_kappa)[:, None, :]
    sign = torch.where(calls, -1.0, 1.0).to(kappa)[:, None, :]
    up = theta[:, 7] > 0
    s = _HESTON.scale(theta[:, :5], expiry)
    log_barrier = torch.where(up, theta[:, 6], -theta[:, 6]) * s
    d = 2 * steps
    keys = ("a", "aa", "g", "gg", "ag") if vanilla is not None else ("a", "aa")  # the control's sums: with a vanilla
    acc = {k: torch.zeros(b, j + 1, dtype=torch.float64) for k in keys}
    per_chunk = max(1, max_elements // (block_paths * d))
    blocks = max(1, -(-n_paths // block_paths))
    for block in range(blocks):
        cfg = NormalsConfig(seed=seed, mode="pseudo", antithetic=True, rows=block_paths, dims=d, dtype="float64")
        z = generate_block(cfg, block, theta.device)[None]
        for lo in range(0, b, per_chunk):
            sl = slice(lo, min(b, lo + per_chunk))
            x, w = heston_barrier_paths(
                theta[sl, :5],
                expiry[sl],
                theta[sl, 5],
                log_barrier[sl],
                up[sl],
                z.expand(sl.stop - sl.start, -1, -1),
                "continuous",
                steps=steps,
            )
            payoff = (sign[sl] * (kappa[sl] - torch.exp(x)[..., None])).clamp(min=0.0)
            a = torch.cat([payoff * w[..., None], w[..., None]], -1)
            acc["a"][sl] += a.sum(1)
            acc["aa"][sl] += (a * a).sum(1)
            if vanilla is not None:
                g = torch.cat([payoff, torch.ones_like(w)[..., None]], -1)  # the survival has no control
                for key, value in (("g", g), ("gg", g * g), ("ag", a * g)):
                    acc[key][sl] += value.sum(1)
    n = float(blocks * block_paths)
    mean = {k: v / n for k, v in acc.items()}
    var_a = (mean["aa"] - mean["a"] ** 2).clamp(min=0.0)
    est = mean["a"]
    if vanilla is not None:
        var_g = mean["gg"] - mean["g"] ** 2
        cov = mean["ag"] - mean["a"] * mean["g"]
        has = var_g[:, :j] > 0
        beta = torch.where(has, cov[:, :j] / torch.where(has, var_g[:, :j], 1.0), 0.0)
        est = torch.cat([mean["a"][:, :j] - beta * (mean["g"][:, :j] - vanilla), mean["a"][:, j:]], 1)
        var_a = torch.cat([(var_a[:, :j] - beta * cov[:, :j]).clamp(min=0.0), var_a[:, j:]], 1)
    se = torch.sqrt(var_a / n)
    return {"price": est[:, :j], "se": se[:, :j], "survival": est[:, j], "survival_se": se[:, j]}


__all__ = ["STEPS", "HestonBarrierProcess", "heston_barrier_theta", "heston_out_mc", "vanilla_over_forward"]
