"""Black's formula and its inversion against two independent implementations: the torch
Black-Scholes reference of the engine and QuantLib.

Tolerances: prices agree to 1e-12 relative, with an absolute floor of 1e-13 (spot 100)
for deep out-of-the-money prices, where F N(d1) - K N(d2) is a difference of two tiny
numbers and the three implementations' normal CDFs differ in the last bits. Implied vols
reproduce the price to 1e-10 relative, and the vol itself to what the price tolerance
allows (the solver stops at 1e-12 · max(1, price) in price, i.e. that over vega in vol).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import QuantLib as ql  # noqa: N813 (the library's conventional alias)
import torch

from spectralmc_server.engine.reference import black_scholes
from spectralmc_server.marketdata.black import NoImpliedVolError, black_forward, implied_vol

F64 = torch.float64
REL = 1e-12
FLOOR = 1e-13

SPOT, RATE, DIV = 100.0, 0.03, 0.01
STRIKES = [50.0, 80.0, 95.0, 100.0, 105.0, 125.0, 200.0]
EXPIRIES = [1 / 365, 0.1, 0.5, 1.0, 3.0, 10.0]
VOLS = [0.05, 0.1, 0.2, 0.4, 0.8]
GRID = list(itertools.product(STRIKES, EXPIRIES, VOLS))


def close(got: float, want: float, rel: float = REL, floor: float = FLOOR) -> bool:
    return abs(got - want) <= max(rel * abs(want), floor)


def forward_and_discount(t: float) -> tuple[float, float]:
    return SPOT * math.exp((RATE - DIV) * t), math.exp(-RATE * t)


def test_black_forward_matches_the_torch_reference() -> None:
    """The whole grid in one batch of black_scholes (spot, rate, dividend): discounted
    black_forward on F = S e^{(r-q)t} is the same price, calls and puts."""
    n = len(GRID)
    for is_call in (True, False):
        ref = black_scholes(
            torch.full((n,), SPOT, dtype=F64),
            torch.tensor([k for k, _, _ in GRID], dtype=F64),
            torch.tensor([t for _, t, _ in GRID], dtype=F64),
            torch.full((n,), RATE, dtype=F64),
            torch.full((n,), DIV, dtype=F64),
            torch.tensor([v for _, _, v in GRID], dtype=F64),
            torch.full((n,), is_call, dtype=torch.bool),
        )["price"].tolist()
        bad = []
        for (k, t, v), want in zip(GRID, ref, strict=True):
            f, d = forward_and_discount(t)
            got = d * black_forward(f, k, v * math.sqrt(t), is_call)
            if not close(got, want):
                bad.append((k, t, v, got, want))
        assert not bad, f"{'call' if is_call else 'put'}: {bad[:5]}"


@pytest.mark.parametrize("is_call", [True, False])
def test_black_forward_matches_quantlib(is_call: bool) -> None:
    """ql.blackFormula(type, strike, forward, stdDev, discount) over the same grid."""
    kind = ql.Option.Call if is_call else ql.Option.Put
    bad = []
    for k, t, v in GRID:
        f, d = forward_and_discount(t)
        sd = v * math.sqrt(t)
        want = ql.blackFormula(kind, k, f, sd, d)
        got = d * black_forward(f, k, sd, is_call)
        if not close(got, want):
            bad.append((k, t, v, got, want))
    assert not bad, bad[:5]


@pytest.mark.parametrize(("forward", "strike", "sd"), [(100.0, 100.0, 0.2), (100.0, 60.0, 0.05), (1.0, 1.3, 1.5)])
def test_black_forward_hand_values(forward: float, strike: float, sd: float) -> None:
    """At the money C = F (2 N(sd/2) - 1); tolerance 1e-12 relative. Zero sd is intrinsic."""
    if forward == strike:
        assert black_forward(forward, strike, sd, True) == pytest.approx(
            forward * math.erf(sd / 2 / math.sqrt(2.0)), rel=REL, abs=0
        )
    assert black_forward(forward, strike, 0.0, True) == max(forward - strike, 0.0)
    assert black_forward(forward, strike, 0.0, False) == max(strike - forward, 0.0)
    assert black_forward(forward, strike, -1.0, True) == max(forward - strike, 0.0)


def test_put_call_parity() -> None:
    """C - P = D (F - K) to 1e-12 of the forward, over the grid."""
    for k, t, v in GRID:
        f, d = forward_and_discount(t)
        sd = v * math.sqrt(t)
        c, p = d * black_forward(f, k, sd, True), d * black_forward(f, k, sd, False)
        assert c - p == pytest.approx(d * (f - k), abs=REL * max(f, k), rel=0), (k, t, v)


def test_prices_are_monotone_and_bounded() -> None:
    """More vol is worth more; a call lies in (max(F-K, 0), F), a put in (max(K-F, 0), K)."""
    f = 100.0
    for k in STRIKES:
        calls = [black_forward(f, k, sd, True) for sd in (0.01, 0.1, 0.5, 2.0)]
        assert calls == sorted(calls)
        assert all(max(f - k, 0.0) <= c <= f for c in calls)
        puts = [black_forward(f, k, sd, False) for sd in (0.01, 0.1, 0.5, 2.0)]
        assert puts == sorted(puts)
        assert all(max(k - f, 0.0) <= p <= k for p in puts)


# --- implied vol -------------------------------------------------------------------------


def vega(forward: float, strike: float, sigma: float, t: float) -> float:
    """Undiscounted dC/dsigma."""
    sd = sigma * math.sqrt(t)
    d1 = math.log(forward / strike) / sd + 0.5 * sd
    return forward * math.exp(-0.5 * d1 * d1) / math.sqrt(2 * math.pi) * math.sqrt(t)


ROUND_TRIPS = [
    # (forward, strike, t, sigma, is_call), from deep ITM to deep OTM, a day to 30 years
    (100.0, 100.0, 1.0, 0.2, True),  # at the money
    (100.0, 100.0, 1.0, 0.2, False),
    (100.0, 50.0, 1.0, 0.3, True),  # deep ITM call
    (100.0, 200.0, 1.0, 0.3, False),  # deep ITM put
    (100.0, 50.0, 5.0, 0.5, True),
    (100.0, 150.0, 0.02, 1.0, False),  # short, ITM
    (100.0, 200.0, 1.0, 0.3, True),  # deep OTM call
    (100.0, 50.0, 1.0, 0.3, False),  # deep OTM put
    (100.0, 250.0, 10.0, 0.2, True),
    (100.0, 40.0, 10.0, 0.25, False),
    (100.0, 102.0, 1 / 365, 0.2, True),  # one day
    (100.0, 97.0, 1 / 365, 0.4, False),
    (100.0, 98.0, 1 / 365, 0.3, False),
    (100.0, 100.5, 1 / 365, 0.05, True),
    (100.0, 110.0, 30.0, 0.15, True),  # thirty years
    (100.0, 90.0, 30.0, 0.6, False),
    (100.0, 130.0, 0.25, 0.15, True),  # far out of the money: price 5e-4
    (100.0, 100.0, 2.0, 3.0, True),  # very high vol
    (1.0, 1.05, 0.5, 0.12, True),  # a forward of 1 (FX-like scale)
    (5000.0, 4000.0, 0.75, 0.18, False),
]


@pytest.mark.parametrize(("forward", "strike", "t", "sigma", "is_call"), ROUND_TRIPS)
def test_implied_vol_round_trip(forward: float, strike: float, t: float, sigma: float, is_call: bool) -> None:
    discount = 0.97
    price = discount * black_forward(forward, strike, sigma * math.sqrt(t), is_call)
    got = implied_vol(price, forward, strike, t, discount, is_call)
    again = discount * black_forward(forward, strike, got * math.sqrt(t), is_call)
    assert again == pytest.approx(price, rel=1e-10, abs=0)
    # The vol itself, to the solver's price tolerance over vega (plus the price's own rounding).
    undiscounted = price / discount
    vol_tol = 2 * (1e-12 * max(1.0, undiscounted) + 1e-15 * undiscounted) / vega(forward, strike, sigma, t)
    assert got == pytest.approx(sigma, abs=max(vol_tol, 1e-14), rel=0)


def test_implied_vol_round_trip_over_the_grid() -> None:
    """Every grid point whose time value is at least 1e-4 (below that the vol is not
    determined by a double-precision price): price to 1e-10 relative, vol to 1e-12 over vega."""
    checked = 0
    for (k, t, v), is_call in itertools.product(GRID, (True, False)):
        f, d = forward_and_discount(t)
        price = d * black_forward(f, k, v * math.sqrt(t), is_call)
        if price - d * max(f - k if is_call else k - f, 0.0) < 1e-4:
            continue
        got = implied_vol(price, f, k, t, d, is_call)
        again = d * black_forward(f, k, got * math.sqrt(t), is_call)
        assert again == pytest.approx(price, rel=1e-10, abs=0), (k, t, v, is_call)
        u = price / d
        vol_tol = 2 * (1e-12 * max(1.0, u) + 1e-15 * u) / vega(f, k, v, t)
        assert got == pytest.approx(v, abs=max(vol_tol, 1e-14), rel=0), (k, t, v, is_call)
        checked += 1
    assert checked > 300


def test_implied_vol_of_a_tiny_price() -> None:
    """A price of 5e-14 (K = 1.2 F, 5% vol, 3 months): the solver's tolerance is relative,
    so even such a price gives back its vol (an absolute tolerance returned 0.052)."""
    f, k, t, d = 100.0, 120.0, 0.25, 0.97
    price = d * black_forward(f, k, 0.05 * math.sqrt(t), True)
    assert 1e-14 < price < 1e-13
    got = implied_vol(price, f, k, t, d, True)
    again = d * black_forward(f, k, got * math.sqrt(t), True)
    assert abs(again / price - 1) <= 1e-10
    assert abs(got - 0.05) <= 1e-9


@pytest.mark.parametrize(
    ("price_of", "is_call"),
    [
        (lambda f, k, d: d * max(f - k, 0.0), True),  # intrinsic: vol 0, not a positive vol
        (lambda f, k, d: d * max(f - k, 0.0) * 0.999, True),  # below intrinsic
        (lambda f, k, d: d * f, True),  # the upper bound (infinite vol)
        (lambda f, k, d: d * f * 1.01, True),
        (lambda f, k, d: d * max(k - f, 0.0), False),
        (lambda f, k, d: d * k, False),
        (lambda f, k, d: d * k * 2, False),
        (lambda f, k, d: 0.0, True),
        (lambda f, k, d: -1.0, False),
    ],
)
@pytest.mark.parametrize("strike", [80.0, 100.0, 120.0])
def test_prices_outside_the_bounds_have_no_implied_vol(
    price_of: Callable[[float, float, float], float], is_call: bool, strike: float
) -> None:
    f, d = 100.0, 0.95
    price = price_of(f, strike, d)
    with pytest.raises(NoImpliedVolError, match="outside the no-arbitrage bounds"):
        implied_vol(price, f, strike, 1.0, d, is_call)


def test_a_price_that_needs_a_vol_above_ten_has_none() -> None:
    """Inside the bounds but above the price at sigma = 10 (the solver's bracket)."""
    f, k, t = 100.0, 100.0, 0.01
    price = black_forward(f, k, 12.0 * math.sqrt(t), True)
    assert price < f
    with pytest.raises(NoImpliedVolError, match="needs a vol above 10"):
        implied_vol(price, f, k, t, 1.0, True)
    assert issubclass(NoImpliedVolError, ValueError)


@pytest.mark.parametrize(
    ("forward", "strike", "t", "sigma", "is_call", "discount"),
    [
        (100.0, 100.0, 1.0, 0.2, True, 0.97),
        (100.0, 80.0, 0.5, 0.35, False, 0.99),
        (100.0, 130.0, 2.0, 0.25, True, 0.9),
        (50.0, 45.0, 0.1, 0.6, True, 1.0),
        (100.0, 70.0, 5.0, 0.15, False, 0.8),
    ],
)
def test_implied_vol_matches_quantlib(
    forward: float, strike: float, t: float, sigma: float, is_call: bool, discount: float
) -> None:
    """ql.blackFormulaImpliedStdDev (accuracy 1e-14 in price) / sqrt(t) against ours:
    1e-9 in vol (QuantLib's solver stops on its own accuracy, not on ours)."""
    kind = ql.Option.Call if is_call else ql.Option.Put
    price = ql.blackFormula(kind, strike, forward, sigma * math.sqrt(t), discount)
    theirs = ql.blackFormulaImpliedStdDev(kind, strike, forward, price, discount, 0.0, 0.3, 1e-14, 1000) / math.sqrt(t)
    ours = implied_vol(price, forward, strike, t, discount, is_call)
    assert ours == pytest.approx(theirs, abs=1e-9, rel=0)
    assert ours == pytest.approx(sigma, abs=1e-9, rel=0)
