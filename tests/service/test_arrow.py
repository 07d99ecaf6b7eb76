"""Arrow IPC books on POST /v1/price (docs/api.md, "Columnar books and Arrow"): a book sent
as rows, as columns and as an Arrow stream is answered in kind with bit-identical
numbers, error bounds and warnings; a malformed stream (wrong types, unknown or missing
columns, nulls, NaN, truncated, corrupt, compressed, too many rows) is a 4xx JSON error
naming the part, never a 500."""

from __future__ import annotations

import gzip
import random
import struct
from datetime import date
from typing import Any

import orjson
import pyarrow as pa
import pytest
from aiohttp import ClientResponse
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import CONTRACT, Client, MakeClient, assert_error
from test_columns import HESTON, MERTON, columns_of, rows_of_answer

from spectralmc_server.pricing.arrow import (
    ARROW_STREAM,
    REQUEST_METADATA,
    RESPONSE_METADATA,
    answer_of_ipc,
    book_ipc,
)
from spectralmc_server.pricing.schemas import MAX_CONTRACTS

ARROW = {"Content-Type": ARROW_STREAM}
Row = dict[str, Any]

# gbm (vol, params.vol, far outside the model: the closed form), heston, merton, asian
# (a call and a put at a point where the learned delta is withheld: tests/service/
# test_asian_served.py), and
# contracts by reference (gbm, asian) priced from a snapshot.
BOOK: list[Row] = [
    CONTRACT,
    {**CONTRACT, "id": "g2", "right": "put", "strike": 95.0, "rate": 0.03, "dividend": 0.01, "expiry_years": 1.5},
    {"id": "g3", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0, "params": {"vol": 0.3}},
    {**CONTRACT, "id": "g4", "vol": 2.5, "expiry_years": 0.1},
    {**CONTRACT, "id": "h1", "vol": None, "process": "heston", "params": HESTON, "rate": 0.02},
    {**CONTRACT, "id": "m1", "vol": None, "process": "merton", "params": MERTON, "right": "put"},
    {"id": "a1", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0, "process": "asian"}
    | {"rate": 0.03, "dividend": 0.01, "vol": 0.25, "fixings": 12},
    {"id": "a2", "right": "put", "strike": 90.0, "spot": 100.0, "expiry_years": 2.0, "process": "asian"}
    | {"rate": 0.01, "dividend": 0.04, "vol": 0.4, "fixings": 52},
    by_reference("r1"),
    {**by_reference("r2", strike=95.0), "right": "put", "process": "asian", "fixings": 4},
]
REQUEST: Row = {
    "namespace": "default",
    "val_datetime": VDT,
    "data_asof": ASOF,
    "measures": ["price", "delta", "vega", "quantiles"],
    "quantile_levels": [0.05, 0.5, 0.95],
}


def rows() -> list[Row]:
    return [{k: v for k, v in c.items() if v is not None} for c in BOOK]


async def served_client(make_client: MakeClient) -> Client:
    """Every bundled model served, and a snapshot for the contracts by reference."""
    client = await make_client()
    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot())
    assert r.status == 201, await r.text()
    return client


async def post_arrow(client: Client, body: bytes, **headers: str) -> ClientResponse:
    return await client.post("/v1/price", data=body, headers={**ARROW, **headers})


async def arrow_answer(r: ClientResponse) -> tuple[pa.Table, dict[str, Any]]:
    data = await r.read()
    assert r.status == 200, data[:2000]
    assert r.content_type == ARROW_STREAM
    return pa.ipc.open_stream(data).read_all(), answer_of_ipc(data)


def bits(value: Any) -> Any:
    """Floats as their bit patterns (so that equality is bit for bit), recursively."""
    if isinstance(value, float):
        return struct.pack("<d", value).hex()
    if isinstance(value, list):
        return [bits(v) for v in value]
    if isinstance(value, dict):
        return {k: bits(v) for k, v in value.items()}
    return value


def table(columns: dict[str, pa.Array], head: Row | None = None) -> bytes:
    meta = None if head is None else {REQUEST_METADATA: orjson.dumps(head)}
    t = pa.table(columns).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as writer:
        writer.write_table(t)
    out: bytes = sink.getvalue().to_pybytes()
    return out


def simple_columns(n: int = 3) -> dict[str, pa.Array]:
    return {
        "id": pa.array([f"k{i}" for i in range(n)]),
        "right": pa.array(["call"] * n),
        "strike": pa.array([90.0 + i for i in range(n)]),
        "spot": pa.array([100.0] * n),
        "expiry_years": pa.array([0.5] * n),
        "vol": pa.array([0.2] * n),
    }


# -- the same book in three forms ---------------------------------------------------------


async def test_rows_columns_and_arrow_give_bit_identical_answers(make_client: MakeClient) -> None:
    client = await served_client(make_client)
    book = rows()
    r = await client.post("/v1/price", json={**REQUEST, "contracts": book})
    assert r.status == 200, await r.text()
    by_rows = orjson.loads(await r.read())
    r = await client.post("/v1/price", json={**REQUEST, "columns": columns_of(book)})
    assert r.status == 200, await r.text()
    by_cols = orjson.loads(await r.read())
    head = {k: v for k, v in REQUEST.items()}
    t, by_arrow = await arrow_answer(await post_arrow(client, book_ipc(columns_of(book), head)))

    # every form carries the same numbers, bounds, warnings and echo
    assert bits(rows_of_answer(by_cols, REQUEST)) == bits(by_rows["results"])
    assert bits(by_arrow) == bits(by_cols)
    echo = {k: v for k, v in by_rows.items() if k != "results"}
    assert {k: v for k, v in by_cols.items() if k != "columns"} == echo
    assert echo["market_data"] is not None and set(echo["models"]) == {"gbm", "heston", "merton", "asian"}

    # the book exercised what it should: learned and reference answers, a withheld delta
    # with its warning (null value and bound), references by snapshot
    results = {row["id"]: row for row in by_rows["results"]}
    assert {row["model"] for row in results.values()} == {"gbm", "heston", "merton", "asian"}
    assert {row["method"] for row in results.values()} == {"cvnn", "reference"}
    warned = [row for row in results.values() if row.get("warnings")]
    assert warned and all(row["delta"] is None and row["error_bound"]["delta"] is None for row in warned)
    assert {row["id"] for row in warned} <= {"a1", "a2", "r2"}
    cols = by_cols["columns"]
    for row in warned:
        i = cols["id"].index(row["id"])
        assert cols["warnings"][i] == row["warnings"] and cols["delta"][i] is None
    assert all(cols[f"error_bound.quantiles.{q}"][0] is not None for q in ("0.05", "0.5", "0.95"))

    # the Arrow answer's types and metadata
    assert t.schema.field("id").type == pa.string() and t.schema.field("method").type == pa.string()
    assert t.schema.field("warnings").type == pa.list_(pa.string())
    for name in t.column_names:
        if name not in ("id", "model", "method", "warnings"):
            assert t.schema.field(name).type == pa.float64(), name
    meta = orjson.loads((t.schema.metadata or {})[RESPONSE_METADATA.encode()])
    assert meta == {k: echo[k] for k in ("namespace", "val_datetime", "data_asof", "models", "market_data")}


async def test_arrow_accepts_its_type_variants(make_client: MakeClient) -> None:
    """int64 numbers, dictionary, large_utf8 and utf8_view strings, date32 expiries, all-null
    columns of the null type, several record batches: the same answer as plain columns."""
    client = await make_client(models=["gbm", "asian"])
    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot())
    assert r.status == 201, await r.text()
    head = {"val_datetime": VDT, "measures": ["price", "delta"]}
    plain: dict[str, list[Any]] = {
        "id": ["a", "b", "c", "d"],
        "right": ["call", "put", "call", "put"],
        "strike": [100.0, 95.0, 105.0, 100.0],
        "spot": [100.0, 100.0, None, 100.0],
        "expiry_years": [1.0, 0.5, None, 1.0],
        "vol": [0.2, 0.3, None, 0.25],
        "process": ["gbm", "gbm", "gbm", "asian"],
        "fixings": [None, None, None, 12],
        "underlying": [None, None, "SPX", None],
        "expiry": [None, None, "2027-06-18", None],
    }
    _, want = await arrow_answer(await post_arrow(client, book_ipc(plain, head)))
    variant = {
        "id": pa.array(plain["id"], pa.large_string()),
        "right": pa.array(plain["right"]).dictionary_encode(),
        "strike": pa.array([100, 95, 105, 100], pa.int64()),
        "spot": pa.array([100, 100, None, 100], pa.int64()),
        "expiry_years": pa.array(plain["expiry_years"]),
        "vol": pa.array(plain["vol"]),
        "process": pa.array(plain["process"], pa.string_view()),
        "fixings": pa.array(plain["fixings"], pa.int64()),
        "underlying": pa.array(plain["underlying"]).dictionary_encode(),
        "expiry": pa.array([None, None, date(2027, 6, 18), None], pa.date32()),
        "rate": pa.array([None] * 4, pa.null()),
    }
    t = pa.table(variant).replace_schema_metadata({REQUEST_METADATA: orjson.dumps(head)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as writer:
        for batch in t.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    _, got = await arrow_answer(await post_arrow(client, sink.getvalue().to_pybytes()))
    assert bits(got) == bits(want)
    # gzip on the wire, as for JSON
    body = gzip.compress(book_ipc(plain, head))
    _, zipped = await arrow_answer(await post_arrow(client, body, **{"Content-Encoding": "gzip"}))
    assert bits(zipped) == bits(want)


# -- malformed Arrow bodies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"strike": pa.array(["90", "91", "92"])}, "columns.strike", "float64"),
        ({"strike": pa.array([90.0, 91.0, 92.0], pa.float32())}, "columns.strike", "float64"),
        ({"fixings": pa.array([1.0, 2.0, 3.0])}, "columns.fixings", "int64"),
        ({"id": pa.array([1, 2, 3])}, "columns.id", "utf8"),
        ({"expiry": pa.array([1, 2, 3], pa.timestamp("s"))}, "columns.expiry", "date32"),
        ({"params.kappa": pa.array([True, False, True])}, "columns.params.kappa", "float64"),
        ({"colour": pa.array(["red"] * 3)}, "columns.colour", "unknown column"),
        ({"params": pa.array([1.0] * 3)}, "columns.params", "params.<name>"),
    ],
)
async def test_wrong_column_types_and_names_are_422_naming_the_column(
    make_client: MakeClient, change: dict[str, pa.Array], field: str, words: str
) -> None:
    client = await make_client(models=["gbm"])
    err = await assert_error(await post_arrow(client, table({**simple_columns(), **change})), 422, "invalid", (field,))
    assert any(words in d["reason"] for d in err["details"] if d["field"] == field), err


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"strike": pa.array([90.0, None, 92.0])}, "contracts[1].strike", "required"),
        ({"id": pa.array(["k0", "k1", None])}, "contracts[2].id", "required"),
        ({"spot": pa.array([100.0, float("nan"), 100.0])}, "contracts[1].spot", "finite"),
        ({"vol": pa.array([0.2, 0.2, float("inf")])}, "contracts[2].vol", "finite"),
        ({"strike": pa.array([90.0, -1.0, 92.0])}, "contracts[1].strike", "greater than"),
        ({"fixings": pa.array([None, 3, None], pa.int64())}, "contracts[1]", "averaging"),
        ({"id": pa.array(["k0", "k1", "k0"])}, "contracts[2].id", "duplicate"),
        ({"expiry": pa.array([None, "2027-02-30", None])}, "contracts[1].expiry", "day is out of range"),
        # a date32 day past Python's dates (year 9999): the cell is refused, not a 500
        ({"expiry": pa.array([None, 3_000_000, None], pa.date32())}, "contracts[1].expiry", "outside the years"),
    ],
)
async def test_bad_cells_are_422_naming_the_row_and_field(
    make_client: MakeClient, change: dict[str, pa.Array], field: str, words: str
) -> None:
    client = await make_client(models=["gbm"])
    err = await assert_error(await post_arrow(client, table({**simple_columns(), **change})), 422, "invalid", (field,))
    assert err["details"][0]["field"] == field and words in err["details"][0]["reason"], err


async def test_a_missing_required_column_is_named(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    cols = {k: v for k, v in simple_columns().items() if k != "strike"}
    err = await assert_error(await post_arrow(client, table(cols)), 422, "invalid", ("contracts[0].strike",))
    assert "no strike column" in err["details"][0]["reason"], err


async def test_request_metadata_errors(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    cols = simple_columns()
    where = f"schema.metadata.{REQUEST_METADATA}"
    t = pa.table(cols).replace_schema_metadata({REQUEST_METADATA: b"{not json"})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as writer:
        writer.write_table(t)
    await assert_error(await post_arrow(client, sink.getvalue().to_pybytes()), 400, "malformed", (where,))
    await assert_error(await post_arrow(client, table(cols, [1])), 422, "invalid", (where,))  # type: ignore[arg-type]
    r = await post_arrow(client, table(cols, {"contracts": []}))
    await assert_error(r, 422, "invalid", (f"{where}.contracts",))
    r = await post_arrow(client, table(cols, {"namespace": "no spaces", "measures": ["charm"]}))
    await assert_error(r, 422, "invalid", ("namespace", "measures[0]"))
    r = await post_arrow(client, table(cols, {"measures": ["price", "gamma"], "namespace": "n"}))
    _, answer = await arrow_answer(r)
    assert answer["namespace"] == "n" and list(answer["columns"])[3:5] == ["price", "gamma"]


async def test_unreadable_streams_are_400(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    good = table(simple_columns())
    for body in (good[:7], good[: len(good) // 2], good[:-20], b"\x00" * 64, b"garbage" * 20, b'{"columns": {}}'):
        await assert_error(await post_arrow(client, body), 400, "malformed", ("body",))
    await assert_error(await post_arrow(client, b""), 400, "malformed", ("body",))
    # a record batch before the schema
    await assert_error(await post_arrow(client, good[good.index(b"\xff\xff\xff\xff", 8) :]), 400, "malformed")


async def test_random_corruption_is_never_a_server_error(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    seeds = [table(simple_columns()), table({**simple_columns(), "right": pa.array(["call"] * 3).dictionary_encode()})]
    rng = random.Random(5)
    statuses: dict[int, int] = {}
    for _ in range(150):
        body = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(body))
            if rng.random() < 0.7:
                body[pos] = rng.randrange(256)
            else:
                body[pos : pos + 4] = rng.randrange(1 << 32).to_bytes(4, "little")
        r = await post_arrow(client, bytes(body))
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status != 200:
            await assert_error(
                r,
                r.status,
                {400: "malformed", 413: "too_large", 415: "unsupported_media_type"}.get(r.status, "invalid"),
            )
    assert set(statuses) <= {200, 400, 413, 415, 422}, statuses
    assert statuses.get(400, 0) > 50, statuses


async def test_compressed_buffers_are_415_and_too_many_rows_413(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    t = pa.table(simple_columns())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(t)
    r = await post_arrow(client, sink.getvalue().to_pybytes())
    err = await assert_error(r, 415, "unsupported_media_type", ("body",))
    assert "Content-Encoding" in err["details"][0]["reason"], err
    n = MAX_CONTRACTS + 1
    big = table({"id": pa.array([f"k{i}" for i in range(n)]), "strike": pa.array([1.0] * n)})
    await assert_error(await post_arrow(client, big), 413, "too_large", ("contracts",))
    # counted over every record batch of the stream
    half = pa.table({"strike": pa.array([1.0] * (n // 2 + 1))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, half.schema) as writer:
        writer.write_table(half)
        writer.write_table(half)
    await assert_error(await post_arrow(client, sink.getvalue().to_pybytes()), 413, "too_large", ("contracts",))


async def test_content_types_other_than_json_and_arrow_stay_415(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    good = table(simple_columns())
    for ctype in ("text/csv", "application/vnd.apache.arrow.file", "application/octet-stream"):
        r = await client.post("/v1/price", data=good, headers={"Content-Type": ctype})
        err = await assert_error(r, 415, "unsupported_media_type", ("header:Content-Type",))
        assert ARROW_STREAM in err["message"], err
    # other routes still take JSON only
    r = await client.post("/v1/calibrate", data=good, headers=ARROW)
    err = await assert_error(r, 415, "unsupported_media_type", ("header:Content-Type",))
    assert ARROW_STREAM not in err["message"], err
