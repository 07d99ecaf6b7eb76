"""Market-data routes and pricing by reference over HTTP (docs/api.md): PUT/GET/list/latest
of snapshots, their errors and write token, as-of resolution, arbitrage reports, and
contracts by underlying/expiry priced exactly as their explicit inputs (one snapshot
resolution per key per batch, reproducible bytes)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import math
import re
from datetime import UTC, date, datetime
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import CONTRACT, MakeClient, app_of, assert_error, block_worker

from spectralmc_server.marketdata.objects import MarketSnapshot, VolSurface, ZeroCurve
from spectralmc_server.service import keys
from spectralmc_server.store.objects import StoreUnavailableError

Client = TestClient[Any, Any]
METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")
HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
MEASURES = ["price", "delta", "gamma", "vega", "theta", "rho", "mean", "stdev", "quantiles"]
LEVELS = [0.01, 0.25, 0.5, 0.75, 0.99]
VDT2 = "2026-11-27T16:00:00Z"
ASOF2 = "2026-11-26T16:30:00Z"  # later than ASOF under VDT
BETWEEN = "2026-11-26T16:10:00Z"  # ASOF < BETWEEN < ASOF2
ASOF3 = "2026-11-26T17:00:00Z"


# -- helpers -----------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name{labels}`` in Prometheus text (0 when absent: a
    labelled counter appears only once it has been touched)."""
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m is None or m["name"] != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m["value"])
    return 0.0


async def metrics_text(client: Client) -> str:
    r = await client.get("/metrics")
    assert r.status == 200
    return await r.text()


async def put(
    client: Client,
    body: Any,
    vdt: str = VDT,
    asof: str = ASOF,
    namespace: str = "default",
    headers: dict[str, str] | None = None,
) -> ClientResponse:
    return await client.put(f"/v1/marketdata/{namespace}/{vdt}/{asof}", json=body, headers=headers)


async def put_ok(client: Client, body: Any, vdt: str = VDT, asof: str = ASOF, namespace: str = "default") -> str:
    """PUT a new snapshot (201) and return its hash."""
    r = await put(client, body, vdt, asof, namespace)
    out = await ok_json(r, 201)
    assert out["created"] is True
    content_hash: str = out["hash"]
    return content_hash


async def ok_json(r: ClientResponse, status: int = 200) -> dict[str, Any]:
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json", r.content_type
    body: dict[str, Any] = orjson.loads(text)
    return body


async def price(client: Client, body: dict[str, Any]) -> ClientResponse:
    return await client.post("/v1/price", json=body)


def normalized(body: dict[str, Any]) -> dict[str, Any]:
    """A snapshot body as the server stores and returns it (defaults filled, floats)."""
    data: dict[str, Any] = MarketSnapshot.model_validate(body).model_dump(mode="json")
    return data


def reversed_keys(value: Any) -> Any:
    """The same JSON with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_keys(v) for v in value]
    return value


def merged(*bodies: dict[str, Any]) -> dict[str, Any]:
    """Snapshot bodies of different underlyings as one (they share the USD curve)."""
    out: dict[str, Any] = {}
    for b in bodies:
        for section, items in b.items():
            out.setdefault(section, {}).update(copy.deepcopy(items))
    return out


def utc_date(text: str) -> date:
    return datetime.fromisoformat(text).astimezone(UTC).date()


def explicit_inputs(snap: dict[str, Any], vdt: str, contract: dict[str, Any]) -> dict[str, Any]:
    """The explicit contract a by-reference one stands for, computed from the snapshot body
    by the documented conventions (ACT/365F from val_datetime's UTC date, zero rates at T,
    vol from the surface at the strike and F(T))."""
    name = contract["underlying"]
    t = (date.fromisoformat(contract["expiry"]) - utc_date(vdt)).days / 365
    spot = float(snap["spots"][name])
    rate = ZeroCurve.model_validate(snap["yield_curves"][snap["discounting"][name]]).zero_rate(t)
    div_curve = snap.get("dividend_curves", {}).get(name)
    dividend = ZeroCurve.model_validate(div_curve).zero_rate(t) if div_curve is not None else 0.0
    out = {k: v for k, v in contract.items() if k not in ("underlying", "expiry")}
    out.update(spot=spot, expiry_years=t, rate=rate, dividend=dividend)
    assert contract.get("process", "gbm") == "gbm"  # the only process served here
    forward = spot * math.exp((rate - dividend) * t)
    out["vol"] = VolSurface.model_validate(snap["vol_surfaces"][name]).vol(contract["strike"], t, forward)
    return out


# -- PUT ---------------------------------------------------------------------------------


async def test_put_created_idempotent_conflict(make_client: MakeClient) -> None:
    client = await make_client()
    body = snapshot()
    r = await put(client, body)
    first = await ok_json(r, 201)
    assert set(first) == {
        "namespace",
        "val_datetime",
        "data_asof",
        "hash",
        "lineage",
        "stored_at",
        "created",
        "arbitrage",
    }
    assert first["namespace"] == "default"
    assert first["val_datetime"] == VDT and first["data_asof"] == ASOF
    assert HASH_RE.fullmatch(first["hash"]), first["hash"]
    assert first["lineage"] is None
    assert first["created"] is True
    assert first["arbitrage"] == []  # the sample surface is arbitrage-free
    # the hash is the SHA-256 of the content, not of the key or the time it was stored
    canonical = orjson.dumps(normalized(body), option=orjson.OPT_SORT_KEYS)
    assert first["hash"] == "sha256:" + hashlib.sha256(canonical).hexdigest()

    again = await ok_json(await put(client, body), 200)
    assert again == {**first, "created": False}  # the stored record, unchanged

    other = snapshot(spot=101.0)
    err = await assert_error(await put(client, other), 409, "conflict")
    assert first["hash"] in err["message"]

    got = await ok_json(await client.get(f"/v1/marketdata/default/{VDT}"))
    assert got["hash"] == first["hash"]
    assert got["data"] == normalized(body)
    assert got["data"]["spots"] == {"SPX": 100.0}

    text = await metrics_text(client)
    assert metric(text, "spectralmc_snapshots_put_total", outcome="created") == 1
    assert metric(text, "spectralmc_snapshots_put_total", outcome="idempotent") == 1
    assert metric(text, "spectralmc_snapshots_put_total", outcome="conflict") == 1


async def test_put_key_order_does_not_change_the_hash(make_client: MakeClient) -> None:
    client = await make_client()
    body = snapshot()
    shuffled = reversed_keys(body)
    assert orjson.dumps(shuffled) != orjson.dumps(body)
    h1 = await put_ok(client, body)
    h2 = await put_ok(client, shuffled, asof=ASOF2)
    assert h1 == h2
    # the same content in another key order under the same key is the same snapshot
    again = await ok_json(await put(client, shuffled), 200)
    assert again["created"] is False and again["hash"] == h1
    # an integer spot is the same number as a float one
    ints = snapshot()
    ints["spots"]["SPX"] = 100
    assert (await ok_json(await put(client, ints), 200))["hash"] == h1


async def test_put_key_spellings_name_one_key(make_client: MakeClient) -> None:
    """A key is an instant: the same times in another zone or spelling are the same key."""
    client = await make_client()
    h = await put_ok(client, snapshot())
    r = await put(client, snapshot(), vdt="2026-11-26T17:00:00+01:00", asof="2026-11-26T16:00:05.000Z")
    same = await ok_json(r)
    assert same["created"] is False and same["hash"] == h
    assert (same["val_datetime"], same["data_asof"]) == (VDT, ASOF)
    r = await put(client, snapshot(spot=1.0), vdt="2026-11-26T16:00:00+00:00", asof="2026-11-26T11:00:05-05:00")
    await assert_error(r, 409, "conflict")
    micro = await ok_json(await put(client, snapshot(), asof="2026-11-26T16:00:05.000001Z"), 201)
    assert micro["data_asof"] == "2026-11-26T16:00:05.000001Z"
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert [s["data_asof"] for s in listing["snapshots"]] == [ASOF, "2026-11-26T16:00:05.000001Z"]


async def test_concurrent_puts_of_one_key(make_client: MakeClient) -> None:
    """Racing writers of one key: exactly one creates it; the same content is then
    idempotent and other content a conflict."""
    client = await make_client()
    bodies = [snapshot(spot=100.0 + (i % 2)) for i in range(10)]
    responses = await asyncio.gather(*(put(client, b) for b in bodies))
    statuses = [r.status for r in responses]
    assert statuses.count(201) == 1, statuses
    winner = statuses.index(201)
    for i, r in enumerate(responses):
        if i % 2 == winner % 2:
            assert r.status in (200, 201), (i, statuses)
        else:
            await assert_error(r, 409, "conflict")
    got = await ok_json(await client.get(f"/v1/marketdata/default/{VDT}"))
    assert got["data"] == normalized(bodies[winner])


async def test_concurrent_puts_latest_is_the_greatest(make_client: MakeClient) -> None:
    client = await make_client()
    order = [7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 6, 4]
    asofs = [f"2026-11-26T16:{m:02d}:00Z" for m in order]
    hashes = await asyncio.gather(
        *(put_ok(client, snapshot(spot=100.0 + m), asof=a) for m, a in zip(order, asofs, strict=True))
    )
    assert len(set(hashes)) == len(order)
    got = await ok_json(await client.get("/v1/marketdata/default/latest"))
    assert (got["val_datetime"], got["data_asof"]) == (VDT, "2026-11-26T16:11:00Z")
    assert got["data"]["spots"] == {"SPX": 111.0}
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert [s["data_asof"] for s in listing["snapshots"]] == sorted(asofs)


async def test_put_same_content_in_another_namespace(make_client: MakeClient) -> None:
    client = await make_client()
    h1 = await put_ok(client, snapshot())
    h2 = await put_ok(client, snapshot(), namespace="desk-7")
    assert h1 == h2
    got = await ok_json(await client.get(f"/v1/marketdata/desk-7/{VDT}"))
    assert got["namespace"] == "desk-7" and got["hash"] == h1


# -- bad input ---------------------------------------------------------------------------


def _bad_curve() -> dict[str, Any]:
    body = snapshot()
    body["yield_curves"]["USD"]["pillars"] = []
    return body


def _rate_out_of_range() -> dict[str, Any]:
    body = snapshot()
    body["yield_curves"]["USD"]["pillars"][1]["zero_rate"] = 5.0
    return body


def _unordered_pillars() -> dict[str, Any]:
    body = snapshot()
    body["yield_curves"]["USD"]["pillars"].reverse()
    return body


def _negative_spot() -> dict[str, Any]:
    return snapshot(spot=-1.0)


def _ragged_surface() -> dict[str, Any]:
    body = snapshot()
    body["vol_surfaces"]["SPX"]["vols"][1] = [0.2, 0.2]
    return body


def _unknown_field() -> dict[str, Any]:
    return {**snapshot(), "colour": "red"}


def _unknown_nested_field() -> dict[str, Any]:
    body = snapshot()
    body["yield_curves"]["USD"]["pillars"][0]["tenor"] = "3M"
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_unknown_field(), "colour"),
        (_unknown_nested_field(), "yield_curves.USD.pillars[0].tenor"),
        (_bad_curve(), "yield_curves.USD.pillars"),
        (_rate_out_of_range(), "yield_curves.USD.pillars[1].zero_rate"),
        (_unordered_pillars(), "yield_curves.USD"),
        (_negative_spot(), "spots.SPX"),
        (_ragged_surface(), "vol_surfaces.SPX"),
        ({"spots": {"SPX": "abc"}}, "spots.SPX"),
        ({"discounting": {"SPX": "EUR"}}, "(body)"),  # names a curve that is not there
        ([1, 2], "(body)"),
        ("a string", "(body)"),
        (17, "(body)"),
    ],
)
async def test_put_invalid_body_422(make_client: MakeClient, body: Any, field: str) -> None:
    client = await make_client()
    await assert_error(await put(client, body), 422, "invalid", (field,))
    await assert_error(await client.get(f"/v1/marketdata/default/{VDT}"), 404, "not_found")  # nothing stored


async def test_put_malformed_body_400(make_client: MakeClient) -> None:
    client = await make_client()
    path = f"/v1/marketdata/default/{VDT}/{ASOF}"
    json_type = {"Content-Type": "application/json"}
    await assert_error(await client.put(path, data=b'{"spots": ', headers=json_type), 400, "malformed")
    await assert_error(await client.put(path, data=b"not json", headers=json_type), 400, "malformed")
    await assert_error(await client.put(path, headers=json_type), 400, "malformed")  # empty
    await assert_error(await client.put(path, data=b"null", headers=json_type), 422, "invalid", ("(body)",))


BAD_TIMES = [
    "2026-11-26T16:00:00",  # naive
    "yesterday",
    "2026-13-01T00:00:00Z",
    "2026-11-26",  # a date is not a time
    "0001-01-01T00:00:00+01:00",  # before year 1 once in UTC
    "9999-12-31T23:59:59-01:00",  # after year 9999 once in UTC
]


async def test_bad_times_in_path_and_query_422(make_client: MakeClient) -> None:
    client = await make_client()
    body = snapshot()
    await put_ok(client, body)
    for bad in BAD_TIMES:
        await assert_error(await put(client, body, vdt=bad), 422, "invalid", ("path.val_datetime",))
        await assert_error(await put(client, body, asof=bad), 422, "invalid", ("path.data_asof",))
        r = await client.get(f"/v1/marketdata/default/{bad}")
        await assert_error(r, 422, "invalid", ("path.val_datetime",))
        r = await client.get(f"/v1/marketdata/default/{VDT}", params={"asof": bad})
        await assert_error(r, 422, "invalid", ("query.asof",))
        r = await client.get("/v1/marketdata/default", params={"val_datetime": bad})
        await assert_error(r, 422, "invalid", ("query.val_datetime",))
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert listing["snapshots"] == [{"val_datetime": VDT, "data_asof": ASOF}]  # nothing else was stored


async def test_bad_namespace_422(make_client: MakeClient) -> None:
    client = await make_client()
    for ns in ["bad%20ns", ".hidden", "a%2Ab", "x" * 129, "caf%C3%A9"]:
        await assert_error(await put(client, snapshot(), namespace=ns), 422, "invalid", ("path.namespace",))
        await assert_error(await client.get(f"/v1/marketdata/{ns}/{VDT}"), 422, "invalid", ("path.namespace",))
        await assert_error(await client.get(f"/v1/marketdata/{ns}/latest"), 422, "invalid", ("path.namespace",))
        await assert_error(await client.get(f"/v1/marketdata/{ns}"), 422, "invalid", ("path.namespace",))
    await put_ok(client, snapshot(), namespace="x" * 128)  # the longest name is fine


async def test_bad_limit_422(make_client: MakeClient) -> None:
    client = await make_client()
    for limit in ["0", "-1", "1001", "abc", "1.5", "", "1e3"]:
        r = await client.get("/v1/marketdata/default", params={"limit": limit})
        await assert_error(r, 422, "invalid", ("query.limit",))
    for limit in ["1", "1000"]:
        await ok_json(await client.get("/v1/marketdata/default", params={"limit": limit}))


async def test_body_over_limit_413(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=2048)
    small = snapshot()
    assert len(orjson.dumps(small)) < 2048
    await put_ok(client, small)
    big = snapshot()
    big["spots"] = {f"U{i:04d}": 100.0 + i for i in range(200)}
    assert len(orjson.dumps(big)) > 2048
    await assert_error(await put(client, big, asof=ASOF2), 413, "too_large")
    got = await ok_json(await client.get(f"/v1/marketdata/default/{VDT}"))
    assert got["data_asof"] == ASOF  # the refused one was not stored


async def test_bad_input_is_never_a_500(make_client: MakeClient) -> None:
    """A sweep of odd requests: each is answered 4xx as JSON, and none counts as a 500."""
    client = await make_client()
    await put_ok(client, snapshot())
    attempts = [
        client.put(f"/v1/marketdata/default/{VDT}/{ASOF2}", data=b"\xff\xfe", headers={"Content-Type": "text/plain"}),
        client.put(f"/v1/marketdata/default/{VDT}/{ASOF2}", json={"spots": {"no spaces": 1.0}}),
        client.put(f"/v1/marketdata/default/{VDT}/{ASOF2}", json={"vol_surfaces": {"SPX": {"vols": "x"}}}),
        client.put(f"/v1/marketdata/default/{VDT}/{ASOF2}", json={"spots": {"SPX": float("1e400")}}),
        client.get(f"/v1/marketdata/default/{VDT}", params={"asof": "2026-11-26T16:00:05+25:00"}),
        client.get("/v1/marketdata/default/2026-11-26T16:00:00+00:00/extra/parts"),
    ]
    for r in [await a for a in attempts]:
        text = await r.text()
        assert 400 <= r.status < 500, (r.status, text)
        assert r.content_type == "application/json", text
        assert set(orjson.loads(text)) == {"error"}, text
    for cursor in ("not/a/key", "../../etc", "", "\u00e9"):  # a cursor that is no key: nothing after it, or 422
        r = await client.get("/v1/marketdata/default", params={"after": cursor})
        assert r.status in (200, 422), (cursor, r.status, await r.text())
    text = await metrics_text(client)
    assert 'status="500"' not in text


# -- write token -------------------------------------------------------------------------


async def test_write_token(make_client: MakeClient) -> None:
    client = await make_client(marketdata={"write_token": "tok"})
    body = snapshot()
    await assert_error(await put(client, body), 401, "unauthorized")
    await assert_error(await put(client, body, headers={"Authorization": "Basic tok"}), 401, "unauthorized")
    await assert_error(await put(client, body, headers={"Authorization": "Bearer nope"}), 403, "forbidden")
    await assert_error(await put(client, body, headers={"Authorization": "Bearer tokk"}), 403, "forbidden")
    # refused before the body is looked at: an invalid body without the token is still 401
    await assert_error(await put(client, [1, 2]), 401, "unauthorized")
    await assert_error(await client.get(f"/v1/marketdata/default/{VDT}"), 404, "not_found")  # nothing stored
    r = await put(client, body, headers={"Authorization": "Bearer tok"})
    created = await ok_json(r, 201)
    # reads need no token
    got = await ok_json(await client.get(f"/v1/marketdata/default/{VDT}"))
    assert got["hash"] == created["hash"]
    assert (await ok_json(await client.get("/v1/marketdata/default/latest")))["hash"] == created["hash"]
    listing = await ok_json(await client.get("/v1/marketdata/default"))
    assert listing["snapshots"] == [{"val_datetime": VDT, "data_asof": ASOF}]
    # nor does pricing by reference
    out = await ok_json(await price(client, {"val_datetime": VDT, "contracts": [by_reference()]}))
    assert out["market_data"]["hash"] == created["hash"]


async def test_without_write_token_puts_are_open(make_client: MakeClient) -> None:
    client = await make_client()
    r = await put(client, snapshot(), headers={"Authorization": "Bearer anything"})
    await ok_json(r, 201)


# -- GET: as-of, latest, listing ----------------------------------------------------------


async def _three_snapshots(client: Client) -> dict[tuple[str, str], str]:
    """(VDT2, ASOF) first, then (VDT, ASOF2), then (VDT, ASOF): put order is not key order."""
    return {
        (VDT2, ASOF): await put_ok(client, snapshot(spot=102.0), vdt=VDT2, asof=ASOF),
        (VDT, ASOF2): await put_ok(client, snapshot(spot=101.0), asof=ASOF2),
        (VDT, ASOF): await put_ok(client, snapshot(spot=100.0), asof=ASOF),
    }


AS_OF_CASES: list[tuple[str, str, str | None, str | None, float | None]] = [
    # (namespace, val_datetime, asof query, expected data_asof or None for 404, expected spot)
    ("default", VDT, "2026-11-26T16:00:04Z", None, None),  # before the first
    ("default", VDT, "2026-11-26T16:00:04.999999Z", None, None),
    ("default", VDT, ASOF, ASOF, 100.0),  # exactly on the first
    ("default", VDT, "2026-11-26T11:00:05-05:00", ASOF, 100.0),  # the same instant in another zone
    ("default", VDT, BETWEEN, ASOF, 100.0),  # between the two
    ("default", VDT, "2026-11-26T16:29:59.999999Z", ASOF, 100.0),
    ("default", VDT, ASOF2, ASOF2, 101.0),  # exactly on the second
    ("default", VDT, "2030-01-01T00:00:00Z", ASOF2, 101.0),  # after the last
    ("default", VDT, None, ASOF2, 101.0),  # no asof: the latest
    ("default", VDT2, None, ASOF, 102.0),
    ("default", VDT2, "2026-11-26T16:00:00Z", None, None),
    ("default", "2026-11-26T16:00:01Z", None, None, None),  # no such val_datetime
    ("default", "2026-11-26T11:00:00-05:00", None, ASOF2, 101.0),  # VDT in another zone
    ("other", VDT, None, None, None),  # another namespace
    ("other", VDT, ASOF2, None, None),
]


async def test_get_as_of_table(make_client: MakeClient) -> None:
    client = await make_client()
    hashes = await _three_snapshots(client)
    for ns, vdt, asof, want_asof, want_spot in AS_OF_CASES:
        params = {} if asof is None else {"asof": asof}
        r = await client.get(f"/v1/marketdata/{ns}/{vdt}", params=params)
        case = (ns, vdt, asof)
        if want_asof is None:
            await assert_error(r, 404, "not_found")
            continue
        got = await ok_json(r)
        want_vdt = VDT2 if vdt == VDT2 else VDT
        assert got["namespace"] == ns, case
        assert got["val_datetime"] == want_vdt, case
        assert got["data_asof"] == want_asof, case
        assert got["hash"] == hashes[(want_vdt, want_asof)], case
        assert got["data"]["spots"] == {"SPX": want_spot}, case
        assert want_spot is not None
        assert got["data"] == normalized(snapshot(spot=want_spot)), case
        assert got["arbitrage"] == [], case
        assert got["lineage"] is None, case


async def test_latest(make_client: MakeClient) -> None:
    client = await make_client()
    await assert_error(await client.get("/v1/marketdata/default/latest"), 404, "not_found")
    hashes = await _three_snapshots(client)
    got = await ok_json(await client.get("/v1/marketdata/default/latest"))
    assert (got["val_datetime"], got["data_asof"]) == (VDT2, ASOF)  # the greatest key, not the last put
    assert got["hash"] == hashes[(VDT2, ASOF)]
    assert got["data"]["spots"] == {"SPX": 102.0}
    # a later data_asof under the greatest val_datetime moves it
    h = await put_ok(client, snapshot(spot=103.0), vdt=VDT2, asof=ASOF3)
    got = await ok_json(await client.get("/v1/marketdata/default/latest"))
    assert (got["val_datetime"], got["data_asof"], got["hash"]) == (VDT2, ASOF3, h)
    # an earlier key put afterwards does not
    await put_ok(client, snapshot(spot=99.0), vdt="2026-11-25T16:00:00Z", asof="2026-11-28T00:00:00Z")
    got = await ok_json(await client.get("/v1/marketdata/default/latest"))
    assert (got["val_datetime"], got["data_asof"]) == (VDT2, ASOF3)
    await assert_error(await client.get("/v1/marketdata/other/latest"), 404, "not_found")


async def test_list_pages_in_time_order(make_client: MakeClient) -> None:
    client = await make_client()
    await _three_snapshots(client)
    want = [
        {"val_datetime": VDT, "data_asof": ASOF},
        {"val_datetime": VDT, "data_asof": ASOF2},
        {"val_datetime": VDT2, "data_asof": ASOF},
    ]
    whole = await ok_json(await client.get("/v1/marketdata/default"))
    assert whole == {"namespace": "default", "snapshots": want, "next": None}

    seen: list[dict[str, str]] = []
    params: dict[str, str] = {"limit": "1"}
    pages = 0
    while True:
        page = await ok_json(await client.get("/v1/marketdata/default", params=params))
        pages += 1
        assert len(page["snapshots"]) <= 1
        seen += page["snapshots"]
        if page["next"] is None:
            break
        assert pages < 10, "the listing does not end"
        params = {"limit": "1", "after": page["next"]}
    assert seen == want
    assert pages == 3

    two = await ok_json(await client.get("/v1/marketdata/default", params={"limit": "2"}))
    assert two["snapshots"] == want[:2] and two["next"] is not None
    rest = await ok_json(await client.get("/v1/marketdata/default", params={"limit": "2", "after": two["next"]}))
    assert rest["snapshots"] == want[2:] and rest["next"] is None

    only = await ok_json(await client.get("/v1/marketdata/default", params={"val_datetime": VDT}))
    assert only["snapshots"] == want[:2] and only["next"] is None
    # the same instant spelled in another zone
    only = await ok_json(
        await client.get("/v1/marketdata/default", params={"val_datetime": "2026-11-27T17:00:00+01:00"})
    )
    assert only["snapshots"] == want[2:]
    paged = await ok_json(await client.get("/v1/marketdata/default", params={"val_datetime": VDT, "limit": "1"}))
    assert paged["snapshots"] == want[:1] and paged["next"] is not None
    nxt = {"val_datetime": VDT, "limit": "1", "after": paged["next"]}
    paged = await ok_json(await client.get("/v1/marketdata/default", params=nxt))
    assert paged["snapshots"] == want[1:2]
    none = await ok_json(await client.get("/v1/marketdata/default", params={"val_datetime": "2026-01-01T00:00:00Z"}))
    assert none["snapshots"] == [] and none["next"] is None

    empty = await ok_json(await client.get("/v1/marketdata/other"))
    assert empty == {"namespace": "other", "snapshots": [], "next": None}


# -- arbitrage ---------------------------------------------------------------------------


async def test_calendar_arbitrage_is_reported_not_refused(make_client: MakeClient) -> None:
    client = await make_client()
    body = merged(snapshot(), snapshot(spot=50.0, underlying="NDX"))
    # NDX: total variance falls from 0.25 y (vol 0.50) to 1 y (vol 0.20) at every moneyness
    body["vol_surfaces"]["NDX"] = {
        "strike_kind": "moneyness",
        "expiries_years": [0.25, 1.0],
        "strikes": [0.9, 1.0, 1.1],
        "vols": [[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]],
    }
    out = await ok_json(await put(client, body), 201)
    calendar = [a for a in out["arbitrage"] if a["kind"] == "calendar"]
    assert calendar, out["arbitrage"]
    assert {a["underlying"] for a in calendar} == {"NDX"}  # SPX's surface is clean
    assert all(a["expiry_years"] == 1.0 for a in calendar), calendar
    assert {a["strike"] for a in calendar} == {0.9, 1.0, 1.1}
    assert all(isinstance(a["reason"], str) and a["reason"] for a in calendar)
    got = await ok_json(await client.get(f"/v1/marketdata/default/{VDT}"))
    assert got["arbitrage"] == out["arbitrage"]
    assert got["hash"] == out["hash"]


# -- pricing by reference ------------------------------------------------------------------


def _book_snapshot() -> dict[str, Any]:
    """SPX (vols inside the model's domain) and HV (vols above it)."""
    return merged(snapshot(), snapshot(spot=50.0, vol=1.5, underlying="HV"))


def _book() -> list[dict[str, Any]]:
    return [
        by_reference("in-atm", 100.0, "2027-06-18"),
        by_reference("in-otm", 125.0, "2027-02-19"),  # between curve pillars and surface expiries
        {**by_reference("in-put", 85.0, "2027-11-26"), "right": "put"},
        by_reference("in-short", 100.0, "2026-12-18"),  # before the first pillar: flat extrapolation
        by_reference("out-long", 100.0, "2031-12-19"),  # 5 years: past the model's expiry range
        by_reference("out-vol", 50.0, "2027-06-18", underlying="HV"),  # vol 1.5: past the vol range
    ]


async def test_by_reference_equals_explicit(make_client: MakeClient) -> None:
    client = await make_client()
    body = _book_snapshot()
    h = await put_ok(client, body)
    book = _book()
    request = {"val_datetime": VDT, "measures": MEASURES, "quantile_levels": LEVELS, "contracts": book}
    by_ref = await ok_json(await price(client, request))
    explicit_book = [explicit_inputs(body, VDT, c) for c in book]
    explicit = await ok_json(
        await price(client, {"measures": MEASURES, "quantile_levels": LEVELS, "contracts": explicit_book})
    )

    methods = {row["id"]: row["method"] for row in by_ref["results"]}
    assert methods == {
        "in-atm": "cvnn",
        "in-otm": "cvnn",
        "in-put": "cvnn",
        "in-short": "cvnn",
        "out-long": "reference",
        "out-vol": "reference",
    }
    assert [row["id"] for row in by_ref["results"]] == [c["id"] for c in book]
    for got, want in zip(by_ref["results"], explicit["results"], strict=True):
        # every row carries its certified bounds (one per measure), and warnings only where it has some
        assert set(got) - {"warnings"} == {"id", "model", "method", "error_bound", *MEASURES}, got
        assert set(got["error_bound"]) == set(MEASURES), got
        for m in MEASURES:
            assert got[m] == want[m], (got["id"], m, got[m], want[m])  # exactly equal, no tolerance
        assert got == want
    assert by_ref["models"] == explicit["models"]
    assert by_ref["market_data"] == {"namespace": "default", "val_datetime": VDT, "data_asof": ASOF, "hash": h}
    assert explicit["market_data"] is None
    assert by_ref["val_datetime"] == VDT and by_ref["data_asof"] is None

    # an explicit-only request that names a val_datetime still uses no snapshot
    named = await ok_json(await price(client, {"val_datetime": VDT, "contracts": explicit_book[:2]}))
    assert named["market_data"] is None
    # a mixed request: both kinds, in request order, with the snapshot named
    mixed_book = [explicit_book[0] | {"id": "x-explicit"}, book[1], CONTRACT]
    mixed_request = {"val_datetime": VDT, "measures": MEASURES, "quantile_levels": LEVELS, "contracts": mixed_book}
    mixed = await ok_json(await price(client, mixed_request))
    assert [r["id"] for r in mixed["results"]] == ["x-explicit", "in-otm", CONTRACT["id"]]
    assert mixed["market_data"] == by_ref["market_data"]
    assert {**mixed["results"][0], "id": "in-atm"} == by_ref["results"][0]
    assert mixed["results"][1] == by_ref["results"][1]


async def test_explicit_inputs_follow_the_conventions() -> None:
    """The test's own reading of the conventions, checked by hand on the sample data."""
    body = snapshot()
    got = explicit_inputs(body, VDT, by_reference("a", 100.0, "2027-06-18"))
    t = 204 / 365  # 2026-11-26 -> 2027-06-18
    assert got["expiry_years"] == t
    assert got["spot"] == 100.0
    assert got["rate"] == pytest.approx(0.030 + (t - 0.25) / 0.75 * 0.005, rel=1e-15, abs=0)  # linear zero
    assert got["dividend"] == 0.01  # one pillar: flat
    forward = 100.0 * math.exp((got["rate"] - 0.01) * t)
    x = 100.0 / forward  # moneyness, between the 0.8 and 1.0 columns (F > S: rates above dividends)
    assert 0.8 < x < 1.0
    u = (x - 0.8) / 0.2
    smile = [0.25 + skew * (1 - u) for skew in (0.04, 0.03)]  # rows 0.25 y and 1 y at x, linear in vol
    w0, w1 = smile[0] ** 2 * 0.25, smile[1] ** 2 * 1.0
    want = math.sqrt((w0 + (t - 0.25) / 0.75 * (w1 - w0)) / t)  # linear in total variance
    assert got["vol"] == pytest.approx(want, rel=1e-12, abs=0)
    short = explicit_inputs(body, VDT, by_reference("b", 100.0, "2026-12-18"))
    assert short["rate"] == 0.030  # flat before the first pillar


async def test_valuation_date_is_the_utc_date(make_client: MakeClient) -> None:
    """16:30 New York on 26 Nov is 27 Nov in UTC: ACT/365F counts from 27 Nov."""
    client = await make_client()
    vdt = "2026-11-26T23:30:00-05:00"
    body = snapshot()
    h = await put_ok(client, body, vdt=vdt)
    c = by_reference("a", 100.0, "2027-06-18")
    by_ref = await ok_json(await price(client, {"val_datetime": vdt, "measures": MEASURES, "contracts": [c]}))
    assert by_ref["market_data"] == {
        "namespace": "default",
        "val_datetime": "2026-11-27T04:30:00Z",
        "data_asof": ASOF,
        "hash": h,
    }
    utc_inputs = explicit_inputs(body, vdt, c)
    assert utc_inputs["expiry_years"] == 203 / 365
    explicit = await ok_json(await price(client, {"measures": MEASURES, "contracts": [utc_inputs]}))
    assert by_ref["results"] == explicit["results"]
    local_inputs = explicit_inputs(body, "2026-11-26T23:30:00Z", c)  # the local date: one day more
    assert local_inputs["expiry_years"] == 204 / 365
    local = await ok_json(await price(client, {"measures": MEASURES, "contracts": [local_inputs]}))
    assert local["results"][0]["price"] != by_ref["results"][0]["price"]
    # the same instant spelled in UTC names the same snapshot and gives the same answer
    z = await ok_json(
        await price(client, {"val_datetime": "2026-11-27T04:30:00Z", "measures": MEASURES, "contracts": [c]})
    )
    assert z["results"] == by_ref["results"] and z["market_data"] == by_ref["market_data"]
    # expiry on the UTC valuation date is refused
    same_day = by_reference("b", 100.0, "2026-11-27")
    r = await price(client, {"val_datetime": vdt, "contracts": [same_day]})
    err = await assert_error(r, 422, "no_market_data", ("contracts[0]",))
    assert "expiry 2026-11-27 is not after the valuation date" in err["message"]  # 26 Nov in New York


async def test_reproducible_bytes_and_explicit_asof(make_client: MakeClient) -> None:
    client = await make_client()
    h1 = await put_ok(client, snapshot(spot=100.0), asof=ASOF)
    h2 = await put_ok(client, snapshot(spot=101.0), asof=ASOF2)
    assert h1 != h2
    contracts = [by_reference("a", 100.0), by_reference("b", 110.0, "2027-03-19")]
    request = {"val_datetime": VDT, "data_asof": BETWEEN, "measures": MEASURES, "contracts": contracts}
    first = await price(client, request)
    assert first.status == 200
    b1 = await first.read()
    b2 = await (await price(client, request)).read()
    assert b1 == b2
    out = orjson.loads(b1)
    assert out["market_data"] == {"namespace": "default", "val_datetime": VDT, "data_asof": ASOF, "hash": h1}
    assert out["data_asof"] == BETWEEN  # the request's own data_asof is echoed
    explicit = [explicit_inputs(snapshot(spot=100.0), VDT, c) for c in contracts]
    spot100 = await ok_json(await price(client, {"measures": MEASURES, "contracts": explicit}))
    assert out["results"] == spot100["results"]

    # no data_asof: the latest, ASOF2
    latest = await ok_json(await price(client, {**request, "data_asof": None}))
    assert latest["market_data"]["hash"] == h2 and latest["market_data"]["data_asof"] == ASOF2
    assert latest["results"] != out["results"]

    # a newer snapshot does not change an answer that names its data_asof
    h3 = await put_ok(client, snapshot(spot=102.0), asof=ASOF3)
    assert (await (await price(client, request)).read()) == b1
    newest = await ok_json(await price(client, {**request, "data_asof": None}))
    assert newest["market_data"]["hash"] == h3 and newest["market_data"]["data_asof"] == ASOF3
    on_second = await ok_json(await price(client, {**request, "data_asof": ASOF2}))
    assert on_second["market_data"]["hash"] == h2 and on_second["results"] == latest["results"]

    # before the first snapshot: none
    r = await price(client, {**request, "data_asof": "2026-11-26T16:00:00Z"})
    await assert_error(r, 422, "no_market_data", ("data_asof",))


# -- missing market data -----------------------------------------------------------------


def _without(section: str) -> dict[str, Any]:
    body = snapshot()
    del body[section]
    return body


MISSING_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("no spot", snapshot(), by_reference("m", 100.0, underlying="XYZ"), "no spot for XYZ in default/"),
    ("no surface", _without("vol_surfaces"), by_reference("m"), "no vol surface for SPX in default/"),
    ("no discounting", _without("discounting"), by_reference("m"), "no discount curve for SPX in default/"),
    ("expiry on vdt", snapshot(), by_reference("m", expiry="2026-11-26"), "expiry 2026-11-26 is not after"),
    ("expiry before", snapshot(), by_reference("m", expiry="2025-01-02"), "expiry 2025-01-02 is not after"),
    (
        "beyond 100 years",
        snapshot(),
        by_reference("m", expiry="2130-01-01"),
        f"from default/{VDT} as of {ASOF} are out",
    ),
]


@pytest.mark.parametrize(
    ("body", "contract", "message"), [c[1:] for c in MISSING_CASES], ids=[c[0] for c in MISSING_CASES]
)
async def test_missing_objects_422(
    make_client: MakeClient, body: dict[str, Any], contract: dict[str, Any], message: str
) -> None:
    client = await make_client()
    await put_ok(client, body)
    good = explicit_inputs(snapshot(), VDT, by_reference("ok"))
    r = await price(client, {"val_datetime": VDT, "contracts": [good, contract]})
    err = await assert_error(r, 422, "no_market_data", ("contracts[1]",))
    assert message in err["message"], err
    if " in default/" in message:
        assert f" in default/{VDT} as of {ASOF}" in err["message"], err  # names the resolved snapshot
    # the same contract first in the request is named as contracts[0]
    r = await price(client, {"val_datetime": VDT, "contracts": [contract]})
    await assert_error(r, 422, "no_market_data", ("contracts[0]",))
    assert (await client.get("/healthz")).status == 200


async def test_no_snapshot_for_the_key_422(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"val_datetime": VDT, "contracts": [by_reference()]}
    err = await assert_error(await price(client, body), 422, "no_market_data", ("val_datetime",))
    assert "default" in err["message"]
    await put_ok(client, snapshot(), namespace="desk-7")
    await assert_error(await price(client, body), 422, "no_market_data", ("val_datetime",))  # another namespace
    await assert_error(
        await price(client, {**body, "val_datetime": VDT2, "namespace": "desk-7"}), 422, "no_market_data"
    )
    out = await ok_json(await price(client, {**body, "namespace": "desk-7"}))
    assert out["market_data"]["namespace"] == "desk-7"
    # explicit contracts that name a val_datetime with no snapshot need none
    out = await ok_json(await price(client, {"val_datetime": VDT2, "contracts": [CONTRACT]}))
    assert out["market_data"] is None


async def test_failed_resolution_spares_explicit_requests_in_the_batch(make_client: MakeClient) -> None:
    client = await make_client(queue={"max_wait_seconds": 0.5})
    before = await metrics_text(client)
    by_ref = {"val_datetime": VDT, "contracts": [by_reference()]}
    explicit = {"val_datetime": VDT, "contracts": [CONTRACT]}
    responses = await asyncio.gather(*(price(client, b) for b in (by_ref, explicit, by_ref, explicit)))
    after = await metrics_text(client)
    assert [r.status for r in responses] == [422, 200, 422, 200]
    for r in responses[::2]:
        await assert_error(r, 422, "no_market_data", ("val_datetime",))
    for r in responses[1::2]:
        assert (await ok_json(r))["market_data"] is None
    name = "spectralmc_snapshot_resolutions_total"
    assert metric(after, name, outcome="missing") - metric(before, name, outcome="missing") == 1  # one batch
    assert metric(after, name, outcome="found") == metric(before, name, outcome="found")


async def test_by_reference_needs_val_datetime(make_client: MakeClient) -> None:
    client = await make_client()
    await put_ok(client, snapshot())
    r = await price(client, {"contracts": [by_reference()]})
    await assert_error(r, 422, "invalid", ("val_datetime",))
    r = await price(client, {"data_asof": ASOF, "contracts": [CONTRACT, by_reference()]})
    await assert_error(r, 422, "invalid", ("val_datetime",))


MIXED_CONTRACTS: list[dict[str, Any]] = [
    {**by_reference(), "spot": 100.0},
    {**by_reference(), "vol": 0.2},
    {**by_reference(), "expiry_years": 0.5},
    {**by_reference(), "rate": 0.01},
    {k: v for k, v in by_reference().items() if k != "expiry"},
    {k: v for k, v in by_reference().items() if k != "underlying"},
    {**by_reference(), "expiry": "2027-02-30"},
    {**by_reference(), "underlying": ""},
]


async def test_mixing_reference_and_explicit_422(make_client: MakeClient) -> None:
    client = await make_client()
    await put_ok(client, snapshot())
    for contract in MIXED_CONTRACTS:
        r = await price(client, {"val_datetime": VDT, "contracts": [CONTRACT, contract]})
        err = await assert_error(r, 422, "invalid")
        assert any(d["field"].startswith("contracts[1]") for d in err["details"]), (contract, err["details"])


# -- batching ----------------------------------------------------------------------------


async def test_one_resolution_per_key_per_batch(make_client: MakeClient) -> None:
    # cache_entries=1: the second PUT evicts the first snapshot, so pricing it loads it once
    client = await make_client(marketdata={"cache_entries": 1}, queue={"max_wait_seconds": 0.2})
    h = await put_ok(client, snapshot())
    await put_ok(client, snapshot(spot=50.0), vdt=VDT2)
    before = await metrics_text(client)
    body = {"val_datetime": VDT, "measures": ["price", "delta"], "contracts": [by_reference()]}
    blocker = block_worker(client, 1.0)  # the requests pile up while the first batches wait
    responses = await asyncio.gather(*(price(client, body) for _ in range(30)))
    await blocker
    answers = [await ok_json(r) for r in responses]
    assert all(a["market_data"]["hash"] == h for a in answers)
    assert len({orjson.dumps(a) for a in answers}) == 1
    after = await metrics_text(client)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    found = delta("spectralmc_snapshot_resolutions_total", outcome="found")
    batches = delta("spectralmc_batch_requests_count")
    assert delta("spectralmc_batch_requests_sum") == 30
    assert 1 <= found <= batches <= 3, (found, batches)
    assert delta("spectralmc_snapshot_resolutions_total", outcome="missing") == 0
    assert delta("spectralmc_snapshot_cache_total", result="miss") == 1  # the first load
    assert delta("spectralmc_snapshot_cache_total", result="hit") == found - 1  # every later one


async def test_one_bad_request_in_a_batch(make_client: MakeClient) -> None:
    client = await make_client(queue={"max_wait_seconds": 0.5})  # the first waits for the others to join it
    await put_ok(client, snapshot())
    before = await metrics_text(client)
    good = {"val_datetime": VDT, "contracts": [by_reference()]}
    bad = {"val_datetime": VDT, "contracts": [by_reference("x", underlying="XYZ")]}
    explicit = {"val_datetime": VDT, "contracts": [CONTRACT]}
    bodies = [good, good, bad, explicit, good]
    responses = await asyncio.gather(*(price(client, b) for b in bodies))
    after = await metrics_text(client)
    assert [r.status for r in responses] == [200, 200, 422, 200, 200]
    err = await assert_error(responses[2], 422, "no_market_data", ("contracts[0]",))
    assert "no spot for XYZ in default/" in err["message"]
    outs = [await ok_json(r) for i, r in enumerate(responses) if i != 2]
    assert outs[0] == outs[1] == outs[3]
    assert outs[2]["market_data"] is None
    # one batch, one resolution: the bad request did not spoil the others
    name = "spectralmc_snapshot_resolutions_total"
    assert metric(after, name, outcome="found") - metric(before, name, outcome="found") == 1
    count = "spectralmc_batch_requests_count"
    assert metric(after, count) - metric(before, count) == 1
    total = "spectralmc_batch_requests_sum"
    assert metric(after, total) - metric(before, total) == 4


async def test_now_is_not_a_default_val_datetime(make_client: MakeClient) -> None:
    """A snapshot at the current time does not make by-reference contracts priceable
    without a val_datetime (the request must name its snapshot)."""
    client = await make_client()
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await put_ok(client, snapshot(), vdt=now, asof=now)
    await assert_error(await price(client, {"contracts": [by_reference()]}), 422, "invalid", ("val_datetime",))


async def test_store_outage_is_503_and_loses_nothing(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The object store failing (after its own retries) answers 503 store_unavailable with
    Retry-After, not a 500; once it is back the same PUT stores the snapshot."""
    client = await make_client()
    objects = app_of(client)[keys.MARKETDATA].store.objects

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailableError("connection refused (test)")

    for op in ("get", "put_if_absent", "put_if_match", "list"):
        monkeypatch.setattr(objects, op, down)
    r = await put(client, snapshot())
    await assert_error(r, 503, "store_unavailable")
    assert r.headers["Retry-After"] == "5"
    await assert_error(await client.get(f"/v1/marketdata/default/{VDT}"), 503, "store_unavailable")
    monkeypatch.undo()
    r = await put(client, snapshot())
    assert r.status == 201, await r.text()
