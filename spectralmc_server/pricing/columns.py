"""Columnar books: a book of contracts as columns (docs/api.md, "Columnar books and Arrow").

A columnar book is the row request with ``"columns": {name: [values...]}`` in place of
``"contracts"``. Column names are the :class:`~.schemas.Contract` fields, with the
process parameters flattened as ``params.<name>``; a null cell means the field is absent
for that contract (as an omitted key in a row), and a book may leave out the columns it
does not use. The same columns come from an Apache Arrow IPC stream (:mod:`.arrow`).

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

:func:`answer_columns` turns an answer (as the Valuer gives it) into the columnar
answer: ``id``, ``model``, ``method``, one column per scalar measure, ``quantiles.<level>``
per level, ``error_bound.<measure>`` and ``error_bound.quantiles.<level>``, ``warnings``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.engine.processes.base import MAX_SCALE, MONEYNESS_BOUNDS, Process
from spectralmc_server.pricing.book import Book, request_of_book
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import (
    MAX_CONTRACTS,
    Contract,
    PriceRequest,
    format_validation_error,
)
from spectralmc_server.rfc3339 import parse_date

Mask = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]

PARAMS_PREFIX = "params."
# The contract columns, in the schema's order (params.<name> columns aside).
CONTRACT_COLUMNS: tuple[str, ...] = tuple(n for n in Contract.model_fields if n != "params")
# At most this many invalid contracts are named in one refusal (the first ones, in order).
MAX_DETAILS = 100
# A spread or K/F within this relative distance of its bound is checked by the row
# validator itself: the numpy twins of the engine's formulas (engine/processes/spec.py) may
# round differently from the scalar ones (by a few ulp; a heston spread, whose terms
# cancel, by up to ~2e-13 relative), the row validator is the reference.
BORDER = 1e-9
# The answer's columns besides the measures.
ANSWER_KEYS = ("namespace", "val_datetime", "data_asof", "models", "market_data")


# -- the field rules, read from the schema --------------------------------------------------


@dataclass(frozen=True)
class FieldRule:
    """What one Contract field accepts, read from its JSON schema: a ``number`` (int or
    float, never bool; finite), an ``integer`` (int, never bool), a ``string`` or a
    ``date`` (an RFC 3339 full-date string, or a date); bounds are inclusive."""

    name: str
    kind: str
    required: bool
    low: float | None = None
    high: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    enum: frozenset[str] | None = None


def _rules() -> dict[str, FieldRule]:
    schema = Contract.model_json_schema()
    required = set(schema.get("required", []))
    rules: dict[str, FieldRule] = {}
    for name in CONTRACT_COLUMNS:
        prop = schema["properties"][name]
        (spec,) = [s for s in prop.get("anyOf", [prop]) if s.get("type") != "null"]
        kind = "date" if spec.get("format") == "date" else str(spec["type"])
        if "exclusiveMinimum" in spec or "exclusiveMaximum" in spec:  # not used by Contract today
            raise RuntimeError(f"columns: Contract.{name} has an exclusive bound the columnar checks do not read")
        enum = spec.get("enum")
        rules[name] = FieldRule(
            name=name,
            kind=kind,
            required=name in required,
            low=spec.get("minimum"),
            high=spec.get("maximum"),
            min_length=spec.get("minLength"),
            max_length=spec.get("maxLength"),
            enum=None if enum is None else frozenset(enum),
        )
    return rules


RULES = _rules()
if set(Contract.model_fields) != {*CONTRACT_COLUMNS, "params"}:  # pragma: no cover - a schema change
    raise RuntimeError("pricing.columns: Contract's fields changed; review the columnar checks")
PROCESS_DEFAULT = str(Contract.model_fields["process"].default)


# -- reading the cells ------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool)


def _present(cells: Sequence[Any]) -> Mask:
    return np.fromiter((c is not None for c in cells), dtype=np.bool_, count=len(cells))


def _numbers(cells: Sequence[Any]) -> tuple[Floats, Mask, Mask]:
    """The cells as float64 (0 where absent or not a number), which are present, and
    which are present but not a finite number."""
    n = len(cells)
    kinds = set(map(type, cells))
    if kinds <= {float}:
        values = np.array(cells, dtype=np.float64).reshape(n)
        present = np.ones(n, dtype=np.bool_)
        bad = ~np.isfinite(values)
    else:
        present = _present(cells)
        bad = np.zeros(n, dtype=np.bool_)
        out: list[float] = []
        for i, c in enumerate(cells):
            if c is None:
                out.append(0.0)
            elif _is_number(c):
                try:
                    out.append(float(c))
                except OverflowError:  # an int past float64: not a number to pydantic either
                    bad[i] = True
                    out.append(0.0)
            else:
                bad[i] = True
                out.append(0.0)
        values = np.array(out, dtype=np.float64).reshape(n)
        bad |= present & ~np.isfinite(values)
    values = np.where(present & ~bad, values, 0.0)
    return values, present, bad


def _bounded(values: Floats, present: Mask, bad: Mask, rule: FieldRule) -> Mask:
    out = bad.copy()
    if rule.low is not None:
        out |= present & ~(values >= rule.low)
    if rule.high is not None:
        out |= present & ~(values <= rule.high)
    return out


@dataclass
class Column:
    """One field over the book: ``present`` cells, ``bad`` (present and refused by the
    field's own rule), ``values`` as float64 for the numeric fields, ``objects`` (the
    values to build contracts from: floats, ints, strings, dates; None where absent)."""

    present: Mask
    bad: Mask
    values: Floats
    objects: list[Any] = field(default_factory=list)


def _column(cells: Sequence[Any], rule: FieldRule) -> Column:
    n = len(cells)
    if rule.kind == "number":
        values, present, bad = _numbers(cells)
        bad = _bounded(values, present, bad, rule)
        objects: list[Any] = [v if p else None for v, p in zip(values.tolist(), present.tolist(), strict=True)]
        return Column(present, bad, values, objects)
    present = _present(cells)
    zeros = np.zeros(n, dtype=np.float64)
    if rule.kind == "integer":
        ok = np.fromiter((isinstance(c, int) and not isinstance(c, bool) for c in cells), dtype=np.bool_, count=n)
        # bounds compared as float: exact within 2**53, and monotone beyond (far out of bounds)
        values = np.array([float(c) if k else 0.0 for c, k in zip(cells, ok.tolist(), strict=True)], dtype=np.float64)
        bad = _bounded(values, present, present & ~ok, rule)
        return Column(present, bad, values.reshape(n), list(cells))
    if rule.kind == "date":
        parsed: list[date | None] = []
        bad = np.zeros(n, dtype=np.bool_)
        for i, c in enumerate(cells):
            if isinstance(c, date) and not isinstance(c, datetime):  # a datetime: the row validator decides
                parsed.append(c)
            elif isinstance(c, str):
                try:
                    parsed.append(parse_date(c))
                except ValueError:
                    bad[i] = True
                    parsed.append(None)
            else:
                bad[i] = c is not None
                parsed.append(None)
        return Column(present, bad, zeros, parsed)
    ok = np.fromiter((isinstance(c, str) for c in cells), dtype=np.bool_, count=n)
    bad = present & ~ok
    strings = [c if k else "" for c, k in zip(cells, ok.tolist(), strict=True)]
    if rule.min_length is not None or rule.max_length is not None:
        lengths = np.fromiter(map(len, strings), dtype=np.int64, count=n)
        if rule.min_length is not None:
            bad |= ok & (lengths < rule.min_length)
        if rule.max_length is not None:
            bad |= ok & (lengths > rule.max_length)
    if rule.enum is not None:
        allowed = rule.enum
        bad |= ok & np.fromiter((s not in allowed for s in strings), dtype=np.bool_, count=n)
    if rule.name == "process":
        bad |= ok & np.fromiter((s not in PROCESSES for s in strings), dtype=np.bool_, count=n)
    return Column(present, bad, zeros, list(cells))


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
    if name in CONTRACT_COLUMNS:
        return None
    if name.startswith(PARAMS_PREFIX) and len(name) > len(PARAMS_PREFIX):
        return None
    if name == "params":
        return "process parameters are columns params.<name> (params.kappa, params.v0, ...), one per parameter"
    return f"unknown column; the columns are {', '.join(CONTRACT_COLUMNS)} and params.<name>"


def check_structure(columns: Mapping[str, Sequence[Any]]) -> int:
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
                if type(value) is not dict or not value:
                    return None
                for name, v in value.items():
                    if v is None or type(name) is not str:
                        return None
                    column = columns.get(PARAMS_PREFIX + name)
                    if column is None:
                        column = columns[PARAMS_PREFIX + name] = [None] * n
                    column[i] = v
                continue
            if key not in _ROW_KEYS:
                return None
            column = columns.get(key)
            if column is None:
                column = columns[key] = [None] * n
            column[i] = value
    return {k: v for k, v in body.items() if k != "contracts"}, columns


def too_many(columns: Mapping[str, Any]) -> int | None:
    """The length of the longest column when it is over MAX_CONTRACTS (the server's 413
    before any validation), else None."""
    longest = max((len(c) for c in columns.values() if isinstance(c, list)), default=0)
    return longest if longest > MAX_CONTRACTS else None


# -- the contract rules, vectorised ------------------------------------------------------


def _near(x: Floats, bound: float) -> Mask:
    with np.errstate(invalid="ignore"):
        return np.abs(x - bound) <= BORDER * abs(bound)


def _overrides(process: Process, method: str) -> bool:
    return getattr(type(process), method) is not getattr(Process, method)


class _Book:
    """The parsed columns of a book of ``n`` contracts."""

    def __init__(self, columns: Mapping[str, Sequence[Any]], n: int) -> None:
        self.n = n
        self.cells = columns
        none: list[Any] = [None] * n
        self.fields = {name: _column(columns.get(name, none), RULES[name]) for name in CONTRACT_COLUMNS}
        self.params: dict[str, Column] = {}
        for name, cells in columns.items():
            if name.startswith(PARAMS_PREFIX):
                values, present, bad = _numbers(cells)
                objects = [v if p else None for v, p in zip(values.tolist(), present.tolist(), strict=True)]
                self.params[name[len(PARAMS_PREFIX) :]] = Column(present, bad, values, objects)

    def field_bad(self) -> Mask:
        """Rows with a field its own rule refuses (a required one absent included)."""
        bad = np.zeros(self.n, dtype=np.bool_)
        for name, col in self.fields.items():
            bad |= col.bad
            if RULES[name].required:
                bad |= ~col.present
        for col in self.params.values():
            bad |= col.bad
        return bad

    def has_param(self, name: str) -> Mask:
        col = self.params.get(name)
        return np.zeros(self.n, dtype=np.bool_) if col is None else col.present

    def param(self, name: str) -> Floats:
        col = self.params.get(name)
        return np.zeros(self.n, dtype=np.float64) if col is None else col.values

    def processes(self) -> list[str]:
        col = self.fields["process"]
        return [PROCESS_DEFAULT if c is None else c for c in col.objects]

    def row(self, i: int) -> dict[str, Any]:
        """Contract ``i`` as the row the book stands for (absent fields left out)."""
        row: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for name, cells in self.cells.items():
            value = cells[i]
            if value is None:
                continue
            if name.startswith(PARAMS_PREFIX):
                params[name[len(PARAMS_PREFIX) :]] = value
            else:
                row[name] = value
        if params:
            row["params"] = params
        return row

    def contract_rules(self, rows: Mask) -> tuple[Mask, Mask]:
        """Contract's model validator over ``rows`` (those whose fields are valid): the
        rows it refuses, and the rows within rounding of a bound computed in floating
        point (to check again one by one)."""
        n = self.n
        bad = np.zeros(n, dtype=np.bool_)
        border = np.zeros(n, dtype=np.bool_)
        f = self.fields
        procs = np.array(self.processes(), dtype=object)
        ref = f["underlying"].present | f["expiry"].present
        any_param = np.zeros(n, dtype=np.bool_)
        for col in self.params.values():
            any_param |= col.present
        explicit_given = any_param.copy()
        for name in ("spot", "expiry_years", "rate", "dividend", "vol"):
            explicit_given |= f[name].present
        for pname, process in PROCESSES.items():
            sel = rows & (procs == pname)
            if not sel.any():
                continue
            b = np.zeros(n, dtype=np.bool_)
            b |= sel & (~f["fixings"].present if process.averages else f["fixings"].present)
            both = f["underlying"].present & f["expiry"].present
            b |= sel & ref & (~both | explicit_given)
            e = sel & ~ref  # explicit contracts
            b |= e & ~(f["spot"].present & f["expiry_years"].present)
            vol_driven = process.market_param_names == ("vol",)
            names = process.param_names
            if vol_driven:
                pvol = self.has_param("vol")
                b |= e & ~f["vol"].present & ~pvol
                for other in self.params:
                    if other != "vol":
                        b |= e & self.has_param(other)
                b |= e & f["vol"].present & pvol
                vol = np.where(f["vol"].present, f["vol"].values, self.param("vol"))
                given = {"vol": vol}
                if process.averages:  # Contract.process_params: carry and fixings
                    given["carry"] = f["rate"].values - f["dividend"].values
                    given["fixings"] = f["fixings"].values
            else:
                b |= e & f["vol"].present
                for pn in names:
                    b |= e & ~self.has_param(pn)
                for other in self.params:
                    if other not in names:
                        b |= e & self.has_param(other)
                given = {pn: self.param(pn) for pn in names}
            live = e & ~b
            with np.errstate(invalid="ignore", over="ignore"):
                for pn, (low, high) in process.param_bounds.items():
                    b |= live & ~((given[pn] >= low) & (given[pn] <= high))
            live &= ~b
            if _overrides(process, "check_params"):  # a process's own rules (asian: whole fixings), row by row
                for k in np.flatnonzero(live).tolist():
                    b[k] = not _params_ok(process, {pn: float(given[pn][k]) for pn in names})
                live &= ~b
            if not live.any():
                bad |= b
                continue
            idx = np.flatnonzero(live)
            t = f["expiry_years"].values[idx]
            theta = np.stack([given[pn][idx] for pn in names], axis=1)
            # vol sqrt(T) where the process takes a vol (correctly rounded, as math's), else the
            # process's numpy twin of its scale (engine/processes/spec.py)
            spread = given["vol"][idx] * np.sqrt(t) if vol_driven else process.scale_np(theta, t)
            with np.errstate(invalid="ignore"):
                wide = ~(spread <= MAX_SCALE)
            b[idx[wide]] = True
            border[idx[_near(spread, MAX_SCALE)]] = True
            if _overrides(process, "check_spread"):
                for k in np.flatnonzero(~wide).tolist():
                    verdicts = {
                        _spread_ok(process, {pn: float(theta[k, j]) for j, pn in enumerate(names)}, t[k], s)
                        for s in (float(spread[k]), float(spread[k]) * (1 - BORDER), float(spread[k]) * (1 + BORDER))
                    }
                    if len(verdicts) > 1:
                        border[idx[k]] = True
                    b[idx[k]] |= False in verdicts
            spot, strike = f["spot"].values[idx], f["strike"].values[idx]
            rate, dividend = f["rate"].values[idx], f["dividend"].values[idx]
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                ratio = process.forward_ratio_np(theta, t, rate, dividend)
                kappa = strike / (spot * ratio)
                low, high = MONEYNESS_BOUNDS
                b[idx[~((kappa >= low) & (kappa <= high))]] = True
            border[idx[_near(kappa, low) | _near(kappa, high)]] = True
            bad |= b
        return bad, border & rows

    def book(self) -> Book:
        """The book's contracts as a :class:`~.book.Book`, read from the parsed columns
        (every row has passed the checks, or ``Contract.model_validate`` where they were
        not conclusive: the values are the cells' own either way)."""
        f = self.fields

        def floats(col: Column) -> Floats:
            return np.where(col.present, col.values, np.nan)

        underlying = f["underlying"]
        by_ref = bool(underlying.present.any())
        return Book(
            id=list(f["id"].objects),
            call=np.array([r == "call" for r in f["right"].objects], dtype=np.bool_),
            strike=floats(f["strike"]),
            spot=floats(f["spot"]),
            expiry_years=floats(f["expiry_years"]),
            rate=floats(f["rate"]),
            dividend=floats(f["dividend"]),
            vol=floats(f["vol"]),
            fixings=floats(f["fixings"]),
            process=self.processes(),
            params={name: floats(col) for name, col in sorted(self.params.items())},
            underlying=list(underlying.objects) if by_ref else None,
            expiry=list(f["expiry"].objects) if by_ref else None,
        )


def _params_ok(process: Process, params: dict[str, float]) -> bool:
    try:
        process.check_params(params)
    except ValueError:
        return False
    return True


def _spread_ok(process: Process, params: dict[str, float], expiry: float, spread: float) -> bool:
    try:
        process.check_spread(params, expiry, spread)
    except ValueError:
        return False
    return True


def _duplicates(ids: Sequence[str], limit: int = 5) -> list[dict[str, Any]]:
    """The first ``limit`` contracts whose id an earlier one has."""
    seen: dict[str, int] = {}
    dupes: list[dict[str, Any]] = []
    for i, cid in enumerate(ids):
        first = seen.setdefault(cid, i)
        if first != i:
            dupes.append(
                {"field": f"contracts[{i}].id", "reason": f"duplicate contract id {cid!r} (also contracts[{first}])"}
            )
            if len(dupes) == limit:
                break
    return dupes


def _row_details(i: int, exc: ValidationError, absent: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Row ``i``'s errors, named ``contracts[i].<field>``; ``absent``: required columns
    the book lacks altogether (their reason says so)."""
    out = []
    for d in format_validation_error(exc):
        name, reason = str(d["field"]), str(d["reason"])
        where = f"contracts[{i}]" + (name.removeprefix("(body)") if name.startswith("(body)") else f".{name}")
        if name in absent:
            reason += f" (the book has no {name} column)"
        out.append({"field": where, "reason": reason})
    return out


def row_verdicts(columns: Mapping[str, Sequence[Any]], n: int) -> tuple[Mask, Mask]:
    """The vectorised verdict on each contract of a structurally sound book: the rows it
    refuses, and the rows it leaves to the row validator (within rounding of a bound).
    Exposed for the equivalence tests; :func:`request_from_columns` uses it."""
    book = _Book(columns, n)
    field_bad = book.field_bad()
    cross_bad, border = book.contract_rules(~field_bad)
    return field_bad | cross_bad, border


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


def request_from_columns(head: Mapping[str, Any], columns: Mapping[str, Sequence[Any]]) -> PriceRequest:
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
    absent = [name for name, rule in RULES.items() if rule.required and name not in columns]
    flagged = np.flatnonzero(field_bad | cross_bad | border).tolist()
    details: list[dict[str, Any]] = []
    refused_rows = 0
    for i in flagged:
        if refused_rows == MAX_DETAILS:
            reason = f"only the first {MAX_DETAILS} invalid contracts are named; contracts[{i}] and after not checked"
            details.append({"field": "contracts", "reason": reason})
            break
        try:
            Contract.model_validate(book.row(i))  # the row schema decides (its errors are the row path's)
        except ValidationError as exc:
            details += _row_details(i, exc, absent)
            refused_rows += 1
    if not details:  # as the row schema: ids are compared once every contract is valid
        details = _duplicates(book.fields["id"].objects)
    if head_errors or details:
        raise _refused(known + details + unknown)
    assert request is not None
    return request_of_book(request, book.book())


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
