"""``http_workers = 2``: two HTTP worker processes on one port (SO_REUSEPORT), each with
its own engine process, under the supervisor (cli/serve_workers.py), as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import CONTRACT, TOKEN, ServerProcess, free_port, start_server

pytestmark = pytest.mark.slow

ENV = {
    "SPECTRALMC_HTTP_WORKERS": "2",
    "SPECTRALMC_MODELS": '["gbm"]',
    "SPECTRALMC_TRAIN__ENABLED": "false",
    "SPECTRALMC_ADMIN_TOKEN": TOKEN,
    "SPECTRALMC_POLL_SECONDS": "600",  # a sibling sees an admin change only if told
    "SPECTRALMC_MARKETDATA__POLL_SECONDS": "600",  # ... and a snapshot stored through another
}


def call(url: str, method: str = "GET", body: Any = None, admin: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (the kernel picks a worker per connection)."""
    headers = {"Connection": "close", "Content-Type": "application/json"}
    if admin:
        headers["Authorization"] = f"Bearer {TOKEN}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def from_each(url: str, method: str = "GET", body: Any = None, admin: bool = False) -> dict[str, tuple[int, bytes]]:
    """The same request until each worker has answered it (at most 400 tries)."""
    seen: dict[str, tuple[int, bytes]] = {}
    for _ in range(400):
        status, headers, payload = call(url, method, body, admin)
        seen.setdefault(headers["X-SpectralMC-Worker"], (status, payload))
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered 400 connections")


def wait_for_log(server: ServerProcess, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log.read_text():
            return
        assert server.proc.poll() is None, server.log.read_text()
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in the log:\n{server.log.read_text()}")


def worker_pids(run_marker: str = "--worker-dir") -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", run_marker], check=False, capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("workers")
    server = start_server(tmp, env=ENV, timeout=120)
    try:
        wait_for_log(server, "with 2 HTTP workers")
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM, timeout=60)


def test_both_workers_serve_the_same_numbers(workers: ServerProcess) -> None:
    answers = from_each(f"{workers.url}/v1/price", "POST", {"contracts": [CONTRACT]})
    rows = {k: json.loads(payload) for k, (status, payload) in answers.items() if status == 200}
    assert set(rows) == {"0", "1"}, answers
    a, b = rows["0"]["results"][0], rows["1"]["results"][0]
    assert a["price"] == b["price"] and a["model"] == b["model"], (a, b)  # same version, bit-identical


def test_internal_routes_are_not_on_tcp(workers: ServerProcess) -> None:
    for path, method in (("/internal/metrics", "GET"), ("/internal/models/gbm/poll", "POST")):
        status, _, payload = call(f"{workers.url}{path}", method)
        assert status == 404, (path, payload)


def test_metrics_gather_every_worker(workers: ServerProcess, tmp_path: Path) -> None:
    for k, (status, payload) in from_each(f"{workers.url}/metrics").items():
        assert status == 200
        text = payload.decode()
        assert 'spectralmc_http_worker_up{worker="0"} 1.0' in text, k
        assert 'spectralmc_http_worker_up{worker="1"} 1.0' in text, k
        # each worker's own series, and its engine's, labelled
        for w in ("0", "1"):
            assert f'spectralmc_process_resident_bytes{{process="http",worker="{w}"}}' in text, (k, w)
        page = tmp_path / f"metrics-{k}.txt"
        page.write_bytes(payload)
        check = subprocess.run(
            ["promtool", "check", "metrics"], stdin=page.open("rb"), check=False, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_routes_that_need_worker_0_are_handed_to_it(workers: ServerProcess) -> None:
    # (the answer's X-SpectralMC-Worker names the worker that made it: always 0)
    for _ in range(60):
        status, headers, payload = call(f"{workers.url}/v1/jobs")
        assert status == 200 and json.loads(payload) == {"jobs": []}, payload
        assert headers["X-SpectralMC-Worker"] == "0", headers
    # a commit needs the trainer's state, which only worker 0 has: whoever is asked,
    # worker 0 answers (here: it does not train, so 409 naming its role "all")
    for _ in range(100):
        status, headers, payload = call(f"{workers.url}/v1/admin/models/gbm/commit", "POST", {}, admin=True)
        assert status == 409, payload
        assert headers["X-SpectralMC-Worker"] == "0", headers
        assert "role 'all'" in json.loads(payload)["error"]["message"]
    # an unknown model is 404 from any worker; no token is 401 from any worker
    for k, (status, _) in from_each(f"{workers.url}/v1/admin/models/nope/commit", "POST", {}, admin=True).items():
        assert status == 404, k
    for k, (status, _) in from_each(f"{workers.url}/v1/admin/models/gbm/commit", "POST", {}).items():
        assert status == 401, k


def test_a_pin_reaches_every_worker_before_its_answer(workers: ServerProcess) -> None:
    status, _, payload = call(f"{workers.url}/v1/admin/models/gbm/pin", "POST", {"version": 1}, admin=True)
    assert status == 200, payload
    try:
        for k, (_status, payload) in from_each(f"{workers.url}/v1/models").items():
            row = next(m for m in json.loads(payload)["models"] if m["name"] == "gbm")
            assert row["mode"] == "pinned", (k, row)  # poll_seconds is 600: told, not polled
    finally:
        status, _, payload = call(f"{workers.url}/v1/admin/models/gbm/unpin", "POST", {}, admin=True)
        assert status == 200, payload
    for k, (_, payload) in from_each(f"{workers.url}/v1/models").items():
        row = next(m for m in json.loads(payload)["models"] if m["name"] == "gbm")
        assert row["mode"] == "tracking", (k, row)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of 2 HTTP workers for one test; stopped (workers and engines too) even
    when the test fails half-way."""
    server = start_server(tmp_path, env=ENV, timeout=120)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM, timeout=60)
        for pid in worker_pids(str(tmp_path)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_every_worker_and_engine(supervised: ServerProcess, tmp_path: Path) -> None:
    server = supervised
    wait_for_log(server, "with 2 HTTP workers")
    marker = str(tmp_path)  # every worker's command line names this data dir
    assert len([p for p in worker_pids(marker) if p != server.proc.pid]) >= 2
    assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log.read_text()
    time.sleep(0.5)
    assert worker_pids(marker) == [], server.log.read_text()
    assert "SIGTERM: stopping the 2 HTTP workers" in server.log.read_text()


def test_a_dead_worker_stops_the_server(supervised: ServerProcess, tmp_path: Path) -> None:
    server = supervised
    wait_for_log(server, "with 2 HTTP workers")
    pattern = f"--data-dir {tmp_path}/data --port {server.port} --worker 1 "
    out = subprocess.run(["pgrep", "-f", "--", pattern], check=False, capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    os.kill(int(out[0]), signal.SIGKILL)
    assert server.proc.wait(60) == 1, server.log.read_text()
    log = server.log.read_text()
    assert "HTTP worker 1 exited (signal SIGKILL): stopping the others; the server exits 1" in log, log
    time.sleep(0.5)
    assert worker_pids(str(tmp_path)) == [], log


def serve_exit(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--data-dir", str(tmp_path / "data"), *args]
    return subprocess.run(cmd, env={**os.environ, **env}, check=False, capture_output=True, text=True, timeout=60)


def test_bad_worker_settings_exit_2(tmp_path: Path) -> None:
    got = serve_exit(tmp_path, "--role", "train", env={**ENV})
    assert got.returncode == 2, got.stderr
    assert "http_workers: must be 1 for role 'train'" in got.stderr, got.stderr
    got = serve_exit(tmp_path, env={**ENV, "SPECTRALMC_HTTP_WORKERS": "0"})
    assert got.returncode == 2 and "http_workers" in got.stderr, got.stderr
    with socket.socket() as taken:  # a port another program holds (no SO_REUSEPORT)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got = serve_exit(tmp_path, "--port", str(port), env=ENV)
    assert got.returncode == 2, got.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in got.stderr, got.stderr
    assert "Traceback" not in got.stderr
    # the worker flag is the supervisor's, not a user's
    got = serve_exit(tmp_path, "--port", str(free_port()), "--worker", "3", env={"SPECTRALMC_MODELS": '["gbm"]'})
    assert got.returncode == 2 and "--worker" in got.stderr, got.stderr


async def test_a_snapshot_requotes_streams_on_every_worker(workers: ServerProcess) -> None:
    """A snapshot PUT through one worker requotes the subscribers of both at once
    (marketdata.poll_seconds is 600 here: the news is told, not polled)."""

    def asof(i: int) -> str:
        base = datetime.fromisoformat(ASOF.replace("Z", "+00:00")) + timedelta(seconds=i)
        return base.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async with aiohttp.ClientSession() as session:

        async def put(i: int) -> str:
            url = f"{workers.url}/v1/marketdata/default/{VDT}/{asof(i)}"
            async with session.put(url, json=snapshot(spot=100.0 + i), headers={"Connection": "close"}) as r:
                assert r.status == 201, await r.text()
                return r.headers["X-SpectralMC-Worker"]

        await put(0)
        sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        for _ in range(200):  # one stream on each worker (the kernel picks per connection)
            ws = await session.ws_connect(f"{workers.url}/v1/stream")
            k = ws._response.headers["X-SpectralMC-Worker"]  # the upgrade's answer names its worker
            if k in sockets:
                await ws.close()
            else:
                sockets[k] = ws
            if len(sockets) == 2:
                break
        assert set(sockets) == {"0", "1"}, sorted(sockets)
        for ws in sockets.values():
            await ws.send_str(orjson.dumps({"op": "subscribe", "id": "s", "contracts": [by_reference("r1")]}).decode())
            assert orjson.loads((await ws.receive(timeout=30)).data)["type"] == "subscribed"
            first = orjson.loads((await ws.receive(timeout=30)).data)
            assert first["type"] == "quote" and first["reason"] == "subscribe", first
        via = await put(1)
        for k, ws in sockets.items():
            quote = orjson.loads((await ws.receive(timeout=10)).data)  # not 600 s
            assert quote["type"] == "quote" and quote["reason"] == "snapshot", (k, via, quote)
            assert quote["market_data"]["data_asof"] == asof(1), (k, via, quote)
            await ws.close()
