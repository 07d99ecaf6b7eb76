"""Columnar books, cell by cell: each contract field's rule read from the row schema,
and a column's cells read with numpy (types, nulls, finiteness, bounds) into values and masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.pricing.schemas import (
    Barrier,
    Contract,
)
from spectralmc_server.rfc3339 import parse_date

Mask = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]
# A column's cells: Python values (None where absent), or, for a contract's number column
# read from Arrow without nulls, one float64 array (pricing/arrow.py)
Cells = Sequence[Any] | Floats

PARAMS_PREFIX = "params."
# The contract columns, in the schema's order (params.<name> and barrier.<key> columns aside).
CONTRACT_COLUMNS: tuple[str, ...] = tuple(n for n in Contract.model_fields if n not in ("params", "barrier"))
# A barrier (an object) is flattened as barrier.<key> columns, one per Barrier field:
# barrier.type null is no barrier (and the row's other barrier cells must be null too).
# Rows with a barrier are validated by the row schema itself (pricing/columns.py).
BARRIER_PREFIX = "barrier."
BARRIER_COLUMNS: tuple[str, ...] = tuple(BARRIER_PREFIX + n for n in Barrier.model_fields)
BARRIER_TYPE = BARRIER_PREFIX + "type"
# At most this many invalid contracts are named in one refusal (the first ones, in order).
MAX_DETAILS = 100
# A spread or K/F within this relative distance of its bound is checked by the row
# validator itself: the numpy twins of the engine's formulas (engine/processes/spec.py) may
# round differently from the scalar ones (by a few ulp; a heston spread, whose terms
# cancel, by up to ~2e-13 relative), the row validator is the reference.
BORDER = 1e-9


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
if set(Contract.model_fields) != {*CONTRACT_COLUMNS, "params", "barrier"}:  # pragma: no cover - a schema change
    raise RuntimeError("pricing.columns: Contract's fields changed; review the columnar checks")


def _barrier_kinds() -> dict[str, frozenset[str]]:
    """Each barrier.<key> column's JSON types, read from Barrier's schema (monitoring:
    a string or an integer)."""
    props = Barrier.model_json_schema()["properties"]
    return {
        BARRIER_PREFIX + name: frozenset(str(s["type"]) for s in props[name].get("anyOf", [props[name]]))
        for name in Barrier.model_fields
    }


BARRIER_KINDS = _barrier_kinds()
_READ_BARRIER_KINDS = {  # what the columnar checks and pricing/arrow.py read
    "barrier.type": {"string"},
    "barrier.level": {"number"},
    "barrier.monitoring": {"string", "integer"},
    "barrier.rebate": {"number"},
}
if BARRIER_KINDS != _READ_BARRIER_KINDS:  # pragma: no cover - a schema change
    raise RuntimeError("pricing.columns: Barrier's fields changed; review the barrier columns (pricing/arrow.py too)")
PROCESS_DEFAULT = str(Contract.model_fields["process"].default)


# -- reading the cells ------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool)


def _present(cells: Cells) -> Mask:
    if isinstance(cells, np.ndarray):  # a typed column without nulls (pricing/arrow.py)
        return np.ones(len(cells), dtype=np.bool_)
    if None not in cells:  # one C-level scan where nothing is absent (the common book)
        return np.ones(len(cells), dtype=np.bool_)
    return np.fromiter((c is not None for c in cells), dtype=np.bool_, count=len(cells))


def _numbers(cells: Cells) -> tuple[Floats, Mask, Mask]:
    """The cells as float64 (0 where absent or not a number), which are present, and
    which are present but not a finite number."""
    n = len(cells)
    if isinstance(cells, np.ndarray):  # a float64 column without nulls (pricing/arrow.py)
        values = np.asarray(cells, dtype=np.float64).reshape(n)
        present = np.ones(n, dtype=np.bool_)
        bad = ~np.isfinite(values)
    elif set(map(type, cells)) <= {float}:
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
    values to build contracts from, for the other fields: ints, strings, dates; None
    where absent; empty for a number, whose ``values`` are what the book is built from)."""

    present: Mask
    bad: Mask
    values: Floats
    objects: list[Any] = field(default_factory=list)


def _column(cells: Cells, rule: FieldRule) -> Column:
    n = len(cells)
    if rule.kind == "number":
        values, present, bad = _numbers(cells)
        return Column(present, _bounded(values, present, bad, rule), values)
    # pricing/arrow.py gives arrays for number fields only; any other field is read cell by cell
    seq: Sequence[Any] = cells.tolist() if isinstance(cells, np.ndarray) else cells
    present = _present(seq)
    zeros = np.zeros(n, dtype=np.float64)
    if rule.kind == "integer":
        ok = np.fromiter((isinstance(c, int) and not isinstance(c, bool) for c in seq), dtype=np.bool_, count=n)
        # bounds compared as float: exact within 2**53, and monotone beyond (far out of bounds)
        values = np.array([float(c) if k else 0.0 for c, k in zip(seq, ok.tolist(), strict=True)], dtype=np.float64)
        bad = _bounded(values, present, present & ~ok, rule)
        return Column(present, bad, values.reshape(n), list(seq))
    if rule.kind == "date":
        return _date_column(seq, present, zeros)
    return _string_column(seq, rule, present, zeros)


def absent_column(n: int) -> Column:
    """A field the book has no column for: every cell absent."""
    none = np.zeros(n, dtype=np.bool_)
    return Column(none, none.copy(), np.zeros(n, dtype=np.float64), [None] * n)


def _date_column(cells: Sequence[Any], present: Mask, zeros: Floats) -> Column:
    parsed: list[date | None] = []
    bad = np.zeros(len(cells), dtype=np.bool_)
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


def _outside(strings: list[str], allowed: frozenset[str]) -> Mask:
    """Which strings are not among ``allowed`` (one set test where all are)."""
    if set(strings) <= allowed:
        return np.zeros(len(strings), dtype=np.bool_)
    return np.fromiter((s not in allowed for s in strings), dtype=np.bool_, count=len(strings))


def _string_column(cells: Sequence[Any], rule: FieldRule, present: Mask, zeros: Floats) -> Column:
    n = len(cells)
    if set(map(type, cells)) <= {str}:  # every cell a str (no subclass): no per-cell checks
        ok = np.ones(n, dtype=np.bool_)
        strings = list(cells)
    else:
        ok = np.fromiter((isinstance(c, str) for c in cells), dtype=np.bool_, count=n)
        strings = [c if k else "" for c, k in zip(cells, ok.tolist(), strict=True)]
    bad = present & ~ok
    if rule.min_length is not None or rule.max_length is not None:
        lengths = np.fromiter(map(len, strings), dtype=np.int64, count=n)
        if rule.min_length is not None:
            bad |= ok & (lengths < rule.min_length)
        if rule.max_length is not None:
            bad |= ok & (lengths > rule.max_length)
    if rule.enum is not None:
        bad |= ok & _outside(strings, rule.enum)
    if rule.name == "process":
        bad |= ok & _outside(strings, frozenset(PROCESSES))
    return Column(present, bad, zeros, list(cells))
