"""``spectralmc store``: manage a model's versions in a store (list, inspect, certify,
verify, pin, unpin, gc, tensorboard)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from collections.abc import Callable
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
    store_session,
    validation_message,
)

# engine/certify.py's MIN_POINTS and settings.py's cap, here so `--help` needs no torch
CERT_MIN_POINTS, CERT_MAX_POINTS = 4096, 1 << 16

# an operation: (args, runner, version store) -> (the JSON result, the text for people)
_Op = Callable[[argparse.Namespace, asyncio.Runner, Any], tuple[Any, str]]


def add_parser(sub: Any) -> None:
    store = sub.add_parser("store", help="manage model versions in a store")
    store.add_argument("--store", required=True, help="file:///path or s3://bucket/prefix")
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


def run(args: argparse.Namespace) -> int:
    # certify's --points are checked before the store is opened
    op: _Op = (
        _OPS[args.op] if args.op != "certify" else functools.partial(_certify, points=_certify_points(args.points))
    )
    with store_session(args.store, args.model) as (runner, vs):
        result, text = op(args, runner, vs)
    sys.stdout.write((orjson.dumps(result).decode() if args.json or args.json_op else text) + "\n")
    if args.op == "verify" and not result["ok"]:
        return EXIT_FAILURE
    if args.op == "certify" and result["outcome"] == "differs":
        return EXIT_FAILURE
    return EXIT_OK


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

    limits = certificate_settings(args.settings).limits(args.model)
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
    report = runner.run(
        vs.gc(
            args.keep, protect=protect, min_keep=args.min_keep, dry_run=args.dry_run, grace_seconds=args.grace_seconds
        )
    )
    done = "would delete" if args.dry_run else f"deleted ({report.bytes_freed} bytes)"
    text = (
        f"{done} {len(report.deleted_objects)} objects: the content of versions "
        f"{report.collected_versions}; retained {report.retained}"
    )
    return report.as_dict(), text


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
    "gc": _gc,
    "tensorboard": _tensorboard,
}


# -- certify ----------------------------------------------------------------------------


def _certify_points(points: int | None) -> int:
    """--points, else the settings' ``[certificate] points`` (SPECTRALMC_CERTIFICATE__POINTS)."""
    if points is None:
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
