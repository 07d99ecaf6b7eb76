"""``spectralmc price``: price one request read on stdin (JSON, or an Arrow IPC stream)
with the bundled models, a checkpoint directory or the served version in a store."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from spectralmc_server.cli.common import EXIT_OK, UsageError, certificate_settings, served_from_store, store_errors


def add_parser(sub: Any) -> None:
    price = sub.add_parser("price", help="price one request read on stdin (JSON, or an Arrow IPC stream)")
    price.add_argument(
        "--format",
        choices=["json", "columns", "arrow"],
        default="json",
        help="stdin and stdout: json (a row or columnar request, answered in kind; the default), columns "
        "(a columnar JSON request, answered as columns) or arrow (an Arrow IPC stream, answered as one)",
    )
    price.add_argument("--store", help="price with the served version of --model in this store")
    price.add_argument("--model", help="model to use (bundled name, or the model's name in --store)")
    price.add_argument("--checkpoint", type=Path, help="price with this checkpoint directory instead")
    price.add_argument(
        "--marketdata",
        help="store URI (file:///absolute/path or s3://bucket/prefix) whose snapshots contracts by reference "
        "(underlying, expiry) are priced from (often = --store)",
    )
    price.add_argument(
        "--settings",
        type=Path,
        help="server settings TOML whose [certificate] table sets the gate (--store) and the tolerances",
    )


def run(args: argparse.Namespace) -> int:
    from spectralmc_server.pricing.door import Entry, admit, parse, value_batch
    from spectralmc_server.pricing.errors import RequestRefusedError
    from spectralmc_server.pricing.resolve import needs_market_data
    from spectralmc_server.pricing.schemas import one_line
    from spectralmc_server.pricing.valuation import dumps

    form, body, head, columns = _price_input(args.format, sys.stdin.buffer.read())
    if args.store is not None and args.checkpoint is not None:
        raise UsageError("give --store or --checkpoint, not both")
    models = _Models(args)
    try:
        request = parse(body) if form == "rows" else _columns_request(head, columns)
        if args.marketdata is None and needs_market_data(request):
            raise UsageError(_needs_marketdata(request))
        request = admit(request, lambda: {p: served.view for p, served in models().items()})
        market = None
        if args.marketdata is not None and needs_market_data(request):
            market = _snapshot_of(args.marketdata, request)
        (response,) = value_batch([Entry(request, models(), market, columnar=form != "rows")])
    except RequestRefusedError as exc:
        raise UsageError(f"invalid request: {one_line(exc.details)}") from None
    if isinstance(response, RequestRefusedError):
        raise UsageError(f"invalid request: {one_line(response.details)}")
    if form == "arrow":
        from spectralmc_server.pricing.arrow import answer_ipc

        sys.stdout.buffer.write(answer_ipc(response, request))
    else:  # rows, or the columnar answer (the Valuer gave it columns)
        sys.stdout.buffer.write(dumps(response) + b"\n")
    return EXIT_OK


class _Models:
    """The served models by process name, loaded on the first call (once the request's
    schema is valid): --checkpoint, --store, or the bundled ones (--model: one of them)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.certificate = certificate_settings(args.settings)
        self.tolerance = {str(m): v for m, v in self.certificate.tolerance.items()}
        self.loaded: dict[str, Any] = {}

    def __call__(self) -> dict[str, Any]:
        from spectralmc_server.engine.checkpoint import CheckpointError

        if not self.loaded:
            try:
                served = self._load()
            except CheckpointError as exc:
                raise UsageError(str(exc)) from None
            self.loaded.update({m.process.name: m for m in served})
        return self.loaded

    def _load(self) -> list[Any]:
        from spectralmc_server.engine.checkpoint import read_dir
        from spectralmc_server.engine.served import load_served_model
        from spectralmc_server.models import bundled_models

        args, tolerance = self.args, self.tolerance
        if args.checkpoint is not None:
            return [load_served_model(read_dir(args.checkpoint, need_training=False), tolerance=tolerance)]
        if args.store is not None:
            return [served_from_store(args.store, args.model or "gbm", self.certificate)]
        available = bundled_models()
        if not available:
            raise RuntimeError("no bundled models found: the package data is missing, reinstall spectralmc-server")
        if args.model is not None and args.model not in available:
            raise UsageError(f"--model: no bundled model {args.model!r}; bundled: {', '.join(available)}")
        names = [args.model] if args.model is not None else list(available)
        return [
            load_served_model(read_dir(available[n], need_training=False), name=n, tolerance=tolerance) for n in names
        ]


def _needs_marketdata(request: Any) -> str:
    """The one-line hint for a request with contracts by reference and no --marketdata:
    the first such contract, the option that resolves it, and val_datetime if unset."""
    from spectralmc_server.pricing.book import cached_book

    book = cached_book(request)
    underlying = book.underlying if book is not None else [c.underlying for c in request.contracts]
    by_ref = [i for i, u in enumerate(underlying or ()) if u is not None]
    others = f" (and {len(by_ref) - 1} more)" if len(by_ref) > 1 else ""
    when = "" if request.val_datetime is not None else "; the request also needs val_datetime to name the snapshot"
    return (
        f"contracts[{by_ref[0]}]{others} is by reference (underlying, expiry): pass --marketdata STORE_URI "
        "(file:///absolute/path or s3://bucket/prefix, often the same as --store) to price it from that "
        "store's market-data snapshot, or give spot, expiry_years, rate, dividend and vol instead" + when
    )


def _snapshot_of(uri: str, request: Any) -> tuple[Any, Any]:
    """The snapshot ``request`` names in the store at ``uri``, as (record, snapshot);
    a RequestRefusedError naming val_datetime when there is none."""
    from spectralmc_server.marketdata.store import SnapshotStore, iso
    from spectralmc_server.pricing.errors import RequestRefusedError
    from spectralmc_server.store.uri import open_store

    with store_errors(), asyncio.Runner() as runner:
        objects = runner.run(open_store(uri))
        try:
            snapshots = SnapshotStore(objects)
            record = runner.run(snapshots.resolve(request.namespace, request.val_datetime, request.data_asof))
            if record is None:
                when = "latest" if request.data_asof is None else iso(request.data_asof)
                reason = (
                    f"no market-data snapshot for {request.namespace}/{iso(request.val_datetime)} as of {when} in {uri}"
                )
                raise RequestRefusedError(reason, [{"field": "val_datetime", "reason": reason}], market=True)
            snapshot = runner.run(snapshots.load(record))
        finally:
            runner.run(objects.close())
    return record, snapshot


def _price_input(fmt: str, raw: bytes) -> tuple[str, Any, dict[str, Any], dict[str, Any]]:
    """stdin of ``spectralmc price --format fmt`` as (form, row body, request-level
    fields, columns): form ``rows`` (the row body set), ``columns`` or ``arrow`` (the
    fields and columns set). UsageError for input that is not of the format."""
    if fmt == "arrow":
        return _arrow_input(raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        hint = " (an Arrow stream needs --format arrow)" if raw[:4] == b"\xff\xff\xff\xff" else ""
        raise UsageError(f"stdin is not valid JSON: {exc}{hint}") from None
    if isinstance(body, dict) and "columns" in body:
        from spectralmc_server.pricing.columns import columns_of_body
        from spectralmc_server.pricing.errors import RequestRefusedError
        from spectralmc_server.pricing.schemas import one_line

        try:
            head, cols = columns_of_body(body)
        except RequestRefusedError as exc:
            raise UsageError(f"invalid request: {one_line(exc.details)}") from None
        return "columns", None, head, dict(cols)
    if fmt == "columns":
        raise UsageError('--format columns reads a columnar request, {"columns": {"id": [...], ...}, ...}')
    return "rows", body, {}, {}


def _arrow_input(raw: bytes) -> tuple[str, Any, dict[str, Any], dict[str, Any]]:
    from spectralmc_server.pricing.arrow import BookFormatError, read_book
    from spectralmc_server.pricing.errors import RequestRefusedError
    from spectralmc_server.pricing.schemas import one_line

    try:
        head, columns = read_book(raw)
    except BookFormatError as exc:
        raise UsageError(f"stdin is not an Arrow book (--format arrow): {one_line(exc.details)}") from None
    except RequestRefusedError as exc:
        raise UsageError(f"invalid request: {one_line(exc.details)}") from None
    return "arrow", None, head, dict(columns)


def _columns_request(head: dict[str, Any], columns: dict[str, Any]) -> Any:
    from spectralmc_server.pricing.columns import request_from_columns

    return request_from_columns(head, columns)
