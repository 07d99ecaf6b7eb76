"""Barrier contracts as columns (docs/api.md, "Columnar books and Arrow"): the columns
barrier.type, barrier.level, barrier.monitoring and barrier.rebate in columnar JSON and
Arrow books. The same barrier book as rows, columns and Arrow is answered with
bit-identical numbers (survival among the measures); every barrier error names
``contracts[i].barrier.<field>`` with the row path's reason, never a 500; an Arrow barrier
column of the wrong type is a 422 naming the column; ``spectralmc price --format
columns|arrow`` prices a barrier book as rows do."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import orjson
import pyarrow as pa
import pytest
from pydantic import ValidationError
from server_util import MakeClient, assert_error
from test_arrow import bits, post_arrow, table
from test_columns import rows_of_answer

from spectralmc_server.engine import barrier_pricer
from spectralmc_server.pricing.arrow import REQUEST_METADATA, answer_of_ipc, book_ipc, read_book
from spectralmc_server.pricing.book import Book, book_of
from spectralmc_server.pricing.cells import BARRIER_COLUMNS, BARRIER_PREFIX, PARAMS_PREFIX
from spectralmc_server.pricing.columns import request_from_columns
from spectralmc_server.pricing.contract_rules import row_verdicts
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import PriceRequest, format_validation_error
from spectralmc_server.pricing.valuation import Valuer, dumps
from spectralmc_server.service.openapi import build_openapi

Row = dict[str, Any]
Columns = dict[str, list[Any]]
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}
MERTON = {"sigma": 0.2, "lambda": 0.5, "mu_j": -0.1, "sigma_j": 0.15}
GBM: Row = {"right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 0.75, "rate": 0.03, "vol": 0.25}
HESTON_ROW: Row = {**{k: v for k, v in GBM.items() if k != "vol"}, "process": "heston", "params": HESTON}
# Monte Carlo contracts (heston, monitoring dates) take seconds on a loaded machine
MC_DEADLINE = 90.0


def barrier_row(cid: str, kind: str, level: float, base: Row = GBM, **more: Any) -> Row:
    return {**base, "id": cid, "barrier": {"type": kind, "level": level, **more}}


# vanilla gbm and heston; the four barrier types, continuous and on dates, with and
# without a rebate, under gbm (closed form, and Monte Carlo on dates) and heston (Monte Carlo)
BOOK: list[Row] = [
    {**GBM, "id": "v-gbm"},
    barrier_row("do", "down-and-out", 90.0, rebate=2.5),
    barrier_row("uo", "up-and-out", 120.0, {**GBM, "right": "put"}, monitoring=4),
    {**HESTON_ROW, "id": "v-heston", "right": "put"},
    barrier_row("di", "down-and-in", 85.0, monitoring="continuous"),
    barrier_row("ui", "up-and-in", 115.0, rebate=1.0, monitoring=3),
    barrier_row("h-do", "down-and-out", 80.0, HESTON_ROW, rebate=0.5),
    barrier_row("h-ui", "up-and-in", 125.0, HESTON_ROW, monitoring=2),
]
MEASURES = ["price", "delta", "survival"]


def columns_of(rows: list[Row]) -> Columns:
    """Rows as columns: params as params.<name>, a barrier as barrier.<key>, None where absent."""
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key in ("params", "barrier") and isinstance(value, dict):
                prefix = PARAMS_PREFIX if key == "params" else BARRIER_PREFIX
                keys = [prefix + k for k in value]
            else:
                keys = [key]
            names += [k for k in keys if k not in names]
    cols: Columns = {}
    for name in names:
        prefix, _, key = name.partition(".")
        if key and prefix in ("params", "barrier"):
            cols[name] = [(row.get(prefix) or {}).get(key) for row in rows]
        else:
            cols[name] = [row.get(name) for row in rows]
    return cols


def row_errors(rows: list[Row], head: Row | None = None) -> list[dict[str, Any]]:
    """The row path's details for ``rows`` ([] when valid)."""
    try:
        PriceRequest.model_validate({**(head or {}), "contracts": rows})
    except ValidationError as exc:
        return format_validation_error(exc)
    return []


def column_errors(cols: Mapping[str, Any], head: Row | None = None) -> list[dict[str, Any]]:
    try:
        request_from_columns(head or {}, cols)
    except RequestRefusedError as exc:
        return exc.details
    return []


# -- rows, columns and Arrow: one book -------------------------------------------------------


def test_a_barrier_book_as_columns_is_the_row_request() -> None:
    cols = columns_of(BOOK)
    assert {n for n in cols if n.startswith(BARRIER_PREFIX)} == set(BARRIER_COLUMNS)
    want = PriceRequest.model_validate({"measures": MEASURES, "contracts": BOOK})
    for got in (
        request_from_columns({"measures": MEASURES}, cols),
        request_from_columns(*read_book(book_ipc(cols, {"measures": MEASURES}))),
    ):
        assert got == want
        book, rows = book_of(got), Book.of(want.contracts)
        assert book.barrier == rows.barrier and book.barrier is not None
        assert [b is None for b in book.barrier] == [c.get("barrier") is None for c in BOOK]
        for b in book.barrier:  # the row schema's values, types included
            if b is not None:
                assert type(b.level) is float and type(b.rebate) is float, b
                assert b.monitoring == "continuous" or type(b.monitoring) is int, b
    # an all-null barrier column set (or none at all) is a book without barriers
    vanilla = [r for r in BOOK if "barrier" not in r]
    nulls = {**columns_of(vanilla), **{n: [None] * len(vanilla) for n in BARRIER_COLUMNS}}
    assert book_of(request_from_columns({}, nulls)).barrier is None
    assert book_of(request_from_columns({}, columns_of(vanilla))).barrier is None


@pytest.mark.slow
async def test_rows_columns_and_arrow_give_bit_identical_barrier_answers(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine runs on a thread of this process: its barrier Monte Carlo at 2^13 paths
    # (2^16 served). Bit-identity across the forms holds at any path count, and the MC
    # contracts are most of this test's time (the served pricer's Monte Carlo is checked
    # in tests/engine/test_barrier_pricer.py).
    monkeypatch.setattr(barrier_pricer, "MC_PATHS", 1 << 13)
    client = await make_client(models=["gbm", "heston"], request_timeout_seconds=MC_DEADLINE)
    head = {"measures": MEASURES}
    r = await client.post("/v1/price", json={**head, "contracts": BOOK})
    assert r.status == 200, await r.text()
    by_rows = orjson.loads(await r.read())
    r = await client.post("/v1/price", json={**head, "columns": columns_of(BOOK)})
    assert r.status == 200, await r.text()
    by_cols = orjson.loads(await r.read())
    r = await post_arrow(client, book_ipc(columns_of(BOOK), head))
    data = await r.read()
    assert r.status == 200, data[:2000]
    by_arrow = answer_of_ipc(data)
    t = pa.ipc.open_stream(data).read_all()

    # the numbers, bounds, ids, models, methods and warnings bit for bit
    assert bits(rows_of_answer(by_cols, head)) == bits(by_rows["results"])
    assert bits(by_arrow) == bits(by_cols)
    assert {k: v for k, v in by_cols.items() if k != "columns"} == {k: v for k, v in by_rows.items() if k != "results"}
    cols = by_cols["columns"]
    assert list(cols) == ["id", "model", "method", *MEASURES, *(f"error_bound.{m}" for m in MEASURES), "warnings"]
    assert t.schema.field("survival").type == pa.float64()
    # the book exercised what it should: vanillas survive with 1, barriers below it, by
    # the closed form (gbm, continuous) and by Monte Carlo (dates, heston)
    by_id = {row["id"]: row for row in by_rows["results"]}
    assert cols["id"] == [c["id"] for c in BOOK]
    for c in BOOK:
        row = by_id[c["id"]]
        if "barrier" in c:
            assert 0 < row["survival"] < 1, row
        else:
            assert row["survival"] == 1.0 and row["error_bound"]["survival"] == 0.0, row
    assert {by_id[k]["method"] for k in ("do", "di")} == {"analytic"}
    assert {by_id[k]["method"] for k in ("uo", "ui", "h-do", "h-ui")} == {"reference"}
    assert {row["model"] for row in by_id.values()} == {"gbm", "heston"}

    # Arrow's other forms of the barrier columns give the same answer: monitoring as int64
    # (a cell of a "continuous" book has no int form: this book's dated rows only) and
    # dictionary strings, level as int64; the gbm ones (heston's Monte Carlo, seconds a
    # contract, adds nothing to how the columns are read)
    dated = [
        c
        for c in BOOK
        if "barrier" in c and c["barrier"].get("monitoring", "continuous") != "continuous" and "process" not in c
    ]
    assert len(dated) == 2
    plain = columns_of(dated)
    r = await post_arrow(client, book_ipc(plain, head))
    want = answer_of_ipc(await r.read())
    variant = {name: pa.array(cells) for name, cells in plain.items() if not name.startswith(BARRIER_PREFIX)}
    variant["barrier.type"] = pa.array(plain["barrier.type"]).dictionary_encode()
    variant["barrier.level"] = pa.array([int(v) for v in plain["barrier.level"]], pa.int64())
    variant["barrier.monitoring"] = pa.array(plain["barrier.monitoring"], pa.int64())
    variant["barrier.rebate"] = pa.array(plain["barrier.rebate"], pa.float64())
    r = await post_arrow(client, table(variant, head))
    got = answer_of_ipc(await r.read())
    assert r.status == 200
    assert bits(got) == bits(want)
    assert bits(want["columns"]["price"]) == bits([by_id[c["id"]]["price"] for c in dated])


def test_the_columnar_answer_names_the_rows_method() -> None:
    """The method column is the row answer's method, row by row: a closed-form barrier is
    ``analytic`` as columns too, whatever form the request came in."""
    rows = [{**GBM, "id": "v"}, barrier_row("do", "down-and-out", 90.0, rebate=2.5)]
    valuer = Valuer({})
    # a survival-only vanilla is exact (analytic) too
    for measures, methods in ((["price", "survival"], ["reference", "analytic"]), (["survival"], ["analytic"] * 2)):
        head = {"measures": measures}
        request = PriceRequest.model_validate({**head, "contracts": rows})
        by_rows = valuer.value_many([request])[0]["results"]
        assert [r["method"] for r in by_rows] == methods
        # a columnar request, and the row request answered as columns (in one batch with the rows)
        by_cols, row_as_cols, again = valuer.value_many(
            [request_from_columns(head, columns_of(rows)), request, request], [True, True, False]
        )
        assert by_cols["columns"]["method"] == methods
        assert bits(rows_of_answer(by_cols, head)) == bits(by_rows)
        assert dumps(row_as_cols) == dumps(by_cols)
        assert bits(again["results"]) == bits(by_rows)


# -- every barrier error is the row path's -----------------------------------------------------


def _bad(**b: Any) -> Row:
    """A down-and-out on GBM with ``b`` changed (a value None: the key left out)."""
    barrier = {k: v for k, v in {"type": "down-and-out", "level": 90.0, **b}.items() if v is not None}
    return {**GBM, "id": "x", "barrier": barrier}


# (case, the contract as a row, the field named first, words of its reason, the forms it can
# be sent in over HTTP: "json" (no NaN in JSON), "arrow" (one Arrow type per column; Arrow's
# text "12" is 12 dates, valid))
INVALID: list[tuple[str, Row, str, str, str]] = [
    ("type sideways", _bad(type="sideways"), "barrier.type", "down-and-out", "json arrow"),
    ("type number", _bad(type=5), "barrier.type", "down-and-out", "json"),
    ("level 0", _bad(level=0.0), "barrier.level", "greater than", "json arrow"),
    ("level negative", _bad(level=-90.0), "barrier.level", "greater than", "json arrow"),
    ("level null", _bad(level=None), "barrier.level", "required", "json arrow"),
    ("level string", _bad(level="90"), "barrier.level", "number", "json"),
    ("level nan", _bad(level=float("nan")), "barrier.level", "finite", "arrow"),
    ("monitoring 0", _bad(monitoring=0), "barrier.monitoring", "continuous", "json arrow"),
    ("monitoring 261", _bad(monitoring=261), "barrier.monitoring", "260", "json arrow"),
    ("monitoring daily", _bad(monitoring="daily"), "barrier.monitoring", "continuous", "json arrow"),
    ("monitoring 2.5", _bad(monitoring=2.5), "barrier.monitoring", "continuous", "json"),
    ("monitoring true", _bad(monitoring=True), "barrier.monitoring", "continuous", "json"),
    ("monitoring '12'", _bad(monitoring="12"), "barrier.monitoring", "continuous", "json"),  # JSON: text is text
    ("rebate negative", _bad(rebate=-1.0), "barrier.rebate", "greater than", "json arrow"),
    ("rebate string", _bad(rebate="1"), "barrier.rebate", "number", "json"),
    ("breached down", _bad(level=100.0), "barrier.level", "breached", "json arrow"),
    ("breached up", _bad(type="up-and-out", level=95.0), "barrier.level", "breached", "json arrow"),
    ("merton", {**_bad(), "vol": None, "process": "merton", "params": MERTON}, "barrier", "merton", "json arrow"),
    ("asian", {**_bad(), "process": "asian", "fixings": 12}, "barrier", "asian", "json arrow"),
    ("and a bad strike", {**_bad(rebate=-1.0), "strike": -5.0}, "strike", "greater than", "json arrow"),
]
AT = 3  # the culprit's index in the book


def book_with(culprit: Row) -> list[Row]:
    """A book whose contract AT is ``culprit``, the others valid (a barrier among them)."""
    return [
        {**GBM, "id": "a"},
        barrier_row("b", "up-and-out", 130.0, monitoring=4),
        {**HESTON_ROW, "id": "c"},
        {**culprit, "id": "x"},
        barrier_row("d", "down-and-in", 70.0, HESTON_ROW),
    ]


def _strip_null(rows: list[Row]) -> list[Row]:
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


@pytest.mark.parametrize(("culprit", "field", "words"), [c[1:4] for c in INVALID], ids=[c[0] for c in INVALID])
def test_barrier_errors_are_the_row_paths(culprit: Row, field: str, words: str) -> None:
    rows = _strip_null(book_with(culprit))
    want = row_errors(rows)
    got = column_errors(columns_of(rows))
    assert got == want, (got, want)
    assert got[0]["field"] == f"contracts[{AT}].{field}", got
    assert words in got[0]["reason"], got
    assert all(d["field"].startswith(f"contracts[{AT}]") for d in got), got
    # row_verdicts never calls a barrier row valid by itself
    bad, border = row_verdicts(columns_of(rows), len(rows))
    assert bool(bad[AT] or border[AT])


def test_a_missing_level_column_says_so() -> None:
    rows = [{**GBM, "id": "a"}, {**GBM, "id": "b", "barrier": {"type": "down-and-out"}}]
    assert column_errors(columns_of(rows)) == [
        {"field": "contracts[1].barrier.level", "reason": "Field required (the book has no barrier.level column)"}
    ]
    assert row_errors(rows) == [{"field": "contracts[1].barrier.level", "reason": "Field required"}]


def test_barrier_cells_without_a_type_name_each_cell() -> None:
    rows = [{**GBM, "id": "a"}, barrier_row("b", "down-and-out", 90.0), {**GBM, "id": "c"}, {**GBM, "id": "d"}]
    cols = columns_of(rows)
    cols["barrier.level"][AT] = 80.0
    cols["barrier.rebate"] = [None, None, None, 1.5]
    details = column_errors(cols)
    assert [d["field"] for d in details] == [f"contracts[{AT}].barrier.level", f"contracts[{AT}].barrier.rebate"]
    assert all("without a barrier (barrier.type is null)" in d["reason"] for d in details), details
    assert "(got 80.0)" in details[0]["reason"], details
    # the row's own errors first, then the stray cells
    cols["strike"][AT] = -1.0
    details = column_errors(cols)
    assert [d["field"] for d in details] == [
        f"contracts[{AT}].strike",
        f"contracts[{AT}].barrier.level",
        f"contracts[{AT}].barrier.rebate",
    ]
    bad, border = row_verdicts(cols, len(rows))
    assert bad[AT] and not bad[0] and not bad[2] and border[1]


def test_unknown_barrier_columns_are_named() -> None:
    cols = columns_of(book_with(_bad()))
    for name in ("barrier", "barrier.colour", "barrier."):
        details = column_errors({**cols, name: [None] * 5})
        assert details[0]["field"] == f"columns.{name}", details
        assert "barrier.type, barrier.level, barrier.monitoring, barrier.rebate" in details[0]["reason"], details


def _random_barrier(rng: random.Random) -> Row:
    """A valid barrier (level on the right side of spot 100), or now and then one with a
    bad value; the optional keys given or left out."""
    kind = rng.choice(["down-and-out", "up-and-out", "down-and-in", "up-and-in"])
    b: Row = {"type": kind, "level": rng.choice([50.0, 80, 99.5]) if kind.startswith("down") else 130.0}
    if rng.random() < 0.5:
        b["monitoring"] = rng.choice(["continuous", 1, 12, 260])
    if rng.random() < 0.5:
        b["rebate"] = rng.choice([0.0, 1.5, 0, 3])
    if rng.random() < 0.4:
        key = rng.choice(["type", "level", "level", "monitoring", "rebate"])
        b[key] = rng.choice(
            {
                "type": ["sideways", 3, "Down-and-out"],
                "level": [100.0, 101.0, 99.0, 0.0, -1.0, 1e10, "90", True, float("inf")],
                "monitoring": [261, 0, -2, 2.0, "12", "weekly", False],
                "rebate": [-0.1, 2e9, "1", float("nan")],
            }[key]
        )
    return b


@pytest.mark.parametrize("seed", range(3))
def test_random_barrier_books_give_the_row_paths_answer(seed: int) -> None:
    """Random books with barriers, valid and not: the columnar request equals the row
    request, or both refuse with the same details (the absent-column note aside)."""
    rng = random.Random(seed)
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(150):
        rows: list[Row] = []
        for i in range(rng.randint(1, 6)):
            base = rng.choice([GBM, GBM, GBM, HESTON_ROW, {**GBM, "vol": None, "process": "merton", "params": MERTON}])
            row = _strip_null([{**base, "id": f"k{i}", "spot": 100.0 if rng.random() < 0.95 else -1.0}])[0]
            if rng.random() < 0.6:
                row["barrier"] = _random_barrier(rng)
            rows.append(row)
        want = row_errors(rows, {"measures": ["price", "survival"]})
        cols = columns_of(rows)
        if not want:
            got = request_from_columns({"measures": ["price", "survival"]}, cols)
            assert got == PriceRequest.model_validate({"measures": ["price", "survival"], "contracts": rows})
            assert book_of(got).barrier == Book.of(got.contracts).barrier
            outcomes["accepted"] += 1
            continue
        got_details = [
            {**d, "reason": re.sub(r" \(the book has no [a-z_.]+ column\)$", "", d["reason"])}
            for d in column_errors(cols, {"measures": ["price", "survival"]})
        ]
        assert got_details == want, (rows, got_details, want)
        outcomes["refused"] += 1
    assert outcomes["accepted"] >= 20 and outcomes["refused"] >= 20, outcomes


async def test_barrier_errors_over_http_are_422_as_rows(make_client: MakeClient) -> None:
    """Every case through POST /v1/price as rows, JSON columns and (where Arrow can say
    it) Arrow: a 422 with the row answer's details, never a 500."""
    client = await make_client(models=["gbm", "heston"])
    for name, culprit, field, _words, forms in INVALID:
        rows = _strip_null(book_with(culprit))
        want = row_errors(rows)
        cols = columns_of(rows)
        if "json" in forms:
            r = await client.post("/v1/price", json={"contracts": rows})
            assert (await assert_error(r, 422, "invalid"))["details"] == want, name
            r = await client.post("/v1/price", json={"columns": cols})
            assert (await assert_error(r, 422, "invalid", (f"contracts[{AT}].{field}",)))["details"] == want, name
        if "arrow" in forms:
            r = await post_arrow(client, book_ipc(cols))
            assert (await assert_error(r, 422, "invalid", (f"contracts[{AT}].{field}",)))["details"] == want, name
    # Arrow's monitoring as text: "0" is the integer 0, refused as the row's 0 is
    rows = _strip_null(book_with(_bad(monitoring=0)))
    want = row_errors(rows)
    cols = columns_of(rows)
    arrow = {n: pa.array(c) for n, c in cols.items() if n != "barrier.monitoring"}
    arrow["barrier.monitoring"] = pa.array([None if c is None else str(c) for c in cols["barrier.monitoring"]])
    r = await post_arrow(client, table(arrow))
    assert (await assert_error(r, 422, "invalid"))["details"] == want
    assert "(got 0)" in want[0]["reason"]
    # cells without a type, over HTTP
    cols = columns_of(_strip_null(book_with(_bad())))
    cols["barrier.type"][AT] = None
    for r in (await client.post("/v1/price", json={"columns": cols}), await post_arrow(client, book_ipc(cols))):
        err = await assert_error(r, 422, "invalid", (f"contracts[{AT}].barrier.level",))
        assert "barrier.type is null" in err["details"][0]["reason"], err
    assert (await client.get("/healthz")).status == 200


# -- Arrow types ----------------------------------------------------------------------------


def _arrow_book() -> dict[str, pa.Array]:
    rows = [{**GBM, "id": "a"}, barrier_row("b", "down-and-out", 90.0, monitoring=12, rebate=1.0)]
    cols = columns_of(rows)
    out = {n: pa.array(c) for n, c in cols.items() if not n.startswith(BARRIER_PREFIX)}
    out["barrier.type"] = pa.array(cols["barrier.type"])
    out["barrier.level"] = pa.array(cols["barrier.level"], pa.float64())
    out["barrier.monitoring"] = pa.array([None, "12"])
    out["barrier.rebate"] = pa.array(cols["barrier.rebate"], pa.float64())
    return out


@pytest.mark.parametrize(
    ("name", "column", "words"),
    [
        ("barrier.monitoring", pa.array([None, 12.0]), "int64"),
        ("barrier.monitoring", pa.array([None, 12], pa.int32()), "int64"),
        ("barrier.monitoring", pa.array([None, True]), "utf8"),
        ("barrier.level", pa.array([None, True]), "float64"),
        ("barrier.level", pa.array([None, "90"]), "float64"),
        ("barrier.level", pa.array([None, 90.0], pa.float32()), "float64"),
        ("barrier.rebate", pa.array([None, True]), "float64"),
        ("barrier.type", pa.array([None, 1]), "utf8"),
        ("barrier", pa.array([None, {"type": "down-and-out", "level": 90.0}]), "barrier.type, barrier.level"),
        ("barrier.colour", pa.array([None, "red"]), "unknown column"),
    ],
)
async def test_wrong_typed_arrow_barrier_columns_are_422_naming_the_column(
    make_client: MakeClient, name: str, column: pa.Array, words: str
) -> None:
    client = await make_client(models=["gbm"])
    ok = await post_arrow(client, table(_arrow_book()))
    assert ok.status == 200, await ok.text()
    r = await post_arrow(client, table({**_arrow_book(), name: column}))
    err = await assert_error(r, 422, "invalid", (f"columns.{name}",))
    assert [d["field"] for d in err["details"]] == [f"columns.{name}"], err
    assert words in err["details"][0]["reason"], err


def test_arrow_monitoring_text_is_continuous_or_a_whole_number() -> None:
    base = _arrow_book()
    cases: list[tuple[str, Any]] = [
        ("12", 12),
        ("007", 7),
        ("continuous", "continuous"),
        ("-3", -3),  # the row's -3: refused as such
        ("12.0", "12.0"),  # not a whole number in decimal: the text itself, refused
        (" 12", " 12"),
        ("+12", "+12"),
        ("1" * 40, "1" * 40),
    ]
    for cell, want in cases:
        head, cols = read_book(table({**base, "barrier.monitoring": pa.array([None, cell])}))
        assert cols["barrier.monitoring"] == [None, want], cell
        assert type(cols["barrier.monitoring"][1]) is type(want), cell
        assert head == {}
        details = column_errors(cols)
        if want in ("continuous", 12, 7):
            assert details == [], details
        else:
            assert [d["field"] for d in details] == ["contracts[1].barrier.monitoring"], details
            assert f"(got {want!r})" in details[0]["reason"], details
    # a dictionary of strings too, and the request metadata beside it
    data = table({**base, "barrier.monitoring": pa.array([None, "12"]).dictionary_encode()}, {"measures": ["price"]})
    head, cols = read_book(data)
    assert cols["barrier.monitoring"] == [None, 12]
    assert head == {"measures": ["price"]}
    assert REQUEST_METADATA.encode() in pa.ipc.open_stream(data).schema.metadata


def test_book_ipc_writes_monitoring_as_one_arrow_type() -> None:
    both: Columns = {"id": ["a", "b", "c"], "barrier.monitoring": ["continuous", 12, None]}
    ints: Columns = {"id": ["a", "b", "c"], "barrier.monitoring": [4, None, 12]}
    cases: list[tuple[Columns, pa.DataType, list[Any]]] = [
        (both, pa.string(), ["continuous", "12", None]),
        (ints, pa.int64(), [4, None, 12]),
    ]
    for cols, t, cells in cases:
        written = pa.ipc.open_stream(book_ipc(cols)).read_all()
        assert written.schema.field("barrier.monitoring").type == t
        assert written.column("barrier.monitoring").to_pylist() == cells
        assert read_book(book_ipc(cols))[1]["barrier.monitoring"] == cols["barrier.monitoring"]
    written = pa.ipc.open_stream(book_ipc({"barrier.type": ["up-and-in"], "barrier.level": [90]})).read_all()
    assert written.schema.field("barrier.type").type == pa.string()
    assert written.schema.field("barrier.level").type == pa.float64()


# -- OpenAPI ---------------------------------------------------------------------------------


def test_openapi_describes_the_barrier_columns() -> None:
    columns = build_openapi()["components"]["schemas"]["ColumnarPriceRequest"]["properties"]["columns"]
    assert columns["additionalProperties"] is False
    props = columns["properties"]
    assert {name: [o.get("type") for o in props[name]["items"]["anyOf"]] for name in BARRIER_COLUMNS} == {
        "barrier.type": ["string", "null"],
        "barrier.level": ["number", "null"],
        "barrier.monitoring": ["string", "integer", "null"],
        "barrier.rebate": ["number", "null"],
    }
    monitoring = props["barrier.monitoring"]["items"]["anyOf"]
    assert monitoring[0]["const"] == "continuous" and (monitoring[1]["minimum"], monitoring[1]["maximum"]) == (1, 260)
    kinds = set(props["barrier.type"]["items"]["anyOf"][0]["enum"])
    assert kinds == {"down-and-out", "up-and-out", "down-and-in", "up-and-in"}
    # this file's book names no column the schema leaves out
    assert {n for n in columns_of(BOOK) if not n.startswith(PARAMS_PREFIX)} <= set(props)


# -- the CLI ---------------------------------------------------------------------------------


def cli(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "SPECTRALMC_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", "price", "--model", "gbm", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_cli_prices_a_barrier_book_in_every_form() -> None:
    book = [c for c in BOOK if c.get("process", "gbm") == "gbm"]  # --model gbm: the gbm contracts
    head = {"measures": MEASURES}
    rows = cli(stdin=orjson.dumps({**head, "contracts": book}))
    assert rows.returncode == 0, rows.stderr
    by_rows = orjson.loads(rows.stdout)
    by_columns = cli("--format", "columns", stdin=orjson.dumps({**head, "columns": columns_of(book)}))
    assert by_columns.returncode == 0, by_columns.stderr
    columnar = orjson.loads(by_columns.stdout)
    by_arrow = cli("--format", "arrow", stdin=book_ipc(columns_of(book), head))
    assert by_arrow.returncode == 0, by_arrow.stderr
    assert bits(answer_of_ipc(by_arrow.stdout)) == bits(columnar)
    assert bits(rows_of_answer(columnar, head)) == bits(by_rows["results"])
    survival = columnar["columns"]["survival"]
    assert survival[0] == 1.0 and all(0 < s < 1 for s in survival[1:]), survival
    # a barrier error is one line naming the cell, as for rows
    cols = columns_of(book)
    cols["barrier.level"][1] = -90.0
    bad = cli("--format", "arrow", stdin=book_ipc(cols, head))
    assert bad.returncode == 2 and bad.stdout == b"", bad
    assert "contracts[1].barrier.level" in bad.stderr.decode() and "Traceback" not in bad.stderr.decode()
