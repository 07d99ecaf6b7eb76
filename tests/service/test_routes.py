"""Public routes against the HTTP contract (docs/api.md): pricing, its errors, back-pressure,
deadlines, dropped work, engine failure, health, readiness, models, metrics, OpenAPI, docs."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from typing import Any, get_args

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from server_util import CONTRACT, MakeClient, app_of, assert_error, block_worker

from spectralmc_server.engine.served import ModelPricer
from spectralmc_server.pricing.schemas import MAX_CONTRACTS, Measure
from spectralmc_server.service import keys

Client = TestClient[Any, Any]
METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")


# -- helpers -----------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in Prometheus text, or None."""
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m is None or m["name"] != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m["value"])
    return None


async def metrics_text(client: Client) -> str:
    r = await client.get("/metrics")
    assert r.status == 200
    return await r.text()


async def dropped(client: Client, reason: str) -> float:
    value = metric(await metrics_text(client), "spectralmc_requests_dropped_total", reason=reason)
    assert value is not None, f"no spectralmc_requests_dropped_total{{reason={reason!r}}}"
    return value


def contract(i: int, **changes: Any) -> dict[str, Any]:
    """A distinct in-domain GBM contract."""
    return {**CONTRACT, "id": f"k{i}", "strike": 80.0 + (i % 41), "vol": 0.1 + 0.01 * (i % 50), **changes}


async def price(client: Client, body: dict[str, Any], **headers: str) -> ClientResponse:
    return await client.post("/v1/price", json=body, headers=headers)


async def ok_json(r: ClientResponse) -> dict[str, Any]:
    text = await r.text()
    assert r.status == 200, text
    body: dict[str, Any] = orjson.loads(text)
    return body


# -- POST /v1/price ----------------------------------------------------------------------


async def test_price_ok_order_methods_models_and_echo(make_client: MakeClient) -> None:
    client = await make_client()
    body = {
        "namespace": "desk-7",
        "val_datetime": "2026-11-26T16:00:00Z",
        "data_asof": "2026-11-26T16:00:05Z",
        "measures": ["price", "delta", "quantiles"],
        "quantile_levels": [0.05, 0.5, 0.95],
        "contracts": [
            {**CONTRACT, "id": "z-first"},
            {"id": "b-outside", "right": "put", "strike": 95.0, "spot": 100.0, "expiry_years": 0.5, "vol": 3.0},
            {"id": "a-long", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 5.0, "vol": 0.2},
            {**CONTRACT, "id": "m-last", "right": "put"},
        ],
    }
    r = await price(client, body)
    assert r.content_type == "application/json"
    out = await ok_json(r)
    assert [row["id"] for row in out["results"]] == ["z-first", "b-outside", "a-long", "m-last"]
    methods = {row["id"]: (row["model"], row["method"]) for row in out["results"]}
    assert methods == {
        "z-first": ("gbm", "cvnn"),
        "b-outside": ("gbm", "reference"),  # vol 3.0 lies outside the model's domain
        "a-long": ("gbm", "reference"),  # so does expiry 5.0
        "m-last": ("gbm", "cvnn"),
    }
    for row in out["results"]:
        assert isinstance(row["price"], float) and row["price"] > 0
        assert isinstance(row["delta"], float)
        assert set(row["quantiles"]) == {"0.05", "0.5", "0.95"}
    assert out["results"][0]["delta"] > 0 > out["results"][3]["delta"]  # call vs put

    models = await ok_json(await client.get("/v1/models"))
    served = {m["name"]: m for m in models["models"]}
    head = await app_of(client)[keys.STORES]["gbm"].head()
    assert head is not None and head.version == 1
    assert out["models"] == {"gbm": {"version": 1, "content_hash": served["gbm"]["content_hash"]}}
    assert out["models"]["gbm"]["content_hash"] == head.content_hash
    assert out["namespace"] == "desk-7"
    assert datetime.fromisoformat(out["val_datetime"]) == datetime.fromisoformat("2026-11-26T16:00:00+00:00")
    assert datetime.fromisoformat(out["data_asof"]) == datetime.fromisoformat("2026-11-26T16:00:05+00:00")
    assert out["market_data"] is None


async def test_price_defaults(make_client: MakeClient) -> None:
    client = await make_client()
    out = await ok_json(await price(client, {"contracts": [CONTRACT]}))
    assert out["namespace"] == "default"
    assert out["val_datetime"] is None and out["data_asof"] is None
    (row,) = out["results"]
    assert set(row) == {"id", "model", "method", "price", "error_bound"}  # measures default to ["price"]
    # a learned price's bound: positive, and within its tolerance (25 bp of a spot of 100)
    assert set(row["error_bound"]) == {"price"} and 0 < row["error_bound"]["price"] < 0.25
    assert row["id"] == CONTRACT["id"] and row["method"] == "cvnn"


async def test_same_request_same_bytes(make_client: MakeClient) -> None:
    client = await make_client()
    measures = ["price", "delta", "gamma", "vega", "theta", "rho", "stdev", "quantiles"]
    body = {"measures": measures, "contracts": [contract(i) for i in range(20)]}
    first = await price(client, body)
    second = await price(client, body)
    assert first.status == second.status == 200
    assert await first.read() == await second.read()


@pytest.mark.parametrize("measure", get_args(Measure))
async def test_each_measure_alone(make_client: MakeClient, measure: str) -> None:
    """Any one measure may be asked for on its own (a valid request is never a 500)."""
    client = await make_client()
    r = await price(client, {"measures": [measure], "contracts": [CONTRACT, {**CONTRACT, "id": "out", "vol": 3.0}]})
    out = await ok_json(r)
    for row in out["results"]:
        assert set(row) == {"id", "model", "method", measure, "error_bound"}, row
        assert set(row["error_bound"]) == {measure}
    # In the domain the network answers (its certified bound at this point is within every
    # measure's tolerance); outside it, the reference. Survival alone, without a barrier,
    # is 1 exactly (analytic).
    expected = ["analytic", "analytic"] if measure == "survival" else ["cvnn", "reference"]
    assert [row["method"] for row in out["results"]] == expected
    if measure == "survival":
        assert [row["survival"] for row in out["results"]] == [1.0, 1.0]
        assert [row["error_bound"]["survival"] for row in out["results"]] == [0.0, 0.0]
    await ok_json(await client.get("/healthz"))


async def test_batch_invariance(make_client: MakeClient) -> None:
    """A contract priced alone and inside a 500-contract request gives the same numbers."""
    client = await make_client()
    measures = ["price", "delta", "gamma", "vega", "theta", "rho", "mean", "stdev", "quantiles"]
    alone = await ok_json(await price(client, {"measures": measures, "contracts": [CONTRACT]}))
    book = [contract(i) for i in range(500)]
    book[317] = {**CONTRACT, "id": "inside"}
    big = await ok_json(await price(client, {"measures": measures, "contracts": book}))
    assert len(big["results"]) == 500
    assert [row["id"] for row in big["results"]] == [c["id"] for c in book]
    inside = big["results"][317]
    assert {**inside, "id": CONTRACT["id"]} == alone["results"][0]
    assert big["models"] == alone["models"]


async def test_malformed_json_400(make_client: MakeClient) -> None:
    client = await make_client()
    r = await client.post("/v1/price", data=b'{"contracts": [', headers={"Content-Type": "application/json"})
    await assert_error(r, 400, "malformed")
    r = await client.post("/v1/price", data=b"not json at all", headers={"Content-Type": "application/json"})
    await assert_error(r, 400, "malformed")


async def test_empty_body_400(make_client: MakeClient) -> None:
    client = await make_client()
    json_type = {"Content-Type": "application/json"}
    await assert_error(await client.post("/v1/price", headers=json_type), 400, "malformed")
    await assert_error(await client.post("/v1/price", data=b"", headers=json_type), 400, "malformed")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"contracts": [{**CONTRACT, "strike": -1}]}, "contracts[0].strike"),
        ({"contracts": [CONTRACT, {**CONTRACT, "id": "c2", "vol": 0}]}, "contracts[1].vol"),
        ({"contracts": [{**CONTRACT, "spot": "abc"}]}, "contracts[0].spot"),
        ({"contracts": [{**CONTRACT, "colour": "red"}]}, "contracts[0].colour"),
        ({"contracts": [{**CONTRACT, "right": "straddle"}]}, "contracts[0].right"),
        ({"contracts": [{**CONTRACT, "process": "levy"}]}, "contracts[0].process"),
        ({"measures": ["price", "charm"], "contracts": [CONTRACT]}, "measures[1]"),
        ({"contracts": [CONTRACT], "extra": 1}, "extra"),
        ({"contracts": []}, "contracts"),
        ({"measures": ["price"]}, "contracts"),
        ({"contracts": [CONTRACT], "namespace": "no spaces"}, "namespace"),
        ({"contracts": [CONTRACT], "val_datetime": "yesterday"}, "val_datetime"),
        ({"measures": ["quantiles"], "quantile_levels": [0.5, 1.5], "contracts": [CONTRACT]}, "quantile_levels[1]"),
    ],
)
async def test_invalid_field_422(make_client: MakeClient, body: dict[str, Any], field: str) -> None:
    client = await make_client()
    await assert_error(await price(client, body), 422, "invalid", (field,))


async def test_body_not_an_object_422(make_client: MakeClient) -> None:
    client = await make_client()
    err = await assert_error(await client.post("/v1/price", json=[1, 2]), 422, "invalid")
    assert err["details"] and all(d.get("field") for d in err["details"])


async def test_body_over_limit_413(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=2048)
    small = {"contracts": [contract(i) for i in range(3)]}
    assert len(orjson.dumps(small)) < 2048
    await ok_json(await price(client, small))
    big = {"contracts": [contract(i) for i in range(60)]}
    assert len(orjson.dumps(big)) > 2048
    await assert_error(await price(client, big), 413, "too_large")


async def test_too_many_contracts_413(make_client: MakeClient) -> None:
    client = await make_client()
    tiny = {"right": "call", "strike": 1, "spot": 1, "expiry_years": 1, "vol": 0.2}
    body = {"contracts": [{"id": str(i), **tiny} for i in range(MAX_CONTRACTS + 1)]}
    await assert_error(await price(client, body), 413, "too_large", ("contracts",))


async def test_contract_by_underlying_422(make_client: MakeClient) -> None:
    client = await make_client()
    by_reference = {"id": "c3", "right": "call", "strike": 4100.0, "underlying": "SPX", "expiry": "2027-06-18"}
    body: dict[str, Any] = {"contracts": [CONTRACT, by_reference]}
    await assert_error(await price(client, body), 422, "invalid", ("val_datetime",))
    body["val_datetime"] = "2026-11-26T16:00:00Z"  # no snapshot stored for it
    await assert_error(await price(client, body), 422, "no_market_data", ("val_datetime",))


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "1e9", ""])
async def test_bad_timeout_header_422(make_client: MakeClient, value: str) -> None:
    client = await make_client()
    r = await price(client, {"contracts": [CONTRACT]}, **{"X-Request-Timeout": value})
    await assert_error(r, 422, "invalid", ("header:X-Request-Timeout",))


async def test_good_timeout_header(make_client: MakeClient) -> None:
    client = await make_client()
    await ok_json(await price(client, {"contracts": [CONTRACT]}, **{"X-Request-Timeout": "5"}))


async def test_unknown_route_404(make_client: MakeClient) -> None:
    client = await make_client()
    await assert_error(await client.get("/v1/nothing-here"), 404, "not_found")
    await assert_error(await client.post("/v2/price", json={"contracts": [CONTRACT]}), 404, "not_found")


async def test_wrong_method_405(make_client: MakeClient) -> None:
    client = await make_client()
    r = await client.get("/v1/price")
    await assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers.get("Allow", "")
    r = await client.delete("/v1/models")
    await assert_error(r, 405, "method_not_allowed")
    assert "GET" in r.headers.get("Allow", "")


# -- back-pressure, deadlines, dropped work, engine failure --------------------------------


async def test_overload_503_then_recovers(make_client: MakeClient) -> None:
    client = await make_client(queue={"max_pending_requests": 4, "max_wait_seconds": 0.05})
    before = await dropped(client, "overloaded")
    body = {"contracts": [CONTRACT]}
    responses = await asyncio.gather(*(price(client, body) for _ in range(64)))
    statuses = [r.status for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses, statuses
    for r in responses:
        if r.status == 503:
            await assert_error(r, 503, "overloaded")
            assert int(r.headers["Retry-After"]) >= 1
        else:
            await ok_json(r)
    await ok_json(await price(client, body))  # recovered
    after = await dropped(client, "overloaded")
    assert after - before == statuses.count(503)


async def test_deadline_504(make_client: MakeClient) -> None:
    client = await make_client()
    blocker = block_worker(client, 1.0)
    t0 = time.perf_counter()
    r = await price(client, {"contracts": [CONTRACT]}, **{"X-Request-Timeout": "0.2"})
    await assert_error(r, 504, "deadline_exceeded")
    assert time.perf_counter() - t0 < 0.9  # answered at the deadline, not when the worker freed up
    assert int(r.headers["Retry-After"]) >= 1  # when to come back: the queue's estimated wait
    await blocker
    await ok_json(await price(client, {"contracts": [CONTRACT]}))


async def test_disconnected_client_work_is_dropped(make_client: MakeClient) -> None:
    client = await make_client()
    assert await dropped(client, "disconnected") == 0
    blocker = block_worker(client, 1.0)
    payload = orjson.dumps({"contracts": [CONTRACT]})
    _reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST /v1/price HTTP/1.1\r\n"
        + f"Host: {client.server.host}:{client.server.port}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the server has read it and queued the work behind the blocker
    assert not blocker.done()
    writer.close()
    await writer.wait_closed()
    await blocker
    value = 0.0
    for _ in range(30):
        value = await dropped(client, "disconnected")
        if value >= 1:
            break
        await asyncio.sleep(0.1)
    assert value >= 1, "the request of a client that went away was not dropped as disconnected"
    await ok_json(await price(client, {"contracts": [CONTRACT]}))


async def test_disconnected_while_queued_counts_as_disconnected(make_client: MakeClient) -> None:
    """Work still in the queue (both compute slots busy) when its client leaves is dropped
    and counted under reason="disconnected"."""
    client = await make_client()
    queue = app_of(client)[keys.BATCHER]
    blocker = block_worker(client, 1.0)
    fillers = []
    for _ in range(2):  # two batches in flight: the next request stays queued
        fillers.append(asyncio.create_task(price(client, {"contracts": [CONTRACT]})))
        await asyncio.sleep(0.05)
    payload = orjson.dumps({"contracts": [{**CONTRACT, "id": "leaver"}]})
    _reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST /v1/price HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    for _ in range(50):
        if queue.depth == (1, 1):
            break
        await asyncio.sleep(0.01)
    assert queue.depth == (1, 1), queue.depth
    writer.close()
    await writer.wait_closed()
    await blocker
    for task in fillers:
        await ok_json(await task)
    counts = {"disconnected": 0.0, "deadline": 0.0}
    for _ in range(30):
        counts = {k: await dropped(client, k) for k in counts}
        if sum(counts.values()) >= 1:
            break
        await asyncio.sleep(0.1)
    assert counts == {"disconnected": 1, "deadline": 0}, counts


async def test_engine_failure_500_then_unhealthy(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await make_client()
    served = app_of(client)[keys.HOST].trackers["gbm"].current
    assert served is not None
    pricer = served.model.pricer
    assert isinstance(pricer, ModelPricer)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated engine fault")

    monkeypatch.setattr(pricer, "evaluate", boom)
    r = await price(client, {"contracts": [CONTRACT]})
    err = await assert_error(r, 500, "engine_failure")
    assert "Traceback" not in err["message"]
    await assert_error(await client.get("/healthz"), 503, "unhealthy")
    r = await client.get("/readyz")
    await assert_error(r, 503, "not_ready")
    assert "Retry-After" in r.headers
    # the dead engine takes no more work: a request is answered at once, never hangs
    t0 = time.monotonic()
    r = await price(client, {"contracts": [CONTRACT]})
    await assert_error(r, 503, "engine_unavailable")
    assert "Retry-After" in r.headers and time.monotonic() - t0 < 1.0


# -- health, readiness, models, metrics, description -------------------------------------


async def test_healthz_and_readyz(make_client: MakeClient) -> None:
    client = await make_client()
    assert await ok_json(await client.get("/healthz")) == {"status": "ok"}
    ready = await ok_json(await client.get("/readyz"))
    assert ready["status"] == "ready"
    assert ready["role"] == "all"
    # the bundled models, seeded
    assert ready["models"] == {"gbm": 1, "heston": 1, "merton": 1, "asian": 1, "rbergomi": 1}
    assert ready["training"] is None  # training is off in these tests
    assert ready["degraded"] == []


async def test_readyz_degraded_while_store_polls_fail(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls of the version store fail (faked here; tests/deploy/test_cluster.py stops a
    real S3 server): the replica stays ready and answers from its version, /readyz says
    degraded with the reason, /metrics counts the streak, and all clears on a good poll."""
    client = await make_client()
    tracker = app_of(client)[keys.HOST].trackers["gbm"]
    real_pinned = tracker.store.pin_entry

    async def unreachable() -> Any:
        raise OSError("simulated: connection refused")

    monkeypatch.setattr(tracker.store, "pin_entry", unreachable)  # the tracker's first read of a poll
    for _ in range(200):
        if tracker.consecutive_failures >= 1:
            break
        await asyncio.sleep(0.01)
    ready = await ok_json(await client.get("/readyz"))
    assert ready["status"] == "degraded"
    assert len(ready["degraded"]) == 1 and ready["degraded"][0].startswith("gbm: serving version 1;")
    assert "connection refused" in ready["degraded"][0]
    r = await price(client, {"contracts": [CONTRACT]})
    assert r.status == 200
    text = await (await client.get("/metrics")).text()
    streak = [
        ln for ln in text.splitlines() if ln.startswith('spectralmc_store_consecutive_poll_failures{model="gbm"}')
    ]
    assert streak and float(streak[0].split()[-1]) >= 1
    monkeypatch.setattr(tracker.store, "pin_entry", real_pinned)
    await tracker.poll_once()
    ready = await ok_json(await client.get("/readyz"))
    assert ready["status"] == "ready" and ready["degraded"] == []


async def test_models(make_client: MakeClient) -> None:
    client = await make_client()
    out = await ok_json(await client.get("/v1/models"))
    assert [x["name"] for x in out["models"]] == ["gbm", "heston", "merton", "asian", "rbergomi"]
    m = out["models"][0]
    assert m["name"] == "gbm"
    assert m["version"] == 1
    assert m["mode"] == "tracking"
    head = await app_of(client)[keys.STORES]["gbm"].head()
    assert head is not None
    assert m["content_hash"] == head.content_hash and m["content_hash"].startswith("sha256:")
    names = {r["name"] for r in m["domain"]["ranges"]}
    assert names == {"vol", "expiry_years"}
    for r in m["domain"]["ranges"]:
        assert r["low"] < r["high"]


async def test_validation_route_when_the_store_fails(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /v1/models/{name}/validation (tests/service/test_ui.py checks its figures): a
    manifest that cannot be had leaves the versions and says why; a store that cannot
    list the versions is a 503 store_unavailable."""
    client = await make_client(models=["gbm"])
    store = app_of(client)[keys.STORES]["gbm"]

    async def collected(version: int) -> None:
        return None

    monkeypatch.setattr(store, "manifest", collected)
    out = await ok_json(await client.get("/v1/models/gbm/validation"))
    assert out["history"] == [] and out["reason"] == "version 1's content was collected (store gc)", out
    assert [v["version"] for v in out["versions"]] == [1] and out["versions"][0]["served"] is True

    async def down() -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(store, "versions", down)
    r = await client.get("/v1/models/gbm/validation")
    err = await assert_error(r, 503, "store_unavailable")
    assert err["message"] == "model store unavailable: OSError: disk gone" and r.headers["Retry-After"] == "5"
    await assert_error(await client.get("/v1/models/heston/validation"), 404, "not_found")


CONTRACT_ROUTES = {
    ("post", "/v1/price"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{name}/validation"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/docs"),
    ("get", "/"),
    ("get", "/ui"),
    ("post", "/v1/admin/models/{name}/commit"),
    ("get", "/v1/admin/models/{name}/versions"),
    ("post", "/v1/admin/models/{name}/pin"),
    ("post", "/v1/admin/models/{name}/unpin"),
    ("get", "/v1/admin/models/{name}/pins"),
    ("get", "/v1/admin/models/{name}/verify"),
    ("post", "/v1/admin/models/{name}/gc"),
    ("put", "/v1/marketdata/{namespace}/{val_datetime}/{data_asof}"),
    ("get", "/v1/marketdata/{namespace}/{val_datetime}"),
    ("get", "/v1/stream"),
}


async def test_openapi_describes_every_route(make_client: MakeClient) -> None:
    client = await make_client()
    r = await client.get("/v1/openapi.json")
    assert r.status == 200 and r.content_type == "application/json"
    spec = orjson.loads(await r.read())
    assert str(spec["openapi"]).startswith("3.")
    assert spec["info"]["title"] and spec["info"]["version"]
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app_of(client).router.routes()
        if route.resource is not None and route.method not in ("HEAD", "*")
    }
    existing = {rt for rt in CONTRACT_ROUTES if rt in served}
    assert existing == CONTRACT_ROUTES
    for method, path in existing:
        assert path in spec["paths"], path
        assert method in spec["paths"][path], (method, path)
        assert spec["paths"][path][method]["responses"], (method, path)
    price_op = spec["paths"]["/v1/price"]["post"]
    assert {"200", "400", "413", "422", "503", "504"} <= set(price_op["responses"])
    for path, ops in spec["paths"].items():
        if path.startswith("/v1/admin/"):
            for op in ops.values():
                assert {"401", "403", "404"} <= set(op["responses"]), path


async def test_docs_page(make_client: MakeClient) -> None:
    client = await make_client()
    r = await client.get("/docs")
    assert r.status == 200
    assert r.content_type == "text/html"
    text = await r.text()
    assert "<html" in text.lower() and "/v1/price" in text


async def test_metrics(make_client: MakeClient) -> None:
    client = await make_client()
    await ok_json(await price(client, {"contracts": [CONTRACT, {**CONTRACT, "id": "c2", "vol": 3.0}]}))
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.content_type == "text/plain"
    text = await r.text()
    for name in (
        "spectralmc_http_requests_total",
        "spectralmc_queue_depth",
        "spectralmc_batch_contracts",
        "spectralmc_contracts_priced_total",
        "spectralmc_model_info",
        "spectralmc_budget_used_bytes",
        "spectralmc_budget_cap_bytes",
        "spectralmc_budget_live_bytes",
    ):
        assert re.search(rf"^{name}[{{ _]", text, re.MULTILINE), name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert line.startswith("spectralmc_"), line
    assert metric(text, "spectralmc_http_requests_total", route="/v1/price", method="POST", status="200") == 1
    assert metric(text, "spectralmc_contracts_priced_total", model="gbm", method="cvnn") == 1
    assert metric(text, "spectralmc_contracts_priced_total", model="gbm", method="reference") == 1
    assert metric(text, "spectralmc_queue_depth") == 0
    assert metric(text, "spectralmc_batch_contracts_count") == 1
    assert metric(text, "spectralmc_model_info", model="gbm", version="1", mode="tracking") == 1
    # Memory per component: measured live bytes within the reservation within the cap.
    for component in ("model_cache", "normals", "simulator", "training", "inference"):
        live = metric(text, "spectralmc_budget_live_bytes", component=component)
        used = metric(text, "spectralmc_budget_used_bytes", component=component)
        cap = metric(text, "spectralmc_budget_cap_bytes", component=component)
        assert live is not None and used is not None and cap is not None
        assert 0 <= live <= used <= cap, component
    assert (metric(text, "spectralmc_budget_live_bytes", component="model_cache") or 0) > 0  # a model is loaded


# -- roles -------------------------------------------------------------------------------


async def test_request_metrics_name_only_standard_methods(make_client: MakeClient) -> None:
    """A method outside the standard ones (the HTTP parser passes WebDAV's and others)
    is counted as "other": a client cannot add series to /metrics (nor entries to the
    label cache) by its choice of method."""
    client = await make_client()
    for method in ("PURGE", "PROPFIND", "MKCOL"):
        r = await client.request(method, "/v1/price")
        assert r.status == 405
        r = await client.request(method, "/nowhere")
        assert r.status == 404
    r = await client.request("DELETE", "/v1/price")
    assert r.status == 405
    text = await (await client.get("/metrics")).text()
    # a method no route of the path takes is "unmatched" too (405)
    assert metric(text, "spectralmc_http_requests_total", route="unmatched", method="other", status="405") == 3
    assert metric(text, "spectralmc_http_requests_total", route="unmatched", method="other", status="404") == 3
    assert metric(text, "spectralmc_http_requests_total", route="unmatched", method="DELETE", status="405") == 1
    assert not re.search("PURGE|PROPFIND|MKCOL", text)
    counts = app_of(client)[keys.METRICS]._request_counts
    assert {m for _, m, _ in counts} <= {"GET", "POST", "DELETE", "other"}


async def test_train_role_does_not_price(make_client: MakeClient) -> None:
    client = await make_client(role="train", train={"enabled": True})
    r = await price(client, {"contracts": [CONTRACT]})
    await assert_error(r, 503, "not_serving")
    assert "Retry-After" in r.headers
