"""Books and answers as Apache Arrow IPC streams (docs/api.md, "Columnar books and Arrow").

A request is an IPC stream (``application/vnd.apache.arrow.stream``) whose table has the
columnar book's columns (pricing/columns.py) and, in its schema metadata under
``spectralmc.request``, the request-level fields as a JSON object. Column types:

- ``strike``, ``spot``, ``expiry_years``, ``rate``, ``dividend``, ``vol`` and every
  ``params.<name>``: float64 (int64 accepted);
- ``fixings``: int64;
- ``id``, ``right``, ``process``, ``underlying``: utf8 (large_utf8, utf8_view, or a
  dictionary of strings);
- ``expiry``: a date string as the others, or date32;
- ``barrier.type``: utf8 as the strings; ``barrier.level``, ``barrier.rebate``: float64
  (int64 accepted); ``barrier.monitoring``: utf8 as the strings, each cell
  ``"continuous"`` or a whole number of dates in decimal (``"12"``: read as the integer
  12), or int64 (an Arrow column has one type, a JSON cell either);
- any column may be of Arrow's null type (all cells null). A null cell is an absent field.

The answer is an IPC stream with the columnar answer's columns (float64 numbers, utf8
``id``/``model``/``method``, list<utf8> ``warnings``) and ``spectralmc.response`` in the
schema metadata: the JSON of namespace, val_datetime, data_asof, models, market_data.

Reading is defensive: before pyarrow decodes anything, the stream's message headers are
read here (:func:`scan`) to refuse compressed buffers (an IPC body may be LZ4/ZSTD
compressed, which would inflate past the body limit) and to count the rows (more than
MAX_CONTRACTS: :class:`BookFormatError` ``too_large`` before decoding); the decoded
table is validated in full (offsets, dictionary indices) before any value is read, and
dictionary columns are expanded by reference, never copied per row.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa

from spectralmc_server.pricing.cells import (
    BARRIER_KINDS,
    BARRIER_PREFIX,
    CONTRACT_COLUMNS,
    PARAMS_PREFIX,
    RULES,
    Cells,
    Floats,
)
from spectralmc_server.pricing.columns import ANSWER_KEYS, answer_columns, capped, column_name_error
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import MAX_CONTRACTS, PriceRequest

ARROW_STREAM = "application/vnd.apache.arrow.stream"
REQUEST_METADATA = "spectralmc.request"
RESPONSE_METADATA = "spectralmc.response"
ANSWER_STRINGS = ("id", "model", "method")

Kind = Literal["malformed", "too_large", "unsupported"]


class BookFormatError(ValueError):
    """An Arrow body that is not a readable book: ``kind`` says which answer it earns
    (``malformed``: 400, ``too_large``: 413, ``unsupported``: 415); ``details`` name
    the part (``body``, ``contracts``, ``schema.metadata.spectralmc.request``)."""

    def __init__(self, kind: Kind, message: str, details: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = details


def _malformed(reason: str, where: str = "body") -> BookFormatError:
    return BookFormatError(
        "malformed", f"the body is not a readable Arrow IPC stream: {reason}", [{"field": where, "reason": reason}]
    )


# -- the stream's message headers (Arrow's Message.fbs), read before decoding -------------

# MessageHeader union tags
_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3


class _FlatTable:
    """A flatbuffer table inside ``buf`` at ``pos``: every read is bounds-checked
    (struct.error or IndexError on a bad offset)."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        (soffset,) = struct.unpack_from("<i", buf, pos)
        self.vtable = pos - soffset
        (self.vsize,) = struct.unpack_from("<H", buf, self.vtable)
        if self.vtable < 0 or self.vtable + self.vsize > len(buf):
            raise IndexError("vtable out of range")

    def _field(self, k: int) -> int | None:
        at = 4 + 2 * k
        if at + 2 > self.vsize:
            return None
        (off,) = struct.unpack_from("<H", self.buf, self.vtable + at)
        return None if off == 0 else self.pos + off

    def u8(self, k: int) -> int:
        p = self._field(k)
        return 0 if p is None else int(struct.unpack_from("<B", self.buf, p)[0])

    def i64(self, k: int) -> int:
        p = self._field(k)
        return 0 if p is None else int(struct.unpack_from("<q", self.buf, p)[0])

    def has(self, k: int) -> bool:
        return self._field(k) is not None

    def table(self, k: int) -> _FlatTable | None:
        p = self._field(k)
        if p is None:
            return None
        (off,) = struct.unpack_from("<I", self.buf, p)
        return _FlatTable(self.buf, p + off)


def _batch_rows(header: bytes) -> tuple[int, int]:
    """(header type, rows) of one message's flatbuffer; BookFormatError for a
    compressed record batch or dictionary."""
    (root,) = struct.unpack_from("<I", header, 0)
    message = _FlatTable(header, root)
    kind = message.u8(1)
    body = message.table(2)
    if kind == _DICTIONARY_BATCH and body is not None:
        body = body.table(1)  # DictionaryBatch.data: a RecordBatch
    if kind not in (_DICTIONARY_BATCH, _RECORD_BATCH) or body is None:
        return kind, 0
    if body.has(3):  # RecordBatch.compression
        raise BookFormatError(
            "unsupported",
            "compressed Arrow IPC buffers (LZ4, ZSTD) are not accepted",
            [
                {
                    "field": "body",
                    "reason": "write the stream without IPC compression; compress the whole body with "
                    "Content-Encoding gzip or deflate instead",
                }
            ],
        )
    rows = body.i64(0)
    if rows < 0:
        raise IndexError("negative length")
    return kind, rows


def scan(data: bytes, max_rows: int = MAX_CONTRACTS) -> int:
    """The number of rows in an IPC stream's record batches, read from the message
    headers alone; BookFormatError: ``too_large`` past ``max_rows`` (before any
    decoding), ``unsupported`` for compressed buffers, ``malformed`` otherwise."""
    if not data:
        raise _malformed("the body is empty: send an Arrow IPC stream")
    rows = 0
    try:
        reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(data))
        first = True
        while True:
            try:
                message = reader.read_next_message()
            except StopIteration:
                break
            if message is None:
                break
            if first and message.type != "schema":
                raise _malformed(f"the stream starts with a {message.type} message, not its schema")
            first = False
            kind, n = _batch_rows(message.metadata.to_pybytes())
            if kind == _RECORD_BATCH:
                rows += n
                if rows > max_rows:
                    raise BookFormatError(
                        "too_large",
                        f"more than {max_rows} contracts in one request (split the book)",
                        [{"field": "contracts", "reason": f"at most {max_rows} contracts (rows)"}],
                    )
        if first:
            raise _malformed("the stream has no schema message")
    except BookFormatError:
        raise
    except (pa.ArrowException, OSError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise _malformed(f"{type(exc).__name__}: {exc}") from None
    return rows


def read_table(data: bytes) -> pa.Table:
    """The stream's table, scanned (:func:`scan`) and fully validated."""
    scan(data)
    try:
        table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError, EOFError, IndexError) as exc:
        raise _malformed(f"{type(exc).__name__}: {exc}") from None
    return table


# -- the book's columns --------------------------------------------------------------------


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


# A decimal integer in a utf8 barrier.monitoring column (a number of dates, "12"); any
# other string is passed on as it is and refused by the row schema (got '...').
_DATES = re.compile(r"-?[0-9]{1,18}")
MONITORING = "barrier.monitoring"


def _kind(name: str) -> str:
    """The cell kind column ``name`` holds: a FieldRule kind, or ``string|integer``."""
    rule = RULES.get(name)
    if rule is not None:
        return rule.kind
    barrier = BARRIER_KINDS.get(name)
    if barrier is not None:
        return "|".join(sorted(barrier))  # "number", "string" or "integer|string"
    return "number"  # params.<name>


def _type_error(name: str, t: pa.DataType) -> str | None:
    """Why column ``name`` cannot have Arrow type ``t`` (None: it can)."""
    if pa.types.is_null(t):
        return None
    kind = _kind(name)
    if kind == "integer|string":  # barrier.monitoring: "continuous" or "12", or 12
        text = _is_text(t) or (pa.types.is_dictionary(t) and _is_text(t.value_type))
        ok = text or pa.types.is_int64(t)
        expected = 'utf8 ("continuous" or a whole number of dates, "12"; large_utf8, a dictionary of strings) or int64'
    elif kind == "number":
        ok = pa.types.is_float64(t) or pa.types.is_int64(t)
        expected = "float64 (or int64)"
    elif kind == "integer":
        ok = pa.types.is_int64(t)
        expected = "int64"
    else:
        text = _is_text(t) or (pa.types.is_dictionary(t) and _is_text(t.value_type))
        ok = text or (kind == "date" and pa.types.is_date32(t))
        expected = "utf8 (or large_utf8, a dictionary of strings)" + (" or date32" if kind == "date" else "")
    return None if ok else f"expected {expected}, got {t}"


_EPOCH = date(1970, 1, 1)
_MIN_DAY = (date.min - _EPOCH).days
_MAX_DAY = (date.max - _EPOCH).days


def _date_of_day(day: int) -> date | str:
    """A date32 cell (days since 1970-01-01) as a date; outside years 1 to 9999 its text,
    which the row schema then refuses as not a date, naming the contract's expiry."""
    if _MIN_DAY <= day <= _MAX_DAY:
        return _EPOCH + timedelta(days=day)
    return f"date32 day {day} (outside the years 1 to 9999)"


def _monitoring_cells(cells: list[Any]) -> list[Any]:
    """A barrier.monitoring column's cells with each decimal integer string as its int
    (``"12"``: 12 dates); "continuous", the ints and other strings as they are."""
    return [int(c) if isinstance(c, str) and _DATES.fullmatch(c) else c for c in cells]


def _cells(column: pa.ChunkedArray, numbers: bool = False) -> Cells:
    """A column's cells as Python values (None where null). Dictionary chunks are
    expanded by reference to their values (one Python string per dictionary entry).
    ``numbers``: a contract's number column, given as one float64 array where it is
    float64 without nulls (read by pricing/cells.py without a Python float per cell)."""
    if numbers and pa.types.is_float64(column.type) and column.null_count == 0:
        values: Floats = column.to_numpy()
        return values
    if pa.types.is_null(column.type):
        return [None] * len(column)
    if pa.types.is_date32(column.type):  # day numbers: a date outside Python's range is a bad cell
        days = column.cast(pa.int32()).to_pylist()
        return [None if d is None else _date_of_day(d) for d in days]
    if not pa.types.is_dictionary(column.type):
        cells: list[Any] = column.to_pylist()
        return cells
    out: list[Any] = []
    for chunk in column.chunks:
        values = chunk.dictionary.to_pylist()
        out += [None if i is None else values[i] for i in chunk.indices.to_pylist()]
    return out


def book_of_table(table: pa.Table) -> tuple[dict[str, Any], dict[str, Cells]]:
    """(request-level fields, columns) of a decoded table: the fields from the schema
    metadata, the columns checked for known names and Arrow types (RequestRefusedError
    naming each bad column ``columns.<name>``)."""
    head = _head(table.schema.metadata)
    details: list[dict[str, Any]] = []
    names = table.column_names
    seen: set[str] = set()
    for name in names:
        if name in seen:
            details.append({"field": f"columns.{name}", "reason": "given twice: each column at most once"})
        seen.add(name)
    for name, f in zip(names, table.schema, strict=True):
        reason = column_name_error(name) or _type_error(name, f.type)
        if reason is not None:
            details.append({"field": f"columns.{name}", "reason": reason})
    if details:
        raise RequestRefusedError(f"{len(details)} invalid column(s)", capped(details))
    columns = {
        name: _cells(table.column(i), numbers=_kind(name) == "number" and not name.startswith(BARRIER_PREFIX))
        for i, name in enumerate(names)
    }
    if MONITORING in columns:
        columns[MONITORING] = _monitoring_cells(list(columns[MONITORING]))
    return head, columns


def _head(metadata: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    where = f"schema.metadata.{REQUEST_METADATA}"
    raw = (metadata or {}).get(REQUEST_METADATA.encode())
    if raw is None:
        return {}
    try:
        head = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _malformed(f"not JSON: {exc}", where) from None
    if not isinstance(head, dict):
        reason = f"a JSON object of the request-level fields (got {type(head).__name__})"
        raise RequestRefusedError(f"{where}: {reason}", [{"field": where, "reason": reason}])
    for key in ("contracts", "columns"):
        if key in head:
            reason = f"'{key}' has no place here: the contracts are the table's rows"
            raise RequestRefusedError(f"{where}: {reason}", [{"field": f"{where}.{key}", "reason": reason}])
    return head


def read_book(data: bytes) -> tuple[dict[str, Any], dict[str, Cells]]:
    """An Arrow IPC body as (request-level fields, columns): BookFormatError for a
    stream that cannot be read, RequestRefusedError for bad columns."""
    return book_of_table(read_table(data))


# -- writing -------------------------------------------------------------------------------


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    out: bytes = sink.getvalue().to_pybytes()
    return out


def book_type(name: str, cells: Sequence[Any] = ()) -> pa.DataType:
    """The Arrow type a book column is written with (barrier.monitoring: int64 when every
    cell given is an int, else utf8)."""
    kind = _kind(name)
    if kind == "integer|string":
        ints = all(c is None or (isinstance(c, int) and not isinstance(c, bool)) for c in cells)
        return pa.int64() if ints else pa.string()
    if kind == "number":
        return pa.float64()
    return pa.int64() if kind == "integer" else pa.string()


def book_ipc(columns: Mapping[str, Sequence[Any]], head: Mapping[str, Any] | None = None) -> bytes:
    """A book (columns as lists, None for absent) as IPC stream bytes, the request-level
    fields in the schema metadata (dates as RFC 3339 strings, numbers as float64; a
    barrier.monitoring column of "continuous" and ints as utf8, the ints in decimal)."""
    arrays = []
    for name, cells in columns.items():
        t = book_type(name, cells)
        values: list[Any]
        if pa.types.is_float64(t):
            values = [None if c is None else float(c) for c in cells]
        elif name == MONITORING and pa.types.is_string(t):
            values = [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in cells]
        else:
            values = list(cells)
        arrays.append(pa.array(values, type=t))
    metadata = None if head is None else {REQUEST_METADATA: orjson.dumps(dict(head))}
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(columns, arrays, strict=True)], metadata=metadata)
    return _ipc(pa.Table.from_arrays(arrays, schema=schema))


def _arrow_array(values: Any, t: pa.DataType) -> pa.Array:
    """A column of an answer: a list, or a float64 array (the Valuer's columnar answer)
    with NaN where the row answer has null, written as the list would be (null slots
    zeroed, no validity bitmap when nothing is null): the same bytes either way."""
    if not isinstance(values, np.ndarray):
        return pa.array(values, type=t)
    null = np.isnan(values)
    if not null.any():
        return pa.array(values, type=t)
    return pa.array(np.where(null, 0.0, values), type=t, mask=null)


def answer_ipc(answer: Mapping[str, Any], request: PriceRequest) -> bytes:
    """An answer (the Valuer's dict, with rows or with columns) as an IPC stream: the columnar answer's columns,
    and the request-level echo, models and market data in ``spectralmc.response``."""
    cols = answer["columns"] if "columns" in answer else answer_columns(answer, request)["columns"]
    fields, arrays = [], []
    for name, values in cols.items():
        if name in ANSWER_STRINGS:
            t = pa.string()
        elif name == "warnings":
            t = pa.list_(pa.string())
        else:
            t = pa.float64()
        arrays.append(_arrow_array(values, t))
        fields.append(pa.field(name, t))
    meta = orjson.dumps({k: answer[k] for k in ANSWER_KEYS})
    schema = pa.schema(fields, metadata={RESPONSE_METADATA: meta})
    return _ipc(pa.Table.from_arrays(arrays, schema=schema))


def answer_of_ipc(data: bytes) -> dict[str, Any]:
    """An Arrow answer read back as the columnar JSON answer (for clients and tests)."""
    table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    meta = orjson.loads((table.schema.metadata or {})[RESPONSE_METADATA.encode()])
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    return {
        "namespace": meta["namespace"],
        "val_datetime": meta["val_datetime"],
        "data_asof": meta["data_asof"],
        "columns": cols,
        "models": meta["models"],
        "market_data": meta["market_data"],
    }


__all__ = [
    "ARROW_STREAM",
    "CONTRACT_COLUMNS",
    "PARAMS_PREFIX",
    "REQUEST_METADATA",
    "RESPONSE_METADATA",
    "BookFormatError",
    "answer_ipc",
    "answer_of_ipc",
    "book_ipc",
    "book_of_table",
    "read_book",
    "read_table",
    "scan",
]
