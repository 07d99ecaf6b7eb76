"""Implied-vol surfaces from option quotes (marketdata/surfaces.py).

Round trips: quotes priced by Black's formula off a known surface (flat, and skewed
with a term structure) are inverted back to it within 1e-10 in vol, on a strike grid
and on a moneyness grid, with calls and puts mixed. The strikes are within 20% of the
forward and the expiries at least a quarter, where a price solved to 1e-12 relative is
well inside 1e-10 in vol. The grid is the one the derive job stores: sorted expiries x
sorted strikes (or K / F(T) rounded to 8 decimals), the out-of-the-money quote where a
cell has both. A quote without an implied vol is skipped when its cell has the other
right quoted out of the money; when its cell needs it the surface is refused, naming
the quote, as a cell with no quote is refused with the count of the missing ones.
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

import pytest

from spectralmc_server.marketdata.black import black_forward
from spectralmc_server.marketdata.objects import MarketSnapshot, OptionQuote
from spectralmc_server.marketdata.surfaces import MONEYNESS_DECIMALS, implied_vol_surface

VOL_TOL = 1e-10
EXPIRIES = [0.25, 0.5, 1.0, 2.0, 3.0]
STRIKES = [80.0, 90.0, 97.5, 100.0, 102.5, 110.0, 120.0]
MONEYNESS = [0.8, 0.9, 0.975, 1.0, 1.025, 1.1, 1.2]
FLAT = [[0.2] * len(STRIKES) for _ in EXPIRIES]


def skewed(t: float, x: float) -> float:
    """A put skew that flattens with expiry, over a rising term structure."""
    return 0.18 + 0.02 * math.sqrt(t) + 0.25 * (1.0 - x) / math.sqrt(1.0 + t) + 0.1 * (1.0 - x) ** 2


SKEWED_STRIKE = [[skewed(t, k / 100.0) for k in STRIKES] for t in EXPIRIES]
SKEWED_MONEYNESS = [[skewed(t, m) for m in MONEYNESS] for t in EXPIRIES]


def market() -> MarketSnapshot:
    """Spot, a sloped discounting curve and a dividend curve: F(T) differs by expiry."""
    return MarketSnapshot.model_validate(
        {
            "spots": {"SPX": 100.0},
            "yield_curves": {
                "USD": {"pillars": [{"years": 0.5, "zero_rate": 0.03}, {"years": 3.0, "zero_rate": 0.04}]}
            },
            "discounting": {"SPX": "USD"},
            "dividend_curves": {"SPX": {"pillars": [{"years": 1.0, "zero_rate": 0.015}]}},
        }
    )


def price(snap: MarketSnapshot, t: float, k: float, vol: float, right: Literal["call", "put"]) -> OptionQuote:
    """The discounted Black price of one option with the snapshot's forward and discount."""
    forward = snap.forward_fn("SPX")
    assert forward is not None
    discount = snap.yield_curves["USD"].discount(t)
    value = black_forward(forward(t), k, vol * math.sqrt(t), right == "call") * discount
    return OptionQuote(expiry_years=t, strike=k, right=right, price=value)


def right_of(i: int, j: int) -> Literal["call", "put"]:
    """Calls and puts in a checkerboard: in and out of the money both occur."""
    return "call" if (i + j) % 2 == 0 else "put"


def strike_quotes(snap: MarketSnapshot, vols: list[list[float]]) -> list[OptionQuote]:
    return [
        price(snap, t, k, vols[i][j], right_of(i, j)) for i, t in enumerate(EXPIRIES) for j, k in enumerate(STRIKES)
    ]


def moneyness_quotes(snap: MarketSnapshot, vols: list[list[float]]) -> list[OptionQuote]:
    forward = snap.forward_fn("SPX")
    assert forward is not None
    return [
        price(snap, t, m * forward(t), vols[i][j], right_of(i, j))
        for i, t in enumerate(EXPIRIES)
        for j, m in enumerate(MONEYNESS)
    ]


def max_vol_error(got: list[list[float]], want: list[list[float]]) -> float:
    assert len(got) == len(want)
    return max(abs(g - w) for gr, wr in zip(got, want, strict=True) for g, w in zip(gr, wr, strict=True))


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("vols", [FLAT, SKEWED_STRIKE], ids=["flat", "skewed"])
def test_strike_grid_round_trip(vols: list[list[float]]) -> None:
    snap = market()
    surface = implied_vol_surface(snap, "SPX", strike_quotes(snap, vols), "strike")
    assert surface.strike_kind == "strike"
    assert surface.expiries_years == EXPIRIES
    assert surface.strikes == STRIKES
    assert max_vol_error(surface.vols, vols) < VOL_TOL


@pytest.mark.parametrize("vols", [FLAT, SKEWED_MONEYNESS], ids=["flat", "skewed"])
def test_moneyness_grid_round_trip(vols: list[list[float]]) -> None:
    """Strikes at m * F(T): each maps back to its grid point m (K / F rounded)."""
    snap = market()
    surface = implied_vol_surface(snap, "SPX", moneyness_quotes(snap, vols), "moneyness")
    assert surface.strike_kind == "moneyness"
    assert surface.expiries_years == EXPIRIES
    assert surface.strikes == MONEYNESS
    assert max_vol_error(surface.vols, vols) < VOL_TOL


def test_both_rights_invert_to_the_same_vol() -> None:
    """Put-call parity holds in the quotes, so the all-calls and all-puts surfaces agree."""
    snap = market()
    calls = [
        price(snap, t, k, SKEWED_STRIKE[i][j], "call") for i, t in enumerate(EXPIRIES) for j, k in enumerate(STRIKES)
    ]
    puts = [
        price(snap, t, k, SKEWED_STRIKE[i][j], "put") for i, t in enumerate(EXPIRIES) for j, k in enumerate(STRIKES)
    ]
    for quotes in (calls, puts):
        assert max_vol_error(implied_vol_surface(snap, "SPX", quotes, "strike").vols, SKEWED_STRIKE) < VOL_TOL


# -- the grid, as the derive job builds it --------------------------------------------------


def test_grid_is_sorted_whatever_the_quote_order() -> None:
    snap = market()
    quotes = strike_quotes(snap, SKEWED_STRIKE)
    want = implied_vol_surface(snap, "SPX", quotes, "strike")
    rng = random.Random(7)
    for _ in range(5):
        shuffled = quotes[:]
        rng.shuffle(shuffled)
        assert implied_vol_surface(snap, "SPX", shuffled, "strike") == want


def test_moneyness_grid_points_are_rounded() -> None:
    """K / F(T) a little off m (a strike quoted to the cent) still lands on the grid
    point m when it agrees to MONEYNESS_DECIMALS decimals, and on its own point otherwise."""
    snap = market()
    forward = snap.forward_fn("SPX")
    assert forward is not None
    t = 1.0
    f = forward(t)
    near = f * (1.1 + 2e-10)  # rounds to 1.1
    far = f * 1.1000001  # a grid point of its own
    quotes = [price(snap, t, f * 1.1, 0.2, "call"), price(snap, t, near, 0.2, "call")]
    surface = implied_vol_surface(snap, "SPX", quotes, "moneyness")
    assert surface.strikes == [1.1]
    surface = implied_vol_surface(snap, "SPX", [*quotes, price(snap, t, far, 0.2, "call")], "moneyness")
    assert surface.strikes == [1.1, round(far / f, MONEYNESS_DECIMALS)]


@pytest.mark.parametrize("itm_first", [True, False])
def test_a_cell_uses_its_out_of_the_money_quote(itm_first: bool) -> None:
    snap = market()
    forward = snap.forward_fn("SPX")
    assert forward is not None
    quotes = []
    for i, t in enumerate(EXPIRIES):
        for j, k in enumerate(STRIKES):
            otm: Literal["call", "put"] = "call" if k >= forward(t) else "put"
            itm: Literal["call", "put"] = "put" if otm == "call" else "call"
            pair = [price(snap, t, k, SKEWED_STRIKE[i][j] + 0.05, itm), price(snap, t, k, SKEWED_STRIKE[i][j], otm)]
            quotes += pair if itm_first else pair[::-1]
    assert max_vol_error(implied_vol_surface(snap, "SPX", quotes, "strike").vols, SKEWED_STRIKE) < VOL_TOL


# -- quotes without an implied vol -----------------------------------------------------------


def below_intrinsic(snap: MarketSnapshot, t: float, k: float, right: Literal["call", "put"]) -> OptionQuote:
    forward = snap.forward_fn("SPX")
    assert forward is not None
    f = forward(t)
    intrinsic = max(f - k, 0.0) if right == "call" else max(k - f, 0.0)
    assert intrinsic > 1.0
    return OptionQuote(
        expiry_years=t, strike=k, right=right, price=0.5 * intrinsic * snap.yield_curves["USD"].discount(t)
    )


def test_an_in_the_money_quote_without_implied_vol_is_skipped() -> None:
    """Below intrinsic, but its cell has the out-of-the-money quote: never inverted."""
    snap = market()
    quotes = strike_quotes(snap, SKEWED_STRIKE)
    # both cells are quoted by an out-of-the-money option in the grid (right_of)
    bad = [below_intrinsic(snap, 1.0, 120.0, "put"), below_intrinsic(snap, 0.25, 90.0, "call")]
    for ordered in ([*bad, *quotes], [*quotes, *bad]):
        surface = implied_vol_surface(snap, "SPX", ordered, "strike")
        assert max_vol_error(surface.vols, SKEWED_STRIKE) < VOL_TOL


@pytest.mark.parametrize(("right", "t", "k"), [("put", 1.0, 120.0), ("call", 0.25, 80.0)])
def test_a_needed_quote_without_implied_vol_is_named(right: Literal["call", "put"], t: float, k: float) -> None:
    snap = market()
    quotes = [q for q in strike_quotes(snap, SKEWED_STRIKE) if not (q.expiry_years == t and q.strike == k)]
    with pytest.raises(ValueError, match=rf"^quote {right} K={k:g} T={t:g}: price .* no-arbitrage bounds"):
        implied_vol_surface(snap, "SPX", [*quotes, below_intrinsic(snap, t, k, right)], "strike")


def test_missing_cells_are_counted_and_named() -> None:
    snap = market()
    gone = {(1.0, 100.0), (2.0, 80.0)}
    quotes = [q for q in strike_quotes(snap, FLAT) if (q.expiry_years, q.strike) not in gone]
    with pytest.raises(ValueError, match=r"missing 2: T=1 K=100, T=2 K=80$"):
        implied_vol_surface(snap, "SPX", quotes, "strike")


@pytest.mark.parametrize("drop", ["spots", "discounting"])
def test_needs_spot_and_discounting(drop: str) -> None:
    body: dict[str, Any] = market().model_dump()
    del body[drop]
    snap = MarketSnapshot.model_validate(body)
    with pytest.raises(ValueError, match="SPX needs a spot and a discounting curve"):
        implied_vol_surface(snap, "SPX", strike_quotes(market(), FLAT), "strike")
