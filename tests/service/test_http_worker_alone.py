"""A worker other than 0 whose worker 0 does not answer (its Unix socket is missing):
the routes it hands over answer 503 ``primary_unavailable``, /metrics still answers with
``spectralmc_http_worker_up`` 0 for worker 0, and an admin pin still succeeds (the other
worker reads the store within poll_seconds). In process; tests/service/test_http_workers.py
runs the real supervisor and workers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from server_util import TOKEN, AppServer, Client, assert_error, settings_for

from spectralmc_server.service.app import create_app
from spectralmc_server.service.http_workers import HTTPWorker, worker_settings
from spectralmc_server.service.metrics import Metrics

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_a_worker_without_worker_0(tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = worker_settings(settings_for(tmp_path, models=["gbm"]), 1)
    assert settings.role == "serve"
    app = create_app(settings, Metrics(engine_families=True), worker=HTTPWorker(1, 2, run_dir))
    client = await aiohttp_client(AppServer(app))

    r = await client.get("/v1/jobs")
    await assert_error(r, 503, "primary_unavailable")
    assert r.headers["Retry-After"] == "5"
    r = await client.post("/v1/admin/models/gbm/commit", json={}, headers=AUTH)
    await assert_error(r, 503, "primary_unavailable")
    r = await client.post("/v1/admin/models/gbm/commit", json={})  # no token: refused here
    await assert_error(r, 401, "unauthorized")

    r = await client.get("/metrics")
    text = await r.text()
    assert r.status == 200 and r.headers["X-SpectralMC-Worker"] == "1"
    assert 'spectralmc_http_worker_up{worker="0"} 0.0' in text
    assert 'spectralmc_http_worker_up{worker="1"} 1.0' in text
    assert 'process="http",worker="1"' in text

    r = await client.post("/v1/admin/models/gbm/pin", json={"version": 1}, headers=AUTH)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["pinned"] == 1 and body["serving"]["mode"] == "pinned", body  # this worker serves the pin
