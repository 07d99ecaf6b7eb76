"""Books as Arrow tables: what ``price_table`` sends and what it makes of the answers.

Wire format (docs/api.md, docs/client.md): one column per Contract field, named as in
row JSON (``id``, ``right``, ``strike``, ``spot``, ``expiry_years``, ``rate``,
``dividend``, ``process``, ``vol``, ``fixings``, ``underlying``, ``expiry``), process
parameters flattened as ``params.<name>``, a barrier as ``barrier.type``,
``barrier.level``, ``barrier.monitoring`` and ``barrier.rebate``; a null is a field the
contract does not give.
The request's own fields go as JSON in the schema metadata key ``spectralmc.request``;
the answer is an Arrow IPC stream with ``spectralmc.response`` in its metadata.

pandas is imported only when a DataFrame is given (it is then already imported).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import pyarrow as pa

from spectralmc_server.client.errors import InvalidRequest, ServerError

ARROW_STREAM = "application/vnd.apache.arrow.stream"
REQUEST_KEY = b"spectralmc.request"
RESPONSE_KEY = b"spectralmc.response"
# The server's MAX_CONTRACTS (spectralmc_server/pricing/schemas.py; a test checks they
# agree): the client does not import the server's schemas, which need torch.
DEFAULT_CHUNK_SIZE = 20_000

STRING_COLUMNS = frozenset({"id", "right", "process", "underlying", "expiry", "barrier.type"})
FLOAT_COLUMNS = frozenset(
    {"strike", "spot", "expiry_years", "rate", "dividend", "vol", "barrier.level", "barrier.rebate"}
)
INT_COLUMNS = frozenset({"fixings"})
# "continuous" or a whole number of dates: int64 where every cell is a number, else utf8
# (the server reads the text "12" as 12 dates)
MONITORING = "barrier.monitoring"


def check_unique_ids(ids: Iterable[Any]) -> None:
    """InvalidRequest (code ``invalid``, field ``contracts``) when an id repeats: the
    server checks each request, the client the whole book it splits."""
    counts = Counter(i for i in ids if isinstance(i, str))
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        reason = f"duplicate contract id(s): {', '.join(dupes[:5])}" + (" ..." if len(dupes) > 5 else "")
        raise InvalidRequest(
            f"{len(dupes)} contract id(s) repeat in the book; ids must be unique across the whole book",
            code="invalid",
            details=[{"field": "contracts", "reason": reason}],
        )


def is_dataframe(book: Any) -> bool:
    pd = sys.modules.get("pandas")  # a DataFrame cannot exist unless pandas is imported
    return pd is not None and isinstance(book, pd.DataFrame)


def _cast(table: pa.Table, name: str, target: Any) -> pa.Table:
    i = table.schema.get_field_index(name)
    try:
        column = table.column(i).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidRequest(
            f"column {name!r} cannot be sent as {target}",
            code="invalid",
            details=[{"field": name, "reason": f"{table.schema.field(i).type} is not {target}: {exc}"}],
        ) from None
    return table.set_column(i, pa.field(name, target), column)


def _string_like(t: Any) -> bool:
    if pa.types.is_dictionary(t):
        return _string_like(t.value_type)
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _target(name: str, t: Any) -> Any:
    """The type column ``name`` of type ``t`` is sent as, where it must be cast (else None)."""
    number = pa.types.is_integer(t) or pa.types.is_floating(t)
    if name in STRING_COLUMNS or (name == MONITORING and not number):
        if (name == "expiry" and pa.types.is_date(t)) or (_string_like(t) and not pa.types.is_string(t)):
            return pa.string()
    elif name in FLOAT_COLUMNS or name.startswith("params."):
        if (number or pa.types.is_decimal(t)) and t != pa.float64():
            return pa.float64()
    elif (name in INT_COLUMNS or name == MONITORING) and number and t != pa.int64():
        return pa.int64()
    return None


def normalize(table: pa.Table) -> pa.Table:
    """The table as the server reads it: a ``params`` (or ``barrier``) struct column
    flattened to ``params.<name>`` (``barrier.<key>``), columns with no value dropped
    (null is absent), strings as utf8, numbers as float64, ``fixings`` as int64 (a float
    column of whole numbers, as pandas makes of a column with gaps, is cast; 2.5 is
    refused), ``barrier.monitoring`` as int64 where its cells are numbers (cast as
    ``fixings`` is), else as utf8, dates as ``YYYY-MM-DD``."""
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    if len(table):  # an empty book keeps its columns (the server says what is wrong)
        empty = [f.name for f in table.schema if table.column(f.name).null_count == len(table)]
        table = table.drop_columns(empty)
    for field in list(table.schema):
        name, t = field.name, field.type
        if name == "expiry" and pa.types.is_timestamp(t):
            table, t = _cast(table, name, pa.date32()), pa.date32()
        target = _target(name, t)
        if target is not None:
            table = _cast(table, name, target)
    return table.replace_schema_metadata(None)


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is sys.modules["pandas"].NA


def _date_count_text(v: Any) -> str | None:
    """A ``barrier.monitoring`` cell of a column that mixes text and numbers, as text: a
    whole number in decimal (12 or 12.0: "12"); anything else as written, for the server
    to refuse as the row would (2.5: "2.5")."""
    if _is_null(v):
        return None
    if isinstance(v, str):
        return v
    if not isinstance(v, bool) and (isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())):
        return str(int(v))
    return str(v)


def _mixed(cells: Iterable[Any]) -> bool:
    """Whether ``cells`` hold both text and something else (nulls aside)."""
    return len({isinstance(v, str) for v in cells if not _is_null(v)}) == 2


def _monitoring_as_text(df: Any) -> Any:
    """The DataFrame with a ``barrier.monitoring`` column (or the key of a ``barrier``
    column of dicts) that mixes "continuous" and numbers of dates as text, as Arrow has
    no column of both (a new DataFrame where it changes anything)."""
    changed: dict[str, list[Any]] = {}
    if MONITORING in df.columns and df[MONITORING].dtype == object and _mixed(df[MONITORING]):
        changed[MONITORING] = [_date_count_text(v) for v in df[MONITORING]]
    if "barrier" in df.columns and df["barrier"].dtype == object:
        cells = list(df["barrier"])
        if _mixed(b.get("monitoring") for b in cells if isinstance(b, dict)):
            changed["barrier"] = [
                {**b, "monitoring": _date_count_text(b.get("monitoring"))} if isinstance(b, dict) else b for b in cells
            ]
    return df.assign(**changed) if changed else df


def as_table(book: Any) -> tuple[pa.Table, Any]:
    """``book`` (a pyarrow Table or RecordBatch, or a pandas DataFrame) as a normalized
    table, and the DataFrame's index (None for Arrow input)."""
    if isinstance(book, pa.RecordBatch):
        book = pa.Table.from_batches([book])
    if isinstance(book, pa.Table):
        return normalize(book), None
    if is_dataframe(book):
        return normalize(pa.Table.from_pandas(_monitoring_as_text(book), preserve_index=False)), book.index
    raise TypeError(f"price_table takes a pyarrow.Table or a pandas.DataFrame, not {type(book).__name__}")


def ids_of(table: pa.Table) -> list[Any]:
    if "id" not in table.column_names:
        return []
    ids: list[Any] = table.column("id").to_pylist()
    return ids


def encode(table: pa.Table, fields: Mapping[str, Any]) -> bytes:
    """One request body: ``table`` as an Arrow IPC stream, ``fields`` (namespace,
    val_datetime, data_asof, measures, quantile_levels) in its metadata."""
    table = table.replace_schema_metadata({REQUEST_KEY: orjson.dumps(dict(fields))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def decode(body: bytes) -> tuple[pa.Table, dict[str, Any]]:
    """An answer: the result table and its ``spectralmc.response`` metadata."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ServerError(f"the answer is not an Arrow IPC stream: {exc}", code="bad_answer") from None
    raw = (table.schema.metadata or {}).get(RESPONSE_KEY)
    key = RESPONSE_KEY.decode()
    try:
        meta = orjson.loads(raw) if raw is not None else {}
    except orjson.JSONDecodeError as exc:
        raise ServerError(f"the answer's {key} metadata is not JSON: {exc}", code="bad_answer") from None
    if not isinstance(meta, dict):
        raise ServerError(f"the answer's {key} metadata is not an object", code="bad_answer")
    return table, meta


def concat(tables: list[pa.Table], meta: Mapping[str, Any]) -> pa.Table:
    """The chunks' answers in order as one table, with ``meta`` as its metadata."""
    plain = [t.replace_schema_metadata(None) for t in tables]
    table = plain[0] if len(plain) == 1 else pa.concat_tables(plain, promote_options="permissive")
    return table.replace_schema_metadata({RESPONSE_KEY: orjson.dumps(dict(meta))})


def to_dataframe(table: pa.Table, meta: Mapping[str, Any], index: Any) -> Any:
    """The answer as a DataFrame on the book's index (row i answers the book's row i),
    the response's metadata in ``df.attrs["spectralmc"]``."""
    df = table.replace_schema_metadata(None).to_pandas()
    if index is not None and len(index) == len(df):
        df.index = index
    df.attrs["spectralmc"] = dict(meta)
    return df


def n_rows(table: pa.Table) -> int:
    rows: int = table.num_rows
    return rows


def slice_rows(table: pa.Table, start: int, stop: int) -> pa.Table:
    return table.slice(start, stop - start)
