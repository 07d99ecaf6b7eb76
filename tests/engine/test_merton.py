"""The Merton (1976) jump-diffusion: the COS reference on its analytic CF against
QuantLib (Merton's Poisson-weighted Black series as QuantLib's JumpDiffusionEngine sums
it, and the Bates engine with the stochastic variance frozen), the Black-Scholes limit
without jumps, and the exact simulation (with its inverse Poisson draw) against the
reference within Monte-Carlo error."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import pytest
import QuantLib as ql  # noqa: N813 (the library's conventional alias)
import torch

from spectralmc_server.engine.pricer import OptionBatch
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.merton import poisson_inverse
from spectralmc_server.engine.reference import black_scholes, mc_european
from spectralmc_server.engine.reference_pricers import reference_pricer

F64 = torch.float64
MERTON = get_process("merton")
EVAL_DATE = ql.Date(15, 1, 2024)

# (sigma, lambda, mu_j, sigma_j), log J ~ N(mu_j, sigma_j^2)
SETS = [
    (0.2, 0.5, -0.1, 0.15),
    (0.15, 1.0, -0.2, 0.25),
    (0.3, 0.3, 0.1, 0.05),  # upward jumps
    (0.25, 2.0, 0.0, 0.1),
]
STRIKES = [70.0, 90.0, 100.0, 110.0, 130.0]


# -- helpers ----------------------------------------------------------------------------------
def _reference_prices(
    params: Sequence[Sequence[float]],
    strikes: list[float],
    expiry: list[float],
    rate: list[float],
    dividend: list[float],
    calls: list[bool],
    spot: float = 100.0,
) -> list[float]:
    """reference_pricer(merton) in money, one row per contract."""
    n = len(strikes)
    batch = OptionBatch(
        spot=torch.full((n,), spot, dtype=F64),
        strike=torch.tensor(strikes, dtype=F64),
        expiry=torch.tensor(expiry, dtype=F64),
        rate=torch.tensor(rate, dtype=F64),
        dividend=torch.tensor(dividend, dtype=F64),
        is_call=torch.tensor(calls),
        theta=torch.tensor(params, dtype=F64),
    )
    out: list[float] = reference_pricer(MERTON).evaluate(batch, frozenset({"price"}))["price"].tolist()
    return out


def _quantlib_merton_series(
    params: tuple[float, ...], spot: float, strike: float, expiry: float, rate: float, dividend: float, call: bool
) -> float:
    """Merton's formula term by term with QuantLib's Black formula, exactly as QuantLib's
    JumpDiffusionEngine sums it (the engine itself is not wrapped in the Python module):
    with k = e^{mu_j + sigma_j^2 / 2} - 1, n ~ Poisson(lambda (1 + k) T) and, given n,
    variance sigma^2 T + n sigma_j^2 and rate r - lambda k + n (mu_j + sigma_j^2 / 2) / T."""
    sigma, lam, mu_j, sigma_j = params
    half = mu_j + 0.5 * sigma_j * sigma_j
    k = math.expm1(half)
    mean = lam * (1.0 + k) * expiry
    kind = ql.Option.Call if call else ql.Option.Put
    total, weight = 0.0, math.exp(-mean)
    for n in range(200):
        if n:
            weight *= mean / n
        std = math.sqrt(sigma * sigma * expiry + n * sigma_j * sigma_j)
        r_n = rate - lam * k + n * half / expiry
        fwd = spot * math.exp((r_n - dividend) * expiry)
        total += weight * ql.blackFormula(kind, strike, fwd, std, math.exp(-r_n * expiry))
    return total


def _quantlib_bates(
    params: tuple[float, ...], spot: float, strike: float, days: int, rate: float, dividend: float, call: bool
) -> float:
    """BatesEngine (Heston plus Merton jumps, log(1 + J) ~ N(nu, delta^2)) with the
    variance frozen at sigma^2: v0 = theta = sigma^2, vol of vol 1e-4, rho = 0. The
    frozen variance leaves an O(xi^2) difference (~1e-8 here)."""
    ql.Settings.instance().evaluationDate = EVAL_DATE
    dc = ql.Actual365Fixed()
    sigma, lam, mu_j, sigma_j = params
    process = ql.BatesProcess(
        ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, rate, dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, dividend, dc)),
        ql.QuoteHandle(ql.SimpleQuote(spot)),
        sigma * sigma,
        1.0,
        sigma * sigma,
        1e-4,
        0.0,
        lam,
        mu_j,
        sigma_j,
    )
    kind = ql.Option.Call if call else ql.Option.Put
    option: Any = ql.VanillaOption(ql.PlainVanillaPayoff(kind, strike), ql.EuropeanExercise(EVAL_DATE + days))
    option.setPricingEngine(ql.BatesEngine(ql.BatesModel(process), 1e-12, 100000))
    return float(option.NPV())


def _grid() -> list[tuple[tuple[float, ...], int, float, float, float, bool]]:
    return [
        (params, days, rate, dividend, strike, call)
        for params, days, (rate, dividend), strike, call in itertools.product(
            SETS, (73, 365, 1095), ((0.03, 0.01), (-0.01, 0.02)), STRIKES, (True, False)
        )
    ]


# -- QuantLib ---------------------------------------------------------------------------------
def test_reference_matches_quantlib_merton_series() -> None:
    """Calls and puts, strikes 70..130, T = 0.2, 1 and 3 years, nonzero rates and
    dividends: |ours - QuantLib| <= 1e-6 spot (the two agree to ~1e-12 in practice)."""
    grid = _grid()
    got = _reference_prices(
        [g[0] for g in grid],
        [g[4] for g in grid],
        [g[1] / 365 for g in grid],
        [g[2] for g in grid],
        [g[3] for g in grid],
        [g[5] for g in grid],
    )
    for (params, days, rate, dividend, strike, call), g in zip(grid, got, strict=True):
        want = _quantlib_merton_series(params, 100.0, strike, days / 365, rate, dividend, call)
        assert abs(g - want) <= 1e-6 * 100.0, (params, days, rate, dividend, strike, call, g, want)


def test_reference_matches_quantlib_bates_engine_with_frozen_variance() -> None:
    """QuantLib's own jump convention (BatesProcess: lambda, nu = mean log jump, delta =
    its stdev) agrees with ours, log J ~ N(mu_j, sigma_j^2), k = e^{mu_j + sigma_j^2/2} - 1."""
    grid = [g for g in _grid() if g[1] == 365 and g[2] == 0.03]
    got = _reference_prices(
        [g[0] for g in grid],
        [g[4] for g in grid],
        [g[1] / 365 for g in grid],
        [g[2] for g in grid],
        [g[3] for g in grid],
        [g[5] for g in grid],
    )
    for (params, days, rate, dividend, strike, call), g in zip(grid, got, strict=True):
        want = _quantlib_bates(params, 100.0, strike, days, rate, dividend, call)
        assert abs(g - want) <= 1e-6 * 100.0, (params, strike, call, g, want)


def test_no_jumps_is_black_scholes() -> None:
    """lambda = 0: the reference equals the Black-Scholes closed form to 1e-9 (whatever
    the jump law's other parameters)."""
    rows = list(
        itertools.product((0.1, 0.3), ((0.0, 0.2), (-0.2, 0.05)), (0.25, 2.0), (70.0, 100.0, 130.0), (True, False))
    )
    params = [(sigma, 0.0, mu_j, sigma_j) for sigma, (mu_j, sigma_j), _, _, _ in rows]
    strikes = [k for *_, k, _ in rows]
    expiry = [t for _, _, t, _, _ in rows]
    calls = [c for *_, c in rows]
    n = len(rows)
    got = torch.tensor(_reference_prices(params, strikes, expiry, [0.02] * n, [0.01] * n, calls), dtype=F64)
    want = black_scholes(
        torch.full((n,), 100.0, dtype=F64),
        torch.tensor(strikes, dtype=F64),
        torch.tensor(expiry, dtype=F64),
        torch.full((n,), 0.02, dtype=F64),
        torch.full((n,), 0.01, dtype=F64),
        torch.tensor([p[0] for p in params], dtype=F64),
        torch.tensor(calls),
    )["price"]
    assert float((got - want).abs().max()) < 1e-9, (got - want).abs().max()


# -- exact simulation ---------------------------------------------------------------------------
def test_exact_simulation_within_four_standard_errors_of_the_reference() -> None:
    """mc_european with 400,000 paths against COS on the analytic CF, out-of-the-money
    puts and calls from 0.7 to 1.3 of the forward: |z| < 4 per cell."""
    theta = torch.tensor([SETS[0], SETS[1], SETS[3]], dtype=F64)
    expiry = torch.tensor([0.5, 2.0, 1.0], dtype=F64)
    log_k = torch.log(torch.tensor([0.7, 0.9, 1.0, 1.1, 1.3], dtype=F64))[None, :].expand(3, -1).contiguous()
    is_call = log_k > 0
    res = mc_european(MERTON, theta, expiry, log_k, 400_000, is_call=is_call, seed=4)
    exact = torch.tensor(
        _reference_prices(
            theta.repeat_interleave(5, 0).tolist(),
            torch.exp(log_k).reshape(-1).tolist(),
            expiry.repeat_interleave(5).tolist(),
            [0.0] * 15,
            [0.0] * 15,
            is_call.reshape(-1).tolist(),
            spot=1.0,
        ),
        dtype=F64,
    ).view(3, 5)
    z = (res.price - exact) / res.stderr
    assert float(z.abs().max()) < 4.0, z


@pytest.mark.parametrize("mean", [0.05, 0.6, 3.0, 12.0])
def test_poisson_inverse_matches_the_pmf(mean: float) -> None:
    """Counts drawn from a uniform midpoint grid of 200,000 points have frequencies equal
    to the Poisson pmf within 1e-3 (the grid's error is at most 1 / 200,000 per count)."""
    n = 200_000
    u = ((torch.arange(n, dtype=F64) + 0.5) / n)[None, :]
    counts = poisson_inverse(u, torch.tensor([[mean]], dtype=F64))[0]
    assert bool((counts == counts.round()).all()) and float(counts.min()) == 0.0
    freq = torch.bincount(counts.long(), minlength=40).to(F64) / n
    for j in range(40):
        pmf = math.exp(-mean + j * math.log(mean) - math.lgamma(j + 1))
        assert abs(float(freq[j]) - pmf) < 1e-3, (mean, j, float(freq[j]), pmf)
    assert abs(float(counts.mean()) - mean) < 1e-3 * max(1.0, mean)
