"""The server on a real S3 store (SeaweedFS): seeding, pricing, a commit by another
writer reaching the server by hot swap, and admin pin through S3 refs. The S3
endpoint and credentials come from the server's own settings (``[s3]``), not from
AWS_* variables. Market data on S3, shared by two servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from certificate_util import fake_certificate
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import CONTRACT, TOKEN, settings_for

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.service import keys
from spectralmc_server.service.app import create_app
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import VersionStore

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_server_seeds_prices_and_swaps_on_s3(
    tmp_path: Path,
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    bucket = make_bucket()
    settings = settings_for(
        tmp_path,
        store=f"s3://{bucket}/serving",
        s3={
            "endpoint_url": s3_settings.endpoint_url,
            "region": s3_settings.region,
            "access_key_id": s3_settings.access_key_id,
            "secret_access_key": s3_settings.secret_access_key,
        },
    )
    client = await aiohttp_client(create_app(settings, Metrics()))

    r = await client.post("/v1/price", json={"contracts": [CONTRACT]})
    assert r.status == 200, await r.text()
    first = await r.json()
    assert first["models"]["gbm"]["version"] == 1  # the bundled model, seeded into S3

    # Another writer (a trainer elsewhere) commits version 2 straight to S3.
    async with S3ObjectStore(bucket, "serving", s3_settings) as objects:
        other = VersionStore(objects, "gbm")
        ckpt = await other.load(1, need_training=True)
        scaled = {k: v * 1.001 if v.is_floating_point() else v for k, v in ckpt.model.items()}
        variant = Checkpoint(ckpt.manifest, scaled, ckpt.training)
        # certified (a made-up certificate for its own content): only certified versions are served
        variant = replace(variant, certificate=fake_certificate(variant, seed=3))
        stored = await other.commit(variant, "from elsewhere")
    assert stored.version == 2

    for _ in range(100):  # the tracker polls every 0.05 s
        r = await client.post("/v1/price", json={"contracts": [CONTRACT]})
        body = await r.json()
        if body["models"]["gbm"]["version"] == 2:
            break
        await asyncio.sleep(0.05)
    assert body["models"]["gbm"] == {"version": 2, "content_hash": stored.content_hash}
    assert body["results"][0]["price"] != first["results"][0]["price"]

    r = await client.post("/v1/admin/models/gbm/pin", json={"version": 1}, headers=AUTH)
    assert r.status == 200, await r.text()
    r = await client.post("/v1/price", json={"contracts": [CONTRACT]})
    assert orjson.loads(await r.read()) == first  # version 1 again, exactly
    r = await client.get("/v1/admin/models/gbm/verify", headers=AUTH)
    report = await r.json()
    assert report["ok"] and report["pinned"] == 1 and report["head"] == 2
    app = client.app
    assert app is not None and app[keys.HOST].trackers["gbm"].mode == "pinned"


async def test_market_data_on_s3_reaches_a_stream_through_another_replica(
    tmp_path: Path,
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    """Two servers on one S3 bucket: a snapshot PUT through one is priced by reference
    through the other, and reaches the other's stream subscribers by its latest-ref poll."""
    bucket = make_bucket()
    s3 = {
        "endpoint_url": s3_settings.endpoint_url,
        "region": s3_settings.region,
        "access_key_id": s3_settings.access_key_id,
        "secret_access_key": s3_settings.secret_access_key,
    }
    common = {"store": f"s3://{bucket}/shared", "s3": s3, "marketdata": {"poll_seconds": 0.1}}
    writer = await aiohttp_client(create_app(settings_for(tmp_path / "a", **common), Metrics()))
    reader = await aiohttp_client(create_app(settings_for(tmp_path / "b", **common), Metrics()))

    r = await writer.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot(spot=100.0))
    assert r.status == 201, await r.text()
    first_hash = (await r.json())["hash"]
    body = {"val_datetime": VDT, "contracts": [by_reference()]}
    r = await reader.post("/v1/price", json=body)
    assert r.status == 200, await r.text()
    assert (await r.json())["market_data"]["hash"] == first_hash

    ws = await reader.ws_connect("/v1/stream")
    await ws.send_json({"op": "subscribe", "id": "s", "contracts": [by_reference()]})
    quotes: list[dict[str, Any]] = []
    while len(quotes) < 1:
        msg = await ws.receive_json(timeout=10)
        if msg["type"] == "quote":
            quotes.append(msg)
    r = await writer.put(f"/v1/marketdata/default/{VDT}/2026-11-26T16:02:00Z", json=snapshot(spot=110.0))
    assert r.status == 201
    second_hash = (await r.json())["hash"]
    while True:
        msg = await ws.receive_json(timeout=10)
        if msg["type"] == "quote":
            break
    assert msg["reason"] == "snapshot" and msg["seq"] == 2
    assert msg["market_data"]["hash"] == second_hash
    assert msg["results"][0]["price"] > quotes[0]["results"][0]["price"]

    # A namespace with no snapshot yet: the subscription waits (an error says why) and
    # its first quote comes when a snapshot is PUT through the other server.
    await ws.send_json({"op": "subscribe", "id": "f", "namespace": "fresh", "contracts": [by_reference()]})
    while (msg := await ws.receive_json(timeout=10))["type"] != "error":
        pass
    assert msg["id"] == "f" and msg["code"] == "no_market_data"
    r = await writer.put(f"/v1/marketdata/fresh/{VDT}/{ASOF}", json=snapshot(spot=90.0))
    assert r.status == 201
    while (msg := await ws.receive_json(timeout=10))["type"] != "quote" or msg["id"] != "f":
        pass
    assert msg["reason"] == "snapshot" and msg["market_data"]["namespace"] == "fresh"
    await ws.close()
