"""Rough Bergomi (engine/processes/rbergomi.py, engine/rbergomi_reference.py): the
Volterra covariance against its hypergeometric closed form, the hybrid scheme against
the exact (Cholesky) scheme, the eta -> 0 limit against Black-Scholes, the martingale
property, the variance of Y on the grid, parameter validation and the simulator's
contract with the pool's normals. Monte-Carlo checks are at 4 standard errors."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.processes.bridge import brownian_bridge
from spectralmc_server.engine.processes.rbergomi import (
    RoughBergomiProcess,
    bridge_increments,
    conditional_law,
    hybrid_kernel,
    hybrid_variance,
    hybrid_volterra,
    log_price,
)
from spectralmc_server.engine.rbergomi_reference import (
    Estimator,
    exact_factor,
    exact_volterra,
    gauss_jacobi,
    rbergomi_european_mc,
    volterra_covariance,
    volterra_f,
)
from spectralmc_server.engine.reference import black_scholes
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.engine.trainer import mc_targets

F64 = torch.float64
CPU = torch.device("cpu")
Z4 = 4.0  # standard errors


def _points(*rows: tuple[float, float, float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([r[:4] for r in rows], dtype=F64), torch.tensor([r[4] for r in rows], dtype=F64)


def _strikes(theta: torch.Tensor, expiry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log K/F = -s, 0, +s (puts, puts, calls), s = sqrt(xi0 T)."""
    s = torch.sqrt(theta[:, 3] * expiry)
    log_k = torch.stack([-s, torch.zeros_like(s), s], dim=1)
    return log_k, torch.tensor([[False, False, True]]).expand(len(s), 3)


# -- the Volterra covariance and the quadrature ----------------------------------------------


@pytest.mark.parametrize("power", [-0.475, -0.4, -0.2, 0.0])
def test_gauss_jacobi_integrates_polynomials_against_the_weight_exactly(power: float) -> None:
    x, w = gauss_jacobi(power)
    for k in (0, 1, 5, 20, 47):  # 24 nodes: exact to degree 47
        assert abs(float((w * x**k).sum()) - 1.0 / (power + k + 1.0)) < 1e-14 / (power + k + 1.0) * 10


@pytest.mark.parametrize("hurst", [0.025, 0.1, 0.3, 0.45])
def test_volterra_covariance_matches_the_hypergeometric_closed_form(hurst: float) -> None:
    """Cov(Y_s, Y_t) = s^{a+1} t^a / (a+1) 2F1(1, -a; a+2; s/t) for s <= t (Bayer, Friz and
    Gatheral), here on the unit grid, to 1e-13 relative."""
    a = hurst - 0.5
    steps = 40
    cov = volterra_covariance(hurst, steps)
    for i, k in [(1, 1), (1, 2), (1, 39), (7, 8), (12, 30), (38, 39), (39, 39)]:
        s, t = mpmath.mpf(i), mpmath.mpf(k)
        exact = s ** (a + 1) * t**a / (a + 1) * mpmath.hyp2f1(1, -a, a + 2, s / t)
        got = cov[i - 1, k - 1]
        assert abs(got / float(exact) - 1.0) < 1e-13, (i, k, got, float(exact))
        assert cov[k - 1, i - 1] == got
    r = np.array([1e-3, 0.5, 1.0, 3.0, 1e3, 1e5])
    with mpmath.workdps(30):
        exact_f = [float(mpmath.mpf(x) ** (a + 1) / (a + 1) * mpmath.hyp2f1(-a, a + 1, a + 2, -x)) for x in r]
    assert np.allclose(volterra_f(a, r), exact_f, rtol=1e-13, atol=0.0)


def test_exact_factor_reproduces_the_joint_covariance() -> None:
    """C_ye C_ye^T + L L^T = Cov(Y, Y): the Cholesky factor's two blocks give the exact law."""
    for hurst in (0.05, 0.3, 0.5):
        c_ye, factor = exact_factor(hurst, 32)
        cov = torch.from_numpy(volterra_covariance(hurst, 32))
        assert torch.allclose(c_ye @ c_ye.T + factor @ factor.T, cov, rtol=1e-11, atol=1e-11)


def test_the_hybrid_kernel_evaluates_the_power_kernel_at_the_optimal_points() -> None:
    """g_k = b_k^a with b_k = ((k^{a+1} - (k-1)^{a+1}) / (a+1))^{1/a} inside the cell
    (k - 1, k): the L2-optimal point of Bennedsen, Lunde and Pakkanen; and g_k is the
    exact Cov(Y(t_m), dW_{m-k+1}) (the exact scheme's C_ye, computed apart)."""
    hurst = torch.tensor([0.07, 0.3], dtype=F64)
    g = hybrid_kernel(hurst, 64)
    for b, h in enumerate(hurst.tolist()):
        a = h - 0.5
        k = np.arange(2, 65, dtype=np.float64)
        b_k = ((k ** (a + 1) - (k - 1) ** (a + 1)) / (a + 1)) ** (1 / a)
        assert np.all((b_k > k - 1) & (b_k < k))
        assert np.allclose(g[b, 1:].numpy(), b_k**a, rtol=1e-13)
        c_ye, _ = exact_factor(h, 64)
        assert torch.allclose(c_ye[-1, :].flip(0)[1:], g[b, :-1], rtol=1e-13)  # row m = 63: lags 0 .. 62


def test_the_bridge_is_processes_bridge() -> None:
    torch.manual_seed(0)
    for n in (1, 2, 5, 16, 100, 256):
        z = torch.randn(3, 4, n, dtype=F64)
        assert torch.equal(bridge_increments(z), brownian_bridge(z))


# -- the variance of Y on the grid ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["hybrid", "exact"])
def test_variance_of_y_on_the_grid_is_t_to_the_2h_over_2h(scheme: str) -> None:
    """Sample variance of Y(t_m) / dt^H at every grid point against m^{2H} / (2H), within
    4 standard errors (Var of a Gaussian sample variance: 2 sigma^4 / (N - 1)); the
    hybrid scheme's own variance is below the exact one by the cells k >= 2's
    within-cell variance of the kernel, less than 0.1% of it here."""
    steps, paths = 32, 1 << 14
    hurst = torch.tensor([0.05, 0.3], dtype=F64)
    cfg = NormalsConfig(seed=21, mode="pseudo", antithetic=False, rows=paths, dims=2 * 2 * steps, dtype="float64")
    z = generate_block(cfg, 0, CPU).view(paths, 2, 2 * steps).transpose(0, 1)
    e, xi = z[..., :steps], z[..., steps : 2 * steps - 1]
    y = hybrid_volterra(hurst, e, xi) if scheme == "hybrid" else exact_volterra(hurst, e, xi)  # (2, N, n-1)
    m = torch.arange(1, steps, dtype=F64)
    exact = m[None, :] ** (2 * hurst[:, None]) / (2 * hurst[:, None])
    var = y.var(1)
    se = exact * math.sqrt(2.0 / (paths - 1))
    assert bool(((var - exact).abs() < Z4 * se).all()), ((var - exact) / se).abs().max()
    assert bool((y.mean(1).abs() < Z4 * torch.sqrt(exact / paths)).all())
    deficit = (exact - hybrid_variance(hurst, steps)) / exact
    assert bool((deficit >= -1e-15).all()) and float(deficit.max()) < 1e-3


# -- prices --------------------------------------------------------------------------------------


def test_hybrid_scheme_matches_the_exact_scheme_within_standard_errors() -> None:
    """Puts at K/F = e^-s, 1 and calls at e^s on the same grid (64 steps), independent
    normals: the difference within 4 combined standard errors. The two share the Euler
    sum for X; what differs is the law of Y (the hybrid keeps the first cell's residual
    only) and the compensator."""
    theta, expiry = _points((0.1, 1.5, -0.7, 0.04, 1.0), (0.3, 1.0, -0.5, 0.09, 0.5), (0.45, 2.0, -0.9, 0.04, 2.0))
    log_k, is_call = _strikes(theta, expiry)
    hybrid = rbergomi_european_mc(theta, expiry, log_k, 1 << 13, is_call=is_call, steps=64, scheme="hybrid", seed=1)
    exact = rbergomi_european_mc(theta, expiry, log_k, 1 << 13, is_call=is_call, steps=64, scheme="exact", seed=2)
    se = torch.sqrt(hybrid.stderr**2 + exact.stderr**2)
    assert bool(((hybrid.price - exact.price).abs() < Z4 * se).all()), (hybrid.price - exact.price) / se
    assert float(se.max()) < 5e-4  # 5 bp: the check has teeth


def test_mixed_estimator_agrees_with_plain_monte_carlo() -> None:
    """Black given W (mixed) against payoffs of e^X (plain), independent normals."""
    theta, expiry = _points((0.1, 1.9, -0.9, 0.04, 1.0), (0.3, 1.0, -0.3, 0.09, 0.25))
    log_k, is_call = _strikes(theta, expiry)
    mixed = rbergomi_european_mc(theta, expiry, log_k, 1 << 13, is_call=is_call, steps=32, seed=3)
    plain = rbergomi_european_mc(
        theta, expiry, log_k, 1 << 14, is_call=is_call, steps=32, estimator="plain", control_variate=False, seed=4
    )
    se = torch.sqrt(mixed.stderr**2 + plain.stderr**2)
    assert bool(((mixed.price - plain.price).abs() < Z4 * se).all()), (mixed.price - plain.price) / se
    assert bool((mixed.stderr < plain.stderr).all())


@pytest.mark.parametrize("estimator", ["plain", "mixed"])
def test_small_vol_of_vol_is_black_scholes_with_vol_sqrt_xi0(estimator: Estimator) -> None:
    """eta = 1e-5 (outside the contracts' bounds): V = xi0 up to O(eta), so prices are
    Black-Scholes with vol sqrt(xi0), within 4 standard errors. (The controls make those
    tiny: at eta = 1e-3 the O(eta) skew, about 1e-6 of the forward, is 5 of them.)"""
    theta, expiry = _points((0.1, 1e-5, -0.7, 0.04, 1.0), (0.4, 1e-5, -0.3, 0.16, 0.1))
    log_k, is_call = _strikes(theta, expiry)
    got = rbergomi_european_mc(theta, expiry, log_k, 1 << 13, is_call=is_call, steps=16, estimator=estimator, seed=5)
    one = torch.ones_like(log_k)
    bs = black_scholes(
        one,
        torch.exp(log_k),
        expiry[:, None].expand_as(log_k),
        0 * one,
        0 * one,
        torch.sqrt(theta[:, 3:4]).expand_as(log_k),
        is_call,
    )["price"]
    assert bool(((got.price - bs).abs() < Z4 * got.stderr).all()), (got.price - bs) / got.stderr
    assert float(got.stderr.max()) < 5e-4  # 5 bp: the check has teeth


def test_zero_vol_of_vol_is_the_companion_path_by_path() -> None:
    """eta = 0: V = xi0 exactly and X = -xi0 T / 2 + sqrt(xi0 T) Zc, Zc = rho W(T)/sqrt(T)
    + sqrt(1 - rho^2) Z_perp, which is the companion built from the same normals."""
    process = RoughBergomiProcess(64)
    theta, expiry = _points((0.1, 0.0, -0.7, 0.04, 1.0), (0.4, 0.0, -0.2, 0.1, 0.3))
    z = torch.randn(2, 100, process.normals_per_path, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = process.simulate_x(theta, expiry, z)
    xc, s = process.companion_x(theta, expiry, z)
    assert torch.allclose(x, xc, rtol=0.0, atol=1e-13)
    assert torch.allclose(s, torch.sqrt(theta[:, 3] * expiry))
    for bridge in (True, False):  # the companion's normal is exactly standard in either layout
        p = RoughBergomiProcess(64, bridge=bridge)
        torch.testing.assert_close(p.simulate_x(theta, expiry, z), p.companion_x(theta, expiry, z)[0])


def test_the_forward_is_a_martingale() -> None:
    """E[e^X] = 1 and E[exp(mean + var / 2)] = 1 (the forward given W) within 4 standard
    errors, across the domain, the roughest corner included."""
    process = RoughBergomiProcess(64)
    theta, expiry = _points(
        (0.1, 1.9, -0.9, 0.04, 1.0),
        (0.3, 3.0, -0.5, 0.16, 2.0),
        (0.025, 2.0, -0.95, 0.01, 0.03),
        (0.5, 4.0, -0.1, 0.16, 2.0),
    )
    paths = 1 << 13
    cfg = NormalsConfig(
        seed=9, mode="pseudo", antithetic=False, rows=paths, dims=4 * process.normals_per_path, dtype="float64"
    )
    z = generate_block(cfg, 0, CPU).view(paths, 4, -1).transpose(0, 1)
    variance = process.paths(theta, expiry, z)
    mean_x, var_x = conditional_law(theta, variance)
    for sample in (torch.exp(log_price(theta, variance)), torch.exp(mean_x + 0.5 * var_x)):
        mean, se = sample.mean(1), sample.std(1) / math.sqrt(paths)
        assert bool(((mean - 1.0).abs() < Z4 * se).all()), (mean - 1.0) / se
    torch.testing.assert_close(process.simulate_x(theta, expiry, z), log_price(theta, variance))
    torch.testing.assert_close(process.conditional_x(theta, expiry, z), (mean_x, var_x))


# -- the process's contract --------------------------------------------------------------------


def _params(**overrides: float) -> dict[str, float]:
    return {"H": 0.1, "eta": 1.9, "rho": -0.9, "xi0": 0.04} | overrides


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("H", 0.01),
        ("H", 0.6),
        ("eta", 0.1),
        ("eta", 5.0),
        ("rho", 0.0),
        ("rho", -0.99),
        ("xi0", 0.0),
        ("xi0", 0.2),
        ("H", math.nan),
    ],
)
def test_check_params_rejects_values_out_of_range_by_name(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be in \["):
        RoughBergomiProcess().check_params(_params(**{name: value}))


def test_check_params_names_missing_and_unknown_parameters() -> None:
    process = RoughBergomiProcess()
    for name in ("H", "eta", "rho", "xi0"):
        params = _params()
        del params[name]
        with pytest.raises(ValueError, match=rf"^{name} is missing"):
            process.check_params(params)
    with pytest.raises(ValueError, match=r"^hurst is not a parameter of rbergomi"):
        process.check_params(_params(hurst=0.1))
    process.check_params(_params())
    for name, (low, high) in process.param_bounds.items():  # the bounds are closed
        process.check_params(_params(**{name: low}))
        process.check_params(_params(**{name: high}))


def test_domain_and_scale() -> None:
    process = RoughBergomiProcess()
    domain = process.default_domain()
    assert domain.param_names == process.param_names == ("H", "eta", "rho", "xi0")
    for r in domain.ranges[:-1]:
        assert (r.low, r.high) == process.param_bounds[r.name]
    assert (domain.ranges[-1].low, domain.ranges[-1].high) == (0.03, 2.0)
    theta, expiry = _points((0.1, 1.9, -0.9, 0.04, 1.0), (0.3, 1.0, -0.5, 0.16, 0.03))
    s = process.scale(theta, expiry)
    assert torch.allclose(s, torch.sqrt(theta[:, 3] * expiry))
    assert np.allclose(process.scale_np(theta.numpy(), expiry.numpy()), s.numpy(), rtol=1e-15)
    for i in range(2):
        assert math.isclose(process.scale_math(theta[i].tolist(), float(expiry[i])), float(s[i]), rel_tol=1e-15)
    assert process.normals_per_path == 2 * process.steps


def test_simulation_is_deterministic_in_the_pool_normals_and_batches_points_of_any_expiry() -> None:
    """The trainer's layout: a block (N, B d) of the pool, point b in columns b d ..
    b d + d - 1. The same block gives the same X bit for bit; each point of a batch of
    different expiries gets what it gets alone; float32 runs; the trainer's FFT targets
    take the process as they take the others."""
    process = RoughBergomiProcess(64)
    theta, expiry = _points(
        (0.1, 1.9, -0.9, 0.04, 0.03),
        (0.3, 1.0, -0.5, 0.09, 0.5),
        (0.025, 4.0, -0.95, 0.16, 2.0),
        (0.5, 0.5, -0.1, 0.01, 1.0),
    )
    b, d, n = 4, process.normals_per_path, 256
    cfg = NormalsConfig(seed=3, mode="sobol_shift", antithetic=True, rows=n, dims=b * d, dtype="float64")
    block = generate_block(cfg, 5, CPU)
    z = block.view(n, b, d).transpose(0, 1)  # (B, N, d)
    x = process.simulate_x(theta, expiry, z)
    assert x.shape == (b, n) and bool(torch.isfinite(x).all())
    assert torch.equal(x, process.simulate_x(theta, expiry, generate_block(cfg, 5, CPU).view(n, b, d).transpose(0, 1)))
    for i in range(b):
        alone = process.simulate_x(theta[i : i + 1], expiry[i : i + 1], z[i : i + 1])
        torch.testing.assert_close(alone[0], x[i], rtol=1e-12, atol=1e-12)
    x32 = process.simulate_x(theta, expiry, z.to(torch.float32))
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.to(F64), x, rtol=0.0, atol=2e-3 * float(torch.sqrt(theta[:, 3] * expiry).max()))
    mean, var = process.conditional_x(theta, expiry, z)
    assert bool((var > 0).all()) and mean.shape == (b, n)
    spectrum = SpectrumConfig(n_freq=16, half_width=10.0, n_bins=256)
    phi = mc_targets(process, spectrum, theta, expiry, block.to(torch.float32), True, "unit")
    assert phi.shape == (b, 16) and bool(torch.isfinite(torch.view_as_real(phi)).all())
    with pytest.raises(ValueError, match="takes 128 normals per path"):
        process.simulate_x(theta, expiry, z[..., :100])


def test_reference_put_is_the_reference_monte_carlo() -> None:
    process = RoughBergomiProcess(16)
    theta, expiry = _points((0.1, 1.9, -0.9, 0.04, 1.0))
    log_k = torch.log(torch.tensor([[0.9, 1.0, 1.1]], dtype=F64))
    put = process.reference_put(theta, expiry, log_k)
    again = rbergomi_european_mc(theta, expiry, log_k, 1 << 15, steps=16, seed=11)
    assert torch.equal(put, again.price)
    assert bool((put > (torch.exp(log_k) - 1.0).clamp(min=0.0)).all()) and bool((put < torch.exp(log_k)).all())


def test_simulation_is_differentiable_in_the_parameters_and_the_expiry() -> None:
    """Forward-mode derivatives through the paths (FFT included), as a reference that
    takes vega and theta through shared paths needs, against central differences."""
    process = RoughBergomiProcess(32)
    theta, expiry = _points((0.1, 1.9, -0.9, 0.04, 1.0), (0.3, 1.0, -0.5, 0.09, 0.5))
    z = torch.randn(2, 500, process.normals_per_path, dtype=F64, generator=torch.Generator().manual_seed(2))

    def smooth(th: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(process.paths(th, t, z).int_v).mean(1) + process.simulate_x(th, t, z).mean(1)

    eps = 1e-6
    for i in range(4):
        tangent = torch.zeros_like(theta)
        tangent[:, i] = 1.0
        jvp = torch.func.jvp(lambda th: smooth(th, expiry), (theta,), (tangent,))[1]
        fd = (smooth(theta + eps * tangent, expiry) - smooth(theta - eps * tangent, expiry)) / (2 * eps)
        torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-9)
    jvp = torch.func.jvp(lambda t: smooth(theta, t), (expiry,), (torch.ones_like(expiry),))[1]
    fd = (smooth(theta, expiry + eps) - smooth(theta, expiry - eps)) / (2 * eps)
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-9)
