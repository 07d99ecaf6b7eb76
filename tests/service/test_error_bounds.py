"""Certified answers as clients see them (docs/api.md, "Error bounds"): the error_bound
and warnings fields in the OpenAPI description, on every /v1/price result and every
streamed quote, and each served version's certificate (summary and price-error heat
map) beside the previous version's on /v1/models."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from certificate_util import bundled_checkpoint, commit_certified, fake_certificate, serving
from marketdata_util import by_reference, snapshot
from server_util import CONTRACT, MakeClient, app_of

from spectralmc_server.engine import certificate
from spectralmc_server.engine.reference_pricers import CLOSED_FORM_BOUND
from spectralmc_server.pricing.schemas import PriceResponse
from spectralmc_server.service import keys, routes
from spectralmc_server.service.schemas import ModelsResponse
from spectralmc_server.store.objects import CorruptObjectError

Client = TestClient[Any, Any]
ALL_MEASURES = [
    "price", "delta", "gamma", "vega", "theta", "rho", "digital", "mean", "stdev", "skew", "kurtosis", "quantiles",
]  # fmt: skip
LEVELS = [0.05, 0.5, 0.95]
VDT = "2026-11-26T16:00:00Z"
ASOF = "2026-11-26T16:00:05Z"
# Explicit GBM contracts: inside the bundled model's domain, with rates, and far outside
# it (a vol the network does not cover: the reference answers).
BOOK = [
    CONTRACT,
    {**CONTRACT, "id": "c2", "right": "put", "strike": 95.0, "rate": 0.03, "dividend": 0.01, "expiry_years": 1.5},
    {**CONTRACT, "id": "c3", "vol": 2.5, "expiry_years": 0.1},
]


async def ok_json(client: Client, method: str, path: str, **kwargs: Any) -> Any:
    r = await client.request(method, path, **kwargs)
    text = await r.text()
    assert r.status == 200, text
    return orjson.loads(text)


def check_bounds(row: dict[str, Any], measures: list[str]) -> None:
    """Every requested measure has a bound: a finite number >= 0 (for quantiles, one per
    level asked), or null together with a null value and a warning naming the measure."""
    bounds = row["error_bound"]
    assert set(bounds) == set(measures), row
    for m in measures:
        value, bound = row[m], bounds[m]
        if bound is None:
            assert value is None, (m, row)
            assert any(w.startswith(f"{m}:") for w in row.get("warnings") or []), (m, row)
            continue
        if m == "quantiles":
            assert set(bound) == set(value), row
            for level, b in bound.items():
                assert isinstance(b, float) and math.isfinite(b) and b >= 0, (m, level, row)
        else:
            assert isinstance(bound, float) and math.isfinite(bound) and bound >= 0, (m, row)


# -- the OpenAPI description ----------------------------------------------------------------


async def test_openapi_describes_error_bounds_and_certificates(make_client: MakeClient) -> None:
    client = await make_client()
    spec = await ok_json(client, "GET", "/v1/openapi.json")
    schemas = spec["components"]["schemas"]
    result = schemas["ContractResult"]
    props = result["properties"]
    assert "error_bound" in result["required"], result
    bound = props["error_bound"]
    assert bound["type"] == "object"
    kinds = {s.get("type") for s in bound["additionalProperties"]["anyOf"]}
    assert kinds == {"number", "object", "null"}, bound  # a number, per level for quantiles, or withheld
    words_needed = ("units", "certificate", "error scale", "99.5%", "1.1 margin", "standard errors", "closed forms")
    for words in (*words_needed, "COS"):
        assert words in bound["description"], words
    warnings = props["warnings"]
    assert "warnings" not in result.get("required", [])  # only where a measure is withheld
    assert {s.get("type") for s in warnings["anyOf"]} == {"array", "null"}
    assert "withheld" in warnings["description"] and "tolerance" in warnings["description"]
    # /v1/price's results and /v1/models' rows name these schemas
    items = schemas["PriceResponse"]["properties"]["results"]["items"]
    assert items["$ref"].endswith("/ContractResult")
    models_op = spec["paths"]["/v1/models"]["get"]
    assert models_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ModelsResponse")
    info = schemas["ModelInfo"]["properties"]
    assert {"certificate", "heatmap", "previous"} <= set(info)
    assert "error_bound" in spec["paths"]["/v1/stream"]["get"]["description"]


# -- /v1/price and /v1/stream ---------------------------------------------------------------


async def test_price_results_validate_and_every_measure_has_a_bound(make_client: MakeClient) -> None:
    # gbm served (the bundled model is certified); heston, with no model here, by its reference
    client = await make_client(models=["gbm"])
    heston = {
        "id": "h1",
        "right": "call",
        "strike": 100.0,
        "spot": 100.0,
        "expiry_years": 1.0,
        "process": "heston",
        "params": {"v0": 0.04, "kappa": 1.5, "theta": 0.04, "xi": 0.5, "rho": -0.6},
    }
    body = {"measures": ALL_MEASURES, "quantile_levels": LEVELS, "contracts": [*BOOK, heston]}
    out = await ok_json(client, "POST", "/v1/price", json=body)
    PriceResponse.model_validate(out)  # the documented schema, error_bound required
    assert [r["id"] for r in out["results"]] == ["c1", "c2", "c3", "h1"]
    for row in out["results"]:
        check_bounds(row, ALL_MEASURES)
    # A learned answer's bound comes from the certificate, and it is served only within
    # the tolerance (per unit of D F: spot here, no rates). With every measure asked, one
    # past its tolerance sends the whole GBM contract to the closed forms; the price alone
    # is learned.
    alone = await ok_json(client, "POST", "/v1/price", json={"measures": ["price"], "contracts": [CONTRACT]})
    PriceResponse.model_validate(alone)
    near = alone["results"][0]
    check_bounds(near, ["price"])
    tolerance = app_of(client)[keys.SETTINGS].certificate.tolerance["price"]
    assert near["method"] == "cvnn", near
    assert CLOSED_FORM_BOUND * 100.0 < near["error_bound"]["price"] <= tolerance * 100.0, near
    assert out["results"][3]["method"] == "reference"  # heston: COS, bound about 0
    assert 0 < out["results"][3]["error_bound"]["price"] < 1e-4
    # A GBM reference answer's bound is the closed form's accuracy per unit of the
    # measure: D F for a price (spot for no rates).
    far = out["results"][2]
    assert far["method"] == "reference", far
    spot = BOOK[2]["spot"]
    assert isinstance(spot, float)
    assert far["error_bound"]["price"] == pytest.approx(CLOSED_FORM_BOUND * spot, rel=1e-9)


async def test_streamed_quotes_carry_the_same_bounds_as_price(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot())
    assert r.status == 201, await r.text()
    contracts = [by_reference("r1"), *BOOK]
    measures = ["price", "delta", "quantiles"]
    request = {"measures": measures, "quantile_levels": LEVELS}
    priced = await ok_json(
        client, "POST", "/v1/price", json={**request, "val_datetime": VDT, "data_asof": ASOF, "contracts": contracts}
    )
    ws = await client.ws_connect("/v1/stream")
    try:
        await ws.send_str(orjson.dumps({"op": "subscribe", "id": "s", "contracts": contracts, **request}).decode())
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(30):
            while not got:
                msg = orjson.loads((await ws.receive()).data)
                assert msg["type"] in ("subscribed", "quote"), msg
                if msg["type"] == "quote":
                    got = msg["results"]
    finally:
        await ws.close()
    assert [q["id"] for q in got] == ["r1", "c1", "c2", "c3"]
    for quote, row in zip(got, priced["results"], strict=True):
        check_bounds(quote, measures)
        assert quote["error_bound"] == row["error_bound"], (quote, row)
        assert quote.get("warnings") == row.get("warnings")


# -- /v1/models ----------------------------------------------------------------------------


def model_row(body: dict[str, Any], name: str) -> dict[str, Any]:
    row: dict[str, Any] = next(m for m in body["models"] if m["name"] == name)
    return row


def expected_view(cert: dict[str, Any]) -> dict[str, Any]:
    return {
        "certificate": certificate.summary(cert),
        "heatmap_p95": cert["heatmap"]["p95"],
        "heatmap_max": cert["heatmap"]["max"],
        "dims": cert["cells"]["dims"],
        "edges": cert["cells"]["edges"],
    }


def shown_view(row: dict[str, Any]) -> dict[str, Any]:
    heat = row["heatmap"]
    return {
        "certificate": row["certificate"],
        "heatmap_p95": heat["p95"],
        "heatmap_max": heat["max"],
        "dims": heat["dims"],
        "edges": heat["edges"],
    }


async def test_models_shows_the_served_and_the_previous_certificate(make_client: MakeClient) -> None:
    client = await make_client()
    ckpt = bundled_checkpoint("gbm")
    first, second = fake_certificate(ckpt, 11), fake_certificate(ckpt, 22)
    await commit_certified(client, "gbm", [first, second])  # versions 2 and 3
    served = await serving(client, "gbm", 3)
    assert served.certificate is not None, "the store gave the served version no certificate"
    body = await ok_json(client, "GET", "/v1/models")
    ModelsResponse.model_validate(body)
    row = model_row(body, "gbm")
    assert row["version"] == 3
    assert shown_view(row) == expected_view(second)
    prev = row["previous"]
    assert prev["version"] == 2 and prev["reason"] is None, prev
    assert shown_view(prev) == expected_view(first)
    # the other models have only their bundled version 1 (served once it is certified):
    # nothing before it, and the served one's own certificate, if any
    for other in ("heston", "merton", "asian"):
        r = model_row(body, other)
        cur = app_of(client)[keys.HOST].trackers[other].current
        assert r["previous"] is None, r
        if cur is None:
            assert r["version"] is None and r["certificate"] is None and r["heatmap"] is None, r
            continue
        cert = cur.model.certificate
        assert r["version"] == 1 and r["certificate"] == (None if cert is None else certificate.summary(cert)), r


async def test_models_says_why_the_previous_version_has_no_figures(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    cert = fake_certificate(bundled_checkpoint("gbm"), 33)
    store = await commit_certified(client, "gbm", [None, cert])  # version 2 uncertified, 3 certified
    await serving(client, "gbm", 3)
    row = model_row(await ok_json(client, "GET", "/v1/models"), "gbm")
    assert shown_view(row) == expected_view(cert)
    prev = row["previous"]
    assert prev["version"] == 2 and prev["certificate"] is None and prev["heatmap"] is None, prev
    assert prev["reason"] == "version 2 has no certificate", prev

    # a store that fails, or does not answer in time: the reason, and still a 200
    async def broken(version: int) -> dict[str, Any] | None:
        raise CorruptObjectError(f"model 'gbm' version {version}: certificate fails its SHA-256")

    monkeypatch.setattr(store, "certificate", broken, raising=False)
    prev = model_row(await ok_json(client, "GET", "/v1/models"), "gbm")["previous"]
    assert prev["certificate"] is None and "CorruptObjectError" in prev["reason"] and "SHA-256" in prev["reason"], prev

    async def hangs(version: int) -> dict[str, Any] | None:
        await asyncio.sleep(3600)
        return None

    monkeypatch.setattr(store, "certificate", hangs, raising=False)
    monkeypatch.setattr(routes, "PREVIOUS_CERTIFICATE_TIMEOUT", 0.2)
    async with asyncio.timeout(10):
        body = await ok_json(client, "GET", "/v1/models")
    prev = model_row(body, "gbm")["previous"]
    assert prev["certificate"] is None and "did not answer within 0.2 s" in prev["reason"], prev
    ModelsResponse.model_validate(body)
