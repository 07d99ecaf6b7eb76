"""Market objects, QuantLib-style: every case states its tolerance and compares against
values worked out by hand (not by calling the code under test a second way).

Curves: linear zero rates and log-linear discount factors at, between and beyond the
pillars. Surfaces: linear in vol across strike, linear in total variance across time,
flat ends, moneyness via the forward. Arbitrage: a clean surface, a calendar violation,
a butterfly violation, an unchecked absolute-strike surface. Validation messages.
contract_inputs: what a contract by reference takes from a snapshot, and the
MissingMarketDataError messages when something is absent.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from spectralmc_server.marketdata.black import black_forward
from spectralmc_server.marketdata.inputs import MarketInputs, MissingMarketDataError, contract_inputs
from spectralmc_server.marketdata.objects import MarketSnapshot, VolSurface, ZeroCurve, year_fraction

EXACT = 1e-15  # a value read straight off a grid, or one or two float operations away
ARITH = 1e-14  # a few float operations (interpolation weights, products)
ROOT = 1e-13  # after a sqrt/exp of a hand-computed quantity


def curve(interpolation: str, pillars: list[tuple[float, float]]) -> ZeroCurve:
    return ZeroCurve.model_validate(
        {"interpolation": interpolation, "pillars": [{"years": t, "zero_rate": r} for t, r in pillars]}
    )


PILLARS = [(1.0, 0.02), (2.0, 0.03), (5.0, 0.04)]


# --- ZeroCurve ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (1.0, 0.02),  # on the first pillar
        (2.0, 0.03),  # on an interior pillar
        (5.0, 0.04),  # on the last pillar
        (1.5, 0.025),  # halfway between 1y and 2y
        (1.25, 0.0225),  # a quarter of the way
        (3.5, 0.035),  # halfway between 2y and 5y: 0.03 + 1.5/3 * 0.01
        (4.0, 0.03 + 2.0 / 3.0 * 0.01),
        (0.5, 0.02),  # before the first pillar: flat zero rate
        (1e-6, 0.02),
        (10.0, 0.04),  # after the last pillar: flat zero rate
        (80.0, 0.04),
    ],
)
def test_linear_zero_rates(t: float, expected: float) -> None:
    assert curve("linear_zero", PILLARS).zero_rate(t) == pytest.approx(expected, abs=ARITH, rel=0)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (1.0, 0.02),
        (2.0, 0.03),
        (5.0, 0.04),
        # r(t)·t is linear between pillars: 0.02 at 1y, 0.06 at 2y, 0.20 at 5y.
        (1.5, 0.04 / 1.5),  # r·t = 0.04
        (1.25, 0.03 / 1.25),  # r·t = 0.02 + 0.25 * 0.04
        (3.5, 0.13 / 3.5),  # r·t = 0.06 + 0.5 * 0.14
        (4.0, (0.06 + 2.0 / 3.0 * 0.14) / 4.0),
        (0.5, 0.02),  # flat zero rate before the first pillar
        (10.0, 0.04),  # and after the last
    ],
)
def test_log_linear_discount_rates(t: float, expected: float) -> None:
    assert curve("log_linear_discount", PILLARS).zero_rate(t) == pytest.approx(expected, abs=ARITH, rel=0)


def test_the_two_interpolations_differ_between_pillars_only() -> None:
    """Same pillars, same ends; between pillars linear-zero gives 0.025 at 1.5y and
    log-linear-discount 0.02667 (they must not silently be the same scheme)."""
    lin, loglin = curve("linear_zero", PILLARS), curve("log_linear_discount", PILLARS)
    for t in (0.3, 1.0, 2.0, 5.0, 7.0):
        assert lin.zero_rate(t) == pytest.approx(loglin.zero_rate(t), abs=EXACT, rel=0)
    assert abs(lin.zero_rate(1.5) - loglin.zero_rate(1.5)) > 1e-3


@pytest.mark.parametrize(
    ("interpolation", "t", "expected"),
    [
        ("linear_zero", 1.5, math.exp(-0.025 * 1.5)),
        ("linear_zero", 3.5, math.exp(-0.035 * 3.5)),
        ("linear_zero", 0.5, math.exp(-0.02 * 0.5)),  # flat zero before: exp(-r0 t), not 1 or exp(-r0)
        ("linear_zero", 10.0, math.exp(-0.4)),
        ("log_linear_discount", 1.5, math.exp(-0.04)),
        ("log_linear_discount", 3.5, math.exp(-0.13)),
        ("log_linear_discount", 2.0, math.exp(-0.06)),
        ("log_linear_discount", 0.5, math.exp(-0.01)),
        ("log_linear_discount", 10.0, math.exp(-0.4)),
    ],
)
def test_discount_factors(interpolation: str, t: float, expected: float) -> None:
    assert curve(interpolation, PILLARS).discount(t) == pytest.approx(expected, rel=ROOT, abs=0)


def test_log_linear_discount_has_piecewise_flat_forwards() -> None:
    """The instantaneous forward between pillars is constant: 0.04 on (1y, 2y) and
    0.14/3 on (2y, 5y); tolerance 1e-12 (ratio of discount factors, then a log)."""
    c = curve("log_linear_discount", PILLARS)

    def fwd(t0: float, t1: float) -> float:
        return -math.log(c.discount(t1) / c.discount(t0)) / (t1 - t0)

    for t0, t1 in [(1.0, 1.2), (1.3, 1.9), (1.1, 2.0)]:
        assert fwd(t0, t1) == pytest.approx(0.04, abs=1e-12, rel=0)
    for t0, t1 in [(2.0, 2.5), (3.1, 4.9)]:
        assert fwd(t0, t1) == pytest.approx(0.14 / 3.0, abs=1e-12, rel=0)


def test_single_pillar_curve_is_flat() -> None:
    c = curve("log_linear_discount", [(1.0, 0.01)])
    for t in (0.01, 1.0, 30.0):
        assert c.zero_rate(t) == 0.01
        assert c.discount(t) == pytest.approx(math.exp(-0.01 * t), rel=ROOT, abs=0)


# --- VolSurface --------------------------------------------------------------------------

# Expiries 0.5y and 2y, strikes 90/100/110.
STRIKE_SURFACE: dict[str, Any] = {
    "strike_kind": "strike",
    "expiries_years": [0.5, 2.0],
    "strikes": [90.0, 100.0, 110.0],
    "vols": [[0.30, 0.25, 0.22], [0.26, 0.24, 0.23]],
}


def surface(body: dict[str, Any]) -> VolSurface:
    return VolSurface.model_validate(body)


@pytest.mark.parametrize(
    ("strike", "t", "expected"),
    [
        (k, t, v)
        for t, row in zip([0.5, 2.0], STRIKE_SURFACE["vols"], strict=True)
        for k, v in zip([90, 100, 110], row, strict=True)
    ],
)
def test_surface_at_grid_points_is_exact(strike: float, t: float, expected: float) -> None:
    """Tolerance 1e-15: sqrt(sigma^2 t / t) may differ from sigma in the last bit."""
    assert surface(STRIKE_SURFACE).vol(strike, t, forward=100.0) == pytest.approx(expected, abs=EXACT, rel=0)


@pytest.mark.parametrize(
    ("strike", "expected"),
    [
        (95.0, 0.275),  # halfway 90-100: (0.30 + 0.25) / 2
        (92.5, 0.2875),
        (104.0, 0.25 - 0.4 * 0.03),  # 0.238
        (109.0, 0.25 - 0.9 * 0.03),
        (80.0, 0.30),  # flat below the first strike
        (1.0, 0.30),
        (110.0 + 1e-9, 0.22),  # flat above the last strike
        (500.0, 0.22),
    ],
)
def test_surface_is_linear_in_vol_across_strike_with_flat_ends(strike: float, expected: float) -> None:
    """On the first expiry row (t = 0.5); tolerance 1e-14."""
    assert surface(STRIKE_SURFACE).vol(strike, 0.5, forward=100.0) == pytest.approx(expected, abs=ARITH, rel=0)


@pytest.mark.parametrize(
    ("strike", "t", "w_expected"),
    [
        # K = 100: w(0.5) = 0.25^2 * 0.5 = 0.03125, w(2) = 0.24^2 * 2 = 0.1152.
        (100.0, 1.25, 0.03125 + 0.5 * (0.1152 - 0.03125)),  # 0.073225
        (100.0, 0.8, 0.03125 + 0.2 * (0.1152 - 0.03125)),
        (100.0, 1.9, 0.03125 + (1.4 / 1.5) * (0.1152 - 0.03125)),
        # K = 95 (between strikes too): smile 0.275 at 0.5y, 0.25 at 2y.
        (95.0, 1.25, 0.275**2 * 0.5 + 0.5 * (0.25**2 * 2.0 - 0.275**2 * 0.5)),  # 0.08140625
        # K = 120 (flat beyond the last strike in each row): 0.22 and 0.23.
        (120.0, 1.25, 0.22**2 * 0.5 + 0.5 * (0.23**2 * 2.0 - 0.22**2 * 0.5)),
    ],
)
def test_surface_is_linear_in_total_variance_across_time(strike: float, t: float, w_expected: float) -> None:
    """sigma(t) = sqrt(w(t) / t) with w linear in t between the expiries; tolerance 1e-13.
    At K=100, t=1.25 that is 0.242033..., not the 0.245 linear-in-vol would give."""
    got = surface(STRIKE_SURFACE).vol(strike, t, forward=100.0)
    assert got == pytest.approx(math.sqrt(w_expected / t), abs=ROOT, rel=0)
    assert got * got * t == pytest.approx(w_expected, abs=ROOT, rel=0)


def test_time_interpolation_is_not_linear_in_vol() -> None:
    got = surface(STRIKE_SURFACE).vol(100.0, 1.25, forward=100.0)
    assert got == pytest.approx(0.24203305559365233, abs=ROOT, rel=0)  # sqrt(0.073225 / 1.25)
    assert abs(got - 0.245) > 1e-3


@pytest.mark.parametrize(
    ("strike", "t", "expected"),
    [
        (100.0, 0.1, 0.25),  # before the first expiry: flat vol (not flat total variance)
        (100.0, 1e-4, 0.25),
        (95.0, 0.1, 0.275),  # ... still linear in strike
        (80.0, 0.1, 0.30),  # both ends flat
        (100.0, 5.0, 0.24),  # after the last expiry: flat vol
        (105.0, 30.0, 0.235),
        (200.0, 30.0, 0.23),
        (50.0, 30.0, 0.26),
    ],
)
def test_surface_extrapolates_flat_vol_in_time(strike: float, t: float, expected: float) -> None:
    assert surface(STRIKE_SURFACE).vol(strike, t, forward=100.0) == pytest.approx(expected, abs=ARITH, rel=0)


def test_absolute_strike_surface_ignores_the_forward() -> None:
    s = surface(STRIKE_SURFACE)
    assert s.vol(95.0, 0.5, forward=100.0) == s.vol(95.0, 0.5, forward=137.0)


MONEYNESS_SURFACE: dict[str, Any] = {
    "strike_kind": "moneyness",
    "expiries_years": [0.5, 2.0],
    "strikes": [0.9, 1.0, 1.1],
    "vols": [[0.30, 0.25, 0.22], [0.26, 0.24, 0.23]],
}


@pytest.mark.parametrize(
    ("strike", "forward", "t", "expected"),
    [
        (110.0, 110.0, 0.5, 0.25),  # K/F = 1
        (99.0, 110.0, 0.5, 0.30),  # K/F = 0.9
        (121.0, 110.0, 2.0, 0.23),  # K/F = 1.1
        (104.5, 110.0, 0.5, 0.275),  # K/F = 0.95
        (100.0, 80.0, 0.5, 0.22),  # K/F = 1.25: flat beyond 1.1
        (100.0, 100.0, 0.5, 0.25),  # same strike, other forward: other vol
        (110.0, 110.0, 1.25, math.sqrt((0.03125 + 0.5 * (0.1152 - 0.03125)) / 1.25)),
    ],
)
def test_moneyness_surface_uses_the_forward(strike: float, forward: float, t: float, expected: float) -> None:
    """Tolerance 1e-13 (K/F is one division, then the same interpolation)."""
    assert surface(MONEYNESS_SURFACE).vol(strike, t, forward) == pytest.approx(expected, abs=ROOT, rel=0)


# --- arbitrage ---------------------------------------------------------------------------

CLEAN: dict[str, Any] = {
    "strike_kind": "moneyness",
    "expiries_years": [0.25, 1.0, 2.0],
    "strikes": [0.8, 1.0, 1.2],
    "vols": [[0.29, 0.25, 0.27], [0.28, 0.25, 0.265], [0.27, 0.25, 0.26]],
}


def test_clean_surface_reports_nothing() -> None:
    assert surface(CLEAN).arbitrage(None) == []
    assert surface(CLEAN).arbitrage(lambda t: 100.0 * math.exp(0.03 * t)) == []
    absolute = {**STRIKE_SURFACE}
    assert surface(absolute).arbitrage(lambda t: 100.0) == []


def test_falling_total_variance_is_a_calendar_violation_at_that_point() -> None:
    """Moneyness surface; at K/F = 1 the total variance falls from 0.2^2 * 0.5 = 0.02 to
    0.13^2 * 1 = 0.0169 (the wings rise, so only that one grid point is reported)."""
    s = surface(
        {
            "strike_kind": "moneyness",
            "expiries_years": [0.5, 1.0, 2.0],
            "strikes": [0.9, 1.0, 1.1],
            "vols": [[0.2, 0.2, 0.2], [0.21, 0.13, 0.21], [0.2, 0.2, 0.2]],
        }
    )
    calendar = [a for a in s.arbitrage(None) if a["kind"] == "calendar"]
    assert len(calendar) == 1, calendar
    assert calendar[0]["expiry_years"] == 1.0
    assert calendar[0]["strike"] == 1.0
    assert "0.0169" in calendar[0]["reason"] and "0.02" in calendar[0]["reason"]
    assert "expiry 0.5" in calendar[0]["reason"]


def test_calendar_compares_absolute_strikes_at_equal_moneyness() -> None:
    """Absolute strikes, F(1) = 100, F(2) = 110. The 2y point K=110 (K/F = 1) has
    w = 0.17^2 * 2 = 0.0578, below the 1y w at K=100 (K/F = 1): 0.25^2 = 0.0625.
    At equal *strike* (1y, K=110: 0.2^2 = 0.04) there would be nothing to report.
    K=120 at 2y (K/F = 1.0909) compares with the 1y smile at 109.09: 0.2045, w = 0.0418 <
    0.0578 (fine); K=90 at 2y (K/F = 0.818) falls outside the 1y grid and is skipped."""
    s = surface(
        {
            "strike_kind": "strike",
            "expiries_years": [1.0, 2.0],
            "strikes": [90.0, 100.0, 110.0, 120.0],
            "vols": [[0.30, 0.25, 0.20, 0.20], [0.30, 0.25, 0.17, 0.17]],
        }
    )
    forwards = {1.0: 100.0, 2.0: 110.0}
    calendar = [a for a in s.arbitrage(lambda t: forwards[t]) if a["kind"] == "calendar"]
    assert [(a["expiry_years"], a["strike"]) for a in calendar] == [(2.0, 110.0)]
    assert "0.0578" in calendar[0]["reason"] and "0.0625" in calendar[0]["reason"]
    # With a flat forward the same grid compares equal strikes: 0.0578 > 0.04, no report.
    assert [a for a in s.arbitrage(lambda t: 100.0) if a["kind"] == "calendar"] == []


def test_vol_spike_in_the_middle_strike_is_a_butterfly_violation() -> None:
    """F = 100, t = 1, strikes 90/100/110 at 20%/25%/20%: calls 13.589, 9.948, 4.292, so
    the slopes are -0.364 then -0.566: not convex at K=100. At 22% in the middle the calls
    (13.589, 8.759, 4.292) are convex and nothing is reported."""
    spiky = surface({"expiries_years": [1.0], "strikes": [90.0, 100.0, 110.0], "vols": [[0.2, 0.25, 0.2]]})
    calls = [black_forward(100.0, k, v, True) for k, v in [(90.0, 0.2), (100.0, 0.25), (110.0, 0.2)]]
    assert (calls[1] - calls[0]) / 10 > (calls[2] - calls[1]) / 10  # the premise: hand-checked non-convexity
    found = spiky.arbitrage(lambda t: 100.0)
    assert len(found) == 1, found
    assert found[0]["kind"] == "butterfly"
    assert (found[0]["expiry_years"], found[0]["strike"]) == (1.0, 100.0)
    assert "convex" in found[0]["reason"]

    mild = surface({"expiries_years": [1.0], "strikes": [90.0, 100.0, 110.0], "vols": [[0.2, 0.22, 0.2]]})
    assert mild.arbitrage(lambda t: 100.0) == []


def test_call_prices_rising_with_strike_are_a_butterfly_violation() -> None:
    """A bigger spike (35%) makes C(100) = 13.892 > C(90) = 13.589: slope +0.0303 > 0."""
    s = surface({"expiries_years": [1.0], "strikes": [90.0, 100.0, 110.0], "vols": [[0.2, 0.35, 0.2]]})
    found = s.arbitrage(lambda t: 100.0)
    slope = [a for a in found if "slope" in a["reason"]]
    assert [(a["kind"], a["strike"]) for a in slope] == [("butterfly", 100.0)]
    assert "0.0302929" in slope[0]["reason"]


def test_butterfly_on_a_moneyness_surface_prices_at_k_times_f() -> None:
    """Moneyness 0.9/1.0/1.1 at F = 100 are strikes 90/100/110: the same spike as above."""
    s = surface(
        {"strike_kind": "moneyness", "expiries_years": [1.0], "strikes": [0.9, 1.0, 1.1], "vols": [[0.2, 0.25, 0.2]]}
    )
    found = s.arbitrage(lambda t: 100.0)
    assert [(a["kind"], a["expiry_years"], a["strike"]) for a in found] == [("butterfly", 1.0, 1.0)]


def test_absolute_strike_surface_without_a_forward_is_unchecked() -> None:
    spiky = surface({"expiries_years": [1.0], "strikes": [90.0, 100.0, 110.0], "vols": [[0.2, 0.25, 0.2]]})
    found = spiky.arbitrage(None)
    assert len(found) == 1
    assert found[0]["kind"] == "unchecked"
    assert "not checked" in found[0]["reason"]


def snapshot_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "spots": {"SPX": 100.0},
        "yield_curves": {"USD": {"pillars": [{"years": 0.25, "zero_rate": 0.03}, {"years": 1.0, "zero_rate": 0.035}]}},
        "discounting": {"SPX": "USD"},
        "dividend_curves": {
            "SPX": {"pillars": [{"years": 0.25, "zero_rate": 0.005}, {"years": 1.0, "zero_rate": 0.01}]}
        },
        "vol_surfaces": {
            "SPX": {
                "strike_kind": "moneyness",
                "expiries_years": [0.25, 1.0, 2.0],
                "strikes": [0.8, 1.0, 1.2],
                "vols": [[0.29, 0.25, 0.27], [0.28, 0.25, 0.265], [0.27, 0.25, 0.26]],
            }
        },
    }
    body.update(overrides)
    return body


def test_snapshot_arbitrage_names_the_underlying_and_uses_its_forward() -> None:
    spiky = {"expiries_years": [1.0], "strikes": [90.0, 100.0, 110.0], "vols": [[0.2, 0.25, 0.2]]}
    # SPX has spot and curves (F(1) = 100 e^{0.035 - 0.01} = 102.53): checked, and the spike
    # at 100 is still not convex; NDX has no spot: unchecked.
    snap = MarketSnapshot.model_validate(snapshot_body(vol_surfaces={"SPX": spiky, "NDX": spiky}))
    found = snap.arbitrage()
    assert [a["underlying"] for a in found] == ["NDX", "SPX"]
    assert found[0]["kind"] == "unchecked"
    assert (found[1]["kind"], found[1]["strike"]) == ("butterfly", 100.0)
    assert MarketSnapshot.model_validate(snapshot_body()).arbitrage() == []


def test_forward_fn() -> None:
    """F(t) = S exp((r(t) - q(t)) t); tolerance 1e-13 relative."""
    snap = MarketSnapshot.model_validate(snapshot_body())
    fwd = snap.forward_fn("SPX")
    assert fwd is not None
    r = 0.03 + (0.5 - 0.25) / 0.75 * 0.005
    q = 0.005 + (0.5 - 0.25) / 0.75 * 0.005
    assert fwd(0.5) == pytest.approx(100.0 * math.exp((r - q) * 0.5), rel=ROOT, abs=0)
    assert fwd(3.0) == pytest.approx(100.0 * math.exp((0.035 - 0.01) * 3.0), rel=ROOT, abs=0)
    no_div = MarketSnapshot.model_validate(snapshot_body(dividend_curves={})).forward_fn("SPX")
    assert no_div is not None
    assert no_div(3.0) == pytest.approx(100.0 * math.exp(0.035 * 3.0), rel=ROOT, abs=0)
    assert snap.forward_fn("NDX") is None  # no spot
    assert MarketSnapshot.model_validate(snapshot_body(discounting={})).forward_fn("SPX") is None


# --- validation --------------------------------------------------------------------------


def messages(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.value.errors())


def test_unsorted_pillars_are_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        curve("linear_zero", [(2.0, 0.03), (1.0, 0.02)])
    assert "pillar years must be strictly increasing (2.0 then 1.0)" in messages(exc)
    with pytest.raises(ValidationError) as exc:
        curve("linear_zero", [(1.0, 0.03), (1.0, 0.02)])  # equal is not increasing
    assert "strictly increasing" in messages(exc)


def test_unsorted_surface_axes_are_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        surface({**STRIKE_SURFACE, "expiries_years": [2.0, 0.5]})
    assert "expiries_years must be strictly increasing" in messages(exc)
    with pytest.raises(ValidationError) as exc:
        surface({**STRIKE_SURFACE, "strikes": [90.0, 110.0, 100.0]})
    assert "strikes must be strictly increasing (110.0 then 100.0)" in messages(exc)


def test_wrong_vol_grid_shape_is_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        surface({**STRIKE_SURFACE, "vols": [[0.3, 0.25, 0.22]]})
    assert "vols has 1 rows; one per expiry (2) is needed" in messages(exc)
    with pytest.raises(ValidationError) as exc:
        surface({**STRIKE_SURFACE, "vols": [[0.3, 0.25, 0.22], [0.26, 0.24]]})
    assert "vols[1] has 2 values; one per strike (3) is needed" in messages(exc)


@pytest.mark.parametrize("bad", [-0.2, 0.0, 11.0, float("nan")])
def test_out_of_range_vols_are_refused(bad: float) -> None:
    with pytest.raises(ValidationError) as exc:
        surface({**STRIKE_SURFACE, "vols": [[0.3, bad, 0.22], [0.26, 0.24, 0.23]]})
    errors = exc.value.errors()
    assert [e["loc"] for e in errors] == [("vols", 0, 1)], messages(exc)


def test_discounting_to_a_missing_curve_is_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        MarketSnapshot.model_validate(snapshot_body(discounting={"SPX": "EUR"}))
    assert "discounting.SPX names yield curve 'EUR', which is not in yield_curves" in messages(exc)


def test_bad_names_and_extra_fields_are_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        MarketSnapshot.model_validate(snapshot_body(spots={"bad name": 1.0}))
    assert "spots.bad name" in messages(exc)
    with pytest.raises(ValidationError) as exc:
        MarketSnapshot.model_validate(snapshot_body(vol_surface={}))
    assert "vol_surface: Extra inputs are not permitted" in messages(exc)


# --- year_fraction -----------------------------------------------------------------------


def test_year_fraction_is_act_365f_on_calendar_days() -> None:
    vdt = datetime(2026, 11, 26, 16, 0, tzinfo=UTC)
    # Nov 26 -> Jun 18: 4 + 31 + 31 + 28 + 31 + 30 + 31 + 18 = 204 days.
    assert year_fraction(vdt, date(2027, 6, 18)) == 204 / 365
    assert year_fraction(vdt, date(2027, 11, 26)) == 1.0
    assert year_fraction(vdt, date(2028, 11, 26)) == 731 / 365  # 29 Feb 2028 in between: ACT, not 2.0
    assert year_fraction(vdt.replace(hour=23, minute=59), date(2026, 11, 27)) == 1 / 365  # the time is ignored
    assert year_fraction(vdt, date(2026, 11, 26)) == 0.0


def test_year_fraction_counts_from_the_utc_date() -> None:
    """2026-11-26T23:00-05:00 is 2026-11-27T04:00Z: four UTC calendar days to Dec 1."""
    new_york = timezone(timedelta(hours=-5))
    assert year_fraction(datetime(2026, 11, 26, 23, 0, tzinfo=new_york), date(2026, 12, 1)) == 4 / 365


# --- contract_inputs ---------------------------------------------------------------------

VDT = datetime(2026, 11, 26, 16, 0, tzinfo=UTC)
EXPIRY = date(2027, 6, 18)
T = 204 / 365
WHERE = "default/2026-11-26T16:00:00Z as of 2026-11-26T16:00:05Z"


def inputs(snap: MarketSnapshot, strike: float = 100.0, expiry: date = EXPIRY, underlying: str = "SPX") -> MarketInputs:
    return contract_inputs(
        snap,
        WHERE,
        underlying=underlying,
        expiry=expiry,
        strike=strike,
        process="gbm",
        param_names=("vol",),
        val_datetime=VDT,
    )


def expected_vol(moneyness: float) -> float:
    """The SPX surface by hand at t = 204/365 (between the 0.25y and 1y rows)."""

    def smile(row: list[float]) -> float:
        ks = [0.8, 1.0, 1.2]
        if moneyness <= ks[0]:
            return row[0]
        if moneyness >= ks[-1]:
            return row[-1]
        j = 1 if moneyness < 1.0 else 2
        u = (moneyness - ks[j - 1]) / 0.2
        return row[j - 1] + u * (row[j] - row[j - 1])

    w0 = smile([0.29, 0.25, 0.27]) ** 2 * 0.25
    w1 = smile([0.28, 0.25, 0.265]) ** 2 * 1.0
    return math.sqrt((w0 + (T - 0.25) / 0.75 * (w1 - w0)) / T)


@pytest.mark.parametrize("strike", [80.0, 95.0, 100.0, 110.0, 130.0])
def test_contract_inputs_from_a_snapshot(strike: float) -> None:
    """Tolerances: the expiry exactly (204/365), rates 1e-15, the vol 1e-13."""
    got = inputs(MarketSnapshot.model_validate(snapshot_body()), strike)
    r = 0.03 + (T - 0.25) / 0.75 * 0.005  # linear zero between 0.25y (3%) and 1y (3.5%)
    assert got.spot == 100.0
    assert got.expiry_years == T
    assert got.rate == pytest.approx(r, abs=EXACT, rel=0)
    q = 0.005 + (T - 0.25) / 0.75 * 0.005  # linear zero between 0.25y (0.5%) and 1y (1%)
    assert got.dividend == pytest.approx(q, abs=EXACT, rel=0)
    forward = 100.0 * math.exp((r - q) * T)
    assert got.params == {"vol": pytest.approx(expected_vol(strike / forward), abs=ROOT, rel=0)}


def test_contract_inputs_moneyness_uses_the_forward_not_the_spot() -> None:
    """At K = S the moneyness is S/F = exp(-(r - q) T) = 0.986..., not 1.0 (which would give 0.25)."""
    got = inputs(MarketSnapshot.model_validate(snapshot_body()), 100.0)
    r = 0.03 + (T - 0.25) / 0.75 * 0.005
    q = 0.005 + (T - 0.25) / 0.75 * 0.005
    m = math.exp(-(r - q) * T)
    assert got.params["vol"] == pytest.approx(expected_vol(m), abs=ROOT, rel=0)
    assert abs(got.params["vol"] - expected_vol(1.0)) > 1e-5


def test_contract_inputs_without_a_dividend_curve_has_zero_dividend() -> None:
    got = inputs(MarketSnapshot.model_validate(snapshot_body(dividend_curves={})), 100.0)
    assert got.dividend == 0.0
    r = 0.03 + (T - 0.25) / 0.75 * 0.005
    assert got.params["vol"] == pytest.approx(expected_vol(100.0 / (100.0 * math.exp(r * T))), abs=ROOT, rel=0)


def test_contract_inputs_for_another_process_take_its_parameter_set() -> None:
    snap = MarketSnapshot.model_validate(
        snapshot_body(model_params={"SPX": {"heston": {"params": {"kappa": 2.0, "theta": 0.04, "extra": 1.0}}}})
    )
    got = contract_inputs(
        snap,
        WHERE,
        underlying="SPX",
        expiry=EXPIRY,
        strike=100.0,
        process="heston",
        param_names=("kappa", "theta"),
        val_datetime=VDT,
    )
    assert got.params == {"kappa": 2.0, "theta": 0.04}
    with pytest.raises(MissingMarketDataError, match=r"heston parameters for SPX in .* lack v0, rho"):
        contract_inputs(
            snap,
            WHERE,
            underlying="SPX",
            expiry=EXPIRY,
            strike=100.0,
            process="heston",
            param_names=("kappa", "v0", "rho"),
            val_datetime=VDT,
        )


@pytest.mark.parametrize(
    ("overrides", "what"),
    [
        ({"spots": {"NDX": 15000.0}}, "no spot for SPX"),
        ({"discounting": {}}, "no discount curve for SPX"),
        ({"vol_surfaces": {}}, "no vol surface for SPX"),
    ],
)
def test_missing_objects_raise_naming_underlying_and_snapshot(overrides: dict[str, Any], what: str) -> None:
    snap = MarketSnapshot.model_validate(snapshot_body(**overrides))
    with pytest.raises(MissingMarketDataError) as exc:
        inputs(snap)
    assert what in str(exc.value)
    assert "SPX" in str(exc.value) and WHERE in str(exc.value)


@pytest.mark.parametrize("expiry", [date(2026, 11, 26), date(2026, 11, 25), date(2020, 1, 1)])
def test_expired_contract_is_refused(expiry: date) -> None:
    with pytest.raises(MissingMarketDataError) as exc:
        inputs(MarketSnapshot.model_validate(snapshot_body()), expiry=expiry)
    assert expiry.isoformat() in str(exc.value) and "2026-11-26" in str(exc.value)


def test_expired_contract_message_names_underlying_and_snapshot() -> None:
    with pytest.raises(MissingMarketDataError) as exc:
        inputs(MarketSnapshot.model_validate(snapshot_body()), expiry=date(2026, 11, 25))
    assert "SPX" in str(exc.value) and WHERE in str(exc.value)
