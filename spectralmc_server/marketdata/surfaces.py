"""Implied-volatility surfaces from option quotes (the ``implied_vol_surface`` derive job).

Each quote is inverted to its Black vol (marketdata/black.py) with the snapshot's
forward and discount factor, and the vols are gridded by expiry x strike (or x
moneyness K / F(T)) into a :class:`~.objects.VolSurface`. Plain ``math`` on small
inputs, like black.py: no torch.
"""

from __future__ import annotations

from typing import Literal

from spectralmc_server.marketdata.black import NoImpliedVolError, implied_vol
from spectralmc_server.marketdata.objects import MarketSnapshot, OptionQuote, VolSurface

MONEYNESS_DECIMALS = 8  # moneyness grid points: K / F(T) rounded, so m * F(T) maps back to m


def implied_vol_surface(
    snapshot: MarketSnapshot, underlying: str, quotes: list[OptionQuote], strike_kind: Literal["strike", "moneyness"]
) -> VolSurface:
    """Black vols of ``quotes`` on their expiry x strike grid. Every grid cell needs a
    quote: a call or a put; where both are quoted the out-of-the-money one is used (so
    the answer does not depend on the quotes' order). Moneyness grid points are K / F(T)
    rounded to 8 decimals. A ``ValueError`` names what is missing: the spot or curve, a
    grid cell without a quote, or the quote a cell uses when it has no implied vol."""
    forward_fn = snapshot.forward_fn(underlying)
    curve_name = snapshot.discounting.get(underlying)
    if forward_fn is None or curve_name is None:
        raise ValueError(f"{underlying} needs a spot and a discounting curve to imply vols")
    curve = snapshot.yield_curves[curve_name]
    chosen: dict[tuple[float, float], tuple[bool, OptionQuote]] = {}  # cell -> (out of the money, quote)
    for q in quotes:
        f = forward_fn(q.expiry_years)
        otm = (q.right == "call") == (q.strike >= f)
        x = q.strike if strike_kind == "strike" else round(q.strike / f, MONEYNESS_DECIMALS)
        key = (q.expiry_years, x)
        held = chosen.get(key)
        if held is None or (otm and not held[0]):
            chosen[key] = (otm, q)
    expiries = sorted({t for t, _ in chosen})
    strikes = sorted({x for _, x in chosen})
    missing = [(t, x) for t in expiries for x in strikes if (t, x) not in chosen]
    if missing:
        shown = ", ".join(f"T={t:.10g} K={x:.10g}" for t, x in missing[:5])
        raise ValueError(f"the quotes do not fill the expiry x strike grid; missing {len(missing)}: {shown}")
    vols: dict[tuple[float, float], float] = {}
    for key, (_, q) in sorted(chosen.items()):
        t = q.expiry_years
        try:
            vols[key] = implied_vol(q.price, forward_fn(t), q.strike, t, curve.discount(t), q.right == "call")
        except NoImpliedVolError as exc:
            raise ValueError(f"quote {q.right} K={q.strike:g} T={t:g}: {exc}") from None
    return VolSurface(
        strike_kind=strike_kind,
        expiries_years=expiries,
        strikes=strikes,
        vols=[[vols[(t, x)] for x in strikes] for t in expiries],
    )
