"""``spectralmc serve`` with the engine in its own process: the HTTP process never loads
torch (spectralmc_server/lazy_torch.py), whatever it is asked. One real server is
driven through every kind of request the HTTP side handles (rows, columns and Arrow
books, a refusal, market data and pricing by reference, a stream, a calibration, the
admin routes, the pages and the metrics, with online training on), then the HTTP
process's memory map is read: libtorch is mapped in the engine process, not in it."""

from __future__ import annotations

import io
import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import CONTRACT, TOKEN, ServerProcess, start_server

from spectralmc_server.client import Client
from spectralmc_server.pricing.calibration import synthetic_surface

AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"SPECTRALMC_TRAIN__ENABLED": "true", "SPECTRALMC_ADMIN_TOKEN": TOKEN}
    proc = start_server(tmp_path_factory.mktemp("torchfree"), env=env)
    yield proc
    if proc.proc.poll() is None:
        proc.stop(signal.SIGKILL)


def call(url: str, method: str, path: str, body: Any = None, ctype: str = "application/json") -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": ctype, **AUTH})
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def mapped(pid: int, library: str) -> bool:
    return any(library in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def engine_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"engine_service" in Path(f"/proc/{c}/cmdline").read_bytes()]


def arrow_book() -> bytes:
    table = pa.table({k: [v] for k, v in CONTRACT.items()})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def heston_snapshot() -> dict[str, Any]:
    """The sample snapshot with an SPX surface a Heston law implies (calibratable)."""
    body = snapshot()
    true = {"v0": 0.03, "kappa": 2.0, "theta": 0.05, "xi": 0.6, "rho": -0.65}
    surface = synthetic_surface("heston", true, [0.25, 0.5, 1.0, 1.5, 2.0], [0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2])
    body["vol_surfaces"]["SPX"] = surface.model_dump(mode="json")
    return body


def test_the_http_process_never_loads_torch(server: ServerProcess) -> None:
    url, pid = server.url, server.proc.pid
    status, _ = call(url, "POST", "/v1/price", {"contracts": [CONTRACT], "measures": ["price", "delta", "vega"]})
    assert status == 200
    columns = {k: [v, v] for k, v in CONTRACT.items()} | {"id": ["a", "b"]}
    assert call(url, "POST", "/v1/price", {"columns": columns})[0] == 200
    assert call(url, "POST", "/v1/price", arrow_book(), "application/vnd.apache.arrow.stream")[0] == 200
    assert call(url, "POST", "/v1/price", {"contracts": [{**CONTRACT, "vol": -1.0}]})[0] == 422
    assert call(url, "PUT", f"/v1/marketdata/default/{VDT}/{ASOF}", heston_snapshot())[0] == 201
    status, body = call(url, "POST", "/v1/price", {"contracts": [by_reference()], "val_datetime": VDT})
    assert status == 200, body
    status, body = call(url, "POST", "/v1/calibrate", {"val_datetime": VDT, "underlying": "SPX", "max_iterations": 3})
    assert status == 200, body
    with Client(url) as client, client.stream({"id": "s1", "contracts": [CONTRACT]}) as stream:
        assert stream.get(timeout=WAIT)["type"] == "quote"
    for path in ("/v1/models", "/v1/models/gbm/validation", "/v1/jobs", "/ui", "/", "/docs", "/metrics", "/readyz"):
        assert call(url, "GET", path)[0] == 200, path
    for path in ("versions", "pins", "verify"):
        assert call(url, "GET", f"/v1/admin/models/gbm/{path}")[0] == 200, path
    assert call(url, "POST", "/v1/admin/models/gbm/gc", {"keep": 5, "dry_run": False})[0] == 200
    status, body = call(
        url, "POST", "/v1/admin/models/gbm/commit", {"message": "torch-free", "allow_unqualified": True}
    )
    assert status == 201, body  # the trainer's state, certified in the engine, served by a swap
    assert call(url, "POST", "/v1/admin/models/gbm/pin", {"version": json.loads(body)["version"]})[0] == 200
    engines = engine_pids(pid)
    assert engines and all(mapped(e, "libtorch") for e in engines)  # the check can fail
    assert not mapped(pid, "libtorch"), "the HTTP process loaded torch"


def test_a_thread_mode_server_loads_torch_through_the_stand_in(tmp_path: Path) -> None:
    """With the engine on a thread of the server's process the same start-up (the
    stand-in installed first) loads torch when the engine starts, and prices."""
    env = {"SPECTRALMC_TRAIN__ENABLED": "false", "SPECTRALMC_ENGINE__MODE": "thread"}
    server = start_server(tmp_path, env=env)
    try:
        status, body = call(server.url, "POST", "/v1/price", {"contracts": [CONTRACT]})
        assert status == 200, body
        assert json.loads(body)["results"][0]["price"] > 0
        assert mapped(server.proc.pid, "libtorch")
        assert not engine_pids(server.proc.pid)
    finally:
        server.stop(signal.SIGKILL)
