"""The engine in its own process (service/engine_process.py, engine_service/server.py).

- It answers what the engine on a thread answers, byte for byte, in every form (rows,
  columns, Arrow), error bounds included.
- SIGKILLed while serving: everything pending is answered 503 ``engine_unavailable``
  within a second, health and readiness fail, new work is refused the same way at once;
  a new engine is started, serves the same versions, and a stream opened before the
  death requotes.
- Hung (stopped): taken for dead after ``heartbeat_timeout_seconds``, killed, restarted.
- Dying more than ``engine.max_restarts`` times: ``spectralmc serve`` drains and exits 1.
- No torch class ever reaches the HTTP side (its unpickler refuses them).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from server_fixtures import make_client, serve  # noqa: F401
from server_util import CONTRACT, TOKEN, MakeClient, ServerProcess, app_of

from spectralmc_server.engine_service.protocol import http_allow
from spectralmc_server.ipc.framing import encode
from spectralmc_server.ipc.unpickling import loads
from spectralmc_server.pricing.arrow import ARROW_STREAM
from spectralmc_server.service import keys
from spectralmc_server.service.engine_pool import EnginePool
from spectralmc_server.service.engine_process import ProcessEngine

PROCESS = {"engine": {"mode": "process", "status_seconds": 0.2}}


def book(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"c{i}",
            "right": "call" if i % 2 else "put",
            "strike": 80.0 + (i * 7) % 40,
            "spot": 100.0,
            "expiry_years": 0.25 + (i % 7) * 0.25,
            "vol": 0.15 + (i % 5) * 0.05,
            "rate": 0.01,
        }
        for i in range(n)
    ]


def engine_of(client: Any) -> ProcessEngine:
    engine = app_of(client)[keys.ENGINE]
    assert isinstance(engine, ProcessEngine)
    return engine


async def test_the_engine_process_answers_what_the_thread_answers(make_client: MakeClient) -> None:  # noqa: F811
    thread = await make_client()
    process = await make_client(**PROCESS)
    engine = engine_of(process)
    assert engine.pid is not None and engine.pid != os.getpid()
    contracts = book(300)
    bodies = [
        {"contracts": contracts, "measures": ["price", "delta", "vega"]},
        {"contracts": contracts[:5], "measures": ["price", "stdev", "quantiles"], "quantile_levels": [0.05, 0.5]},
        {"contracts": [CONTRACT]},
    ]
    for body in bodies:
        answers = []
        for client in (thread, process):
            r = await client.post("/v1/price", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
            assert r.status == 200, await r.text()
            answers.append(await r.read())
        assert answers[0] == answers[1]
        assert b"error_bound" in answers[1]
    columns = {k: [c[k] for c in contracts] for k in contracts[0]}
    body = {"columns": columns, "measures": ["price", "gamma"]}
    got = []
    for client in (thread, process):
        r = await client.post("/v1/price", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status == 200
        got.append(await r.read())
    assert got[0] == got[1]
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    arrow = sink.getvalue().to_pybytes()
    got = []
    for client in (thread, process):
        r = await client.post("/v1/price", data=arrow, headers={"Content-Type": ARROW_STREAM})
        assert r.status == 200
        got.append(await r.read())
    assert got[0] == got[1]
    # the engine's own families are in /metrics once, with the RSS of both processes
    text = await (await process.get("/metrics")).text()
    assert text.count("# TYPE spectralmc_engine_failures_total counter") == 1
    assert 'spectralmc_process_resident_bytes{process="engine"}' in text
    assert 'spectralmc_process_resident_bytes{process="http"}' in text


async def test_concurrent_small_requests_share_a_job_book_and_answer_as_alone(
    make_client: MakeClient,  # noqa: F811
) -> None:
    """Small requests batched into one job cross to the engine as one book (their rows of
    PriceJob.book), a large one with its own; each answer is the bytes the same request
    gets alone from the engine on a thread."""
    thread = await make_client()
    process = await make_client(**PROCESS)
    contracts = book(400)
    bodies: list[dict[str, Any]] = []
    for k in range(40):
        size = 1 + k % 4
        body: dict[str, Any] = {"contracts": contracts[k * 4 : k * 4 + size]}
        if k % 3 == 1:
            body["measures"] = ["price", "delta"]
        if k % 5 == 2:
            body["measures"] = ["price", "quantiles"]
            body["quantile_levels"] = [0.1, 0.9]
        bodies.append(body)
    bodies.insert(17, {"contracts": contracts[:300], "measures": ["price", "gamma"]})  # its own book
    headers = {"Content-Type": "application/json"}
    alone = []
    for body in bodies:
        r = await thread.post("/v1/price", data=orjson.dumps(body), headers=headers)
        assert r.status == 200, await r.text()
        alone.append(await r.read())

    async def post(body: dict[str, Any]) -> bytes:
        r = await process.post("/v1/price", data=orjson.dumps(body), headers=headers)
        assert r.status == 200, await r.text()
        return await r.read()

    before = await (await process.get("/metrics")).text()
    together = await asyncio.gather(*(post(b) for b in bodies))
    after = await (await process.get("/metrics")).text()
    assert list(together) == alone

    def batches(text: str) -> tuple[float, float]:
        values = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("spectralmc_batch_requests_")
        )
        return float(values["spectralmc_batch_requests_sum"]), float(values["spectralmc_batch_requests_count"])

    (s0, c0), (s1, c1) = batches(before), batches(after)
    # every request was computed (the large one maybe in slices), some jobs carried several
    assert s1 - s0 >= len(bodies) and c1 - c0 < len(bodies)


async def test_sigkill_while_serving_answers_503_at_once_and_the_engine_comes_back(
    make_client: MakeClient,  # noqa: F811
) -> None:
    client = await make_client(**PROCESS)
    engine = engine_of(client)
    first = engine.pid
    assert first is not None
    ws = await client.ws_connect("/v1/stream")
    await ws.send_json({"op": "subscribe", "id": "s1", "contracts": [CONTRACT], "measures": ["price"]})
    for _ in range(5):
        quote = await ws.receive_json(timeout=10)
        if quote["type"] == "quote":
            break
    assert quote["type"] == "quote" and quote["reason"] == "subscribe", quote

    hold = engine.hold(5.0)  # the engine computes: what follows waits in its queue and in ours
    headers = {"Content-Type": "application/json"}

    async def one(body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
        r = await client.post("/v1/price", data=orjson.dumps(body), headers=headers)
        return r.status, await r.json(), time.monotonic()

    pending = [asyncio.ensure_future(one({"contracts": [{**CONTRACT, "id": f"q{i}"}]})) for i in range(20)]
    pending.append(asyncio.ensure_future(one({"contracts": book(2000), "measures": ["price", "vega"]})))
    await asyncio.sleep(0.5)
    assert not any(p.done() for p in pending)
    t0 = time.monotonic()
    os.kill(first, signal.SIGKILL)
    results = await asyncio.gather(*pending)
    for status, body, at in results:
        assert status == 503, body
        assert body["error"]["code"] == "engine_unavailable", body
        assert at - t0 < 1.0, f"answered {at - t0:.2f} s after the kill"
    with pytest.raises(Exception):  # noqa: B017 - the held call fails with the engine
        await hold
    health = await client.get("/healthz")
    assert health.status == 503 and (await health.json())["error"]["code"] == "unhealthy"
    ready = await client.get("/readyz")
    assert ready.status == 503
    r = await client.post("/v1/price", data=orjson.dumps({"contracts": [CONTRACT]}), headers=headers)
    assert r.status == 503 and (await r.json())["error"]["code"] == "engine_unavailable"
    assert "Retry-After" in r.headers

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (await client.get("/readyz")).status != 200:
        await asyncio.sleep(0.1)
    assert (await client.get("/healthz")).status == 200
    assert engine.pid not in (None, first) and engine.restarts == 1
    r = await client.post("/v1/price", data=orjson.dumps({"contracts": [CONTRACT]}), headers=headers)
    assert r.status == 200
    assert (await r.json())["models"]["gbm"]["version"] == 1
    # the stream opened before the death is still there, and requotes from the new engine
    for _ in range(20):
        msg = await ws.receive_json(timeout=20)
        if msg["type"] == "quote" and msg.get("reason") == "model":
            break
    else:
        raise AssertionError("no requote after the engine came back")
    await ws.close()


async def test_a_hung_engine_is_killed_and_restarted(make_client: MakeClient) -> None:  # noqa: F811
    client = await make_client(engine={"mode": "process", "status_seconds": 0.2, "heartbeat_timeout_seconds": 1.0})
    engine = engine_of(client)
    first = engine.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)
    t0 = time.monotonic()
    while (await client.get("/healthz")).status == 200:
        assert time.monotonic() - t0 < 5, "a stopped engine was not noticed"
        await asyncio.sleep(0.05)
    assert time.monotonic() - t0 < 2.5
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (await client.get("/readyz")).status != 200:
        await asyncio.sleep(0.1)
    assert engine.pid not in (None, first)
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # killed and reaped


async def test_contracts_by_reference_and_their_refusals_cross_the_process(
    make_client: MakeClient,  # noqa: F811
) -> None:
    """The snapshot goes to the engine once; a refusal only the engine can make (an
    input the snapshot lacks) is a 422 naming the contract, and the engine lives on."""
    examples = Path(__file__).resolve().parents[2] / "config" / "examples"
    client = await make_client(**PROCESS)
    thread = await make_client()
    request = orjson.loads((examples / "price_by_reference.json").read_bytes())
    path = f"/v1/marketdata/default/{request['val_datetime']}/{request['data_asof']}"
    snapshot = (examples / "snapshot.json").read_bytes()
    r = await client.put(path, data=snapshot, headers={"Content-Type": "application/json"})
    assert r.status == 201, await r.text()
    pid = engine_of(client).pid
    answers = []
    for c in (client, client, thread):  # twice: the second job names the snapshot the engine keeps
        r = await c.post("/v1/price", json=request)
        assert r.status == 200, await r.text()
        answers.append(await r.read())
    assert answers[0] == answers[1] == answers[2]
    missing = {**request, "contracts": [{**request["contracts"][0], "underlying": "NDX"}]}
    r = await client.post("/v1/price", json=missing)
    assert r.status == 422, await r.text()
    body = await r.json()
    assert body["error"]["code"] == "no_market_data" and body["error"]["details"][0]["field"].startswith(
        "contracts[0]"
    ), body
    assert engine_of(client).pid == pid and (await client.get("/healthz")).status == 200


def engine_pid(server: ServerProcess) -> int:
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_an_engine_that_keeps_dying_ends_the_server_with_status_1(serve: Any) -> None:  # noqa: F811
    server = serve(env={"SPECTRALMC_ENGINE__MAX_RESTARTS": "1", "SPECTRALMC_ENGINE__MAX_BACKOFF_SECONDS": "0.5"})
    first = engine_pid(server)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    second = first
    while second == first and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            second = engine_pid(server)
        except AssertionError:  # between the two engines
            continue
    assert second != first
    while time.monotonic() < deadline:  # until the new engine is ready
        try:
            import urllib.request

            with urllib.request.urlopen(f"{server.url}/readyz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    os.kill(second, signal.SIGKILL)
    assert server.proc.wait(60) == 1
    log = server.log.read_text()
    assert "giving up, the server exits" in log
    assert "Traceback" not in log


def test_the_http_side_refuses_torch_objects() -> None:
    import torch

    meta, *buffers = encode({"oops": torch.zeros(3)})[1:]
    with pytest.raises(pickle.UnpicklingError, match="torch"):
        loads(meta, buffers, allow=http_allow)


async def test_two_engine_processes_share_the_work_and_survive_one_death(
    make_client: MakeClient,  # noqa: F811
) -> None:
    """engine.processes = 2: jobs go to both, the answers are the thread's bytes; one
    engine killed fails only what it computed, the other serves on (health stays 200)
    and the dead one comes back."""
    thread = await make_client()
    client = await make_client(engine={"mode": "process", "processes": 2, "status_seconds": 0.2})
    pool = app_of(client)[keys.ENGINE]
    assert isinstance(pool, EnginePool)
    pids = pool.pids
    assert len(set(pids)) == 2 and None not in pids
    headers = {"Content-Type": "application/json"}
    bodies = [{"contracts": book(400)[k::4], "measures": ["price", "vega"]} for k in range(4)]

    async def price(c: Any, body: dict[str, Any]) -> bytes:
        r = await c.post("/v1/price", data=orjson.dumps(body), headers=headers)
        assert r.status == 200, await r.text()
        raw: bytes = await r.read()
        return raw

    want = [await price(thread, b) for b in bodies]
    got = await asyncio.gather(*(price(client, b) for _ in range(3) for b in bodies))
    assert list(got) == want * 3
    assert all(n > 0 for n in pool.jobs), pool.jobs
    text = await (await client.get("/metrics")).text()
    assert 'spectralmc_process_resident_bytes{process="engine-1"}' in text
    assert text.count("# TYPE spectralmc_engine_failures_total counter") == 1
    assert 'spectralmc_engine_failures_total{engine="1"}' in text

    second = pids[1]
    assert second is not None
    os.kill(second, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pool.engines[1].alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not pool.engines[1].alive
    assert (await client.get("/healthz")).status == 200  # one engine is enough to serve
    assert await price(client, bodies[0]) == want[0]  # by the survivor
    deadline = time.monotonic() + 60
    while not pool.engines[1].alive and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert pool.engines[1].alive and pool.pids[1] != pids[1]


def test_engine_threads_default_to_the_cores_left_by_the_http_process(tmp_path: Path) -> None:
    from server_util import settings_for

    from spectralmc_server.engine_service.views import ModelDirectory
    from spectralmc_server.service.engine_process import default_torch_threads
    from spectralmc_server.service.metrics import Metrics

    cores = len(os.sched_getaffinity(0))
    assert default_torch_threads(1) == max(1, cores - 1)
    assert default_torch_threads(64) == 1
    engine = ProcessEngine(settings_for(tmp_path, engine={"mode": "process"}), ModelDirectory(), Metrics())
    assert engine.settings.torch_threads == max(1, cores - 1)
    fixed = ProcessEngine(settings_for(tmp_path, torch_threads=3), ModelDirectory(), Metrics())
    assert fixed.settings.torch_threads == 3


async def test_admin_routes_while_the_engine_is_down(make_client: MakeClient) -> None:  # noqa: F811
    """A pin is a store change: it succeeds while the engine is down (a new engine reads
    the store); a commit needs the engine: 503 engine_unavailable, never a 500."""
    client = await make_client(engine={"mode": "process", "status_seconds": 0.2, "max_backoff_seconds": 5.0})
    engine = engine_of(client)
    pid = engine.pid
    assert pid is not None
    auth = {"Authorization": f"Bearer {TOKEN}"}
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while engine.alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not engine.alive
    r = await client.post("/v1/admin/models/gbm/commit", json={}, headers=auth)
    assert r.status == 503 and (await r.json())["error"]["code"] == "engine_unavailable", await r.text()
    r = await client.post("/v1/admin/models/gbm/pin", json={"version": 1}, headers=auth)
    assert r.status == 200, await r.text()
    assert (await r.json())["pinned"] == 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (await client.get("/readyz")).status != 200:
        await asyncio.sleep(0.1)
    models = await (await client.get("/v1/models")).json()
    assert next(m for m in models["models"] if m["name"] == "gbm")["mode"] == "pinned"
