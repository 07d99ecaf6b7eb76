"""``spectralmc price`` on a book with contracts by reference (``underlying``, ``expiry``)
and no ``--marketdata``: one line on stderr that names the option and what it takes,
exit code 2 (the command's usage errors), never a traceback; rows, columns and Arrow
alike (issue 22, item 14)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from spectralmc_server.cli import main
from spectralmc_server.pricing.arrow import book_ipc

VDT = "2026-11-26T16:00:00Z"
EXPLICIT = {"id": "e", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0, "vol": 0.2}
REF = {"id": "r", "right": "call", "strike": 100.0, "underlying": "SPX", "expiry": "2027-06-18"}
COLUMNS: dict[str, list[Any]] = {
    "id": ["e", "r1", "r2"],
    "right": ["call", "call", "put"],
    "strike": [100.0, 100.0, 90.0],
    "spot": [100.0, None, None],
    "expiry_years": [1.0, None, None],
    "vol": [0.2, None, None],
    "underlying": [None, "SPX", "SPX"],
    "expiry": [None, "2027-06-18", "2027-06-18"],
}


def _usage_error(code: int, out: str, err: str) -> str:
    """The command's bad-input convention: exit 2, nothing on stdout, one line on
    stderr, no traceback; the line."""
    assert code == 2, (code, out, err)
    assert out == ""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err.strip()


def _in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: bytes, *args: str
) -> tuple[int, str, str]:
    """``main(["price", *args])`` here, ``stdin`` on its standard input."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["price", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _names_the_option(message: str) -> None:
    assert message.startswith("error: "), message
    assert "by reference (underlying, expiry)" in message
    assert "pass --marketdata STORE_URI" in message
    assert "file:///absolute/path or s3://bucket/prefix" in message  # what --marketdata takes


def test_rows_hint_in_a_real_process() -> None:
    body = orjson.dumps({"val_datetime": VDT, "contracts": [EXPLICIT, REF]})
    env = {k: v for k, v in os.environ.items() if k != "SPECTRALMC_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", "price"],
        input=body,
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    message = _usage_error(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    _names_the_option(message)
    assert "contracts[1] is by reference" in message  # the first one, by its index
    assert "val_datetime" not in message  # it is set


def test_rows_without_val_datetime(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    refs = [REF, {**REF, "id": "r2"}, EXPLICIT]
    message = _usage_error(*_in_process(monkeypatch, capsys, orjson.dumps({"contracts": refs})))
    _names_the_option(message)
    assert "contracts[0] (and 1 more) is by reference" in message
    assert "needs val_datetime" in message


def test_columns_and_arrow(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    body = orjson.dumps({"val_datetime": VDT, "columns": COLUMNS})
    message = _usage_error(*_in_process(monkeypatch, capsys, body, "--format", "columns"))
    _names_the_option(message)
    assert "contracts[1] (and 1 more)" in message
    stream = book_ipc(COLUMNS, {"val_datetime": VDT})
    message = _usage_error(*_in_process(monkeypatch, capsys, stream, "--format", "arrow"))
    _names_the_option(message)
    assert "contracts[1] (and 1 more)" in message


def test_with_marketdata_no_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given --marketdata, the store is asked: an empty one has no snapshot to name."""
    body = orjson.dumps({"val_datetime": VDT, "contracts": [REF]})
    message = _usage_error(*_in_process(monkeypatch, capsys, body, "--marketdata", tmp_path.as_uri()))
    assert "--marketdata" not in message
    assert f"no market-data snapshot for default/{VDT}" in message
