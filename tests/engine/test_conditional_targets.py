"""The mixed CF targets (TrainConfig.targets = "conditional", reference.conditional_cf_y):
the mean over paths of X's Gaussian CF given the variance driver agrees with the direct
empirical CF of the same paths' X within standard errors, with a smaller spread, and a
process without a conditional law is refused by name."""

from __future__ import annotations

import pytest
import torch

from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.reference import conditional_cf_y
from spectralmc_server.engine.spectrum import SpectrumConfig, direct_cf
from spectralmc_server.engine.trainer import TrainConfig

F64 = torch.float64


def test_conditional_targets_agree_with_the_paths_and_are_less_noisy() -> None:
    process = get_process("rbergomi")
    spectrum = SpectrumConfig(n_freq=32)
    theta = torch.tensor([[0.1, 1.9, -0.9, 0.04], [0.3, 1.0, -0.5, 0.09], [0.05, 2.5, -0.7, 0.02]], dtype=F64)
    expiry = torch.tensor([0.5, 1.0, 0.1], dtype=F64)
    g = torch.Generator().manual_seed(5)
    groups, paths = 8, 512
    mixed, plain = [], []
    for _ in range(groups):
        z = torch.randn(3, paths, process.normals_per_path, generator=g, dtype=F64)
        mixed.append(conditional_cf_y(process, spectrum, theta, expiry, z))
        s = process.scale(theta, expiry)[:, None]
        plain.append(direct_cf(process.simulate_x(theta, expiry, z) / s, spectrum))
    m, p = torch.stack(mixed), torch.stack(plain)  # (groups, B, K)
    se = ((m.var(0) + p.var(0)) / groups).sqrt().abs()
    diff = (m.mean(0) - p.mean(0)).abs()
    assert bool((diff[:, 1:] <= 4.0 * se[:, 1:] + 1e-12).all()), (diff / se).max()
    assert torch.allclose(m[..., 0], torch.ones_like(m[..., 0]).to(m.dtype))  # phi(0) = 1 exactly
    # less noise at every frequency past the first few, on every point
    assert bool((m.var(0).abs()[:, 4:] < p.var(0).abs()[:, 4:]).all())


def test_conditional_targets_need_a_conditional_law() -> None:
    with pytest.raises(ValueError, match="targets = 'conditional' needs a conditional Gaussian law, which 'gbm' lacks"):
        TrainConfig(process="gbm", targets="conditional")
    with pytest.raises(ValueError, match="takes no control_variate"):
        TrainConfig(process="rbergomi", targets="conditional", control_variate=True)
    assert TrainConfig(process="rbergomi", targets="conditional").targets == "conditional"
