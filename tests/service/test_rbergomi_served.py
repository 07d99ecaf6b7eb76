"""Rough Bergomi served over HTTP (process ``rbergomi``, the bundled model, served by
default): /v1/models lists it with its domain; contracts inside the domain are answered
by the learned model and agree with the reference Monte Carlo; delta and vega are the
derivatives of the served price; its parameters are validated naming each field; a
contract by reference takes the snapshot's rbergomi parameters; a contract past the
domain is answered by the process's reference; ``spectralmc price`` answers as the
server does. One server (the default settings) for the module.

Tolerances (spot 100, so 1 bp of spot = 0.01): a learned price is within its own error
bound (the certificate's, as the response gives it) plus four standard errors of the
independent Monte Carlo (``rbergomi_european_mc``: the mixed estimator, antithetic, with
control variates, 2^16 paths; its standard error is under 2 bp here). Delta and vega
equal central differences of the served price (spot +- 0.01; sqrt(xi0) +- 1e-3, vega
being per 1.00 of sqrt(xi0)) within 1e-3 relative.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import torch
from aiohttp.test_utils import TestClient
from marketdata_util import ASOF, VDT, snapshot
from server_util import AppServer, Client, assert_error, ok_json, price, settings_for

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.rbergomi_reference import rbergomi_european_mc
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.marketdata.objects import ZeroCurve
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.book import Book
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service.app import create_app
from spectralmc_server.service.metrics import Metrics

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPOT = 100.0
BP = SPOT * 1e-4
MC_PATHS = 1 << 16
MC_SE = 4.0  # standard errors of the Monte Carlo allowed on top of the learned bound
GREEK_RTOL = 1e-3
FD_SPOT = 0.01
FD_VOL = 1e-3  # in sqrt(xi0)
MARKET = {"spot": SPOT, "rate": 0.03, "dividend": 0.01}
# Points inside the domain (H [0.025, 0.5], eta [0.5, 4], rho [-0.95, -0.1], xi0 [0.01,
# 0.16], expiry [0.03, 2]): an ordinary rough point, a smoother short one, a rougher long one.
POINT_A = {"H": 0.1, "eta": 1.5, "rho": -0.7, "xi0": 0.04}
POINT_B = {"H": 0.3, "eta": 1.0, "rho": -0.5, "xi0": 0.09}
POINT_C = {"H": 0.05, "eta": 2.0, "rho": -0.9, "xi0": 0.02}


def rbergomi(cid: str, right: str, strike: float, params: dict[str, float], expiry: float) -> dict[str, Any]:
    return {
        "id": cid,
        "right": right,
        "strike": strike,
        "expiry_years": expiry,
        **MARKET,
        "process": "rbergomi",
        "params": dict(params),
    }


BOOK = [
    rbergomi("a-call", "call", 105.0, POINT_A, 1.0),
    rbergomi("a-put", "put", 90.0, POINT_A, 1.0),
    rbergomi("b-call", "call", 100.0, POINT_B, 0.5),
    rbergomi("c-put", "put", 95.0, POINT_C, 1.5),
    rbergomi("c-call", "call", 115.0, POINT_C, 1.5),
]


# -- the server ---------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """An app with the default settings (every bundled model, rbergomi among them) but a
    60 s request deadline: this module checks numbers, and its Greeks go partly to the
    reference Monte Carlo (4.8 s for the delta-and-vega book on a quiet 2-core machine,
    past the default 10 s in one loaded CI run, whose 504 then left the queue's pressure
    estimate refusing the module's next requests). Deadlines are tested elsewhere."""
    settings = settings_for(tmp_path_factory.mktemp("rbergomi"), request_timeout_seconds=60.0)
    app = create_app(settings, Metrics(engine_families=settings.engine.mode == "thread"))
    test_client: Client = TestClient(AppServer(app))
    await test_client.start_server()
    yield test_client
    await test_client.close()


def mc_prices(contracts: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Money prices and standard errors by the reference Monte Carlo (mixed estimator,
    control variates): put = D F mc(K / F), call = put + D (F - K)."""
    names = get_process("rbergomi").param_names
    theta = torch.tensor([[c["params"][n] for n in names] for c in contracts], dtype=torch.float64)
    expiry = torch.tensor([c["expiry_years"] for c in contracts], dtype=torch.float64)
    fwd = [c["spot"] * math.exp((c["rate"] - c["dividend"]) * c["expiry_years"]) for c in contracts]
    log_kappa = torch.tensor([[math.log(c["strike"] / f)] for c, f in zip(contracts, fwd, strict=True)])
    mc = rbergomi_european_mc(theta, expiry, log_kappa.to(torch.float64), MC_PATHS, seed=23)
    prices, errors = [], []
    for k, (c, f) in enumerate(zip(contracts, fwd, strict=True)):
        disc = math.exp(-c["rate"] * c["expiry_years"])
        put = disc * f * float(mc.price[k, 0])
        prices.append(put + disc * (f - c["strike"]) if c["right"] == "call" else put)
        errors.append(disc * f * float(mc.stderr[k, 0]))
    return prices, errors


# -- /v1/models ------------------------------------------------------------------------


async def test_models_lists_rbergomi_with_its_domain(client: Client) -> None:
    models = (await ok_json(await client.get("/v1/models")))["models"]
    by_name = {m["name"]: m for m in models}
    assert "rbergomi" in by_name, [m["name"] for m in models]
    m = by_name["rbergomi"]
    assert m["process"] == "rbergomi" and m["version"] == 1 and m["last_error"] is None, m
    default = get_process("rbergomi").default_domain().model_dump(mode="json")
    assert m["domain"]["ranges"] == default["ranges"], m
    assert m["domain"]["moneyness"] in (None, [0.7, 1.3]), m  # the validated K/F range, where recorded
    assert [r["name"] for r in m["domain"]["ranges"]] == ["H", "eta", "rho", "xi0", "expiry_years"]


# -- learned vs the reference Monte Carlo ----------------------------------------------------


async def test_in_domain_contracts_agree_with_the_mc_within_their_bounds(client: Client) -> None:
    """The learned model answers inside its domain and certified K/F range, but where a
    price's certified bound passes the tolerance (the reference then answers); every answer
    is within its own bound (plus the Monte Carlo's standard errors) of the Monte Carlo."""
    body = await price(client, BOOK, "price", "mean")
    got = body["results"]
    assert {r["model"] for r in got} == {"rbergomi"}, got
    learned = [r["id"] for r in got if r["method"] == "cvnn"]
    assert {"a-call", "a-put"} <= set(learned), got  # the ordinary point is the model's
    assert set(body["models"]) == {"rbergomi"}
    want, stderr = mc_prices(BOOK)
    for r, c, w, se in zip(got, BOOK, want, stderr, strict=True):
        assert se < 2 * BP, (c, se)  # the Monte Carlo itself is tight
        bound = r["error_bound"]["price"]
        assert bound is not None and bound > 0, r
        assert abs(r["price"] - w) <= bound + MC_SE * se, (c["id"], r["method"], r["price"], w, bound, se)
        fwd = c["spot"] * math.exp((c["rate"] - c["dividend"]) * c["expiry_years"])
        assert r["mean"] == pytest.approx(fwd, rel=1e-12, abs=0), r  # E[S_T] = F, exactly


def _bumped(c: dict[str, Any]) -> list[dict[str, Any]]:
    """The contract, then spot +- FD_SPOT, then sqrt(xi0) +- FD_VOL."""
    sqrt_xi0 = math.sqrt(c["params"]["xi0"])
    return [
        c,
        {**c, "id": f"{c['id']}-s+", "spot": c["spot"] + FD_SPOT},
        {**c, "id": f"{c['id']}-s-", "spot": c["spot"] - FD_SPOT},
        {**c, "id": f"{c['id']}-v+", "params": {**c["params"], "xi0": (sqrt_xi0 + FD_VOL) ** 2}},
        {**c, "id": f"{c['id']}-v-", "params": {**c["params"], "xi0": (sqrt_xi0 - FD_VOL) ** 2}},
    ]


def _check_greeks(rows: list[dict[str, Any]], prices: list[float], greeks: dict[str, list[float | None]]) -> int:
    """Delta and vega of each base row (every fifth) against central differences of the
    prices; the number compared (a None greek is skipped)."""
    compared = 0
    for k in range(0, len(rows), 5):
        for greek, (up, down), h in (("delta", (1, 2), FD_SPOT), ("vega", (3, 4), FD_VOL)):
            value = greeks[greek][k]
            if value is None:
                continue
            fd = (prices[k + up] - prices[k + down]) / (2 * h)
            assert fd == pytest.approx(value, rel=GREEK_RTOL), (rows[k]["id"], greek, value, fd)
            compared += 1
    return compared


async def test_the_models_delta_and_vega_are_derivatives_of_its_price() -> None:
    """The learned network's own delta and vega (the pricer the server answers with where
    the certificate allows), against central differences of its price."""
    model = load_served_model(read_dir(bundled_models()["rbergomi"], need_training=False), require_certificate=False)
    rows = [row for c in BOOK[:3] for row in _bumped(c)]
    request = PriceRequest.model_validate({"contracts": rows})
    batch = Book.of(request.contracts).option_batch("rbergomi")
    assert bool(model.pricer.servable(batch, frozenset({"price"})).all())  # inside the domain
    got = model.pricer.learned.evaluate(batch, frozenset({"price", "delta", "vega"}))
    greeks: dict[str, list[float | None]] = {m: [float(x) for x in got[m]] for m in ("delta", "vega")}
    assert _check_greeks(rows, [float(x) for x in got["price"]], greeks) == 6


async def test_served_delta_and_vega_are_derivatives_of_the_served_price(client: Client) -> None:
    """Through the server: where a Greek is served (not withheld past its tolerance, with a
    warning naming it), it is the derivative of the served price."""
    rows = [row for c in BOOK[:3] for row in _bumped(c)]
    got = (await price(client, rows, "price", "delta", "vega"))["results"]
    for r in got:
        for greek in ("delta", "vega"):
            if r[greek] is None:  # withheld: null, its bound null, and a warning naming it
                assert r["error_bound"][greek] is None, r
                assert any(w.startswith(f"{greek}:") for w in r["warnings"]), r
    # a difference is compared where the five rows of a contract were all learned
    keep = [k for k in range(0, len(rows), 5) if {r["method"] for r in got[k : k + 5]} == {"cvnn"}]
    assert keep, got
    sub = [i for k in keep for i in range(k, k + 5)]
    _check_greeks(
        [rows[i] for i in sub],
        [got[i]["price"] for i in sub],
        {m: [got[i][m] for i in sub] for m in ("delta", "vega")},
    )


# -- validation ---------------------------------------------------------------------------


def _params_without(name: str) -> dict[str, float]:
    return {k: v for k, v in POINT_A.items() if k != name}


GOOD = BOOK[0]
BAD: list[tuple[str, dict[str, float], str, tuple[str, ...]]] = [
    # what, params, the field named, texts in the reason
    ("missing H", _params_without("H"), "contracts[1]", ("missing explicit input(s): params.H",)),
    ("eta above", {**POINT_A, "eta": 4.5}, "contracts[1].params.eta", ("[0.5, 4]", "4.5")),
    ("eta below", {**POINT_A, "eta": 0.1}, "contracts[1].params.eta", ("[0.5, 4]", "0.1")),
    ("rho positive", {**POINT_A, "rho": 0.3}, "contracts[1].params.rho", ("[-0.95, -0.1]", "0.3")),
    ("rho -1", {**POINT_A, "rho": -1.0}, "contracts[1].params.rho", ("[-0.95, -0.1]", "-1.0")),
    ("H above", {**POINT_A, "H": 0.6}, "contracts[1].params.H", ("[0.025, 0.5]", "0.6")),
    ("xi0 missing", _params_without("xi0"), "contracts[1]", ("missing explicit input(s): params.xi0",)),
    ("xi0 zero", {**POINT_A, "xi0": 0.0}, "contracts[1].params.xi0", ("[0.01, 0.16]",)),
    ("unknown kappa", {**POINT_A, "kappa": 1.5}, "contracts[1]", ("rbergomi takes params H, eta, rho, xi0", "kappa")),
]


async def test_bad_rbergomi_contracts_are_422_naming_field_and_reason(client: Client) -> None:
    for what, params, field, texts in BAD:
        bad = {**GOOD, "id": "bad", "params": params}
        r = await client.post("/v1/price", json={"contracts": [GOOD, bad]})
        err = await assert_error(r, 422, "invalid", (field,))
        [detail] = err["details"]
        assert detail["field"] == field, (what, detail)
        for text in texts:
            assert text in detail["reason"], (what, text, detail)
    # a vol is not how rbergomi takes its parameters
    r = await client.post("/v1/price", json={"contracts": [{**GOOD, "params": None, "vol": 0.2}]})
    err = await assert_error(r, 422, "invalid", ("contracts[0]",))
    assert "rbergomi takes its parameters in 'params'" in err["details"][0]["reason"], err


async def test_infinite_moments_are_refused_and_finite_ones_answered(client: Client) -> None:
    """E[S_T^n] is infinite unless rho^2 > (n - 1) / n: at rho -0.7 the stdev is refused
    naming the contract; at rho -0.9 the stdev, skew and kurtosis are all finite."""
    r = await client.post("/v1/price", json={"measures": ["stdev"], "contracts": [GOOD]})
    err = await assert_error(r, 422, "invalid", ("contracts[0]",))
    assert err["details"][0]["reason"].startswith("stdev is infinite for these parameters"), err
    steep = rbergomi("steep", "call", 100.0, {**POINT_A, "rho": -0.9}, 1.0)
    got = (await price(client, [steep], "stdev", "skew", "kurtosis"))["results"][0]
    assert got["model"] == "rbergomi", got
    for m in ("stdev", "skew", "kurtosis"):
        assert got[m] is None or math.isfinite(got[m]), got


# -- by reference ---------------------------------------------------------------------------


async def test_by_reference_takes_the_snapshots_rbergomi_parameters(client: Client) -> None:
    snap = {**snapshot(), "model_params": {"SPX": {"rbergomi": {"params": POINT_B, "fit": {"rmse": 0.002}}}}}
    snap["spots"]["NDX"], snap["discounting"]["NDX"] = 200.0, "USD"  # an underlying without them
    stored = await ok_json(await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snap), 201)
    expiry = "2027-06-18"
    contract: dict[str, Any] = {"id": "r", "right": "put", "strike": 95.0, "underlying": "SPX", "expiry": expiry}
    by_ref = await price(client, [{**contract, "process": "rbergomi"}], "price", "delta", val_datetime=VDT)
    assert by_ref["market_data"]["hash"] == stored["hash"]
    [got] = by_ref["results"]
    assert got["model"] == "rbergomi", got
    t = (date.fromisoformat(expiry) - date.fromisoformat(VDT[:10])).days / 365
    curves = snap["yield_curves"]
    explicit = {
        "id": "r",
        "right": "put",
        "strike": 95.0,
        "spot": snap["spots"]["SPX"],
        "expiry_years": t,
        "rate": ZeroCurve.model_validate(curves[snap["discounting"]["SPX"]]).zero_rate(t),
        "dividend": ZeroCurve.model_validate(snap["dividend_curves"]["SPX"]).zero_rate(t),
        "process": "rbergomi",
        "params": POINT_B,
    }
    assert (await price(client, [explicit], "price", "delta"))["results"] == [got]  # exactly
    # no rbergomi parameters for the other underlying: named
    r = await client.post(
        "/v1/price", json={"val_datetime": VDT, "contracts": [{**contract, "underlying": "NDX", "process": "rbergomi"}]}
    )
    err = await assert_error(r, 422, "no_market_data", ("contracts[0]",))
    assert "no rbergomi parameters for NDX" in err["details"][0]["reason"], err
    # parameters beside an underlying: refused
    r = await client.post(
        "/v1/price",
        json={"val_datetime": VDT, "contracts": [{**contract, "process": "rbergomi", "params": POINT_B}]},
    )
    err = await assert_error(r, 422, "invalid", ("contracts[0]",))
    assert "underlying/expiry or explicit inputs" in err["details"][0]["reason"], err


# -- outside the domain: the reference ---------------------------------------------------------


async def test_past_the_domain_the_reference_answers(client: Client) -> None:
    """An expiry of 3 years (the domain ends at 2) and a strike past the certified K/F
    range: the process's reference (COS on its simulated CF), close to the Monte Carlo."""
    book = [
        rbergomi("long", "call", 100.0, POINT_A, 3.0),
        rbergomi("far-strike", "put", 50.0, POINT_A, 1.0),
    ]
    got = (await price(client, book, "price", "mean"))["results"]
    assert [(r["model"], r["method"]) for r in got] == [("rbergomi", "reference")] * 2, got
    want, stderr = mc_prices(book)
    for r, w, se in zip(got, want, stderr, strict=True):
        bound = r["error_bound"]["price"]  # three of the reference's standard errors
        assert abs(r["price"] - w) <= bound + MC_SE * se + 1e-4 * BP, (r, w, se)


# -- the command line ------------------------------------------------------------------------


async def test_cli_prices_rbergomi_like_the_server(client: Client) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPECTRALMC_DEBUG"}
    body: dict[str, Any] = {"measures": ["price", "vega"], "contracts": [BOOK[1]]}
    proc = subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", "price"],
        input=orjson.dumps(body).decode(),
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = orjson.loads(proc.stdout)
    served = await price(client, body["contracts"], "price", "vega")
    assert out["results"] == served["results"]
    assert out["models"]["rbergomi"]["content_hash"] == served["models"]["rbergomi"]["content_hash"]
    bad = {**BOOK[1], "params": _params_without("H")}
    proc = subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", "price"],
        input=orjson.dumps({"contracts": [bad]}).decode(),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "params.H" in proc.stderr, (proc.returncode, proc.stderr)
