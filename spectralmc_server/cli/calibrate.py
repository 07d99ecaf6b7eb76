"""``spectralmc calibrate``: fit a process to an underlying's vol surface in a
market-data snapshot (through the learned model, or the analytic CF)."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from spectralmc_server.cli.common import EXIT_OK, UsageError, served_from_store, store_errors
from spectralmc_server.pricing.calibratable import CALIBRATABLE


def add_parser(sub: Any) -> None:
    cal = sub.add_parser("calibrate", help="fit a process to an underlying's vol surface in a market-data snapshot")
    cal.add_argument("--marketdata", required=True, help="store URI holding the snapshots (file:///path or s3://...)")
    cal.add_argument("--namespace", default="default", help="snapshot namespace (default: default)")
    cal.add_argument(
        "--val-datetime", required=True, help="the snapshot's val_datetime (RFC 3339: 2026-11-26T16:00:00Z)"
    )
    cal.add_argument("--asof", help="use the latest snapshot with data_asof <= this (RFC 3339; default: the latest)")
    cal.add_argument("--underlying", required=True, help="whose surface to fit")
    cal.add_argument(
        "--process", default="heston", choices=CALIBRATABLE, help="process to fit (heston, the default, or rbergomi)"
    )
    cal.add_argument("--store", help="fit through the served version of the model in this store")
    cal.add_argument("--checkpoint", type=Path, help="fit through this checkpoint directory")
    cal.add_argument(
        "--reference", action="store_true", help="fit through the analytic CF, not the learned model (not rbergomi)"
    )
    cal.add_argument("--allow-arbitrage", action="store_true", help="fit a surface with arbitrage violations")
    cal.add_argument(
        "--corrections",
        type=int,
        default=0,
        help="correct the learned model's fit this many times (0-3) by the process's reference: the "
        "analytic CF, or rough Bergomi's Monte Carlo (~10 s each at the default paths)",
    )
    cal.add_argument(
        "--correction-paths",
        type=int,
        default=None,
        help="Monte-Carlo paths per expiry of each correction (4 to 1048576; default 131072)",
    )
    cal.add_argument("--save", action="store_true", help="store the fitted set as a derived snapshot in --marketdata")


def _option_time(option: str, raw: str) -> datetime:
    """A time given on the command line: RFC 3339 with a zone, in UTC (else UsageError)."""
    from spectralmc_server.marketdata.store import utc
    from spectralmc_server.rfc3339 import parse_datetime

    try:
        return utc(parse_datetime(raw))
    except OverflowError:
        raise UsageError(f"{option}: out of range once converted to UTC (got {raw!r})") from None
    except ValueError as exc:
        raise UsageError(f"{option}: {exc} (got {raw!r})") from None


def _served(args: argparse.Namespace) -> Any:
    """The model to fit through (a ServedModel), or None for the analytic reference."""
    from spectralmc_server.engine.checkpoint import CheckpointError, read_dir
    from spectralmc_server.engine.processes import get_process
    from spectralmc_server.engine.served import ServedModel, load_served_model
    from spectralmc_server.models import bundled_models
    from spectralmc_server.pricing.calibration import no_reference_fit

    if args.reference and not get_process(args.process).has_analytic_cf:
        raise UsageError(f"--reference: {no_reference_fit(args.process)} (give --store or --checkpoint)")
    served: ServedModel | None = None
    try:
        if args.checkpoint is not None:
            served = load_served_model(read_dir(args.checkpoint, need_training=False))
        elif args.store is not None:
            served = served_from_store(args.store, args.process)
        elif not args.reference:
            bundled = bundled_models()
            if args.process not in bundled:
                raise UsageError(f"no bundled {args.process} model: give --store, --checkpoint or --reference")
            served = load_served_model(read_dir(bundled[args.process], need_training=False), name=args.process)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    if served is not None and served.process.name != args.process:
        raise UsageError(f"the model is a {served.process.name} model, not {args.process}")
    return served


def run(args: argparse.Namespace) -> int:
    from spectralmc_server.marketdata.store import SnapshotStore, iso
    from spectralmc_server.pricing.calibration import SurfaceError, calibrate_snapshot
    from spectralmc_server.pricing.schemas import NAMESPACE_PATTERN
    from spectralmc_server.service.calibrate_routes import store_fit
    from spectralmc_server.store.uri import open_store

    if not re.fullmatch(NAMESPACE_PATTERN, args.namespace):
        raise UsageError(f"--namespace: letters, digits, '_', '.', '-' (got {args.namespace!r})")
    vdt = _option_time("--val-datetime", args.val_datetime)
    asof = None if args.asof is None else _option_time("--asof", args.asof)
    if sum(x is not None and x is not False for x in (args.store, args.checkpoint, args.reference or None)) > 1:
        raise UsageError("give at most one of --store, --checkpoint and --reference")
    from spectralmc_server.pricing.calibratable import (
        CORRECTION_PATHS,
        MAX_CORRECTION_PATHS,
        MAX_CORRECTIONS,
        MIN_CORRECTION_PATHS,
    )

    if not 0 <= args.corrections <= MAX_CORRECTIONS:
        raise UsageError(f"--corrections: 0 to {MAX_CORRECTIONS}, got {args.corrections}")
    if args.correction_paths is not None and not args.corrections:
        raise UsageError("--correction-paths: only with --corrections")
    if args.correction_paths is not None and not MIN_CORRECTION_PATHS <= args.correction_paths <= MAX_CORRECTION_PATHS:
        raise UsageError(
            f"--correction-paths: {MIN_CORRECTION_PATHS} to {MAX_CORRECTION_PATHS}, got {args.correction_paths}"
        )
    if args.corrections and args.reference:
        raise UsageError("--corrections correct a fit through the learned model; --reference fits without one")
    paths = CORRECTION_PATHS if args.correction_paths is None else args.correction_paths
    served = _served(args)
    with store_errors(), asyncio.Runner() as runner:
        objects = runner.run(open_store(args.marketdata))
        try:
            snapshots = SnapshotStore(objects)
            record = runner.run(snapshots.resolve(args.namespace, vdt, asof))
            if record is None:
                raise UsageError(
                    f"no market-data snapshot for {args.namespace}/{iso(vdt)} as of "
                    f"{'latest' if asof is None else iso(asof)} in {args.marketdata}"
                )
            snapshot = runner.run(snapshots.load(record))
            try:
                report = calibrate_snapshot(
                    snapshot,
                    args.underlying,
                    args.process,
                    served,
                    allow_arbitrage=args.allow_arbitrage,
                    corrections=args.corrections,
                    correction_paths=paths,
                )
            except SurfaceError as exc:
                raise UsageError(f"cannot calibrate: {exc}") from None
            out: dict[str, Any] = {"market_data": record.describe(), **report.describe(), "stored": None}
            if args.save:
                stored = runner.run(store_fit(snapshots.put, record, snapshot, [report], None))
                out["stored"] = None if stored is None else {**stored[0].describe(), "created": stored[1]}
        finally:
            runner.run(objects.close())
    sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK
