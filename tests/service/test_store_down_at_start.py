"""A replica starts while its store is down (issue 22 item 8), on a real S3 server
(SeaweedFS, one for this module, stopped and started again to make the outage):

- it serves the version it last loaded, from its local version cache (hash-checked),
  else the bundled model; a damaged cache entry is refused and the next option used;
- /readyz answers 200 ``degraded``, naming what each model serves and that the store
  was unreachable; answers name the version that produced them;
- once the store answers it catches up to the head, and /readyz is ``ready`` again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from certificate_util import fake_certificate
from pydantic import ValidationError
from server_util import CONTRACT, AppServer, settings_for

from devtools.seaweed import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, boto3_client, free_ports
from spectralmc_server.engine.checkpoint import MODEL_FILE, Checkpoint, read_dir
from spectralmc_server.engine_service.version_cache import ENTRY, CacheRefusedError, VersionCache
from spectralmc_server.models import bundled_models
from spectralmc_server.service.app import create_app
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import Settings
from spectralmc_server.store.objects import StoreUnavailableError
from spectralmc_server.store.records import StoredVersion
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import VersionStore

Client = TestClient[Any, Any]
AioClient = Callable[..., Awaitable[Client]]
PREFIX = "models"


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """This module's own S3 server: its tests stop and start it."""
    root = tmp_path_factory.mktemp("seaweedfs-down")
    (root / "data").mkdir()
    server = SeaweedFS(root / "data", root / "weed.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(weed: SeaweedFS) -> str:
    weed.start()  # a test that stopped it and failed midway left it down
    name = f"down-{time.time_ns()}"
    boto3_client(weed.endpoint_url).create_bucket(Bucket=name)
    return name


def s3_client_settings(endpoint_url: str) -> S3Settings:
    return S3Settings(
        endpoint_url=endpoint_url,
        region=REGION,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        max_attempts=2,
        base_delay_seconds=0.01,
        max_delay_seconds=0.05,
        timeout_seconds=2.0,
    )


def server_settings(tmp_path: Path, endpoint_url: str, bucket: str, **overrides: Any) -> Settings:
    """One model (gbm), quick polls and backoff, few S3 retries: a down store is seen at once."""
    fields: dict[str, Any] = {
        "store": f"s3://{bucket}/{PREFIX}",
        "s3": {
            "endpoint_url": endpoint_url,
            "region": REGION,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "max_attempts": 2,
            "timeout_seconds": 2.0,
        },
        "models": ["gbm"],
        "poll_max_backoff_seconds": 0.3,
        "version_cache": {"keep": 2},
    }
    return settings_for(tmp_path, **{**fields, **overrides})


@asynccontextmanager
async def server(aiohttp_client: AioClient, settings: Settings) -> AsyncIterator[Client]:
    client = await aiohttp_client(AppServer(create_app(settings, Metrics())))
    try:
        yield client
    finally:
        await client.close()


async def readyz(client: Client) -> dict[str, Any]:
    r = await client.get("/readyz")
    assert r.status == 200, await r.text()
    body: dict[str, Any] = await r.json()
    return body


async def gbm_identity(client: Client) -> dict[str, Any]:
    r = await client.post("/v1/price", json={"contracts": [CONTRACT]})
    assert r.status == 200, await r.text()
    return dict((await r.json())["models"]["gbm"])


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def commit_variant(endpoint_url: str, bucket: str, seed: int) -> StoredVersion:
    """Another writer (a trainer) commits a new certified version of gbm straight to S3."""
    async with S3ObjectStore(bucket, PREFIX, s3_client_settings(endpoint_url)) as objects:
        store = VersionStore(objects, "gbm")
        ckpt = read_dir(bundled_models()["gbm"])
        scaled = {k: v * (1 + seed * 1e-3) if v.is_floating_point() else v for k, v in ckpt.model.items()}
        variant = Checkpoint(ckpt.manifest, scaled, ckpt.training)
        return await store.commit(replace(variant, certificate=fake_certificate(variant, seed=seed)), f"v{seed}")


def cached_versions(cache_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (cache_dir / "gbm").iterdir() if p.name.isdigit())


async def test_a_replica_starts_from_its_cache_while_the_store_is_down_and_catches_up(
    tmp_path: Path, weed: SeaweedFS, bucket: str, aiohttp_client: AioClient, caplog: pytest.LogCaptureFixture
) -> None:
    settings = server_settings(tmp_path, weed.endpoint_url, bucket)
    cache_dir = settings.version_cache_dir
    assert cache_dir == (tmp_path / "data" / "version-cache").resolve()

    # A first run with the store up: seeds v1, follows v2 and v3, copies each to the cache.
    async with server(aiohttp_client, settings) as client:
        assert (await gbm_identity(client))["version"] == 1
        for seed in (2, 3):
            stored = await commit_variant(weed.endpoint_url, bucket, seed)

            async def follows(version: int = stored.version) -> bool:
                return bool((await gbm_identity(client))["version"] == version)

            await eventually(follows, f"the replica serves version {stored.version}")
        v3 = stored

        async def cached() -> bool:
            return cached_versions(cache_dir) == [2, 3]  # keep = 2: version 1 pruned

        await eventually(cached, "versions 2 and 3 (only) in the cache")

    # The store goes down; a replica starts: it serves version 3 from its cache.
    weed.stop()
    with caplog.at_level(logging.WARNING, logger="spectralmc_server"):
        async with server(aiohttp_client, settings) as client:
            ready = await readyz(client)
            assert ready["status"] == "degraded"
            assert ready["models"] == {"gbm": 3}
            fallback = ready["fallback"]["gbm"]
            assert fallback["source"] == "cache" and fallback["version"] == 3
            assert fallback["content_hash"] == v3.content_hash and fallback["refused"] == []
            assert fallback["path"] == str(cache_dir / "gbm" / "000000000003")
            assert "store unreachable" in fallback["store_error"]
            [line] = ready["degraded"]
            assert line.startswith(f"gbm: serving cached version 3 ({v3.content_hash}) from the local version cache")
            assert "the store was unreachable at start" in line
            assert await gbm_identity(client) == {"version": 3, "content_hash": v3.content_hash}
            models = (await (await client.get("/v1/models")).json())["models"]
            assert models[0]["source"] == "cache" and models[0]["version"] == 3
            assert any("serving cached version 3" in r.getMessage() for r in caplog.records)

            # The store comes back with a new head: the replica catches up, ready again.
            await asyncio.to_thread(weed.start)  # the replica keeps answering meanwhile
            v4 = await commit_variant(weed.endpoint_url, bucket, 4)

            async def caught_up() -> bool:
                ready = await readyz(client)
                return bool(ready["status"] == "ready" and ready["models"] == {"gbm": v4.version})

            await eventually(caught_up, "the replica serves the head once the store is back")
            ready = await readyz(client)
            assert ready["degraded"] == [] and ready["fallback"] == {}
            assert await gbm_identity(client) == {"version": 4, "content_hash": v4.content_hash}

            async def cached_v4() -> bool:
                return cached_versions(cache_dir) == [3, 4]

            await eventually(cached_v4, "version 4 copied to the cache, version 2 pruned")


async def test_a_damaged_cache_entry_is_refused_for_the_next_option(
    tmp_path: Path, weed: SeaweedFS, bucket: str, aiohttp_client: AioClient
) -> None:
    """The cache filled through the cache itself (from the real store), then damaged; the
    replica's store is an S3 endpoint where nothing listens (never started)."""
    va = await commit_variant(weed.endpoint_url, bucket, 2)  # version 1: a variant
    cache_dir = tmp_path / "cache"
    cache = VersionCache(cache_dir, keep=3)
    async with S3ObjectStore(bucket, PREFIX, s3_client_settings(weed.endpoint_url)) as objects:
        store = VersionStore(objects, "gbm")
        vb = await store.commit(read_dir(bundled_models()["gbm"]), "the bundled model again")  # version 2
        await cache.save(store, va.version)
        await cache.save(store, vb.version)  # served last: the first candidate
    assert [p.name for p in cache.candidates("gbm")] == ["000000000002", "000000000001"]

    [nowhere] = free_ports(1)
    settings = server_settings(tmp_path, f"http://127.0.0.1:{nowhere}", bucket, version_cache={"dir": str(cache_dir)})

    # The most recently served entry's weights changed on disk: refused, the next entry serves.
    weights = cache_dir / "gbm" / "000000000002" / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    async with server(aiohttp_client, settings) as client:
        ready = await readyz(client)
        fallback = ready["fallback"]["gbm"]
        assert ready["status"] == "degraded" and fallback["source"] == "cache" and fallback["version"] == 1
        [refused] = fallback["refused"]
        assert "000000000002" in refused and f"{MODEL_FILE} fails its SHA-256" in refused
        assert await gbm_identity(client) == {"version": 1, "content_hash": va.content_hash}

    # Both damaged (the other one's entry.json naming another content hash than its manifest's):
    # the bundled model serves, version none.
    entry = cache_dir / "gbm" / "000000000001" / ENTRY
    entry.write_bytes(orjson.dumps({**orjson.loads(entry.read_bytes()), "content_hash": vb.content_hash}))
    bundled_hash = read_dir(bundled_models()["gbm"], need_training=False).content_hash
    async with server(aiohttp_client, settings) as client:
        ready = await readyz(client)
        fallback = ready["fallback"]["gbm"]
        assert ready["status"] == "degraded" and ready["models"] == {"gbm": None}
        assert fallback["source"] == "bundled" and fallback["content_hash"] == bundled_hash
        assert len(fallback["refused"]) == 2
        assert "the manifest's content hash" in fallback["refused"][1]
        [line] = ready["degraded"]
        assert line.startswith(f"gbm: serving the bundled model ({bundled_hash}), version none (2 cached version(s)")
        assert "store unreachable (EndpointConnectionError)" in line
        assert await gbm_identity(client) == {"version": None, "content_hash": bundled_hash}


async def test_the_cache_checks_what_the_store_checks_and_keeps_its_bound(
    tmp_path: Path, weed: SeaweedFS, bucket: str
) -> None:
    cache = VersionCache(tmp_path / "cache", keep=2)
    async with S3ObjectStore(bucket, PREFIX, s3_client_settings(weed.endpoint_url)) as objects:
        store = VersionStore(objects, "gbm")
        versions = [await commit_variant(weed.endpoint_url, bucket, seed) for seed in (1, 2, 3)]
        for v in versions:
            await cache.save(store, v.version)
        assert [p.name for p in cache.candidates("gbm")] == ["000000000003", "000000000002"]  # keep = 2

        path = cache.entry_dir("gbm", 2)
        got = cache.read("gbm", path)
        loaded = await store.load(2)
        assert (got.version, got.content_hash) == (2, versions[1].content_hash)
        assert got.record_hash == versions[1].record_hash
        assert got.checkpoint.content_hash == loaded.content_hash
        assert got.checkpoint.certificate == loaded.certificate
        assert all(got.checkpoint.model[k].equal(t) for k, t in loaded.model.items())
        assert not list((tmp_path / "cache" / "gbm").glob(".tmp-*"))  # the writes left no temporaries

        # Served again: marked, not fetched; the older entry goes first now.
        await cache.save(store, 2)
        assert [p.name for p in cache.candidates("gbm")] == ["000000000002", "000000000003"]

        # A damaged certificate, then a missing file: refused, each saying why.
        cert = path / "certificate.json"
        cert.write_bytes(cert.read_bytes().replace(b'"format"', b'"Format"', 1))
        with pytest.raises(CacheRefusedError, match=r"certificate\.json fails its SHA-256"):
            cache.read("gbm", path)
        (path / MODEL_FILE).unlink()
        with pytest.raises(CacheRefusedError, match=r"model\.safetensors cannot be read"):
            cache.read("gbm", path)
        # Saving that version again writes it anew (the store has it intact).
        await cache.save(store, 2)
        assert cache.read("gbm", path).content_hash == versions[1].content_hash

    # A cache entry is only written from what the store verifies: an unreachable store fails.
    [nowhere] = free_ports(1)
    async with S3ObjectStore(bucket, PREFIX, s3_client_settings(f"http://127.0.0.1:{nowhere}")) as objects:
        with pytest.raises(StoreUnavailableError):
            await cache.save(VersionStore(objects, "gbm"), 3)


def test_the_cache_settings(tmp_path: Path) -> None:
    def settings(**fields: Any) -> Settings:
        return Settings(store="s3://bucket/models", data_dir=tmp_path, **fields)

    assert settings().version_cache_dir == (tmp_path / "version-cache").resolve()
    assert settings(version_cache={"dir": str(tmp_path / "c")}).version_cache_dir == tmp_path / "c"
    assert settings(version_cache={"keep": 0}).version_cache_dir is None
    assert Settings(data_dir=tmp_path).version_cache_dir is None  # a file:// store is local disk already
    with pytest.raises(ValidationError, match=r"version_cache\.keep\n  Input should be greater than or equal to 0"):
        settings(version_cache={"keep": -1})
    with pytest.raises(ValidationError, match=r"version_cache\.size\n  Extra inputs are not permitted"):
        settings(version_cache={"size": 3})
