"""What a contract by reference (an underlying and an expiry date) takes from a snapshot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime

from spectralmc_server.marketdata.objects import MarketSnapshot, year_fraction


class MissingMarketDataError(LookupError):
    """The snapshot lacks an object the contract needs; the message names it."""


@dataclass(frozen=True)
class MarketInputs:
    spot: float
    expiry_years: float
    rate: float  # continuously compounded zero rate to expiry
    dividend: float  # continuous dividend yield to expiry (0 without a dividend curve)
    params: dict[str, float]  # the process's parameters (GBM: the surface vol)


def contract_inputs(
    snapshot: MarketSnapshot,
    where: str,
    *,
    underlying: str,
    expiry: date,
    strike: float,
    process: str,
    param_names: tuple[str, ...],
    val_datetime: datetime,
) -> MarketInputs:
    """Spot, discount and dividend curves at the expiry and (GBM) the surface vol at the
    strike, or (other processes) the snapshot's parameter set for the underlying.
    ``where`` names the snapshot in messages ("default/2026-11-26T16:00:00Z as of ...")."""
    t = year_fraction(val_datetime, expiry)
    if t <= 0:
        raise MissingMarketDataError(
            f"{underlying} expiry {expiry.isoformat()} is not after the valuation date of {where}"
        )
    spot = snapshot.spots.get(underlying)
    if spot is None:
        raise MissingMarketDataError(f"no spot for {underlying} in {where}")
    curve_name = snapshot.discounting.get(underlying)
    if curve_name is None:
        raise MissingMarketDataError(f"no discount curve for {underlying} in {where} (discounting.{underlying})")
    rate = snapshot.yield_curves[curve_name].zero_rate(t)
    div_curve = snapshot.dividend_curves.get(underlying)
    dividend = div_curve.zero_rate(t) if div_curve is not None else 0.0
    if param_names == ("vol",):
        surface = snapshot.vol_surfaces.get(underlying)
        if surface is None:
            raise MissingMarketDataError(f"no vol surface for {underlying} in {where}")
        forward = spot * math.exp((rate - dividend) * t)
        params = {"vol": surface.vol(strike, t, forward)}
    else:
        sets = snapshot.model_params.get(underlying, {})
        found = sets.get(process)
        if found is None:
            raise MissingMarketDataError(f"no {process} parameters for {underlying} in {where} (model_params)")
        missing = [n for n in param_names if n not in found.params]
        if missing:
            raise MissingMarketDataError(f"{process} parameters for {underlying} in {where} lack {', '.join(missing)}")
        params = {n: found.params[n] for n in param_names}
    return MarketInputs(spot=spot, expiry_years=t, rate=rate, dividend=dividend, params=params)
