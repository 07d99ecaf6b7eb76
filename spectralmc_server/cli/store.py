"""``spectralmc store``: manage a model's versions in a store (list, inspect, certify,
verify, pin, unpin, pins, gc, tensorboard).

``--config FILE`` reads the server settings as ``spectralmc serve --config FILE`` does
(the file, then ``SPECTRALMC_`` variables over it): the ``[s3]`` table reaches S3 (its
unset fields fall back to the ``AWS_*`` variables, as the server's do) and the settings'
store is the default of ``--store``. Without ``--config`` only ``AWS_*`` is read.

The read commands (:data:`READ_OPS`) refuse a store that does not exist, on one line
with exit 2: a ``file://`` directory that is not there (it is not created) or an
``s3://`` bucket that is not there. The write commands create a local store as before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from spectralmc_server.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Parser,
    UsageError,
    certificate_settings,
    store_errors,
    validation_message,
)

# engine/certify.py's MIN_POINTS and settings.py's cap, here so `--help` needs no torch
CERT_MIN_POINTS, CERT_MAX_POINTS = 4096, 1 << 16

# an operation: (args, runner, version store) -> (the JSON result, the text for people)
_Op = Callable[[argparse.Namespace, asyncio.Runner, Any], tuple[Any, str]]

# the operations that only read the store: they refuse one that does not exist
READ_OPS = frozenset({"list", "inspect", "verify", "pins", "tensorboard"})


def add_parser(sub: Any) -> None:
    store = sub.add_parser("store", help="manage model versions in a store")
    store.add_argument("--store", help="file:///path or s3://bucket/prefix (default: the store of --config)")
    store.add_argument(
        "--config",
        type=Path,
        help="server settings TOML, as for `serve --config`: its [s3] table (endpoint, region, keys) "
        "and its store (the default of --store)",
    )
    store.add_argument("--model", required=True, help="model name")
    store.add_argument("--json", action="store_true", help="machine-readable output")
    ops = store.add_subparsers(dest="op", required=True, parser_class=Parser)
    json_flag = Parser(add_help=False)
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
    pin.add_argument(
        "--settings", type=Path, help="server settings TOML whose [certificate] table sets the gate (default: --config)"
    )
    unpin = ops.add_parser("unpin", help="track the head again", parents=[json_flag])
    unpin.add_argument("--by", default=os.environ.get("USER", ""))
    ops.add_parser("pins", help="the pin log, oldest first: who pinned or unpinned what, when", parents=[json_flag])
    gc = ops.add_parser("gc", help="delete the content of old versions (records stay)", parents=[json_flag])
    gc.add_argument("--keep", type=int, required=True, help="keep the last N versions")
    gc.add_argument("--protect", default="", help="comma-separated versions to keep too")
    gc.add_argument("--min-keep", type=int, default=1, help="never keep fewer than this")
    gc.add_argument("--grace-seconds", type=float, default=3600.0, help="age before unreferenced content is deleted")
    mode = gc.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    mode.add_argument(
        "--yes",
        action="store_true",
        help="delete, holding the model's GC lease (exit 2 while another holder, e.g. a server's GC schedule, has it)",
    )
    tb = ops.add_parser("tensorboard", help="write per-version metrics for TensorBoard", parents=[json_flag])
    tb.add_argument("--logdir", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    args.server_settings = _config(args.config)  # None without --config
    if args.store is None:
        if args.server_settings is None:
            raise UsageError("--store is required (or --config FILE, whose store is then used)")
        args.store = args.server_settings.store_uri
    s3 = None if args.server_settings is None else args.server_settings.s3.client_settings()
    # certify's --points are checked before the store is opened
    op: _Op = (
        _OPS[args.op]
        if args.op != "certify"
        else functools.partial(_certify, points=_certify_points(args.points, args.server_settings))
    )
    with _session(args.store, args.model, s3, must_exist=args.op in READ_OPS) as (runner, vs):
        result, text = op(args, runner, vs)
    sys.stdout.write((orjson.dumps(result).decode() if args.json or args.json_op else text) + "\n")
    if args.op == "verify" and not result["ok"]:
        return EXIT_FAILURE
    if args.op == "certify" and result["outcome"] == "differs":
        return EXIT_FAILURE
    return EXIT_OK


# -- settings and the store -------------------------------------------------------------


def _config(path: Path | None) -> Any:
    """The server settings of ``--config`` (then ``SPECTRALMC_`` variables), as ``serve``
    reads them; None without ``--config``."""
    if path is None:
        return None
    from spectralmc_server.settings import Settings

    if not path.is_file():
        raise UsageError(f"--config: no such file {path}")
    try:
        return Settings.load(path)
    except ValidationError as exc:
        raise UsageError(validation_message(f"--config {path}: invalid settings", exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _session(uri: str, model: str, s3: Any, *, must_exist: bool) -> Iterator[tuple[asyncio.Runner, Any]]:
    """An event loop and the VersionStore of ``model`` at ``uri`` (S3 reached with ``s3``,
    an S3Settings, or the AWS_* variables when None), closed afterwards. ``must_exist``:
    a store that does not exist is a UsageError, and a local one is not created."""
    from spectralmc_server.store.records import NAME_RE
    from spectralmc_server.store.uri import open_store, parse_store_uri
    from spectralmc_server.store.versions import VersionStore

    with store_errors(), asyncio.Runner() as runner:
        scheme, location, _ = parse_store_uri(uri)
        if not NAME_RE.match(model):  # the same check as VersionStore's, before the store is looked at
            raise UsageError(f"invalid model name {model!r}: letters, digits, '_', '.', '-' (at most 64)")
        if must_exist and scheme == "file":
            path = Path(location)
            if not path.exists():
                raise UsageError(f"store {uri} does not exist")
            if not path.is_dir():
                raise UsageError(f"store {uri} is not a directory")
        objects = runner.run(open_store(uri, s3))
        try:
            vs = VersionStore(objects, model)
            if must_exist and scheme == "s3":
                runner.run(_require_bucket(objects, uri, location))
            yield runner, vs
        finally:
            runner.run(objects.close())


async def _require_bucket(objects: Any, uri: str, bucket: str) -> None:
    """UsageError when the bucket does not exist (other failures raise as they are)."""
    from spectralmc_server.store.objects import StoreError

    try:
        await objects.list("models/", limit=1)
    except StoreError as exc:
        # S3's error code: on the error itself (store/s3.py's S3UnavailableError.code) or
        # on the S3 client's error it was raised from
        response: Any = getattr(exc.__cause__, "response", None)
        codes = {
            getattr(exc, "code", None),
            response.get("Error", {}).get("Code") if isinstance(response, dict) else None,
        }
        if "NoSuchBucket" in codes:
            raise UsageError(f"store {uri} does not exist: there is no bucket {bucket!r}") from None
        raise


# -- operations -------------------------------------------------------------------------


def _list(args: argparse.Namespace, runner: asyncio.Runner, vs: Any) -> tuple[Any, str]:
    from spectralmc_server.training.history import list_versions

    result = runner.run(list_versions(vs))
    text = (
        "\n".join(
            f"{r['version']:>6}  {r['time']}  {'H' if r['head'] else ' '}{'P' if r['pinned'] else ' '}"
            f"{'c' if r['collected'] else ' '}{'C' if r['certified'] else ' '}"
            f"{'U' if r['unqualified'] else ' '}  {r['message']}"
            for r in result
        )
        or f"model {args.model!r} has no versions"
    )
    return result, text


def _inspect(args: argparse.Namespace, runner: asyncio.Runner, vs: Any) -> tuple[Any, str]:
    from spectralmc_server.training.history import inspect_version

    result = runner.run(inspect_version(vs, args.version))
    return result, _inspect_text(result)


def _verify(args: argparse.Namespace, runner: asyncio.Runner, vs: Any) -> tuple[Any, str]:
    report = runner.run(vs.verify())
    text = (
        f"ok: {report.versions} versions, head {report.head}, pinned {report.pinned}, {len(report.collected)} collected"
        if report.ok
        else f"DAMAGED: first bad version {report.first_bad}\n"
        + "\n".join(f"  version {p['version']}: {p['object']}: {p['reason']}" for p in report.problems)
    )
    text += "".join(f"\n  note: {n}" for n in report.notes)
    return report.as_dict(), text


def _pin(args: argparse.Namespace, runner: asyncio.Runner, vs: Any) -> tuple[Any, str]:
    # the server's rule: a version that fails its gate is pinned only with --force
    from spectralmc_server.engine.certificate import gate_failures

    # --settings, else --config, else SPECTRALMC_ variables and the defaults
    certificate = (
        certificate_settings(args.settings)
        if args.settings is not None or args.server_settings is None
        else args.server_settings.certificate
    )
    limits = certificate.limits(args.model)
    failures = gate_failures(runner.run(vs.certificate(args.version)), limits)
    if failures and not args.force:
        raise UsageError(
            f"version {args.version} of {args.model!r} fails its quality gate ({'; '.join(failures)}): "
            "not pinned; add --force to pin it anyway"
        )
    entry = runner.run(vs.pin(args.version, args.by, force=bool(failures), gate=failures))
    result = {"seq": entry.index, **entry.body, "forced": bool(failures)}
    text = f"pinned: serving version {args.version} (pin log entry {entry.index})"
    if failures:
        text += f"; forced past its quality gate: {'; '.join(failures)}"
    return result, text


def _pins(args: argparse.Namespace, runner: asyncio.Runner, vs: Any) -> tuple[Any, str]:
    rows: list[dict[str, Any]] = runner.run(vs.pin_history())
    if not rows and runner.run(vs.head()) is None:
        raise UsageError(f"model {vs.name!r} is not in store {args.store}: it has no versions and no pins")
    text = "\n".join(map(_pin_line, rows)) or f"model {args.model!r} has never been pinned: servers track the head"
    return rows, text


def _pin_line(r: dict[str, Any]) -> str:
    version = "-" if r["version"] is None else str(r["version"])
    line = f"{r['seq']:>6}  {r['time']}  {r['action']:<5} {version:>6}  by {r['by'] or '(nobody said)'}"
    if r["forced"]:
        line += f"  FORCED past its quality gate: {'; '.join(map(str, r['gate'])) or '(no failures recorded)'}"
    return line


def _unpin(args: argparse.Namespace, runner: asyncio.Runner, vs: Any) -> tuple[Any, str]:
    entry = runner.run(vs.unpin(args.by))
    return {"seq": entry.index, **entry.body}, f"unpinned: serving the head (pin log entry {entry.index})"


def _gc(args: argparse.Namespace, runner: asyncio.Runner, vs: Any) -> tuple[Any, str]:
    try:
        protect = [int(x) for x in args.protect.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--protect takes comma-separated version numbers, got {args.protect!r}") from None
    if args.keep < 0 or args.min_keep < 1:
        raise UsageError("--keep must be >= 0 and --min-keep >= 1")
    gc_args = {"protect": protect, "min_keep": args.min_keep, "grace_seconds": args.grace_seconds}
    if args.dry_run:  # writes nothing: no lease
        report = runner.run(vs.gc(args.keep, dry_run=True, **gc_args))
    else:
        report = runner.run(_leased_gc(args, vs, **gc_args))
    done = "would delete" if args.dry_run else f"deleted ({report.bytes_freed} bytes)"
    text = (
        f"{done} {len(report.deleted_objects)} objects: the content of versions "
        f"{report.collected_versions}; retained {report.retained}"
    )
    return report.as_dict(), text


async def _leased_gc(args: argparse.Namespace, vs: Any, **gc_args: Any) -> Any:
    """A real GC holding the model's GC lease in the store, as the servers' GC does
    (service/gc_schedule.py): while another holder has it, one line and exit 2."""
    from spectralmc_server.store.lease import LeaseHeldError, holder_name
    from spectralmc_server.store.versions import GC_LEASE_SECONDS

    ttl = GC_LEASE_SECONDS if args.server_settings is None else args.server_settings.store_gc.lease_ttl_seconds
    user = os.environ.get("USER", "")
    lease = vs.gc_lease(holder_name(f"spectralmc store gc{f' by {user}' if user else ''}"), ttl)
    try:
        async with lease.hold():
            return await vs.gc(args.keep, dry_run=False, **gc_args)
    except LeaseHeldError as exc:
        raise UsageError(f"{exc}: nothing deleted; try again after it") from None


def _tensorboard(args: argparse.Namespace, runner: asyncio.Runner, vs: Any) -> tuple[Any, str]:
    from spectralmc_server.training.history import write_tensorboard

    result = runner.run(write_tensorboard(vs, args.logdir))
    return result, f"wrote {len(result['versions'])} versions to {result['logdir']}"


_OPS: dict[str, _Op] = {
    "list": _list,
    "inspect": _inspect,
    "verify": _verify,
    "pin": _pin,
    "unpin": _unpin,
    "pins": _pins,
    "gc": _gc,
    "tensorboard": _tensorboard,
}


# -- certify ----------------------------------------------------------------------------


def _certify_points(points: int | None, settings: Any = None) -> int:
    """--points, else the ``[certificate] points`` of ``settings`` (--config), else of the
    environment (SPECTRALMC_CERTIFICATE__POINTS)."""
    if points is None:
        if settings is not None:
            return int(settings.certificate.points)
        from spectralmc_server.settings import Settings

        try:
            return Settings().certificate.points
        except ValidationError as exc:
            raise UsageError(validation_message("SPECTRALMC_ settings", exc)) from None
    if not CERT_MIN_POINTS <= points <= CERT_MAX_POINTS:
        raise UsageError(f"--points must be from {CERT_MIN_POINTS} to {CERT_MAX_POINTS}, got {points}")
    return points


def _certify(args: argparse.Namespace, runner: asyncio.Runner, vs: Any, *, points: int) -> tuple[Any, str]:
    """Certify ``version`` and attach the certificate, or, when it has one, check that
    certifying again reproduces it: certification is deterministic (the same model, the
    same held-out points), so every figure must come out the same."""
    from spectralmc_server.engine.certificate import certificate_hash, summary
    from spectralmc_server.engine.certify import certify
    from spectralmc_server.engine.served import load_served_model
    from spectralmc_server.store.versions import CertificateExistsError

    version = args.version
    ckpt = runner.run(vs.load(version))
    served = load_served_model(ckpt, name=vs.name, version=version, require_certificate=False)
    if not (args.json or args.json_op):
        print(f"certifying {vs.name!r} version {version} on {points} held-out points ...", file=sys.stderr)
    start = time.perf_counter()
    cert = certify(served, points=points)
    elapsed = time.perf_counter() - start
    computed = certificate_hash(cert)
    existing = None if ckpt.certificate is None else certificate_hash(ckpt.certificate)

    if existing is None:
        try:
            stored = runner.run(vs.attach_certificate(version, cert))
            outcome = "attached"
        except CertificateExistsError as exc:  # another certify attached one meanwhile
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
        _certify_verdict(outcome, version, stored, existing, computed),
    ]
    return result, "\n".join(lines)


def _certify_verdict(outcome: str, version: int, stored: Any, existing: Any, computed: str) -> str:
    if outcome == "attached":
        return f"attached: version {version} is now certified by {stored}"
    if outcome == "reproduced":
        return f"reproduced exactly: the stored certificate {existing}, byte for byte"
    return (
        f"DIFFERS: version {version} is certified by {existing}; this run computed {computed}. "
        "The store is unchanged (a certificate is never replaced)"
    )


# -- text for people --------------------------------------------------------------------

# Measures whose normalised error is a price in units of the discounted forward (or,
# for the digital, of the discounted payout): x 1e4 is basis points (of spot, as the
# certificate's points are priced with spot 1 and no rates).
_BP_UNITS = frozenset({"D F", "D"})


def _certificate_table(cert: dict[str, Any]) -> str:
    """A certificate's summary (certificate.summary, with "hash") as a table."""
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
