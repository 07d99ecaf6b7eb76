"""Books as Arrow tables: what ``price_table`` sends and what it makes of the answers.

Wire format (docs/api.md, docs/client.md): one column per Contract field, named as in
row JSON (``id``, ``right``, ``strike``, ``spot``, ``expiry_years``, ``rate``,
``dividend``, ``process``, ``vol``, ``fixings``, ``underlying``, ``expiry``), process
parameters flattened as ``params.<name>``; a null is a field the contract does not give.
The request's own fields go as JSON in the schema metadata key ``spectralmc.request``;
the answer is an Arrow IPC stream with ``spectralmc.response`` in its metadata.

pandas is imported only when a DataFrame is given (it is then already imported).
"""

from __future__ import annotations

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

STRING_COLUMNS = frozenset({"id", "right", "process", "underlying", "expiry"})
FLOAT_COLUMNS = frozenset({"strike", "spot", "expiry_years", "rate", "dividend", "vol"})
INT_COLUMNS = frozenset({"fixings"})


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


def normalize(table: pa.Table) -> pa.Table:
    """The table as the server reads it: a ``params`` struct column flattened to
    ``params.<name>``, columns with no value dropped (null is absent), strings as utf8,
    numbers as float64, ``fixings`` as int64 (a float column of whole numbers, as pandas
    makes of a column with gaps, is cast; 2.5 is refused), dates as ``YYYY-MM-DD``."""
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    if len(table):  # an empty book keeps its columns (the server says what is wrong)
        empty = [f.name for f in table.schema if table.column(f.name).null_count == len(table)]
        table = table.drop_columns(empty)
    for field in list(table.schema):
        name, t = field.name, field.type
        if name in STRING_COLUMNS:
            if name == "expiry" and pa.types.is_timestamp(t):
                table, t = _cast(table, name, pa.date32()), pa.date32()
            if (name == "expiry" and pa.types.is_date(t)) or (_string_like(t) and not pa.types.is_string(t)):
                table = _cast(table, name, pa.string())
        elif name in FLOAT_COLUMNS or name.startswith("params."):
            if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)) and t != pa.float64():
                table = _cast(table, name, pa.float64())
        elif name in INT_COLUMNS and (pa.types.is_integer(t) or pa.types.is_floating(t)) and t != pa.int64():
            table = _cast(table, name, pa.int64())
    return table.replace_schema_metadata(None)


def as_table(book: Any) -> tuple[pa.Table, Any]:
    """``book`` (a pyarrow Table or RecordBatch, or a pandas DataFrame) as a normalized
    table, and the DataFrame's index (None for Arrow input)."""
    if isinstance(book, pa.RecordBatch):
        book = pa.Table.from_batches([book])
    if isinstance(book, pa.Table):
        return normalize(book), None
    if is_dataframe(book):
        return normalize(pa.Table.from_pandas(book, preserve_index=False)), book.index
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
