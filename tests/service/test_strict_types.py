"""Strict input types in every request body: a boolean or a string is never a number, a
number is never a boolean, and times are RFC 3339 strings (a number is not a time).

The numeric, boolean and time fields are enumerated from the model classes themselves
(nested models, lists, maps and optional fields included), so a field added later is
checked without touching this file; every body model a route validates must have an
example here (see ``test_every_request_body_model_has_an_example``). Then each route is
driven over HTTP (and the WebSocket stream) with at least one such field, and a valid
body still works.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from marketdata_util import ASOF, VDT, by_reference, snapshot
from pydantic import AwareDatetime, BaseModel, ValidationError
from server_util import CONTRACT, TOKEN, MakeClient, assert_error

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.pricing.schemas import PriceRequest, format_validation_error
from spectralmc_server.service.schemas import CalibrateRequest, CommitBody, GCBody, PinBody, UnpinBody
from spectralmc_server.service.stream import Subscribe, Unsubscribe

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}

# -- one valid example of every request body, every optional number given ----------------

ANY_INDEX = "[]"  # a path step: any element of a list
ANY_KEY = "{}"  # a path step: any value of a map

SNAPSHOT: dict[str, Any] = {
    **snapshot(),
    "fixings": {"SPX": [{"date": "2026-11-20", "value": 101.5}]},
    "option_quotes": {"SPX": [{"expiry_years": 0.5, "strike": 100.0, "right": "call", "price": 7.5}]},
    "model_params": {"SPX": {"heston": {"params": HESTON, "fit": {"rmse": 0.001}}}},
}
EXPLICIT = {**CONTRACT, "rate": 0.03, "dividend": 0.01}
CONTRACTS = [
    EXPLICIT,
    {**EXPLICIT, "id": "h", "rate": None, "dividend": None, "vol": None, "process": "heston", "params": HESTON},
    {**EXPLICIT, "id": "a", "rate": None, "dividend": None, "process": "asian", "fixings": 12},
    by_reference("r"),
    {**EXPLICIT, "id": "b", "barrier": {"type": "down-and-out", "level": 80.0, "monitoring": 12, "rebate": 1.0}},
]
EXAMPLES: dict[type[BaseModel], dict[str, Any]] = {
    PriceRequest: {
        "namespace": "default",
        "val_datetime": VDT,
        "data_asof": ASOF,
        "measures": ["price", "quantiles"],
        "quantile_levels": [0.05, 0.5, 0.95],
        "contracts": CONTRACTS,
    },
    MarketSnapshot: SNAPSHOT,
    Subscribe: {
        "op": "subscribe",
        "id": "s1",
        "namespace": "default",
        "val_datetime": VDT,
        "contracts": CONTRACTS,
        "measures": ["price", "quantiles"],
        "quantile_levels": [0.5],
        "interval_seconds": 5.0,
    },
    Unsubscribe: {"op": "unsubscribe", "id": "s1"},
    CommitBody: {"message": "m", "allow_unqualified": False},
    PinBody: {"version": 1, "by": "me", "force": False},
    UnpinBody: {"by": "me"},
    GCBody: {"keep": 1, "protect": [1], "dry_run": True, "min_keep": 1, "grace_seconds": 3600.0},
    CalibrateRequest: {
        "namespace": "default",
        "val_datetime": VDT,
        "data_asof": ASOF,
        "underlying": "SPX",
        "process": "heston",
        "store": False,
        "allow_arbitrage": False,
        "max_iterations": 100,
        "corrections": 1,
        "correction_paths": 4096,
    },
}
MODELS = list(EXAMPLES)

# Models validated in spectralmc_server/service that are not request bodies.
NOT_BODIES = {
    "MarketSnapshot.model_validate": "a derived snapshot re-checked (its body is the PUT's, covered here)",
    "SpectrumConfig.model_validate": "a stored model's manifest, not a request",
    "PriceRequest.model_validate": "a stream subscription's request, built from a checked Subscribe",
}

# -- the fields, from the classes --------------------------------------------------------

Kind = Literal["float", "int", "bool", "datetime", "date"]
Path_ = tuple[str | int, ...]


def _walk(tp: Any, path: tuple[str, ...], seen: frozenset[type]) -> Iterator[tuple[tuple[str, ...], Kind]]:
    origin = get_origin(tp)
    if origin is Annotated:
        yield from _walk(get_args(tp)[0], path, seen)
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            yield from _walk(arg, path, seen)
    elif origin is list:
        yield from _walk(get_args(tp)[0], (*path, ANY_INDEX), seen)
    elif origin is dict:
        yield from _walk(get_args(tp)[1], (*path, ANY_KEY), seen)
    elif origin is not None or tp is type(None) or tp is Any or tp is str:
        return  # Literal, None, Any, str: no number, boolean or time here
    elif tp is bool:
        yield path, "bool"
    elif tp is int:
        yield path, "int"
    elif tp is float:
        yield path, "float"
    elif tp is AwareDatetime or (isinstance(tp, type) and issubclass(tp, datetime)):
        yield path, "datetime"
    elif isinstance(tp, type) and issubclass(tp, date):
        yield path, "date"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp not in seen:
            yield from fields_of(tp, path, seen | {tp})
    else:
        raise AssertionError(f"{'.'.join(path)}: type {tp!r} is not known to this test; teach _walk about it")


def fields_of(
    model: type[BaseModel], prefix: tuple[str, ...] = (), seen: frozenset[type] = frozenset()
) -> Iterator[tuple[tuple[str, ...], Kind]]:
    """(path, kind) of every number, boolean and time in ``model``, nested ones included."""
    for name, info in model.model_fields.items():
        yield from _walk(info.annotation, (*prefix, name), seen | {model})


def locate(body: Any, pattern: tuple[str, ...]) -> Path_ | None:
    """The first concrete path in ``body`` that ``pattern`` (with ANY_INDEX/ANY_KEY) names."""
    if not pattern:
        return ()
    step, rest = pattern[0], pattern[1:]
    if step == ANY_INDEX:
        candidates: list[tuple[str | int, Any]] = list(enumerate(body)) if isinstance(body, list) else []
    elif step == ANY_KEY:
        candidates = list(body.items()) if isinstance(body, dict) else []
    else:
        candidates = [(step, body[step])] if isinstance(body, dict) and step in body else []
    for key, value in candidates:
        found = locate(value, rest)
        if found is not None:
            return (key, *found)
    return None


def field_name(path: Path_) -> str:
    """A concrete path as format_validation_error names it: ``contracts[0].params.v0``."""
    parts: list[str] = []
    for step in path:
        if isinstance(step, int):
            parts[-1:] = [f"{parts[-1]}[{step}]" if parts else f"[{step}]"]
        else:
            parts.append(step)
    return ".".join(parts)


def replaced(body: Any, path: Path_, value: Any) -> Any:
    """A deep copy of ``body`` with the value at ``path`` replaced."""
    out = orjson.loads(orjson.dumps(body))
    node = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


def value_at(body: Any, path: Path_) -> Any:
    for step in path:
        body = body[step]
    return body


# What each kind of field must refuse: a wrong-typed value that a lax parser would take.
def wrong_values(kind: Kind, valid: Any) -> list[Any]:
    if kind in ("float", "int"):
        return [True, False, str(valid), "105", "1e2"]
    if kind == "bool":
        return [1, 0, "true", "false", 1.0]
    return [1_700_000_000, 0, 1.7e9, True]  # a time is an RFC 3339 string, never a number


def cases() -> Iterator[tuple[type[BaseModel], tuple[str, ...], Kind]]:
    for model in MODELS:
        for pattern, kind in fields_of(model):
            yield model, pattern, kind


CASES = list(cases())


def test_the_enumeration_finds_the_fields_it_should() -> None:
    """A guard on the walker: it sees nested, listed, mapped and optional fields."""
    found = {(m.__name__, ".".join(p), k) for m, p, k in CASES}
    for expected in [
        ("PriceRequest", "contracts.[].strike", "float"),
        ("PriceRequest", "contracts.[].params.{}", "float"),
        ("PriceRequest", "contracts.[].fixings", "int"),
        ("PriceRequest", "quantile_levels.[]", "float"),
        ("PriceRequest", "val_datetime", "datetime"),
        ("MarketSnapshot", "spots.{}", "float"),
        ("MarketSnapshot", "yield_curves.{}.pillars.[].zero_rate", "float"),
        ("MarketSnapshot", "vol_surfaces.{}.vols.[].[]", "float"),
        ("MarketSnapshot", "fixings.{}.[].value", "float"),
        ("MarketSnapshot", "fixings.{}.[].date", "date"),
        ("MarketSnapshot", "option_quotes.{}.[].price", "float"),
        ("MarketSnapshot", "model_params.{}.{}.params.{}", "float"),
        ("Subscribe", "interval_seconds", "float"),
        ("Subscribe", "quantile_levels.[]", "float"),
        ("Subscribe", "contracts.[].spot", "float"),
        ("PinBody", "version", "int"),
        ("PinBody", "force", "bool"),
        ("GCBody", "protect.[]", "int"),
        ("GCBody", "grace_seconds", "float"),
        ("CalibrateRequest", "max_iterations", "int"),
        ("CalibrateRequest", "store", "bool"),
    ]:
        assert expected in found, (expected, sorted(found))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_the_examples_are_valid_and_give_every_field(model: type[BaseModel]) -> None:
    """Each example validates (times as RFC 3339 strings parse) and holds a value for
    every enumerated field, so every field below is really exercised."""
    model.model_validate(EXAMPLES[model])
    missing = [".".join(p) for p, _ in fields_of(model) if locate(EXAMPLES[model], p) is None]
    assert not missing, f"give {model.__name__}'s example in this file a value for: {missing}"


@pytest.mark.parametrize(("model", "pattern", "kind"), CASES, ids=[f"{m.__name__}.{'.'.join(p)}" for m, p, _ in CASES])
def test_every_field_refuses_the_wrong_type_naming_it(
    model: type[BaseModel], pattern: tuple[str, ...], kind: Kind
) -> None:
    body = EXAMPLES[model]
    path = locate(body, pattern)
    assert path is not None, f"{model.__name__}'s example has no {'.'.join(pattern)}"
    field = field_name(path)
    for bad in wrong_values(kind, value_at(body, path)):
        with pytest.raises(ValidationError) as info:
            model.model_validate(replaced(body, path, bad))
        details = format_validation_error(info.value)
        assert details, (field, bad)
        assert all(d["field"] == field for d in details), (field, bad, details)


# Every model a service route validates a body with has an example above.
_VALIDATED = re.compile(r"\bvalidate\(\s*([A-Z]\w*)\s*,|\b([A-Z]\w*)\.model_validate(?:_json)?\(")


def test_every_request_body_model_has_an_example() -> None:
    names = {m.__name__ for m in MODELS} | {"ClientMessage"}  # ClientMessage wraps Subscribe | Unsubscribe
    unknown = []
    for source in sorted((ROOT / "spectralmc_server" / "service").rglob("*.py")):
        for m in _VALIDATED.finditer(source.read_text()):
            name = m[1] or m[2]
            if name not in names and f"{name}.model_validate" not in NOT_BODIES:
                unknown.append(f"{source.name}: {name}")
    assert not unknown, f"request bodies without an example in this file: {unknown}"


# -- through the routes --------------------------------------------------------------------


def put_path(vdt: str = VDT, asof: str = ASOF) -> str:
    return f"/v1/marketdata/default/{vdt}/{asof}"


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("spots", "SPX"), "105"),
        (("spots", "SPX"), True),
        (("yield_curves", "USD", "pillars", 0, "zero_rate"), True),
        (("vol_surfaces", "SPX", "vols", 1, 2), "0.25"),
        (("fixings", "SPX", 0, "value"), "101.5"),
        (("option_quotes", "SPX", 0, "strike"), True),
        (("model_params", "SPX", "heston", "params", "v0"), "0.04"),
        (("fixings", "SPX", 0, "date"), 1_700_000_000),
    ],
)
async def test_marketdata_put_refuses_wrong_types(make_client: MakeClient, path: Path_, bad: Any) -> None:
    client = await make_client()
    r = await client.put(put_path(), json=replaced(SNAPSHOT, path, bad))
    await assert_error(r, 422, "invalid", (field_name(path),))
    # nothing was stored; the valid body then is
    r = await client.put(put_path(), json=SNAPSHOT)
    assert r.status == 201, await r.text()
    r = await client.get(f"/v1/marketdata/default/{VDT}")
    data = orjson.loads(await r.text())["data"]
    assert data["spots"] == {"SPX": 100.0} and data["fixings"]["SPX"][0]["date"] == "2026-11-20"


async def test_price_refuses_wrong_types_in_rows_and_columns(make_client: MakeClient) -> None:
    client = await make_client()
    body = {"contracts": [CONTRACT]}
    for path, bad in [
        (("contracts", 0, "strike"), "105"),
        (("contracts", 0, "spot"), True),
        (("contracts", 0, "vol"), "0.25"),
    ]:
        r = await client.post("/v1/price", json=replaced(body, path, bad))
        await assert_error(r, 422, "invalid", (field_name(path),))
    r = await client.post("/v1/price", json={"measures": ["price", "quantiles"], "quantile_levels": [True], **body})
    await assert_error(r, 422, "invalid", ("quantile_levels[0]",))
    columns = {k: [v] for k, v in CONTRACT.items()}
    for bad in ("105", True):
        r = await client.post("/v1/price", json={"columns": {**columns, "strike": [bad]}})
        await assert_error(r, 422, "invalid", ("contracts[0].strike",))
    r = await client.post("/v1/price", json=body)
    assert r.status == 200, await r.text()
    assert orjson.loads(await r.text())["results"][0]["id"] == "c1"


async def test_calibrate_refuses_wrong_types(make_client: MakeClient) -> None:
    client = await make_client()
    body = EXAMPLES[CalibrateRequest]
    for field, bad in [("max_iterations", True), ("max_iterations", "100"), ("store", 1), ("val_datetime", 1.7e9)]:
        r = await client.post("/v1/calibrate", json={**body, field: bad})
        await assert_error(r, 422, "invalid", (field,))
    # the valid body calibrates
    r = await client.put(put_path(), json=SNAPSHOT)
    assert r.status == 201, await r.text()
    r = await client.post("/v1/calibrate", json={**body, "max_iterations": 5})
    assert r.status == 200, await r.text()


@pytest.mark.parametrize(
    ("route", "body", "field", "ok_body", "ok_status"),
    [
        ("pin", {"version": "1"}, "version", {"version": 1}, 200),
        ("pin", {"version": True}, "version", {"version": 1}, 200),
        ("pin", {"version": 1, "force": 1}, "force", {"version": 1, "force": False}, 200),
        ("gc", {"keep": True}, "keep", {"keep": 1}, 200),
        ("gc", {"keep": 1, "grace_seconds": "60"}, "grace_seconds", {"keep": 1, "grace_seconds": 60}, 200),
        ("gc", {"keep": 1, "protect": ["1"]}, "protect[0]", {"keep": 1, "protect": [1]}, 200),
        ("gc", {"keep": 1, "dry_run": 0}, "dry_run", {"keep": 1, "dry_run": True}, 200),
        ("commit", {"allow_unqualified": 1}, "allow_unqualified", {"message": "x"}, 409),  # 409: training is off
        ("unpin", {"by": 5}, "by", {"by": "me"}, 200),
    ],
)
async def test_admin_bodies_refuse_wrong_types(
    make_client: MakeClient, route: str, body: dict[str, Any], field: str, ok_body: dict[str, Any], ok_status: int
) -> None:
    client = await make_client()
    r = await client.post(f"/v1/admin/models/gbm/{route}", json=body, headers=AUTH)
    await assert_error(r, 422, "invalid", (field,))
    r = await client.post(f"/v1/admin/models/gbm/{route}", json=ok_body, headers=AUTH)
    assert r.status == ok_status, await r.text()


async def _recv(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=30)
    assert msg.type == WSMsgType.TEXT, (msg.type, msg.data)
    body: dict[str, Any] = orjson.loads(msg.data)
    return body


async def test_stream_subscribe_refuses_wrong_types(make_client: MakeClient) -> None:
    client = await make_client()
    ws = await client.ws_connect("/v1/stream")
    sub = {"op": "subscribe", "id": "s1", "contracts": [CONTRACT], "interval_seconds": 5.0}
    for path, bad in [
        (("interval_seconds",), "5"),
        (("interval_seconds",), True),
        (("contracts", 0, "strike"), "105"),
        (("contracts", 0, "expiry_years"), True),
        (("val_datetime",), 1_700_000_000),
    ]:
        await ws.send_str(orjson.dumps(replaced(sub, path, bad)).decode())
        err = await _recv(ws)
        assert err["type"] == "error" and err["code"] == "invalid" and err["id"] == "s1", (path, bad, err)
        assert field_name(path) in [d["field"] for d in err["details"]], (path, bad, err)
    for levels in (["0.5"], [True]):
        await ws.send_str(orjson.dumps({**sub, "measures": ["quantiles"], "quantile_levels": levels}).decode())
        err = await _recv(ws)
        assert err["type"] == "error" and "quantile_levels[0]" in [d["field"] for d in err["details"]], err
    # the connection stays, and a valid subscription is quoted
    await ws.send_str(orjson.dumps(sub).decode())
    ack = await _recv(ws)
    assert ack["type"] == "subscribed" and ack["id"] == "s1", ack
    quote = await _recv(ws)
    assert quote["type"] == "quote" and quote["results"][0]["id"] == "c1", quote
    await ws.close()
