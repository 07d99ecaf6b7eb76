"""FFT estimate of the characteristic function: unbiasedness, binning correction, truncation."""

from __future__ import annotations

import math

import pytest
import torch

from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.spectrum import SpectrumConfig, binning_kernel, direct_cf, estimate_cf

CPU = torch.device("cpu")


def _gbm_y(s: torch.Tensor, n: int, *, mode: str = "pseudo", seed: int = 0) -> torch.Tensor:
    """Samples of Y = X / s for GBM: N(-s/2, 1), one row per scale."""
    cfg = NormalsConfig.model_validate(
        dict(seed=seed, mode=mode, antithetic=False, rows=n, dims=len(s), dtype="float64")
    )
    z = generate_block(cfg, 0, CPU).t()  # (B, N)
    return -0.5 * s[:, None] + z


def _gbm_phi(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.complex(-0.5 * w * w * torch.ones_like(s[:, None]), -0.5 * w * s[:, None]))


def test_frequency_grid_matches_cos() -> None:
    spec = SpectrumConfig(n_freq=64, half_width=10.0, n_bins=1024)
    w = spec.frequencies()
    assert w.shape == (64,) and float(w[0]) == 0.0
    assert torch.allclose(w[1:] - w[:-1], torch.full((63,), math.pi / 20.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 \\* n_freq"):
        SpectrumConfig(n_freq=128, n_bins=128)


def test_estimate_is_within_four_standard_errors_of_the_analytic_cf() -> None:
    spec = SpectrumConfig(n_freq=64, half_width=10.0, n_bins=4096)
    s = torch.tensor([0.01, 0.2, 0.5, 1.0, 1.7], dtype=torch.float64)
    n = 8192
    est = estimate_cf(_gbm_y(s, n), spec)
    w = spec.frequencies()
    phi, phi2 = _gbm_phi(s, w), _gbm_phi(s, 2 * w)
    # Var cos(wY) = (1 + Re phi(2w))/2 - Re phi(w)^2 ; Var sin(wY) = (1 - Re phi(2w))/2 - Im phi(w)^2
    se_re = torch.sqrt(((1 + phi2.real) / 2 - phi.real**2).clamp(min=1e-30) / n)
    se_im = torch.sqrt(((1 - phi2.real) / 2 - phi.imag**2).clamp(min=1e-30) / n)
    z_re = ((est.real - phi.real) / se_re)[:, 1:]
    z_im = ((est.imag - phi.imag) / se_im)[:, 1:]
    assert float(z_re.abs().max()) < 4 and float(z_im.abs().max()) < 4
    # And the errors really are noise of that size, not something far smaller or biased.
    assert 0.7 < float(torch.cat([z_re, z_im]).std()) < 1.3
    assert float((est[:, 0] - 1).abs().max()) < 1e-12  # nothing truncated at L = 10


def test_binning_kernel_is_divided_out() -> None:
    # Coarse bins make the kernel visible: sinc^2(w delta/2) well below 1 at high w.
    spec = SpectrumConfig(n_freq=64, half_width=10.0, n_bins=128)
    s = torch.tensor([0.3, 1.0], dtype=torch.float64)
    y = _gbm_y(s, 1 << 15, mode="sobol")
    w = spec.frequencies()
    kernel = binning_kernel(w, spec.bin_width)
    assert float(kernel[-1]) < 0.85
    exact = direct_cf(y, spec)  # the same samples, summed exactly
    raw = estimate_cf(y, spec, correct_binning=False)
    fixed = estimate_cf(y, spec)
    assert torch.allclose(raw, fixed * kernel, atol=1e-14)
    # Uncorrected, the estimate is damped by the kernel; corrected, it matches the exact sum.
    rel_raw = ((raw - exact).abs() / exact.abs().clamp(min=1e-3))[:, 1:12]
    rel_fixed = ((fixed - exact).abs() / exact.abs().clamp(min=1e-3))[:, 1:12]
    assert float(rel_raw.max()) > 0.005
    assert float(rel_fixed.max()) < float(rel_raw.max()) / 100


def test_fine_bins_agree_with_direct_summation() -> None:
    spec = SpectrumConfig(n_freq=96, half_width=10.0, n_bins=8192)
    s = torch.tensor([0.05, 0.7, 1.5], dtype=torch.float64)
    y = _gbm_y(s, 4096, seed=3)
    assert float((estimate_cf(y, spec) - direct_cf(y, spec)).abs().max()) < 2e-4


def test_truncation_drops_mass_outside_the_range() -> None:
    # With L = 2 about 4.6% of N(0, 1) lies outside: the estimate targets the truncated CF.
    spec = SpectrumConfig(n_freq=32, half_width=2.0, n_bins=4096)
    s = torch.tensor([1e-6], dtype=torch.float64)  # Y ~ N(0, 1)
    y = _gbm_y(s, 1 << 16, mode="sobol")
    est = estimate_cf(y, spec)
    kept = float((y.abs() <= 2.0).double().mean())
    assert abs(float(est[0, 0].real) - kept) < 1e-9
    assert abs(kept - math.erf(2 / math.sqrt(2))) < 1e-3
    # The truncated CF differs from the full one by at most the mass outside, and here
    # visibly so at w = 0; the direct (exact) truncated sum agrees with the FFT estimate.
    full = _gbm_phi(s, spec.frequencies())
    bias = (est - full).abs()
    assert float(bias.max()) <= 1 - kept + 5e-3
    assert float(bias[0, 0]) > 0.04
    assert float((est - direct_cf(y, spec)).abs().max()) < 1e-4
    # With L = 10 nothing is dropped.
    wide = SpectrumConfig(n_freq=32, half_width=10.0, n_bins=4096)
    assert abs(float(estimate_cf(y, wide)[0, 0].real) - 1.0) < 1e-12


def test_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(points, paths\)"):
        estimate_cf(torch.zeros(10), SpectrumConfig())


# -- control variates -----------------------------------------------------------------------
def _cv_errors(process_name: str, theta: list[float], expiry: float, reps: int = 6) -> tuple[float, float]:
    """Mean squared error over frequencies k >= 1 of the plain and the control-variate
    estimates (the same normals), against the analytic CF."""
    from spectralmc_server.engine.processes import get_process
    from spectralmc_server.engine.reference import analytic_cf_y
    from spectralmc_server.engine.trainer import mc_targets

    process = get_process(process_name)
    spec = SpectrumConfig(n_freq=64, half_width=10.0, n_bins=1024)
    th = torch.tensor([theta] * 8, dtype=torch.float64)
    t = torch.full((8,), expiry, dtype=torch.float64)
    true = analytic_cf_y(process, spec, th, t)
    plain = cv = 0.0
    for r in range(reps):
        cfg = NormalsConfig(seed=5, mode="pseudo", antithetic=False, rows=1024, dims=8 * process.normals_per_path)
        z = generate_block(cfg, r, CPU)
        plain += float((mc_targets(process, spec, th, t, z)[:, 1:] - true[:, 1:]).abs().square().mean())
        cv += float(
            (mc_targets(process, spec, th, t, z, True, "regression")[:, 1:] - true[:, 1:]).abs().square().mean()
        )
    return plain / reps, cv / reps


def test_control_variate_with_an_exact_companion_removes_the_noise() -> None:
    """GBM is its own companion: the regression coefficient is 1 and the estimate is the
    known CF up to the O(1/N) error of estimating that coefficient."""
    plain, cv = _cv_errors("gbm", [0.3], 1.0)
    assert cv < plain / 100


@pytest.mark.parametrize(
    ("process", "theta", "factor"),
    [
        ("heston", [0.04, 2.0, 0.04, 0.05, -0.7], 5.0),  # near-deterministic variance: strong companion (14x measured)
        ("merton", [0.3, 0.2, -0.05, 0.05], 3.0),  # small jumps: the diffusion explains most of X
    ],
)
def test_control_variate_cuts_the_target_variance(process: str, theta: list[float], factor: float) -> None:
    plain, cv = _cv_errors(process, theta, 1.0)
    assert cv < plain / factor, (plain, cv)


def test_control_variate_is_unbiased_with_a_weak_companion() -> None:
    """Large vol-of-vol: the companion explains little, and the estimate must not be worse
    than the plain one beyond the noise of estimating beta (10%)."""
    plain, cv = _cv_errors("heston", [0.04, 0.5, 0.04, 1.0, 0.0], 2.0)
    assert cv < plain * 1.1, (plain, cv)


def test_a_regression_coefficient_from_the_same_paths_biases_the_asian_targets() -> None:
    """Why the Asian model trains with the unit coefficient (config/asian.toml): at the
    training's 256 paths per point (digitally shifted Sobol, antithetic), the mean of
    1,024 target estimates at vol 0.5, 13 fixings, T = 2 prices puts (COS on the model's
    grid, K = 64, L = 10) 3 to 4 bp of F_A below the control-variate MC reference with
    the regression coefficient estimated from the same paths, and within noise of it with
    beta = 1 (measured +0.3 to +0.5 bp, combined standard error about 0.35 bp). Bounds:
    the unit estimate within 4 combined standard errors of the reference, the regression
    estimate more than 4 of them below it at every strike."""
    from spectralmc_server.engine.cos import CosExpansion
    from spectralmc_server.engine.processes import get_process
    from spectralmc_server.engine.processes.asian import asian_put_mc
    from spectralmc_server.engine.spectrum import ControlCoefficient
    from spectralmc_server.engine.trainer import mc_targets

    process = get_process("asian")
    spec = SpectrumConfig(n_freq=64, half_width=10.0, n_bins=1024)
    b, n, blocks = 128, 256, 8
    th = torch.tensor([[0.5, 0.0, 13.0]], dtype=torch.float64).expand(b, -1).contiguous()
    t = torch.full((b,), 2.0, dtype=torch.float64)
    s = process.scale(th, t)
    log_kappa = torch.log(torch.tensor([[0.8, 0.9, 1.0, 1.1, 1.25]], dtype=torch.float64))
    puts: dict[ControlCoefficient, list[torch.Tensor]] = {"unit": [], "regression": []}
    for block in range(blocks):
        cfg = NormalsConfig(seed=3, mode="sobol_shift", antithetic=True, rows=n, dims=b * 64, dtype="float32")
        z = generate_block(cfg, block, CPU).to(torch.float64)
        for coefficient, out in puts.items():
            phi = mc_targets(process, spec, th, t, z, True, coefficient)
            out.append(CosExpansion(phi, spec).put_terms(s, log_kappa.expand(b, -1))["put"])
    ref, ref_se = asian_put_mc(th[:1], t[:1], log_kappa, 1 << 18, seed=9)
    for coefficient, parts in puts.items():
        p = torch.cat(parts)  # (blocks * b, 5)
        bias = p.mean(0) - ref[0]
        se = torch.sqrt(p.var(0) / p.shape[0] + ref_se[0] ** 2)
        if coefficient == "unit":
            assert bool((bias.abs() <= 4 * se).all()), (bias * 1e4, se * 1e4)
        else:
            assert bool((bias < -4 * se).all()), (bias * 1e4, se * 1e4)
