"""Geometric Brownian motion: exact terminal simulation and the analytic CF.

X = log(S_T / F) = -s^2/2 + s Z with s = sigma sqrt(T), so E[exp(X)] = 1 and
phi_X(u) = exp(-i u s^2 / 2 - u^2 s^2 / 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from spectralmc_server.engine.processes import spec
from spectralmc_server.engine.processes.base import EXPIRY, VOL_BOUNDS, ModelDomain, ParameterRange, Process
from spectralmc_server.engine.processes.spec import Floats


class GBMProcess(Process):
    """Black-Scholes dynamics dS = (r - q) S dt + sigma S dW under the pricing measure."""

    name = "gbm"
    param_names = ("vol",)
    normals_per_path = 1
    has_analytic_cf = True
    has_companion = True

    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {"vol": VOL_BOUNDS}

    def default_domain(self) -> ModelDomain:
        return ModelDomain(
            ranges=(
                ParameterRange(name="vol", low=0.05, high=1.0, scale="log"),
                ParameterRange(name=EXPIRY, low=0.02, high=3.0, scale="log"),
            )
        )

    def scale(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        return theta[:, 0] * torch.sqrt(expiry)

    def scale_math(self, theta: Sequence[float], expiry: float) -> float:
        return spec.gbm_scale(theta, expiry)

    def scale_np(self, theta: Floats, expiry: Floats) -> Floats:
        return spec.gbm_scale_np(theta, expiry)

    def simulate_x(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        s = self.scale(theta, expiry).to(z.dtype)[:, None]  # (B, 1)
        return -0.5 * s * s + s * z[..., 0]  # (B, N)

    def companion_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GBM is its own companion: the control variate then removes all the noise (a
        check of the machinery, not a technique)."""
        return self.simulate_x(theta, expiry, z), self.scale(theta, expiry)

    def analytic_cf_x(self, u: torch.Tensor, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        s = self.scale(theta, expiry)[:, None]  # (B, 1)
        var = s * s
        return torch.exp(torch.complex(-0.5 * var * u * u, -0.5 * var * u))
