"""``spectralmc price --format json|columns|arrow`` (docs/api.md, "Columnar books and
Arrow"): a book read as rows, as columns or as an Arrow IPC stream is answered in the
same form with the same numbers; input that is not of the format is one line on stderr
and exit code 2, never a traceback."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import Any

import orjson
import pyarrow as pa
import pytest

from spectralmc_server.pricing.arrow import answer_of_ipc, book_ipc
from spectralmc_server.pricing.schemas import MAX_CONTRACTS

HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}
BOOK: list[dict[str, Any]] = [
    {"id": "g1", "right": "call", "strike": 105.0, "spot": 100.0, "expiry_years": 0.5, "vol": 0.25},
    {"id": "g2", "right": "put", "strike": 95.0, "spot": 100.0, "expiry_years": 1.5, "rate": 0.03, "vol": 0.2},
    {"id": "h1", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0, "process": "heston"}
    | {"params": HESTON},
    {"id": "a1", "right": "put", "strike": 90.0, "spot": 100.0, "expiry_years": 2.0, "process": "asian"}
    | {"rate": 0.01, "dividend": 0.04, "vol": 0.4, "fixings": 52},
]
HEAD: dict[str, Any] = {"measures": ["price", "delta", "quantiles"], "quantile_levels": [0.05, 0.5]}
COLUMNS: dict[str, list[Any]] = {
    "id": ["g1", "g2", "h1", "a1"],
    "right": ["call", "put", "call", "put"],
    "strike": [105.0, 95.0, 100.0, 90.0],
    "spot": [100.0] * 4,
    "expiry_years": [0.5, 1.5, 1.0, 2.0],
    "rate": [None, 0.03, None, 0.01],
    "dividend": [None, None, None, 0.04],
    "process": [None, None, "heston", "asian"],
    "vol": [0.25, 0.2, None, 0.4],
    "fixings": [None, None, None, 52],
    **{f"params.{k}": [None, None, v, None] for k, v in HESTON.items()},
}


def run(*args: str, stdin: bytes, hash_seed: int = 0) -> subprocess.CompletedProcess[bytes]:
    """``spectralmc price ARGS`` with ``stdin``; ``hash_seed`` sets PYTHONHASHSEED (runs
    with different seeds must still give the same bytes: nothing may follow set order)."""
    env = {k: v for k, v in os.environ.items() if k != "SPECTRALMC_DEBUG"}
    env["PYTHONHASHSEED"] = str(hash_seed)
    return subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", "price", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )


def usage_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The bad-input convention (tests/test_cli.py): exit 2, nothing on stdout, one line
    on stderr, no traceback; the message."""
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[:500], err)
    assert proc.stdout == b""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err.strip()


def bits(value: Any) -> Any:
    if isinstance(value, float):
        return struct.pack("<d", value).hex()
    if isinstance(value, list):
        return [bits(v) for v in value]
    if isinstance(value, dict):
        return {k: bits(v) for k, v in value.items()}
    return value


def test_every_form_gives_the_numbers_of_json() -> None:
    proc = run(stdin=orjson.dumps({**HEAD, "contracts": BOOK}))
    assert proc.returncode == 0, proc.stderr
    rows = orjson.loads(proc.stdout)
    by_columns = run("--format", "columns", stdin=orjson.dumps({**HEAD, "columns": COLUMNS}), hash_seed=1)
    assert by_columns.returncode == 0, by_columns.stderr
    columnar = orjson.loads(by_columns.stdout)
    # --format json takes a columnar body too, and answers it in columns
    again = run(stdin=orjson.dumps({**HEAD, "columns": COLUMNS}), hash_seed=2)
    assert again.stdout == by_columns.stdout
    by_arrow = run("--format", "arrow", stdin=book_ipc(COLUMNS, HEAD), hash_seed=3)
    assert by_arrow.returncode == 0, by_arrow.stderr
    assert pa.ipc.open_stream(by_arrow.stdout).schema.field("price").type == pa.float64()
    assert bits(answer_of_ipc(by_arrow.stdout)) == bits(columnar)

    cols = columnar["columns"]
    assert cols["id"] == [r["id"] for r in rows["results"]]
    for i, row in enumerate(rows["results"]):
        for m in ("price", "delta"):
            assert bits(cols[m][i]) == bits(row[m]), (m, row)
            assert bits(cols[f"error_bound.{m}"][i]) == bits(row["error_bound"][m]), (m, row)
        for q in ("0.05", "0.5"):
            value = None if row["quantiles"] is None else row["quantiles"][q]
            assert bits(cols[f"quantiles.{q}"][i]) == bits(value)
        assert cols["warnings"][i] == row.get("warnings")
        assert (cols["model"][i], cols["method"][i]) == (row["model"], row["method"])
    assert {k: v for k, v in columnar.items() if k != "columns"} == {k: v for k, v in rows.items() if k != "results"}


@pytest.mark.parametrize(
    ("args", "stdin", "words"),
    [
        (("--format", "arrow"), b"not an arrow stream at all", "not an Arrow book"),
        (("--format", "arrow"), b"", "empty"),
        (("--format", "arrow"), book_ipc(COLUMNS, HEAD)[:100], "not an Arrow book"),
        (("--format", "columns"), orjson.dumps({"contracts": BOOK}), "--format columns reads a columnar request"),
        (("--format", "columns"), b"{not json", "not valid JSON"),
        ((), book_ipc(COLUMNS, HEAD), "--format arrow"),
        (
            ("--format", "columns"),
            orjson.dumps({"columns": {**COLUMNS, "strike": [1.0, -1.0, 1.0, 1.0]}}),
            "[1].strike",
        ),
        (("--format", "columns"), orjson.dumps({"columns": {**COLUMNS, "spot": [1.0]}}), "columns.spot"),
        (("--format", "columns"), orjson.dumps({"columns": COLUMNS, "contracts": BOOK}), "columns:"),
        (("--format", "csv"), b"", "invalid choice"),
    ],
)
def test_bad_input_is_a_usage_error(args: tuple[str, ...], stdin: bytes, words: str) -> None:
    assert words in usage_error(run(*args, stdin=stdin))


def test_bad_arrow_books_are_usage_errors() -> None:
    wrong = book_ipc({**COLUMNS, "strike": [1e9] * 4})
    t = pa.table({"id": pa.array(["a"]), "strike": pa.array(["100"])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as writer:
        writer.write_table(t)
    message = usage_error(run("--format", "arrow", stdin=sink.getvalue().to_pybytes()))
    assert "columns.strike" in message and "float64" in message, message
    message = usage_error(run("--format", "arrow", stdin=wrong))
    assert "K/F" in message, message
    n = MAX_CONTRACTS + 1
    big = book_ipc({"id": [f"k{i}" for i in range(n)]})
    assert "at most" in usage_error(run("--format", "arrow", stdin=big))
