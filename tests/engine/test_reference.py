"""The reference engines: Black-Scholes closed forms against QuantLib, published values
and finite differences; lognormal moments and quantiles; brute Monte Carlo against the
closed form; limits (near expiry, vanishing vol, deep in/out of the money, parity)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import QuantLib as ql  # noqa: N813 (the library's conventional alias)
import torch

from spectralmc_server.engine.processes import GBMProcess
from spectralmc_server.engine.reference import (
    black_scholes,
    lognormal_moments,
    lognormal_quantiles,
    mc_european,
)

F64 = torch.float64
GBM = GBMProcess()
GREEKS = ("price", "delta", "gamma", "vega", "theta", "rho", "digital")


# -- helpers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contract:
    spot: float
    strike: float
    expiry: float
    rate: float
    dividend: float
    vol: float
    is_call: bool


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _bs(contracts: list[Contract]) -> dict[str, torch.Tensor]:
    return black_scholes(
        _t([c.spot for c in contracts]),
        _t([c.strike for c in contracts]),
        _t([c.expiry for c in contracts]),
        _t([c.rate for c in contracts]),
        _t([c.dividend for c in contracts]),
        _t([c.vol for c in contracts]),
        torch.tensor([c.is_call for c in contracts]),
    )


def _bs_one(c: Contract) -> dict[str, float]:
    return {k: float(v[0]) for k, v in _bs([c]).items()}


def _ncdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


EVAL_DATE = ql.Date(15, 1, 2024)


def _ql_option(c: Contract, days: int, *, digital: bool = False) -> Any:
    """A QuantLib European option on flat curves with Actual/365 (Fixed), so that the
    year fraction of ``days`` calendar days is exactly days / 365."""
    ql.Settings.instance().evaluationDate = EVAL_DATE
    dc = ql.Actual365Fixed()
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(ql.SimpleQuote(c.spot)),
        ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, c.dividend, dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, c.rate, dc)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(EVAL_DATE, ql.NullCalendar(), c.vol, dc)),
    )
    kind = ql.Option.Call if c.is_call else ql.Option.Put
    payoff = ql.CashOrNothingPayoff(kind, c.strike, 1.0) if digital else ql.PlainVanillaPayoff(kind, c.strike)
    option = ql.VanillaOption(payoff, ql.EuropeanExercise(EVAL_DATE + days))
    option.setPricingEngine(ql.AnalyticEuropeanEngine(process))
    return option


def _ql_grid() -> list[tuple[Contract, int]]:
    cases = []
    for is_call, moneyness, (rate, dividend), vol, days in itertools.product(
        (True, False),
        (0.7, 0.95, 1.0, 1.1, 1.5),  # strike / spot: deep ITM to deep OTM for either side
        ((0.05, 0.02), (0.0, 0.0), (-0.01, 0.0), (-0.005, 0.03), (0.03, -0.01)),
        (0.1, 0.45),
        (7, 91, 730),
    ):
        c = Contract(100.0, 100.0 * moneyness, days / 365, rate, dividend, vol, is_call)
        cases.append((c, days))
    return cases


def _norm_put(s: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
    """Normalised put E[(kappa - e^X)^+], X = -s^2/2 + s Z; s (B,), log_kappa (B, J)."""
    sc = s[:, None]
    d1 = (-log_kappa + 0.5 * sc * sc) / sc
    d2 = d1 - sc
    out: torch.Tensor = torch.exp(log_kappa) * torch.special.ndtr(-d2) - torch.special.ndtr(-d1)
    return out


# -- QuantLib -----------------------------------------------------------------------------
def test_black_scholes_matches_quantlib_analytic_engine() -> None:
    """Price and every Greek against QuantLib's AnalyticEuropeanEngine over calls/puts,
    ITM/ATM/OTM, zero, negative and positive rates and dividends, short to long expiries.

    Conventions: QuantLib's vega and rho are per 1.00 (as ours); its theta() is dV/dt
    per year, the same quantity as our theta = -dV/dT (the option ages as t advances).
    """
    cases = _ql_grid()
    ours = _bs([c for c, _ in cases])
    for i, (c, days) in enumerate(cases):
        opt = _ql_option(c, days)
        ql_values = {
            "price": opt.NPV(),
            "delta": opt.delta(),
            "gamma": opt.gamma(),
            "vega": opt.vega(),
            "theta": opt.theta(),
            "rho": opt.rho(),
            "digital": _ql_option(c, days, digital=True).NPV(),
        }
        for k, want in ql_values.items():
            got = float(ours[k][i])
            assert abs(got - want) <= 1e-12 + 1e-10 * abs(want), (k, c, got, want)


def test_quantlib_theta_sign_convention() -> None:
    """A long ATM call with no carry loses value as time passes: theta < 0 in both, and
    ours equals -(V(T + h) - V(T - h)) / 2h."""
    c = Contract(100.0, 100.0, 91 / 365, 0.0, 0.0, 0.3, True)
    ours = _bs_one(c)["theta"]
    assert ours < 0
    assert _ql_option(c, 91).theta() < 0
    h = 1e-6
    up = _bs_one(Contract(100.0, 100.0, c.expiry + h, 0.0, 0.0, 0.3, True))["price"]
    dn = _bs_one(Contract(100.0, 100.0, c.expiry - h, 0.0, 0.0, 0.3, True))["price"]
    assert abs(ours + (up - dn) / (2 * h)) < 1e-6


# -- published values -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("contract", "key", "value", "decimals"),
    [
        # Hull, Options, Futures and Other Derivatives, Black-Scholes-Merton example.
        (Contract(42.0, 40.0, 0.5, 0.10, 0.0, 0.2, True), "price", 4.76, 2),
        (Contract(42.0, 40.0, 0.5, 0.10, 0.0, 0.2, False), "price", 0.81, 2),
        # Hull, the Greek letters chapter: S=49, K=50, r=5%, sigma=20%, 20 weeks.
        (Contract(49.0, 50.0, 20 / 52, 0.05, 0.0, 0.2, True), "price", 2.40, 2),
        (Contract(49.0, 50.0, 20 / 52, 0.05, 0.0, 0.2, True), "delta", 0.522, 3),
        (Contract(49.0, 50.0, 20 / 52, 0.05, 0.0, 0.2, True), "gamma", 0.066, 3),
        (Contract(49.0, 50.0, 20 / 52, 0.05, 0.0, 0.2, True), "vega", 12.1, 1),
        (Contract(49.0, 50.0, 20 / 52, 0.05, 0.0, 0.2, True), "theta", -4.31, 2),
        (Contract(49.0, 50.0, 20 / 52, 0.05, 0.0, 0.2, True), "rho", 8.91, 2),
        # Haug, The Complete Guide to Option Pricing Formulas: Black-Scholes 1973 call,
        # Merton 1973 put (q = 5%), generalized BSM put (b = 5%, i.e. q = r - b = 5%).
        (Contract(60.0, 65.0, 0.25, 0.08, 0.0, 0.3, True), "price", 2.1334, 4),
        (Contract(100.0, 95.0, 0.5, 0.10, 0.05, 0.2, False), "price", 2.4648, 4),
        (Contract(75.0, 70.0, 0.5, 0.10, 0.05, 0.35, False), "price", 4.0870, 4),
        # Haug's Greeks examples (generalized BSM with cost of carry b = r - q).
        (Contract(105.0, 100.0, 0.5, 0.10, 0.10, 0.36, True), "delta", 0.5946, 4),
        (Contract(105.0, 100.0, 0.5, 0.10, 0.10, 0.36, False), "delta", -0.3566, 4),
        (Contract(55.0, 60.0, 0.75, 0.10, 0.0, 0.30, True), "gamma", 0.0278, 4),
        (Contract(430.0, 405.0, 0.0833, 0.07, 0.05, 0.20, False), "theta", -31.1924, 4),
        (Contract(72.0, 75.0, 1.0, 0.09, 0.0, 0.19, True), "rho", 38.7325, 4),
    ],
)
def test_published_values(contract: Contract, key: str, value: float, decimals: int) -> None:
    got = _bs_one(contract)[key]
    assert round(got, decimals) == pytest.approx(value, abs=1e-12), (key, got)


# -- Greeks against finite differences ----------------------------------------------------------
def _fd_contracts() -> list[Contract]:
    out = []
    for is_call, k, (r, q), vol, t in itertools.product(
        (True, False), (80.0, 100.0, 125.0), ((0.04, 0.01), (-0.01, 0.02)), (0.15, 0.6), (0.1, 2.0)
    ):
        out.append(Contract(100.0, k, t, r, q, vol, is_call))
    return out


def _bump(cs: list[Contract], field: str, h: float) -> dict[str, torch.Tensor]:
    bumped = [Contract(**{**c.__dict__, field: getattr(c, field) + h}) for c in cs]
    return _bs(bumped)


def test_greeks_match_central_finite_differences() -> None:
    """delta, gamma (second difference), vega, theta = -dV/dT, rho, and the digital as
    -dC/dK (call) or dP/dK (put), against central differences of the price."""
    cs = _fd_contracts()
    got = _bs(cs)

    def diff(field: str, h: float) -> torch.Tensor:
        return (_bump(cs, field, h)["price"] - _bump(cs, field, -h)["price"]) / (2 * h)

    h_spot = 1e-2
    fd = {
        "delta": diff("spot", 1e-4),
        "gamma": (_bump(cs, "spot", h_spot)["price"] - 2 * got["price"] + _bump(cs, "spot", -h_spot)["price"])
        / h_spot**2,
        "vega": diff("vol", 1e-6),
        "theta": -diff("expiry", 1e-7),
        "rho": diff("rate", 1e-6),
    }
    sign = torch.tensor([-1.0 if c.is_call else 1.0 for c in cs], dtype=F64)
    fd["digital"] = sign * diff("strike", 1e-4)
    tol = {"delta": 1e-8, "gamma": 1e-7, "vega": 1e-7, "theta": 1e-6, "rho": 1e-7, "digital": 1e-8}
    for k, t in tol.items():
        err = ((got[k] - fd[k]).abs() / (1.0 + fd[k].abs())).max()
        assert float(err) < t, (k, float(err))
    # Sanity on the grid: most comparisons are not near zero.
    assert int((got["gamma"] > 1e-3).sum()) > len(cs) // 2 and int((got["vega"] > 1.0).sum()) > len(cs) // 2


# -- lognormal moments and quantiles --------------------------------------------------------------
def test_lognormal_moments_match_gauss_hermite_quadrature() -> None:
    """Direct computation: E[g(S_T)] with S_T = F exp(-s^2/2 + s Z) by 160-point
    Gauss-Hermite (exact to far below 1e-12 for these smooth integrands)."""
    z, w = np.polynomial.hermite_e.hermegauss(160)
    w = w / math.sqrt(2.0 * math.pi)
    forward = _t([1.0, 50.0, 123.4, 7.0, 100.0])
    s = _t([0.01, 0.1, 0.3, 0.6, 1.0])
    got = lognormal_moments(forward, s)
    for i in range(len(s)):
        f, si = float(forward[i]), float(s[i])
        st = f * np.exp(-0.5 * si * si + si * z)
        mean = float(np.sum(w * st))
        c = st - mean
        var = float(np.sum(w * c**2))
        m3 = float(np.sum(w * c**3))
        m4 = float(np.sum(w * c**4))
        want = {"mean": mean, "stdev": math.sqrt(var), "skew": m3 / var**1.5, "kurtosis": m4 / var**2 - 3.0}
        for k, v in want.items():
            rel = abs(float(got[k][i]) - v) / abs(v)
            assert rel < 1e-10, (k, si, float(got[k][i]), v)


def test_lognormal_moments_within_monte_carlo_error() -> None:
    """Mean and variance of S_T from 400,000 exact samples within 4 standard errors."""
    g = torch.Generator().manual_seed(2024)
    n = 400_000
    z = torch.randn(n, generator=g, dtype=F64)
    for f, s in ((100.0, 0.2), (3.0, 0.5)):
        st = f * torch.exp(-0.5 * s * s + s * z)
        want = lognormal_moments(_t([f]), _t([s]))
        mean_se = float(st.std()) / math.sqrt(n)
        assert abs(float(st.mean()) - f) < 4 * mean_se
        assert float(want["mean"]) == f
        sq = (st - f) ** 2  # unbiased for the variance since E[S_T] = F is known
        var_se = float(sq.std()) / math.sqrt(n)
        assert abs(float(sq.mean()) - float(want["stdev"]) ** 2) < 4 * var_se


def test_lognormal_moments_small_spread_and_limits() -> None:
    """For small s: stdev = F sqrt(e^{s^2} - 1) ~ F s, skew ~ 3 s, kurtosis ~ 16 s^2; with
    no cancellation in stdev and skew (expm1)."""
    s = _t([1e-6, 1e-4, 1e-2])
    m = lognormal_moments(_t([2.0, 2.0, 2.0]), s)
    for i, si in enumerate(s.tolist()):
        v = si * si
        assert abs(float(m["stdev"][i]) / (2.0 * math.sqrt(math.expm1(v))) - 1.0) < 1e-14
        assert abs(float(m["skew"][i]) - (math.exp(v) + 2.0) * math.sqrt(math.expm1(v))) < 1e-15
    assert abs(float(m["skew"][0]) / 3e-6 - 1.0) < 1e-10
    assert abs(float(m["kurtosis"][2]) - 16e-4) < 2e-6  # 16 s^2 + O(s^4)


def test_lognormal_quantiles_invert_the_lognormal_cdf() -> None:
    """P(S_T < q_p) = p, with the CDF written directly: N((log(q/F) + s^2/2) / s)."""
    forward = _t([100.0, 1.0, 42.0])
    s = _t([0.2, 0.01, 1.5])
    levels = _t([1e-6, 0.001, 0.05, 0.25, 0.5, 0.75, 0.95, 0.999, 1 - 1e-6])
    q = lognormal_quantiles(forward, s, levels)
    assert q.shape == (3, len(levels))
    assert bool((q.diff(dim=1) > 0).all())
    for i in range(3):
        f, si = float(forward[i]), float(s[i])
        for j, p in enumerate(levels.tolist()):
            cdf = _ncdf((math.log(float(q[i, j]) / f) + 0.5 * si * si) / si)
            assert abs(cdf - p) < 1e-12 * max(1.0, p / (1 - p)) + 1e-13, (i, p, cdf)
        # the median is F e^{-s^2/2}
        assert abs(float(q[i, 4]) / (f * math.exp(-0.5 * si * si)) - 1.0) < 1e-15


def test_lognormal_quantiles_within_monte_carlo_error() -> None:
    """The fraction of exact samples below each quantile is p within 4 binomial SEs."""
    g = torch.Generator().manual_seed(99)
    n = 200_000
    f, s = 80.0, 0.4
    st = f * torch.exp(-0.5 * s * s + s * torch.randn(n, generator=g, dtype=F64))
    levels = _t([0.01, 0.1, 0.5, 0.9, 0.99])
    q = lognormal_quantiles(_t([f]), _t([s]), levels)[0]
    for p, qp in zip(levels.tolist(), q.tolist(), strict=True):
        frac = float((st < qp).to(F64).mean())
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n), (p, frac)


# -- brute Monte Carlo --------------------------------------------------------------------------
MC_THETA = _t([0.1, 0.3, 0.6, 1.0])[:, None]
MC_EXPIRY = _t([0.25, 1.0, 2.0, 0.5])
MC_LOG_K = torch.log(_t([0.9, 1.0, 1.15]))[None, :].expand(4, -1).contiguous()
MC_ROW_ELEMENTS = 4 * 3  # B * max(J, normals per path): max_elements per simulated path


def test_mc_european_puts_within_four_standard_errors() -> None:
    res = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 200_000, seed=7)
    exact = _norm_put(GBM.scale(MC_THETA, MC_EXPIRY), MC_LOG_K)
    assert res.price.shape == exact.shape == res.stderr.shape
    assert bool((res.stderr > 0).all())
    z = (res.price - exact) / res.stderr
    assert float(z.abs().max()) < 4.0, z
    # The errors are MC-sized, not zero: the test is not comparing the closed form with itself.
    assert float((res.price - exact).abs().max()) > 1e-6


def test_mc_standard_error_matches_the_payoff_variance() -> None:
    """The reported stderr is sqrt(Var(payoff) / n), with the put payoff's second moment
    in closed form: E[(kappa - e^X)^+ ^2] = kappa^2 N(-d2) - 2 kappa N(-d1) + e^{s^2} N(-d2 - 2s)."""
    n = 200_000
    res = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, n, seed=13)
    s = GBM.scale(MC_THETA, MC_EXPIRY)[:, None]
    d1 = (-MC_LOG_K + 0.5 * s * s) / s
    d2 = d1 - s
    kappa = torch.exp(MC_LOG_K)
    ncdf = torch.special.ndtr
    second = kappa**2 * ncdf(-d2) - 2 * kappa * ncdf(-d1) + torch.exp(s * s) * ncdf(-d2 - 2 * s)
    put = _norm_put(s[:, 0], MC_LOG_K)
    want = torch.sqrt((second - put * put) / n)
    assert float((res.stderr / want - 1.0).abs().max()) < 0.05, res.stderr / want


def test_mc_european_calls_and_puts_mixed() -> None:
    """is_call (B, J) picks E[(e^X - kappa)^+] = N(d1) - kappa N(d2) per cell."""
    is_call = torch.tensor([[True, False, True]] * 4)
    res = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 200_000, is_call=is_call, seed=21)
    put = _norm_put(GBM.scale(MC_THETA, MC_EXPIRY), MC_LOG_K)
    exact = torch.where(is_call, put + 1.0 - torch.exp(MC_LOG_K), put)  # parity, E[e^X] = 1
    z = (res.price - exact) / res.stderr
    assert float(z.abs().max()) < 4.0, z
    # Same normals, so on put columns the answer is the pure-put run's, bit for bit.
    puts_only = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 200_000, seed=21)
    assert torch.equal(res.price[:, 1], puts_only.price[:, 1])
    # On call columns, parity holds path by path with the same normals: C - P = mean(e^X) - kappa,
    # whose error against 1 - kappa is that of mean(e^X), sd sqrt(e^{s^2} - 1) / sqrt(n).
    s = GBM.scale(MC_THETA, MC_EXPIRY)
    gap = res.price[:, 0] - puts_only.price[:, 0] - (1.0 - torch.exp(MC_LOG_K[:, 0]))
    se = lognormal_moments(torch.ones_like(s), s)["stdev"] / math.sqrt(200_000)
    assert float((gap.abs() / se).max()) < 4.0


def test_mc_european_chunking_and_odd_path_counts() -> None:
    """Small, odd chunks (max_elements) and a path count that is not a multiple of the
    chunk still use exactly n_paths paths: within 4 SEs, and the standard errors agree
    with a one-chunk run (different normals, same n) to a few percent."""
    n = 30_001
    small = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, n, seed=3, max_elements=4_999 * MC_ROW_ELEMENTS)
    exact = _norm_put(GBM.scale(MC_THETA, MC_EXPIRY), MC_LOG_K)
    assert float(((small.price - exact) / small.stderr).abs().max()) < 4.0
    whole = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, n, seed=3, max_elements=n * MC_ROW_ELEMENTS)
    ratio = small.stderr / whole.stderr
    assert float((ratio - 1.0).abs().max()) < 0.05, ratio


def test_mc_needs_two_paths() -> None:
    with pytest.raises(ValueError, match="at least 2 paths"):
        mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 1)


def test_mc_standard_error_shrinks_like_one_over_sqrt_n() -> None:
    """stderr(n) / stderr(4n) = 2 within 15% (every cell's payoff is nonzero on a fair
    share of paths: the narrowest law, s = 0.05, is 2 sd from its lowest strike)."""
    small = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 40_000, seed=11)
    large = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 160_000, seed=11, first_block=50)
    ratio = small.stderr / large.stderr
    assert float((ratio / 2.0 - 1.0).abs().max()) < 0.15, ratio


def test_mc_is_reproducible_by_seed_and_block() -> None:
    cap = 3_000 * MC_ROW_ELEMENTS
    a = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 10_000, seed=5, max_elements=cap)
    b = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 10_000, seed=5, max_elements=cap)
    assert torch.equal(a.price, b.price) and torch.equal(a.stderr, b.stderr)
    c = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 10_000, seed=5, max_elements=cap, first_block=1)
    assert bool((a.price != c.price).all())
    d = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 10_000, seed=6, max_elements=cap)
    assert bool((a.price != d.price).all())


def test_mc_blocks_are_shared_across_runs() -> None:
    """Block i of a stream is a pure function of (seed, i): a run starting at block 1
    reuses the second block of a run starting at block 0, so the two halves average to
    the whole."""
    cap = 2_000 * MC_ROW_ELEMENTS
    both = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 4_000, seed=8, max_elements=cap)
    first = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 2_000, seed=8, max_elements=cap)
    second = mc_european(GBM, MC_THETA, MC_EXPIRY, MC_LOG_K, 2_000, seed=8, max_elements=cap, first_block=1)
    assert torch.allclose(both.price, 0.5 * (first.price + second.price), rtol=0, atol=1e-15)
    assert not torch.allclose(first.price, second.price, rtol=0, atol=1e-6)


# -- limits ------------------------------------------------------------------------------------
def _intrinsic(
    spot: torch.Tensor,
    strike: torch.Tensor,
    expiry: torch.Tensor,
    rate: torch.Tensor,
    dividend: torch.Tensor,
    is_call: torch.Tensor,
) -> torch.Tensor:
    disc = torch.exp(-rate * expiry)
    fwd = spot * torch.exp((rate - dividend) * expiry)
    return torch.where(is_call, disc * (fwd - strike).clamp(min=0), disc * (strike - fwd).clamp(min=0))


@pytest.mark.parametrize(("expiry", "vol"), [(1e-8, 0.3), (1.0, 1e-6), (2.0, 1e-9)])
def test_vanishing_spread_gives_discounted_forward_intrinsic(expiry: float, vol: float) -> None:
    """T -> 0 or sigma -> 0: the price is D (F - K)^+ for calls, D (K - F)^+ for puts,
    to 1e-12 relative to spot, for strikes 1% or more away from the forward."""
    rows = list(
        itertools.product(
            (True, False),
            (50.0, 90.0, 99.0, 101.0, 110.0, 200.0),
            ((0.05, 0.02), (-0.01, 0.01), (0.0, 0.0), (0.03, -0.02)),
        )
    )
    n = len(rows)
    is_call = torch.tensor([c for c, _, _ in rows])
    k = _t([x for _, x, _ in rows])
    rate = _t([rq[0] for _, _, rq in rows])
    dividend = _t([rq[1] for _, _, rq in rows])
    spot = torch.full((n,), 100.0, dtype=F64)
    t = torch.full((n,), expiry, dtype=F64)
    got = black_scholes(spot, k, t, rate, dividend, torch.full((n,), vol, dtype=F64), is_call)
    want = _intrinsic(spot, k, t, rate, dividend, is_call)
    assert float(((got["price"] - want).abs() / spot).max()) < 1e-12
    # delta -> e^{-qT} 1{ITM} (call) / -e^{-qT} 1{ITM} (put), digital -> D 1{ITM}
    fwd = spot * torch.exp((rate - dividend) * t)
    itm = torch.where(is_call, fwd > k, fwd < k).to(F64)
    qdisc = torch.exp(-dividend * t)
    assert torch.allclose(got["delta"], torch.where(is_call, qdisc * itm, -qdisc * itm), rtol=0, atol=1e-12)
    assert torch.allclose(got["digital"], torch.exp(-rate * t) * itm, rtol=0, atol=1e-12)


def test_at_the_money_forward_near_expiry() -> None:
    """F = K, s -> 0: C = P = D F (2 N(s/2) - 1) ~ D F s / sqrt(2 pi)."""
    t = 1e-8
    vol = 0.3
    s = vol * math.sqrt(t)
    c = Contract(100.0, 100.0 * math.exp(0.02 * t), t, 0.05, 0.03, vol, True)  # K = F
    got = _bs_one(c)["price"]
    want = math.exp(-0.05 * t) * c.strike * s / math.sqrt(2.0 * math.pi)
    assert abs(got / want - 1.0) < 1e-6
    put = _bs_one(Contract(**{**c.__dict__, "is_call": False}))["price"]
    assert abs(put - got) < 1e-15


def test_deep_in_and_out_of_the_money() -> None:
    """K = F/5 or 5 F at s = 0.2: OTM prices, digitals, gammas and vegas vanish; ITM
    prices are D (F - K) or D (K - F), deltas +-e^{-qT}, digitals D."""
    rate, div, t, vol = 0.04, 0.015, 1.0, 0.2
    fwd = 100.0 * math.exp((rate - div) * t)
    cs = [Contract(100.0, fwd * m, t, rate, div, vol, call) for m in (0.2, 5.0) for call in (True, False)]
    got = _bs(cs)
    disc, qdisc = math.exp(-rate * t), math.exp(-div * t)
    for i, c in enumerate(cs):
        itm = (c.strike < fwd) == c.is_call
        price = float(got["price"][i])
        assert math.isfinite(price) and price >= 0.0
        if itm:
            intrinsic = disc * abs(fwd - c.strike)
            assert abs(price - intrinsic) < 1e-12 * c.spot
            assert abs(float(got["delta"][i]) - (qdisc if c.is_call else -qdisc)) < 1e-12
            assert abs(float(got["digital"][i]) - disc) < 1e-12
        else:
            assert price < 1e-12
            assert abs(float(got["delta"][i])) < 1e-12
            assert abs(float(got["digital"][i])) < 1e-12
        assert 0.0 <= float(got["gamma"][i]) < 1e-12
        assert 0.0 <= float(got["vega"][i]) < 1e-9


def test_put_call_parity_and_homogeneity() -> None:
    """C - P = D (F - K) to 1e-12 relative to spot; digitals sum to D; deltas differ by
    e^{-qT}; and prices are homogeneous of degree one in (S, K)."""
    g = torch.Generator().manual_seed(17)
    n = 500

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)

    spot, t, r, q, vol = u(10, 500), u(1e-3, 10.0), u(-0.03, 0.1), u(-0.02, 0.08), u(0.01, 1.5)
    k = spot * u(0.3, 3.0)
    call = black_scholes(spot, k, t, r, q, vol, torch.ones(n, dtype=torch.bool))
    put = black_scholes(spot, k, t, r, q, vol, torch.zeros(n, dtype=torch.bool))
    disc = torch.exp(-r * t)
    fwd = spot * torch.exp((r - q) * t)
    assert float(((call["price"] - put["price"] - disc * (fwd - k)).abs() / spot).max()) < 1e-12
    assert torch.allclose(call["digital"] + put["digital"], disc, rtol=0, atol=1e-14)
    assert torch.allclose(call["delta"] - put["delta"], torch.exp(-q * t), rtol=0, atol=1e-14)
    for key in ("gamma", "vega"):
        assert torch.equal(call[key], put[key])
    scaled = black_scholes(3.0 * spot, 3.0 * k, t, r, q, vol, torch.ones(n, dtype=torch.bool))
    assert float(((scaled["price"] - 3.0 * call["price"]).abs() / spot).max()) < 1e-12
    assert torch.allclose(scaled["delta"], call["delta"], rtol=0, atol=1e-14)
