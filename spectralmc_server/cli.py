"""The ``spectralmc`` command line.

Exit codes: 0 success, 2 bad input (one line on stderr naming what is wrong),
1 an unexpected failure, 3 ``train --store`` whose last due commit the quality gate
refused (nothing unqualified is committed without ``--allow-unqualified``),
130 interrupted (training writes its checkpoint first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shlex
import signal
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import orjson
from pydantic import ValidationError

from spectralmc_server import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# engine/certify.py's MIN_POINTS and settings.py's cap, here so `--help` needs no torch
CERT_MIN_POINTS, CERT_MAX_POINTS = 4096, 1 << 16


class UsageError(Exception):
    """Bad input from the user: reported on one line, exit code 2."""


class CorruptionError(Exception):
    """Damaged or edited store content: reported on one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectralmc", description="SpectralMC pricing service and tools.")
    parser.add_argument("--version", action="version", version=f"spectralmc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model online from Monte-Carlo batches")
    train.add_argument("--process", required=True, help="process to learn (gbm, heston, merton, asian)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (also the learning-rate horizon)")
    length.add_argument("--minutes", type=float, help="wall-clock budget, turned into a step count after timing")
    train.add_argument("--seed", type=int, help="seed of the parameter points and normals (default 0)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device (default cpu)")
    train.add_argument(
        "--kernels",
        choices=["auto", "torch", "fused"],
        help="path simulation on CUDA: fused kernels where available (auto, the default), torch, or fused only",
    )
    train.add_argument("--config", type=Path, help="TOML file whose [train] table sets TrainConfig fields")
    train.add_argument(
        "--resume", help="continue from a checkpoint directory, or with --store from a version (N or 'head')"
    )
    train.add_argument("--out", type=Path, help="checkpoint directory to write (atomically)")
    train.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: end only)")
    train.add_argument("--store", help="commit versions to this store (file:///path or s3://bucket/prefix)")
    train.add_argument("--model", help="model name in the store (default: the process name)")
    train.add_argument("--commit-every", type=int, help="commit every N steps (default: only at the end)")
    train.add_argument("--commit-seconds", type=float, help="commit every T seconds")
    train.add_argument("--commit-if-improved", action="store_true", help="skip due commits that do not improve")
    train.add_argument("--message", help="commit message template with {step}, {loss}, {val_bp}")
    train.add_argument(
        "--allow-unqualified",
        action="store_true",
        help="with --store: commit versions that fail the quality gate anyway (the version records it)",
    )
    train.add_argument(
        "--no-certify",
        action="store_true",
        help="do not certify --out (quick experiments: a checkpoint without certificate.json answers every "
        "measure by the reference, never by the learned model); with --store it needs --allow-unqualified",
    )
    train.add_argument(
        "--settings",
        type=Path,
        help="server settings TOML whose [certificate] table sets the gate, points and tolerances "
        "(default: the built-in ones, or SPECTRALMC_CERTIFICATE__* variables)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    serve = sub.add_parser("serve", help="run the pricing server (HTTP API, metrics, online training)")
    serve.add_argument("--config", type=Path, help="TOML settings file (see config/server.toml)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--role", choices=["serve", "train", "all"], help="what this process does (default all)")
    serve.add_argument("--data-dir", type=Path, help="where the default local store lives")
    serve.add_argument("--store", help="model store URI (file:///path or s3://bucket/prefix)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

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
        "--marketdata", help="store URI whose snapshots contracts by reference are priced from (often = --store)"
    )
    price.add_argument(
        "--settings",
        type=Path,
        help="server settings TOML whose [certificate] table sets the gate (--store) and the tolerances",
    )

    cal = sub.add_parser("calibrate", help="fit a process to an underlying's vol surface in a market-data snapshot")
    cal.add_argument("--marketdata", required=True, help="store URI holding the snapshots (file:///path or s3://...)")
    cal.add_argument("--namespace", default="default", help="snapshot namespace (default: default)")
    cal.add_argument(
        "--val-datetime", required=True, help="the snapshot's val_datetime (RFC 3339: 2026-11-26T16:00:00Z)"
    )
    cal.add_argument("--asof", help="use the latest snapshot with data_asof <= this (RFC 3339; default: the latest)")
    cal.add_argument("--underlying", required=True, help="whose surface to fit")
    cal.add_argument("--process", default="heston", choices=["heston"], help="process to fit (default heston)")
    cal.add_argument("--store", help="fit through the served version of the model in this store")
    cal.add_argument("--checkpoint", type=Path, help="fit through this checkpoint directory")
    cal.add_argument("--reference", action="store_true", help="fit through the analytic CF, not the learned model")
    cal.add_argument("--allow-arbitrage", action="store_true", help="fit a surface with arbitrage violations")
    cal.add_argument("--save", action="store_true", help="store the fitted set as a derived snapshot in --marketdata")

    store = sub.add_parser("store", help="manage model versions in a store")
    store.add_argument("--store", required=True, help="file:///path or s3://bucket/prefix")
    store.add_argument("--model", required=True, help="model name")
    store.add_argument("--json", action="store_true", help="machine-readable output")
    ops = store.add_subparsers(dest="op", required=True, parser_class=_Parser)
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", dest="json_op", help="machine-readable output")
    ops.add_parser("list", help="every version, oldest first", parents=[json_flag])
    inspect = ops.add_parser("inspect", help="one version's record, manifest and certificate", parents=[json_flag])
    inspect.add_argument("version", type=int)
    certify = ops.add_parser(
        "certify",
        help="certify version N in place (attach its certificate, or check that it reproduces)",
        parents=[json_flag],
    )
    certify.add_argument("version", type=int)
    certify.add_argument(
        "--points",
        type=int,
        help=f"held-out parameter points, {CERT_MIN_POINTS} to {CERT_MAX_POINTS} "
        "(default: [certificate] points of the settings, 4096)",
    )
    ops.add_parser("verify", help="check the whole history (exit 1 if damaged)", parents=[json_flag])
    pin = ops.add_parser("pin", help="serve version N (rollback)", parents=[json_flag])
    pin.add_argument("version", type=int)
    pin.add_argument("--by", default=os.environ.get("USER", ""), help="who pins (recorded in the pin log)")
    pin.add_argument(
        "--force", action="store_true", help="pin a version that fails its quality gate (the pin log records it)"
    )
    pin.add_argument("--settings", type=Path, help="server settings TOML whose [certificate] table sets the gate")
    unpin = ops.add_parser("unpin", help="track the head again", parents=[json_flag])
    unpin.add_argument("--by", default=os.environ.get("USER", ""))
    gc = ops.add_parser("gc", help="delete the content of old versions (records stay)", parents=[json_flag])
    gc.add_argument("--keep", type=int, required=True, help="keep the last N versions")
    gc.add_argument("--protect", default="", help="comma-separated versions to keep too")
    gc.add_argument("--min-keep", type=int, default=1, help="never keep fewer than this")
    gc.add_argument("--grace-seconds", type=float, default=3600.0, help="age before unreferenced content is deleted")
    mode = gc.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    mode.add_argument("--yes", action="store_true", help="delete")
    tb = ops.add_parser("tensorboard", help="write per-version metrics for TensorBoard", parents=[json_flag])
    tb.add_argument("--logdir", type=Path, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.cmdline = "spectralmc " + " ".join(shlex.quote(a) for a in argv)
        if args.command == "train":
            return _train(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "store":
            return _store(args)
        if args.command == "serve":
            return _serve(args)
        return _price(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CorruptionError as exc:
        print(f"corrupt: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or an environment failure: one line, unless debugging
        if os.environ.get("SPECTRALMC_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set SPECTRALMC_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAILURE


# -- stores -----------------------------------------------------------------------------


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Store failures as CLI outcomes: damage exits 1, anything else the user can act on 2."""
    from spectralmc_server.marketdata.store import CorruptSnapshot
    from spectralmc_server.store.objects import StoreError
    from spectralmc_server.store.uri import InvalidStoreURI
    from spectralmc_server.store.versions import CorruptObject

    try:
        yield
    except (CorruptObject, CorruptSnapshot) as exc:
        raise CorruptionError(str(exc)) from None
    except (StoreError, InvalidStoreURI) as exc:
        raise UsageError(str(exc)) from None


@contextlib.contextmanager
def _store_session(uri: str, model: str) -> Iterator[tuple[asyncio.Runner, Any]]:
    """An event loop and the VersionStore of ``model`` at ``uri``, closed afterwards."""
    from spectralmc_server.store.uri import open_store
    from spectralmc_server.store.versions import VersionStore

    with _store_errors(), asyncio.Runner() as runner:
        objects = runner.run(open_store(uri))
        try:
            yield runner, VersionStore(objects, model)
        finally:
            runner.run(objects.close())


def _store(args: argparse.Namespace) -> int:
    from spectralmc_server.store import admin

    points = _certify_points(args.points) if args.op == "certify" else 0  # before the store is opened
    with _store_session(args.store, args.model) as (run, vs):
        op = args.op
        result: Any
        if op == "list":
            result = run.run(admin.list_versions(vs))
            text = (
                "\n".join(
                    f"{r['version']:>6}  {r['time']}  {'H' if r['head'] else ' '}{'P' if r['pinned'] else ' '}"
                    f"{'c' if r['collected'] else ' '}{'C' if r['certified'] else ' '}"
                    f"{'U' if r['unqualified'] else ' '}  {r['message']}"
                    for r in result
                )
                or f"model {args.model!r} has no versions"
            )
        elif op == "inspect":
            result = run.run(admin.inspect_version(vs, args.version))
            text = _inspect_text(result)
        elif op == "certify":
            result, text = _certify_version(run, vs, args.version, points, quiet=args.json or args.json_op)
        elif op == "verify":
            report = run.run(vs.verify())
            result = report.as_dict()
            text = (
                f"ok: {report.versions} versions, head {report.head}, pinned {report.pinned}, "
                f"{len(report.collected)} collected"
                if report.ok
                else f"DAMAGED: first bad version {report.first_bad}\n"
                + "\n".join(f"  version {p['version']}: {p['object']}: {p['reason']}" for p in report.problems)
            )
            text += "".join(f"\n  note: {n}" for n in report.notes)
        elif op == "pin":
            # the server's rule: a version that fails its gate is pinned only with --force
            from spectralmc_server.engine.certify import gate_failures

            limits = _certificate_settings(args.settings).limits(args.model)
            failures = gate_failures(run.run(vs.certificate(args.version)), limits)
            if failures and not args.force:
                raise UsageError(
                    f"version {args.version} of {args.model!r} fails its quality gate ({'; '.join(failures)}): "
                    "not pinned; add --force to pin it anyway"
                )
            entry = run.run(vs.pin(args.version, args.by, force=bool(failures), gate=failures))
            result = {"seq": entry.index, **entry.body, "forced": bool(failures)}
            text = f"pinned: serving version {args.version} (pin log entry {entry.index})"
            if failures:
                text += f"; forced past its quality gate: {'; '.join(failures)}"
        elif op == "unpin":
            entry = run.run(vs.unpin(args.by))
            result = {"seq": entry.index, **entry.body}
            text = f"unpinned: serving the head (pin log entry {entry.index})"
        elif op == "gc":
            try:
                protect = [int(x) for x in args.protect.split(",") if x.strip()]
            except ValueError:
                raise UsageError(f"--protect takes comma-separated version numbers, got {args.protect!r}") from None
            if args.keep < 0 or args.min_keep < 1:
                raise UsageError("--keep must be >= 0 and --min-keep >= 1")
            report = run.run(
                vs.gc(
                    args.keep,
                    protect=protect,
                    min_keep=args.min_keep,
                    dry_run=args.dry_run,
                    grace_seconds=args.grace_seconds,
                )
            )
            result = report.as_dict()
            done = "would delete" if args.dry_run else f"deleted ({report.bytes_freed} bytes)"
            text = (
                f"{done} {len(report.deleted_objects)} objects: the content of versions "
                f"{report.collected_versions}; retained {report.retained}"
            )
        else:  # tensorboard
            result = run.run(admin.write_tensorboard(vs, args.logdir))
            text = f"wrote {len(result['versions'])} versions to {result['logdir']}"
    sys.stdout.write((orjson.dumps(result).decode() if args.json or args.json_op else text) + "\n")
    if op == "verify" and not result["ok"]:
        return EXIT_FAILURE
    if op == "certify" and result["outcome"] == "differs":
        return EXIT_FAILURE
    return EXIT_OK


def _certify_points(points: int | None) -> int:
    """--points, else the settings' ``[certificate] points`` (SPECTRALMC_CERTIFICATE__POINTS)."""
    if points is None:
        from spectralmc_server.settings import Settings

        try:
            return Settings().certificate.points
        except ValidationError as exc:
            raise UsageError(_validation_message("SPECTRALMC_ settings", exc)) from None
    if not CERT_MIN_POINTS <= points <= CERT_MAX_POINTS:
        raise UsageError(f"--points must be from {CERT_MIN_POINTS} to {CERT_MAX_POINTS}, got {points}")
    return points


# Measures whose normalised error is a price in units of the discounted forward (or,
# for the digital, of the discounted payout): x 1e4 is basis points (of spot, as the
# certificate's points are priced with spot 1 and no rates).
_BP_UNITS = frozenset({"D F", "D"})


def _certificate_table(cert: dict[str, Any]) -> str:
    """A certificate's summary (certify.summary, with "hash") as a table."""
    head = (
        f"certificate {cert.get('hash')}\n"
        f"  sample: {cert.get('points')} held-out points, seed {cert.get('seed')}, truth: {cert.get('truth')}\n"
        f"  {'measure':<10} {'unit':<20} {'p50':>10} {'p95':>10} {'max':>10}   "
        f"{'p50 bp':>8} {'p95 bp':>8} {'max bp':>8}"
    )
    from spectralmc_server.engine.pricer import MEASURES  # the API's order

    measures = cert.get("measures", {})
    rows = []
    for measure in sorted(measures, key=lambda m: (MEASURES.index(m) if m in MEASURES else len(MEASURES), m)):
        f = measures[measure]
        stats = [f.get(k) for k in ("p50", "p95", "max")]
        figures = " ".join(f"{'n/a' if v is None else f'{v:.3e}':>10}" for v in stats)
        bp = (
            " ".join(f"{'n/a' if v is None else f'{v * 1e4:.3f}':>8}" for v in stats)
            if f.get("unit") in _BP_UNITS
            else ""
        )
        rows.append(f"  {measure:<10} {f.get('unit')!s:<20} {figures}   {bp}".rstrip())
    foot = "  (errors per unit of the measure's scale; bp: x 1e4, basis points of spot for a price)"
    return "\n".join([head, *rows, foot])


def _inspect_text(row: dict[str, Any]) -> str:
    """store inspect for people: the record and manifest as JSON, then the certificate."""
    body = {k: v for k, v in row.items() if k != "certificate"}
    text = orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()
    if row.get("unqualified"):
        failures = row.get("metrics", {}).get("gate_failures") or []
        text += "\nunqualified: committed past a failing quality gate" + (
            f" ({'; '.join(map(str, failures))})" if failures else ""
        )
    cert = row.get("certificate")
    if cert is not None:
        return text + "\n" + _certificate_table(cert)
    why = "content collected" if row.get("collected") else f"spectralmc store certify {row['version']} makes one"
    return text + f"\ncertificate: none ({why})"


def _certify_version(run: asyncio.Runner, vs: Any, version: int, points: int, *, quiet: bool) -> tuple[Any, str]:
    """Certify ``version`` and attach the certificate, or, when it has one, check that
    certifying again reproduces it: certification is deterministic (the same model, the
    same held-out points), so every figure must come out the same."""
    from spectralmc_server.engine.certify import certificate_hash, certify, summary
    from spectralmc_server.engine.pricer import load_served_model
    from spectralmc_server.store.versions import CertificateExists

    ckpt = run.run(vs.load(version))
    served = load_served_model(ckpt, name=vs.name, version=version, require_certificate=False)
    if not quiet:
        print(f"certifying {vs.name!r} version {version} on {points} held-out points ...", file=sys.stderr)
    start = time.perf_counter()
    cert = certify(served, points=points)
    elapsed = time.perf_counter() - start
    computed = certificate_hash(cert)
    existing = None if ckpt.certificate is None else certificate_hash(ckpt.certificate)

    if existing is None:
        try:
            stored = run.run(vs.attach_certificate(version, cert))
            outcome = "attached"
        except CertificateExists as exc:  # another certify attached one meanwhile
            existing, stored, outcome = exc.existing, exc.existing, "differs"
    else:
        stored, outcome = existing, "reproduced" if computed == existing else "differs"
    result = {
        "model": vs.name,
        "version": version,
        "outcome": outcome,
        "certificate": stored,
        "computed": computed,
        "points": points,
        "seconds": round(elapsed, 3),
        "summary": summary(cert),
    }
    lines = [
        _certificate_table({"hash": computed, **summary(cert)}),
        f"certified version {version} in {elapsed:.1f} s",
    ]
    if outcome == "attached":
        lines.append(f"attached: version {version} is now certified by {stored}")
    elif outcome == "reproduced":
        lines.append(f"reproduced exactly: the stored certificate {existing}, byte for byte")
    else:
        lines.append(
            f"DIFFERS: version {version} is certified by {existing}; this run computed {computed}. "
            "The store is unchanged (a certificate is never replaced)"
        )
    return result, "\n".join(lines)


# -- train ------------------------------------------------------------------------------


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config: {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config: {path} is not valid TOML: {exc}") from None
    table = data.get("train", {})
    if not isinstance(table, dict):
        raise UsageError(f"--config: [train] in {path} must be a table")
    return table


def _certificate_settings(path: Path | None) -> Any:
    """``[certificate]`` of a server settings file (and SPECTRALMC_ variables): the gate
    ``train --store`` and ``price --store`` apply, as a server does."""
    from spectralmc_server.settings import Settings

    if path is not None and not path.is_file():
        raise UsageError(f"--settings: no such file {path}")
    try:
        return Settings.load(path).certificate
    except ValidationError as exc:
        raise UsageError(_validation_message("--settings: invalid settings", exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--settings {path}: not valid TOML: {exc}") from None


def _validation_message(prefix: str, exc: ValidationError) -> str:
    from spectralmc_server.pricing.schemas import format_validation_error, one_line

    return f"{prefix}: {one_line(format_validation_error(exc))}"


def _train(args: argparse.Namespace) -> int:
    from spectralmc_server.engine.certify import gate_failures
    from spectralmc_server.engine.checkpoint import CheckpointError, write_dir
    from spectralmc_server.engine.device import DeviceUnavailableError
    from spectralmc_server.engine.kernels import FusedKernelsUnavailableError
    from spectralmc_server.engine.trainer import TrainConfig, Trainer
    from spectralmc_server.store.commits import DEFAULT_MESSAGE, CommitPolicy, GateResult, certify_checkpoint

    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UsageError(f"--minutes must be a positive number, got {args.minutes}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    store_flags = [f for f in ("model", "commit_every", "commit_seconds", "message") if getattr(args, f) is not None]
    if args.commit_if_improved:
        store_flags.append("commit_if_improved")
    if args.allow_unqualified:
        store_flags.append("allow_unqualified")
    if args.store is None and store_flags:
        raise UsageError(f"--{store_flags[0].replace('_', '-')} needs --store")
    if args.store is not None and args.no_certify and not args.allow_unqualified:
        raise UsageError(
            "--no-certify with --store: a version without a certificate fails the quality gate; "
            "add --allow-unqualified to commit it as unqualified"
        )
    cert_settings = _certificate_settings(args.settings)
    try:
        policy = CommitPolicy(
            every_steps=args.commit_every,
            every_seconds=args.commit_seconds,
            only_if_improved=args.commit_if_improved,
            message=args.message or DEFAULT_MESSAGE,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.out is not None:
        _check_writable(args.out)  # before training, not after it
    overrides: dict[str, Any] = {}
    if args.device is not None:
        overrides["device"] = args.device
    if args.kernels is not None:
        overrides["kernels"] = args.kernels
    model_name = args.model or args.process

    with contextlib.ExitStack() as stack:
        session = stack.enter_context(_store_session(args.store, model_name)) if args.store else None
        try:
            if args.resume is not None:
                if args.seed is not None or args.config is not None:
                    raise UsageError("--resume continues a run as configured: drop --seed and --config")
                ckpt = _resume_checkpoint(args.resume, session)
                if ckpt.manifest["training"]["process"] != args.process:
                    raise UsageError(
                        f"--process {args.process} does not match the checkpoint's process "
                        f"{ckpt.manifest['training']['process']!r}"
                    )
                trainer = Trainer.from_checkpoint(ckpt, **overrides)
                steps = args.steps if args.steps is not None else _steps_for_minutes(trainer.config, args.minutes)
            else:
                fields = _load_toml(args.config) if args.config is not None else {}
                fields.update(overrides, process=args.process)
                if args.seed is not None:
                    fields["seed"] = args.seed
                config = TrainConfig.model_validate(fields)
                if args.steps is not None:
                    steps = args.steps
                elif args.minutes is not None:
                    steps = _steps_for_minutes(config, args.minutes)
                else:
                    steps = config.schedule_steps
                config = config.model_copy(update={"schedule_steps": steps})
                trainer = Trainer(config)
        except ValidationError as exc:
            raise UsageError(_validation_message("invalid training configuration", exc)) from None
        except (CheckpointError, DeviceUnavailableError, FusedKernelsUnavailableError) as exc:
            raise UsageError(str(exc)) from None
        except ValueError as exc:  # unknown process, budget exceeded, bad domain
            raise UsageError(str(exc)) from None

        committed: list[int] = []
        committed_at = {"step": -1}
        refused: list[dict[str, Any]] = []  # due commits the gate refused: step and failures
        unqualified: list[int] = []  # versions committed past the gate (--allow-unqualified)
        limits = cert_settings.limits(model_name)
        gates: dict[str, GateResult] = {}  # content hash -> the certified checkpoint (reused by --out)

        def gate(ckpt: Any, step: int) -> GateResult:
            """Certify (about 30 s for GBM on two cores) and check the gate, once per content."""
            if args.no_certify:
                return GateResult(ckpt, gate_failures(None, limits))
            if ckpt.content_hash not in gates:
                if not args.quiet:
                    print(f"certifying step {step} ({cert_settings.points} held-out points)", file=sys.stderr)
                gates[ckpt.content_hash] = certify_checkpoint(
                    ckpt, model=model_name, points=cert_settings.points, limits=limits
                )
            return gates[ckpt.content_hash]

        def commit(t: Any) -> None:
            assert session is not None
            if not t.history or t.history[-1].step != t.step:
                t.validate()
            val = t.history[-1].p95_bp
            message = policy.render(step=t.step, loss=t.loss_ema, val_bp=val)
            result = gate(t.checkpoint({"command": args.cmdline}), t.step)
            committed_at["step"] = t.step
            if not result.passed:
                verdict = "committing it as unqualified" if args.allow_unqualified else "not committed"
                print(f"quality gate: step {t.step} {result.describe()}: {verdict}", file=sys.stderr)
                if not args.allow_unqualified:
                    refused.append({"step": t.step, "gate": result.failures})
                    policy.refused()
                    return
            with _store_errors():
                stored = session[0].run(
                    session[1].commit(
                        result.checkpoint,
                        message,
                        rebase=True,
                        unqualified=not result.passed,
                        gate=None if result.passed else result.failures,
                    )
                )
            policy.committed(val)
            committed.append(stored.version)
            if not result.passed:
                unqualified.append(stored.version)

        def after_step(t: Any) -> None:
            if args.out is not None and args.checkpoint_every and t.step % args.checkpoint_every == 0:
                write_dir(t.checkpoint({"command": args.cmdline}), args.out)
            if session is not None and policy.due(t.step, t.history[-1].p95_bp if t.history else None):
                commit(t)

        stop = {"requested": False}

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            stop["requested"] = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            _run_with_progress(trainer, steps, args, lambda: stop["requested"], after_step)
            final_due = session is not None and policy.final and committed_at["step"] != trainer.step
            improved = not policy.only_if_improved or policy.improves(trainer.history[-1].p95_bp)
            if final_due and improved:
                commit(trainer)
        finally:
            signal.signal(signal.SIGINT, previous)
            trainer.close()
    summary: dict[str, Any] = {
        "step": trainer.step,
        "paths_simulated": trainer.paths_simulated,
        "elapsed_seconds": round(trainer.elapsed_seconds, 3),
        "validation": trainer.history[-1].as_dict() if trainer.history else None,
    }
    if args.store is not None:
        summary.update(store=args.store, model=model_name, committed=committed, refused=refused)
        summary["unqualified"] = unqualified
    if args.out is not None:
        final = trainer.checkpoint({"command": args.cmdline})
        result = gates.get(final.content_hash)
        if result is None and not args.no_certify and not stop["requested"]:
            result = gate(final, trainer.step)
        elif result is None and stop["requested"] and not args.no_certify:
            print(
                f"interrupted: {args.out} is written without a certificate (its answers come from the reference); "
                "train on with --resume to certify it",
                file=sys.stderr,
            )
        summary["out"] = str(args.out)
        summary["content_hash"] = write_dir(final if result is None else result.checkpoint, args.out)
        summary["certified"] = result is not None
        summary["gate"] = None if result is None else result.failures
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    if stop["requested"]:
        return EXIT_INTERRUPTED
    if refused and refused[-1]["step"] == committed_at["step"]:
        return EXIT_GATE  # the last due commit was refused: the store does not hold this run's result
    return EXIT_OK


def _resume_checkpoint(resume: str, session: tuple[asyncio.Runner, Any] | None) -> Any:
    """--resume: a checkpoint directory, or with --store a version number or 'head'."""
    from spectralmc_server.engine.checkpoint import read_dir

    if session is None:
        return read_dir(Path(resume))
    run, vs = session
    with _store_errors():
        if resume == "head":
            head = run.run(vs.head())
            if head is None:
                raise UsageError(f"--resume head: model {vs.name!r} has no versions in the store")
            version = head.version
        else:
            try:
                version = int(resume)
            except ValueError:
                raise UsageError(f"--resume with --store takes a version number or 'head', got {resume!r}") from None
        return run.run(vs.load(version, need_training=True))


def _check_writable(out: Path) -> None:
    """--out must be a directory we can create and replace (or a new path in one)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out: {parent} is not writable")


def _steps_for_minutes(config: Any, minutes: float | None) -> int:
    """Time a few steps (and one validation) of a throwaway trainer with this config."""
    from spectralmc_server.engine.trainer import Trainer

    if minutes is None:
        raise UsageError("give --steps or --minutes")
    probe = Trainer(config)
    try:
        probe.run(5)  # warm-up
        t0 = time.perf_counter()
        probe.run(20)
        per_step = (time.perf_counter() - t0) / 20
        t0 = time.perf_counter()
        probe.validate()
        per_step += (time.perf_counter() - t0) / config.validate_every
    finally:
        probe.close()
    steps = max(1, int(minutes * 60.0 / per_step))
    print(f"--minutes {minutes:g}: {per_step * 1e3:.1f} ms/step measured -> {steps} steps", file=sys.stderr)
    return steps


def _run_with_progress(trainer: Any, steps: int, args: argparse.Namespace, should_stop: Any, after_step: Any) -> None:
    from tqdm import tqdm

    bar = tqdm(total=steps, unit="step", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    start_step, start_paths, t0 = trainer.step, trainer.paths_simulated, time.perf_counter()

    def on_step(t: Any) -> None:
        bar.update(1)
        if t.step % 10 == 0 or t.step - start_step == steps:
            rate = (t.paths_simulated - start_paths) / max(time.perf_counter() - t0, 1e-9)
            post = {"loss": f"{t.loss_ema:.2e}", "paths/s": f"{rate:.3g}"}
            if t.history:
                post["val_p95_bp"] = f"{t.history[-1].p95_bp:.2f}"
            bar.set_postfix(post, refresh=False)
        after_step(t)

    try:
        trainer.run(steps, on_step=on_step, should_stop=should_stop)
        if not trainer.history or trainer.history[-1].step != trainer.step:
            trainer.validate()
    finally:
        bar.close()


# -- price ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import logging

    from spectralmc_server.service import keys
    from spectralmc_server.service.app import create_app
    from spectralmc_server.service.edge import run_app
    from spectralmc_server.service.engine_process import EngineStartError
    from spectralmc_server.settings import Settings
    from spectralmc_server.store.objects import StoreError
    from spectralmc_server.store.uri import InvalidStoreURI, parse_store_uri

    if args.config is not None and not args.config.is_file():
        raise UsageError(f"--config: no such file {args.config}")
    try:
        settings = Settings.load(
            args.config, host=args.host, port=args.port, role=args.role, data_dir=args.data_dir, store=args.store
        )
        parse_store_uri(settings.store_uri)
    except ValidationError as exc:
        raise UsageError(_validation_message("invalid settings", exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {args.config}: not valid TOML: {exc}") from None
    except InvalidStoreURI as exc:
        raise UsageError(f"store: {exc}") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_malformed_http_one_line)
    log = logging.getLogger("spectralmc_server")
    log.info("role %s, store %s, models %s", settings.role, settings.store_uri, ", ".join(settings.models))
    app = create_app(settings)
    try:
        run_app(  # web.run_app with JSON parser errors and the header-read timeout (service/edge.py)
            app,
            host=settings.host,
            port=settings.port,
            shutdown_timeout=settings.shutdown_timeout_seconds,
            on_start=lambda msg: log.info("%s", msg),
        )
    except OSError as exc:  # address in use, permission denied
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    except StoreError as exc:  # the store is unreachable or refuses us: the environment, not a bug
        print(f"error: cannot start: model store {settings.store_uri}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except EngineStartError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return app[keys.LIFECYCLE].exit_code or EXIT_OK


def _malformed_http_one_line(record: Any) -> bool:
    """aiohttp logs a request it cannot parse (a client's fault, answered 4xx as JSON) with a
    traceback; keep one warning line instead."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg, record.args, record.exc_info, record.exc_text = "malformed HTTP request: %s", (exc,), None, None
        record.levelno, record.levelname = 30, "WARNING"
    return True


def _served_from_store(uri: str, model: str, certificate: Any = None) -> Any:
    """The version a server would serve now: the store's pin, else its head; answered by
    the learned model only when its certificate passes the quality gate of
    ``certificate`` (CertificateSettings; default: the built-in gate) or an admin
    pinned it with force. A failing version is answered by the reference (a note on
    stderr says why), as a server that has no other version serves no learned answer."""
    from dataclasses import replace

    from spectralmc_server.engine.certify import gate_failures
    from spectralmc_server.engine.pricer import load_served_model
    from spectralmc_server.settings import CertificateSettings

    certificate = certificate or CertificateSettings()
    with _store_session(uri, model) as (run, vs):
        pin = run.run(vs.pin_entry())
        version = None if pin is None else pin.body.get("version")
        forced = version is not None and pin is not None and pin.body.get("force") is True
        if version is None:
            head = run.run(vs.head())
            if head is None:
                raise UsageError(f"--store: model {model!r} has no versions in {uri}")
            version = head.version
        ckpt = run.run(vs.load(version))
    failures = gate_failures(ckpt.certificate, certificate.limits(model))
    if failures and forced:
        print(
            f"note: model {model!r} version {version} fails its quality gate ({'; '.join(failures)}) "
            "and is pinned with force: its learned answers are served",
            file=sys.stderr,
        )
    elif failures:
        print(
            f"note: model {model!r} version {version} fails its quality gate ({'; '.join(failures)}): "
            "every measure is answered by the reference, not the learned model",
            file=sys.stderr,
        )
        ckpt = replace(ckpt, certificate=None)  # no certificate: nothing learned is served
    tolerance = {str(m): v for m, v in certificate.tolerance.items()}
    return load_served_model(ckpt, name=model, version=version, tolerance=tolerance)


def _snapshot_of(uri: str, request: Any) -> tuple[Any, Any]:
    """The snapshot ``request`` names in the store at ``uri``, as (record, snapshot);
    a RequestRefusedError naming val_datetime when there is none."""
    from spectralmc_server.marketdata.store import SnapshotStore, iso
    from spectralmc_server.pricing.errors import RequestRefusedError
    from spectralmc_server.store.uri import open_store

    with _store_errors(), asyncio.Runner() as runner:
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


def _price(args: argparse.Namespace) -> int:
    from spectralmc_server.engine.checkpoint import CheckpointError, read_dir
    from spectralmc_server.engine.pricer import load_served_model
    from spectralmc_server.models import bundled_models
    from spectralmc_server.pricing.door import Entry, admit, value_batch
    from spectralmc_server.pricing.errors import RequestRefusedError
    from spectralmc_server.pricing.resolve import needs_market_data
    from spectralmc_server.pricing.schemas import one_line
    from spectralmc_server.pricing.valuation import dumps

    form, body, head, columns = _price_input(args.format, sys.stdin.buffer.read())
    if args.store is not None and args.checkpoint is not None:
        raise UsageError("give --store or --checkpoint, not both")
    cert_settings = _certificate_settings(args.settings)
    tolerance = {str(m): v for m, v in cert_settings.tolerance.items()}
    loaded: dict[str, Any] = {}

    def models() -> dict[str, Any]:  # loaded once the request's schema is valid
        if not loaded:
            try:
                if args.checkpoint is not None:
                    served = [load_served_model(read_dir(args.checkpoint, need_training=False), tolerance=tolerance)]
                elif args.store is not None:
                    served = [_served_from_store(args.store, args.model or "gbm", cert_settings)]
                else:
                    available = bundled_models()
                    if not available:
                        raise RuntimeError(
                            "no bundled models found: the package data is missing, reinstall spectralmc-server"
                        )
                    if args.model is not None and args.model not in available:
                        raise UsageError(f"--model: no bundled model {args.model!r}; bundled: {', '.join(available)}")
                    names = [args.model] if args.model is not None else list(available)
                    served = [
                        load_served_model(read_dir(available[n], need_training=False), name=n, tolerance=tolerance)
                        for n in names
                    ]
            except CheckpointError as exc:
                raise UsageError(str(exc)) from None
            loaded.update({m.process.name: m for m in served})
        return loaded

    try:
        request = admit(
            body if form == "rows" else _columns_request(head, columns),
            lambda: {p: served.view for p, served in models().items()},
        )
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


def _price_input(fmt: str, raw: bytes) -> tuple[str, Any, dict[str, Any], dict[str, Any]]:
    """stdin of ``spectralmc price --format fmt`` as (form, row body, request-level
    fields, columns): form ``rows`` (the row body set), ``columns`` or ``arrow`` (the
    fields and columns set). UsageError for input that is not of the format."""
    from spectralmc_server.pricing.errors import RequestRefusedError
    from spectralmc_server.pricing.schemas import one_line

    if fmt == "arrow":
        from spectralmc_server.pricing.arrow import BookFormatError, read_book

        try:
            head, columns = read_book(raw)
        except BookFormatError as exc:
            raise UsageError(f"stdin is not an Arrow book (--format arrow): {one_line(exc.details)}") from None
        except RequestRefusedError as exc:
            raise UsageError(f"invalid request: {one_line(exc.details)}") from None
        return "arrow", None, head, dict(columns)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        hint = " (an Arrow stream needs --format arrow)" if raw[:4] == b"\xff\xff\xff\xff" else ""
        raise UsageError(f"stdin is not valid JSON: {exc}{hint}") from None
    if isinstance(body, dict) and "columns" in body:
        from spectralmc_server.pricing.columns import columns_of_body

        try:
            head, cols = columns_of_body(body)
        except RequestRefusedError as exc:
            raise UsageError(f"invalid request: {one_line(exc.details)}") from None
        return "columns", None, head, dict(cols)
    if fmt == "columns":
        raise UsageError('--format columns reads a columnar request, {"columns": {"id": [...], ...}, ...}')
    return "rows", body, {}, {}


def _columns_request(head: dict[str, Any], columns: dict[str, Any]) -> Any:
    from spectralmc_server.pricing.columns import request_from_columns

    return request_from_columns(head, columns)


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


def _calibrate(args: argparse.Namespace) -> int:
    from spectralmc_server.engine.checkpoint import CheckpointError, read_dir
    from spectralmc_server.engine.pricer import ServedModel, load_served_model
    from spectralmc_server.marketdata.calibration import SurfaceError, calibrate_snapshot
    from spectralmc_server.marketdata.store import SnapshotStore, iso
    from spectralmc_server.models import bundled_models
    from spectralmc_server.pricing.schemas import NAMESPACE_PATTERN
    from spectralmc_server.service.calibration import store_fit
    from spectralmc_server.store.uri import open_store

    if not re.fullmatch(NAMESPACE_PATTERN, args.namespace):
        raise UsageError(f"--namespace: letters, digits, '_', '.', '-' (got {args.namespace!r})")
    vdt = _option_time("--val-datetime", args.val_datetime)
    asof = None if args.asof is None else _option_time("--asof", args.asof)
    if sum(x is not None and x is not False for x in (args.store, args.checkpoint, args.reference or None)) > 1:
        raise UsageError("give at most one of --store, --checkpoint and --reference")
    served: ServedModel | None = None
    try:
        if args.checkpoint is not None:
            served = load_served_model(read_dir(args.checkpoint, need_training=False))
        elif args.store is not None:
            served = _served_from_store(args.store, args.process)
        elif not args.reference:
            bundled = bundled_models()
            if args.process not in bundled:
                raise UsageError(f"no bundled {args.process} model: give --store, --checkpoint or --reference")
            served = load_served_model(read_dir(bundled[args.process], need_training=False), name=args.process)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    if served is not None and served.process.name != args.process:
        raise UsageError(f"the model is a {served.process.name} model, not {args.process}")
    with _store_errors(), asyncio.Runner() as runner:
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
                    snapshot, args.underlying, args.process, served, allow_arbitrage=args.allow_arbitrage
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


if __name__ == "__main__":
    sys.exit(main())
