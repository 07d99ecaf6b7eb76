"""Admin routes against the HTTP contract: bearer auth, errors, pin/unpin (rollback),
versions, verify, gc and commit of the online trainer's state."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from server_util import CONTRACT, TOKEN, MakeClient, app_of, assert_error

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.service import keys

Client = TestClient[Any, Any]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "/v1/admin/models"

# (method, route after /v1/admin/models/{name}, body, the status with the right token)
ROUTES: list[tuple[str, str, dict[str, Any] | None, int]] = [
    ("POST", "commit", {"message": "x"}, 409),  # 409: training is off by default (201 is tested below)
    ("GET", "versions", None, 200),
    ("POST", "pin", {"version": 1}, 200),
    ("POST", "unpin", {}, 200),
    ("GET", "verify", None, 200),
    ("POST", "gc", {"keep": 1}, 200),
]
ROUTE_IDS = [r[1] for r in ROUTES]


# -- helpers -----------------------------------------------------------------------------


async def ok_json(r: ClientResponse, status: int = 200) -> dict[str, Any]:
    text = await r.text()
    assert r.status == status, text
    body: dict[str, Any] = orjson.loads(text)
    return body


async def call(
    client: Client,
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
    *,
    model: str = "gbm",
    headers: dict[str, str] | None = None,
) -> ClientResponse:
    kwargs: dict[str, Any] = {"headers": AUTH if headers is None else headers}
    if body is not None:
        kwargs["json"] = body
    return await client.request(method, f"{BASE}/{model}/{route}", **kwargs)


async def price_identity(client: Client) -> dict[str, Any]:
    out = await ok_json(await client.post("/v1/price", json={"contracts": [CONTRACT]}))
    assert out["results"][0]["method"] == "cvnn"
    ident: dict[str, Any] = out["models"]["gbm"]
    return ident


async def served(client: Client) -> dict[str, Any]:
    out = await ok_json(await client.get("/v1/models"))
    (m,) = (m for m in out["models"] if m["name"] == "gbm")
    model: dict[str, Any] = m
    return model


async def commit_versions(client: Client, n: int) -> dict[int, str]:
    """Commit ``n`` distinct versions straight to the store; return version -> content hash
    (version 1 included), once the server serves the new head."""
    store = app_of(client)[keys.STORES]["gbm"]
    ckpt = await store.load(1, need_training=True)
    assert ckpt.certificate is not None  # the bundled model's, seeded with it
    hashes = {1: ckpt.content_hash}
    for i in range(2, n + 2):
        c = Checkpoint({**ckpt.manifest, "metrics": {**ckpt.manifest["metrics"], "note": i}}, ckpt.model, ckpt.training)
        # The same weights as version 1 (only the manifest differs): version 1's error map
        # is theirs, named for this content, so the version passes the gate and is served.
        c = replace(c, certificate={**ckpt.certificate, "model_hash": c.content_hash})
        stored = await store.commit(c, f"v{i}")
        hashes[stored.version] = stored.content_hash
    assert len(set(hashes.values())) == len(hashes)
    head = max(hashes)
    for _ in range(200):
        if (await served(client))["version"] == head:
            break
        await asyncio.sleep(0.02)
    assert (await served(client))["version"] == head
    return hashes


# -- authorization -----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "route", "body", "ok"), ROUTES, ids=ROUTE_IDS)
async def test_auth(make_client: MakeClient, method: str, route: str, body: dict[str, Any] | None, ok: int) -> None:
    client = await make_client()
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
        r = await call(client, method, route, body, headers=headers)
        await assert_error(r, 401, "unauthorized")
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers
    r = await call(client, method, route, body, headers={"Authorization": "Bearer wrong-token"})
    await assert_error(r, 403, "forbidden")
    r = await call(client, method, route, body)
    if ok == 409:
        await assert_error(r, 409, "conflict")  # authorized; the conflict is the route's own
    else:
        await ok_json(r, ok)


@pytest.mark.parametrize(("method", "route", "body", "ok"), ROUTES, ids=ROUTE_IDS)
async def test_no_token_configured_403(
    make_client: MakeClient, method: str, route: str, body: dict[str, Any] | None, ok: int
) -> None:
    client = await make_client(admin_token=None)
    for headers in ({}, AUTH):
        await assert_error(await call(client, method, route, body, headers=headers), 403, "forbidden")


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "route", "body", "ok"), ROUTES, ids=ROUTE_IDS)
async def test_unknown_model_404(
    make_client: MakeClient, method: str, route: str, body: dict[str, Any] | None, ok: int
) -> None:
    client = await make_client()
    await assert_error(await call(client, method, route, body, model="nosuchmodel"), 404, "not_found")


async def test_pin_missing_version_404(make_client: MakeClient) -> None:
    client = await make_client()
    await assert_error(await call(client, "POST", "pin", {"version": 99}), 404, "not_found")
    assert (await served(client))["mode"] == "tracking"


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("pin", {"version": 0}, "version"),
        ("pin", {"version": "two"}, "version"),
        ("pin", {}, "version"),
        ("pin", {"version": 1, "extra": True}, "extra"),
        ("gc", {}, "keep"),
        ("gc", {"dry_run": False}, "keep"),
        ("gc", {"keep": -1}, "keep"),
        ("gc", {"keep": 1, "protect": [0]}, "protect[0]"),
        ("unpin", {"by": 7}, "by"),
        ("commit", {"message": 7}, "message"),
    ],
)
async def test_invalid_body_422(make_client: MakeClient, route: str, body: dict[str, Any], field: str) -> None:
    client = await make_client()
    await assert_error(await call(client, "POST", route, body), 422, "invalid", (field,))


@pytest.mark.parametrize("route", ["pin", "gc"])
async def test_malformed_body_400(make_client: MakeClient, route: str) -> None:
    client = await make_client()
    r = await client.post(f"{BASE}/gbm/{route}", data=b"{nope", headers={**AUTH, "Content-Type": "application/json"})
    await assert_error(r, 400, "malformed")
    empty = await client.post(f"{BASE}/gbm/{route}", headers={**AUTH, "Content-Type": "application/json"})
    await assert_error(empty, 400, "malformed")


# -- pin / unpin, versions ---------------------------------------------------------------


async def test_pin_and_unpin(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])  # served: only models whose certificate passes
    hashes = await commit_versions(client, 2)
    assert sorted(hashes) == [1, 2, 3]
    assert await price_identity(client) == {"version": 3, "content_hash": hashes[3]}

    out = await ok_json(await call(client, "POST", "pin", {"version": 1}))
    assert out["pinned"] == 1
    assert out["serving"]["version"] == 1 and out["serving"]["mode"] == "pinned"
    m = await served(client)
    assert (m["version"], m["content_hash"], m["mode"]) == (1, hashes[1], "pinned")
    for _ in range(3):
        assert await price_identity(client) == {"version": 1, "content_hash": hashes[1]}
    await asyncio.sleep(0.2)  # several tracker polls later: still pinned
    assert await price_identity(client) == {"version": 1, "content_hash": hashes[1]}

    versions = await ok_json(await call(client, "GET", "versions"))
    flags = {v["version"]: (v["head"], v["pinned"]) for v in versions["versions"]}
    assert flags == {1: (False, True), 2: (False, False), 3: (True, False)}

    out = await ok_json(await call(client, "POST", "unpin"))  # no body: optional
    assert out["pinned"] is None
    assert out["serving"]["version"] == 3 and out["serving"]["mode"] == "tracking"
    m = await served(client)
    assert (m["version"], m["content_hash"], m["mode"]) == (3, hashes[3], "tracking")
    assert await price_identity(client) == {"version": 3, "content_hash": hashes[3]}


async def test_versions(make_client: MakeClient) -> None:
    client = await make_client()
    hashes = await commit_versions(client, 1)
    out = await ok_json(await call(client, "GET", "versions"))
    assert out["model"] == "gbm"
    rows = out["versions"]
    assert [r["version"] for r in rows] == [1, 2]
    for r in rows:
        assert r["content_hash"] == hashes[r["version"]]
        assert r["collected"] is False and r["pinned"] is False
        assert isinstance(r["message"], str) and r["record_hash"]
    assert [r["head"] for r in rows] == [False, True]
    assert rows[1]["message"] == "v2"


# -- verify, gc --------------------------------------------------------------------------


async def test_verify(make_client: MakeClient) -> None:
    client = await make_client()
    out = await ok_json(await call(client, "GET", "verify"))
    assert out["ok"] is True
    assert out["model"] == "gbm" and out["versions"] == 1 and out["head"] == 1
    assert out["problems"] == []


async def test_gc_dry_run_then_collect(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])  # served: only models whose certificate passes
    hashes = await commit_versions(client, 2)
    dry = await ok_json(await call(client, "POST", "gc", {"keep": 1}))  # a dry run by default
    assert dry["dry_run"] is True
    assert dry["collected_versions"] == [1, 2]
    assert dry["bytes_freed"] == 0
    rows = (await ok_json(await call(client, "GET", "versions")))["versions"]
    assert not any(r["collected"] for r in rows)  # nothing was touched

    out = await ok_json(await call(client, "POST", "gc", {"keep": 1, "dry_run": False}))
    assert out["dry_run"] is False
    assert out["collected_versions"] == [1, 2]
    assert 3 in out["retained"]
    rows = (await ok_json(await call(client, "GET", "versions")))["versions"]
    assert {r["version"]: r["collected"] for r in rows} == {1: True, 2: True, 3: False}
    report = await ok_json(await call(client, "GET", "verify"))
    assert report["ok"] is True, report
    assert report["collected"] == [1, 2]
    assert await price_identity(client) == {"version": 3, "content_hash": hashes[3]}
    again = await ok_json(await call(client, "POST", "gc", {"keep": 1, "dry_run": False}))
    assert again["collected_versions"] == []
    # a collected version cannot be served
    await assert_error(await call(client, "POST", "pin", {"version": 1}), 409, "conflict")


# -- commit ------------------------------------------------------------------------------


async def test_commit_without_training_409(make_client: MakeClient) -> None:
    client = await make_client()
    await assert_error(await call(client, "POST", "commit", {"message": "x"}), 409, "conflict")
    head = await app_of(client)[keys.STORES]["gbm"].head()
    assert head is not None and head.version == 1


async def test_commit_with_training(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"], train={"enabled": True})
    ready = await ok_json(await client.get("/readyz"))
    assert ready["training"] == "gbm", ready
    out = await ok_json(await call(client, "POST", "commit", {"message": "x"}), 201)
    assert out["version"] == 2
    assert out["content_hash"].startswith("sha256:")
    assert out["serving"]["version"] == 2
    assert await price_identity(client) == {"version": 2, "content_hash": out["content_hash"]}
    store = app_of(client)[keys.STORES]["gbm"]
    head = await store.head()
    assert head is not None and (head.version, head.content_hash) == (2, out["content_hash"])
    assert head.record.get("message") == "x"
