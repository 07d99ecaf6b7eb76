"""Least-squares calibration: recovery of known Heston parameters from the surface they
imply, the one-pass network tangents against autograd (and the fits they give against
jacfwd's), the hand-written derivative of the COS put, the bounds, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from spectralmc_server.engine.cvnn import CFModel, NetworkConfig
from spectralmc_server.engine.fit import (
    CalibrationError,
    Quotes,
    _cos_put,
    _cos_put_ds,
    calibrate,
    heston_start,
    model_prices,
)
from spectralmc_server.engine.pricer import REFERENCE_SPECTRUM
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.reference import analytic_cf_y
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.pricing.calibration import synthetic_surface

F64 = torch.float64
HESTON = get_process("heston")
BOUNDS = HESTON.default_domain().ranges[:-1]
EXPIRIES = [0.25, 0.5, 1.0, 2.0]
MONEYNESS = [0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25]
TRUTH = {"v0": 0.04, "kappa": 2.0, "theta": 0.06, "xi": 0.6, "rho": -0.6}
SMALL_SPECTRUM = SpectrumConfig(n_freq=32, half_width=10, n_bins=256)


# -- helpers ------------------------------------------------------------------------------------
def _surface_quotes(params: dict[str, float]) -> Quotes:
    """The 40 quotes (4 expiries x 10 moneyness K/F) of the Black surface ``params`` imply."""
    surface = synthetic_surface("heston", params, EXPIRIES, MONEYNESS)
    assert surface.strike_kind == "moneyness"
    expiry = torch.tensor([t for t in surface.expiries_years for _ in surface.strikes], dtype=F64)
    log_m = torch.log(torch.tensor([m for _ in surface.expiries_years for m in surface.strikes], dtype=F64))
    vols = torch.tensor([v for row in surface.vols for v in row], dtype=F64)
    return Quotes.from_vols(expiry, log_m, vols)


def _cf(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    return analytic_cf_y(HESTON, REFERENCE_SPECTRUM, theta, expiry)


def _random_model(head: str, baseline: str) -> CFModel:
    """A small untrained CVNN with a nonzero head (the gaussian baseline zero-initialises
    it, which would make the network's part of every tangent vanish)."""
    torch.manual_seed(0)
    network = NetworkConfig.model_validate({"width": 16, "depth": 2, "head": head, "baseline": baseline})
    model = CFModel(HESTON, HESTON.default_domain(), SMALL_SPECTRUM, network)
    with torch.no_grad():
        model.net.head.weight_re.normal_(0.0, 0.05)
        model.net.head.weight_im.normal_(0.0, 0.05)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def truth_quotes() -> Quotes:
    return _surface_quotes(TRUTH)


# -- synthetic recovery ------------------------------------------------------------------------------
def test_recovers_heston_parameters_from_their_own_surface(truth_quotes: Quotes) -> None:
    """Quotes from the surface COS on the analytic CF implies (40 of them, 0.25 to 2
    years, 0.8 to 1.25 K/F), a start from heston_start's heuristic: Levenberg-Marquardt
    through the same analytic CF recovers every parameter and fits to rounding."""
    assert len(truth_quotes) == 40
    start = heston_start(truth_quotes, BOUNDS)
    assert all(b.low <= start[b.name] <= b.high for b in BOUNDS)
    res = calibrate(_cf, HESTON, REFERENCE_SPECTRUM, truth_quotes, BOUNDS, start)
    assert res.converged
    assert res.rmse_vol < 1e-8, res.rmse_vol
    for name, want in TRUTH.items():
        assert abs(res.params[name] / want - 1.0) < 1e-6, (name, res.params[name], want)
    assert res.start == start and res.history[-1] <= res.history[0]
    # The fitted prices are the model's at the fitted parameters, and the truth prices
    # the quotes back to rounding (the quotes' implied vols are exact).
    assert torch.allclose(res.residual, (res.model_price - truth_quotes.price) / truth_quotes.vega)
    expiries, rows = torch.unique(truth_quotes.expiry, return_inverse=True)
    at_truth = model_prices(
        _cf,
        HESTON,
        REFERENCE_SPECTRUM,
        torch.tensor([TRUTH[n] for n in HESTON.param_names], dtype=F64),
        expiries,
        rows,
        truth_quotes.log_moneyness,
    )
    assert float(((at_truth - truth_quotes.price) / truth_quotes.vega).abs().max()) < 1e-8


def test_fit_stays_inside_the_bounds_when_the_truth_lies_outside() -> None:
    """kappa = 8 while the bounds say kappa <= 5: the fit ends inside the (closed) box,
    at kappa's upper bound, and still reports a finite, converged fit."""
    quotes = _surface_quotes(TRUTH | {"kappa": 8.0})
    res = calibrate(_cf, HESTON, REFERENCE_SPECTRUM, quotes, BOUNDS, heston_start(quotes, BOUNDS))
    for b in BOUNDS:
        assert b.low <= res.params[b.name] <= b.high, (b.name, res.params[b.name])
    assert res.params["kappa"] > 4.9  # pushed against the bound it cannot cross
    assert res.converged and math.isfinite(res.rmse_vol) and res.rmse_vol > 1e-5


# -- tangents -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("head", "baseline"), [("log_cf", "gaussian"), ("cf", "none")])
def test_forward_with_tangents_equals_autograd_jvp(head: str, baseline: str) -> None:
    """The one-pass tangents along each parameter axis and two random directions equal
    torch.func.jvp of the model's forward (float32 network: rtol 1e-4), with d_scale the
    jvp of the process's scale along the same direction."""
    model = _random_model(head, baseline)
    g = torch.Generator().manual_seed(1)
    domain = HESTON.default_domain()
    theta, expiry = domain.from_unit(torch.rand(6, domain.dims, generator=g, dtype=F64))
    p = theta.shape[1]
    d_theta = torch.randn(p + 2, 6, p, generator=g, dtype=F64)
    d_theta[:p] = torch.eye(p, dtype=F64)[:, None, :]
    d_scale = torch.stack(
        [torch.func.jvp(lambda th: HESTON.scale(th, expiry), (theta,), (d,))[1] for d in d_theta]
    )  # (Q, B)
    phi, d_phi = model.forward_with_tangents(theta, expiry, d_theta, d_scale)
    want = torch.stack([torch.func.jvp(lambda th: model(th, expiry), (theta,), (d,))[1] for d in d_theta])
    assert phi.shape == (6, SMALL_SPECTRUM.n_freq) and d_phi.shape == (p + 2, 6, SMALL_SPECTRUM.n_freq)
    torch.testing.assert_close(phi, model(theta, expiry), rtol=1e-6, atol=1e-7)
    scale = float(want.abs().max())
    assert scale > 1e-2  # the directions move the CF: not zero against zero
    torch.testing.assert_close(d_phi, want, rtol=1e-4, atol=1e-5 * scale)


def test_calibration_with_tangents_matches_jacfwd(truth_quotes: Quotes) -> None:
    """Through the small random model, five LM iterations with the one-pass tangents
    take the same steps as with jacfwd: the same parameters to float32 rounding."""
    model = _random_model("log_cf", "gaussian")
    start = heston_start(truth_quotes, BOUNDS)
    fast = calibrate(
        model,
        HESTON,
        SMALL_SPECTRUM,
        truth_quotes,
        BOUNDS,
        start,
        max_iterations=5,
        tangents=model.forward_with_tangents,
    )
    slow = calibrate(model, HESTON, SMALL_SPECTRUM, truth_quotes, BOUNDS, start, max_iterations=5)
    assert fast.iterations == slow.iterations and len(fast.history) == len(slow.history) > 1
    for name in HESTON.param_names:
        assert abs(fast.params[name] / slow.params[name] - 1.0) < 1e-5, (name, fast.params, slow.params)
        assert fast.params[name] != start[name]  # the fit moved
    assert abs(fast.rmse_vol / slow.rmse_vol - 1.0) < 1e-5


def test_cos_put_ds_is_the_derivative_of_cos_put_in_the_scale() -> None:
    """Random coefficients, scales and log-moneyness (a few beyond +-L, where the put is
    constant in s): the hand derivative equals forward-mode autograd to 1e-12."""
    spectrum = SpectrumConfig(n_freq=64, half_width=12.0, n_bins=256)
    g = torch.Generator().manual_seed(3)
    n = 200
    coef = torch.randn(n, 64, generator=g, dtype=F64) / 12.0
    s = 0.05 + 1.5 * torch.rand(n, 1, generator=g, dtype=F64)
    log_m = 3.0 * torch.rand(n, generator=g, dtype=F64) - 1.5
    log_m[:4] = torch.tensor([-30.0, 30.0, -20.0, 25.0], dtype=F64)
    outside = (log_m / s[:, 0]).abs() >= spectrum.half_width
    assert 0 < int(outside.sum()) < n // 4
    got = _cos_put_ds(coef, s, log_m, spectrum)
    want = torch.func.jvp(lambda x: _cos_put(coef, x, log_m, spectrum), (s,), (torch.ones_like(s),))[1]
    assert got.shape == want.shape == (n,)
    assert float((got - want).abs().max()) < 1e-12 * max(1.0, float(want.abs().max()))
    assert bool((got[outside] == 0).all()) and float(got[~outside].abs().max()) > 1.0


# -- errors ------------------------------------------------------------------------------------------
def _never_called(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the quotes should have been refused before any CF evaluation")


def test_too_few_quotes_are_refused_with_the_count() -> None:
    quotes = Quotes.from_vols(
        torch.tensor([0.5, 0.5, 1.0], dtype=F64),
        torch.tensor([-0.1, 0.0, 0.1], dtype=F64),
        torch.tensor([0.25, 0.2, 0.18], dtype=F64),
    )
    start = dict.fromkeys(HESTON.param_names, 0.0) | {"v0": 0.04, "kappa": 1.0, "theta": 0.04, "xi": 0.5}
    with pytest.raises(CalibrationError, match=r"3 quotes cannot determine 5 parameters"):
        calibrate(_never_called, HESTON, REFERENCE_SPECTRUM, quotes, BOUNDS, start)


def test_a_quote_without_vega_is_refused(truth_quotes: Quotes) -> None:
    """A strike 3x the forward a week out has vega ~ 1e-90: its vol is not identifiable."""
    quotes = Quotes.from_vols(
        torch.cat([truth_quotes.expiry, torch.tensor([7 / 365], dtype=F64)]),
        torch.cat([truth_quotes.log_moneyness, torch.tensor([math.log(3.0)], dtype=F64)]),
        torch.cat([truth_quotes.vol, torch.tensor([0.2], dtype=F64)]),
    )
    assert float(quotes.vega[-1]) < 1e-8
    with pytest.raises(CalibrationError, match=rf"quote {len(quotes) - 1} has no vega"):
        calibrate(_never_called, HESTON, REFERENCE_SPECTRUM, quotes, BOUNDS, heston_start(truth_quotes, BOUNDS))


def test_bounds_must_name_the_parameters_in_order(truth_quotes: Quotes) -> None:
    with pytest.raises(CalibrationError, match="bounds must name v0, kappa, theta, xi, rho in order"):
        calibrate(_never_called, HESTON, REFERENCE_SPECTRUM, truth_quotes, BOUNDS[::-1], TRUTH)
