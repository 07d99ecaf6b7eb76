"""Small checkpoints for version-store tests, and a process that commits them.

Checkpoints are encoded in the test process (safetensors needs torch); the committing
child processes only import the store (no torch), so they start in a fraction of a
second and can be killed and restarted cheaply.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from spectralmc_server.engine.checkpoint import Checkpoint


def tiny_files(tag: int, size: int = 64) -> dict[str, bytes]:
    """An encoded checkpoint whose every weight equals ``tag`` (its output names it)."""
    import torch  # here, not at import: committing children never load torch

    ckpt = Checkpoint(
        manifest={
            "model": {"process": "test"},
            "state": {"step": tag},
            "metrics": {"validation": {"p95_bp": 1.0 / (tag + 1)}},
        },
        model={"w": torch.full((size,), float(tag)), "b": torch.full((3,), float(tag))},
        training={"weights/w": torch.full((size,), float(tag))},
    )
    return ckpt.encode()


def write_files(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def read_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


async def open_objects(spec: dict[str, Any]) -> Any:
    """An object store from a picklable description (for child processes)."""
    if spec["kind"] == "local":
        from spectralmc_server.store.objects import LocalObjectStore

        return LocalObjectStore(Path(spec["root"]))
    from spectralmc_server.store.s3 import S3ObjectStore, S3Settings

    return await S3ObjectStore(spec["bucket"], spec["prefix"], S3Settings(**spec["settings"])).open()


async def commit_many(spec: dict[str, Any], name: str, files_dirs: list[str], forever: bool = False) -> list[int]:
    """Commit each checkpoint directory in turn with rebase (forever: cycle until killed)."""
    from spectralmc_server.store.versions import VersionStore

    objects = await open_objects(spec)
    vs = VersionStore(objects, name)
    if forever:  # tell the parent the imports and the connection are done: commits start now
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    done: list[int] = []
    try:
        while True:
            for d in files_dirs:
                stored = await vs.commit_files(read_files(Path(d)), f"from {d}", rebase=True)
                done.append(stored.version)
            if not forever:
                return done
    finally:
        await objects.close()


def child_main(spec: dict[str, Any], name: str, files_dirs: list[str], forever: bool) -> list[int]:
    return asyncio.run(commit_many(spec, name, files_dirs, forever))


if __name__ == "__main__":  # python store_util.py <spec json> <name> <dir>...: commit forever
    import orjson

    child_main(orjson.loads(sys.argv[1]), sys.argv[2], sys.argv[3:], True)
