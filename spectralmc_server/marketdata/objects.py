"""Typed market objects and the snapshot that groups them (docs/marketdata.md).

Conventions, stated once and used everywhere:
- Times are year fractions ACT/365F from the snapshot's val_datetime (calendar days
  between the UTC dates / 365).
- Curves are continuously compounded zero rates at pillars. ``linear_zero``
  interpolates the zero rate linearly in time; ``log_linear_discount`` interpolates
  r(t)·t linearly (piecewise-flat forwards). Both extrapolate flat in the zero rate.
- Volatility surfaces are a grid of Black implied vols, expiries (years) x strikes
  (absolute, or moneyness K/F(T) with F the forward from spot and curves). Across
  strike: linear in vol between grid strikes, flat beyond the ends. Across time: linear
  in total variance w = sigma^2 t at the same strike coordinate, flat vol before the
  first and after the last expiry.
- Types are not coerced (as in pricing/schemas.py): a boolean or a string is never a
  number (``true`` and ``"105"`` are refused, naming the field), and dates are RFC 3339
  strings (spectralmc_server/rfc3339.py).
- Arbitrage is reported, not refused: calendar (total variance falling with expiry at
  equal moneyness) and butterfly (undiscounted call prices not convex, or not
  decreasing, in strike), both on the grid.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spectralmc_server.marketdata.black import black_forward
from spectralmc_server.rfc3339 import Date

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# Every number is strict: a JSON number (an integer is taken as a float), never a
# boolean or a string.
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
Rate = Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False, strict=True)]
Years = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False, strict=True)]
Vol = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False, strict=True)]
Finite = Annotated[float, Field(allow_inf_nan=False, strict=True)]

MAX_PILLARS = 500
MAX_GRID = 500
MAX_QUOTES = 20_000
ARB_TOLERANCE = 1e-9  # relative slack before a grid point counts as arbitrage


def year_fraction(val_datetime: datetime, expiry: date) -> float:
    """ACT/365F from the valuation date (the UTC date of an aware val_datetime) to an
    expiry date."""
    day = val_datetime.astimezone(UTC).date() if val_datetime.tzinfo is not None else val_datetime.date()
    return (expiry - day).days / 365.0


def _increasing(values: list[float], what: str) -> None:
    for a, b in itertools.pairwise(values):
        if not b > a:
            raise ValueError(f"{what} must be strictly increasing ({a!r} then {b!r})")


class Pillar(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    years: Years
    zero_rate: Rate  # continuously compounded


class ZeroCurve(BaseModel):
    """A yield curve (discounting) or a continuous dividend-yield curve."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    day_count: Literal["ACT/365F"] = "ACT/365F"
    compounding: Literal["continuous"] = "continuous"
    interpolation: Literal["linear_zero", "log_linear_discount"] = "linear_zero"
    pillars: list[Pillar] = Field(min_length=1, max_length=MAX_PILLARS)

    @model_validator(mode="after")
    def _ordered(self) -> ZeroCurve:
        _increasing([p.years for p in self.pillars], "pillar years")
        return self

    def zero_rate(self, t: float) -> float:
        ts = [p.years for p in self.pillars]
        rs = [p.zero_rate for p in self.pillars]
        if t <= ts[0]:
            return rs[0]
        if t >= ts[-1]:
            return rs[-1]
        i = bisect.bisect_right(ts, t)  # ts[i-1] <= t < ts[i]
        t0, t1, r0, r1 = ts[i - 1], ts[i], rs[i - 1], rs[i]
        u = (t - t0) / (t1 - t0)
        if self.interpolation == "linear_zero":
            return r0 + u * (r1 - r0)
        return (r0 * t0 + u * (r1 * t1 - r0 * t0)) / t  # r(t)*t linear in t

    def discount(self, t: float) -> float:
        return math.exp(-self.zero_rate(t) * t)


class VolSurface(BaseModel):
    """Black implied vols on an expiry x strike grid (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    strike_kind: Literal["strike", "moneyness"] = "strike"
    time_interpolation: Literal["linear_total_variance"] = "linear_total_variance"
    strike_interpolation: Literal["linear_vol"] = "linear_vol"
    extrapolation: Literal["flat"] = "flat"
    expiries_years: list[Years] = Field(min_length=1, max_length=MAX_GRID)
    strikes: list[Positive] = Field(min_length=1, max_length=MAX_GRID)
    vols: list[list[Vol]]  # (expiries, strikes)

    @model_validator(mode="after")
    def _shape(self) -> VolSurface:
        _increasing(self.expiries_years, "expiries_years")
        _increasing(self.strikes, "strikes")
        if len(self.vols) != len(self.expiries_years):
            raise ValueError(f"vols has {len(self.vols)} rows; one per expiry ({len(self.expiries_years)}) is needed")
        for i, row in enumerate(self.vols):
            if len(row) != len(self.strikes):
                raise ValueError(f"vols[{i}] has {len(row)} values; one per strike ({len(self.strikes)}) is needed")
        return self

    def _smile(self, i: int, x: float) -> float:
        """Vol of expiry row ``i`` at strike coordinate ``x`` (linear in vol, flat ends)."""
        ks, row = self.strikes, self.vols[i]
        if x <= ks[0]:
            return row[0]
        if x >= ks[-1]:
            return row[-1]
        j = bisect.bisect_right(ks, x)
        u = (x - ks[j - 1]) / (ks[j] - ks[j - 1])
        return row[j - 1] + u * (row[j] - row[j - 1])

    def coordinate(self, strike: float, forward: float) -> float:
        return strike if self.strike_kind == "strike" else strike / forward

    def vol(self, strike: float, t: float, forward: float) -> float:
        """Implied vol at an absolute strike and expiry ``t`` (years); ``forward`` is F(t)."""
        x = self.coordinate(strike, forward)
        ts = self.expiries_years
        if t <= ts[0]:
            return self._smile(0, x)
        if t >= ts[-1]:
            return self._smile(len(ts) - 1, x)
        i = bisect.bisect_right(ts, t)
        w0 = self._smile(i - 1, x) ** 2 * ts[i - 1]
        w1 = self._smile(i, x) ** 2 * ts[i]
        w = w0 + (t - ts[i - 1]) / (ts[i] - ts[i - 1]) * (w1 - w0)
        return math.sqrt(w / t)

    def arbitrage(self, forward: Callable[[float], float] | None) -> list[dict[str, Any]]:
        """Calendar and butterfly violations on the grid. An absolute-strike surface
        needs ``forward`` (F(t)) to compare expiries at equal moneyness and to price
        calls; without it only a moneyness surface can be checked."""
        if self.strike_kind == "strike" and forward is None:
            return [{"kind": "unchecked", "reason": "no spot and curves for the forward; arbitrage not checked"}]
        fwd = forward or (lambda t: 1.0)
        found: list[dict[str, Any]] = []
        ts = self.expiries_years
        for i in range(1, len(ts)):
            f_prev, f_here = fwd(ts[i - 1]), fwd(ts[i])
            for j, k in enumerate(self.strikes):
                m = k / f_here if self.strike_kind == "strike" else k  # this grid point's moneyness
                x_prev = m * f_prev if self.strike_kind == "strike" else m
                if not self.strikes[0] <= x_prev <= self.strikes[-1]:
                    continue  # no extrapolated comparisons
                w_prev = self._smile(i - 1, x_prev) ** 2 * ts[i - 1]
                w_here = self.vols[i][j] ** 2 * ts[i]
                if w_here < w_prev * (1 - ARB_TOLERANCE):
                    found.append(
                        {
                            "kind": "calendar",
                            "expiry_years": ts[i],
                            "strike": k,
                            "reason": f"total variance {w_here:.6g} is below {w_prev:.6g} at expiry {ts[i - 1]:g}",
                        }
                    )
        for i, t in enumerate(ts):
            f = fwd(t)
            ks = [k * f if self.strike_kind == "moneyness" else k for k in self.strikes]
            calls = [black_forward(f, k, v * math.sqrt(t), True) for k, v in zip(ks, self.vols[i], strict=True)]
            slopes = [(c1 - c0) / (k1 - k0) for c0, c1, k0, k1 in zip(calls, calls[1:], ks, ks[1:], strict=False)]
            for j, s in enumerate(slopes):
                if s > ARB_TOLERANCE or s < -1 - ARB_TOLERANCE:
                    found.append(
                        {
                            "kind": "butterfly",
                            "expiry_years": t,
                            "strike": self.strikes[j + 1],
                            "reason": f"call price slope {s:.6g} outside [-1, 0] (calls must fall with strike)",
                        }
                    )
            for j in range(1, len(slopes)):
                if slopes[j] < slopes[j - 1] - ARB_TOLERANCE * max(1.0, abs(slopes[j - 1])):
                    found.append(
                        {
                            "kind": "butterfly",
                            "expiry_years": t,
                            "strike": self.strikes[j],
                            "reason": "call prices are not convex in strike here (negative butterfly)",
                        }
                    )
        return found


class Fixing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    date: Date
    value: Positive


class OptionQuote(BaseModel):
    """A quoted European option price (the input of an implied-vol ``derive`` job)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    expiry_years: Years
    strike: Positive
    right: Literal["call", "put"]
    price: Positive


class ModelParams(BaseModel):
    """A calibrated parameter set of one process, with how it was fitted if known."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    params: dict[str, Finite] = Field(min_length=1)
    fit: dict[str, Any] | None = None


class MarketSnapshot(BaseModel):
    """Everything one (namespace, val_datetime, data_asof) key names. Immutable once
    stored; its SHA-256 is over :meth:`canonical` bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    spots: dict[Name, Positive] = Field(default_factory=dict)
    fixings: dict[Name, list[Fixing]] = Field(default_factory=dict)
    yield_curves: dict[Name, ZeroCurve] = Field(default_factory=dict)
    discounting: dict[Name, Name] = Field(default_factory=dict)  # underlying -> yield curve name
    dividend_curves: dict[Name, ZeroCurve] = Field(default_factory=dict)  # absent: no dividends
    vol_surfaces: dict[Name, VolSurface] = Field(default_factory=dict)
    option_quotes: dict[Name, Annotated[list[OptionQuote], Field(max_length=MAX_QUOTES)]] = Field(default_factory=dict)
    model_params: dict[Name, dict[Name, ModelParams]] = Field(default_factory=dict)  # underlying -> process ->

    @model_validator(mode="after")
    def _references(self) -> MarketSnapshot:
        for underlying, curve in self.discounting.items():
            if curve not in self.yield_curves:
                raise ValueError(f"discounting.{underlying} names yield curve {curve!r}, which is not in yield_curves")
        return self

    def forward_fn(self, underlying: str) -> Callable[[float], float] | None:
        """F(t) = S exp((r(t) - q(t)) t), or None when spot or discounting is missing."""
        spot = self.spots.get(underlying)
        curve_name = self.discounting.get(underlying)
        if spot is None or curve_name is None:
            return None
        curve = self.yield_curves[curve_name]
        div = self.dividend_curves.get(underlying)

        def forward(t: float) -> float:
            q = div.zero_rate(t) if div is not None else 0.0
            return spot * math.exp((curve.zero_rate(t) - q) * t)

        return forward

    def arbitrage(self) -> list[dict[str, Any]]:
        """Calendar and butterfly reports of every surface, each naming its underlying."""
        out = []
        for name, surface in sorted(self.vol_surfaces.items()):
            for item in surface.arbitrage(self.forward_fn(name)):
                out.append({"underlying": name, **item})
        return out
