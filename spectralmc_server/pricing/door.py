"""The pricing front door, the same for ``spectralmc price`` and the server.

A request enters the pricing code here, twice at most and never more:

- :func:`admit` takes a decoded body and gives a checked :class:`PriceRequest`: its
  schema, the inputs a snapshot cannot fix (``val_datetime`` for contracts by
  reference), and the checks against the served models (moments' spread, bounded
  simulated-reference cost) on its explicit contracts. Every refusal is a
  :class:`RequestRefusedError` naming the field and the reason. It runs no torch: the
  server's HTTP process admits by it (lazy_torch.py).
- :func:`value_batch` takes the requests of one batch (or parts of them: a large
  request is priced in slices), makes the ones by reference explicit against their
  snapshot, checks what the snapshot filled in and what needs torch (moments that are
  infinite or past float64, simulated and refined reference work), and values them all in one
  :class:`~spectralmc_server.pricing.valuation.Valuer` call per model set. A request that
  fails there fails alone; the others are answered.

The server's batcher calls :func:`value_batch` on the engine; the CLI calls it in
process. Neither rewrites requests or maps errors itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from pydantic import ValidationError

from spectralmc_server.engine.pricer import PRICE_MEASURES, REFERENCE_SPECTRUM
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.refined import refine_level
from spectralmc_server.engine.view import ModelView
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.pricing.book import book_of, processes
from spectralmc_server.pricing.columns import request_from_columns, rows_as_columns
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.resolve import explicit_request
from spectralmc_server.pricing.schemas import PriceRequest, format_validation_error
from spectralmc_server.pricing.valuation import (
    MAX_REFINED_REFERENCE_POINTS,
    MAX_SIMULATED_REFERENCE_POINTS,
    NonFiniteResultError,
    RequestError,
    Valuer,
    check_explicit,
    check_inputs,
    check_moments,
    check_request,
)

if TYPE_CHECKING:  # the network's modules (and torch) only where a model is served: lazy_torch.py
    from spectralmc_server.engine.served import ServedModel

log = logging.getLogger(__name__)

Models: TypeAlias = "Mapping[str, ServedModel]"  # a string: ServedModel imports torch (lazy_torch.py)
Views = Mapping[str, ModelView]
# Below this many contracts the row schema is faster than the columnar checks (their
# numpy calls cost ~0.2 ms whatever the size; the schema ~5-8 us a contract; measured).
COLUMNAR_MIN_CONTRACTS = 64


def parse(body: Any) -> PriceRequest:
    """``body`` (decoded JSON rows, or a request already validated) as a request, or
    RequestRefusedError with the row schema's details.

    Rows of at least COLUMNAR_MIN_CONTRACTS contracts take the columnar checks first
    (pricing/columns.py: numpy over the book, no object per contract), which accept
    exactly what the row schema accepts
    (tests/service/test_columns.py, tests/service/test_rows_fast_path.py). Whatever they
    refuse, or cannot read as columns, goes through ``PriceRequest.model_validate``, so
    an invalid request's errors are always the row schema's own."""
    if isinstance(body, PriceRequest):
        return body
    rows = body.get("contracts") if isinstance(body, dict) else None
    as_columns = rows_as_columns(body) if isinstance(rows, list) and len(rows) >= COLUMNAR_MIN_CONTRACTS else None
    if as_columns is not None:
        with contextlib.suppress(RequestRefusedError):
            return request_from_columns(*as_columns)
    try:
        request = PriceRequest.model_validate(body)
    except ValidationError as exc:
        details = format_validation_error(exc)
        raise RequestRefusedError(f"{len(details)} invalid field(s)", details) from None
    if as_columns is not None:  # the two paths disagree: the row schema's answer stands
        log.warning("the columnar checks refused a request the row schema accepts; priced as rows")
    return request


def admit(body: Any, models: Callable[[], Views]) -> PriceRequest:
    """``body`` (decoded JSON) as a checked request, or :class:`RequestRefusedError`.

    ``models`` is called only once the body is valid (the server raises its own
    not-ready answer there): the explicit contracts are checked against those models.
    Contracts by reference are checked again by :func:`value_batch` once resolved.
    """
    request = parse(body)
    try:
        check_inputs(request)
    except RequestError as exc:
        raise RequestRefusedError.of(exc) from None
    served = models()
    try:
        check_request(request, served)
    except RequestError as exc:
        raise RequestRefusedError.of(exc) from None
    return request


@dataclass
class Entry:
    """One request (or one slice of it) in a batch: ``offset`` is the slice's first
    contract in the whole request; ``market`` the snapshot its contracts by reference
    take their inputs from (None: it has none)."""

    request: PriceRequest
    models: Models
    market: tuple[SnapshotRecord, MarketSnapshot] | None = None
    offset: int = 0
    columnar: bool = False  # answer with ``columns`` (Valuer.value_many), not ``results``


def check_simulated(request: PriceRequest, models: Models) -> None:
    """Refuse (RequestError) a request that would send more than
    ``MAX_SIMULATED_REFERENCE_POINTS`` distinct (parameters, expiry) points to a simulated
    reference, counting what only the served model knows: learned prices past their
    tolerance go there too (:meth:`ModelPricer.simulated_rows`). ``check_cost`` refuses
    most such requests earlier, from the model's view, without torch."""
    if all(get_process(name).has_analytic_cf for name in processes(request)):
        return
    measures = frozenset(request.measures)
    book = book_of(request)
    for name, index in book.by_process().items():
        served = models.get(name)
        if get_process(name).has_analytic_cf or served is None:
            continue
        part = book.take(index)
        batch = part.option_batch(name)
        rows = served.pricer.simulated_rows(batch, measures)
        if not bool(rows.any()):
            continue
        keys = torch.cat([batch.theta, batch.expiry[:, None]], 1)[rows]
        points = len({tuple(k) for k in keys.tolist()})
        if points > MAX_SIMULATED_REFERENCE_POINTS:
            raise RequestError(
                "contracts",
                f"{points} distinct {name} points (parameters and expiry) must be priced by simulation (outside "
                f"the served model's domain or certified strike range, or where its certified price bound passes "
                f"the tolerance; ~0.4 s each); at most {MAX_SIMULATED_REFERENCE_POINTS} per request: split the "
                "request",
                market=False,
            )


def check_refined(request: PriceRequest, models: Models) -> None:
    """Refuse (RequestError) a request that would send more than
    ``MAX_REFINED_REFERENCE_POINTS`` distinct points to the analytic reference at 32,768
    terms or more (a series that has not converged at fewer: engine/refined.py), the
    reference's costliest work (~70 ms a point at 131,072 terms)."""
    if not set(request.measures) & set(PRICE_MEASURES):
        return  # only price measures are refined
    names = [n for n in processes(request) if n != "gbm" and get_process(n).has_analytic_cf]
    if not names:
        return
    book = book_of(request)
    for name, index in book.by_process().items():
        if name not in names:
            continue
        batch = book.take(index).option_batch(name)
        served = models.get(name)
        rows = torch.ones(len(batch), dtype=torch.bool)
        if served is not None:
            rows = ~served.pricer.servable(batch, frozenset(request.measures))
        if not bool(rows.any()):
            continue
        keys = torch.unique(torch.cat([batch.theta, batch.expiry[:, None]], 1)[rows], dim=0)
        level = refine_level(get_process(name), REFERENCE_SPECTRUM, keys[:, :-1].contiguous(), keys[:, -1].contiguous())
        points = int((level >= 2).sum())
        if points > MAX_REFINED_REFERENCE_POINTS:
            raise RequestError(
                "contracts",
                f"{points} distinct {name} points (parameters and expiry) are priced by the reference at 32,768 "
                f"terms or more (heavy-tailed or spiked laws, ~70 ms each); at most {MAX_REFINED_REFERENCE_POINTS} "
                "per request: split the request",
                market=False,
            )


def value_batch(entries: Sequence[Entry]) -> list[dict[str, Any] | RequestRefusedError]:
    """An answer (the response dict, ``market_data`` set) or a :class:`RequestRefusedError` per
    entry, in order. Entries sharing a model set are valued in one Valuer call."""
    out: list[dict[str, Any] | RequestRefusedError | None] = [None] * len(entries)
    groups: dict[int, tuple[Models, list[tuple[int, PriceRequest, dict[str, str] | None, bool]]]] = {}
    for k, entry in enumerate(entries):
        request, key = entry.request, None
        try:
            if entry.market is not None:
                request = explicit_request(request, *entry.market)
                key = entry.market[0].key()
            check_explicit(request)  # by reference with no snapshot to take inputs from
            check_request(request, {p: served.view for p, served in entry.models.items()})
            check_moments(request)
            check_simulated(request, entry.models)
            check_refined(request, entry.models)
        except RequestError as exc:
            out[k] = RequestRefusedError.of(exc, entry.offset)
            continue
        groups.setdefault(id(entry.models), (entry.models, []))[1].append((k, request, key, entry.columnar))
    for models, members in groups.values():
        valuer = Valuer(models)
        try:
            got: list[dict[str, Any] | RequestRefusedError] = list(
                valuer.value_many([r for _, r, _, _ in members], [c for _, _, _, c in members])
            )
        except NonFiniteResultError:  # a bug: answer the others, fail only the culprit(s)
            log.exception("a non-finite result in a batch; pricing its requests one by one")
            got = []
            for _, r, _, c in members:
                try:
                    got.append(valuer.value_many([r], [c])[0])
                except NonFiniteResultError as exc:
                    reason = f"not priced: {exc}"
                    got.append(RequestRefusedError(f"contracts: {reason}", [{"field": "contracts", "reason": reason}]))
        for (k, _, key, _), answer in zip(members, got, strict=True):
            if isinstance(answer, dict):
                answer["market_data"] = key
            out[k] = answer
    assert all(a is not None for a in out)
    return [a for a in out if a is not None]
