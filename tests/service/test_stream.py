"""WebSocket ``/v1/stream`` against docs/api.md: subscribe/unsubscribe, quotes pushed on
subscribe, new snapshots, model changes, intervals and job topics; bad messages answered
with errors on a connection that stays open; the upgrade's 400/503; 200 live subscribers
served promptly beside a client that never reads (whose queue stays bounded), eviction
of a stalled client, and GOING_AWAY on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from certificate_util import fake_certificate
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import CONTRACT, TOKEN, MakeClient, ServerProcess, app_of, assert_error

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.service import keys
from spectralmc_server.service.stream import Connection

Client = TestClient[Any, Any]
WS = aiohttp.ClientWebSocketResponse
Serve = Callable[..., ServerProcess]
Message = dict[str, Any]

AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 30.0  # the longest any single expected message may take on a slow, shared machine
ALL_MEASURES = [
    "price", "delta", "gamma", "vega", "theta", "rho", "digital", "mean", "stdev", "skew", "kurtosis", "quantiles",
]  # fmt: skip
QUANTILE_LEVELS = [(k + 1) / 65 for k in range(64)]  # the most a request may ask for
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- helpers ------------------------------------------------------------------------------


def asof(i: int) -> str:
    """The i-th data_asof of the day's snapshots (i = 0 is marketdata_util.ASOF)."""
    base = datetime.fromisoformat(ASOF.replace("Z", "+00:00"))
    return (base + timedelta(seconds=i)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def put_snapshot(client: Client, i: int = 0, namespace: str = "default", **body: Any) -> Message:
    """PUT snapshot i (data_asof = asof(i)); its description (key and hash)."""
    r = await client.put(f"/v1/marketdata/{namespace}/{VDT}/{asof(i)}", json=snapshot(**body))
    text = await r.text()
    assert r.status == 201, text
    described: Message = orjson.loads(text)
    return described


async def send(ws: WS, body: Any) -> None:
    await ws.send_str(orjson.dumps(body).decode())


async def recv(ws: WS, timeout: float = WAIT) -> Message:
    """The next message, which must be a JSON text frame."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type == WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
    body: Message = orjson.loads(msg.data)
    return body


async def recv_until(ws: WS, match: Callable[[Message], bool], timeout: float = WAIT) -> tuple[Message, list[Message]]:
    """Read until a message matches; it, and what came before it."""
    before: list[Message] = []
    async with asyncio.timeout(timeout):
        while True:
            m = await recv(ws, timeout)
            if match(m):
                return m, before
            before.append(m)


async def expect_silence(ws: WS, seconds: float) -> list[Message]:
    """Whatever arrives within ``seconds`` (the caller asserts it is nothing, or what it is)."""
    got: list[Message] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except TimeoutError:
            break
        got.append(orjson.loads(msg.data) if msg.type == WSMsgType.TEXT else {"frame": str(msg.type)})
    return got


async def subscribe(ws: WS, body: Message) -> Message:
    """Subscribe; the ``subscribed`` message, then the first quote, which is returned."""
    await send(ws, {"op": "subscribe", **body})
    ack = await recv(ws)
    assert ack["type"] == "subscribed" and ack["id"] == body["id"], ack
    quote = await recv(ws)
    assert quote["type"] == "quote" and quote["id"] == body["id"], quote
    return quote


async def expect_error(ws: WS, code: str, sub_id: str | None = None, label: str = "") -> Message:
    m = await recv(ws)
    assert m["type"] == "error", (label, m)
    assert m["code"] == code, (label, m)
    assert m["id"] == sub_id, (label, m)
    assert isinstance(m["message"], str) and m["message"], (label, m)
    assert isinstance(m["details"], list), (label, m)
    return m


def sample(text: str, name: str) -> float:
    """One exposition sample by name with labels; 0 when absent (an unused label)."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


async def metric(client: Client, name: str) -> float:
    r = await client.get("/metrics")
    assert r.status == 200
    return sample(await r.text(), name)


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until it holds; the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def price_of(quote: Message, cid: str) -> float:
    (row,) = (r for r in quote["results"] if r["id"] == cid)
    value: float = row["price"]
    return value


def connection_with(client: Client, sub_id: str) -> Connection | None:
    hub = app_of(client)[keys.STREAMS]
    return next((c for c in hub.connections if sub_id in c.subs), None)


# -- a client that never reads --------------------------------------------------------------


def masked_text_frame(payload: bytes) -> bytes:
    """One final text frame as a client must send it (RFC 6455: masked)."""
    head = bytearray([0x81])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 1 << 16:
        head.append(0x80 | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(0x80 | 127)
        head += n.to_bytes(8, "big")
    mask = os.urandom(4)
    head += mask
    return bytes(head) + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def stalled_client(host: str, port: int, messages: list[Message]) -> socket.socket:
    """A raw TCP WebSocket client with a tiny receive buffer: it shakes hands, sends
    ``messages`` and then never reads again (the caller closes the socket)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /v1/stream HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    response = b""
    async with asyncio.timeout(WAIT):
        while b"\r\n\r\n" not in response:
            chunk = await loop.sock_recv(sock, 1)  # byte by byte: nothing past the handshake is read
            assert chunk, f"closed during the handshake: {response!r}"
            response += chunk
    head = response.decode("latin-1")
    assert head.startswith("HTTP/1.1 101"), head
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])}
    assert fields.get("sec-websocket-accept") == accept, head
    for m in messages:
        await loop.sock_sendall(sock, masked_text_frame(orjson.dumps(m)))
    return sock


def big_subscription(sub_id: str, n: int) -> Message:
    """A subscription by reference whose every quote is large (all measures, 64 quantiles)."""
    return {
        "op": "subscribe",
        "id": sub_id,
        "measures": ALL_MEASURES,
        "quantile_levels": QUANTILE_LEVELS,
        "contracts": [by_reference(f"{sub_id}-{i}", strike=60.0 + i * 0.25) for i in range(n)],
    }


# -- subscribe and the quotes it gets -----------------------------------------------------------


async def test_subscribe_quotes_results_models_and_market_data(make_client: MakeClient) -> None:
    client = await make_client()
    stored = await put_snapshot(client)
    ws = await client.ws_connect("/v1/stream")
    await send(ws, {"op": "subscribe", "id": "s1", "contracts": [by_reference("r1"), CONTRACT]})
    ack = await recv(ws)
    assert ack == {"type": "subscribed", "id": "s1", "contracts": 2, "topic": None}
    q = await recv(ws)
    assert q["type"] == "quote" and q["id"] == "s1", q
    assert q["seq"] == 1 and q["reason"] == "subscribe", q
    assert [r["id"] for r in q["results"]] == ["r1", "c1"], q
    assert all(isinstance(r["price"], float) and r["price"] > 0 for r in q["results"]), q
    assert set(q["models"]) == {"gbm"} and q["models"]["gbm"]["version"] == 1, q
    assert q["models"]["gbm"]["content_hash"].startswith("sha256:"), q
    md = q["market_data"]
    assert md is not None, q
    assert md["hash"] == stored["hash"], (md, stored)
    assert (md["namespace"], md["val_datetime"], md["data_asof"]) == ("default", VDT, ASOF), md

    # explicit contracts only: no market data behind the quote
    q2 = await subscribe(ws, {"id": "s2", "contracts": [CONTRACT], "measures": ["price", "delta"]})
    assert q2["seq"] == 1 and q2["reason"] == "subscribe", q2
    assert q2["market_data"] is None, q2
    assert set(q2["results"][0]) >= {"id", "price", "delta"}, q2
    # the explicit contract prices the same in both subscriptions
    assert price_of(q2, "c1") == price_of(q, "c1")
    await ws.close()


async def test_new_snapshot_requotes_every_subscription(make_client: MakeClient) -> None:
    client = await make_client()
    first = await put_snapshot(client, 0, spot=100.0)
    ws1 = await client.ws_connect("/v1/stream")
    ws2 = await client.ws_connect("/v1/stream")
    q1 = await subscribe(ws1, {"id": "a", "contracts": [by_reference("r1")]})
    q2 = await subscribe(ws2, {"id": "b", "contracts": [by_reference("r1"), CONTRACT], "measures": ["price", "delta"]})
    q3 = await subscribe(ws2, {"id": "x", "contracts": [CONTRACT]})  # explicit only: not requoted
    assert q1["market_data"]["hash"] == q2["market_data"]["hash"] == first["hash"]

    second = await put_snapshot(client, 7, spot=110.0)
    assert second["hash"] != first["hash"]
    for ws, old in ((ws1, q1), (ws2, q2)):
        new = await recv(ws)
        assert new["type"] == "quote" and new["id"] == old["id"], new
        assert new["reason"] == "snapshot", new
        assert new["seq"] == old["seq"] + 1, new
        assert new["market_data"]["hash"] == second["hash"], new
        assert new["market_data"]["data_asof"] == asof(7) == new["data_asof"], new
        assert price_of(new, "r1") > price_of(old, "r1"), (new, old)  # a call, and spot went up
    # the explicit-only subscription is not requoted by market data
    assert await expect_silence(ws2, 0.5) == []
    assert q3["market_data"] is None
    await ws1.close()
    await ws2.close()


async def test_model_change_pushes_a_quote_naming_the_new_version(make_client: MakeClient) -> None:
    client = await make_client(poll_seconds=60.0)  # only the admin route makes the tracker swap
    app = app_of(client)
    store = app[keys.STORES]["gbm"]
    base = await store.load(1, need_training=True)
    model = {k: v * 1.01 if v.is_floating_point() else v for k, v in base.model.items()}
    manifest = {**base.manifest, "metrics": {**base.manifest["metrics"], "variant": "stream"}}
    variant = Checkpoint(manifest, model, base.training)
    # certified (a made-up certificate for its own content): only certified versions are served
    variant = replace(variant, certificate=fake_certificate(variant, seed=2))
    v2 = await store.commit(variant, "a variant for the stream test")
    assert v2.version == 2

    ws = await client.ws_connect("/v1/stream")
    q1 = await subscribe(ws, {"id": "m", "contracts": [CONTRACT]})
    assert q1["models"]["gbm"]["version"] == 1, q1
    assert await expect_silence(ws, 0.3) == []  # a commit alone does not change what is served

    r = await client.post("/v1/admin/models/gbm/pin", json={"version": 2}, headers=AUTH)
    assert r.status == 200, await r.text()
    q2 = await recv(ws)
    assert q2["type"] == "quote" and q2["reason"] == "model", q2
    assert q2["seq"] == 2, q2
    assert q2["models"]["gbm"] == {"version": 2, "content_hash": v2.content_hash}, q2
    assert price_of(q2, "c1") != price_of(q1, "c1")

    r = await client.post("/v1/admin/models/gbm/pin", json={"version": 1}, headers=AUTH)  # rollback
    assert r.status == 200, await r.text()
    q3 = await recv(ws)
    assert q3["reason"] == "model" and q3["seq"] == 3, q3
    assert q3["models"]["gbm"] == q1["models"]["gbm"], q3
    assert price_of(q3, "c1") == price_of(q1, "c1")
    await ws.close()


async def test_interval_quotes_and_unsubscribe(make_client: MakeClient) -> None:
    client = await make_client()
    ws = await client.ws_connect("/v1/stream")
    q = await subscribe(ws, {"id": "tick", "contracts": [CONTRACT], "interval_seconds": 0.2})
    assert q["seq"] == 1 and q["reason"] == "subscribe", q
    quotes = [q]
    async with asyncio.timeout(WAIT):
        while len(quotes) < 5:
            quotes.append(await recv(ws))
    assert all(m["type"] == "quote" and m["id"] == "tick" for m in quotes), quotes
    assert [m["reason"] for m in quotes[1:]] == ["interval"] * 4, quotes
    seqs = [m["seq"] for m in quotes]
    assert all(b > a for a, b in itertools.pairwise(seqs)), seqs

    await send(ws, {"op": "unsubscribe", "id": "tick"})
    ack, before = await recv_until(ws, lambda m: m["type"] != "quote")
    assert ack == {"type": "unsubscribed", "id": "tick"}, ack
    assert len(before) <= 1, before  # at most a quote already on its way
    after = await expect_silence(ws, 1.0)
    assert after == [], f"pushes after unsubscribed: {after}"
    assert connection_with(client, "tick") is None

    # unknown (and repeated) unsubscribe -> not_found; the connection stays usable
    await send(ws, {"op": "unsubscribe", "id": "tick"})
    await expect_error(ws, "not_found", "tick")
    await send(ws, {"op": "unsubscribe", "id": "never"})
    await expect_error(ws, "not_found", "never")
    q = await subscribe(ws, {"id": "tick", "contracts": [CONTRACT]})  # the id is free again
    assert q["seq"] == 1, q
    await ws.close()


async def test_interval_below_minimum_is_an_error(make_client: MakeClient) -> None:
    client = await make_client(stream={"min_interval_seconds": 0.5})
    ws = await client.ws_connect("/v1/stream")
    await send(ws, {"op": "subscribe", "id": "fast", "contracts": [CONTRACT], "interval_seconds": 0.3})
    err = await expect_error(ws, "invalid", "fast")
    assert [d["field"] for d in err["details"]] == ["interval_seconds"], err
    assert connection_with(client, "fast") is None
    # not subscribed: the same id at the minimum works and ticks
    q = await subscribe(ws, {"id": "fast", "contracts": [CONTRACT], "interval_seconds": 0.5})
    assert q["seq"] == 1
    tick = await recv(ws, timeout=10)
    assert tick["reason"] == "interval" and tick["seq"] == 2, tick
    await ws.close()


# -- bad messages -------------------------------------------------------------------------------

BAD_CONTRACT = {**CONTRACT, "strike": -1.0}
BAD_MESSAGES: list[tuple[str, Any, str, str | None, str | None]] = [
    # (label, message (str: sent as is), error code, error id, a field the details name)
    ("invalid JSON", '{"op": "subscribe", ', "malformed", None, None),
    ("not an object", "[1, 2]", "invalid", None, None),
    ("unknown op", {"op": "frobnicate", "id": "u1"}, "invalid", "u1", None),
    ("no op", {"id": "u2", "contracts": [CONTRACT]}, "invalid", "u2", None),
    ("no contracts or topic", {"op": "subscribe", "id": "u3"}, "invalid", "u3", None),
    ("both", {"op": "subscribe", "id": "u4", "contracts": [CONTRACT], "topic": "t"}, "invalid", "u4", None),
    ("empty contracts", {"op": "subscribe", "id": "u5", "contracts": []}, "invalid", "u5", "contracts"),
    (
        "bad strike",
        {"op": "subscribe", "id": "u6", "contracts": [BAD_CONTRACT]},
        "invalid",
        "u6",
        "contracts[0].strike",
    ),
    (
        "bad second contract",
        {"op": "subscribe", "id": "u7", "contracts": [CONTRACT, {**CONTRACT, "vol": "high"}]},
        "invalid",
        "u7",
        "contracts[1].vol",
    ),
    (
        "unknown measure",
        {"op": "subscribe", "id": "u8", "contracts": [CONTRACT], "measures": ["pv"]},
        "invalid",
        "u8",
        None,
    ),
    ("extra field", {"op": "subscribe", "id": "u9", "contracts": [CONTRACT], "colour": 1}, "invalid", "u9", "colour"),
    ("topic + interval", {"op": "subscribe", "id": "u10", "topic": "t", "interval_seconds": 1}, "invalid", "u10", None),
    ("empty id", {"op": "subscribe", "id": "", "contracts": [CONTRACT]}, "invalid", "", "id"),
    (
        "bad namespace",
        {"op": "subscribe", "id": "u11", "namespace": "a/b", "contracts": [CONTRACT]},
        "invalid",
        "u11",
        "namespace",
    ),
]


async def test_bad_messages_get_errors_and_the_connection_stays(make_client: MakeClient) -> None:
    client = await make_client()
    ws = await client.ws_connect("/v1/stream")
    await subscribe(ws, {"id": "dup", "contracts": [CONTRACT]})
    cases: list[tuple[str, Any, str, str | None, str | None]] = [
        *BAD_MESSAGES,
        ("duplicate id", {"op": "subscribe", "id": "dup", "contracts": [CONTRACT]}, "conflict", "dup", None),
    ]
    for n, (label, message, code, sub_id, field) in enumerate(cases):
        await (ws.send_str(message) if isinstance(message, str) else send(ws, message))
        err = await expect_error(ws, code, sub_id, label)
        if field is not None:
            assert field in [d["field"] for d in err["details"]], (label, err)
        assert not ws.closed, label
        # the same socket still subscribes
        q = await subscribe(ws, {"id": f"ok{n}", "contracts": [CONTRACT]})
        assert q["seq"] == 1, (label, q)

    await ws.send_bytes(orjson.dumps({"op": "subscribe", "id": "bin", "contracts": [CONTRACT]}))
    await expect_error(ws, "malformed", None, "binary frame")
    await subscribe(ws, {"id": "after-binary", "contracts": [CONTRACT]})
    # none of the bad messages subscribed anything
    conn = connection_with(client, "dup")
    assert conn is not None
    assert sorted(conn.subs) == sorted(["dup", "after-binary", *(f"ok{n}" for n in range(len(cases)))])
    await ws.close()


async def test_too_many_subscriptions_or_contracts(make_client: MakeClient) -> None:
    client = await make_client(stream={"max_subscriptions": 2, "max_contracts": 3})
    ws = await client.ws_connect("/v1/stream")
    two = [CONTRACT, {**CONTRACT, "id": "c2"}]
    await subscribe(ws, {"id": "a", "contracts": two})
    await send(ws, {"op": "subscribe", "id": "b", "contracts": two})  # 2 + 2 > 3 contracts
    await expect_error(ws, "too_many", "b")
    await subscribe(ws, {"id": "b", "contracts": [CONTRACT]})  # 3 contracts: at the limit
    await send(ws, {"op": "subscribe", "id": "t", "topic": "some-topic"})  # a third subscription
    await expect_error(ws, "too_many", "t")
    await send(ws, {"op": "subscribe", "id": "c", "contracts": [CONTRACT]})
    await expect_error(ws, "too_many", "c")
    # the connection stays, and unsubscribing frees room
    await send(ws, {"op": "unsubscribe", "id": "a"})
    ack, _ = await recv_until(ws, lambda m: m["type"] != "quote")
    assert ack == {"type": "unsubscribed", "id": "a"}
    await subscribe(ws, {"id": "c", "contracts": two})
    # limits are per connection: another socket has its own
    ws2 = await client.ws_connect("/v1/stream")
    await subscribe(ws2, {"id": "a", "contracts": [*two, {**CONTRACT, "id": "c3"}]})
    await ws.close()
    await ws2.close()


# -- market data that is not there yet ------------------------------------------------------------


async def test_no_market_data_then_a_snapshot_arrives(make_client: MakeClient) -> None:
    client = await make_client()
    await put_snapshot(client, 0, namespace="default")  # another namespace has data; "empty" has none
    ws = await client.ws_connect("/v1/stream")
    await send(ws, {"op": "subscribe", "id": "ref", "namespace": "empty", "contracts": [by_reference("r1")]})
    ack = await recv(ws)
    assert ack["type"] == "subscribed" and ack["id"] == "ref", ack
    await expect_error(ws, "no_market_data", "ref")
    assert connection_with(client, "ref") is not None  # the subscription stays

    stored = await put_snapshot(client, 3, namespace="empty", spot=95.0)
    q = await recv(ws)
    assert q["type"] == "quote" and q["id"] == "ref", q
    assert q["reason"] == "snapshot" and q["seq"] == 1, q
    assert q["market_data"]["hash"] == stored["hash"] and q["market_data"]["namespace"] == "empty", q
    assert q["results"][0]["id"] == "r1" and q["results"][0]["price"] > 0, q
    await ws.close()


# -- the upgrade -----------------------------------------------------------------------------------


async def test_get_without_upgrade_is_400(make_client: MakeClient) -> None:
    client = await make_client()
    await assert_error(await client.get("/v1/stream"), 400, "malformed")


def upgrade_headers() -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }


async def test_past_max_connections_is_503(make_client: MakeClient) -> None:
    client = await make_client(stream={"max_connections": 2})
    hub = app_of(client)[keys.STREAMS]
    ws1 = await client.ws_connect("/v1/stream")
    ws2 = await client.ws_connect("/v1/stream")
    await eventually(lambda: len(hub.connections) == 2, 10, "two connections registered")
    err = await assert_error(await client.get("/v1/stream", headers=upgrade_headers()), 503, "overloaded")
    assert "2" in err["message"], err
    r = await client.get("/v1/stream", headers=upgrade_headers())
    assert r.headers.get("Retry-After", "").isdigit(), r.headers
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v1/stream")
    assert info.value.status == 503
    # the two open ones still work; closing one makes room
    await subscribe(ws1, {"id": "a", "contracts": [CONTRACT]})
    await ws2.close()
    await eventually(lambda: len(hub.connections) == 1, 10, "the closed connection dropped")
    ws3 = await client.ws_connect("/v1/stream")
    await subscribe(ws3, {"id": "a", "contracts": [CONTRACT]})
    await ws1.close()
    await ws3.close()


# -- topics ------------------------------------------------------------------------------------------


async def test_topic_subscription_gets_job_results(make_client: MakeClient) -> None:
    job = {"kind": "price", "name": "t", "every_seconds": 0.2, "portfolio": "demo"}
    client = await make_client(jobs=[job])
    ws = await client.ws_connect("/v1/stream")
    await send(ws, {"op": "subscribe", "id": "job", "topic": "t"})
    ack = await recv(ws)
    assert ack == {"type": "subscribed", "id": "job", "contracts": 0, "topic": "t"}, ack
    assert await expect_silence(ws, 0.6) == []  # no snapshot with DEMO yet: the job publishes nothing

    stored = await put_snapshot(client, 0, underlying="DEMO")
    quotes = [await recv(ws) for _ in range(3)]
    for q in quotes:
        assert q["type"] == "quote" and q["id"] == "job" and q["reason"] == "job", q
        assert q["topic"] == "t" and q["job"] == "t", q
        assert [r["id"] for r in q["results"]] == ["demo-call-1y", "demo-put-1y", "demo-call-2y"], q
        assert q["market_data"]["hash"] == stored["hash"], q
    seqs = [q["seq"] for q in quotes]
    assert seqs[0] == 1 and all(b > a for a, b in itertools.pairwise(seqs)), seqs

    # a late subscriber gets the last published message at once
    ws2 = await client.ws_connect("/v1/stream")
    await send(ws2, {"op": "subscribe", "id": "late", "topic": "t"})
    assert (await recv(ws2))["type"] == "subscribed"
    late = await recv(ws2, timeout=5)
    assert late["reason"] == "subscribe" and late["seq"] == 1 and late["id"] == "late", late
    assert late["topic"] == "t" and len(late["results"]) == 3, late
    nxt = await recv(ws2)
    assert nxt["reason"] == "job" and nxt["seq"] == 2, nxt
    # a topic no job publishes: refused, naming it and the known topics; nothing subscribed
    await send(ws2, {"op": "subscribe", "id": "other", "topic": "nobody"})
    err, _ = await recv_until(ws2, lambda m: m["type"] != "quote")
    assert err["type"] == "error" and err["id"] == "other" and err["code"] == "not_found", err
    assert "'nobody'" in err["message"] and "known topics: 't'" in err["message"], err
    assert err["details"] == [{"field": "topic", "reason": "no price job publishes it", "known": ["t"]}], err
    assert connection_with(client, "other") is None
    got = await expect_silence(ws2, 0.6)
    assert all(m["id"] == "late" for m in got), got
    await ws.close()
    await ws2.close()


# -- many subscribers beside a stalled one ---------------------------------------------------------

N_LIVE = 200
N_SNAPSHOTS = 5
BIG_SUBS = 3  # subscriptions of the stalled client
BIG_CONTRACTS = 150  # ~0.4 MB per quote (all measures, 64 quantiles)


async def big_connection(
    client: Client, sub_id: str, send_subs: Callable[[list[Message]], Awaitable[None]]
) -> Connection:
    """Send BIG_SUBS large subscriptions (``{sub_id}0``...) through ``send_subs``; the
    server's connection once every one has had its first quote queued."""
    await send_subs([big_subscription(f"{sub_id}{k}", BIG_CONTRACTS) for k in range(BIG_SUBS)])
    last = f"{sub_id}{BIG_SUBS - 1}"
    await eventually(lambda: connection_with(client, last) is not None, WAIT, "the big subscriptions made")
    conn = connection_with(client, last)
    assert conn is not None
    await eventually(lambda: all(s.seq >= 1 for s in conn.subs.values()), WAIT, "first quotes queued")
    return conn


async def block(client: Client, conn: Connection, first: int) -> int:
    """PUT snapshots one at a time (each requotes the big subscriptions) until the
    connection's writer is blocked with a quote pending for every subscription, or it
    is evicted; the next snapshot index. (Loopback's kernel buffers take a few MB.)"""
    i = first
    for _ in range(20):
        if conn.closed or conn.queued >= len(conn.subs):
            return i
        target = min(s.seq for s in conn.subs.values()) + 1

        def requoted(target: int = target) -> bool:
            return conn.closed or all(s.seq >= target for s in conn.subs.values())

        await put_snapshot(client, i, spot=100.0 + i)
        i += 1
        await eventually(requoted, WAIT, "the big subscriptions requoted")
    raise AssertionError(f"a client that does not read never blocked the server's writes (queued {conn.queued})")


async def stall(client: Client, sockets: list[socket.socket], sub_id: str, first: int) -> tuple[Connection, int]:
    """A raw client that never reads, with BIG_SUBS large subscriptions, blocked (see
    ``block``); its connection, and the next snapshot index."""
    url = client.make_url("/v1/stream")
    assert url.host is not None and url.port is not None
    host, port = url.host, url.port

    async def open_raw(messages: list[Message]) -> None:
        sockets.append(await stalled_client(host, port, messages))

    conn = await big_connection(client, sub_id, open_raw)
    return conn, await block(client, conn, first)


@pytest.fixture
def raw_sockets(make_client: MakeClient) -> Iterator[list[socket.socket]]:
    """Raw client sockets, closed before the app stops (a peer that never answers the
    close handshake would otherwise hold the test server's shutdown)."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


async def test_200_subscribers_and_a_stalled_client(make_client: MakeClient, raw_sockets: list[socket.socket]) -> None:
    # no ping/pong eviction in this test; a deadline that the first large quotes meet on a busy machine
    client = await make_client(stream={"heartbeat_seconds": 300.0}, request_timeout_seconds=60.0)
    app = app_of(client)
    hub = app[keys.STREAMS]
    bound = BIG_SUBS + app[keys.SETTINGS].stream.control_queue
    coalesced_name = 'spectralmc_stream_dropped_total{reason="coalesced"}'
    await put_snapshot(client, 0, spot=100.0)
    sconn, next_i = await stall(client, raw_sockets, "big", 1)
    assert not sconn.closed
    assert sconn.queued == BIG_SUBS  # blocked on one send, one newer quote per subscription waiting
    url = client.make_url("/v1/stream")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        live: list[WS] = list(await asyncio.gather(*(session.ws_connect(url) for _ in range(N_LIVE))))
        await asyncio.gather(
            *(send(ws, {"op": "subscribe", "id": "live", "contracts": [by_reference()]}) for ws in live)
        )
        firsts = await asyncio.gather(*(recv_until(ws, lambda m: m["type"] == "quote") for ws in live))
        assert all(q["seq"] == 1 and q["reason"] == "subscribe" for q, _ in firsts)
        assert len({q["market_data"]["hash"] for q, _ in firsts}) == 1
        assert len(hub.connections) == N_LIVE + 1

        # each live client records when it first sees each snapshot's hash
        seen: list[dict[str, float]] = [{} for _ in live]
        seqs: list[list[int]] = [[] for _ in live]
        unexpected: list[Any] = []

        async def read(k: int, ws: WS) -> None:
            async for msg in ws:
                m: Message = orjson.loads(msg.data) if msg.type == WSMsgType.TEXT else {"frame": str(msg.type)}
                if m.get("type") != "quote":
                    unexpected.append(m)
                    continue
                seqs[k].append(m["seq"])
                seen[k].setdefault(m["market_data"]["hash"], time.monotonic())

        queued: list[int] = []

        async def sample_queue() -> None:
            while True:
                queued.append(sconn.queued)
                await asyncio.sleep(0.005)

        readers = [asyncio.create_task(read(k, ws)) for k, ws in enumerate(live)]
        sampler = asyncio.create_task(sample_queue())
        coalesced0 = await metric(client, coalesced_name)
        t_first = t_last = time.monotonic()
        for i in range(next_i, next_i + N_SNAPSHOTS):  # in a row
            t_last = time.monotonic()
            stored = await put_snapshot(client, i, spot=100.0 + i)
        last = stored["hash"]
        await eventually(
            lambda: all(last in s for s in seen), 20.0, "every live subscriber quoted at the last snapshot"
        )
        latency = max(s[last] for s in seen) - t_last
        print(
            f"\n{N_LIVE} live subscribers all had the last of {N_SNAPSHOTS} snapshots {latency:.3f} s after its PUT"
            f" ({max(s[last] for s in seen) - t_first:.3f} s after the first PUT)"
        )
        assert latency < 5.0, latency

        # the stalled client's newer quotes replaced its pending ones; its queue stayed bounded
        await eventually(lambda: len(queued) > 0, 5, "sampled")
        t0 = time.monotonic()
        while await metric(client, coalesced_name) <= coalesced0 and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.05)
        assert await metric(client, coalesced_name) > coalesced0
        sampler.cancel()
        assert sconn in hub.connections and not sconn.closed
        assert sconn.queued >= 1  # still stalled: it never took its quotes
        assert max(queued) <= bound, max(queued)
        assert sconn.queued <= bound
        assert unexpected == []
        for k, s in enumerate(seqs):
            assert s == sorted(set(s)), (k, s)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, sampler, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in live))


async def test_stalled_client_is_evicted_after_send_timeout(
    make_client: MakeClient, raw_sockets: list[socket.socket]
) -> None:
    client = await make_client(
        stream={"send_timeout_seconds": 1.0, "heartbeat_seconds": 300.0}, request_timeout_seconds=60.0
    )
    hub = app_of(client)[keys.STREAMS]
    await put_snapshot(client, 0)
    ws = await client.ws_connect("/v1/stream")  # a live client beside it stays
    await subscribe(ws, {"id": "live", "contracts": [by_reference()]})
    sconn, i = await stall(client, raw_sockets, "big", 1)
    await eventually(lambda: sconn not in hub.connections, 10.0, "the stalled client evicted")
    assert sconn.closed
    assert await metric(client, 'spectralmc_stream_disconnects_total{reason="stalled"}') == 1.0
    # the live one was not evicted and still gets quotes
    assert len(hub.connections) == 1
    await put_snapshot(client, i, spot=90.0)
    q, _ = await recv_until(ws, lambda m: m.get("data_asof") == asof(i))
    assert q["reason"] == "snapshot"
    await ws.close()


# -- shutdown ---------------------------------------------------------------------------------------


async def test_sigterm_closes_streams_with_going_away(serve: Serve) -> None:
    server = await asyncio.to_thread(serve)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{server.url}/v1/stream")
        q = await subscribe(ws, {"id": "s", "contracts": [CONTRACT]})
        assert q["seq"] == 1
        server.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            msg = await ws.receive()
            while msg.type == WSMsgType.TEXT:  # a quote may be on its way
                msg = await ws.receive()
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY, (msg, ws.close_code)
        with contextlib.suppress(Exception):
            await ws.close()
    code = await asyncio.to_thread(server.proc.wait, WAIT)
    assert code == 0, server.log.read_text()


# -- regressions: bugs these tests found, each failing only on the bug's own symptom ---------------


class KnownBugError(AssertionError):
    """The symptom of a bug that was found and fixed (so a regression reads as one)."""


def small_rcvbuf_socket(addr_info: Any) -> socket.socket:
    """aiohttp's socket_factory: a client socket with a tiny receive buffer."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_no_quote_after_unsubscribed_on_a_backed_up_connection(make_client: MakeClient) -> None:
    client = await make_client(stream={"heartbeat_seconds": 300.0}, request_timeout_seconds=60.0)
    await put_snapshot(client, 0)
    connector = aiohttp.TCPConnector(socket_factory=small_rcvbuf_socket)
    async with aiohttp.ClientSession(connector=connector) as session:
        ws = await session.ws_connect(client.make_url("/v1/stream"))  # not read until the writer is blocked

        async def send_all(messages: list[Message]) -> None:
            for m in messages:
                await send(ws, m)

        conn = await big_connection(client, "big", send_all)
        await block(client, conn, 1)
        assert not conn.closed and conn.queued == BIG_SUBS  # a quote for big0 is pending
        await send(ws, {"op": "unsubscribe", "id": "big0"})
        await eventually(lambda: "big0" not in conn.subs, WAIT, "the unsubscribe handled")
        ack, before = await recv_until(ws, lambda m: m["type"] == "unsubscribed", timeout=60)  # reading again
        assert ack == {"type": "unsubscribed", "id": "big0"}, ack
        assert {m["type"] for m in before} == {"subscribed", "quote"}, [m for m in before if m["type"] == "error"]
        # the others' pending quotes still come (however long a loaded machine takes to
        # deliver them), then nothing more for big0
        first, between = await recv_until(ws, lambda m: m.get("id") == "big1", timeout=60)
        after = [*between, first, *await expect_silence(ws, 2.0)]
        stale = [(m["id"], m["seq"]) for m in after if m.get("id") == "big0"]
        if stale:
            raise KnownBugError(f"quotes for big0 after 'unsubscribed': {stale}")
        await ws.close()


async def test_an_eviction_is_one_disconnect(make_client: MakeClient, raw_sockets: list[socket.socket]) -> None:
    client = await make_client(
        stream={"send_timeout_seconds": 1.0, "heartbeat_seconds": 300.0}, request_timeout_seconds=60.0
    )
    hub = app_of(client)[keys.STREAMS]
    await put_snapshot(client, 0)
    sconn, _ = await stall(client, raw_sockets, "big", 1)
    await eventually(lambda: sconn not in hub.connections, 10.0, "the stalled client evicted")
    text = await (await client.get("/metrics")).text()
    counts = {
        line.split('reason="')[1].split('"')[0]: float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("spectralmc_stream_disconnects_total{")
    }
    assert counts.get("stalled") == 1.0, counts
    if sum(counts.values()) != 1.0:
        raise KnownBugError(f"one evicted connection counted as {counts}")


async def test_sigterm_with_a_stalled_client_exits_promptly(serve: Serve) -> None:
    server = await asyncio.to_thread(serve, env={"SPECTRALMC_SHUTDOWN_TIMEOUT_SECONDS": "10"})
    coalesced = 'spectralmc_stream_dropped_total{reason="coalesced"}'
    async with aiohttp.ClientSession() as session:

        async def put(i: int) -> None:
            url = f"{server.url}/v1/marketdata/default/{VDT}/{asof(i)}"
            async with session.put(url, json=snapshot(spot=100.0 + i)) as r:
                assert r.status == 201, await r.text()

        async def dropped() -> float:
            async with session.get(f"{server.url}/metrics") as r:
                return sample(await r.text(), coalesced)

        await put(0)
        subs = [big_subscription(f"big{k}", BIG_CONTRACTS) for k in range(BIG_SUBS)]
        sock = await stalled_client("127.0.0.1", server.port, subs)
        try:
            ws = await session.ws_connect(f"{server.url}/v1/stream")
            await subscribe(ws, {"id": "s", "contracts": [CONTRACT]})
            for i in range(1, 40):  # requote the big subscriptions until the server's writes to it back up
                if await dropped() > 0:
                    break
                await put(i)
                await asyncio.sleep(0.5)
            assert await dropped() > 0, "the client that never reads never blocked the server's writes"
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            msg = await ws.receive(timeout=WAIT)
            assert msg.type == WSMsgType.CLOSE and ws.close_code == aiohttp.WSCloseCode.GOING_AWAY, msg
            # nothing else to drain: a prompt exit, well inside the 10 s shutdown timeout
            code = await asyncio.to_thread(server.proc.wait, 5.0)
            assert code == 0, server.log.read_text()
            print(f"\nexited {time.monotonic() - t0:.2f} s after SIGTERM with a stalled client")
        finally:
            sock.close()
