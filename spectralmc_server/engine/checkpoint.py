"""Checkpoint directories: safetensors weights plus a JSON manifest, never pickle.

Layout::

    manifest.json          format, model description (process, domain, spectrum,
                           network), training config and state, metrics, and the
                           SHA-256 of each tensor file
    model.safetensors      the EMA weights: what is served
    training.safetensors   raw weights and optimiser state: what resuming needs
    certificate.json       optional: the model's measured error map (engine/certify.py),
                           naming the content hash it certifies

The model's content hash is the SHA-256 of the canonical manifest bytes; since the
manifest lists each tensor file's hash, it covers every byte of the checkpoint. The
certificate is about the model, not part of it: it names the model's hash (checked on
read), and a version store keeps its own SHA-256 (docs/store.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
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


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in memory: manifest plus tensors."""

    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]  # EMA weights, by parameter name
    training: dict[str, torch.Tensor]  # raw weights and optimiser state
    read_hash: str | None = None  # content hash of the manifest bytes this was read from
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
        return sha256_hex(self.encode()[MANIFEST])


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
    return Checkpoint(
        manifest, tensors[MODEL_FILE], tensors.get(TRAINING_FILE, {}), read_hash=sha256_hex(files[MANIFEST])
    )


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
    return sha256_hex(files[MANIFEST])


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
