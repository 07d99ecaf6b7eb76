"""What the server refuses after the schema and before pricing (valuation.check_request),
over HTTP: higher moments past the quadrature's spread, and more simulated-reference
points than a request may send; and what it answers instead of refusing (gbm's moments
from the closed forms). Each refusal is a 422 naming the contract and nothing is priced.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from server_util import MakeClient, assert_error

from spectralmc_server.pricing.valuation import MAX_SIMULATED_REFERENCE_POINTS

SPOT = 100.0
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}


async def test_higher_moments_past_the_quadrature_spread_are_refused_for_cos_processes(
    make_client: MakeClient,
) -> None:
    client = await make_client(models=["gbm", "heston"])
    ok = {"id": "ok", "right": "call", "strike": SPOT, "spot": SPOT, "expiry_years": 1.0, "process": "heston"}
    # v0 = theta = 0.5 over 3 years: a spread of sqrt(1.5) = 1.22 > 1
    wide = {**ok, "id": "wide", "expiry_years": 3.0, "params": {**HESTON, "v0": 0.5, "theta": 0.5}}
    body = {"measures": ["price", "kurtosis"], "contracts": [{**ok, "params": HESTON}, wide]}
    err = await assert_error(await client.post("/v1/price", json=body), 422, "invalid", ("contracts[1]",))
    assert "spread" in err["details"][0]["reason"], err
    # the price alone is answered (the bound is on the moments)
    r = await client.post("/v1/price", json={**body, "measures": ["price"]})
    assert r.status == 200, await r.text()


async def test_gbm_moments_past_the_quadrature_spread_come_from_the_closed_form(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    c = {"id": "c", "right": "call", "strike": SPOT, "spot": SPOT, "expiry_years": 3.0, "vol": 1.0}
    r = await client.post("/v1/price", json={"measures": ["kurtosis"], "contracts": [c]})
    assert r.status == 200, await r.text()
    [row] = orjson.loads(await r.read())["results"]
    assert row["method"] == "reference"
    v = 3.0  # vol^2 T
    want = math.expm1(4 * v) + 2 * math.expm1(3 * v) + 3 * math.expm1(2 * v)
    assert abs(row["kurtosis"] / want - 1) < 1e-12


async def test_more_simulated_reference_points_than_allowed_are_refused(make_client: MakeClient) -> None:
    client = await make_client(models=["asian"])

    def asian(i: int) -> dict[str, Any]:  # vol 1.5: outside the model's domain, each point distinct
        return {
            "id": f"a{i}",
            "right": "call",
            "strike": SPOT,
            "spot": SPOT,
            "expiry_years": 0.5 + 0.01 * i,
            "vol": 1.5,
            "process": "asian",
            "fixings": 4,
        }

    body = {"contracts": [asian(i) for i in range(MAX_SIMULATED_REFERENCE_POINTS + 1)]}
    err = await assert_error(await client.post("/v1/price", json=body), 422, "invalid", ("contracts",))
    assert f"at most {MAX_SIMULATED_REFERENCE_POINTS}" in err["details"][0]["reason"], err
