"""Heston and Merton served over HTTP: /v1/models lists their learned models and
domains; contracts inside a domain are answered by the learned model and agree with
the reference pricer (the analytic CF through COS), contracts just outside by the
reference; their params are validated per process; vega is the documented derivative.

Tolerances (prices of spot 100, so 1 bp of spot = 0.01): over 20 seeded random
in-domain contracts per process (strikes 80..125), every learned price is within 30 bp
of spot of the reference and the 95th percentile within 10 bp. Vega equals a central
difference of the served price (h = 1e-3 in sqrt(v0) for Heston, in sigma for Merton)
within 1e-3 relative, for the learned model and for the reference.
"""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from server_util import Client, MakeClient, assert_error

from spectralmc_server.engine.processes import get_process
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.pricing.valuation import Valuer

SERVED = ["gbm", "heston", "merton", "asian", "rbergomi"]
SPOT = 100.0
BP = SPOT * 1e-4
MAX_BP = 30.0
P95_BP = 10.0
N_RANDOM = 20
FD_STEP = 1e-3
VEGA_RTOL = 1e-3
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}
MERTON = {"sigma": 0.2, "lambda": 0.5, "mu_j": -0.1, "sigma_j": 0.1}
PARAMS = {"heston": HESTON, "merton": MERTON}
BASE = {"right": "call", "strike": 105.0, "spot": SPOT, "expiry_years": 1.0, "rate": 0.03, "dividend": 0.01}


# -- helpers -----------------------------------------------------------------------------


async def ok_json(r: ClientResponse, status: int = 200) -> dict[str, Any]:
    text = await r.text()
    assert r.status == status, text
    body: dict[str, Any] = orjson.loads(text)
    return body


async def price(client: Client, contracts: list[dict[str, Any]], measures: tuple[str, ...] = ("price",)) -> list[Any]:
    body = await ok_json(await client.post("/v1/price", json={"measures": list(measures), "contracts": contracts}))
    results: list[Any] = body["results"]
    return results


def contract(cid: str, process: str, **changes: Any) -> dict[str, Any]:
    params = {**PARAMS[process], **changes.pop("params", {})}
    return {"id": cid, **BASE, "process": process, "params": params, **changes}


def reference_prices(contracts: list[dict[str, Any]]) -> list[float]:
    """The reference pricer's answers (what a server with no model of the process gives)."""
    results = Valuer({}).value(PriceRequest.model_validate({"contracts": contracts}))["results"]
    assert all(r["method"] == "reference" for r in results)
    return [float(r["price"]) for r in results]


def random_contracts(process: str, seed: int) -> list[dict[str, Any]]:
    """N_RANDOM contracts strictly inside the bundled domain (2%..98% of each range in
    its own coordinate), strikes 80..125, calls and puts."""
    rng = random.Random(seed)
    out = []
    for i in range(N_RANDOM):
        values = {}
        for r in get_process(process).default_domain().ranges:
            u = rng.uniform(0.02, 0.98)
            if r.scale == "log":
                values[r.name] = math.exp(math.log(r.low) + u * (math.log(r.high) - math.log(r.low)))
            else:
                values[r.name] = r.low + u * (r.high - r.low)
        t = values.pop("expiry_years")
        out.append(
            {
                "id": f"{process}-{i}",
                "right": rng.choice(["call", "put"]),
                "strike": round(SPOT * rng.uniform(0.8, 1.25), 2),
                "spot": SPOT,
                "expiry_years": t,
                "rate": rng.uniform(0.0, 0.05),
                "dividend": rng.uniform(0.0, 0.02),
                "process": process,
                "params": values,
            }
        )
    return out


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


# -- /v1/models --------------------------------------------------------------------------


async def test_models_lists_every_process_with_its_domain(make_client: MakeClient) -> None:
    client = await make_client()  # the default settings serve all five
    models = (await ok_json(await client.get("/v1/models")))["models"]
    by_name = {m["name"]: m for m in models}
    assert set(by_name) == set(SERVED), models
    for name, m in by_name.items():
        assert m["process"] == name
        assert m["version"] == 1 and m["mode"] == "tracking" and m["last_error"] is None, m
        assert m["content_hash"].startswith("sha256:"), m
        default = get_process(name).default_domain().model_dump(mode="json")
        assert m["domain"]["ranges"] == default["ranges"], m
        assert m["domain"]["moneyness"] in (None, [0.7, 1.3]), m  # the validated K/F range, where recorded
    assert [r["name"] for r in by_name["heston"]["domain"]["ranges"]] == [
        "v0",
        "kappa",
        "theta",
        "xi",
        "rho",
        "expiry_years",
    ]
    assert [r["name"] for r in by_name["merton"]["domain"]["ranges"]] == [
        "sigma",
        "lambda",
        "mu_j",
        "sigma_j",
        "expiry_years",
    ]
    assert [r["name"] for r in by_name["asian"]["domain"]["ranges"]] == ["vol", "carry", "fixings", "expiry_years"]
    assert [r["name"] for r in by_name["rbergomi"]["domain"]["ranges"]] == ["H", "eta", "rho", "xi0", "expiry_years"]
    assert (await client.get("/readyz")).status == 200


# -- learned vs reference ----------------------------------------------------------------


@pytest.mark.parametrize(("process", "seed"), [("heston", 11), ("merton", 12)])
async def test_in_domain_contracts_are_learned_and_agree_with_the_reference(
    make_client: MakeClient, process: str, seed: int
) -> None:
    client = await make_client(models=SERVED)
    contracts = random_contracts(process, seed)
    body = await ok_json(await client.post("/v1/price", json={"contracts": contracts}))
    got = body["results"]
    # in the domain and K/F range: the network, but for a learned price that breaks a
    # model-free bound (then the reference; tests/engine/test_bounds_sweep.py)
    methods = [r["method"] for r in got]
    assert methods.count("cvnn") >= N_RANDOM - 2, got
    assert all(r["model"] == process for r in got)
    models = (await ok_json(await client.get("/v1/models")))["models"]
    served = next(m for m in models if m["name"] == process)
    assert body["models"] == {process: {"version": served["version"], "content_hash": served["content_hash"]}}
    want = reference_prices(contracts)
    errors_bp = [abs(r["price"] - w) / BP for r, w in zip(got, want, strict=True)]
    worst = max(range(N_RANDOM), key=lambda i: errors_bp[i])
    assert errors_bp[worst] < MAX_BP, (contracts[worst], got[worst], want[worst])
    assert p95(errors_bp) < P95_BP, sorted(errors_bp)


EDGES: list[tuple[str, str, float, float]] = [
    ("heston", "v0", 0.25, 0.2502),
    ("heston", "xi", 0.1, 0.0999),
    ("heston", "rho", 0.3, 0.301),
    ("heston", "expiry_years", 3.0, 3.01),
    ("merton", "sigma", 0.5, 0.501),
    ("merton", "mu_j", -0.2, -0.201),
    ("merton", "sigma_j", 0.25, 0.251),
    ("merton", "expiry_years", 0.1, 0.099),
]


async def test_just_outside_the_domain_the_reference_answers(make_client: MakeClient) -> None:
    """The same contract on a domain edge is learned; nudged past it, it is priced by
    the reference (exactly its answer), and the two sides agree within MAX_BP."""
    client = await make_client(models=SERVED)
    rows = []
    for process, name, inside, outside in EDGES:
        for side, value in (("edge", inside), ("past", outside)):
            cid = f"{process}-{name}-{side}"
            if name == "expiry_years":
                rows.append(contract(cid, process, expiry_years=value))
            else:
                rows.append(contract(cid, process, params={name: value}))
    body = await ok_json(await client.post("/v1/price", json={"contracts": rows}))
    got = body["results"]
    assert [r["method"] for r in got] == ["cvnn", "reference"] * len(EDGES), got
    assert set(body["models"]) == {"heston", "merton"}  # the learned ones answered the edges
    want = reference_prices(rows)
    for k in range(len(EDGES)):
        edge, past = got[2 * k], got[2 * k + 1]
        assert past["price"] == want[2 * k + 1], past  # the reference, exactly
        assert abs(edge["price"] - want[2 * k]) / BP < MAX_BP, (edge, want[2 * k])
    # contracts outside only: answered without any model
    body = await ok_json(await client.post("/v1/price", json={"contracts": rows[1::2]}))
    assert {r["method"] for r in body["results"]} == {"reference"} and body["models"] == {}


# -- params validation -------------------------------------------------------------------


PARAM_CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    (
        "heston missing xi",
        {"process": "heston", "params": {k: v for k, v in HESTON.items() if k != "xi"}},
        ("params.xi",),
    ),
    ("heston no params", {"process": "heston"}, tuple(f"params.{n}" for n in HESTON)),
    ("heston unknown foo", {"process": "heston", "params": {**HESTON, "foo": 1.0}}, ("foo",)),
    ("heston rho 1.5", {"process": "heston", "params": {**HESTON, "rho": 1.5}}, ("params.rho", "1.5")),
    ("heston v0 0", {"process": "heston", "params": {**HESTON, "v0": 0.0}}, ("params.v0",)),
    ("heston vol", {"process": "heston", "params": HESTON, "vol": 0.2}, ("heston", "params", "vol")),
    (
        "merton missing lambda",
        {"process": "merton", "params": {"sigma": 0.2, "mu_j": 0.0, "sigma_j": 0.1}},
        ("params.lambda",),
    ),
    ("merton lambda -1", {"process": "merton", "params": {**MERTON, "lambda": -1.0}}, ("params.lambda",)),
    ("merton sigma_j -0.1", {"process": "merton", "params": {**MERTON, "sigma_j": -0.1}}, ("params.sigma_j",)),
    ("merton vol", {"process": "merton", "params": MERTON, "vol": 0.2}, ("merton", "params", "vol")),
    ("merton unknown v0", {"process": "merton", "params": {**MERTON, "v0": 0.04}}, ("v0",)),
]


async def test_bad_params_are_422_naming_them(make_client: MakeClient) -> None:
    client = await make_client(models=SERVED)
    good = contract("ok", "heston")
    for what, fields, named in PARAM_CASES:
        bad = {"id": "bad", **BASE, **fields}
        r = await client.post("/v1/price", json={"contracts": [good, bad]})
        err = await assert_error(r, 422, "invalid")
        [detail] = err["details"]
        assert detail["field"].startswith("contracts[1]"), (what, detail)
        for text in named:
            assert text in detail["field"] + ": " + detail["reason"], (what, text, detail)
    # a non-finite param is named by its path
    r = await client.post("/v1/price", json={"contracts": [contract("nan", "merton", params={"sigma": "NaN"})]})
    await assert_error(r, 422, "invalid", ("contracts[0].params.sigma",))
    assert (await price(client, [good]))[0]["method"] == "cvnn"  # the good one alone is fine


# -- vega --------------------------------------------------------------------------------


def _bumped(c: dict[str, Any], process: str, h: float) -> dict[str, Any]:
    """The contract with its vol parameter moved by h in vol units: sqrt(v0) for
    Heston, sigma for Merton."""
    p = dict(c["params"])
    if process == "heston":
        p["v0"] = (math.sqrt(p["v0"]) + h) ** 2
    else:
        p["sigma"] = p["sigma"] + h
    return {**c, "id": f"{c['id']}{h:+g}", "params": p}


@pytest.mark.parametrize("process", ["heston", "merton"])
async def test_vega_is_the_derivative_in_the_vol_parameter(make_client: MakeClient, process: str) -> None:
    """Learned (in the domain) and reference (expiry 4y, outside it) alike."""
    client = await make_client(models=SERVED)
    cases = [
        contract("in-call", process),
        contract("in-put", process, right="put", strike=90.0, expiry_years=0.5),
        contract("out", process, expiry_years=4.0),
    ]
    rows = []
    for c in cases:
        rows += [c, _bumped(c, process, FD_STEP), _bumped(c, process, -FD_STEP)]
    got = await price(client, rows, measures=("price", "vega"))
    assert [r["method"] for r in got[::3]] == ["cvnn", "cvnn", "reference"], got
    for k, c in enumerate(cases):
        base, up, down = got[3 * k : 3 * k + 3]
        assert up["method"] == down["method"] == base["method"]
        fd = (up["price"] - down["price"]) / (2 * FD_STEP)
        assert base["vega"] > 0, base
        assert fd == pytest.approx(base["vega"], rel=VEGA_RTOL), (c["id"], base, fd)
