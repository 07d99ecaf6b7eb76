"""GET /v1/admin/models/{name}/pins: the pin log through the admin API (issue 22, item 1).
Auth and errors as every admin route; the entries oldest first, each saying who pinned
or unpinned what and when, and whether a pin was forced past the quality gate. The same
route on a real S3 store is in tests/store/test_store_issue22.py."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from server_util import TOKEN, MakeClient, app_of, assert_error

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.service import keys
from spectralmc_server.store.objects import LocalObjectStore

Client = TestClient[Any, Any]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PINS = "/v1/admin/models/gbm/pins"


async def ok_json(r: ClientResponse) -> dict[str, Any]:
    text = await r.text()
    assert r.status == 200, text
    assert r.content_type == "application/json"
    body: dict[str, Any] = orjson.loads(text)
    return body


async def post(client: Client, route: str, body: dict[str, Any]) -> dict[str, Any]:
    return await ok_json(await client.post(f"/v1/admin/models/gbm/{route}", json=body, headers=AUTH))


async def test_auth_and_unknown_model(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    for headers in ({}, {"Authorization": "Bearer"}):
        await assert_error(await client.get(PINS, headers=headers), 401, "unauthorized")
    await assert_error(await client.get(PINS, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    err = await assert_error(await client.get("/v1/admin/models/nosuch/pins", headers=AUTH), 404, "not_found")
    assert "'nosuch'" in err["message"] and "gbm" in err["message"]  # names the model and the served ones
    off = await make_client(models=["gbm"], admin_token=None)
    await assert_error(await off.get(PINS, headers=AUTH), 403, "forbidden")


async def test_pin_log_oldest_first(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    empty = await ok_json(await client.get(PINS, headers=AUTH))
    assert empty == {"model": "gbm", "pinned": None, "pins": []}

    # version 2: version 1's content under another manifest, with no certificate, so it
    # fails the quality gate and is pinned only with force
    store = app_of(client)[keys.STORES]["gbm"]
    ckpt = await store.load(1, need_training=True)
    other = Checkpoint({**ckpt.manifest, "metrics": {**ckpt.manifest["metrics"], "note": 2}}, ckpt.model, ckpt.training)
    v2 = await store.commit(replace(other, certificate=None), "uncertified")
    v1 = await store.version(1)

    before = dt.datetime.now(dt.UTC)
    await post(client, "pin", {"version": 1, "by": "alice: bad fit in v2"})
    forced = await post(client, "pin", {"version": 2, "by": "bob", "force": True})
    assert forced["forced"] is True and forced["gate"]
    await post(client, "unpin", {"by": "carol"})
    await post(client, "pin", {"version": 1})  # "by" left out: the route's default

    out = await ok_json(await client.get(PINS, headers=AUTH))
    assert out["model"] == "gbm" and out["pinned"] == 1
    rows = out["pins"]
    assert [(r["seq"], r["action"], r["version"], r["by"]) for r in rows] == [
        (1, "pin", 1, "alice: bad fit in v2"),
        (2, "pin", 2, "bob"),
        (3, "unpin", None, "carol"),
        (4, "pin", 1, "admin api"),
    ]
    assert [r["forced"] for r in rows] == [False, True, False, False]
    assert rows[1]["gate"] == forced["gate"] and rows[0]["gate"] == []
    assert [r["record_hash"] for r in rows] == [v1.record_hash, v2.record_hash, None, v1.record_hash]
    times = [dt.datetime.fromisoformat(r["time"]) for r in rows]
    assert times == sorted(times) and times[0] >= before - dt.timedelta(seconds=5)
    log = await store.pin_log()  # each entry's hash is the stored entry's (what the next one names)
    assert [r["hash"] for r in rows] == [e.hash for e in log]
    assert [e.body["parent"] for e in log[1:]] == [r["hash"] for r in rows[:-1]]

    await post(client, "unpin", {"by": "dave"})
    assert (await ok_json(await client.get(PINS, headers=AUTH)))["pinned"] is None


async def test_damaged_pin_log_is_a_conflict(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    await post(client, "pin", {"version": 1, "by": "alice"})
    store = app_of(client)[keys.STORES]["gbm"]
    assert isinstance(store.objects, LocalObjectStore)
    path = store.objects.root / store.pins.key(1)
    path.write_bytes(b"{not json")
    err = await assert_error(await client.get(PINS, headers=AUTH), 409, "conflict")
    assert "pin log" in err["message"] and "pinlog" in err["message"]
