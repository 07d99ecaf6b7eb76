"""Checkpoint directories: safetensors weights plus a JSON manifest, never pickle.

Layout::

    manifest.json          format, model description (process, domain, spectrum,
                           network), training config and state, metrics, the
                           SHA-256 of each tensor file, and the run facts (``run``)
    model.safetensors      the EMA weights: what is served
    training.safetensors   raw weights and optimiser state: what resuming needs
    certificate.json       optional: the model's measured error map (engine/certify.py),
                           naming the content hash it certifies

The model's content hash is the SHA-256 of the canonical manifest bytes without the
manifest's ``run`` key (:func:`manifest_hash`); since the manifest lists each tensor
file's hash, it covers every byte of the checkpoint except the run facts. ``run`` holds
what differs between two runs that train the same bits (:func:`run_facts`: the command
line, the wall-clock training seconds, the wall-clock time of each validation), so
equal training gives an equal hash. A manifest without ``run`` (every checkpoint
written before it existed) hashes as its exact bytes, as it always did. The certificate
is about the model, not part of it: it names the model's hash (checked on read), and a
version store keeps its own SHA-256 of every blob (docs/store.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import torch

FORMAT = "spectralmc-checkpoint/1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
CERTIFICATE_FILE = "certificate.json"
RUN = "run"  # the manifest key the content hash leaves out


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed or fails its hashes."""


def library_versions() -> dict[str, str]:
    """Versions of the code that wrote a checkpoint (read from package metadata)."""
    from spectralmc_server import __version__

    out = {"spectralmc": __version__}
    for dist in ("torch", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def sha256_hex(data: bytes) -> str:
    """The content hash of checkpoints, certificates and every stored object (store/cas.py):
    ``"sha256:" + hex digest``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


def manifest_hash(manifest: Mapping[str, Any], data: bytes) -> str:
    """The content hash of a checkpoint whose manifest is ``data`` (parsed: ``manifest``).

    Without a ``run`` key: the SHA-256 of ``data`` itself (the rule every checkpoint
    written before ``run`` existed was hashed by, so their hashes never change). With
    one: the SHA-256 of the canonical JSON of the manifest without it, so the run facts
    (command line, wall-clock times) are stored with the model but are not its identity.
    """
    if RUN not in manifest:
        return sha256_hex(data)
    return sha256_hex(canonical_json({k: v for k, v in manifest.items() if k != RUN}))


def run_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The run facts of a manifest: ``command`` (str or None), ``elapsed_seconds`` (float
    or None) and ``validation_seconds`` (one float or None per ``metrics.history`` entry).
    Read from ``run``, falling back to where checkpoints written before it kept them
    (``metrics.command``, ``state.elapsed_seconds``, each history entry's
    ``elapsed_seconds``)."""

    def table(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    run, metrics, state = table(manifest.get(RUN)), table(manifest.get("metrics")), table(manifest.get("state"))
    history = metrics.get("history")
    history = history if isinstance(history, list) else []
    times = run.get("validation_seconds")
    if not (isinstance(times, list) and len(times) == len(history)):
        times = [table(h).get("elapsed_seconds") for h in history]
    return {
        "command": run.get("command", metrics.get("command")),
        "elapsed_seconds": run.get("elapsed_seconds", state.get("elapsed_seconds")),
        "validation_seconds": list(times),
    }


def timed_history(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``metrics.history`` (the validations) with each entry's wall-clock
    ``elapsed_seconds`` put back from the run facts (None where none was recorded)."""
    metrics = manifest.get("metrics")
    history = metrics.get("history") if isinstance(metrics, Mapping) else None
    if not isinstance(history, list):
        return []
    seconds = run_facts(manifest)["validation_seconds"]
    return [{**h, "elapsed_seconds": t} for h, t in zip(history, seconds, strict=True)]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in memory: manifest plus tensors."""

    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]  # EMA weights, by parameter name
    training: dict[str, torch.Tensor]  # raw weights and optimiser state
    read_hash: str | None = None  # content hash of the manifest this was read from (manifest_hash)
    certificate: dict[str, Any] | None = None  # engine/certify.py's certificate of this model, if any

    def encode(self) -> dict[str, bytes]:
        """File name -> bytes, with the tensor hashes written into the manifest."""
        from safetensors.torch import save as st_save

        model_bytes = st_save(_contiguous(self.model))
        training_bytes = st_save(_contiguous(self.training))
        manifest = dict(self.manifest)
        manifest["format"] = FORMAT
        manifest["files"] = {MODEL_FILE: sha256_hex(model_bytes), TRAINING_FILE: sha256_hex(training_bytes)}
        return {MANIFEST: canonical_json(manifest), MODEL_FILE: model_bytes, TRAINING_FILE: training_bytes}

    @property
    def content_hash(self) -> str:
        if self.read_hash is not None:
            return self.read_hash
        return _hash_of(self.encode()[MANIFEST])


def _hash_of(data: bytes) -> str:
    """:func:`manifest_hash` of manifest bytes this module wrote."""
    return manifest_hash(orjson.loads(data), data)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def decode(files: dict[str, bytes], *, need_training: bool = True) -> Checkpoint:
    """Parse and verify checkpoint files (every tensor file against the manifest)."""
    from safetensors.torch import load as st_load

    if MANIFEST not in files:
        raise CheckpointError(f"checkpoint has no {MANIFEST}")
    try:
        manifest = orjson.loads(files[MANIFEST])
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"{MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{MANIFEST}: unsupported format (expected {FORMAT!r})")
    hashes = manifest.get("files", {})
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in (MODEL_FILE, TRAINING_FILE) if need_training else (MODEL_FILE,):
        if name not in files:
            raise CheckpointError(f"checkpoint has no {name}")
        if sha256_hex(files[name]) != hashes.get(name):
            raise CheckpointError(f"{name} does not match the hash in {MANIFEST} (corrupt or edited)")
        tensors[name] = st_load(files[name])
    read_hash = manifest_hash(manifest, files[MANIFEST])
    return Checkpoint(manifest, tensors[MODEL_FILE], tensors.get(TRAINING_FILE, {}), read_hash=read_hash)


def write_dir(ckpt: Checkpoint, path: Path) -> str:
    """Write atomically (temp dir, then rename over); returns the content hash."""
    path = Path(path)
    files = ckpt.encode()
    written = dict(files)
    if ckpt.certificate is not None:  # the directory is replaced whole: no stale certificate stays
        written[CERTIFICATE_FILE] = canonical_json(ckpt.certificate)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is shared like any directory
    try:
        for name, data in written.items():
            with (tmp / name).open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.replace(old)
        tmp.replace(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _hash_of(files[MANIFEST])


def read_dir(path: Path, *, need_training: bool = True) -> Checkpoint:
    """Read and verify a checkpoint directory."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no {MANIFEST})")
    names = [MANIFEST, MODEL_FILE] + ([TRAINING_FILE] if need_training else [])
    files = {}
    for name in names:
        try:
            files[name] = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path} has no {name}") from None
    ckpt = decode(files, need_training=need_training)
    cert_path = path / CERTIFICATE_FILE
    if not cert_path.is_file():
        return ckpt
    from dataclasses import replace

    from spectralmc_server.engine.certificate import CertificateError
    from spectralmc_server.engine.certificate import decode as decode_certificate

    try:
        cert = decode_certificate(cert_path.read_bytes(), ckpt.content_hash)
    except CertificateError as exc:
        raise CheckpointError(f"{cert_path}: {exc}") from None
    return replace(ckpt, certificate=cert)
