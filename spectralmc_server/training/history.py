"""A model's versions as data: list and inspect (``spectralmc store list`` and
``inspect``, and the admin routes), and their training metrics written for
TensorBoard (``spectralmc store tensorboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spectralmc_server.engine.checkpoint import run_facts
from spectralmc_server.store.versions import StoredVersion, VersionStore


def _row(
    v: StoredVersion, head: int | None, pinned: int | None, collected: set[int], certified: set[int]
) -> dict[str, Any]:
    r = v.record
    return {
        "version": v.version,
        "time": r.get("time"),
        "message": r.get("message"),
        "content_hash": r.get("content_hash"),
        "record_hash": v.record_hash,
        "metrics": r.get("metrics", {}),
        "head": v.version == head,
        "pinned": v.version == pinned,
        "collected": v.version in collected,
        # a link exists (store verify checks it); a collected version's is gone with it
        "certified": v.version in certified and v.version not in collected,
        "unqualified": bool(r.get("unqualified", False)),  # committed past a failing quality gate
    }


async def list_versions(store: VersionStore) -> list[dict[str, Any]]:
    versions = await store.versions()
    head = await store.head()
    pinned = await store.pinned()
    collected = await store.collected()
    certified = await store.certified()
    return [_row(v, head.version if head else None, pinned, collected, certified) for v in versions]


async def inspect_version(store: VersionStore, version: int) -> dict[str, Any]:
    """The record, the manifest's description and the certificate's summary of one
    version (weights not loaded; the certificate's link and blob are checked)."""
    v = await store.version(version)
    head = await store.head()
    collected = await store.collected()
    certified = await store.certified()
    row = _row(v, head.version if head else None, await store.pinned(), collected, certified)
    row["record"] = v.record
    row["certificate"] = None
    if version not in collected:
        found = await store.certificate_with_hash(version, v)
        if found is not None:
            from spectralmc_server.engine.certificate import summary  # imports torch: only when there is one

            row["certificate"] = {"hash": found[0], **summary(found[1])}
    manifest = await store.manifest(version)
    if manifest is not None:
        metrics = dict(manifest.get("metrics", {}))
        metrics.pop("history", None)
        row["manifest"] = {
            "model": manifest.get("model"),
            "training": manifest.get("training"),
            "state": manifest.get("state"),
            "metrics": metrics,
            # the command line and training seconds, from ``run`` or where older manifests kept
            # them, and the version this state continued (training/resume.py; None: unrecorded)
            "run": {
                **{k: v for k, v in run_facts(manifest).items() if k != "validation_seconds"},
                "trained_from": run.get("trained_from") if isinstance(run := manifest.get("run"), dict) else None,
            },
        }
    return row


async def write_tensorboard(store: VersionStore, logdir: Path) -> dict[str, Any]:
    """Per version: its validation history, the committed metrics, parameter count and
    commit time, written with torch's SummaryWriter (needs the tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when tensorboard is missing
        raise RuntimeError(
            "spectralmc store tensorboard needs the tensorboard package (pip install tensorboard)"
        ) from exc
    import datetime as dt

    written = []
    writer = SummaryWriter(log_dir=str(logdir / store.name))
    try:
        for v in await store.versions():
            manifest = await store.manifest(v.version)
            when = dt.datetime.fromisoformat(str(v.record["time"]).replace("Z", "+00:00")).timestamp()
            step = int(v.record.get("metrics", {}).get("step") or v.version)
            for key, value in v.record.get("metrics", {}).items():
                if isinstance(value, int | float) and key != "step":
                    writer.add_scalar(f"commit/{key}", value, step, walltime=when)
            writer.add_scalar("commit/version", v.version, step, walltime=when)
            writer.add_scalar("commit/time_unix", when, step, walltime=when)
            if manifest is not None:
                params = manifest.get("metrics", {}).get("parameters")
                if isinstance(params, int):
                    writer.add_scalar("model/parameters", params, step, walltime=when)
                for h in manifest.get("metrics", {}).get("history", []):
                    for key in ("p50_bp", "p95_bp", "max_bp", "cf_rmse", "loss"):
                        if isinstance(h.get(key), int | float):
                            writer.add_scalar(f"validation/{key}", h[key], int(h["step"]))
            written.append(v.version)
    finally:
        writer.close()
    return {"model": store.name, "logdir": str(logdir / store.name), "versions": written}
