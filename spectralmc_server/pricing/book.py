"""A book of contracts as columns: what the pricing code computes with.

A request arrives as rows (JSON objects), columns (JSON arrays) or Arrow; whatever its
form, the Valuer reads the contracts as one :class:`Book`: a numpy array per numeric
field (NaN where the field is absent), a list per text field. Building the engine's
:class:`~spectralmc_server.engine.pricer.OptionBatch` for a process is then a handful of
array operations instead of a pass over contract objects, and a slice of a book is a
view.

A Book holds validated contracts only: it is made from validated
:class:`~spectralmc_server.pricing.schemas.Contract` objects (:meth:`Book.of`) or by the
columnar validator, which checks every rule the schema checks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, cast, overload

import numpy as np
import torch

from spectralmc_server.engine.pricer import OptionBatch
from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.pricing.schemas import Barrier, Contract, PriceRequest

FloatColumn = np.ndarray[Any, np.dtype[np.float64]]
NUMERIC = ("strike", "spot", "expiry_years", "rate", "dividend", "vol", "fixings")


def _zero_absent(column: FloatColumn) -> FloatColumn:
    """An optional input with 0 where absent, as ``c.rate or 0.0`` gives it (a -0.0 given
    becomes 0.0 too: the batch is the same bits whichever way the zero was written)."""
    out: FloatColumn = np.nan_to_num(column, nan=0.0) + 0.0
    return out


def _floats(values: Sequence[float | int | None]) -> FloatColumn:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Book:
    """n contracts as columns. ``params`` holds one column per parameter name any
    contract of the book gives (NaN for the contracts that do not)."""

    id: list[str]
    call: np.ndarray[Any, np.dtype[np.bool_]]
    strike: FloatColumn
    spot: FloatColumn
    expiry_years: FloatColumn
    rate: FloatColumn
    dividend: FloatColumn
    vol: FloatColumn
    fixings: FloatColumn
    process: list[str]
    params: dict[str, FloatColumn] = field(default_factory=dict)
    underlying: list[str | None] | None = None  # None: every contract is explicit
    expiry: list[date | None] | None = None
    barrier: list[Barrier | None] | None = None  # None: no contract has a barrier

    def __len__(self) -> int:
        return len(self.id)

    @classmethod
    def of(cls, contracts: Sequence[Contract]) -> Book:
        """The book of validated contracts, in one pass."""
        names = sorted({k for c in contracts if c.params for k in c.params})
        by_ref = any(c.underlying is not None for c in contracts)
        barriers = any(c.barrier is not None for c in contracts)
        return cls(
            id=[c.id for c in contracts],
            call=np.array([c.right == "call" for c in contracts], dtype=np.bool_),
            strike=_floats([c.strike for c in contracts]),
            spot=_floats([c.spot for c in contracts]),
            expiry_years=_floats([c.expiry_years for c in contracts]),
            rate=_floats([c.rate for c in contracts]),
            dividend=_floats([c.dividend for c in contracts]),
            vol=_floats([c.vol for c in contracts]),
            fixings=_floats([c.fixings for c in contracts]),
            process=[c.process for c in contracts],
            params={n: _floats([(c.params or {}).get(n) for c in contracts]) for n in names},
            underlying=[c.underlying for c in contracts] if by_ref else None,
            expiry=[c.expiry for c in contracts] if by_ref else None,
            barrier=[c.barrier for c in contracts] if barriers else None,
        )

    @classmethod
    def concat(cls, books: Sequence[Book]) -> Book:
        """The books one after the other (a batch of requests as one book)."""
        if len(books) == 1:
            return books[0]
        names = sorted({n for b in books for n in b.params})
        by_ref = any(b.underlying is not None for b in books)
        barriers = any(b.barrier is not None for b in books)

        def cat(name: str) -> FloatColumn:
            return np.concatenate([getattr(b, name) for b in books])

        def listed(b: Book, name: str) -> list[Any]:
            got: list[Any] | None = getattr(b, name)
            return [None] * len(b) if got is None else got

        return cls(
            id=[x for b in books for x in b.id],
            call=np.concatenate([b.call for b in books]),
            strike=cat("strike"),
            spot=cat("spot"),
            expiry_years=cat("expiry_years"),
            rate=cat("rate"),
            dividend=cat("dividend"),
            vol=cat("vol"),
            fixings=cat("fixings"),
            process=[x for b in books for x in b.process],
            params={n: np.concatenate([b.params.get(n, np.full(len(b), np.nan)) for b in books]) for n in names},
            underlying=[x for b in books for x in listed(b, "underlying")] if by_ref else None,
            expiry=[x for b in books for x in listed(b, "expiry")] if by_ref else None,
            barrier=[x for b in books for x in listed(b, "barrier")] if barriers else None,
        )

    def rows(self, start: int, stop: int) -> Book:
        """Contracts ``start:stop`` (views of the columns, no copy)."""
        return Book(
            id=self.id[start:stop],
            call=self.call[start:stop],
            strike=self.strike[start:stop],
            spot=self.spot[start:stop],
            expiry_years=self.expiry_years[start:stop],
            rate=self.rate[start:stop],
            dividend=self.dividend[start:stop],
            vol=self.vol[start:stop],
            fixings=self.fixings[start:stop],
            process=self.process[start:stop],
            params={n: v[start:stop] for n, v in self.params.items()},
            underlying=None if self.underlying is None else self.underlying[start:stop],
            expiry=None if self.expiry is None else self.expiry[start:stop],
            barrier=None if self.barrier is None else self.barrier[start:stop],
        )

    def take(self, index: np.ndarray[Any, np.dtype[np.intp]]) -> Book:
        """The contracts at ``index`` (an integer array), in that order."""
        idx = index.tolist()
        return Book(
            id=[self.id[i] for i in idx],
            call=self.call[index],
            strike=self.strike[index],
            spot=self.spot[index],
            expiry_years=self.expiry_years[index],
            rate=self.rate[index],
            dividend=self.dividend[index],
            vol=self.vol[index],
            fixings=self.fixings[index],
            process=[self.process[i] for i in idx],
            params={n: v[index] for n, v in self.params.items()},
            underlying=None if self.underlying is None else [self.underlying[i] for i in idx],
            expiry=None if self.expiry is None else [self.expiry[i] for i in idx],
            barrier=None if self.barrier is None else [self.barrier[i] for i in idx],
        )

    @property
    def all_explicit(self) -> bool:
        return self.underlying is None or all(u is None for u in self.underlying)

    def by_process(self) -> dict[str, np.ndarray[Any, np.dtype[np.intp]]]:
        """The contracts' indices per process name, in book order."""
        if len(set(self.process)) == 1:
            return {self.process[0]: np.arange(len(self), dtype=np.intp)} if len(self) else {}
        out: dict[str, list[int]] = {}
        for i, p in enumerate(self.process):
            out.setdefault(p, []).append(i)
        return {p: np.array(ix, dtype=np.intp) for p, ix in out.items()}

    def theta(self, process: str) -> FloatColumn:
        """(n, P) parameters of ``process`` for every contract (all of that process and
        explicit), in the engine's parameter order; as Contract.process_params gives them."""
        proc = PROCESSES[process]
        n = len(self)
        columns: list[FloatColumn] = []
        for name in proc.param_names:
            if name == "vol":
                given = self.params.get("vol")
                col = self.vol if given is None else np.where(np.isnan(self.vol), given, self.vol)
            elif name == "carry" and proc.averages:
                col = _zero_absent(self.rate) - _zero_absent(self.dividend)
            elif name == "fixings" and proc.averages:
                col = self.fixings
            else:
                col = self.params.get(name, np.full(n, np.nan))
            columns.append(col)
        return np.stack(columns, axis=1) if columns else np.zeros((n, 0))

    def option_batch(self, process: str) -> OptionBatch:
        """The engine's batch for a book whose contracts are all of ``process`` and
        explicit (rate and dividend default to 0)."""
        table = np.column_stack(
            [
                self.spot,
                self.strike,
                self.expiry_years,
                _zero_absent(self.rate),
                _zero_absent(self.dividend),
                self.theta(process),
            ]
        )
        t = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float64))
        return OptionBatch(
            spot=t[:, 0],
            strike=t[:, 1],
            expiry=t[:, 2],
            rate=t[:, 3],
            dividend=t[:, 4],
            is_call=torch.from_numpy(self.call.copy()),
            theta=t[:, 5:],
        )

    def contract(self, i: int) -> Contract:
        """Contract ``i`` as the schema's object (built, not validated again: a Book
        holds validated contracts only)."""
        fields: dict[str, Any] = {"id": self.id[i], "right": "call" if self.call[i] else "put"}
        for name in NUMERIC:
            v = float(getattr(self, name)[i])
            if not np.isnan(v):
                fields[name] = int(v) if name == "fixings" else v
        fields["process"] = self.process[i]
        params = {n: float(col[i]) for n, col in self.params.items() if not np.isnan(col[i])}
        if params:
            fields["params"] = params
        if self.underlying is not None and self.underlying[i] is not None:
            fields["underlying"] = self.underlying[i]
        if self.expiry is not None and self.expiry[i] is not None:
            fields["expiry"] = self.expiry[i]
        if self.barrier is not None and self.barrier[i] is not None:
            fields["barrier"] = self.barrier[i]
        return Contract.model_construct(**fields)

    def barrier_rows(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Which contracts have a barrier."""
        if self.barrier is None:
            return np.zeros(len(self), dtype=np.bool_)
        return np.fromiter((b is not None for b in self.barrier), dtype=np.bool_, count=len(self))


class LazyContracts(Sequence[Contract]):
    """A request's contracts, built from its Book only where something reads them one
    by one (contracts by reference being resolved, an error message): the pricing path
    reads the Book."""

    def __init__(self, book: Book) -> None:
        self.book = book
        self._built: dict[int, Contract] = {}

    def __len__(self) -> int:
        return len(self.book)

    @overload
    def __getitem__(self, i: int) -> Contract: ...

    @overload
    def __getitem__(self, i: slice) -> LazyContracts: ...

    def __getitem__(self, i: int | slice) -> Contract | LazyContracts:
        if isinstance(i, slice):
            return LazyContracts(self.book.take(np.arange(len(self.book), dtype=np.intp)[i]))
        if i < 0:
            i += len(self.book)
        if not 0 <= i < len(self.book):
            raise IndexError(i)
        got = self._built.get(i)
        if got is None:
            got = self._built[i] = self.book.contract(i)
        return got

    def __iter__(self) -> Iterator[Contract]:
        return (self[i] for i in range(len(self.book)))


def request_of_book(head: PriceRequest, book: Book) -> PriceRequest:
    """A request with ``head``'s request-level fields and ``book`` as its contracts
    (validated elsewhere: nothing is checked again)."""
    contracts = LazyContracts(book)
    fields = {k: getattr(head, k) for k in ("namespace", "val_datetime", "data_asof", "measures", "quantile_levels")}
    # a Sequence where the schema says list: every reader indexes, slices or iterates it
    request = PriceRequest.model_construct(**fields, contracts=cast(list[Contract], contracts))
    request._book = (contracts, book)
    return request


def cached_book(request: PriceRequest) -> Book | None:
    """The request's Book where one is already built (or given), else None."""
    private = request.__pydantic_private__  # the dict itself: pydantic's __getattr__ costs ~2 us
    cached = private.get("_book") if private else None
    if cached is not None and cached[0] is request.contracts:
        book: Book = cached[1]
        return book
    return None


def book_of_requests(requests: Sequence[PriceRequest]) -> Book:
    """The contracts of ``requests`` one after the other as one Book: the Books already
    built are joined, the other requests' contracts read in one pass (many small
    requests cost one Book, not one each)."""
    parts: list[Book] = []
    loose: list[Contract] = []
    for r in requests:
        book = cached_book(r)
        if book is None:
            loose.extend(r.contracts)
            continue
        if loose:
            parts.append(Book.of(loose))
            loose = []
        parts.append(book)
    if loose:
        parts.append(Book.of(loose))
    return Book.concat(parts)


def all_explicit(request: PriceRequest) -> bool:
    """No contract of the request is by reference (read from its Book where it has one,
    else from its contract objects: no Book is built for this)."""
    book = cached_book(request)
    if book is not None:
        return book.all_explicit
    return all(c.underlying is None for c in request.contracts)


def processes(request: PriceRequest) -> set[str]:
    """The process names of the request's contracts (no Book is built for this)."""
    book = cached_book(request)
    return set(book.process if book is not None else (c.process for c in request.contracts))


def book_of(request: PriceRequest) -> Book:
    """The request's contracts as a Book, built once per contracts list."""
    book = cached_book(request)
    if book is not None:
        return book
    book = Book.of(request.contracts)
    request._book = (request.contracts, book)
    return book


def sliced(request: PriceRequest, start: int, end: int) -> PriceRequest:
    """Contracts ``start:end`` of ``request`` as a request of their own (its Book is a
    slice of the request's)."""
    book = book_of(request).take(np.arange(start, end, dtype=np.intp))
    lazy = isinstance(request.contracts, LazyContracts)
    contracts = cast(list[Contract], LazyContracts(book)) if lazy else request.contracts[start:end]
    part = request.model_copy(update={"contracts": contracts})
    part._book = (contracts, book)
    return part
