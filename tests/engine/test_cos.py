"""COS method on the exact GBM characteristic function against Black-Scholes closed forms.

For GBM, Y = X / s is N(-s/2, 1) with s = sigma sqrt(T), and X = log(S_T / F). Every
quantity the COS expansion produces (normalised puts, digitals, share-measure
probabilities, density, CDF, quantiles, moments of S_T / F) has a closed form to
compare with. The reference normal CDF here is built from ``erfc`` so that it does not
share code with ``torch.special.ndtr`` used inside the engine.
"""

from __future__ import annotations

import math

import pytest
import torch

from spectralmc_server.engine.cos import CosExpansion, gauss_legendre
from spectralmc_server.engine.pricer import OptionBatch, SpectralPricer
from spectralmc_server.engine.processes import GBMProcess
from spectralmc_server.engine.reference import analytic_cf_y, black_scholes, lognormal_moments
from spectralmc_server.engine.spectrum import SpectrumConfig

GBM = GBMProcess()
SPEC = SpectrumConfig(n_freq=64, half_width=10.0, n_bins=1024)
F64 = torch.float64
SQRT2 = math.sqrt(2.0)
SQRT_2PI = math.sqrt(2.0 * math.pi)

# Spread s = sigma sqrt(T) from very narrow to the widest the default GBM domain reaches
# (sigma = 1, T = 3 gives s = 1.73).
SPREADS = (0.005, 0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0, 1.3, 1.7)


# -- helpers ------------------------------------------------------------------------------
def _ncdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF from erfc (independent of the engine's ndtr)."""
    out: torch.Tensor = 0.5 * torch.special.erfc(-x / SQRT2)
    return out


def _expansion(s: torch.Tensor, spec: SpectrumConfig = SPEC) -> CosExpansion:
    """COS expansion of Y for spreads s (B,), realised with varied T and sigma = s / sqrt(T)."""
    expiry = torch.linspace(0.1, 2.5, s.shape[0], dtype=F64)
    theta = (s / torch.sqrt(expiry))[:, None]
    phi = analytic_cf_y(GBM, spec, theta, expiry)
    return CosExpansion(phi, spec)


def _bs_normalised(s: torch.Tensor, log_kappa: torch.Tensor) -> dict[str, torch.Tensor]:
    """Closed forms for X = -s^2/2 + s Z at strikes log(K/F) = log_kappa (B, J)."""
    sc = s[:, None]
    d1 = (-log_kappa + 0.5 * sc * sc) / sc
    d2 = d1 - sc
    kappa = torch.exp(log_kappa)
    z = (log_kappa + 0.5 * sc * sc) / sc  # standardised log kappa
    return {
        "put": kappa * _ncdf(-d2) - _ncdf(-d1),
        "prob_below": _ncdf(-d2),
        "share_below": _ncdf(-d1),
        "density": torch.exp(-0.5 * z * z) / (SQRT_2PI * sc),
    }


def _strike_grid(n_rows: int, lo: float = 0.5, hi: float = 2.0, n: int = 41) -> torch.Tensor:
    kappa = torch.linspace(lo, hi, n, dtype=F64)
    return torch.log(kappa)[None, :].expand(n_rows, -1).contiguous()


def _random_batch(n: int, seed: int) -> OptionBatch:
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)

    spot = u(20.0, 200.0)
    return OptionBatch(
        spot=spot,
        strike=spot * u(0.5, 1.8),
        expiry=u(0.02, 3.0),
        rate=u(-0.03, 0.08),  # negative rates included
        dividend=u(-0.01, 0.06),  # negative (borrow-cost-like) yields included
        is_call=torch.rand(n, generator=g) < 0.5,
        theta=u(0.05, 1.0)[:, None],
    )


def _analytic_pricer(spec: SpectrumConfig = SPEC) -> SpectralPricer:
    return SpectralPricer(GBM, spec, lambda th, t: analytic_cf_y(GBM, spec, th, t))


def _with_call_flag(b: OptionBatch, is_call: bool) -> OptionBatch:
    flag = torch.full((len(b),), is_call, dtype=torch.bool)
    return OptionBatch(b.spot, b.strike, b.expiry, b.rate, b.dividend, flag, b.theta)


# -- prices -------------------------------------------------------------------------------
def test_normalised_put_matches_black_scholes() -> None:
    """put_terms()["put"] = E[(kappa - e^X)^+] = kappa N(-d2) - N(-d1), to 1e-8 absolute."""
    s = torch.tensor(SPREADS, dtype=F64)
    lk = _strike_grid(len(s))
    got = _expansion(s).put_terms(s, lk)["put"]
    want = _bs_normalised(s, lk)["put"]
    err = (got - want).abs()
    assert float(err.max()) < 1e-8, float(err.max())
    # A put is worth at least its intrinsic value (kappa - 1)^+ (E[e^X] = 1, Jensen).
    intrinsic = (torch.exp(lk) - 1.0).clamp(min=0.0)
    assert bool((got >= intrinsic - 1e-12).all())


def test_pricer_on_exact_cf_matches_black_scholes_in_money_terms() -> None:
    """SpectralPricer with the analytic CF vs reference.black_scholes for random contracts
    with negative rates and dividends: prices within 1e-8 * spot, digitals within 1e-8."""
    b = _random_batch(256, seed=11)
    assert bool((b.rate < 0).any()) and bool((b.dividend < 0).any())
    got = _analytic_pricer().evaluate(b, frozenset({"price", "digital", "delta"}))
    want = black_scholes(b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)
    price_err = ((got["price"] - want["price"]).abs() / b.spot).max()
    assert float(price_err) < 1e-8, float(price_err)
    for k in ("digital", "delta"):
        err = (got[k] - want[k]).abs().max()
        assert float(err) < 1e-8, (k, float(err))


# -- digitals, share measure, density, CDF, quantiles ---------------------------------------
def test_digital_share_measure_and_density_match_closed_forms() -> None:
    """prob_below = N(-d2), share_below = N(-d1), density = lognormal density of X at
    log kappa (compared where it is not negligible), all to 1e-8."""
    s = torch.tensor(SPREADS, dtype=F64)
    lk = _strike_grid(len(s))
    got = _expansion(s).put_terms(s, lk)
    want = _bs_normalised(s, lk)
    for k in ("prob_below", "share_below"):
        err = (got[k] - want[k]).abs().max()
        assert float(err) < 1e-8, (k, float(err))
    dens, ref = got["density"], want["density"]
    visible = ref > 1e-6
    assert int(visible.sum()) > 100  # the comparison is not vacuous
    rel = ((dens - ref).abs() / ref)[visible]
    assert float(rel.max()) < 1e-8, float(rel.max())
    # Where it is negligible, still tiny in absolute terms (narrow spreads have huge peaks).
    assert float((dens - ref).abs()[~visible].max()) < 1e-8


def test_cdf_matches_normal_cdf_of_y() -> None:
    """cdf(y) = P(Y < y) with Y ~ N(-s/2, 1), at many points across [-L, L]."""
    s = torch.tensor(SPREADS, dtype=F64)
    exp = _expansion(s)
    y = torch.linspace(-9.5, 9.5, 191, dtype=F64)[None, :].expand(len(s), -1).contiguous()
    got = exp.cdf(y)
    want = _ncdf(y + 0.5 * s[:, None])
    err = (got - want).abs().max()
    assert float(err) < 1e-8, float(err)
    # Clamped outside the range: 0 below -L, the total mass (1) above L.
    outside = torch.tensor([[-50.0, -10.0, 10.0, 50.0]], dtype=F64).expand(len(s), -1).contiguous()
    c = exp.cdf(outside)
    assert float(c[:, :2].abs().max()) < 1e-12
    assert float((c[:, 2:] - 1.0).abs().max()) < 1e-12


def test_quantiles_match_normal_quantiles_of_y() -> None:
    """quantile(p) = -s/2 + ndtri(p) to 1e-8, from the far tails to the centre.

    Levels stay within [1e-6, 1 - 1e-6]: beyond that, a level's own float64 rounding
    (1e-16) divided by the density there approaches the tolerance.
    """
    s = torch.tensor(SPREADS, dtype=F64)
    levels = torch.tensor(
        [1e-6, 1e-4, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 0.9999, 1 - 1e-6], dtype=F64
    )
    lv = levels[None, :].expand(len(s), -1).contiguous()
    got = _expansion(s).quantile(lv)
    want = -0.5 * s[:, None] + torch.special.ndtri(lv)
    err = (got - want).abs().max()
    assert float(err) < 1e-8, float(err)
    # Round trip through the CDF, and monotone in the level.
    assert float((_expansion(s).cdf(got) - lv).abs().max()) < 1e-12
    assert bool((got.diff(dim=1) > 0).all())


# -- moments --------------------------------------------------------------------------------
@pytest.mark.parametrize("spread", [0.01, 0.03, 0.1, 0.25, 0.5])
def test_terminal_moments_match_lognormal_moments(spread: float) -> None:
    """Moments of S_T / F (forward 1) to 1e-8 relative for s in [0.01, 0.5]."""
    s = torch.tensor([spread], dtype=F64)
    got = _expansion(s).terminal_moments(s)
    want = lognormal_moments(torch.ones_like(s), s)
    for k in ("mean", "stdev", "skew", "kurtosis"):
        rel = float(((got[k] - want[k]) / want[k]).abs())
        assert rel < 1e-8, (k, rel)


def test_terminal_moments_for_a_tiny_spread() -> None:
    """s = 0.001: the moments come from Gauss-Legendre in Y (no raw-moment cancellation),
    so stdev and skew stay accurate and the excess kurtosis (about 1.6e-5) is right to
    1e-10 absolute."""
    s = torch.tensor([0.001], dtype=F64)
    got = _expansion(s).terminal_moments(s)
    want = lognormal_moments(torch.ones_like(s), s)
    assert float((got["mean"] - 1.0).abs()) < 1e-14
    assert float(((got["stdev"] - want["stdev"]) / want["stdev"]).abs()) < 1e-10
    assert float(((got["skew"] - want["skew"]) / want["skew"]).abs()) < 1e-8
    assert float((got["kurtosis"] - want["kurtosis"]).abs()) < 1e-10


def test_terminal_moments_degrade_for_a_wide_spread() -> None:
    """Documents the known limit (cos.py, terminal_moments docstring): for large s the
    weight e^{n s y} in the n-th moment magnifies the truncated series' tail noise, and
    the noise-floor cut biases the tails lighter. At s = 1.73 (sigma = 1, T = 3) the mean
    is still fine, the kurtosis is off by more than 1e-3 relative but by less than 50%,
    and it is biased low (lighter tails). If this test starts failing because the error
    dropped below 1e-3, the method improved: tighten the bound."""
    s = torch.tensor([1.73], dtype=F64)
    got = _expansion(s).terminal_moments(s)
    want = lognormal_moments(torch.ones_like(s), s)
    assert float((got["mean"] - 1.0).abs()) < 1e-8
    assert float(((got["stdev"] - want["stdev"]) / want["stdev"]).abs()) < 1e-4
    rel = float(((got["kurtosis"] - want["kurtosis"]) / want["kurtosis"]).abs())
    assert 1e-3 < rel < 0.5, rel
    assert float(got["kurtosis"]) < float(want["kurtosis"])
    # And the error grows with s across the range: 0.5 is far better than 1.73.
    s_mid = torch.tensor([0.5], dtype=F64)
    mid = _expansion(s_mid).terminal_moments(s_mid)
    want_mid = lognormal_moments(torch.ones_like(s_mid), s_mid)["kurtosis"]
    rel_mid = float(((mid["kurtosis"] - want_mid) / want_mid).abs())
    assert rel_mid < 1e-3 * rel, (rel_mid, rel)


# -- strikes beyond the truncation range, parity -----------------------------------------------
def test_strikes_outside_the_range_are_exact() -> None:
    """With s = 0.001, kappa = 0.7 and 1.3 lie hundreds of L outside [-L, L] in Y units:
    the put is exactly 0 below and exactly kappa - 1 above (never from the periodic
    extension), with prob/share exactly 0 or 1 and zero density."""
    s = torch.tensor([0.001, 0.002], dtype=F64)
    lk = torch.log(torch.tensor([[0.7, 1.3], [0.7, 1.3]], dtype=F64))
    assert bool(((lk / s[:, None]).abs() > SPEC.half_width).all())
    got = _expansion(s).put_terms(s, lk)
    assert torch.equal(got["put"][:, 0], torch.zeros(2, dtype=F64))
    assert torch.equal(got["put"][:, 1], torch.exp(lk[:, 1]) - 1.0)
    assert torch.equal(got["prob_below"], torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=F64))
    assert torch.equal(got["share_below"], torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=F64))
    assert torch.equal(got["density"], torch.zeros_like(lk))


def test_strikes_outside_the_range_through_the_pricer() -> None:
    """Money terms: a call struck far below the forward is D (F - K), the put 0; struck
    far above, the put is D (K - F) and the call 0 (to rounding)."""
    n = 4
    spot = torch.full((n,), 100.0, dtype=F64)
    strike = torch.tensor([70.0, 130.0, 70.0, 130.0], dtype=F64)
    b = OptionBatch(
        spot=spot,
        strike=strike,
        expiry=torch.full((n,), 0.25, dtype=F64),
        rate=torch.tensor([0.03, 0.03, -0.01, -0.01], dtype=F64),
        dividend=torch.tensor([0.01, 0.01, 0.02, 0.02], dtype=F64),
        is_call=torch.ones(n, dtype=torch.bool),
        theta=torch.full((n, 1), 0.002, dtype=F64),  # s = 0.001
    )
    pricer = _analytic_pricer()
    calls = pricer.evaluate(b, frozenset({"price"}))["price"]
    puts = pricer.evaluate(_with_call_flag(b, False), frozenset({"price"}))["price"]
    disc = torch.exp(-b.rate * b.expiry)
    fwd = b.forward
    below = strike < fwd
    assert torch.equal(puts[below], torch.zeros(int(below.sum()), dtype=F64))
    assert torch.allclose(calls[below], (disc * (fwd - strike))[below], rtol=0, atol=1e-12)
    assert torch.allclose(puts[~below], (disc * (strike - fwd))[~below], rtol=0, atol=1e-12)
    assert float(calls[~below].abs().max()) < 1e-12


def test_put_call_parity_through_the_pricer() -> None:
    """C - P = D (F - K) to 1e-12 relative to spot (the money scale: D(F - K) itself
    vanishes at the money), over random contracts."""
    b = _random_batch(200, seed=5)
    pricer = _analytic_pricer()
    calls = pricer.evaluate(_with_call_flag(b, True), frozenset({"price"}))["price"]
    puts = pricer.evaluate(_with_call_flag(b, False), frozenset({"price"}))["price"]
    parity = torch.exp(-b.rate * b.expiry) * (b.forward - b.strike)
    rel = ((calls - puts - parity).abs() / b.spot).max()
    assert float(rel) < 1e-12, float(rel)


# -- discretisation: number of frequencies and truncation range ----------------------------------
def _max_put_error(s: torch.Tensor, spec: SpectrumConfig) -> float:
    lk = _strike_grid(len(s), 0.7, 1.4, 15)
    got = _expansion(s, spec).put_terms(s, lk)["put"]
    return float((got - _bs_normalised(s, lk)["put"]).abs().max())


def test_more_frequencies_converge() -> None:
    """With L = 10, K = 16 frequencies stop at w = 2.4 where |phi_Y| = e^{-2.8}: a large
    error for a wide law. 32 is much better, 64 is at machine precision."""
    s = torch.tensor([1.0, 1.7], dtype=F64)
    err = {k: _max_put_error(s, SpectrumConfig(n_freq=k, half_width=10.0, n_bins=1024)) for k in (16, 32, 64)}
    assert err[16] > 1e-4, err
    assert err[32] < 1e-2 * err[16], err
    assert err[64] < 1e-12, err
    assert err[64] < err[32] < err[16]


def test_truncation_range_matters() -> None:
    """Y ~ N(-s/2, 1) has mass 2.7e-3 outside [-3, 3]: a visible error. L = 10 leaves
    out 1e-23 of the mass: < 1e-8 (here at machine precision)."""
    s = torch.tensor([0.1, 0.5, 1.0, 1.7], dtype=F64)
    err = {lw: _max_put_error(s, SpectrumConfig(n_freq=64, half_width=lw, n_bins=1024)) for lw in (3.0, 5.0, 10.0)}
    assert err[3.0] > 1e-5, err
    assert err[5.0] < 1e-2 * err[3.0], err
    assert err[10.0] < 1e-8, err


def test_rejects_a_cf_of_the_wrong_shape() -> None:
    phi = torch.ones((3, SPEC.n_freq - 1), dtype=torch.complex128)
    with pytest.raises(ValueError, match="phi_y must be"):
        CosExpansion(phi, SPEC)
    with pytest.raises(ValueError, match="phi_y must be"):
        CosExpansion(torch.ones(SPEC.n_freq, dtype=torch.complex128), SPEC)


# -- quadrature -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 5, 16, 64])
def test_gauss_legendre_is_exact_to_degree_2n_minus_1(n: int) -> None:
    """int_{-1}^{1} x^k dx = 2/(k+1) for even k, 0 for odd, exactly for k <= 2n - 1; the
    rule is symmetric with positive weights summing to 2."""
    x, w = gauss_legendre(n)
    assert x.shape == (n,) and w.shape == (n,)
    assert bool((w > 0).all()) and bool((x.abs() < 1).all())
    assert torch.allclose(x, -x.flip(0), rtol=0, atol=1e-14)
    for k in range(2 * n):
        exact = 2.0 / (k + 1) if k % 2 == 0 else 0.0
        got = float((w * x**k).sum())
        assert abs(got - exact) < 1e-13, (n, k, got, exact)


def test_gauss_legendre_is_not_exact_beyond_degree_2n_minus_1() -> None:
    """The 3-point rule misses x^6 by its textbook error 2^7 (3!)^4 / (7 (6!)^3) * 6! = 8/175."""
    x, w = gauss_legendre(3)
    got = float((w * x**6).sum())
    assert abs((2.0 / 7.0 - got) - 8.0 / 175.0) < 1e-14, got
