"""Columnar books: a book of contracts as columns (docs/api.md, "Columnar books and Arrow").

A columnar book is the row request with ``"columns": {name: [values...]}`` in place of
``"contracts"``. Column names are the :class:`~.schemas.Contract` fields, with the
process parameters flattened as ``params.<name>`` and a barrier as ``barrier.type``,
``barrier.level``, ``barrier.monitoring``, ``barrier.rebate`` (barrier.type null: no
barrier, and the row's other barrier cells must be null too); a null cell means the field
is absent for that contract (as an omitted key in a row), and a book may leave out the
columns it does not use. The same columns come from an Apache Arrow IPC stream (:mod:`.arrow`).

:func:`request_from_columns` validates a book with numpy, a column at a time, against
every rule of :class:`~.schemas.Contract` and :class:`~.schemas.PriceRequest` (types,
nulls, finiteness, bounds, known processes, vol against params, fixings, contracts by
reference, each process's parameter bounds and spread, K/F, unique ids), then keeps the
columns as a :class:`~.book.Book` (no contract object is built), so a valid book
costs no pydantic work per contract. Where the vectorised checks refuse a row, or find a
value within rounding of a bound (a spread or K/F: numpy twins of the engine's formulas
here, ``math`` twins in the row schema, engine/processes/spec.py),
that row is validated by ``Contract.model_validate`` itself: its errors are then the
row path's own, ``contracts[17].strike`` and the reason, and rounding can never make the
two paths disagree. tests/service/test_columns.py checks the equivalence on random books.
A row with a barrier is always validated that way (its Barrier is the one the row schema
builds; tests/service/test_barrier_columns.py): a book without barriers pays nothing for it.

:func:`answer_columns` turns an answer (as the Valuer gives it) into the columnar
answer: ``id``, ``model``, ``method``, one column per scalar measure, ``quantiles.<level>``
per level, ``error_bound.<measure>`` and ``error_bound.quantiles.<level>``, ``warnings``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError

from spectralmc_server.pricing.book import request_of_book
from spectralmc_server.pricing.cells import (
    BARRIER_COLUMNS,
    BARRIER_PREFIX,
    CONTRACT_COLUMNS,
    MAX_DETAILS,
    PARAMS_PREFIX,
    Cells,
)
from spectralmc_server.pricing.contract_rules import _Book, _duplicates, _row_details
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import (
    MAX_CONTRACTS,
    Barrier,
    Contract,
    PriceRequest,
    format_validation_error,
)

# The answer's columns besides the measures.
ANSWER_KEYS = ("namespace", "val_datetime", "data_asof", "models", "market_data")


# -- the book's structure ----------------------------------------------------------------


def _refused(details: list[dict[str, Any]], what: str = "invalid field(s)") -> RequestRefusedError:
    return RequestRefusedError(f"{len(details)} {what}", details)


def capped(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most MAX_DETAILS details, and one saying how many more there were."""
    if len(details) <= MAX_DETAILS:
        return details
    more = {"field": "columns", "reason": f"and {len(details) - MAX_DETAILS} more invalid column(s)"}
    return [*details[:MAX_DETAILS], more]


def column_name_error(name: str) -> str | None:
    """Why ``name`` is not a contract column (None: it is one)."""
    if name in CONTRACT_COLUMNS or name in BARRIER_COLUMNS:
        return None
    if name.startswith(PARAMS_PREFIX) and len(name) > len(PARAMS_PREFIX):
        return None
    if name == "params":
        return "process parameters are columns params.<name> (params.kappa, params.v0, ...), one per parameter"
    if name == "barrier" or name.startswith(BARRIER_PREFIX):
        return f"unknown column; a barrier is the columns {', '.join(BARRIER_COLUMNS)}"
    return f"unknown column; the columns are {', '.join(CONTRACT_COLUMNS)}, params.<name> and barrier.<key>"


def check_structure(columns: Mapping[str, Cells]) -> int:
    """The book's number of contracts; RequestRefusedError naming each unknown column
    and each column whose length differs from the first one's."""
    details: list[dict[str, Any]] = []
    first: tuple[str, int] | None = None
    for name, cells in columns.items():
        reason = column_name_error(name)
        if reason is not None:
            details.append({"field": f"columns.{name}", "reason": reason})
            continue
        if first is None:
            first = (name, len(cells))
        elif len(cells) != first[1]:
            details.append(
                {
                    "field": f"columns.{name}",
                    "reason": f"has {len(cells)} values, columns.{first[0]} has {first[1]}: "
                    "every column holds one value per contract",
                }
            )
    if details:
        raise _refused(capped(details))
    n = 0 if first is None else first[1]
    if n == 0:
        raise _refused([{"field": "contracts", "reason": "a book needs at least 1 contract (every column is empty)"}])
    if n > MAX_CONTRACTS:
        raise _refused([{"field": "contracts", "reason": f"at most {MAX_CONTRACTS} contracts, got {n}"}])
    return n


def columns_of_body(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Sequence[Any]]]:
    """A columnar JSON body as (request-level fields, columns): RequestRefusedError when
    ``columns`` is not an object of lists or comes with ``contracts``."""
    head = {k: v for k, v in body.items() if k != "columns"}
    columns = body.get("columns")
    if "contracts" in head:
        raise _refused(
            [{"field": "columns", "reason": "give the contracts as rows (contracts) or as columns, not both"}]
        )
    if not isinstance(columns, dict):
        raise _refused(
            [{"field": "columns", "reason": f"an object, column name -> list of values (got {type(columns).__name__})"}]
        )
    details = [
        {"field": f"columns.{name}", "reason": f"a list of values, one per contract (got {type(cells).__name__})"}
        for name, cells in columns.items()
        if not isinstance(cells, list)
    ]
    if details:
        raise _refused(capped(details))
    return head, columns


_ROW_KEYS = frozenset(CONTRACT_COLUMNS)


def rows_as_columns(body: Any) -> tuple[dict[str, Any], dict[str, list[Any]]] | None:
    """A row request (``contracts``: a list of objects) as request-level fields and
    columns, for the vectorised checks; None where the rows hold anything whose meaning
    as columns could differ from the row schema's (a null value, which a column reads as
    absent; an unknown or dotted key; ``params`` that is not a non-empty object; a row
    that is not an object), or the book is empty or over the limit: those requests take
    the row schema's path, which names each error."""
    if type(body) is not dict:
        return None
    rows = body.get("contracts")
    if type(rows) is not list or not rows or len(rows) > MAX_CONTRACTS:
        return None
    n = len(rows)
    columns: dict[str, list[Any]] = {}
    for i, row in enumerate(rows):
        if type(row) is not dict:
            return None
        for key, value in row.items():
            if value is None:
                return None
            if key == "params":
                if not _put_params(columns, value, i, n):
                    return None
                continue
            if key not in _ROW_KEYS:
                return None
            column = columns.get(key)
            if column is None:
                column = columns[key] = [None] * n
            column[i] = value
    return {k: v for k, v in body.items() if k != "contracts"}, columns


def _put_params(columns: dict[str, list[Any]], params: Any, i: int, n: int) -> bool:
    """Row ``i``'s ``params`` into its ``params.<name>`` columns; False where they are not
    a non-empty object of named, non-null values."""
    if type(params) is not dict or not params:
        return False
    for name, v in params.items():
        if v is None or type(name) is not str:
            return False
        column = columns.get(PARAMS_PREFIX + name)
        if column is None:
            column = columns[PARAMS_PREFIX + name] = [None] * n
        column[i] = v
    return True


def too_many(columns: Mapping[str, Any]) -> int | None:
    """The length of the longest column when it is over MAX_CONTRACTS (the server's 413
    before any validation), else None."""
    longest = max((len(c) for c in columns.values() if isinstance(c, list)), default=0)
    return longest if longest > MAX_CONTRACTS else None


# -- request-level fields ----------------------------------------------------------------

# A contract every schema accepts: the request-level fields are validated with it in
# place of the book (their rules do not look at the contracts).
_PLACEHOLDER = {"id": "placeholder", "right": "call", "strike": 1.0, "spot": 1.0, "expiry_years": 1.0, "vol": 0.2}


def validate_head(head: Mapping[str, Any]) -> tuple[PriceRequest | None, list[dict[str, Any]]]:
    """The request-level fields (namespace, times, measures, quantile levels; anything
    else is an unknown field) as a request with a placeholder contract, or their errors."""
    try:
        return PriceRequest.model_validate({**head, "contracts": [_PLACEHOLDER]}), []
    except ValidationError as exc:
        return None, format_validation_error(exc)


def request_from_columns(head: Mapping[str, Any], columns: Mapping[str, Cells]) -> PriceRequest:
    """A :class:`PriceRequest` from request-level fields and a columnar book, validated as
    ``PriceRequest.model_validate`` would the rows it stands for; RequestRefusedError
    naming each invalid field (``contracts[17].strike``) otherwise (the first
    MAX_DETAILS invalid contracts). Give the request to :func:`~.door.admit` for the
    checks beyond the schema: pydantic takes a model instance as it is, unvalidated."""
    if "contracts" in head or "columns" in head:
        key = "contracts" if "contracts" in head else "columns"
        raise _refused([{"field": key, "reason": "the book is the columns; give no contracts with it"}])
    request, head_errors = validate_head(head)
    # in the row request's order: its fields' errors, the contracts', unknown fields'
    known = [d for d in head_errors if re.split(r"[.\[]", d["field"], maxsplit=1)[0] in PriceRequest.model_fields]
    unknown = [d for d in head_errors if d not in known]
    try:
        n = check_structure(columns)
    except RequestRefusedError as exc:
        raise _refused(known + exc.details + unknown) from None
    book = _Book(columns, n)
    field_bad = book.field_bad()
    cross_bad, border = book.contract_rules(~field_bad)
    typed, stray = book.barrier_rows()  # rows with a barrier: the row schema validates them
    absent = book.absent_columns()
    flagged = np.flatnonzero(field_bad | cross_bad | border | typed | stray).tolist()
    details: list[dict[str, Any]] = []
    barriers: dict[int, Barrier] = {}
    refused_rows = 0
    for i in flagged:
        if refused_rows == MAX_DETAILS:
            reason = f"only the first {MAX_DETAILS} invalid contracts are named; contracts[{i}] and after not checked"
            details.append({"field": "contracts", "reason": reason})
            break
        errors = book.stray_barrier_cells(i)  # barrier cells without barrier.type
        try:
            contract = Contract.model_validate(book.row(i))  # the row schema decides (its errors are the row path's)
        except ValidationError as exc:
            errors = _row_details(i, exc, absent) + errors
        else:
            if contract.barrier is not None:
                barriers[i] = contract.barrier
        if errors:
            details += errors
            refused_rows += 1
    if not details:  # as the row schema: ids are compared once every contract is valid
        details = _duplicates(book.fields["id"].objects)
    if head_errors or details:
        raise _refused(known + details + unknown)
    assert request is not None
    return request_of_book(request, book.book(barriers))


# -- answers as columns ------------------------------------------------------------------


def level_key(level: float) -> str:
    """A quantile level as the row answer names it (pricing/valuation.py)."""
    return repr(level)


def answer_column_names(request: PriceRequest) -> list[str]:
    """The columnar answer's columns for ``request``, in order."""
    keys = [level_key(q) for q in request.levels]
    measures: list[str] = []
    for m in request.measures:
        measures += [f"quantiles.{k}" for k in keys] if m == "quantiles" else [m]
    return ["id", "model", "method", *measures, *(f"error_bound.{m}" for m in measures), "warnings"]


def _pick(results: Sequence[Mapping[str, Any]], get: Callable[[Mapping[str, Any]], Any]) -> list[Any]:
    return [get(r) for r in results]


def _level(value: Any, key: str) -> Any:
    return None if value is None else value[key]


def answer_columns(answer: Mapping[str, Any], request: PriceRequest) -> dict[str, Any]:
    """An answer (the Valuer's dict, ``results`` a list of rows) as the columnar answer:
    the same numbers (nulls where the row has null), one column per measure and level."""
    results: Sequence[Mapping[str, Any]] = answer["results"]
    keys = [level_key(q) for q in request.levels]
    cols: dict[str, list[Any]] = {
        "id": _pick(results, lambda r: r["id"]),
        "model": _pick(results, lambda r: r["model"]),
        "method": _pick(results, lambda r: r["method"]),
    }
    bounds: dict[str, list[Any]] = {}
    for m in request.measures:
        if m == "quantiles":
            for k in keys:
                cols[f"quantiles.{k}"] = [_level(r.get("quantiles"), k) for r in results]
                bounds[f"error_bound.quantiles.{k}"] = [_level(r["error_bound"].get("quantiles"), k) for r in results]
        else:
            cols[m] = [r.get(m) for r in results]
            bounds[f"error_bound.{m}"] = [r["error_bound"].get(m) for r in results]
    cols.update(bounds)
    cols["warnings"] = [r.get("warnings") for r in results]
    return {
        "namespace": answer["namespace"],
        "val_datetime": answer["val_datetime"],
        "data_asof": answer["data_asof"],
        "columns": cols,
        "models": answer["models"],
        "market_data": answer["market_data"],
    }
