"""VersionCache: the model versions a process loaded from the store, copied to local disk.

A replica that starts while the store is unreachable serves, per model, the most
recently served version found here whose hashes verify, else the bundled model, and
catches up once the store answers (engine_service/models.py; docs/operations.md, "The
store is down at start"). Only an S3 store is copied (``Settings.version_cache_dir``).

Layout under ``[version_cache] dir`` (default ``<data_dir>/version-cache``)::

    NAME/000000000007/manifest.json       the version's manifest blob, byte for byte
    NAME/000000000007/model.safetensors   its served weights (no training state)
    NAME/000000000007/certificate.json    its certificate blob, when it has one
    NAME/000000000007/entry.json          the version, its record and content hashes,
                                          each file's SHA-256, when it was cached and
                                          when it was last served

An entry is written whole into a temporary directory beside it and renamed into place,
so a reader finds a complete entry or none; ``served_at`` is updated by writing
``entry.json`` anew and renaming it over the old one. Reading an entry checks what the
store's load checks: every file against its SHA-256 in the entry, the weights against
the manifest, the manifest's content hash (engine/checkpoint.py ``manifest_hash``)
against the entry's, the certificate against that content hash
(store/records.py ``decode_certificate``). An entry that fails any of it is refused
(:class:`CacheRefusedError`, saying why), never repaired in place: the next
successful load of that version from the store writes it again. Each model keeps its
``keep`` most recently served entries; the others are deleted after every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from spectralmc_server.engine.checkpoint import (
    CERTIFICATE_FILE,
    MANIFEST,
    MODEL_FILE,
    Checkpoint,
    CheckpointError,
    canonical_json,
    decode,
    sha256_hex,
)
from spectralmc_server.store.objects import CorruptObjectError
from spectralmc_server.store.records import StoredVersion, decode_certificate
from spectralmc_server.store.versions import VersionStore

FORMAT = "spectralmc-version-cache/1"
ENTRY = "entry.json"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600.0  # a temporary directory this old has no live writer
_VERSION_DIR = re.compile(r"\d{12}")
_FILES = (MANIFEST, MODEL_FILE, CERTIFICATE_FILE)


class CacheRefusedError(Exception):
    """A cache entry that is missing a file, malformed, or fails a hash."""


@dataclass(frozen=True)
class CachedVersion:
    """One verified cache entry: a version as the store held it, ready to load."""

    name: str
    version: int
    content_hash: str
    record_hash: str
    served_at: float  # Unix time this process (or an earlier one) last served it
    path: Path
    checkpoint: Checkpoint  # the served weights (no training state), with its certificate if any


class VersionCache:
    """The cache directory ``root``, keeping ``keep`` versions per model."""

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"a version cache keeps at least 1 version per model, not {keep}")
        self.root = Path(root)
        self.keep = keep

    def entry_dir(self, name: str, version: int) -> Path:
        return self.root / name / f"{version:012d}"

    # -- writing -------------------------------------------------------------------------

    async def save(self, store: VersionStore, version: int) -> Path:
        """Copy ``version`` of the store's model here (its blobs fetched again, each
        checked against its hash), or, when a verified copy of the same record is here
        already, mark it served now; then delete what is past ``keep``."""
        stored = await store.version(version)
        path = self.entry_dir(store.name, version)
        try:
            have = await asyncio.to_thread(self.read, store.name, path)
        except CacheRefusedError:
            have = None  # absent, or damaged: written anew
        if have is not None and (have.content_hash, have.record_hash) == (stored.content_hash, stored.record_hash):
            await asyncio.to_thread(self._mark_served, path)
        else:
            files = await self._fetch(store, stored)
            await asyncio.to_thread(self._write, store.name, stored, files)
        await asyncio.to_thread(self.prune, store.name)
        return path

    async def _fetch(self, store: VersionStore, stored: StoredVersion) -> dict[str, bytes]:
        """The manifest, weights and certificate blobs of ``stored``, each hash-checked."""
        what = f"model {store.name!r} version {stored.version}"
        content = stored.record.get("content", {})
        wanted = {MANIFEST: str(content.get("manifest", "")), MODEL_FILE: str(content.get("model", ""))}
        found = await store.certificate_with_hash(stored.version, stored)
        if found is not None:
            wanted[CERTIFICATE_FILE] = found[0]
        blobs = await asyncio.gather(*(store.objects.get(store.content_key(h)) for h in wanted.values()))
        files: dict[str, bytes] = {}
        for (fname, h), blob in zip(wanted.items(), blobs, strict=True):
            if blob is None:
                raise CorruptObjectError(f"{what}: {fname} content {h} is missing")
            if sha256_hex(blob.data) != h:
                raise CorruptObjectError(f"{what}: {fname} content fails its hash")
            files[fname] = blob.data
        return files

    def _write(self, name: str, stored: StoredVersion, files: dict[str, bytes]) -> None:
        """Write one entry atomically: a temporary directory, then one rename."""
        at = time.time()
        entry = {
            "format": FORMAT,
            "model": name,
            "version": stored.version,
            "record_hash": stored.record_hash,
            "content_hash": stored.content_hash,
            "files": {fname: sha256_hex(data) for fname, data in files.items()},
            "cached_at": at,
            "served_at": at,
        }
        self._verify(name, stored.version, files, entry)  # never cache what a start would refuse
        parent = self.root / name
        parent.mkdir(parents=True, exist_ok=True)
        target = self.entry_dir(name, stored.version)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
        try:
            for fname, data in {**files, ENTRY: canonical_json(entry)}.items():
                _write_file(tmp / fname, data)
            try:
                tmp.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
                # An entry of this version is there (another engine process wrote it, or it
                # was damaged): move it aside, then rename ours into place.
                old = parent / f"{TMP_PREFIX}old-{uuid.uuid4().hex}"
                with contextlib.suppress(FileNotFoundError):
                    target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _mark_served(self, path: Path) -> None:
        entry = orjson.loads((path / ENTRY).read_bytes())
        entry["served_at"] = time.time()
        tmp = path / f"{TMP_PREFIX}{ENTRY}-{uuid.uuid4().hex}"
        try:
            _write_file(tmp, canonical_json(entry))
            tmp.replace(path / ENTRY)
        finally:
            tmp.unlink(missing_ok=True)

    def prune(self, name: str) -> list[Path]:
        """Delete the entries of ``name`` past the ``keep`` most recently served, and
        temporary directories older than an hour; what was deleted."""
        model_dir = self.root / name
        deleted = []
        for path in self.candidates(name)[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
        if model_dir.is_dir():
            for path in model_dir.iterdir():
                if path.name.startswith(TMP_PREFIX) and _age(path) > STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
        return deleted

    # -- reading -------------------------------------------------------------------------

    def candidates(self, name: str) -> list[Path]:
        """The entries of model ``name``, the most recently served first (an entry whose
        ``entry.json`` cannot be read comes last, to be refused by :meth:`read`)."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        ranked = []
        for path in model_dir.iterdir():
            if not (_VERSION_DIR.fullmatch(path.name) and path.is_dir()):
                continue
            served = -1.0
            with contextlib.suppress(Exception):
                at = orjson.loads((path / ENTRY).read_bytes()).get("served_at")
                if isinstance(at, int | float):
                    served = float(at)
            ranked.append((served, int(path.name), path))
        ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
        return [path for _, _, path in ranked]

    def read(self, name: str, path: Path) -> CachedVersion:
        """The verified entry at ``path`` of model ``name``; CacheRefusedError says why not."""
        if not _VERSION_DIR.fullmatch(path.name):
            raise CacheRefusedError(f"{path}: not a cache entry (the directory name is not a version)")
        version = int(path.name)
        try:
            entry = orjson.loads((path / ENTRY).read_bytes())
        except FileNotFoundError:
            raise CacheRefusedError(f"{path} has no {ENTRY}") from None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise CacheRefusedError(f"{path / ENTRY} cannot be read: {exc}") from None
        problem = _entry_problem(entry, name, version)
        if problem is not None:
            raise CacheRefusedError(f"{path / ENTRY}: {problem}")
        files: dict[str, bytes] = {}
        for fname in entry["files"]:
            try:
                files[fname] = (path / fname).read_bytes()
            except OSError as exc:
                raise CacheRefusedError(f"{path}: {fname} cannot be read: {exc}") from None
        try:
            ckpt = self._verify(name, version, files, entry)
        except CacheRefusedError as exc:
            raise CacheRefusedError(f"{path}: {exc}") from None
        return CachedVersion(
            name=name,
            version=version,
            content_hash=entry["content_hash"],
            record_hash=entry["record_hash"],
            served_at=float(entry["served_at"]),
            path=path,
            checkpoint=ckpt,
        )

    @staticmethod
    def _verify(name: str, version: int, files: dict[str, bytes], entry: dict[str, Any]) -> Checkpoint:
        """The checks of the store's load, on the entry's files (see the module docstring)."""
        for fname, data in files.items():
            if sha256_hex(data) != entry["files"].get(fname):
                raise CacheRefusedError(f"{fname} fails its SHA-256 (changed or truncated on disk)")
        try:
            ckpt = decode({MANIFEST: files[MANIFEST], MODEL_FILE: files[MODEL_FILE]}, need_training=False)
        except CheckpointError as exc:
            raise CacheRefusedError(str(exc)) from None
        if ckpt.content_hash != entry["content_hash"]:
            raise CacheRefusedError(
                f"the manifest's content hash {ckpt.content_hash} is not the version's {entry['content_hash']}"
            )
        if CERTIFICATE_FILE not in files:
            return ckpt
        what = f"model {name!r} version {version} (cached)"
        try:
            cert = decode_certificate(
                files[CERTIFICATE_FILE], entry["files"][CERTIFICATE_FILE], entry["content_hash"], what
            )
        except CorruptObjectError as exc:
            raise CacheRefusedError(str(exc)) from None
        return replace(ckpt, certificate=cert)


def _entry_problem(entry: Any, name: str, version: int) -> str | None:
    """Why a parsed entry.json is not the entry of ``version`` of ``name`` (None: it is)."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        return f"not a cache entry (expected format {FORMAT!r})"
    if entry.get("model") != name or entry.get("version") != version:
        return "names another model or version than its directory"
    if not all(isinstance(entry.get(k), str) for k in ("content_hash", "record_hash")):
        return "no content hash or record hash"
    if not isinstance(entry.get("served_at"), int | float):
        return "no served_at time"
    files = entry.get("files")
    if not isinstance(files, dict) or not {MANIFEST, MODEL_FILE} <= set(files) or not set(files) <= set(_FILES):
        return f"its files must be {MANIFEST}, {MODEL_FILE} and optionally {CERTIFICATE_FILE}"
    if not all(isinstance(h, str) for h in files.values()):
        return "a file hash is not a string"
    return None


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
