"""``spectralmc serve`` with the engine in its own process: the HTTP process never loads
torch (spectralmc_server/lazy_torch.py), whatever it is asked. One real server is
driven through every kind of request the HTTP side handles (rows, columns and Arrow
books, every process with every measure, barriers, the admission refusals,
market data and pricing by reference, a stream, a calibration, the
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


MARKET = {"spot": 100.0, "rate": 0.03, "dividend": 0.01}
PROCESSES: list[dict[str, Any]] = [
    {"vol": 0.25},
    {"process": "heston", "params": {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}},
    {"process": "merton", "params": {"sigma": 0.2, "lambda": 0.5, "mu_j": -0.1, "sigma_j": 0.15}},
    {"process": "asian", "vol": 0.25, "fixings": 12},
    {"process": "rbergomi", "params": {"H": 0.1, "eta": 1.5, "rho": -0.9, "xi0": 0.04}},
]
MEASURES = ["price", "delta", "gamma", "vega", "theta", "rho", "digital", "mean", "stdev", "skew", "kurtosis"]
# Heston whose E[S_T^4] explodes before T = 2 (tests/engine/test_exact_moments.py)
EXPLODING = {"v0": 0.01, "kappa": 0.5, "theta": 0.01, "xi": 1.0, "rho": 0.3}


def every_process_and_measure(url: str) -> None:
    """Each process with every measure and quantiles, a barrier contract, and the
    refusals at admission that read the contracts' laws (an exploding moment, a spread
    too wide for moments, rough Bergomi's infinite stdev): their checks run where the
    HTTP process runs too, and must not load torch there."""
    for k, law in enumerate(PROCESSES):
        contract = {"id": f"p{k}", "right": "call", "strike": 100.0, "expiry_years": 1.0, **MARKET, **law}
        for measures in (MEASURES, ["quantiles"]):
            status, body = call(url, "POST", "/v1/price", {"contracts": [contract], "measures": measures})
            assert status == 200, (law, measures, body)
    barrier = {**CONTRACT, "id": "b", "barrier": {"type": "down-and-out", "level": 90.0}}
    assert call(url, "POST", "/v1/price", {"contracts": [barrier], "measures": ["price", "survival"]})[0] == 200
    exploding = {"id": "x", "right": "call", "strike": 100.0, "expiry_years": 2.0, **MARKET}
    exploding |= {"process": "heston", "params": EXPLODING}
    refusals = [
        ({"contracts": [exploding], "measures": ["kurtosis"]}, "kurtosis is infinite"),
        ({"contracts": [{**CONTRACT, "vol": 3.0, "expiry_years": 5.0}], "measures": ["stdev"]}, "spread"),
        (
            {
                "contracts": [
                    {**exploding, "process": "rbergomi", "params": {"H": 0.1, "eta": 1.5, "rho": -0.7, "xi0": 0.04}}
                ],
                "measures": ["stdev"],
            },
            "stdev is infinite",
        ),
    ]
    for request, reason in refusals:
        status, body = call(url, "POST", "/v1/price", request)
        assert status == 422 and reason in body.decode(), (request, body)


def test_the_http_process_never_loads_torch(server: ServerProcess) -> None:
    url, pid = server.url, server.proc.pid
    every_process_and_measure(url)
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
