"""Barrier options on POST /v1/price (docs/api.md): the closed form under continuous GBM
monitoring against QuantLib and Black-Scholes (in-out parity, far barriers, rebates),
survival 1 for contracts without a barrier, Monte Carlo with monitoring dates against
the Broadie-Glasserman-Kou shifted closed form, every refusal a 422 naming the field
(never a 500), columnar and Arrow bodies refusing a barrier column, barriers by
reference against a snapshot, and answers that do not depend on the batch."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pyarrow as pa
import pytest
import QuantLib as ql  # noqa: N813 (the library's conventional alias)
import torch
from aiohttp import ClientResponse
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import CONTRACT, Client, MakeClient, assert_error
from test_arrow import bits, post_arrow, table
from test_marketdata_routes import explicit_inputs

from spectralmc_server.engine.barrier_analytic import barrier_price, bgk_shifted_level
from spectralmc_server.engine.reference import black_scholes

Row = dict[str, Any]
F64 = torch.float64
DAYS = 273  # the expiry in days: QuantLib's Actual/365 Fixed gives the same T exactly
T = DAYS / 365
BASE: Row = {
    "right": "call",
    "strike": 100.0,
    "spot": 100.0,
    "expiry_years": T,
    "rate": 0.03,
    "dividend": 0.01,
    "vol": 0.25,
}
GREEKS = ["price", "delta", "gamma", "vega", "theta", "rho", "digital"]
ALL = [*GREEKS, "survival"]
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}
MERTON = {"sigma": 0.2, "lambda": 0.5, "mu_j": -0.1, "sigma_j": 0.15}
# Monte Carlo requests take seconds (on a loaded 2-core machine, several): their tests get
# a longer deadline than the default 10 s, so that they test the answer, not the machine
MC_DEADLINE = 60.0
EVAL_DATE = ql.Date(15, 1, 2024)
QL_TYPES = {
    "down-and-out": ql.Barrier.DownOut,
    "up-and-out": ql.Barrier.UpOut,
    "down-and-in": ql.Barrier.DownIn,
    "up-and-in": ql.Barrier.UpIn,
}


# -- helpers -----------------------------------------------------------------------------


def barrier(kind: str, level: float, **more: Any) -> Row:
    return {"type": kind, "level": level, **more}


def contract(cid: str, kind: str | None = None, level: float = 0.0, **changes: Any) -> Row:
    """BASE with ``changes``, and a barrier ``kind`` at ``level`` (none without a kind);
    ``monitoring`` and ``rebate`` in ``changes`` go into the barrier."""
    extra = {k: changes.pop(k) for k in ("monitoring", "rebate") if k in changes}
    row: Row = {**BASE, "id": cid, **changes}
    if kind is not None:
        row["barrier"] = barrier(kind, level, **extra)
    return row


async def price(client: Client, body: Row) -> ClientResponse:
    return await client.post("/v1/price", json=body)


async def ok_json(r: ClientResponse) -> Row:
    text = await r.text()
    assert r.status == 200, text
    body: Row = orjson.loads(text)
    return body


async def results(client: Client, contracts: list[Row], measures: list[str], **head: Any) -> list[Row]:
    """The rows of a 200 answer, checked to come in request order."""
    out = await ok_json(await price(client, {"measures": measures, "contracts": contracts, **head}))
    rows: list[Row] = out["results"]
    assert [r["id"] for r in rows] == [c["id"] for c in contracts]
    return rows


def bs(c: Row) -> dict[str, float]:
    """Black-Scholes-Merton price and Greeks of the vanilla under a contract."""

    def t(name: str) -> torch.Tensor:
        return torch.tensor([float(c.get(name) or 0.0)], dtype=F64)

    got = black_scholes(
        t("spot"),
        t("strike"),
        t("expiry_years"),
        t("rate"),
        t("dividend"),
        t("vol"),
        torch.tensor([c["right"] == "call"]),
    )
    return {k: float(v[0]) for k, v in got.items()}


def closed_form(c: Row, level: float | None = None) -> dict[str, float]:
    """engine/barrier_analytic.py's price, vanilla and survival of a contract (at another
    level if given: the BGK-shifted one)."""
    b = c["barrier"]

    def t(value: float) -> torch.Tensor:
        return torch.tensor([value], dtype=F64)

    got = barrier_price(
        b["type"],
        c["right"],
        t(c["spot"]),
        t(c["strike"]),
        t(b["level"] if level is None else level),
        t(c["expiry_years"]),
        t(c.get("rate", 0.0)),
        t(c.get("dividend", 0.0)),
        t(c["vol"]),
        rebate=float(b.get("rebate", 0.0)),
    )
    return {k: float(v[0]) for k, v in got.items()}


def quantlib(c: Row) -> float:
    """QuantLib's AnalyticBarrierEngine (Reiner-Rubinstein), rebate 0, T = DAYS / 365."""
    assert c["expiry_years"] == T and not c["barrier"].get("rebate")
    ql.Settings.instance().evaluationDate = EVAL_DATE
    dc = ql.Actual365Fixed()
    process = ql.BlackScholesMertonProcess(
        ql.QuoteHandle(ql.SimpleQuote(c["spot"])),
        ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, c["dividend"], dc)),
        ql.YieldTermStructureHandle(ql.FlatForward(EVAL_DATE, c["rate"], dc)),
        ql.BlackVolTermStructureHandle(ql.BlackConstantVol(EVAL_DATE, ql.NullCalendar(), c["vol"], dc)),
    )
    right = ql.Option.Call if c["right"] == "call" else ql.Option.Put
    option = ql.BarrierOption(
        QL_TYPES[c["barrier"]["type"]],
        c["barrier"]["level"],
        0.0,
        ql.PlainVanillaPayoff(right, c["strike"]),
        ql.EuropeanExercise(EVAL_DATE + DAYS),
    )
    option.setPricingEngine(ql.AnalyticBarrierEngine(process))
    return float(option.NPV())


def close(got: float, want: float, rel: float, unit: float = 1.0) -> bool:
    return abs(got - want) <= rel * max(abs(want), unit)


# -- the closed form (GBM, continuous monitoring) -----------------------------------------


async def test_continuous_gbm_is_the_closed_form_with_parity(make_client: MakeClient) -> None:
    client = await make_client()
    book = [
        contract("doc", "down-and-out", 90.0),
        contract("dic", "down-and-in", 90.0),
        contract("uop", "up-and-out", 115.0, right="put", strike=105.0),
        contract("uip", "up-and-in", 115.0, right="put", strike=105.0),
    ]
    rows = {r["id"]: r for r in await results(client, book, ALL)}
    by_id = {c["id"]: c for c in book}
    for cid, row in rows.items():
        assert row["method"] == "analytic", row
        assert row["model"] == "gbm", row
        assert set(row) == {"id", "model", "method", "error_bound", *ALL}, row
        assert set(row["error_bound"]) == set(ALL), row
        for m in ALL:  # 1e-10 of each measure's unit (price: 1e-10 of max(S, K); theta: of max(S, K) / T)
            bound = row["error_bound"][m]
            assert isinstance(bound, float) and 0 < bound <= 2e-8, (cid, m, bound)
        assert 0 < row["survival"] < 1, row
        assert row["price"] > 0, row
    for out, into in (("doc", "dic"), ("uop", "uip")):
        vanilla = bs(by_id[out])
        # in + out = vanilla: the knock-in is built by parity, so to rounding, Greeks too
        for m in GREEKS:
            total = rows[out][m] + rows[into][m]
            assert close(total, vanilla[m], 1e-10), (out, m, total, vanilla[m])
        assert close(rows[out]["price"] + rows[into]["price"], vanilla["price"], 1e-12), (out, vanilla)
        assert rows[out]["survival"] == rows[into]["survival"]
        # QuantLib's Reiner-Rubinstein for both (rebate 0: the two rebate conventions agree)
        for cid in (out, into):
            want = quantlib(by_id[cid])
            assert close(rows[cid]["price"], want, 1e-8), (cid, rows[cid]["price"], want)
            assert abs(rows[cid]["price"] - want) <= rows[cid]["error_bound"]["price"], (cid, want, rows[cid])
        # and the engine's own closed form, bit for bit
        assert rows[out]["price"] == closed_form(by_id[out])["price"]
        assert rows[out]["survival"] == closed_form(by_id[out])["survival"]


async def test_a_far_barrier_is_the_vanilla(make_client: MakeClient) -> None:
    client = await make_client()
    book = [
        contract("far-do", "down-and-out", 0.1),  # 1e-3 of spot
        contract("far-di", "down-and-in", 0.1),
        contract("far-uo", "up-and-out", 1e5, right="put"),  # 1e3 spot
        contract("far-ui", "up-and-in", 1e5, right="put"),
    ]
    rows = await results(client, book, ["price", "delta", "survival"])
    for c, row in zip(book, rows, strict=True):
        assert row["method"] == "analytic", row
        assert row["survival"] == pytest.approx(1.0, abs=1e-12, rel=0), row
        vanilla = bs(c)
        if c["barrier"]["type"].endswith("-out"):
            assert close(row["price"], vanilla["price"], 1e-10), (row, vanilla)
            assert close(row["delta"], vanilla["delta"], 1e-10), (row, vanilla)
        else:  # never knocked in: worth nothing
            assert abs(row["price"]) <= 1e-10 * vanilla["price"], row


async def test_rebate_parity(make_client: MakeClient) -> None:
    client = await make_client()
    rebate = 2.5
    book = [
        contract("o", "down-and-out", 90.0, rebate=rebate),
        contract("i", "down-and-in", 90.0, rebate=rebate),
        contract("o0", "down-and-out", 90.0),
        contract("i0", "down-and-in", 90.0),
        contract("uo", "up-and-out", 120.0, rebate=rebate, right="put"),
        contract("ui", "up-and-in", 120.0, rebate=rebate, right="put"),
    ]
    rows = {r["id"]: r for r in await results(client, book, ["price", "survival"])}
    disc = math.exp(-BASE["rate"] * T)
    for out, into, c in (("o", "i", book[0]), ("uo", "ui", book[4])):
        assert rows[out]["method"] == rows[into]["method"] == "analytic"
        want = bs(c)["price"] + rebate * disc
        got = rows[out]["price"] + rows[into]["price"]
        assert close(got, want, 1e-12), (out, got, want)
    # the rebate's own value: paid at expiry to a knocked-out option, or to a never-knocked-in one
    p = rows["o"]["survival"]
    assert rows["o0"]["survival"] == p
    assert close(rows["o"]["price"] - rows["o0"]["price"], rebate * disc * (1 - p), 1e-12, 1e-2)
    assert close(rows["i"]["price"] - rows["i0"]["price"], rebate * disc * p, 1e-12, 1e-2)


# -- survival without a barrier, mixed requests ----------------------------------------------


async def test_survival_of_a_vanilla_is_one_and_mixing_changes_nothing(make_client: MakeClient) -> None:
    client = await make_client()
    vanilla = [
        {**CONTRACT, "id": "v1"},
        {**BASE, "id": "v2", "right": "put", "strike": 95.0},
        {**CONTRACT, "id": "v3", "vol": 2.5, "expiry_years": 0.1},  # outside the model: its reference
    ]
    measures = ["price", "delta", "vega"]
    alone = await results(client, vanilla, measures)
    with_survival = await results(client, vanilla, [*measures, "survival"])
    for a, s in zip(alone, with_survival, strict=True):
        assert s["survival"] == 1.0 and s["error_bound"]["survival"] == 0.0, s
        assert {k: v for k, v in s.items() if k != "survival"} == {
            **a,
            "error_bound": {**a["error_bound"], "survival": 0.0},
        }
        assert bits(s) == bits({**a, "survival": 1.0, "error_bound": {**a["error_bound"], "survival": 0.0}})
    only = await results(client, vanilla, ["survival"])
    for row in only:
        assert row["survival"] == 1.0 and row["error_bound"] == {"survival": 0.0}, row
        assert row["method"] == "analytic", row

    mixed = [
        vanilla[0],
        contract("b1", "down-and-out", 90.0),
        vanilla[1],
        contract("b2", "up-and-in", 110.0),
        vanilla[2],
    ]
    rows = await results(client, mixed, [*measures, "survival"])
    by_id = {r["id"]: r for r in rows}
    for a in alone:
        got = by_id[a["id"]]
        assert got["survival"] == 1.0 and got["error_bound"]["survival"] == 0.0, got
        assert bits({k: v for k, v in got.items() if k != "survival"}) == bits(
            {**a, "error_bound": {**a["error_bound"], "survival": 0.0}}
        ), (got, a)
    for cid in ("b1", "b2"):
        assert by_id[cid]["method"] == "analytic" and 0 < by_id[cid]["survival"] < 1, by_id[cid]


# -- Monte Carlo: monitoring dates ---------------------------------------------------------


async def test_discrete_monitoring_is_monte_carlo_near_the_bgk_shift(make_client: MakeClient) -> None:
    client = await make_client(request_timeout_seconds=MC_DEADLINE)
    n = 12
    discrete = contract("d", "down-and-out", 90.0, monitoring=n, expiry_years=1.0)
    continuous = contract("c", "down-and-out", 90.0, expiry_years=1.0)
    d, c = await results(client, [discrete, continuous], ["price", "delta", "survival"])
    assert d["method"] == "reference" and c["method"] == "analytic", (d, c)
    for m in ("price", "delta", "survival"):
        bound = d["error_bound"][m]
        assert isinstance(bound, float) and bound > 0 and math.isfinite(bound), (m, d)
    vanilla = bs(discrete)["price"]
    # watched on 12 dates only, the barrier knocks out less often: worth more than the
    # continuous knock-out, less than the vanilla, and survives more
    assert c["price"] < d["price"] < vanilla, (c["price"], d["price"], vanilla)
    assert c["survival"] < d["survival"] < 1, (c["survival"], d["survival"])
    shifted = float(
        bgk_shifted_level(
            torch.tensor([90.0], dtype=F64),
            torch.tensor([0.25], dtype=F64),
            torch.tensor([1.0], dtype=F64),
            n,
            torch.tensor([True]),
        )[0]
    )
    bgk = closed_form(discrete, level=shifted)
    gap = abs(d["price"] - bgk["price"])
    assert gap <= d["error_bound"]["price"] + 4e-4 * discrete["spot"], (
        f"MC {d['price']} +- {d['error_bound']['price']} vs BGK {bgk['price']} at level {shifted}: gap {gap}"
    )
    assert abs(d["survival"] - bgk["survival"]) <= d["error_bound"]["survival"] + 0.01, (d, bgk)


# -- refusals -------------------------------------------------------------------------------


def _with_barrier(**b: Any) -> Row:
    return {**BASE, "id": "x", "barrier": {"type": "down-and-out", "level": 90.0, **b}}


INVALID: list[tuple[str, Row, str, str]] = [
    (
        "merton",
        {
            **CONTRACT,
            "id": "x",
            "vol": None,
            "process": "merton",
            "params": MERTON,
            "barrier": barrier("up-and-out", 150.0),
        },
        "contracts[0].barrier",
        "merton",
    ),
    (
        "asian",
        {**BASE, "id": "x", "process": "asian", "fixings": 12, "barrier": barrier("down-and-out", 80.0)},
        "contracts[0].barrier",
        "asian",
    ),
    ("breached down", _with_barrier(level=100.0), "contracts[0].barrier.level", "breached"),
    ("breached down below", _with_barrier(level=120.0), "contracts[0].barrier.level", "breached"),
    ("breached up", _with_barrier(type="up-and-in", level=100.0), "contracts[0].barrier.level", "breached"),
    ("breached up above", _with_barrier(type="up-and-out", level=80.0), "contracts[0].barrier.level", "breached"),
    ("level 0", _with_barrier(level=0.0), "contracts[0].barrier.level", "greater than"),
    ("level negative", _with_barrier(level=-90.0), "contracts[0].barrier.level", "greater than"),
    ("level string", _with_barrier(level="90"), "contracts[0].barrier.level", "number"),
    ("type sideways", _with_barrier(type="sideways"), "contracts[0].barrier.type", "down-and-out"),
    ("no type", {**BASE, "id": "x", "barrier": {"level": 90.0}}, "contracts[0].barrier.type", "required"),
    ("monitoring 0", _with_barrier(monitoring=0), "contracts[0].barrier.monitoring", "continuous"),
    ("monitoring 2.5", _with_barrier(monitoring=2.5), "contracts[0].barrier.monitoring", "continuous"),
    ("monitoring true", _with_barrier(monitoring=True), "contracts[0].barrier.monitoring", "continuous"),
    ("monitoring daily", _with_barrier(monitoring="daily"), "contracts[0].barrier.monitoring", "continuous"),
    ("monitoring 261", _with_barrier(monitoring=261), "contracts[0].barrier.monitoring", "260"),
    ("rebate negative", _with_barrier(rebate=-1.0), "contracts[0].barrier.rebate", "greater than"),
    ("extra key", _with_barrier(colour="red"), "contracts[0].barrier.colour", "not permitted"),
    ("not an object", {**BASE, "id": "x", "barrier": "down-and-out"}, "contracts[0].barrier", "dictionary"),
]


@pytest.mark.parametrize(("body", "field", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_invalid_barriers_are_422_naming_the_field(
    make_client: MakeClient, body: Row, field: str, words: str
) -> None:
    client = await make_client(models=["gbm"])
    good = {**BASE, "id": "ok"}
    # the culprit first, and second (its index in the field)
    err = await assert_error(await price(client, {"contracts": [body]}), 422, "invalid", (field,))
    reasons = [d["reason"] for d in err["details"] if d["field"] == field]
    assert any(words in r for r in reasons), err
    second = field.replace("contracts[0]", "contracts[1]")
    await assert_error(await price(client, {"contracts": [good, body]}), 422, "invalid", (second,))


async def test_barrier_refusals_of_the_request(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"], request_timeout_seconds=MC_DEADLINE)
    book = [{**BASE, "id": "v"}, contract("b", "down-and-out", 90.0)]
    for m in ("mean", "stdev", "skew", "kurtosis", "quantiles"):
        err = await assert_error(await price(client, {"measures": ["price", m], "contracts": book}), 422, "invalid")
        assert [d["field"] for d in err["details"]] == ["measures"], err
        assert m in err["details"][0]["reason"] and "contracts[1]" in err["details"][0]["reason"], err
    # the same measures without a barrier contract are fine
    await ok_json(await price(client, {"measures": ["price", "stdev", "survival"], "contracts": book[:1]}))

    # at most 32 barrier contracts priced by Monte Carlo in one request
    mc = [contract(f"m{i}", "down-and-out", 80.0 + 0.1 * i, monitoring=12) for i in range(33)]
    err = await assert_error(await price(client, {"contracts": mc}), 422, "invalid", ("contracts",))
    assert "33" in err["details"][0]["reason"] and "32" in err["details"][0]["reason"], err
    heston = {**contract("h", "down-and-out", 80.0), "vol": None, "process": "heston", "params": HESTON}
    err = await assert_error(await price(client, {"contracts": [*mc[:32], heston]}), 422, "invalid", ("contracts",))
    assert "33" in err["details"][0]["reason"], err
    # 32 are priced (price only, 2 dates: cheap paths), beside any number of closed forms
    mc32 = [{**c, "barrier": {**c["barrier"], "monitoring": 2}} for c in mc[:32]]
    rows = await results(client, [*mc32, contract("c", "down-and-out", 80.0)], ["price"])
    assert [r["method"] for r in rows] == ["reference"] * 32 + ["analytic"]
    # continuous GBM barriers (the closed form) do not count
    many = [contract(f"a{i}", "down-and-out", 50.0 + 0.2 * i) for i in range(200)]
    rows = await results(client, many, ["price"])
    assert {r["method"] for r in rows} == {"analytic"}
    assert (await client.get("/healthz")).status == 200


# -- columnar and Arrow bodies ----------------------------------------------------------------


async def test_columnar_and_arrow_bodies_refuse_a_barrier_column(make_client: MakeClient) -> None:
    """In columnar and Arrow books a barrier is the flattened ``barrier.<key>`` columns
    (tests/service/test_barrier_columns.py): a ``barrier`` column itself (objects, an
    Arrow struct, JSON text, numbers) is an unknown column, a 422 naming it, never a 500."""
    client = await make_client(models=["gbm"])
    cols: dict[str, list[Any]] = {
        "id": ["a", "b"],
        "right": ["call", "call"],
        "strike": [100.0, 100.0],
        "spot": [100.0, 100.0],
        "expiry_years": [T, T],
        "vol": [0.25, 0.25],
    }
    ok = await ok_json(await client.post("/v1/price", json={"columns": cols}))
    assert list(ok["columns"]["id"]) == ["a", "b"]

    def refused(err: Row, field: str) -> None:
        assert [d["field"] for d in err["details"]] == [field], err
        assert "unknown column" in err["details"][0]["reason"], err

    for name, cells in (
        ("barrier", [barrier("down-and-out", 90.0), None]),
        ("barrier", [None, None]),
    ):
        r = await client.post("/v1/price", json={"columns": {**cols, name: cells}})
        refused(await assert_error(r, 422, "invalid", (f"columns.{name}",)), f"columns.{name}")

    arrow = {k: pa.array(v) for k, v in cols.items()}
    for name, column in (
        ("barrier", pa.array([{"type": "down-and-out", "level": 90.0}, None])),
        ("barrier", pa.array(['{"type": "down-and-out", "level": 90.0}', None])),
        ("barrier", pa.array([90.0, None])),
    ):
        r = await post_arrow(client, table({**arrow, name: column}))
        refused(await assert_error(r, 422, "invalid", (f"columns.{name}",)), f"columns.{name}")
    assert (await client.get("/healthz")).status == 200


# -- by reference ---------------------------------------------------------------------------


async def test_barrier_by_reference_equals_its_explicit_inputs(make_client: MakeClient) -> None:
    client = await make_client()
    body = snapshot()
    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=body)
    assert r.status == 201, await r.text()
    book = [
        {**by_reference("r-do", 100.0, "2027-06-18"), "barrier": barrier("down-and-out", 85.0)},
        {**by_reference("r-ui", 95.0, "2027-06-18"), "right": "put", "barrier": barrier("up-and-in", 110.0)},
        {**by_reference("r-di", 100.0, "2027-06-18"), "barrier": barrier("down-and-in", 85.0, rebate=1.0)},
        by_reference("r-v", 100.0, "2027-06-18"),
    ]
    measures = ALL
    by_ref = await ok_json(await price(client, {"val_datetime": VDT, "measures": measures, "contracts": book}))
    explicit_book = [explicit_inputs(body, VDT, c) for c in book]
    assert explicit_book[0]["barrier"] == book[0]["barrier"]
    explicit = await ok_json(await price(client, {"measures": measures, "contracts": explicit_book}))
    assert [r["id"] for r in by_ref["results"]] == [c["id"] for c in book]
    assert bits(by_ref["results"]) == bits(explicit["results"])
    for row in by_ref["results"][:3]:
        assert row["method"] == "analytic" and 0 < row["survival"] < 1, row
    assert by_ref["market_data"] is not None and by_ref["market_data"]["hash"].startswith("sha256:")
    do, di = by_ref["results"][0], by_ref["results"][2]
    vanilla = bs(explicit_book[0])["price"]
    disc = math.exp(-explicit_book[0]["rate"] * explicit_book[0]["expiry_years"])
    # in(R) + out(0) = vanilla + R D P: the knock-in's rebate is paid where it never knocks in
    assert di["survival"] == do["survival"]
    assert close(do["price"] + di["price"], vanilla + 1.0 * disc * do["survival"], 1e-12)

    # the snapshot's spot (100) breaches these barriers: refused once resolved, naming the contract
    for i, b in ((1, barrier("down-and-out", 100.0)), (0, barrier("up-and-out", 99.0))):
        breached = {**by_reference("r-x", 100.0, "2027-06-18"), "barrier": b}
        contracts = [book[3], breached] if i else [breached]
        r = await price(client, {"val_datetime": VDT, "contracts": contracts})
        # the market data resolved to inputs out of range: the family of a resolution's refusals
        err = await assert_error(r, 422, "no_market_data", (f"contracts[{i}]",))
        assert [d["field"] for d in err["details"]] == [f"contracts[{i}]"], err
        assert "barrier.level" in err["message"] and "breached" in err["message"], err


# -- batch invariance -----------------------------------------------------------------------


def _mixed_book() -> list[Row]:
    """38 contracts: vanillas (learned, closed form, Heston, Merton), continuous barriers
    of every type with and without rebates, and barriers on monitoring dates."""
    kinds = [("down-and-out", 85.0), ("up-and-out", 125.0), ("down-and-in", 80.0), ("up-and-in", 130.0)]
    book: list[Row] = []
    for i in range(38):
        right = "call" if i % 2 else "put"
        strike = 90.0 + (i % 5) * 5.0
        match i % 8:
            case 0:
                book.append({**CONTRACT, "id": f"v{i}", "strike": strike, "right": right})
            case 1:
                book.append({**BASE, "id": f"x{i}", "vol": 2.0 + 0.01 * i, "expiry_years": 0.1})
            case 2:
                book.append({**BASE, "id": f"h{i}", "vol": None, "process": "heston", "params": HESTON})
            case 3:
                book.append({**BASE, "id": f"m{i}", "vol": None, "process": "merton", "params": MERTON})
            case _:
                kind, level = kinds[i % 4]
                rebate = {"rebate": 1.5} if i % 3 == 0 else {}
                book.append(contract(f"b{i}", kind, level, strike=strike, right=right, vol=0.2 + 0.005 * i, **rebate))
    book[13] = contract("d13", "down-and-out", 88.0, monitoring=6, right="put")
    book[29] = contract("d29", "up-and-out", 120.0, monitoring=4)
    return book


async def test_a_barrier_answer_does_not_depend_on_its_batch(make_client: MakeClient) -> None:
    client = await make_client(request_timeout_seconds=MC_DEADLINE)
    measures = ["price", "delta", "survival"]
    book = _mixed_book()
    target = contract("t", "down-and-out", 90.0, rebate=0.5, strike=102.0)
    target_mc = contract("t-mc", "down-and-out", 90.0, monitoring=4, strike=102.0)
    mixed = [*book[:7], target, *book[7:21], target_mc, *book[21:]]
    assert len(mixed) == 40 and sum("barrier" in c for c in mixed) >= 20
    rows = {r["id"]: r for r in await results(client, mixed, measures)}
    assert rows["t"]["method"] == "analytic" and rows["t-mc"]["method"] == "reference"
    assert {r["method"] for r in rows.values()} == {"analytic", "reference", "cvnn"}, rows
    for c in (target, target_mc):
        (alone,) = await results(client, [c], measures)
        assert bits(rows[c["id"]]) == bits(alone), (c["id"], rows[c["id"]], alone)
    # the others too: a barrier of each kind, and the vanillas beside them
    singles = [book[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 29)]
    assert {c["id"] for c in singles} >= {"v0", "x1", "h2", "m3", "b4", "b5", "b6", "b7", "d29"}
    again = await results(client, singles, measures)
    for row in again:
        assert bits(rows[row["id"]]) == bits(row), (row["id"], rows[row["id"]], row)
