"""Sample market data for the service tests: one underlying with spot, a discount curve,
a dividend curve and a flat-ish vol surface."""

from __future__ import annotations

import copy
from typing import Any

VDT = "2026-11-26T16:00:00Z"
ASOF = "2026-11-26T16:00:05Z"


def snapshot(spot: float = 100.0, vol: float = 0.25, underlying: str = "SPX") -> dict[str, Any]:
    """A valid snapshot body (PUT /v1/marketdata/...)."""
    return copy.deepcopy(
        {
            "spots": {underlying: spot},
            "yield_curves": {
                "USD": {
                    "pillars": [
                        {"years": 0.25, "zero_rate": 0.030},
                        {"years": 1.0, "zero_rate": 0.035},
                        {"years": 5.0, "zero_rate": 0.040},
                    ]
                }
            },
            "discounting": {underlying: "USD"},
            "dividend_curves": {underlying: {"pillars": [{"years": 1.0, "zero_rate": 0.01}]}},
            "vol_surfaces": {
                underlying: {
                    "strike_kind": "moneyness",
                    "expiries_years": [0.25, 1.0, 2.0],
                    "strikes": [0.8, 1.0, 1.2],
                    "vols": [
                        [vol + 0.04, vol, vol + 0.02],
                        [vol + 0.03, vol, vol + 0.015],
                        [vol + 0.02, vol, vol + 0.01],
                    ],
                }
            },
        }
    )


def by_reference(
    cid: str = "r1", strike: float = 100.0, expiry: str = "2027-06-18", underlying: str = "SPX"
) -> dict[str, Any]:
    return {"id": cid, "right": "call", "strike": strike, "underlying": underlying, "expiry": expiry}
