"""GBM with a continuously monitored knock-out barrier: the law a barrier model learns.

The model learns the defective characteristic function of X = log(S_T / F) on the event
that S never touched the barrier L in [0, T],

    phi(u) = E[exp(i u X) 1{survived}],    phi(0) = P(survived),

from which COS prices a knock-out put or call as it prices a vanilla (engine/
barrier_learned.py). Its parameters are the vol, the carry r - q (the barrier event
depends on the drift, the law of X alone does not), the barrier's distance in units of
the spread s = vol sqrt(T) and its side,

    distance = |log(L / S)| / s,    side = -1 for a down barrier, +1 for an up barrier,

the side rounded to +-1 (``canonical_params``). Down and up are one network with the
side as an input, rather than one signed distance, because the law's dependence on the
barrier has a kink where the barrier reaches the spot (survival falls to 0 from both
sides): with the side apart, that point is the edge of the domain, not inside it (a
signed distance measured a max error three times the p95, all within 0.1 of the spot).

A path is simulated to expiry in one step and weighted by the probability that the
Brownian bridge between its two ends did not cross the barrier,

    w = 1 - exp(-2 b (b - x) / s^2)   where x = log(S_T / S) is on the barrier's side of
                                      b = log(L / S), else 0,

which is the exact conditional survival for GBM (the bridge of a Brownian motion with
drift does not depend on the drift): the weights' mean is the survival probability with
no discretisation error, and weighted targets are smooth in the parameters. One normal
per path, as for the vanilla.

The distance is learned up to 5, past which the barrier is hit with probability below
2 N(-5 + |nu|) (about 1e-6) and a contract is priced at 5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from spectralmc_server.engine.barrier_analytic import barrier_out_price
from spectralmc_server.engine.processes import spec
from spectralmc_server.engine.processes.barrier_paths import gbm_barrier_paths
from spectralmc_server.engine.processes.base import EXPIRY, VOL_BOUNDS, ModelDomain, ParameterRange, Process
from spectralmc_server.engine.processes.spec import Floats

MAX_DISTANCE = 5.0  # |log(L / S)| / s learned; beyond it the barrier is priced at this distance


def barrier_distance(spot: torch.Tensor, level: torch.Tensor, vol: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """The signed log(L / S) / (vol sqrt(T)), clamped to [-MAX_DISTANCE, MAX_DISTANCE]
    (differentiable in spot, vol and T inside)."""
    d = torch.log(level / spot) / (vol * torch.sqrt(expiry))
    return d.clamp(-MAX_DISTANCE, MAX_DISTANCE)


def barrier_params(vol: torch.Tensor, carry: torch.Tensor, signed_distance: torch.Tensor) -> torch.Tensor:
    """theta (B, 4) = (vol, carry, distance, side) from a signed distance (B,)."""
    side = torch.where(signed_distance > 0, 1.0, -1.0).to(signed_distance)
    return torch.stack([vol, carry, signed_distance.abs(), side], 1)


class GBMBarrierProcess(Process):
    """dS = (r - q) S dt + vol S dW, killed where S touches L: theta = (vol, carry,
    distance, side)."""

    name = "gbm_barrier"
    param_names: tuple[str, ...] = ("vol", "carry", "distance", "side")
    normals_per_path = 1
    defective = True

    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {
        "vol": VOL_BOUNDS,
        "carry": (-1.0, 1.0),
        "distance": (0.0, MAX_DISTANCE),
        "side": (-1.0, 1.0),
    }

    def default_domain(self) -> ModelDomain:
        return ModelDomain(
            ranges=(
                ParameterRange(name="vol", low=0.05, high=1.0, scale="log"),
                ParameterRange(name="carry", low=-0.1, high=0.1),
                ParameterRange(name="distance", low=0.0, high=MAX_DISTANCE),
                ParameterRange(name="side", low=-1.0, high=1.0),
                ParameterRange(name=EXPIRY, low=0.05, high=3.0, scale="log"),
            )
        )

    def scale(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        return theta[:, 0] * torch.sqrt(expiry)  # the vanilla's spread: vol sqrt(T)

    def scale_math(self, theta: Sequence[float], expiry: float) -> float:
        return spec.gbm_scale(theta, expiry)

    def scale_np(self, theta: Floats, expiry: Floats) -> Floats:
        return spec.gbm_scale_np(theta, expiry)

    def canonical_params(self, theta: torch.Tensor) -> torch.Tensor:
        """The side rounded to -1 (down) or +1 (up)."""
        side = torch.where(theta[:, 3] > 0, 1.0, -1.0).to(theta)
        return torch.cat([theta[:, :3], side[:, None]], 1)

    def simulate_weighted(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X (B, N) and the survival weights (B, N) from normals z (B, N, 1)."""
        return self._paths(theta, expiry, z, share=False)

    def share_weights(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The survival weights (B, N) under the share measure (the stock as numeraire),
        whose mean is the share mass E[e^X 1{survived}]: there log S has drift
        r - q + vol^2 / 2, and the weights in [0, 1] make a far quieter estimate than the
        mean of e^X w, whose variance grows as e^{s^2}."""
        return self._paths(theta, expiry, z, share=True)[1]

    def _paths(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor, *, share: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale(theta, expiry)
        carry, up = theta[:, 1], theta[:, 3] > 0
        signed = torch.where(up, theta[:, 2], -theta[:, 2])
        shifted = z + s.to(z.dtype)[:, None, None] if share else z  # W^S = W - vol t
        return gbm_barrier_paths(theta[:, :1], expiry, carry, signed * s, up, shifted, "continuous")

    def simulate_x(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.simulate_weighted(theta, expiry, z)[0]

    def reference_put(self, theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
        """E[(kappa - e^X)^+ 1{survived}] (B, J) by Reiner-Rubinstein (engine/
        barrier_analytic.py): the knock-out put on S = 1 with r = carry, q = 0, whose
        discounted price over the forward is the same expectation."""
        b, j = log_kappa.shape
        vol, carry, distance, side = (theta[:, i : i + 1].expand(b, j) for i in range(4))
        d = torch.where(side > 0, distance, -distance)
        t = expiry[:, None].expand(b, j)
        forward = torch.exp(carry * t)
        level = torch.exp(d * vol * torch.sqrt(t))
        one = torch.ones_like(t)
        price = barrier_out_price(
            (d < 0).flatten(),
            "put",
            one.flatten(),
            (torch.exp(log_kappa) * forward).flatten(),
            level.flatten(),
            t.flatten(),
            carry.flatten(),
            torch.zeros_like(t).flatten(),
            vol.flatten(),
        )
        return price.view(b, j)
