"""Helpers for server tests: test settings, and ``spectralmc serve`` as a real process
on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from spectralmc_server.service import keys
from spectralmc_server.service.edge import EdgeAppRunner
from spectralmc_server.settings import Settings

TOKEN = "s3cret-admin-token"
CONTRACT = {"id": "c1", "right": "call", "strike": 105.0, "spot": 100.0, "expiry_years": 0.5, "vol": 0.25}

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings: a fresh data dir, no training unless asked, quick polling, the
    engine on a thread of the test's process (engine_process tests ask for a process),
    no GC freeze."""
    fields: dict[str, Any] = {
        "engine": {"mode": "thread"},
        "data_dir": tmp_path / "data",
        "port": 0,
        "poll_seconds": 0.05,
        "admin_token": TOKEN,
        "train": {"enabled": False},
        # no gc.collect() + gc.freeze() at each start: over the test process's heap it
        # cost ~0.1-0.5 s an app (test_gc_freeze.py checks the setting itself)
        "gc_freeze": False,
    }
    fields.update(overrides)
    return Settings(**fields)


class AppServer(TestServer):
    """pytest-aiohttp's test server on the production runner (service/edge.py): JSON
    parser errors and the header-read timeout, as under ``spectralmc serve``."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return EdgeAppRunner(self.app, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> ServerProcess:
    """``spectralmc serve`` in its own process, returned once /readyz answers 200."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--port", str(port), *args]
    if "--data-dir" not in args:
        cmd += ["--data-dir", str(tmp_path / "data")]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready within {timeout} s:\n{log.read_text()}")


def block_worker(client: Client, seconds: float) -> asyncio.Future[None]:
    """Occupy the engine's compute for ``seconds`` (await the result afterwards)."""
    return app_of(client)[keys.ENGINE].hold(seconds)


def app_of(client: Client) -> web.Application:
    """The application behind the test client."""
    app = client.app
    assert isinstance(app, web.Application)
    return app


async def assert_error(r: ClientResponse, status: int, code: str, fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """The response is a JSON error ``{"error": {"code", "message", "details"}}`` with this
    status and code, and its details name every field in ``fields``."""
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json", (r.content_type, text)
    body = orjson.loads(text)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "details"}, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["details"], list), err
    named = {d.get("field") for d in err["details"]}
    for f in fields:
        assert f in named, (f, err["details"])
    error: dict[str, Any] = err
    return error


async def ok_json(r: ClientResponse, status: int = 200) -> dict[str, Any]:
    """The JSON body of a response that must have ``status``."""
    text = await r.text()
    assert r.status == status, text
    body: dict[str, Any] = orjson.loads(text)
    return body


async def price(client: Client, contracts: list[dict[str, Any]], *measures: str, **extra: Any) -> dict[str, Any]:
    """POST /v1/price with ``contracts`` and ``measures`` (price by default): the answer."""
    body = {"measures": list(measures or ("price",)), "contracts": contracts, **extra}
    return await ok_json(await client.post("/v1/price", json=body))
