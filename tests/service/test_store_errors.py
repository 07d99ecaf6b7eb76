"""S3 refusing or failing on any route is 503 ``store_unavailable`` naming S3's error
code, never a 500 (issue 22, item 7), against real servers:

- a SeaweedFS of this module's own, with identities (``-s3.config``): a read-only key
  gets SeaweedFS's real ``AccessDenied`` on every write, an unknown key its real
  ``InvalidAccessKeyId``, a wrong secret ``SignatureDoesNotMatch``;
- throttling: SeaweedFS cannot be made to throttle on demand, so the server reaches it
  through :class:`FaultyEndpoint`, a real HTTP endpoint that forwards every request
  byte for byte (signatures hold) until it is told to answer as throttled S3 does
  (503 ``SlowDown``), and that is then closed (connection refused).

The session's SeaweedFS (tests/store/conftest.py) accepts any key, so it cannot refuse
one: this module starts its own, once.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yarl
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import TOKEN, AppServer, assert_error, settings_for

from devtools.seaweed import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, boto3_client
from spectralmc_server.cli import main
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotStore
from spectralmc_server.models import bundled_models
from spectralmc_server.service.app import create_app
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.store.objects import StoreUnavailableError
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import VersionStore

READER_KEY = "SPECTRALMCREADER1"  # Read and List, no Write
READER_SECRET = "reader-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>test</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "te", "upgrade"}


class AuthSeaweedFS(SeaweedFS):
    """SeaweedFS with identities: the admin key (devtools/seaweed.py's, which its
    readiness probe uses) may do anything, :data:`READER_KEY` may only read and list."""

    def __init__(self, data_dir: Path, log_path: Path, config: Path) -> None:
        super().__init__(data_dir, log_path)
        admin = {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}
        reader = {"accessKey": READER_KEY, "secretKey": READER_SECRET}
        identities = [
            {"name": "admin", "credentials": [admin], "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [reader], "actions": ["Read", "List"]},
        ]
        config.write_text(json.dumps({"identities": identities}))
        self.config = config

    def command(self) -> list[str]:
        return [*super().command(), f"-s3.config={self.config}"]

    def stop(self) -> None:
        """SIGKILL by PID: its data is thrown away, and SIGTERM can take 10 s here."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


class FaultyEndpoint:
    """A real HTTP endpoint in front of an S3 server. ``mode`` "pass" forwards each
    request unchanged (Host header and all, so SigV4 signatures still hold) and its
    answer back; "SlowDown" answers as throttled S3 does (503, code SlowDown) and
    counts the requests; :meth:`close` stops listening (connection refused)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.refused = 0
        self.url = ""
        self._session: ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.mode == "SlowDown":
            self.refused += 1
            return web.Response(status=503, body=SLOWDOWN, content_type="application/xml")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = yarl.URL(self.upstream + request.raw_path, encoded=True)
        async with self._session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            data = await upstream.read()
            back = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP | {"content-type"}}
            return web.Response(status=upstream.status, body=data, headers=back, content_type=upstream.content_type)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthSeaweedFS]:
    root = tmp_path_factory.mktemp("seaweedfs-auth")
    (root / "data").mkdir()
    server = AuthSeaweedFS(root / "data", root / "weed.log", root / "s3.json")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _settings(s3: SeaweedFS, key: str = ACCESS_KEY, secret: str = SECRET_KEY, **changes: Any) -> S3Settings:
    fields: dict[str, Any] = {
        "endpoint_url": s3.endpoint_url,
        "region": REGION,
        "access_key_id": key,
        "secret_access_key": secret,
        "base_delay_seconds": 0.01,
        "max_delay_seconds": 0.05,
    }
    return S3Settings(**{**fields, **changes})


@pytest.fixture(scope="module")
def bucket(s3: AuthSeaweedFS) -> str:
    """A bucket whose ``serving`` store holds the bundled gbm model (version 1) and one
    market-data snapshot, written with the admin key: a server with the read-only key
    starts on it without writing."""
    name = "spectralmc-store-errors"
    boto3_client(s3.endpoint_url).create_bucket(Bucket=name)

    async def seed() -> None:
        async with S3ObjectStore(name, "serving", _settings(s3)) as objects:
            ckpt = await asyncio.to_thread(read_dir, bundled_models()["gbm"])
            await VersionStore(objects, "gbm").commit(ckpt, "seeded", only_version=1)
            at, asof = datetime.fromisoformat(VDT), datetime.fromisoformat(ASOF)
            await SnapshotStore(objects).put("default", at, asof, MarketSnapshot.model_validate(snapshot()))

    asyncio.run(seed())
    return name


@pytest.fixture
async def endpoint(s3: AuthSeaweedFS) -> AsyncIterator[FaultyEndpoint]:
    faulty = FaultyEndpoint(s3.endpoint_url)
    await faulty.start()
    yield faulty
    await faulty.close()


async def _store_error(r: Any, reason: str) -> str:
    """A 503 store_unavailable whose message names ``reason``, with Retry-After."""
    err = await assert_error(r, 503, "store_unavailable")
    assert reason in err["message"], err
    assert int(r.headers["Retry-After"]) >= 1
    assert "Traceback" not in err["message"]
    message: str = err["message"]
    return message


def _count(text: str, route: str, method: str, status: str) -> float:
    want = f'spectralmc_http_requests_total{{method="{method}",route="{route}",status="{status}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(want))


async def test_access_denied_throttling_and_refused_connections_are_503(
    tmp_path: Path,
    bucket: str,
    endpoint: FaultyEndpoint,
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    """One server with the read-only key, through the faulty endpoint: its writes meet
    SeaweedFS's AccessDenied (admin and market-data routes), then every read is throttled
    (admin, market-data and pricing routes), then the endpoint is gone. Each answer is
    503 store_unavailable naming the cause, with Retry-After."""
    s3 = {
        "endpoint_url": endpoint.url,
        "region": REGION,
        "access_key_id": READER_KEY,
        "secret_access_key": READER_SECRET,
        "max_attempts": 2,
    }
    settings = settings_for(tmp_path, store=f"s3://{bucket}/serving", s3=s3, models=["gbm"])
    client = await aiohttp_client(AppServer(create_app(settings, Metrics())))
    r = await client.get(f"/v1/marketdata/default/{VDT}")
    assert r.status == 200, await r.text()  # reads are allowed
    r = await client.get("/v1/admin/models/gbm/versions", headers=AUTH)
    assert r.status == 200, await r.text()

    # writes: SeaweedFS refuses the key, and says so
    r = await client.post("/v1/admin/models/gbm/pin", json={"version": 1}, headers=AUTH)
    message = await _store_error(r, "store refused access (AccessDenied)")
    assert f"s3://{bucket}/serving/" in message
    r = await client.put(f"/v1/marketdata/default/{VDT}/2026-11-26T16:01:00Z", json=snapshot(spot=101.0))
    await _store_error(r, "store refused access (AccessDenied)")

    # throttled: retried (max_attempts 2), then 503 on every kind of route
    endpoint.mode = "SlowDown"
    r = await client.get("/v1/admin/models/gbm/versions", headers=AUTH)
    await _store_error(r, "store throttled (SlowDown)")
    assert endpoint.refused >= 2, "throttling is retried before it is answered"
    await _store_error(await client.get("/v1/marketdata/default"), "store throttled (SlowDown)")
    await _store_error(await client.get("/v1/marketdata/default/2026-11-27T16:00:00Z"), "store throttled (SlowDown)")
    priced = {"val_datetime": "2026-11-27T16:00:00Z", "contracts": [by_reference()]}  # never resolved: read
    await _store_error(await client.post("/v1/price", json=priced), "store throttled (SlowDown)")

    # the endpoint is gone: connection refused, retried, then 503
    await endpoint.close()
    r = await client.get("/v1/marketdata/default")
    await _store_error(r, "store unreachable (EndpointConnectionError)")
    r = await client.post("/v1/admin/models/gbm/unpin", json={}, headers=AUTH)
    await _store_error(r, "store unreachable")

    text = await (await client.get("/metrics")).text()
    assert _count(text, "/v1/admin/models/{name}/pin", "POST", "503") == 1
    assert _count(text, "/v1/marketdata/{namespace}", "GET", "503") == 2
    for route in ("/v1/admin/models/{name}/pin", "/v1/marketdata/{namespace}", "/v1/admin/models/{name}/versions"):
        assert _count(text, route, "GET", "500") + _count(text, route, "POST", "500") == 0


async def test_refused_keys_name_s3s_code(s3: AuthSeaweedFS, bucket: str) -> None:
    """The store itself: an unknown key, a wrong secret, a read-only key's write and a
    missing bucket are StoreUnavailableError (what the server answers 503) naming S3's
    code, and are not retried."""
    cases = [
        ("nobody-at-all-000", "x", "InvalidAccessKeyId"),
        (READER_KEY, "not-the-secret", "SignatureDoesNotMatch"),
    ]
    for key, secret, code in cases:
        async with S3ObjectStore(bucket, "serving", _settings(s3, key, secret)) as store:
            with pytest.raises(StoreUnavailableError, match=rf"store refused access \({code}\) on GetObject"):
                await store.get("anything")
            assert store.retries == 0
    async with S3ObjectStore(bucket, "serving", _settings(s3, READER_KEY, READER_SECRET)) as store:
        with pytest.raises(StoreUnavailableError, match=r"store refused access \(AccessDenied\) on PutObject"):
            await store.put_if_absent("new-key", b"x")
        assert await store.get("new-key") is None  # nothing was written; reads are allowed
        assert store.retries == 0
    async with S3ObjectStore("spectralmc-no-such-bucket", "p", _settings(s3)) as store:
        with pytest.raises(StoreUnavailableError, match=r"store bucket missing \(NoSuchBucket\)"):
            await store.list("")


def test_cli_price_with_refused_keys(
    s3: AuthSeaweedFS, bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``spectralmc price --marketdata s3://...`` with a key the store does not know: one
    line naming S3's code, exit 2, no traceback."""
    env = {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": REGION}
    env |= {"AWS_ACCESS_KEY_ID": "nobody-at-all-000", "AWS_SECRET_ACCESS_KEY": "x"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    body = orjson.dumps({"val_datetime": VDT, "contracts": [by_reference()]})
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body)))
    code = main(["price", "--marketdata", f"s3://{bucket}/serving"])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "store refused access (InvalidAccessKeyId)" in err
