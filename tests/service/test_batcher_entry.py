"""The batcher's one entry (service/batcher/ ``Batcher.price``) and the paths that must
go through it: calibration and stream requotes are refused with 503 ``overloaded`` when
the batcher is full, exactly as REST pricing is; a deadline that has already passed is a
504 with Retry-After and queues nothing."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import orjson
import pytest
from marketdata_util import ASOF, VDT, snapshot
from server_util import CONTRACT, Client, MakeClient, app_of, assert_error

from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service import keys
from spectralmc_server.service.errors import DeadlineExceeded


async def fill_batcher(client: Client, gate: threading.Event) -> list[asyncio.Task[Any]]:
    """Hold the worker on ``gate`` and queue /v1/price requests (one namespace each, so
    none shares a job) until one waits in the batcher: with ``max_pending_requests`` 1
    the batcher is then full. The requests' tasks are returned (they finish once the
    gate opens)."""
    app = app_of(client)
    blocked = app[keys.WORKER].submit(lambda: gate.wait(30))
    batcher = app[keys.BATCHER]
    tasks: list[asyncio.Task[Any]] = []
    try:
        await _queue_one(client, batcher, tasks)
    except BaseException:
        gate.set()
        raise
    tasks.append(asyncio.ensure_future(blocked))
    return tasks


async def _queue_one(client: Client, batcher: Any, tasks: list[asyncio.Task[Any]]) -> None:
    for i in range(16):
        body = {"namespace": f"fill-{i}", "contracts": [CONTRACT]}
        tasks.append(asyncio.create_task(client.post("/v1/price", json=body)))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if batcher.depth[0] >= 1 or any(t.done() for t in tasks):
                break
        if batcher.depth[0] >= 1:
            break
    assert batcher.depth[0] >= 1, "no request stayed queued behind the blocked worker"
    assert not any(t.done() for t in tasks), [t.result().status for t in tasks if t.done()]


async def release(gate: threading.Event, tasks: list[asyncio.Task[Any]]) -> None:
    gate.set()
    for t in tasks:
        r = await t
        if not isinstance(r, bool):  # the worker's blocking job answers True
            assert r.status == 200, await r.text()


FULL = {"queue": {"max_pending_requests": 1}, "stream": {"overload_retry_seconds": 0.0}}


async def test_calibration_is_refused_overloaded_when_the_batcher_is_full(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"], **FULL)
    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot())
    assert r.status == 201, await r.text()
    gate = threading.Event()
    tasks = await fill_batcher(client, gate)
    try:
        body = {"val_datetime": VDT, "underlying": "SPX", "max_iterations": 5}
        r = await client.post("/v1/calibrate", json=body)
        await assert_error(r, 503, "overloaded")
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        await release(gate, tasks)
    # the bound, not the route, refused it: with room again the same body is computed
    r = await client.post("/v1/calibrate", json=body)
    assert r.status == 200, await r.text()


async def test_stream_requote_is_refused_overloaded_when_the_batcher_is_full(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"], **FULL)
    gate = threading.Event()
    tasks = await fill_batcher(client, gate)
    ws = await client.ws_connect("/v1/stream")
    try:
        await ws.send_str(orjson.dumps({"op": "subscribe", "id": "s1", "contracts": [CONTRACT]}).decode())
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while not any(m["type"] == "error" for m in got):
                got.append(orjson.loads((await ws.receive()).data))
        error = next(m for m in got if m["type"] == "error")
        assert error["id"] == "s1" and error["code"] == "overloaded", got
        assert not any(m["type"] == "quote" for m in got), got
    finally:
        await release(gate, tasks)
        await ws.close()


@pytest.mark.parametrize("late", [0.0, 5.0])
async def test_a_passed_deadline_is_504_with_retry_after_and_queues_nothing(
    make_client: MakeClient, late: float
) -> None:
    client = await make_client(models=["gbm"])
    batcher = app_of(client)[keys.BATCHER]
    request = PriceRequest.model_validate({"contracts": [CONTRACT]})
    deadline = asyncio.get_running_loop().time() - late
    with pytest.raises(DeadlineExceeded) as info:
        await batcher.price(request, deadline, lambda: True)
    assert int(info.value.headers["Retry-After"]) >= 1
    assert batcher.depth == (0, 0)
    # and a live deadline prices through the same entry
    answer = await batcher.price(request, asyncio.get_running_loop().time() + 10, lambda: True)
    assert answer["results"][0]["id"] == CONTRACT["id"]
