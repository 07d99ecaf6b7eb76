"""Arithmetic-average Asian options served over HTTP (process ``asian``, bundled model):
contracts inside the model's domain are answered by the learned model and agree with
the control-variate Monte Carlo; ``fixings`` is validated (field and reason named);
contracts outside the domain are answered by the reference, which with one fixing is
Black-Scholes; contracts by reference take spot, rates and the surface vol from the
snapshot and their fixings from the contract; the OpenAPI description and
``spectralmc price`` know the field.

Tolerances (spot 100, so 1 bp of spot = 0.01): learned prices within 10 bp of spot of
the MC (2^16 antithetic paths with the geometric control variate, standard error below
0.5 bp); one fixing within 0.5 bp of Black-Scholes; put-call parity and the average's
forward F_A = S (1/n) sum_i e^{(r-q) i T/n} to rounding; Greeks of the learned model
equal central differences of its served price within 1e-3 relative.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import date
from statistics import NormalDist
from typing import Any

import orjson
import pytest
import torch
from marketdata_util import ASOF, VDT, snapshot
from server_util import Client, MakeClient, assert_error, ok_json, price

from spectralmc_server.engine.processes.asian import MAX_FIXINGS, asian_put_mc
from spectralmc_server.marketdata.objects import VolSurface, ZeroCurve

SPOT = 100.0
BP = SPOT * 1e-4
MC_BP = 10.0  # learned vs control-variate MC
BS_BP = 0.5  # reference with one fixing vs Black-Scholes
MC_PATHS = 1 << 16
PARITY_ABS = 1e-9  # calls are priced from puts by parity: only rounding is left
FD_STEP = 1e-3
GREEK_RTOL = 1e-3
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}

# Points inside the domain (vol [0.05, 1], carry [-0.1, 0.1], fixings [2, 64], expiry
# [0.05, 3]): a monthly one-year average, a weekly two-year one with negative carry, and
# a short one on the low fixings edge.
POINT_A = {"spot": SPOT, "expiry_years": 1.0, "rate": 0.03, "dividend": 0.01, "vol": 0.25, "fixings": 12}
POINT_B = {"spot": SPOT, "expiry_years": 2.0, "rate": 0.01, "dividend": 0.04, "vol": 0.4, "fixings": 52}
POINT_C = {"spot": SPOT, "expiry_years": 0.25, "rate": 0.02, "dividend": 0.0, "vol": 0.2, "fixings": 2}


# -- helpers -----------------------------------------------------------------------------


def asian(cid: str, right: str, strike: float, point: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """An explicit asian contract at a point."""
    return {"id": cid, "right": right, "strike": strike, "process": "asian", **point, **changes}


def average_forward(spot: float, carry: float, fixings: int, expiry: float) -> float:
    """F_A = S (1/n) sum_i e^{b t_i}, t_i = i T / n."""
    return spot * sum(math.exp(carry * i * expiry / fixings) for i in range(1, fixings + 1)) / fixings


def forward_of(c: dict[str, Any]) -> float:
    return average_forward(c["spot"], c["rate"] - c["dividend"], c["fixings"], c["expiry_years"])


def mc_prices(contracts: list[dict[str, Any]]) -> list[float]:
    """Money prices by ``asian_put_mc`` (a put in units of F_A): put = D F_A mc(K / F_A),
    call = put + D (F_A - K)."""
    theta = torch.tensor(
        [[c["vol"], c["rate"] - c["dividend"], float(c["fixings"])] for c in contracts], dtype=torch.float64
    )  # (B, 3)
    expiry = torch.tensor([c["expiry_years"] for c in contracts], dtype=torch.float64)  # (B,)
    fwd = [forward_of(c) for c in contracts]
    log_kappa = torch.tensor([[math.log(c["strike"] / f)] for c, f in zip(contracts, fwd, strict=True)])  # (B, 1)
    put, stderr = asian_put_mc(theta, expiry, log_kappa.to(torch.float64), MC_PATHS, seed=7)
    out = []
    for k, (c, f) in enumerate(zip(contracts, fwd, strict=True)):
        disc = math.exp(-c["rate"] * c["expiry_years"])
        assert disc * f * float(stderr[k, 0]) < 0.5 * BP, (c, float(stderr[k, 0]))  # the MC itself is tight
        p = disc * f * float(put[k, 0])
        out.append(p + disc * (f - c["strike"]) if c["right"] == "call" else p)
    return out


def black_scholes(c: dict[str, Any]) -> float:
    s, k, t, r, q, vol = (float(c[n]) for n in ("spot", "strike", "expiry_years", "rate", "dividend", "vol"))
    n = NormalDist().cdf
    d1 = (math.log(s / k) + (r - q + 0.5 * vol * vol) * t) / (vol * math.sqrt(t))
    d2 = d1 - vol * math.sqrt(t)
    call = s * math.exp(-q * t) * n(d1) - k * math.exp(-r * t) * n(d2)
    return call if c["right"] == "call" else call - s * math.exp(-q * t) + k * math.exp(-r * t)


async def served_identity(client: Client, name: str) -> dict[str, Any]:
    models = (await ok_json(await client.get("/v1/models")))["models"]
    m = next(m for m in models if m["name"] == name)
    return {"version": m["version"], "content_hash": m["content_hash"]}


async def contracts_priced(client: Client) -> float:
    """Sum of spectralmc_contracts_priced_total over its labels."""
    text = await (await client.get("/metrics")).text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("spectralmc_contracts_priced_total")
    )


def assert_parity(call: dict[str, Any], put: dict[str, Any], c: dict[str, Any]) -> None:
    """C - P = D (F_A - K) for a call and a put on one average and strike."""
    disc = math.exp(-c["rate"] * c["expiry_years"])
    want = disc * (forward_of(c) - c["strike"])
    assert call["price"] - put["price"] == pytest.approx(want, abs=PARITY_ABS), (call, put, want)


# -- in the domain: the learned model ---------------------------------------------------


async def test_in_domain_asians_are_learned_and_agree_with_the_mc(make_client: MakeClient) -> None:
    client = await make_client()  # the default settings serve asian next to gbm, heston, merton
    pairs = [(POINT_A, 105.0), (POINT_B, 90.0), (POINT_C, 100.0)]
    book = []
    for k, (point, strike) in enumerate(pairs):
        book += [asian(f"call-{k}", "call", strike, point), asian(f"put-{k}", "put", strike, point)]
    # vol given as params.vol is the same contract
    a = {k: v for k, v in book[0].items() if k != "vol"}
    book.append({**a, "id": "call-0-params", "params": {"vol": POINT_A["vol"]}})
    body = await price(client, book, "price", "mean")
    got = body["results"]
    assert [r["id"] for r in got] == [c["id"] for c in book]
    assert [(r["model"], r["method"]) for r in got] == [("asian", "cvnn")] * len(book), got
    identity = await served_identity(client, "asian")
    assert identity["version"] == 1 and identity["content_hash"].startswith("sha256:"), identity
    assert body["models"] == {"asian": identity}
    assert body["market_data"] is None

    want = mc_prices(book[:-1])
    for r, c, w in zip(got[:-1], book[:-1], want, strict=True):
        assert abs(r["price"] - w) / BP < MC_BP, (c, r, w)
        # the measures describe the average A: its mean is F_A, not the spot's forward
        assert r["mean"] == pytest.approx(forward_of(c), rel=1e-12, abs=0), (c, r)
    assert got[0]["mean"] < SPOT * math.exp(0.02 * 1.0)  # F_A sits below F(T) with positive carry
    for k, (point, strike) in enumerate(pairs):
        assert_parity(got[2 * k], got[2 * k + 1], asian("", "call", strike, point))
    assert {**got[-1], "id": "call-0"} == got[0]  # params.vol, exactly the same answer


async def test_learned_greeks_are_derivatives_of_the_served_price(make_client: MakeClient) -> None:
    """vega (vol), theta (-d/dT, the fixings moving with T), rho (the rate moves the
    discount and the carry) and delta, against central differences of the price."""
    client = await make_client()
    cases = [asian("a", "call", 105.0, POINT_A), asian("b", "put", 90.0, POINT_B)]
    bumps = [("vega", "vol", FD_STEP, 1.0), ("theta", "expiry_years", FD_STEP, -1.0), ("rho", "rate", FD_STEP, 1.0)]
    bumps.append(("delta", "spot", 0.01, 1.0))
    rows = []
    for c in cases:
        rows.append(c)
        for _, field, h, _ in bumps:
            rows += [{**c, "id": f"{c['id']}-{field}+", field: c[field] + h}]
            rows += [{**c, "id": f"{c['id']}-{field}-", field: c[field] - h}]
    asked = ("price", "delta", "vega", "theta", "rho")
    got = (await price(client, rows, *asked))["results"]
    assert {r["method"] for r in got} == {"cvnn"}, got
    # A learned measure whose certified bound passes the tolerance is withheld (the Asian's
    # reference is a simulation the server does not run in its place): null, with its
    # error_bound null and a warning naming it. Only served values are compared.
    for r in got:
        warned = {w.split(":", 1)[0] for w in r.get("warnings", [])}
        withheld = {m for m in asked if r[m] is None}
        assert warned == withheld, (r["id"], warned, withheld)
        assert all(r["error_bound"][m] is None for m in withheld), r
    per_case = 1 + 2 * len(bumps)
    compared = 0
    for k, c in enumerate(cases):
        base = got[k * per_case]
        for b, (greek, _, h, sign) in enumerate(bumps):
            up, down = got[k * per_case + 1 + 2 * b], got[k * per_case + 2 + 2 * b]
            if None in (base[greek], up["price"], down["price"]):
                continue  # withheld: checked above
            fd = sign * (up["price"] - down["price"]) / (2 * h)
            assert fd == pytest.approx(base[greek], rel=GREEK_RTOL), (c["id"], greek, base[greek], fd)
            compared += 1
    assert compared > 0  # the put's delta is withheld at this point; the rest are served


# -- validation --------------------------------------------------------------------------


def _without(c: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in c.items() if k not in names}


GOOD = asian("ok", "call", 105.0, POINT_A)
HESTON_CONTRACT = {**_without(GOOD, "vol", "fixings"), "process": "heston", "params": HESTON}
BAD: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    # what, contract, the field named, texts in the reason
    ("missing fixings", _without(GOOD, "fixings"), "contracts[1]", ("asian needs 'fixings'", "1 to 64")),
    ("fixings null", {**GOOD, "fixings": None}, "contracts[1]", ("asian needs 'fixings'",)),
    ("fixings 0", {**GOOD, "fixings": 0}, "contracts[1].fixings", ("greater than or equal to 1", "got 0")),
    ("fixings 65", {**GOOD, "fixings": 65}, "contracts[1].fixings", ("less than or equal to 64", "got 65")),
    ("fixings 12.5", {**GOOD, "fixings": 12.5}, "contracts[1].fixings", ("valid integer", "12.5")),
    ("fixings 12.0", {**GOOD, "fixings": 12.0}, "contracts[1].fixings", ("valid integer", "12.0")),  # strict
    ("fixings '12'", {**GOOD, "fixings": "12"}, "contracts[1].fixings", ("valid integer", "'12'")),
    ("fixings true", {**GOOD, "fixings": True}, "contracts[1].fixings", ("valid integer", "True")),
    ("fixings on gbm", {**GOOD, "process": "gbm"}, "contracts[1]", ("'fixings'", "asian", "not gbm")),
    ("gbm by default", _without(GOOD, "process"), "contracts[1]", ("'fixings'", "not gbm")),
    ("fixings on heston", {**HESTON_CONTRACT, "fixings": 12}, "contracts[1]", ("'fixings'", "not heston")),
    (
        "params carry",
        {**_without(GOOD, "vol"), "params": {"vol": 0.25, "carry": 0.02}},
        "contracts[1]",
        ("only 'vol' in params", "carry"),
    ),
    (
        "params fixings as well",
        {**_without(GOOD, "vol"), "params": {"vol": 0.25, "fixings": 12}},
        "contracts[1]",
        ("only 'vol' in params", "fixings"),
    ),
    (
        "fixings in params only",
        {**_without(GOOD, "vol", "fixings"), "params": {"vol": 0.25, "fixings": 12}},
        "contracts[1]",
        ("asian needs 'fixings'",),
    ),
    ("no vol", _without(GOOD, "vol"), "contracts[1]", ("missing explicit input(s): vol",)),
    ("empty params", {**_without(GOOD, "vol"), "params": {}}, "contracts[1]", ("missing explicit input(s): vol",)),
    ("vol twice", {**GOOD, "params": {"vol": 0.25}}, "contracts[1]", ("either as 'vol' or in 'params'",)),
    ("params.vol 0", {**_without(GOOD, "vol"), "params": {"vol": 0.0}}, "contracts[1].params.vol", ("[0.001, 5]",)),
]


async def test_bad_asian_contracts_are_422_naming_field_and_reason(make_client: MakeClient) -> None:
    client = await make_client()
    for what, bad, field, texts in BAD:
        r = await client.post("/v1/price", json={"contracts": [GOOD, {**bad, "id": "bad"}]})
        err = await assert_error(r, 422, "invalid", (field,))
        [detail] = err["details"]
        assert detail["field"] == field, (what, detail)
        for text in texts:
            assert text in detail["reason"], (what, text, detail)
    assert await contracts_priced(client) == 0  # nothing was priced, not even the good one
    assert (await price(client, [GOOD]))["results"][0]["method"] == "cvnn"  # alone it is fine
    assert await contracts_priced(client) == 1


# -- outside the domain: the reference ---------------------------------------------------


async def test_outside_the_domain_the_reference_answers(make_client: MakeClient) -> None:
    """One fixing (an average of S(T) alone: a European) and a carry of 0.3; two points,
    a call and a put on each."""
    client = await make_client()
    one = {**POINT_A, "fixings": 1}
    carry = {**POINT_A, "rate": 0.31, "dividend": 0.01}
    book = [
        asian("one-call", "call", 105.0, one),
        asian("one-put", "put", 105.0, one),
        asian("carry-call", "call", 110.0, carry),
        asian("carry-put", "put", 110.0, carry),
    ]
    body = await price(client, book, "price", "mean")
    got = body["results"]
    assert [(r["model"], r["method"]) for r in got] == [("asian", "reference")] * 4, got
    assert body["models"] == {}  # no model answered
    for r, c in zip(got[:2], book[:2], strict=True):
        assert abs(r["price"] - black_scholes(c)) / BP < BS_BP, (c, r, black_scholes(c))
    assert_parity(got[0], got[1], book[0])
    assert_parity(got[2], got[3], book[2])
    for r, c in zip(got, book, strict=True):
        assert r["mean"] == pytest.approx(forward_of(c), rel=1e-12, abs=0), (c, r)
    assert got[0]["mean"] == pytest.approx(SPOT * math.exp(0.02), rel=1e-12)  # one fixing: the forward F(T)


# -- by reference ------------------------------------------------------------------------


def explicit_asian(snap: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """The explicit asian contract a by-reference one stands for: the snapshot's spot,
    zero rates at T (ACT/365F from the valuation date) and surface vol at the strike and
    F(T); the contract's own fixings."""
    name = c["underlying"]
    t = (date.fromisoformat(c["expiry"]) - date.fromisoformat(VDT[:10])).days / 365
    spot = float(snap["spots"][name])
    rate = ZeroCurve.model_validate(snap["yield_curves"][snap["discounting"][name]]).zero_rate(t)
    dividend = ZeroCurve.model_validate(snap["dividend_curves"][name]).zero_rate(t)
    vol = VolSurface.model_validate(snap["vol_surfaces"][name]).vol(
        c["strike"], t, spot * math.exp((rate - dividend) * t)
    )
    out = {k: v for k, v in c.items() if k not in ("underlying", "expiry")}
    return {**out, "spot": spot, "expiry_years": t, "rate": rate, "dividend": dividend, "vol": vol}


async def test_asian_by_reference_equals_its_explicit_inputs(make_client: MakeClient) -> None:
    client = await make_client()
    snap = snapshot()
    stored = await ok_json(await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snap), 201)
    ref = {"right": "call", "underlying": "SPX", "process": "asian"}
    book = [
        {**ref, "id": "monthly", "strike": 100.0, "expiry": "2027-06-18", "fixings": 12},
        {**ref, "id": "weekly-put", "right": "put", "strike": 110.0, "expiry": "2027-11-26", "fixings": 52},
    ]
    measures = ("price", "delta", "vega", "theta", "rho", "mean", "stdev")
    by_ref = await price(client, book, *measures, val_datetime=VDT)
    assert by_ref["market_data"] == {
        "namespace": "default",
        "val_datetime": VDT,
        "data_asof": ASOF,
        "hash": stored["hash"],
    }
    explicit_book = [explicit_asian(snap, c) for c in book]
    assert explicit_book[1]["expiry_years"] == 1.0
    assert explicit_book[0]["vol"] != explicit_book[1]["vol"]  # the surface's vol at each strike
    got = by_ref["results"]
    assert [(r["model"], r["method"]) for r in got] == [("asian", "cvnn")] * 2, got
    # the response shows the snapshot's inputs and the contract's fixings: mean is F_A
    for r, c in zip(got, explicit_book, strict=True):
        assert r["mean"] == pytest.approx(forward_of(c), rel=1e-12, abs=0), (r, c)
        assert r["mean"] != pytest.approx(average_forward(c["spot"], c["rate"], c["fixings"], c["expiry_years"]))
    explicit = await price(client, explicit_book, *measures)
    assert explicit["results"] == got  # exactly, every measure
    assert explicit["models"] == by_ref["models"] == {"asian": await served_identity(client, "asian")}

    for bad, texts in [
        ({k: v for k, v in book[0].items() if k != "fixings"}, ("asian needs 'fixings'",)),
        ({**book[0], "process": "gbm"}, ("'fixings'", "not gbm")),
        ({**book[0], "vol": 0.2}, ("underlying/expiry or explicit inputs", "vol")),
    ]:
        r = await client.post("/v1/price", json={"val_datetime": VDT, "contracts": [bad]})
        err = await assert_error(r, 422, "invalid", ("contracts[0]",))
        for text in texts:
            assert text in err["details"][0]["reason"], (bad, text, err)


# -- OpenAPI and the command line -------------------------------------------------------


async def test_openapi_describes_fixings(make_client: MakeClient) -> None:
    client = await make_client()
    spec = await ok_json(await client.get("/v1/openapi.json"))
    props = spec["components"]["schemas"]["Contract"]["properties"]
    fixings = props["fixings"]
    integer = [s for s in fixings.get("anyOf", [fixings]) if s.get("type") == "integer"]
    assert integer == [{"type": "integer", "minimum": 1, "maximum": MAX_FIXINGS}], fixings
    assert "fixings" not in spec["components"]["schemas"]["Contract"].get("required", [])


def _cli_price(body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``spectralmc price`` (bundled models) with ``body`` on stdin."""
    env = {k: v for k, v in os.environ.items() if k != "SPECTRALMC_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", "price"],
        input=orjson.dumps(body).decode(),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_cli_prices_an_asian_like_the_server(make_client: MakeClient) -> None:
    """The answer is the server's, byte for byte; a bad contract exits 2 with one line
    naming the field and the reason."""
    contract = asian("a", "put", 95.0, POINT_B)
    proc = _cli_price({"measures": ["price", "mean"], "contracts": [contract]})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    out = orjson.loads(lines[0])
    [row] = out["results"]
    assert (row["model"], row["method"]) == ("asian", "cvnn"), row
    client = await make_client()
    served = await price(client, [contract], "price", "mean")
    assert out["results"] == served["results"]  # the bundled model, the same bytes
    assert out["models"]["asian"]["content_hash"] == served["models"]["asian"]["content_hash"]

    proc = _cli_price({"contracts": [{**contract, "fixings": 65}]})
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "contracts[0].fixings" in lines[0] and "less than or equal to 64" in lines[0], lines[0]
