"""Columnar books, contract by contract: every rule of the row schema across fields
(processes, vol against params, fixings, contracts by reference, parameter bounds, spread,
K/F, unique ids) vectorised over a book, the borderline and refused rows decided by the
row schema itself, and so are the rows with a barrier (barrier.<key> columns)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.engine.processes.base import MAX_SCALE, MONEYNESS_BOUNDS, Process
from spectralmc_server.pricing.book import Book
from spectralmc_server.pricing.cells import (
    BARRIER_PREFIX,
    BARRIER_TYPE,
    BORDER,
    CONTRACT_COLUMNS,
    PARAMS_PREFIX,
    PROCESS_DEFAULT,
    RULES,
    Cells,
    Column,
    Floats,
    Mask,
    _column,
    _numbers,
    _present,
    absent_column,
)
from spectralmc_server.pricing.schemas import (
    Barrier,
    format_validation_error,
)

# -- the contract rules, vectorised ------------------------------------------------------


def _near(x: Floats, bound: float) -> Mask:
    with np.errstate(invalid="ignore"):
        return np.abs(x - bound) <= BORDER * abs(bound)


def _overrides(process: Process, method: str) -> bool:
    return getattr(type(process), method) is not getattr(Process, method)


class _Book:
    """The parsed columns of a book of ``n`` contracts."""

    def __init__(self, columns: Mapping[str, Cells], n: int) -> None:
        self.n = n
        self.cells = columns
        self.fields = {
            name: _column(columns[name], RULES[name]) if name in columns else absent_column(n)
            for name in CONTRACT_COLUMNS
        }
        self.params: dict[str, Column] = {}
        for name, cells in columns.items():
            if name.startswith(PARAMS_PREFIX):
                values, present, bad = _numbers(cells)
                self.params[name[len(PARAMS_PREFIX) :]] = Column(present, bad, values)
        self.barrier_cells = {name: cells for name, cells in columns.items() if name.startswith(BARRIER_PREFIX)}

    def barrier_rows(self) -> tuple[Mask, Mask]:
        """The rows with a barrier (barrier.type not null: the row schema validates them),
        and the rows without one that give other barrier.<key> cells (refused)."""
        n = self.n
        typed = np.zeros(n, dtype=np.bool_)
        stray = np.zeros(n, dtype=np.bool_)
        for name, cells in self.barrier_cells.items():
            if name == BARRIER_TYPE:
                typed = _present(cells)
            else:
                stray |= _present(cells)
        return typed, stray & ~typed

    def stray_barrier_cells(self, i: int) -> list[dict[str, Any]]:
        """Row ``i``'s barrier cells given without barrier.type, each an error."""
        types = self.barrier_cells.get(BARRIER_TYPE)
        if not self.barrier_cells or (types is not None and types[i] is not None):
            return []
        return [
            {
                "field": f"contracts[{i}].{name}",
                "reason": "given for a contract without a barrier (barrier.type is null): give barrier.type, "
                f"or leave every barrier.* cell of the contract null (got {cells[i]!r})",
            }
            for name, cells in self.barrier_cells.items()
            if cells[i] is not None
        ]

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
        if not col.present.any():
            return [PROCESS_DEFAULT] * self.n
        return [PROCESS_DEFAULT if c is None else c for c in col.objects]

    def row(self, i: int) -> dict[str, Any]:
        """Contract ``i`` as the row the book stands for (absent fields left out)."""
        row: dict[str, Any] = {}
        params: dict[str, Any] = {}
        barrier: dict[str, Any] = {}
        for name, cells in self.cells.items():
            value = cells[i]
            if isinstance(value, np.generic):  # a typed column's cell (pricing/arrow.py)
                value = value.item()
            if value is None:
                continue
            if name.startswith(PARAMS_PREFIX):
                params[name[len(PARAMS_PREFIX) :]] = value
            elif name.startswith(BARRIER_PREFIX):
                barrier[name[len(BARRIER_PREFIX) :]] = value
            else:
                row[name] = value
        if params:
            row["params"] = params
        if "type" in barrier:  # barrier.type null: no barrier (other cells: stray_barrier_cells)
            row["barrier"] = barrier
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
        explicit_given = np.zeros(n, dtype=np.bool_)
        for col in self.params.values():
            explicit_given |= col.present
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
            given = self._inputs_of(process, e, b)
            live = self._parameter_rules(process, given, e & ~b, b)
            if live.any():
                self._spread_and_moneyness(process, given, np.flatnonzero(live), b, border)
            bad |= b
        return bad, border & rows

    def _inputs_of(self, process: Process, e: Mask, b: Mask) -> dict[str, Floats]:
        """The process's inputs of the explicit rows ``e`` as columns (Contract.process_params),
        marking in ``b`` the rows that give them in the wrong form."""
        f = self.fields
        if process.market_param_names == ("vol",):
            pvol = self.has_param("vol")
            b |= e & ~f["vol"].present & ~pvol
            for other in self.params:
                if other != "vol":
                    b |= e & self.has_param(other)
            b |= e & f["vol"].present & pvol
            given = {"vol": np.where(f["vol"].present, f["vol"].values, self.param("vol"))}
            if process.averages:  # Contract.process_params: carry and fixings
                given["carry"] = f["rate"].values - f["dividend"].values
                given["fixings"] = f["fixings"].values
            return given
        names = process.param_names
        b |= e & f["vol"].present
        for pn in names:
            b |= e & ~self.has_param(pn)
        for other in self.params:
            if other not in names:
                b |= e & self.has_param(other)
        return {pn: self.param(pn) for pn in names}

    @staticmethod
    def _parameter_rules(process: Process, given: dict[str, Floats], live: Mask, b: Mask) -> Mask:
        """Each parameter's bounds, then the process's own rules row by row; the rows
        still live."""
        with np.errstate(invalid="ignore", over="ignore"):
            for pn, (low, high) in process.param_bounds.items():
                b |= live & ~((given[pn] >= low) & (given[pn] <= high))
        live = live & ~b
        if _overrides(process, "check_params"):  # a process's own rules (asian: whole fixings), row by row
            names = process.param_names
            for k in np.flatnonzero(live).tolist():
                b[k] = not _params_ok(process, {pn: float(given[pn][k]) for pn in names})
            live &= ~b
        return live

    def _spread_and_moneyness(
        self, process: Process, given: dict[str, Floats], idx: npt.NDArray[np.intp], b: Mask, border: Mask
    ) -> None:
        """The rules tying inputs together at rows ``idx``: the spread and what the process
        needs of it, and K/F; rows within rounding of a bound into ``border``."""
        f = self.fields
        names = process.param_names
        t = f["expiry_years"].values[idx]
        theta = np.stack([given[pn][idx] for pn in names], axis=1)
        # vol sqrt(T) where the process takes a vol (correctly rounded, as math's), else the
        # process's numpy twin of its scale (engine/processes/spec.py)
        vol_driven = process.market_param_names == ("vol",)
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

    def absent_columns(self) -> list[str]:
        """The required fields the book has no column for (barrier.level where it has a
        barrier.type column): their errors say so."""
        absent = [name for name, rule in RULES.items() if rule.required and name not in self.cells]
        if BARRIER_TYPE in self.cells:
            absent += [
                BARRIER_PREFIX + k
                for k, info in Barrier.model_fields.items()
                if info.is_required() and BARRIER_PREFIX + k not in self.cells
            ]
        return absent

    def book(self, barriers: Mapping[int, Barrier] | None = None) -> Book:
        """The book's contracts as a :class:`~.book.Book`, read from the parsed columns
        (every row has passed the checks, or ``Contract.model_validate`` where they were
        not conclusive: the values are the cells' own either way); ``barriers``: row ->
        its barrier as the row schema built it, for the rows that have one."""
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
            barrier=[barriers.get(i) for i in range(self.n)] if barriers else None,
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
    if len(set(ids)) == len(ids):
        return []
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


def row_verdicts(columns: Mapping[str, Cells], n: int) -> tuple[Mask, Mask]:
    """The vectorised verdict on each contract of a structurally sound book: the rows it
    refuses (barrier cells without barrier.type included), and the rows it leaves to the
    row validator (within rounding of a bound, or with a barrier). Exposed for the
    equivalence tests; :func:`request_from_columns` decides the same way."""
    book = _Book(columns, n)
    field_bad = book.field_bad()
    cross_bad, border = book.contract_rules(~field_bad)
    typed, stray = book.barrier_rows()
    return field_bad | cross_bad | stray, border | typed
