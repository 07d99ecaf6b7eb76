"""Calibration as a service (service/calibrate_routes.py): POST /v1/calibrate on a synthetic
Heston surface whose true parameters are known, through the served learned model
(``method: cvnn``) and through the analytic CF when no Heston model is served
(``reference``); storing the fit as a derived snapshot priced by reference; the 422s
of bad surfaces and bad bodies; the write token; the metrics; and the ``calibrate``
derive job end to end. Rough Bergomi (``process: rbergomi``, section at the end) goes
through its served model only (no analytic CF: without the model a 422 naming
``process``), on the surface that model itself implies at known parameters.

Tolerances: the learned model recovers v0 within 0.003, theta within 0.005 and rho
within 0.1 of the truth with an RMSE below 1 vol point (kappa and xi trade off against
each other on a 2-year surface and are only checked to stay in the model's domain);
the analytic CF recovers every parameter within 1e-4.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import math
import os
import time
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from marketdata_util import ASOF, VDT, snapshot
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from server_util import Client, MakeClient, assert_error

from spectralmc_server.engine.processes import get_process
from spectralmc_server.marketdata.objects import MarketSnapshot, year_fraction
from spectralmc_server.pricing.calibration import synthetic_surface
from spectralmc_server.settings import DeriveJob, Settings

TRUE = {"v0": 0.03, "kappa": 2.0, "theta": 0.05, "xi": 0.6, "rho": -0.65}
EXPIRIES = (0.25, 0.5, 1.0, 1.5, 2.0)
MONEYNESS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
SERVED = ["gbm", "heston", "merton"]  # the learned heston model answers
NO_HESTON = ["gbm"]  # calibration falls back to the analytic CF
TOLERANCE = {"v0": 0.003, "theta": 0.005, "rho": 0.1}
WRITE_TOKEN = "md-writer-token"
KEY_FIELDS = ("namespace", "val_datetime", "data_asof", "hash")
REPORT_FIELDS = {
    "market_data",
    "underlying",
    "process",
    "method",
    "model",
    "params",
    "start",
    "fit",
    "quotes",
    "stored",
}
FIT_FIELDS = {"quotes", "rmse_vol", "max_abs_vol_error", "iterations", "evaluations", "seconds", "converged"}
QUOTE_FIELDS = {"expiry_years", "strike", "forward", "market_vol", "model_vol", "vol_error"}
VDT_DATETIME = datetime.fromisoformat(VDT)


# -- helpers -----------------------------------------------------------------------------


@functools.cache
def _surface(expiries: tuple[float, ...], moneyness: tuple[float, ...]) -> dict[str, Any]:
    data: dict[str, Any] = synthetic_surface("heston", TRUE, list(expiries), list(moneyness)).model_dump(mode="json")
    return data


def heston_body(expiries: tuple[float, ...] = EXPIRIES, moneyness: tuple[float, ...] = MONEYNESS) -> dict[str, Any]:
    """The sample snapshot with its SPX surface replaced by the one TRUE implies."""
    body = snapshot()
    body["vol_surfaces"]["SPX"] = copy.deepcopy(_surface(expiries, moneyness))
    return body


def calendar_violation_body() -> dict[str, Any]:
    """The synthetic surface with one node (T=2, K/F=1) lowered so that its total
    variance falls below the one at T=1.5: a calendar arbitrage."""
    body = heston_body()
    vols = body["vol_surfaces"]["SPX"]["vols"]
    j = MONEYNESS.index(1.0)
    vols[4][j] = vols[3][j] * math.sqrt(1.5 / 2.0) * 0.95
    return body


async def ok_json(r: ClientResponse, status: int = 200) -> dict[str, Any]:
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json", r.content_type
    body: dict[str, Any] = orjson.loads(text)
    return body


async def put_ok(
    client: Client,
    body: dict[str, Any],
    namespace: str = "default",
    asof: str = ASOF,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    r = await client.put(f"/v1/marketdata/{namespace}/{VDT}/{asof}", json=body, headers=headers)
    out = await ok_json(r, 201)
    assert out["created"] is True
    return out


async def calibrate(client: Client, headers: dict[str, str] | None = None, **fields: Any) -> ClientResponse:
    body = {"val_datetime": VDT, "underlying": "SPX", **fields}
    return await client.post("/v1/calibrate", json=body, headers=headers)


def key_of(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in KEY_FIELDS}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name{labels}`` (0 when absent: labelled series appear once touched)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def metrics_text(client: Client) -> str:
    r = await client.get("/metrics")
    assert r.status == 200
    return await r.text()


async def heston_model(client: Client) -> dict[str, Any]:
    """The served heston model's identity as a calibration report names it."""
    models = (await ok_json(await client.get("/v1/models")))["models"]
    found = [m for m in models if m["name"] == "heston"]
    assert len(found) == 1, models
    m = found[0]
    assert m["version"] is not None, m
    return {"name": "heston", "version": m["version"], "content_hash": m["content_hash"]}


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    """The first truthy value of ``check()``, polled every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def assert_in_domain(params: dict[str, float]) -> None:
    for r in get_process("heston").default_domain().ranges[:-1]:
        assert r.low <= params[r.name] <= r.high, (r, params)


def assert_report(out: dict[str, Any], put: dict[str, Any], method: str) -> None:
    """The shape every successful report has, and its per-quote table against the surface."""
    assert set(out) == REPORT_FIELDS, sorted(out)
    assert out["market_data"] == {k: put[k] for k in (*KEY_FIELDS, "lineage", "stored_at")}
    assert (out["underlying"], out["process"], out["method"]) == ("SPX", "heston", method)
    assert set(out["params"]) == set(TRUE) and set(out["start"]) == set(TRUE)
    assert_in_domain(out["params"])
    fit = out["fit"]
    assert set(fit) == FIT_FIELDS, sorted(fit)
    assert fit["quotes"] == len(EXPIRIES) * len(MONEYNESS) == len(out["quotes"])
    assert 1 <= fit["iterations"] <= 100 and fit["evaluations"] >= fit["iterations"]
    assert fit["seconds"] > 0 and fit["converged"] is True
    # every node of the surface once, with its market vol, forward and the model's vol
    snap = MarketSnapshot.model_validate(heston_body())
    forward = snap.forward_fn("SPX")
    assert forward is not None
    surface = _surface(EXPIRIES, MONEYNESS)
    seen = []
    errors = []
    for q in out["quotes"]:
        assert set(q) == QUOTE_FIELDS, q
        i = EXPIRIES.index(q["expiry_years"])
        assert q["forward"] == pytest.approx(forward(q["expiry_years"]), rel=1e-12)
        m = q["strike"] / q["forward"]
        j = min(range(len(MONEYNESS)), key=lambda k: abs(MONEYNESS[k] - m))
        assert m == pytest.approx(MONEYNESS[j], abs=1e-12)
        seen.append((i, j))
        assert q["market_vol"] == surface["vols"][i][j]
        assert q["model_vol"] is not None and q["model_vol"] > 0, q
        assert q["vol_error"] == pytest.approx(q["model_vol"] - q["market_vol"], abs=1e-15)
        errors.append(q["vol_error"])
    assert sorted(seen) == list(itertools.product(range(len(EXPIRIES)), range(len(MONEYNESS))))
    assert fit["rmse_vol"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / len(errors)), rel=1e-9)
    assert fit["max_abs_vol_error"] == pytest.approx(max(abs(e) for e in errors), rel=1e-12)


def explicit_heston(
    snap: dict[str, Any], cid: str, strike: float, expiry: date, params: dict[str, float], process: str = "heston"
) -> dict[str, Any]:
    """The explicit contract a heston (or ``process``) contract by reference stands for
    (docs/marketdata.md): spot, ACT/365F expiry from val_datetime's date, zero rates at
    T, the given params."""
    s = MarketSnapshot.model_validate(snap)
    t = year_fraction(VDT_DATETIME, expiry)
    return {
        "id": cid,
        "right": "call",
        "strike": strike,
        "spot": s.spots["SPX"],
        "expiry_years": t,
        "rate": s.yield_curves["USD"].zero_rate(t),
        "dividend": s.dividend_curves["SPX"].zero_rate(t),
        "process": process,
        "params": params,
    }


# -- the fit -----------------------------------------------------------------------------


async def test_calibrate_recovers_known_params_through_the_learned_model(make_client: MakeClient) -> None:
    client = await make_client(models=SERVED)
    put = await put_ok(client, heston_body())
    out = await ok_json(await calibrate(client))
    assert_report(out, put, "cvnn")
    assert out["model"] == await heston_model(client)
    for name, tol in TOLERANCE.items():
        assert abs(out["params"][name] - TRUE[name]) <= tol, (name, out["params"])
    assert out["fit"]["rmse_vol"] < 0.01
    assert out["stored"] is None
    # store=false stores nothing
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert listing["snapshots"] == [{"val_datetime": VDT, "data_asof": ASOF}]
    # the same input and model version give the same fit
    again = await ok_json(await calibrate(client, data_asof=ASOF))
    assert again["params"] == out["params"] and again["quotes"] == out["quotes"]
    # the same surface in absolute strikes is the same fit: with the dividend curve equal
    # to the discount curve F(T) = spot, so K = 100 m at every expiry
    body = heston_body()
    body["dividend_curves"]["SPX"] = copy.deepcopy(body["yield_curves"]["USD"])
    grid = body["vol_surfaces"]["SPX"]
    grid["strike_kind"] = "strike"
    grid["strikes"] = [100.0 * m for m in MONEYNESS]
    await put_ok(client, body, namespace="strikes")
    by_strike = await ok_json(await calibrate(client, namespace="strikes"))
    assert by_strike["method"] == "cvnn" and by_strike["fit"]["quotes"] == len(out["quotes"])
    for name, value in out["params"].items():
        assert by_strike["params"][name] == pytest.approx(value, rel=1e-3), (name, by_strike["params"])
    # max_iterations bounds the work: one step is reported, not converged
    short = await ok_json(await calibrate(client, max_iterations=1))
    assert short["fit"]["iterations"] == 1 and short["fit"]["converged"] is False
    assert short["start"] == out["start"] and short["fit"]["rmse_vol"] > out["fit"]["rmse_vol"]


async def test_calibrate_through_the_analytic_cf_without_a_heston_model(make_client: MakeClient) -> None:
    client = await make_client(models=NO_HESTON)
    put = await put_ok(client, heston_body())
    out = await ok_json(await calibrate(client))
    assert_report(out, put, "reference")
    assert out["model"] is None
    for name, value in TRUE.items():
        assert out["params"][name] == pytest.approx(value, abs=1e-4), (name, out["params"])
    assert out["fit"]["rmse_vol"] < 1e-5


# -- storing the fit ---------------------------------------------------------------------


async def test_store_creates_a_derived_snapshot_that_prices_by_reference(make_client: MakeClient) -> None:
    client = await make_client(models=SERVED)
    body = heston_body()
    put = await put_ok(client, body)
    ref: dict[str, Any] = {
        "id": "h1",
        "right": "call",
        "strike": 105.0,
        "underlying": "SPX",
        "expiry": "2027-06-18",
        "process": "heston",
    }
    # the input has no heston parameters: a heston contract by reference cannot be priced
    r = await client.post("/v1/price", json={"val_datetime": VDT, "contracts": [ref]})
    err = await assert_error(r, 422, "no_market_data", ("contracts[0]",))
    assert "no heston parameters for SPX" in err["message"], err

    out = await ok_json(await calibrate(client, store=True))
    model = await heston_model(client)
    stored = out["stored"]
    assert set(stored) == {*KEY_FIELDS, "lineage", "stored_at", "created"}
    assert stored["created"] is True and stored["namespace"] == "default"
    assert stored["val_datetime"] == VDT
    assert datetime.fromisoformat(stored["data_asof"]) > datetime.fromisoformat(ASOF)
    assert stored["hash"] != put["hash"]
    lineage = stored["lineage"]
    assert set(lineage) == {"job", "kind", "process", "underlyings", "inputs", "models", "produced_at"}
    assert lineage["job"] is None and lineage["kind"] == "calibrate" and lineage["process"] == "heston"
    assert lineage["underlyings"] == ["SPX"]
    assert lineage["inputs"] == [key_of(put)]
    assert lineage["models"] == [model]
    assert datetime.fromisoformat(lineage["produced_at"]) <= datetime.fromisoformat(stored["data_asof"])

    # latest (of the namespace and of the val_datetime) is the derived snapshot
    for path in ("/v1/marketdata/default/latest", f"/v1/marketdata/default/{VDT}"):
        latest = await ok_json(await client.get(path))
        assert key_of(latest) == key_of(stored) and latest["lineage"] == lineage
    data = latest["data"]
    fitted = data["model_params"]["SPX"]["heston"]
    assert fitted["params"] == out["params"]
    fit = fitted["fit"]
    assert fit["method"] == "cvnn" and fit["model"] == model and fit["start"] == out["start"]
    assert {k: fit[k] for k in FIT_FIELDS - {"seconds"}} == {k: out["fit"][k] for k in FIT_FIELDS - {"seconds"}}
    assert "seconds" not in fit  # timing is not content: the same fit is the same bytes
    assert fit["quotes_detail"] == out["quotes"]
    # what was fitted (not which snapshot: that is the record's lineage, so refits settle)
    assert fit["fitted_to"]["underlying"] == "SPX" and fit["fitted_to"]["quotes_hash"].startswith("sha256:")
    # everything else is the input, unchanged
    normalized = MarketSnapshot.model_validate(body).model_dump(mode="json")
    assert {k: v for k, v in data.items() if k != "model_params"} == {
        k: v for k, v in normalized.items() if k != "model_params"
    }
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert listing["snapshots"] == [
        {"val_datetime": VDT, "data_asof": ASOF},
        {"val_datetime": VDT, "data_asof": stored["data_asof"]},
    ]

    # by reference against the derived snapshot = explicitly with its fitted params
    measures = ["price", "delta", "vega"]
    refs = [ref, {**ref, "id": "h2", "strike": 90.0, "expiry": "2028-03-17"}]
    got = await ok_json(
        await client.post("/v1/price", json={"val_datetime": VDT, "measures": measures, "contracts": refs})
    )
    assert got["market_data"] == key_of(stored)
    explicit = [
        explicit_heston(body, c["id"], c["strike"], date.fromisoformat(c["expiry"]), out["params"]) for c in refs
    ]
    want = await ok_json(await client.post("/v1/price", json={"measures": measures, "contracts": explicit}))
    assert orjson.dumps(got["results"]) == orjson.dumps(want["results"])
    assert got["models"] == want["models"]
    assert [x["method"] for x in got["results"]] == ["cvnn", "cvnn"]
    assert all(x["model"] == "heston" and x["price"] > 0 for x in got["results"])
    # the input snapshot, named by its data_asof, still has no heston parameters
    r = await client.post("/v1/price", json={"val_datetime": VDT, "data_asof": ASOF, "contracts": [ref]})
    await assert_error(r, 422, "no_market_data", ("contracts[0]",))


# -- refusals ----------------------------------------------------------------------------


async def test_bad_surfaces_are_422_and_counted(make_client: MakeClient) -> None:
    """One server, one namespace per surface. Each refusal names the underlying and the
    reason; only fits that ran (or were rejected for their surface) are counted."""
    client = await make_client(models=SERVED)
    # no snapshot at all, then none as of a time before the only one
    err = await assert_error(await calibrate(client), 422, "no_market_data", ("val_datetime",))
    assert f"default/{VDT}" in err["message"], err
    await put_ok(client, heston_body())
    r = await calibrate(client, data_asof="2026-11-26T15:00:00Z")
    await assert_error(r, 422, "no_market_data", ("data_asof",))
    r = await client.post("/v1/calibrate", json={"val_datetime": VDT, "underlying": "SPX", "namespace": "empty"})
    await assert_error(r, 422, "no_market_data", ("val_datetime",))

    rejected = 0
    # an underlying without a surface
    err = await assert_error(await calibrate(client, underlying="NDX"), 422, "invalid", ("underlying",))
    assert "no vol surface for NDX" in err["message"], err
    rejected += 1
    no_surface = heston_body()
    del no_surface["vol_surfaces"]
    await put_ok(client, no_surface, namespace="bare")
    err = await assert_error(await calibrate(client, namespace="bare"), 422, "invalid", ("underlying",))
    assert "no vol surface for SPX" in err["message"], err
    rejected += 1

    # a surface but no spot: no forward to turn it into quotes
    no_spot = heston_body()
    no_spot["spots"] = {"NDX": 100.0}
    await put_ok(client, no_spot, namespace="nospot")
    err = await assert_error(await calibrate(client, namespace="nospot"), 422, "invalid", ("underlying",))
    assert "no forward for SPX" in err["message"], err
    rejected += 1

    # a calendar violation: refused unless allow_arbitrage
    await put_ok(client, calendar_violation_body(), namespace="arb")
    err = await assert_error(await calibrate(client, namespace="arb"), 422, "invalid", ("underlying",))
    assert "arbitrage" in err["message"] and "total variance" in err["message"], err
    assert "allow_arbitrage" in err["message"], err
    rejected += 1
    out = await ok_json(await calibrate(client, namespace="arb", allow_arbitrage=True))
    assert out["method"] == "cvnn" and out["fit"]["quotes"] == len(EXPIRIES) * len(MONEYNESS)
    assert out["stored"] is None

    # too few nodes: 2 x 3 = 6 < 8
    await put_ok(client, heston_body((0.5, 1.0), (0.9, 1.0, 1.1)), namespace="few")
    err = await assert_error(await calibrate(client, namespace="few"), 422, "invalid", ("underlying",))
    assert "6 nodes" in err["message"] and "at least 8" in err["message"], err
    rejected += 1

    # an expiry outside the model's domain [0.05, 3] years, above and below
    outside_cases = [
        ("long", (0.25, 0.5, 1.0, 2.0, 4.0), MONEYNESS, "4"),
        ("short", (0.03, 0.25, 1.0), (0.95, 1.0, 1.05), "0.03"),  # 9 nodes: only the expiry is wrong
    ]
    for ns, expiries, moneyness, outside in outside_cases:
        await put_ok(client, heston_body(expiries, moneyness), namespace=ns)
        err = await assert_error(await calibrate(client, namespace=ns), 422, "invalid", ("underlying",))
        assert f"expiries {outside} years lie outside" in err["message"], err
        assert "[0.05, 3]" in err["message"], err
        rejected += 1

    text = await metrics_text(client)
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="rejected") == rejected
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="ok") == 1
    assert sample(text, "spectralmc_calibration_seconds_count", process="heston") == 1
    assert sample(text, "spectralmc_calibration_seconds_sum", process="heston") == pytest.approx(
        out["fit"]["seconds"], rel=1e-9
    )
    assert (await client.get("/healthz")).status == 200


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("missing val_datetime", {"underlying": "SPX"}, "val_datetime"),
    ("missing underlying", {"val_datetime": VDT}, "underlying"),
    ("naive val_datetime", {"val_datetime": "2026-11-26T16:00:00", "underlying": "SPX"}, "val_datetime"),
    ("process sabr", {"val_datetime": VDT, "underlying": "SPX", "process": "sabr"}, "process"),
    ("process merton", {"val_datetime": VDT, "underlying": "SPX", "process": "merton"}, "process"),
    ("process gbm", {"val_datetime": VDT, "underlying": "SPX", "process": "gbm"}, "process"),
    ("process Heston", {"val_datetime": VDT, "underlying": "SPX", "process": "Heston"}, "process"),
    ("process not a string", {"val_datetime": VDT, "underlying": "SPX", "process": 1}, "process"),
    ("max_iterations 0", {"val_datetime": VDT, "underlying": "SPX", "max_iterations": 0}, "max_iterations"),
    ("max_iterations 1001", {"val_datetime": VDT, "underlying": "SPX", "max_iterations": 1001}, "max_iterations"),
    ("empty underlying", {"val_datetime": VDT, "underlying": ""}, "underlying"),
    ("bad namespace", {"val_datetime": VDT, "underlying": "SPX", "namespace": "a/b"}, "namespace"),
    ("unknown field", {"val_datetime": VDT, "underlying": "SPX", "strike_kind": "moneyness"}, "strike_kind"),
    ("store not a bool", {"val_datetime": VDT, "underlying": "SPX", "store": "maybe"}, "store"),
    ("corrections -1", {"val_datetime": VDT, "underlying": "SPX", "corrections": -1}, "corrections"),
    ("corrections 4", {"val_datetime": VDT, "underlying": "SPX", "corrections": 4}, "corrections"),
    ("corrections not an int", {"val_datetime": VDT, "underlying": "SPX", "corrections": "1"}, "corrections"),
    (
        "correction_paths 3",
        {"val_datetime": VDT, "underlying": "SPX", "corrections": 1, "correction_paths": 3},
        "correction_paths",
    ),
    (
        "correction_paths without corrections",
        {"val_datetime": VDT, "underlying": "SPX", "correction_paths": 4096},
        "correction_paths",
    ),
    (
        "correction_paths 2^20 + 1",
        {"val_datetime": VDT, "underlying": "SPX", "corrections": 1, "correction_paths": (1 << 20) + 1},
        "correction_paths",
    ),
]


async def test_bad_bodies_are_422_naming_the_field(make_client: MakeClient) -> None:
    client = await make_client(models=SERVED)
    await put_ok(client, heston_body())
    for what, body, field in BAD_BODIES:
        r = await client.post("/v1/calibrate", json=body)
        err = await assert_error(r, 422, "invalid", (field,))
        assert len(err["details"]) == 1, (what, err)
    r = await client.post("/v1/calibrate", data=b"{not json", headers={"Content-Type": "application/json"})
    await assert_error(r, 400, "malformed")
    r = await client.post("/v1/calibrate", json=[VDT, "SPX"])
    await assert_error(r, 422, "invalid")
    text = await metrics_text(client)
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="ok") == 0
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="rejected") == 0


async def test_store_needs_the_write_token(make_client: MakeClient) -> None:
    client = await make_client(models=SERVED, marketdata={"write_token": WRITE_TOKEN})
    good = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    put = await put_ok(client, heston_body(), headers=good)
    # a fit that stores nothing needs no token
    out = await ok_json(await calibrate(client))
    assert out["stored"] is None and out["method"] == "cvnn"
    await assert_error(await calibrate(client, store=True), 401, "unauthorized")
    await assert_error(await calibrate(client, headers={"Authorization": "Bearer nope"}, store=True), 403, "forbidden")
    await assert_error(await calibrate(client, headers={"Authorization": WRITE_TOKEN}, store=True), 401, "unauthorized")
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert listing["snapshots"] == [{"val_datetime": VDT, "data_asof": ASOF}]  # nothing was stored
    text = await metrics_text(client)
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="ok") == 1  # refused before fitting
    stored = (await ok_json(await calibrate(client, headers=good, store=True)))["stored"]
    assert stored["created"] is True and stored["lineage"]["inputs"] == [key_of(put)]
    latest = await ok_json(await client.get("/v1/marketdata/default/latest"))
    assert key_of(latest) == key_of(stored)


# -- the calibrate derive job ------------------------------------------------------------


async def test_calibrate_job_end_to_end(make_client: MakeClient) -> None:
    job = {"kind": "derive", "derive": "calibrate", "name": "spx-heston", "every_seconds": 0.2, "underlyings": ["SPX"]}
    client = await make_client(models=SERVED, jobs=[job])

    async def state() -> dict[str, Any]:
        jobs = (await ok_json(await client.get("/v1/jobs")))["jobs"]
        found = [j for j in jobs if j["name"] == "spx-heston"]
        assert len(found) == 1, jobs
        got: dict[str, Any] = found[0]
        return got

    async def failed() -> bool:
        runs: int = (await state())["runs"]["error"]
        return runs >= 1

    await eventually(failed, "a failed run before any snapshot")
    errors = [r for r in (await state())["recent"] if r["outcome"] == "error"]
    assert errors and all(r["message"] == "no snapshot in namespace 'default' yet" for r in errors)

    put = await put_ok(client, heston_body())

    async def derived() -> dict[str, Any] | None:
        latest = await ok_json(await client.get("/v1/marketdata/default/latest"))
        return latest if latest["data_asof"] != ASOF else None

    out: dict[str, Any] = await eventually(derived, "a derived snapshot")
    model = await heston_model(client)
    assert out["val_datetime"] == VDT
    assert datetime.fromisoformat(out["data_asof"]) > datetime.fromisoformat(ASOF)
    lineage = out["lineage"]
    assert lineage["job"] == "spx-heston" and lineage["kind"] == "calibrate"
    assert lineage["process"] == "heston" and lineage["underlyings"] == ["SPX"]
    assert lineage["inputs"] == [key_of(put)]
    assert lineage["models"] == [model]
    fitted = out["data"]["model_params"]["SPX"]["heston"]
    for name, tol in TOLERANCE.items():
        assert abs(fitted["params"][name] - TRUE[name]) <= tol, (name, fitted["params"])
    assert fitted["fit"]["method"] == "cvnn" and fitted["fit"]["rmse_vol"] < 0.01
    assert fitted["fit"]["model"] == model and fitted["fit"]["fitted_to"]["underlying"] == "SPX"

    # the next runs find the job's own output: unchanged, nothing more is stored
    async def unchanged() -> bool:
        runs: int = (await state())["runs"]["unchanged"]
        return runs >= 2

    await eventually(unchanged, "two unchanged runs")
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert listing["snapshots"] == [
        {"val_datetime": VDT, "data_asof": ASOF},
        {"val_datetime": VDT, "data_asof": out["data_asof"]},
    ]
    st = await state()
    assert st["runs"]["success"] == 1 and st["last_success"] is not None
    finished = [r for r in st["recent"] if r["outcome"] is not None]
    assert finished[-1]["outcome"] == "unchanged"
    assert "this job's own output" in finished[-1]["message"]
    [success] = [r["message"] for r in finished if r["outcome"] == "success"]
    assert success.startswith(f"stored {out['data_asof']} ({out['hash']}): SPX rmse "), success
    text = await metrics_text(client)
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="ok") == 1
    assert sample(text, "spectralmc_job_runs_total", job="spx-heston", outcome="success") == 1

    # a heston contract by reference now prices from the job's fit
    ref = {"id": "j1", "right": "put", "strike": 95.0, "underlying": "SPX", "expiry": "2027-06-18", "process": "heston"}
    got = await ok_json(await client.post("/v1/price", json={"val_datetime": VDT, "contracts": [ref]}))
    assert got["market_data"] == key_of(out)
    explicit = {**explicit_heston(heston_body(), "j1", 95.0, date(2027, 6, 18), fitted["params"]), "right": "put"}
    want = await ok_json(await client.post("/v1/price", json={"contracts": [explicit]}))
    assert got["results"] == want["results"]


async def job_runs(client: Client, name: str) -> dict[str, Any]:
    jobs = (await ok_json(await client.get("/v1/jobs")))["jobs"]
    [state] = [j for j in jobs if j["name"] == name]
    runs: dict[str, Any] = state["runs"]
    return {**runs, "recent": state["recent"]}


async def test_calibrate_job_reports_a_surface_it_cannot_fit(make_client: MakeClient) -> None:
    job = {"kind": "derive", "derive": "calibrate", "name": "ndx-heston", "every_seconds": 0.1, "underlyings": ["NDX"]}
    client = await make_client(models=SERVED, jobs=[job])
    await put_ok(client, heston_body())

    async def rejected() -> list[str]:
        recent = (await job_runs(client, "ndx-heston"))["recent"]
        return [r["message"] for r in recent if r["outcome"] == "error" and "NDX" in (r["message"] or "")]

    messages = await eventually(rejected, "a run that names the missing NDX surface")
    assert messages[0].startswith("no vol surface for NDX"), messages
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert listing["snapshots"] == [{"val_datetime": VDT, "data_asof": ASOF}]  # nothing stored
    text = await metrics_text(client)
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="rejected") >= 1
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="ok") == 0


async def test_two_calibrate_jobs_on_one_namespace_settle(make_client: MakeClient) -> None:
    """One calibrate job per underlying (SPX, NDX, the same surface): once both have
    fitted, nothing is new. At most 3 derived snapshots (as for surface jobs: both may
    derive from the PUT at one tick, then the one whose output is not the latest once
    more from the other's), so at most 4 in all."""
    jobs = [
        {"kind": "derive", "derive": "calibrate", "name": f"{u.lower()}-fit", "every_seconds": 0.2, "underlyings": [u]}
        for u in ("SPX", "NDX")
    ]
    client = await make_client(models=SERVED, jobs=jobs)
    body = heston_body()
    body["spots"]["NDX"] = body["spots"]["SPX"]
    body["discounting"]["NDX"] = "USD"
    body["vol_surfaces"]["NDX"] = copy.deepcopy(body["vol_surfaces"]["SPX"])
    await put_ok(client, body)

    async def both_ran() -> bool:
        runs = [await job_runs(client, f"{u}-fit") for u in ("spx", "ndx")]
        return all(r["success"] + r["unchanged"] >= 5 for r in runs)

    await eventually(both_ran, "five runs of each job", timeout=60)
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert len(listing["snapshots"]) <= 4, listing["snapshots"]


def test_calibrate_job_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("SPECTRALMC_")]:
        monkeypatch.delenv(name)
    base = {"kind": "derive", "derive": "calibrate", "name": "c", "every_seconds": 60.0, "underlyings": ["SPX"]}
    [job] = Settings(jobs=[base]).jobs
    assert isinstance(job, DeriveJob)
    assert (job.derive, job.process, job.namespace) == ("calibrate", "heston", "default")
    with pytest.raises(ValidationError, match=r"jobs\.0\.derive\.process"):
        Settings(jobs=[{**base, "process": "sabr"}])
    [rough] = Settings(jobs=[{**base, "process": "rbergomi"}]).jobs
    assert isinstance(rough, DeriveJob) and rough.process == "rbergomi"
    assert (rough.corrections, rough.correction_paths, rough.timeout_seconds) == (0, 1 << 17, None)
    bad: list[tuple[str, dict[str, Any]]] = [
        ("corrections", {"corrections": 4}),
        ("correction_paths", {"corrections": 1, "correction_paths": 3}),
        ("correction_paths", {"correction_paths": 4096}),  # unused without corrections
        ("timeout_seconds", {"timeout_seconds": 0}),
        ("timeout_seconds", {"timeout_seconds": float("inf")}),
        ("timeout_seconds", {"timeout_seconds": 3601}),
    ]
    for field, fields in bad:
        with pytest.raises(ValidationError, match=rf"jobs\.0\.derive\.{field}"):
            Settings(jobs=[{**base, **fields}])
    with pytest.raises(ValidationError, match=r"jobs\.0\.derive\.derive"):
        Settings(jobs=[{**base, "derive": "fit"}])


# -- rough Bergomi ------------------------------------------------------------------------
# No analytic CF: the fit goes through the served rbergomi model, and the surface is the
# one that model implies at RB_TRUE (pricing/calibration.py model_surface), so the fit
# must give RB_TRUE back (H within 0.02, eta within 10%, rho within 0.05, xi0 within 2%).

RB_TRUE = {"H": 0.1, "eta": 1.5, "rho": -0.7, "xi0": 0.04}
RB_EXPIRIES = (0.25, 0.5, 1.0, 1.5, 2.0)
RB_MONEYNESS = (0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15)  # every price well above 1 bp of F
RB_SERVED = ["gbm", "rbergomi"]


def assert_rbergomi_recovered(params: dict[str, float]) -> None:
    assert set(params) == set(RB_TRUE), params
    assert abs(params["H"] - RB_TRUE["H"]) <= 0.02, params
    assert abs(params["eta"] / RB_TRUE["eta"] - 1.0) <= 0.10, params
    assert abs(params["rho"] - RB_TRUE["rho"]) <= 0.05, params
    assert abs(params["xi0"] / RB_TRUE["xi0"] - 1.0) <= 0.02, params


@functools.cache
def _rbergomi_surface() -> dict[str, Any]:
    from spectralmc_server.engine.checkpoint import read_dir
    from spectralmc_server.engine.served import load_served_model
    from spectralmc_server.models import bundled_models
    from spectralmc_server.pricing.calibration import model_surface

    served = load_served_model(read_dir(bundled_models()["rbergomi"], need_training=False), require_certificate=False)
    surface = model_surface(served, RB_TRUE, list(RB_EXPIRIES), list(RB_MONEYNESS))
    data: dict[str, Any] = surface.model_dump(mode="json")
    return data


def rbergomi_body() -> dict[str, Any]:
    """The sample snapshot with its SPX surface the bundled rbergomi model's at RB_TRUE."""
    body = snapshot()
    body["vol_surfaces"]["SPX"] = copy.deepcopy(_rbergomi_surface())
    return body


async def rbergomi_model(client: Client) -> dict[str, Any]:
    models = (await ok_json(await client.get("/v1/models")))["models"]
    [m] = [m for m in models if m["name"] == "rbergomi"]
    return {"name": "rbergomi", "version": m["version"], "content_hash": m["content_hash"]}


async def test_calibrate_rbergomi_through_the_learned_model_and_store(make_client: MakeClient) -> None:
    """process rbergomi: fitted through the served rbergomi model (method cvnn), the four
    parameters recovered, and with store the set lands in model_params[SPX][rbergomi] of
    a derived snapshot whose lineage names the process and the model."""
    client = await make_client(models=RB_SERVED)
    put = await put_ok(client, rbergomi_body())
    out = await ok_json(await calibrate(client, process="rbergomi", store=True))
    model = await rbergomi_model(client)
    assert set(out) == REPORT_FIELDS, sorted(out)
    assert (out["underlying"], out["process"], out["method"]) == ("SPX", "rbergomi", "cvnn")
    assert out["model"] == model
    assert set(out["start"]) == set(RB_TRUE)
    assert out["fit"]["quotes"] == len(RB_EXPIRIES) * len(RB_MONEYNESS) == len(out["quotes"])
    assert out["fit"]["converged"] is True and out["fit"]["rmse_vol"] < 1e-3
    assert_rbergomi_recovered(out["params"])
    stored = out["stored"]
    assert stored["created"] is True
    lineage = stored["lineage"]
    assert (lineage["kind"], lineage["process"], lineage["underlyings"]) == ("calibrate", "rbergomi", ["SPX"])
    assert lineage["inputs"] == [key_of(put)] and lineage["models"] == [model]
    latest = await ok_json(await client.get("/v1/marketdata/default/latest"))
    assert key_of(latest) == key_of(stored)
    fitted = latest["data"]["model_params"]["SPX"]["rbergomi"]
    assert fitted["params"] == out["params"]
    assert fitted["fit"]["method"] == "cvnn" and fitted["fit"]["model"] == model
    assert fitted["fit"]["quotes_detail"] == out["quotes"]
    # a rough Bergomi contract by reference now prices from the fitted set, exactly as
    # the explicit contract with those parameters
    ref = {
        "id": "rb1",
        "right": "put",
        "strike": 95.0,
        "underlying": "SPX",
        "expiry": "2027-06-18",
        "process": "rbergomi",
    }
    got = await ok_json(await client.post("/v1/price", json={"val_datetime": VDT, "contracts": [ref]}))
    assert got["market_data"] == key_of(stored)
    explicit = explicit_heston(rbergomi_body(), "rb1", 95.0, date(2027, 6, 18), out["params"], "rbergomi")
    explicit["right"] = "put"
    want = await ok_json(await client.post("/v1/price", json={"contracts": [explicit]}))
    assert got["results"] == want["results"] and got["results"][0]["price"] > 0
    text = await metrics_text(client)
    assert sample(text, "spectralmc_calibrations_total", process="rbergomi", outcome="ok") == 1
    assert sample(text, "spectralmc_calibration_seconds_count", process="rbergomi") == 1


async def test_rbergomi_without_its_model_is_422_naming_the_process(make_client: MakeClient) -> None:
    """No rbergomi model served and no analytic CF to fall back on: 422 naming
    ``process``, before anything is queued; counted as rejected."""
    client = await make_client(models=["gbm"])
    await put_ok(client, rbergomi_body())
    err = await assert_error(await calibrate(client, process="rbergomi"), 422, "invalid", ("process",))
    assert "rbergomi has no analytic characteristic function" in err["message"], err
    assert "served rbergomi model" in err["message"], err
    text = await metrics_text(client)
    assert sample(text, "spectralmc_calibrations_total", process="rbergomi", outcome="rejected") == 1
    assert sample(text, "spectralmc_calibrations_total", process="rbergomi", outcome="ok") == 0


async def test_calibrate_job_fits_rbergomi(make_client: MakeClient) -> None:
    """A calibrate job with process rbergomi stores the fitted set under its process."""
    job = {
        "kind": "derive",
        "derive": "calibrate",
        "name": "spx-rbergomi",
        "every_seconds": 0.2,
        "underlyings": ["SPX"],
        "process": "rbergomi",
    }
    client = await make_client(models=RB_SERVED, jobs=[job])
    put = await put_ok(client, rbergomi_body())

    async def derived() -> dict[str, Any] | None:
        latest = await ok_json(await client.get("/v1/marketdata/default/latest"))
        return latest if latest["data_asof"] != ASOF else None

    async def job_error() -> list[str]:
        recent = (await job_runs(client, "spx-rbergomi"))["recent"]
        return [r["message"] for r in recent if r["outcome"] == "error"]

    out: dict[str, Any] = await eventually(derived, "a derived snapshot")
    assert not await job_error()
    lineage = out["lineage"]
    assert (lineage["job"], lineage["process"]) == ("spx-rbergomi", "rbergomi")
    assert lineage["inputs"] == [key_of(put)] and lineage["models"] == [await rbergomi_model(client)]
    fitted = out["data"]["model_params"]["SPX"]["rbergomi"]
    assert fitted["fit"]["method"] == "cvnn"
    assert_rbergomi_recovered(fitted["params"])


# -- reference corrections ----------------------------------------------------------------
# A fit through the learned model corrected by the process's reference (corrections):
# heston's is COS on the analytic CF (instant), rough Bergomi's a Monte Carlo run in the
# engine's slices, paused between its chunks, so pricing is answered meanwhile and the
# deadline stops it there.


async def test_heston_corrections_over_http_fit_closer_to_the_truth(make_client: MakeClient) -> None:
    """corrections 2 through the learned heston model: the report lists both corrections
    (an exact reference: no paths, no standard error), the fit is within tolerance, and
    its residual is below the uncorrected fit's; the corrections are stored with the fit."""
    client = await make_client(models=SERVED)
    await put_ok(client, heston_body())
    plain = await ok_json(await calibrate(client))
    out = await ok_json(await calibrate(client, corrections=2, store=True))
    assert out["method"] == "cvnn" and "corrections" not in plain["fit"]
    first, second = out["fit"]["corrections"]
    assert first["at"] == pytest.approx(plain["params"], rel=1e-9)
    for c in (first, second):
        assert c["paths"] is None and c["max_stderr"] == 0.0 and c["max_abs_shift"] > 0.0
    for name, tol in TOLERANCE.items():
        assert abs(out["params"][name] - TRUE[name]) <= tol, (name, out["params"])
    assert out["fit"]["rmse_vol"] < 0.5 * plain["fit"]["rmse_vol"], (out["fit"], plain["fit"])
    latest = await ok_json(await client.get("/v1/marketdata/default/latest"))
    stored = latest["data"]["model_params"]["SPX"]["heston"]["fit"]["corrections"]
    assert [c["at"] for c in stored] == [c["at"] for c in out["fit"]["corrections"]]


async def test_corrections_without_a_served_model_are_422_naming_corrections(make_client: MakeClient) -> None:
    """heston without its model fits through the analytic CF itself: corrections have
    nothing to correct (422 naming ``corrections``, nothing queued)."""
    client = await make_client(models=NO_HESTON)
    await put_ok(client, heston_body())
    err = await assert_error(await calibrate(client, corrections=1), 422, "invalid", ("corrections",))
    assert "no heston model is served" in err["message"], err
    text = await metrics_text(client)
    assert sample(text, "spectralmc_calibrations_total", process="heston", outcome="rejected") == 1


RB_CORRECTION_PATHS = 1 << 14  # per expiry: 11 chunks of the Monte Carlo, ~1.4 s on one thread


async def test_rbergomi_correction_runs_in_slices_while_pricing_is_answered(make_client: MakeClient) -> None:
    """A rough Bergomi fit with one Monte-Carlo correction over HTTP: the report lists it
    (its paths and standard error), the parameters are recovered, and single-contract
    prices sent while the correction computes are each answered well before it ends: the
    Monte Carlo pauses between chunks like a fit between iterations. The correction's
    paths are a cost class of their own in /metrics."""
    client = await make_client(models=RB_SERVED, queue={"max_job_seconds": 0.05})
    await put_ok(client, rbergomi_body())
    contract = {"id": "c", "right": "call", "strike": 100.0, "spot": 100.0, "vol": 0.2, "expiry_years": 1.0}
    await ok_json(await client.post("/v1/price", json={"contracts": [contract]}))  # warm
    fit = asyncio.create_task(
        _calibrate_json(client, process="rbergomi", corrections=1, correction_paths=2 * RB_CORRECTION_PATHS)
    )
    waits: list[float] = []
    while not fit.done() and len(waits) < 400:
        t0 = time.perf_counter()
        await ok_json(await client.post("/v1/price", json={"contracts": [contract]}))
        waits.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    out = await fit
    (c,) = out["fit"]["corrections"]
    assert c["paths"] == 2 * RB_CORRECTION_PATHS and 0.0 < c["max_stderr"] < 1e-3, c
    assert c["seconds"] > 0.5, c  # long enough for the prices to have waited on it (~2.8 s here)
    assert_rbergomi_recovered(out["params"])
    assert len(waits) >= 5, waits
    assert max(waits) < 0.5 * c["seconds"], (max(waits), c["seconds"])
    text = await metrics_text(client)
    unit = sample(text, "spectralmc_queue_unit_cost_seconds", process="rbergomi", method="reference", tier="correction")
    assert 0.0 < unit < 1e-3, unit


async def _calibrate_json(client: Client, **fields: Any) -> dict[str, Any]:
    return await ok_json(await calibrate(client, **fields))


async def test_rbergomi_correction_past_its_deadline_is_504(make_client: MakeClient) -> None:
    """A deadline that ends inside the correction's Monte Carlo stops it between chunks:
    504, and the engine goes on pricing."""
    client = await make_client(models=RB_SERVED)
    await put_ok(client, rbergomi_body())
    # the fit itself takes well under a second; the correction's 2^20 paths per expiry far more
    t0 = time.perf_counter()
    r = await calibrate(client, {"X-Request-Timeout": "3"}, process="rbergomi", corrections=1, correction_paths=1 << 20)
    err = await assert_error(r, 504, "deadline_exceeded")
    # the engine's own stop (not the batcher giving up on it), inside the Monte Carlo
    assert err["message"].startswith("the calibration was stopped after"), err
    assert "fewer corrections or correction_paths" in err["message"], err
    text = await metrics_text(client)
    unit = sample(text, "spectralmc_queue_unit_cost_seconds", process="rbergomi", method="reference", tier="correction")
    assert unit > 0.0, "the stopped correction had computed no chunk"
    assert time.perf_counter() - t0 < 6.0
    contract = {"id": "c", "right": "call", "strike": 100.0, "spot": 100.0, "vol": 0.2, "expiry_years": 1.0}
    await ok_json(await client.post("/v1/price", json={"contracts": [contract]}))
    assert (await client.get("/readyz")).status == 200


async def test_calibrate_job_with_a_correction(make_client: MakeClient) -> None:
    """A calibrate job with corrections 1 stores a corrected fit (its corrections in the
    stored report), under the job's own deadline."""
    job = {
        "kind": "derive",
        "derive": "calibrate",
        "name": "spx-rb-corrected",
        "every_seconds": 0.2,
        "underlyings": ["SPX"],
        "process": "rbergomi",
        "corrections": 1,
        "correction_paths": RB_CORRECTION_PATHS,
        "timeout_seconds": 60.0,
    }
    client = await make_client(models=RB_SERVED, jobs=[job])
    await put_ok(client, rbergomi_body())

    async def derived() -> dict[str, Any] | None:
        latest = await ok_json(await client.get("/v1/marketdata/default/latest"))
        return latest if latest["data_asof"] != ASOF else None

    out: dict[str, Any] = await eventually(derived, "a derived snapshot", timeout=90.0)
    fitted = out["data"]["model_params"]["SPX"]["rbergomi"]
    (c,) = fitted["fit"]["corrections"]
    assert c["paths"] == RB_CORRECTION_PATHS and c["max_stderr"] > 0.0
    assert_rbergomi_recovered(fitted["params"])
