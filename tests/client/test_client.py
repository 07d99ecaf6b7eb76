"""``spectralmc_server.client`` against real ``spectralmc serve`` processes: row pricing
through the blocking and asyncio clients (the server's own answer, unchanged); a pandas
DataFrame through the Arrow route, bit-identical to row JSON; books split into chunks
and joined in order; errors typed with their code and field details; a quote stream
that survives a server restart on the same port. Plus the error mapping and the package's
import without pandas, which need no server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
import server_util
from server_util import CONTRACT, TOKEN, ServerProcess, free_port, start_server

from spectralmc_server.client import (
    DEFAULT_CHUNK_SIZE,
    AsyncClient,
    Client,
    ConnectionFailed,
    DeadlineExceeded,
    Forbidden,
    InvalidRequest,
    NoMarketData,
    Overloaded,
    ServerError,
    SpectralMCError,
    Stream,
    TooLarge,
    Unavailable,
    books,
)
from spectralmc_server.client.errors import MAX_RETRY_AFTER, error_from_answer, parse_retry_after
from spectralmc_server.pricing.cells import BARRIER_COLUMNS, CONTRACT_COLUMNS
from spectralmc_server.pricing.schemas import MAX_CONTRACTS

Serve = Callable[..., ServerProcess]
ENV = {"SPECTRALMC_TRAIN__ENABLED": "false", "SPECTRALMC_ADMIN_TOKEN": TOKEN}
WAIT = 30.0  # the longest one expected answer or quote may take on a slow, shared machine
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.04, "xi": 0.5, "rho": -0.7}
MERTON = {"sigma": 0.2, "lambda": 0.5, "mu_j": -0.1, "sigma_j": 0.15}
# one contract of each process, with and without rates: the columns of a book have gaps
BOOK: list[dict[str, Any]] = [
    {"id": "g1", "right": "call", "strike": 105.0, "spot": 100.0, "expiry_years": 0.5, "vol": 0.25},
    {"id": "g2", "right": "put", "strike": 90.0, "spot": 100.0, "expiry_years": 2.0, "rate": 0.03, "vol": 0.4},
    {"id": "h1", "right": "put", "strike": 95.0, "spot": 100.0, "expiry_years": 1.0, "process": "heston",
     "params": HESTON},
    {"id": "m1", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 0.5, "dividend": 0.01,
     "process": "merton", "params": MERTON},
    {"id": "a1", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0, "vol": 0.2,
     "process": "asian", "fixings": 12},
]  # fmt: skip
BY_REFERENCE = {"id": "r1", "right": "call", "strike": 100.0, "underlying": "SPX", "expiry": "2027-06-18"}
VDT = "2026-11-26T16:00:00Z"  # no snapshot is stored under it
MEASURES = ["price", "delta", "vega", "quantiles"]
LEVELS = [0.05, 0.5, 0.95]


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module's tests that do not stop it."""
    proc = start_server(tmp_path_factory.mktemp("client"), env=ENV)
    yield proc
    if proc.proc.poll() is None:
        proc.stop(signal.SIGKILL)


def post_json(url: str, body: Any) -> dict[str, Any]:
    """POST /v1/price without the client: the server's own answer."""
    req = urllib.request.Request(
        f"{url}/v1/price", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        answer: dict[str, Any] = json.loads(r.read())
    return answer


def priced_requests(url: str) -> float:
    """POST /v1/price answers 200 so far (the server's own counter)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    key = 'spectralmc_http_requests_total{method="POST",route="/v1/price",status="200"}'
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == key:
            return float(value)
    return 0.0


def book(n: int) -> list[dict[str, Any]]:
    """n distinct gbm contracts."""
    return [
        {"id": f"c{i:03d}", "right": "call" if i % 2 else "put", "strike": 80.0 + i, "spot": 100.0,
         "expiry_years": 0.25 + 0.01 * i, "vol": 0.2}
        for i in range(n)
    ]  # fmt: skip


def columns_of(result: dict[str, Any]) -> dict[str, Any]:
    """A row JSON result as the Arrow answer's columns: nested objects as ``a.b``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", result)
    return flat


def dropped(stream: Stream) -> Stream:
    """``stream`` as if its connection had just dropped: the next iteration reconnects
    (against a port nobody listens on, every try is refused at once)."""
    stream._opened = True
    return stream


def count_connects(monkeypatch: pytest.MonkeyPatch, client: AsyncClient) -> list[float]:
    """The (monotonic) times at which ``client`` tries to open a WebSocket, from now on."""
    tries: list[float] = []
    real = client._ws_connect

    async def connect(heartbeat: float) -> Any:
        tries.append(time.monotonic())
        return await real(heartbeat)

    monkeypatch.setattr(client, "_ws_connect", connect)
    return tries


class FakeSocket:
    """What ``_open`` needs of a WebSocket."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed = False

    async def send_str(self, data: str) -> None:
        self.sent.append(data)

    async def close(self) -> bool:
        self.closed = True
        return True


def same_bits(a: Any, b: Any) -> bool:
    """Equal floats bit for bit (or equal otherwise)."""
    if isinstance(a, float) or isinstance(b, float):
        return float(a).hex() == float(b).hex()
    return bool(a == b)


# -- pricing -------------------------------------------------------------------------------


def test_row_pricing_sync(server: ServerProcess) -> None:
    expected = post_json(server.url, {"measures": MEASURES, "quantile_levels": LEVELS, "contracts": BOOK})
    with Client(server.url) as client:
        answer = client.price(BOOK, measures=MEASURES, quantile_levels=LEVELS)
        models = client.models()
        assert client.ready()["status"] in ("ready", "degraded")
    assert answer == expected
    assert [r["id"] for r in answer["results"]] == [c["id"] for c in BOOK]
    assert {"gbm", "heston", "merton", "asian"} <= {m["name"] for m in models}
    with pytest.raises(RuntimeError, match="closed"):
        client.price([CONTRACT])


async def test_row_pricing_async(server: ServerProcess) -> None:
    expected = post_json(server.url, {"measures": MEASURES, "quantile_levels": LEVELS, "contracts": BOOK})
    async with AsyncClient(server.url) as client:
        answer, plain = await asyncio.gather(
            client.price(BOOK, measures=MEASURES, quantile_levels=LEVELS), client.price([CONTRACT])
        )
        models = await client.models()
    assert answer == expected
    assert list(plain["results"][0]) == ["id", "model", "method", "price", "error_bound"]
    assert {"gbm", "heston", "merton", "asian"} <= {m["name"] for m in models}


async def test_dataframe_round_trip_through_arrow(server: ServerProcess) -> None:
    """A DataFrame out of row dicts (``params.*`` columns, NaN where a contract gives no
    value, fixings a float column) priced over Arrow: the numbers of row JSON, bit for
    bit, on the book's index; the answer's metadata in ``attrs``."""
    expected = post_json(server.url, {"measures": MEASURES, "quantile_levels": LEVELS, "contracts": BOOK})
    df = pd.json_normalize(BOOK)
    df.index = pd.Index([f"row{i}" for i in range(len(df))])
    async with AsyncClient(server.url) as client:
        out = await client.price_table(df, measures=MEASURES, quantile_levels=LEVELS)
        table = await client.price_table(pa.Table.from_pandas(df, preserve_index=False), measures=["price"])
    assert isinstance(out, pd.DataFrame)
    assert list(out.index) == list(df.index)
    assert out.attrs["spectralmc"]["models"] == expected["models"]
    assert out.attrs["spectralmc"]["market_data"] is None
    for (_, row), result in zip(out.iterrows(), expected["results"], strict=True):
        want = columns_of(result)
        assert {"id", "model", "method", "price", "quantiles.0.05", "error_bound.quantiles.0.95"} <= set(want)
        for name, value in want.items():
            assert name in out.columns, (name, list(out.columns))
            assert same_bits(row[name], value), (result["id"], name, row[name], value)
        for name in set(out.columns) - set(want):  # columns another row needed (warnings)
            assert row[name] is None or (isinstance(row[name], float) and math.isnan(row[name])), (name, row[name])
    assert isinstance(table, pa.Table)
    assert table.column("id").to_pylist() == [c["id"] for c in BOOK]
    assert [float(p).hex() for p in table.column("price").to_pylist()] == [
        float(r["price"]).hex() for r in post_json(server.url, {"contracts": BOOK})["results"]
    ]
    assert json.loads(table.schema.metadata[b"spectralmc.response"])["models"] == expected["models"]


async def test_book_split_into_chunks(server: ServerProcess) -> None:
    """25 contracts at 4 per request: 7 requests, answers joined in book order and equal
    to the one-request answer (the server's answers do not depend on batching)."""
    contracts = book(25)
    whole = post_json(server.url, {"measures": ["price", "delta"], "contracts": contracts})
    async with AsyncClient(server.url, chunk_size=4) as client:
        before = priced_requests(server.url)
        answer = await client.price(contracts, measures=["price", "delta"])
        assert priced_requests(server.url) - before == 7
        assert answer == whole
        with pytest.raises(InvalidRequest) as caught:  # ids repeat across chunks: refused before sending
            await client.price([*contracts, {**CONTRACT, "id": "c017"}])
        assert caught.value.details == [{"field": "contracts", "reason": "duplicate contract id(s): c017"}]
        assert caught.value.status is None and caught.value.code == "invalid"
        assert priced_requests(server.url) - before == 7


async def test_arrow_book_split_into_chunks(server: ServerProcess) -> None:
    """The same over Arrow: 7 IPC requests, one table in book order."""
    contracts = book(25)
    whole = post_json(server.url, {"measures": ["price", "delta"], "contracts": contracts})
    async with AsyncClient(server.url, chunk_size=4) as client:
        before = priced_requests(server.url)
        table = await client.price_table(pa.Table.from_pylist(contracts), measures=["price", "delta"])
        assert priced_requests(server.url) - before == 7
        with pytest.raises(InvalidRequest) as caught:
            await client.price_table(pa.Table.from_pylist([*contracts, {**CONTRACT, "id": "c003"}]))
        assert caught.value.details == [{"field": "contracts", "reason": "duplicate contract id(s): c003"}]
        assert priced_requests(server.url) - before == 7
    assert table.column("id").to_pylist() == [c["id"] for c in contracts]
    assert table.column("price").to_pylist() == [r["price"] for r in whole["results"]]
    assert table.column("delta").to_pylist() == [r["delta"] for r in whole["results"]]
    assert json.loads(table.schema.metadata[b"spectralmc.response"])["models"] == whole["models"]


def barrier(cid: str, kind: str, level: float, **more: Any) -> dict[str, Any]:
    """A gbm contract (spot 100) with a barrier."""
    return {**BOOK[0], "id": cid, "barrier": {"type": kind, "level": level, **more}}


# a vanilla, continuous barriers (closed form) and dated ones (Monte Carlo: a few dates, cheap)
BARRIER_BOOK: list[dict[str, Any]] = [
    {**BOOK[0], "id": "v"},
    barrier("do", "down-and-out", 90.0, rebate=2.5),
    barrier("uo", "up-and-out", 120.0, monitoring=4),
    barrier("di", "down-and-in", 85.0, monitoring="continuous"),
    {**BOOK[1], "id": "p"},
    barrier("ui", "up-and-in", 115.0, monitoring=3, rebate=1.0),
]


async def test_a_barrier_book_prices_as_a_table(server: ServerProcess) -> None:
    """A barrier book as a DataFrame (barrier.<key> columns from json_normalize, with
    monitoring "continuous" and numbers of dates in one column, or a column of barrier
    dicts) and as an Arrow table: the row answer, bit for bit, method included."""
    measures = ["price", "delta", "survival"]
    expected = post_json(server.url, {"measures": measures, "contracts": BARRIER_BOOK})
    assert [r["method"] for r in expected["results"]][1:4] == ["analytic", "reference", "analytic"]
    flat = pd.json_normalize(BARRIER_BOOK)
    assert flat["barrier.monitoring"].dtype == object  # "continuous" beside 4 and 3
    # Arrow has no column of both: monitoring as text (a dictionary of it), as the server reads it
    text = [None if pd.isna(m) else str(m) for m in flat["barrier.monitoring"]]
    plain = pa.Table.from_pandas(flat.drop(columns=["barrier.monitoring"]), preserve_index=False)
    arrow = plain.append_column("barrier.monitoring", pa.array(text).dictionary_encode())
    # the vanillas and the dated barriers: pandas makes a float64 column of 4 and 3 with gaps
    dated = [c for c in BARRIER_BOOK if c["id"] in ("v", "uo", "p", "ui")]
    assert pd.json_normalize(dated)["barrier.monitoring"].dtype == "float64"
    async with AsyncClient(server.url) as client:
        answers = {
            "json_normalize": await client.price_table(flat, measures=measures),
            "dicts": await client.price_table(pd.DataFrame(BARRIER_BOOK), measures=measures),
            "arrow": await client.price_table(arrow, measures=measures),
        }
        gaps = await client.price_table(pd.json_normalize(dated), measures=measures)
        with pytest.raises(InvalidRequest) as caught:  # client-side, as for fixings: dates must be whole
            await client.price_table(pd.json_normalize([barrier("x", "up-and-out", 120.0, monitoring=2.5)]))
        assert caught.value.details[0]["field"] == "barrier.monitoring" and caught.value.status is None
        with pytest.raises(InvalidRequest) as caught:  # "12.5" beside "continuous": the server's row error
            bad = [
                barrier("x", "up-and-out", 120.0, monitoring=12.5),
                barrier("y", "up-and-out", 120.0, monitoring="continuous"),
            ]
            await client.price_table(pd.json_normalize(bad))
        assert caught.value.status == 422
        assert caught.value.details[0]["field"] == "contracts[0].barrier.monitoring", caught.value.details
    for form, out in answers.items():
        table = out if isinstance(out, pa.Table) else pa.Table.from_pandas(out, preserve_index=False)
        assert table.column("id").to_pylist() == [c["id"] for c in BARRIER_BOOK], form
        for i, result in enumerate(expected["results"]):
            for name, value in columns_of(result).items():
                assert same_bits(table.column(name)[i].as_py(), value), (form, result["id"], name, value)
    by_id = {r["id"]: r for r in expected["results"]}
    assert gaps["id"].tolist() == [c["id"] for c in dated]
    for (_, row), c in zip(gaps.iterrows(), dated, strict=True):
        assert same_bits(row["price"], by_id[c["id"]]["price"]) and row["method"] == by_id[c["id"]]["method"]


async def test_errors_are_typed(server: ServerProcess) -> None:
    bad = {**CONTRACT, "strike": -1.0}
    async with AsyncClient(server.url) as client:
        with pytest.raises(InvalidRequest) as caught:
            await client.price([CONTRACT | {"id": "ok"}, bad])
        err = caught.value
        assert (err.status, err.code) == (422, "invalid")
        assert "contracts[1].strike" in {d["field"] for d in err.details}, err.details
        assert "contracts[1].strike" in str(err)

        with pytest.raises(InvalidRequest) as caught:
            await client.price([CONTRACT], measures=["price", "colour"])
        assert caught.value.code == "invalid"
        assert any(d["field"].startswith("measures") for d in caught.value.details), caught.value.details

        with pytest.raises(NoMarketData) as missing:
            await client.price([BY_REFERENCE], val_datetime=VDT)
        assert (missing.value.status, missing.value.code) == (422, "no_market_data")

        with pytest.raises(InvalidRequest) as caught:
            await client.price([CONTRACT], request_timeout=1e9)  # past max_request_timeout_seconds
        assert caught.value.details[0]["field"] == "header:X-Request-Timeout"

    async with AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=5) as nowhere:
        with pytest.raises(ConnectionFailed) as down:
            await nowhere.price([CONTRACT])
        assert down.value.status is None and down.value.code == "connection_failed"


async def test_arrow_errors_are_typed(server: ServerProcess) -> None:
    """The Arrow route answers errors as JSON bodies: the same typed errors."""
    async with AsyncClient(server.url) as client:
        with pytest.raises(InvalidRequest) as caught:
            await client.price_table(pa.Table.from_pylist([CONTRACT | {"id": "ok"}, {**CONTRACT, "strike": -1.0}]))
        assert (caught.value.status, caught.value.code) == (422, "invalid")
        assert any("strike" in d["field"] for d in caught.value.details), caught.value.details
        with pytest.raises(InvalidRequest) as caught:  # client-side: fixings must be whole
            await client.price_table(pd.DataFrame([{**BOOK[4], "fixings": 2.5}]))
        assert caught.value.details[0]["field"] == "fixings" and caught.value.status is None


async def test_chunks_stay_on_one_snapshot_and_one_model_version() -> None:
    """How chunks are joined (no server: the chunk sender is faked). Once a chunk names
    its snapshot, later chunks ask for exactly it; chunks answered by a model version
    that changed mid-book are priced again; a version that keeps changing is an error."""
    client = AsyncClient("http://127.0.0.1:1")
    market = {"namespace": "default", "val_datetime": "2026-11-26T16:00:00Z", "data_asof": "2026-11-26T16:00:05Z"}
    pinned = {"val_datetime": market["val_datetime"], "data_asof": market["data_asof"]}
    calls: list[tuple[int, dict[str, Any]]] = []
    versions = iter([1, 1, 2, 2, 2])  # the swap lands while chunk 2 is priced

    async def send(i: int, pins: Mapping[str, Any]) -> tuple[dict[str, Any], list[int]]:
        calls.append((i, dict(pins)))
        meta = {
            "namespace": "default",
            "val_datetime": pins.get("val_datetime", "2026-11-26T11:00:00-05:00"),
            "data_asof": pins.get("data_asof"),
            "models": {"gbm": {"version": next(versions), "content_hash": "h"}},
            "market_data": {**market, "hash": "x"} if i == 1 else None,
        }
        return meta, [i]

    meta, parts = await client._chunked(3, send)
    assert calls == [(0, {}), (1, {}), (2, pinned), (0, pinned), (1, pinned)]
    assert parts == [[0], [1], [2]]
    assert meta == {
        "namespace": "default",
        "val_datetime": "2026-11-26T11:00:00-05:00",  # the request's own, from the first answer
        "data_asof": None,
        "models": {"gbm": {"version": 2, "content_hash": "h"}},
        "market_data": {**market, "hash": "x"},
    }

    counter = iter(range(100))

    async def swapping(i: int, pins: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        return {"models": {"gbm": {"version": next(counter), "content_hash": "h"}}, "market_data": None}, i

    with pytest.raises(SpectralMCError) as caught:
        await client._chunked(2, swapping)
    assert caught.value.code == "models_changed"


async def test_chunks_reprice_against_the_newest_answer() -> None:
    """Two hot swaps while a book is priced: chunk 2 answered by v2, chunks 0 and 1 priced
    again and answered by v3. The newest answers (v3) are the served version, so chunk 2
    is priced again (not chunks 0 and 1 once more, for a v2 no longer served) and the
    book ends on v3 within the reprice rounds."""
    client = AsyncClient("http://127.0.0.1:1")
    calls: list[int] = []
    versions = iter([1, 1, 2, 3, 3, 3, 3, 3])

    async def send(i: int, pins: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        calls.append(i)
        return {"models": {"gbm": {"version": next(versions)}}, "market_data": None}, i

    meta, parts = await client._chunked(3, send)
    assert calls == [0, 1, 2, 0, 1, 2]
    assert parts == [0, 1, 2]
    assert meta["models"] == {"gbm": {"version": 3}}


def test_retry_after_is_finite_and_capped() -> None:
    """A Retry-After a stream could wait on forever is not taken: inf, nan and negative
    values are absent, a huge one is cut to MAX_RETRY_AFTER."""
    assert MAX_RETRY_AFTER == 300.0
    cases: dict[str, float | None] = {"3": 3.0, " 0 ": 0.0, "2.5": 2.5, "300": 300.0, "301": 300.0, "1e12": 300.0}
    cases |= dict.fromkeys(["1e400", "inf", "-inf", "Infinity", "nan", "-1", "Wed, 21 Oct 2026 07:28:00 GMT", ""])
    for value, expected in cases.items():
        assert parse_retry_after(value) == expected, value
    assert parse_retry_after(None) is None
    assert error_from_answer(503, b"", {"Retry-After": "inf"}).retry_after is None
    assert error_from_answer(503, b"", {"Retry-After": "86400"}).retry_after == MAX_RETRY_AFTER


def test_error_mapping_from_answers() -> None:
    def body(code: str, details: list[dict[str, Any]] | None = None) -> bytes:
        return json.dumps({"error": {"code": code, "message": "m", "details": details or []}}).encode()

    cases: list[tuple[int, str, type[SpectralMCError]]] = [
        (400, "malformed", InvalidRequest),
        (403, "forbidden", Forbidden),
        (413, "too_large", TooLarge),
        (422, "no_market_data", NoMarketData),
        (503, "overloaded", Overloaded),
        (503, "shutting_down", Unavailable),
        (503, "a_new_reason", Unavailable),
        (504, "deadline_exceeded", DeadlineExceeded),
        (500, "engine_failure", ServerError),
        (502, "http_error", ServerError),
    ]
    for status, code, cls in cases:
        err = error_from_answer(status, body(code), {"Retry-After": "3"})
        assert type(err) is cls, (status, code, err)
        assert (err.status, err.code, err.message, err.retry_after) == (status, code, "m", 3.0)
    assert isinstance(error_from_answer(503, body("overloaded")), Unavailable)
    details = [{"field": "contracts[0].vol", "reason": "must be in [0.001, 5]"}]
    err = error_from_answer(422, body("invalid", details))
    assert type(err) is InvalidRequest and err.details == details and err.retry_after is None
    proxy = error_from_answer(502, b"<html>Bad Gateway</html>", {})
    assert type(proxy) is ServerError and proxy.code == "http_error" and "Bad Gateway" in proxy.message


def test_the_client_casts_every_contract_column() -> None:
    """books.py's own column lists (it does not import the server's, which need torch)
    name every column the server reads, barrier.<key> included."""
    known = books.STRING_COLUMNS | books.FLOAT_COLUMNS | books.INT_COLUMNS | {books.MONITORING}
    assert known == {*CONTRACT_COLUMNS, *BARRIER_COLUMNS}


def test_package_imports_without_pandas_or_torch() -> None:
    assert DEFAULT_CHUNK_SIZE == MAX_CONTRACTS
    code = (
        "import sys; sys.modules['pandas'] = None\n"
        "import spectralmc_server.client as c\n"
        "assert c.Client and c.AsyncClient\n"
        "assert 'torch' not in sys.modules, 'the client pulled in torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


# -- streaming ----------------------------------------------------------------------------


def test_sync_stream_quotes_and_refusals(server: ServerProcess) -> None:
    with Client(server.url) as client:
        with client.stream({"id": "s1", "contracts": [CONTRACT], "measures": ["price", "delta"]}) as stream:
            quote = stream.get(timeout=WAIT)
            assert (quote["type"], quote["id"], quote["seq"], quote["reason"]) == ("quote", "s1", 1, "subscribe")
            assert quote["results"][0]["id"] == "c1" and quote["results"][0]["price"] > 0
            stream.subscribe({"id": "bad", "contracts": [CONTRACT], "measures": ["price", "price"]})
            with pytest.raises(InvalidRequest) as caught:
                stream.get(timeout=WAIT)
            assert caught.value.subscription == "bad" and caught.value.code == "invalid"
            assert stream.subscriptions == ["s1"]
            with pytest.raises(TimeoutError):
                stream.get(timeout=0.2)  # nothing due: s1 has no interval
            # a quote that fails (no snapshot yet) is skipped; the subscription stays
            stream.subscribe({"id": "r1", "contracts": [BY_REFERENCE], "val_datetime": VDT})
            stream.subscribe({"id": "s2", "contracts": [CONTRACT | {"id": "c2"}]})
            quote = stream.get(timeout=WAIT)  # the stream still works after a timeout
            assert (quote["id"], quote["results"][0]["id"]) == ("s2", "c2")
            assert stream.subscriptions == ["s1", "r1", "s2"]
        with client.stream({"id": "r1", "contracts": [BY_REFERENCE], "val_datetime": VDT}, yield_errors=True) as errs:
            error = errs.get(timeout=WAIT)
            assert (error["type"], error["id"], error["code"]) == ("error", "r1", "no_market_data")
        with pytest.raises(StopIteration):
            next(stream)


async def test_stream_survives_server_restart(serve: Serve, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Quotes, the server stopped (close 1001) and a new one started on the same port:
    the stream reconnects with backoff, subscribes again and yields quotes again."""
    port = free_port()
    monkeypatch.setattr(server_util, "free_port", lambda: port)  # start_server takes its port from here
    first = serve()
    assert first.port == port
    quotes: list[tuple[int, dict[str, Any]]] = []  # (reconnects so far, quote)
    async with AsyncClient(first.url) as client:
        stream = client.stream(
            {"id": "s1", "contracts": [CONTRACT], "interval_seconds": 0.2},
            reconnect_initial=0.05,
            reconnect_max=0.5,
            reconnect_for=60.0,
        )

        async def consume() -> None:
            async for quote in stream:
                quotes.append((stream.reconnects, quote))

        async def until(check: Callable[[], bool]) -> None:
            async with asyncio.timeout(WAIT):
                while not check():
                    await asyncio.sleep(0.02)

        reader = asyncio.create_task(consume())
        try:
            await until(lambda: len(quotes) >= 2)
            assert await asyncio.to_thread(first.stop) == 0  # SIGTERM: the server closes the socket with 1001
            await asyncio.sleep(0.5)  # a few reconnects refused while no server listens
            assert stream.reconnects == 0
            second = await asyncio.to_thread(serve)
            assert second.port == port
            await until(lambda: any(n == 1 and q["reason"] == "interval" for n, q in quotes))
        finally:
            await stream.close()
            await asyncio.wait_for(reader, WAIT)  # iteration ends on close
    old = [q for n, q in quotes if n == 0]
    new = [q for n, q in quotes if n == 1]
    assert stream.reconnects == 1
    assert [q["seq"] for q in old] == list(range(1, len(old) + 1))
    assert (new[0]["reason"], new[0]["seq"]) == ("subscribe", 1)  # subscribed again on the new server
    assert [q["seq"] for q in new] == list(range(1, len(new) + 1))
    assert all(q["id"] == "s1" and q["results"][0]["price"] > 0 for q in old + new)
    assert old[0]["results"][0]["price"] == new[0]["results"][0]["price"]  # same model, same bytes


async def test_stream_gives_up_after_reconnect_for(serve: Serve) -> None:
    """No server comes back: ConnectionFailed after ``reconnect_for`` seconds; a stream
    closed while it waits to reconnect ends at once."""
    server = serve()
    async with AsyncClient(server.url) as client:
        gives_up = client.stream({"id": "s1", "contracts": [CONTRACT]}, reconnect_initial=0.05, reconnect_for=1.0)
        closed = client.stream({"id": "s1", "contracts": [CONTRACT]}, reconnect_initial=5.0, reconnect_max=5.0)
        for stream in (gives_up, closed):
            first = await asyncio.wait_for(anext(stream), WAIT)
            assert first["reason"] == "subscribe"
        await asyncio.to_thread(server.stop)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionFailed, match="could not reconnect within 1 s"):
            await asyncio.wait_for(anext(gives_up), WAIT)
        assert 0.5 < asyncio.get_running_loop().time() - t0 < 5.0
        waiting = asyncio.create_task(anext(closed))
        await asyncio.sleep(0.5)  # in its first 2.5-5 s wait
        t0 = asyncio.get_running_loop().time()
        await closed.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, WAIT)
        assert asyncio.get_running_loop().time() - t0 < 1.0


async def test_stream_first_connection_is_not_retried() -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(ConnectionFailed):
            async with client.stream({"id": "s1", "contracts": [CONTRACT]}):
                pass


def test_sync_stream_polled_with_timeouts_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream polled with ``get(timeout)`` while no server listens: each timeout cancels
    the reconnect, but the outage's clock and backoff go on, so ConnectionFailed comes
    once ``reconnect_for`` has passed, after a handful of tries (not one per poll)."""
    with Client(f"http://127.0.0.1:{free_port()}") as client:
        tries = count_connects(monkeypatch, client._async)
        stream = client.stream(
            {"id": "s1", "contracts": [CONTRACT]}, reconnect_initial=0.05, reconnect_max=0.4, reconnect_for=1.0
        )
        dropped(stream._stream)
        timeouts = 0
        t0 = time.monotonic()
        with pytest.raises(ConnectionFailed, match="could not reconnect within 1 s"):
            while time.monotonic() - t0 < 4.0:
                try:
                    stream.get(timeout=0.1)
                except TimeoutError:
                    timeouts += 1
        elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 3.0, elapsed
    assert timeouts >= 5, timeouts
    assert 5 <= len(tries) <= 11, len(tries)  # 0, .05, .15, .35, .75, 1.0 (jitter: up to 9) and a few cut polls
    assert tries[-1] - tries[0] >= 0.99


@pytest.mark.parametrize("poll", [None, 0.15])
async def test_stream_reconnects_until_reconnect_for_has_passed(
    monkeypatch: pytest.MonkeyPatch, poll: float | None
) -> None:
    """Tries at 0, 0.4 and 0.8 s (no jitter), then the wait is cut so the last try comes
    at reconnect_for = 1 s; only then ConnectionFailed. The same when each iteration is
    cut short by ``asyncio.wait_for`` (``poll``): no try is added or skipped."""
    monkeypatch.setattr(random, "uniform", lambda a, b: b)  # no jitter: the upper end of each wait
    async with AsyncClient(f"http://127.0.0.1:{free_port()}") as client:
        tries = count_connects(monkeypatch, client)
        stream = dropped(
            client.stream(
                {"id": "s1", "contracts": [CONTRACT]}, reconnect_initial=0.4, reconnect_max=0.4, reconnect_for=1.0
            )
        )
        t0 = time.monotonic()
        with pytest.raises(ConnectionFailed, match="could not reconnect within 1 s"):
            while time.monotonic() - t0 < 4.0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(anext(stream), poll)
        elapsed = time.monotonic() - t0
    assert 0.99 <= elapsed < 3.0, elapsed
    offsets = [t - tries[0] for t in tries]
    schedule = [0.0, 0.4, 0.8, 1.0]

    def near(x: float, y: float) -> bool:
        return abs(x - y) < 0.15  # slack for a loaded machine

    assert offsets[-1] >= 0.99 and near(offsets[-1], 1.0), offsets
    if poll is None:
        assert len(offsets) == 4 and all(map(near, offsets, schedule)), offsets
    else:  # a poll's timeout may land during a try (refused within a millisecond): that one is tried again
        assert len(offsets) <= 5, offsets
        assert all(any(near(o, e) for o in offsets) for e in schedule), offsets
        assert all(any(near(o, e) for e in schedule) for o in offsets), offsets


async def test_stream_closed_while_connecting_opens_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() while the WebSocket handshake is under way: the socket it yields is closed
    at once, not kept open on a closed stream."""
    client = AsyncClient(f"http://127.0.0.1:{free_port()}")
    entered, release = asyncio.Event(), asyncio.Event()
    sockets: list[FakeSocket] = []

    async def connect(heartbeat: float) -> FakeSocket:
        entered.set()
        await release.wait()
        sockets.append(FakeSocket())
        return sockets[-1]

    monkeypatch.setattr(client, "_ws_connect", connect)
    stream = client.stream({"id": "s1", "contracts": [CONTRACT]})
    connecting = asyncio.create_task(stream.connect())
    await asyncio.wait_for(entered.wait(), WAIT)
    await stream.close()
    release.set()
    await asyncio.wait_for(connecting, WAIT)
    assert len(sockets) == 1 and sockets[0].closed
    assert stream._ws is None
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    await client.close()
