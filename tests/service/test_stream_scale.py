"""The stream hub at scale, on one real app: 5,000 subscriptions (50 WebSocket
connections x 100, inside the documented limits) all get their first quote and their
requote after a model swap without ``overloaded``, through merged queue requests far
fewer than the subscriptions, each quote equal to what ``POST /v1/price`` answers for
the subscription alone. Also: one subscription's bad contract fails only its own quote,
merged requests hold at most merge_contracts distinct contracts, one past its deadline
is priced again in smaller ones (and caps its measure set until answers come in time),
a queue refusal is retried until it fits, a queue that stays full ends in a bounded
``overloaded`` error, and a topic no job publishes is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from certificate_util import fake_certificate
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import TOKEN, MakeClient, app_of, block_worker

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service import keys
from spectralmc_server.service.errors import APIError, DeadlineExceeded
from spectralmc_server.service.stream import StreamHub

Client = TestClient[Any, Any]
WS = aiohttp.ClientWebSocketResponse
Message = dict[str, Any]

AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 60.0  # the longest any one wait may take on a slow, shared machine
CONNECTIONS = 50
PER_CONNECTION = 100  # the default max_subscriptions
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}


# -- helpers ------------------------------------------------------------------------------------


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until it holds; the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


Call = tuple[int, str, float]  # contracts, "ok" or the error code, seconds


Pick = Callable[[PriceRequest], bool]


def record_requests(
    hub: StreamHub,
    fail: tuple[Pick, APIError] | None = None,
    hold: tuple[Pick, asyncio.Event] | None = None,
) -> list[Call]:
    """Wrap the hub's pricer: every queue request it makes, counted apart from the hub's
    own counters. ``fail``: the first request it picks is answered with its error after
    0.5 s instead of being sent (as the queue answers one past its deadline). ``hold``:
    the requests it picks wait for the event before they are sent."""
    calls: list[Call] = []
    failed: list[PriceRequest] = []
    price = hub.price

    async def recorded(request: PriceRequest) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            if hold is not None and hold[0](request):
                await asyncio.wait_for(hold[1].wait(), WAIT)
            if fail is not None and not failed and fail[0](request):
                failed.append(request)
                await asyncio.sleep(0.5)
                raise fail[1]
            answer = await price(request)
        except APIError as exc:
            calls.append((len(request.contracts), exc.code, time.monotonic() - t0))
            raise
        calls.append((len(request.contracts), "ok", time.monotonic() - t0))
        return answer

    hub.price = recorded
    return calls


async def put_snapshot(client: Client) -> Message:
    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot())
    text = await r.text()
    assert r.status == 201, text
    described: Message = orjson.loads(text)
    return described


def explicit(cid: str, strike: float, vol: float = 0.25, expiry: float = 0.5) -> Message:
    return {"id": cid, "right": "call", "strike": strike, "spot": 100.0, "expiry_years": expiry, "vol": vol}


def heston(cid: str, strike: float) -> Message:
    return {
        "id": cid,
        "right": "put",
        "strike": strike,
        "spot": 100.0,
        "expiry_years": 1.0,
        "rate": 0.02,
        "process": "heston",
        "params": HESTON,
    }


def subscription(k: int) -> Message:
    """The k-th of the 5,000: by reference or explicit, three measure sets (one with
    quantile levels), gbm in and outside the learned domain (vol 2: the reference
    pricer, so its quote names no model), Heston (one subscription in 25) alone and
    beside gbm in the group where gbm answers with the network; most contracts are the
    subscription's own, some repeat across subscriptions (priced once)."""
    sid = f"s{k}"
    kind = k % 10
    if kind in (0, 5):  # one call by reference
        return {"id": sid, "contracts": [by_reference(f"{sid}-a", strike=60.0 + (k % 400) * 0.25)]}
    if kind in (1, 6):  # a call and a put by reference, price and delta
        return {
            "id": sid,
            "measures": ["price", "delta"],
            "contracts": [
                by_reference(f"{sid}-a", strike=60.0 + k * 0.01),
                {**by_reference(f"{sid}-b", strike=70.0 + k * 0.01), "right": "put"},
            ],
        }
    if kind in (2, 7):  # explicit gbm, in the domain
        return {"id": sid, "contracts": [explicit(f"{sid}-a", 60.0 + k * 0.01, vol=0.15 + (k % 7) * 0.05)]}
    if kind == 4:  # explicit gbm outside the domain only: no model behind its quote
        return {"id": sid, "contracts": [explicit(f"{sid}-a", 90.0 + (k % 13), vol=2.0)]}
    heston_too = k % 50 in (3, 8)
    if kind == 3:  # in-domain gbm, beside Heston in every fifth
        first = heston(f"{sid}-h", 80.0 + k * 0.005) if heston_too else explicit(f"{sid}-h", 85.0 + k * 0.01)
        return {"id": sid, "measures": ["price", "delta"], "contracts": [first, explicit(f"{sid}-g", 90.0 + k * 0.01)]}
    if kind == 8:  # one contract: Heston alone in every fifth (its quote names Heston's model only)
        only = heston(f"{sid}-h", 70.0 + k * 0.008) if heston_too else explicit(f"{sid}-h", 70.0 + k * 0.008)
        return {"id": sid, "measures": ["price", "delta"], "contracts": [only]}
    return {  # kind 9: quantiles
        "id": sid,
        "measures": ["price", "quantiles"],
        "quantile_levels": [0.05, 0.5, 0.95],
        "contracts": [explicit(f"{sid}-a", 75.0 + k * 0.01)],
    }


def group_of(spec: Message) -> tuple[Any, ...]:
    """What one merged request must share (this test uses one namespace and no val_datetime)."""
    levels = spec.get("quantile_levels")
    by_ref = any("underlying" in c for c in spec["contracts"])
    return tuple(spec.get("measures", ["price"])), None if levels is None else tuple(levels), by_ref


def alone_body(spec: Message, quote: Message) -> Message:
    """The POST /v1/price body of the subscription alone, at the quote's snapshot."""
    body: Message = {"measures": spec.get("measures", ["price"]), "contracts": spec["contracts"]}
    if "quantile_levels" in spec:
        body["quantile_levels"] = spec["quantile_levels"]
    if any("underlying" in c for c in spec["contracts"]):
        body["val_datetime"], body["data_asof"] = quote["val_datetime"], quote["data_asof"]
    return body


async def assert_as_alone(client: Client, spec: Message, quote: Message) -> None:
    """The quote carries exactly what /v1/price answers for the subscription alone."""
    r = await client.post("/v1/price", json=alone_body(spec, quote))
    text = await r.text()
    assert r.status == 200, text
    alone: Message = orjson.loads(text)
    assert set(quote) == {"type", "id", "seq", "reason", *alone}, (quote, alone)
    for field in alone:
        assert quote[field] == alone[field], (spec["id"], field, quote[field], alone[field])


class Reader:
    """Everything one connection receives, by subscription."""

    def __init__(self, ws: WS) -> None:
        self.ws = ws
        self.quotes: dict[str, list[Message]] = {}
        self.acks: set[str] = set()
        self.errors: list[Message] = []
        self.task = asyncio.create_task(self.read())

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                break
            m: Message = orjson.loads(msg.data)
            if m["type"] == "quote":
                self.quotes.setdefault(m["id"], []).append(m)
            elif m["type"] == "subscribed":
                self.acks.add(m["id"])
            else:
                self.errors.append(m)

    def count(self, predicate: Callable[[Message], bool]) -> int:
        return sum(any(predicate(q) for q in qs) for qs in self.quotes.values())


async def subscribe_all(readers: list[Reader], specs: list[list[Message]]) -> None:
    async def one(reader: Reader, mine: list[Message]) -> None:
        for spec in mine:
            await reader.ws.send_str(orjson.dumps({"op": "subscribe", **spec}).decode())

    await asyncio.gather(*(one(r, s) for r, s in zip(readers, specs, strict=True)))


async def wait_for_all(readers: list[Reader], n: int, predicate: Callable[[Message], bool], what: str) -> float:
    """Wait until ``n`` subscriptions have a quote matching ``predicate``; fail at once on
    any error message."""

    def done() -> bool:
        errors = [e for r in readers for e in r.errors]
        assert not errors, f"{len(errors)} errors while waiting for {what}, e.g. {errors[:3]}"
        return sum(r.count(predicate) for r in readers) >= n

    return await eventually(done, WAIT, what)


# -- 5,000 subscriptions -----------------------------------------------------------------------------


async def test_5000_subscriptions_first_quotes_and_requotes_are_merged(make_client: MakeClient) -> None:
    # the queue at its defaults (2,048 pending requests); only the pin route swaps models
    client = await make_client(poll_seconds=60.0, stream={"heartbeat_seconds": 300.0})
    app = app_of(client)
    hub = app[keys.STREAMS]
    await put_snapshot(client)
    store = app[keys.STORES]["gbm"]
    base = await store.load(1, need_training=True)
    model = {k: v * 1.01 if v.is_floating_point() else v for k, v in base.model.items()}
    manifest = {**base.manifest, "metrics": {**base.manifest["metrics"], "variant": "scale"}}
    variant = Checkpoint(manifest, model, base.training)
    # certified (a made-up certificate for its own content): only certified versions are served
    variant = replace(variant, certificate=fake_certificate(variant, seed=5))
    v2 = await store.commit(variant, "a variant for the stream scale test")

    n = CONNECTIONS * PER_CONNECTION
    specs = [[subscription(c * PER_CONNECTION + j) for j in range(PER_CONNECTION)] for c in range(CONNECTIONS)]
    by_id = {s["id"]: s for mine in specs for s in mine}
    groups = {group_of(s) for s in by_id.values()}
    contracts = [c for s in by_id.values() for c in s["contracts"]]
    distinct = {orjson.dumps({k: v for k, v in c.items() if k != "id"}, option=orjson.OPT_SORT_KEYS) for c in contracts}
    sample = [by_id[f"s{k}"] for k in (*range(20), 977, 1234, 2718, 3141, 4999)]
    url = client.make_url("/v1/stream")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = await asyncio.gather(*(session.ws_connect(url) for _ in range(CONNECTIONS)))
        readers = [Reader(ws) for ws in sockets]
        calls = record_requests(hub)

        t0 = time.monotonic()
        await subscribe_all(readers, specs)
        await wait_for_all(readers, n, lambda q: q["seq"] == 1 and q["reason"] == "subscribe", "every first quote")
        first_seconds = time.monotonic() - t0
        first_requests = hub.queue_requests
        assert sum(len(r.acks) for r in readers) == n
        assert hub.subscriptions == n
        assert hub.distinct_contracts == len(distinct) < len(contracts)  # identical terms are held (and priced) once
        print(
            f"\n{n} subscriptions on {CONNECTIONS} connections: every first quote {first_seconds:.2f} s after the"
            f" first subscribe was sent; {first_requests} queue requests ({hub.overload_retries} overload retries);"
            f" {len(contracts)} contracts, {len(distinct)} distinct"
        )
        assert len(calls) == first_requests  # the hub's count is every request it made
        assert sum(1 for _, outcome, _ in calls if outcome != "ok") == hub.overload_retries, calls
        assert first_requests <= n // 100, first_requests  # merged: far fewer requests than subscriptions
        for spec in sample:
            quote = next(q for r in readers for q in r.quotes.get(spec["id"], []))
            assert quote["models"].get("gbm", {"version": 1})["version"] == 1, quote
            await assert_as_alone(client, spec, quote)
        assert {q["models"].get("gbm", {}).get("version") for r in readers for qs in r.quotes.values() for q in qs} == {
            1,
            None,  # the out-of-domain gbm subscriptions: priced by the reference, no model named
        }

        # a model swap requotes all 5,000 in one round: about one request per group
        retries = hub.overload_retries
        t1 = time.monotonic()
        r = await client.post("/v1/admin/models/gbm/pin", json={"version": 2}, headers=AUTH)
        assert r.status == 200, await r.text()
        await wait_for_all(readers, n, lambda q: q["reason"] == "model", "every requote after the swap")
        requote_seconds = time.monotonic() - t1
        requote_requests = hub.queue_requests - first_requests
        print(
            f"model swap: all {n} requoted {requote_seconds:.2f} s after the pin; {requote_requests} queue requests"
            f" for {len(groups)} groups"
        )
        # about one request per group (one more where a group takes longer than merge_seconds)
        assert len(groups) <= requote_requests - (hub.overload_retries - retries) <= n // 100, requote_requests
        assert len(calls) == hub.queue_requests
        identity = {"version": 2, "content_hash": v2.content_hash}
        for reader in readers:
            for sid, quotes in reader.quotes.items():
                model_quotes = [q for q in quotes if q["reason"] == "model"]
                assert [q["seq"] for q in model_quotes] == [2], (sid, quotes)
                q = model_quotes[0]
                learned_gbm = any(row["model"] == "gbm" and row["method"] == "cvnn" for row in q["results"])
                assert (q["models"].get("gbm") == identity) == learned_gbm, q
                assert [row["id"] for row in q["results"]] == [c["id"] for c in by_id[sid]["contracts"]], q
        for spec in sample:
            quote = next(q for r in readers for q in r.quotes.get(spec["id"], []) if q["reason"] == "model")
            await assert_as_alone(client, spec, quote)

        for reader in readers:
            reader.task.cancel()
        await asyncio.gather(*(r.task for r in readers), return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in sockets))
    await eventually(lambda: hub.distinct_contracts == 0, 10.0, "the hub forgets the contracts of closed connections")


# -- failures inside a merged request -------------------------------------------------------------------


async def test_a_bad_contract_fails_only_its_own_subscription(make_client: MakeClient) -> None:
    client = await make_client(stream={"max_subscriptions": 200})
    hub = app_of(client)[keys.STREAMS]
    await put_snapshot(client)
    n, bad = 200, {17, 80, 81, 150, 199}
    specs: list[Message] = []
    for k in range(n):
        contracts = [by_reference(f"g{k}", strike=70.0 + k % 50)]
        if k in bad:  # valid at subscribe, and the snapshot has no NOPE
            contracts.append(by_reference(f"x{k}", underlying="NOPE"))
        specs.append({"id": f"s{k}", "contracts": contracts})
    ws = await client.ws_connect("/v1/stream")
    reader = Reader(ws)
    await subscribe_all([reader], [specs])
    await eventually(lambda: len(reader.quotes) + len(reader.errors) >= n, WAIT, "every subscription answered")
    print(f"\n{n} subscriptions, {len(bad)} with a bad contract: {hub.queue_requests} queue requests")
    assert sorted(e["id"] for e in reader.errors) == sorted(f"s{k}" for k in bad), reader.errors
    assert len(reader.quotes) == n - len(bad)
    # O(bad x log n) requests, not one per subscription
    assert hub.queue_requests <= 4 * len(bad) * (n.bit_length() + 1), hub.queue_requests
    assert hub.queue_requests < n // 2, hub.queue_requests
    for err in reader.errors:  # exactly the error /v1/price gives the subscription alone
        spec = specs[int(err["id"][1:])]
        r = await client.post(
            "/v1/price", json={"val_datetime": VDT, "data_asof": ASOF, "contracts": spec["contracts"]}
        )
        assert r.status == 422, await r.text()
        alone = (await r.json())["error"]
        assert alone["code"] == err["code"] == "no_market_data", (alone, err)
        assert (alone["message"], alone["details"]) == (err["message"], err["details"]), (alone, err)
        assert err["details"][0]["field"] == "contracts[1]", err
    for k in (0, 16, 18, 79, 82, 198):
        await assert_as_alone(client, specs[k], reader.quotes[f"s{k}"][0])
    assert all(len(v) == 1 for v in reader.quotes.values())
    reader.task.cancel()
    await ws.close()


async def test_merged_requests_hold_at_most_merge_contracts(make_client: MakeClient) -> None:
    client = await make_client(stream={"merge_contracts": 50, "max_subscriptions": 200})
    hub = app_of(client)[keys.STREAMS]
    calls = record_requests(hub)
    # 150 subscriptions of 1 to 3 contracts, every fifth one the same as the one before
    specs: list[Message] = [
        {
            "id": f"s{k}",
            "contracts": [explicit(f"c{k}-{i}", 80.0 + (k - (k % 5 == 4)) + i / 4) for i in range(1 + k % 3)],
        }
        for k in range(150)
    ]
    distinct = {(c["strike"]) for s in specs for c in s["contracts"]}
    ws = await client.ws_connect("/v1/stream")
    reader = Reader(ws)
    await subscribe_all([reader], [specs])
    await eventually(lambda: len(reader.quotes) + len(reader.errors) >= len(specs), WAIT, "every subscription quoted")
    assert reader.errors == []
    sizes = [n for n, _, _ in calls]
    print(f"\nmerged request sizes (merge_contracts 50): {sizes}")
    assert max(sizes) <= 50, sizes
    assert sum(sizes) >= len(distinct) > 50, (sizes, len(distinct))
    assert len(sizes) < len(specs) // 3, sizes
    for k in (0, 1, 2, 3, 4, 74, 149):
        await assert_as_alone(client, specs[k], reader.quotes[f"s{k}"][0])
    reader.task.cancel()
    await ws.close()


async def test_a_missed_deadline_caps_a_measure_set_and_answers_in_time_lift_it(make_client: MakeClient) -> None:
    client = await make_client(stream={"merge_seconds": 2.0})
    hub = app_of(client)[keys.STREAMS]
    key = ("default", None, None, ("price",), None, False)
    other = ("default", None, None, ("price", "delta"), None, False)
    assert hub._limit(key) == 20_000  # merge_contracts: nothing learned
    hub._learn(key, 20_000, 1.5)  # answers alone set no cap
    assert hub._limit(key) == 20_000
    hub._learn(key, 10_000, 12.0, missed=True)  # 10,000 took 12 s: 2 s is 1,666 of them
    assert (hub._limit(key), hub._limit(other)) == (1_666, 20_000)
    hub._learn(key, 1_666, 3.0)  # slower than merge_seconds: never shrinks, nor grows
    assert hub._limit(key) == 1_666
    hub._learn(key, 1_666, 1.0)  # within 2 s: twice as many would take at most 2 s
    assert hub._limit(key) == 3_332
    hub._learn(key, 3_332, 0.2)  # ten times as many: more than merge_contracts, the cap is gone
    assert hub._limit(key) == 20_000
    hub._learn(key, 2, 30.0, missed=True)  # below one contract in 2 s: one at a time
    assert hub._limit(key) == 1
    hub._learn(key, 40, 12.0, missed=True)  # a miss never lifts the cap
    assert hub._limit(key) == 1


async def test_a_merged_request_past_its_deadline_is_priced_again_smaller(make_client: MakeClient) -> None:
    # requests of 0.1 s; the deadline (injected: the queue's answer after 0.5 s) is well above
    client = await make_client(stream={"merge_seconds": 0.1})
    hub = app_of(client)[keys.STREAMS]
    late = DeadlineExceeded("no answer within the 10 s deadline")
    gate = asyncio.Event()
    calls = record_requests(
        hub,
        fail=(lambda request: len(request.contracts) > 1, late),  # the first merged request
        hold=(lambda request: request.contracts[0].id == "gate", gate),
    )
    ws = await client.ws_connect("/v1/stream")
    reader = Reader(ws)
    # the hub's round for 'gate' waits while 40 subscriptions arrive: the next round has all 40
    await reader.ws.send_str(
        orjson.dumps({"op": "subscribe", "id": "gate", "contracts": [explicit("gate", 95.0)]}).decode()
    )
    await eventually(lambda: len(calls) == 0 and hub.subscriptions == 1, WAIT, "the gate subscribed")
    specs: list[Message] = [{"id": f"s{k}", "contracts": [explicit(f"c{k}", 80.0 + k * 0.5)]} for k in range(40)]
    await subscribe_all([reader], [specs])
    await eventually(lambda: hub.subscriptions == 41, WAIT, "all subscribed")
    gate.set()
    await eventually(lambda: len(reader.quotes) + len(reader.errors) >= 41, WAIT, "every subscription answered")
    print(f"\n(contracts, outcome) of each request: {[c[:2] for c in calls]}")
    assert reader.errors == [], reader.errors
    assert [c[:2] for c in calls[:2]] == [(1, "ok"), (40, "deadline_exceeded")], calls
    # priced again in requests of what takes merge_seconds at its pace (40 x 0.1 / 0.5 s
    # or fewer): each contract answered once
    rest = calls[2:]
    assert len(rest) >= 5 and all(n <= 8 and outcome == "ok" for n, outcome, _ in rest), calls
    assert sum(n for n, _, _ in rest) == 40, calls
    for k in (0, 20, 39):
        await assert_as_alone(client, specs[k], reader.quotes[f"s{k}"][0])

    # one subscription alone past its deadline: nothing smaller, its own error
    record_requests(hub, fail=(lambda request: request.contracts[0].id == "solo", late))
    await ws.send_str(orjson.dumps({"op": "subscribe", "id": "solo", "contracts": [explicit("solo", 99.0)]}).decode())
    await eventually(lambda: bool(reader.errors), WAIT, "solo answered")
    assert [(e["id"], e["code"], e["message"]) for e in reader.errors] == [
        ("solo", "deadline_exceeded", "no answer within the 10 s deadline")
    ]
    reader.task.cancel()
    await ws.close()


def queue_filler(k: int) -> PriceRequest:
    """A request of its own batch key (namespace) for holding the queue full."""
    return PriceRequest.model_validate({"namespace": f"fill{k}", "contracts": [explicit("f", 100.0)]})


async def test_a_refused_merged_request_is_retried_until_it_fits(make_client: MakeClient) -> None:
    client = await make_client(queue={"max_pending_requests": 2}, request_timeout_seconds=30.0)
    app = app_of(client)
    hub, queue = app[keys.STREAMS], app[keys.BATCHER]
    calls = record_requests(hub)
    blocked = block_worker(client, 3.0)
    # a batch waits on the blocked worker (a small one is not queued behind it but waits in
    # the queue: PIPELINE_CONTRACTS), two more requests fill the queue
    fillers = [queue.submit(queue_filler(0), timeout=30.0, connected=lambda: True)]
    await eventually(lambda: queue.depth[0] == 0, 10.0, "the batch taken")
    fillers += [queue.submit(queue_filler(k), timeout=30.0, connected=lambda: True) for k in range(1, 3)]
    assert queue.depth[0] == 2  # full: the next request is refused

    specs: list[Message] = [{"id": f"s{k}", "contracts": [explicit(f"c{k}", 80.0 + k)]} for k in range(20)]
    ws = await client.ws_connect("/v1/stream")
    reader = Reader(ws)
    await subscribe_all([reader], [specs])
    await eventually(lambda: hub.overload_retries >= 1, 10.0, "the hub's merged request refused and retried")
    assert not blocked.done() and not reader.quotes  # refused while the worker is held
    await blocked
    await asyncio.gather(*fillers)
    await eventually(lambda: len(reader.quotes) + len(reader.errors) >= len(specs), WAIT, "every subscription quoted")
    assert reader.errors == []
    assert len(calls) == hub.queue_requests and calls[-1][1] == "ok", calls
    assert [outcome for _, outcome, _ in calls].count("overloaded") == hub.overload_retries, calls
    # merged: refused three times in a row a request is retried as two halves, so the
    # 20 went in a few requests
    assert hub.queue_requests - hub.overload_retries <= 8, calls
    print(f"\nretried {hub.overload_retries} times while the queue was full")
    for spec in specs[:5]:
        await assert_as_alone(client, spec, reader.quotes[spec["id"]][0])
    reader.task.cancel()
    await ws.close()


async def test_a_queue_that_stays_full_ends_in_a_bounded_overloaded_error(make_client: MakeClient) -> None:
    # requests of four contracts never fit a queue bound of three: a client sees
    # 'overloaded' after overload_retry_seconds, and the subscription stays
    client = await make_client(queue={"max_pending_contracts": 3}, stream={"overload_retry_seconds": 0.5})
    hub = app_of(client)[keys.STREAMS]
    specs = [
        {"id": f"s{k}", "contracts": [explicit(f"c{k}-{i}", 90.0 + 5 * i + k) for i in range(4)]} for k in range(2)
    ]
    ws = await client.ws_connect("/v1/stream")
    reader = Reader(ws)
    t0 = time.monotonic()
    await subscribe_all([reader], [specs])
    await eventually(lambda: len(reader.errors) >= 2, WAIT, "both subscriptions answered")
    elapsed = time.monotonic() - t0
    assert sorted(e["id"] for e in reader.errors) == ["s0", "s1"], reader.errors
    assert all(e["code"] == "overloaded" and "retried for 0.5 s" in e["message"] for e in reader.errors), reader.errors
    assert elapsed >= 0.5, elapsed
    # backoff from 20 ms, doubling: six tries in 0.5 s per request (one merged, or one per round)
    assert 2 <= hub.queue_requests <= 14, hub.queue_requests
    assert reader.quotes == {}
    conn = next(iter(hub.connections))
    assert sorted(conn.subs) == ["s0", "s1"]  # still subscribed: the next trigger quotes them again
    reader.task.cancel()
    await ws.close()


# -- topics -----------------------------------------------------------------------------------------


async def test_unknown_topic_is_refused_naming_the_known_ones(make_client: MakeClient) -> None:
    jobs = [
        {"kind": "price", "name": "book", "every_seconds": 3600.0, "portfolio": "demo"},
        {"kind": "price", "name": "other", "every_seconds": 3600.0, "portfolio": "demo", "topic": "spx-book"},
    ]
    client = await make_client(jobs=jobs)
    hub = app_of(client)[keys.STREAMS]
    ws = await client.ws_connect("/v1/stream")
    await ws.send_str(orjson.dumps({"op": "subscribe", "id": "u", "topic": "spx"}).decode())
    err = await ws.receive_json(timeout=WAIT)
    assert err["type"] == "error" and err["id"] == "u" and err["code"] == "not_found", err
    assert err["message"] == "no price job publishes topic 'spx'; known topics: 'book', 'spx-book'", err
    assert err["details"] == [{"field": "topic", "reason": "no price job publishes it", "known": ["book", "spx-book"]}]
    for topic in ("book", "spx-book"):  # the declared topics subscribe (quiet until their job publishes)
        await ws.send_str(orjson.dumps({"op": "subscribe", "id": topic, "topic": topic}).decode())
        ack = await ws.receive_json(timeout=WAIT)
        assert ack == {"type": "subscribed", "id": topic, "contracts": 0, "topic": topic}, ack
    assert hub.subscriptions == 2
    await ws.close()


async def test_without_price_jobs_every_topic_is_unknown(make_client: MakeClient) -> None:
    client = await make_client()
    ws = await client.ws_connect("/v1/stream")
    await ws.send_str(orjson.dumps({"op": "subscribe", "id": "u", "topic": "book"}).decode())
    err = await ws.receive_json(timeout=WAIT)
    assert err["code"] == "not_found", err
    assert err["message"] == "no price job publishes topic 'book'; known topics: none (no price job is declared)"
    await ws.close()
