"""The object-store protocol: get, put-if-absent, put-if-match, paginated list, delete.

That is all the version store needs (git and lakeFS build on the same two conditional
writes). Two backends implement it: a local directory (the embedded default) and S3
(``store/s3.py``). One conformance suite (tests/store/test_objects.py) runs against both.

Semantics every backend keeps:
- ``get`` returns ``None`` only when the key definitely does not exist; any other
  failure raises (a transient error is never mistaken for an empty store).
- ``put_if_absent`` creates the key or raises :class:`PreconditionFailedError`.
- ``put_if_match`` replaces the key only if its current etag is the given one, else
  raises :class:`PreconditionFailedError` (also when the key does not exist: S3 answers 404
  there, SeaweedFS 412; both mean the same).
- ``list`` returns keys in lexicographic order, one page at a time.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

KEY_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*")
MAX_PAGE = 1000
ORPHAN_TEMP_SECONDS = 300.0  # a local store's temporary file this old has no live writer (see collect_temporaries)


class StoreError(Exception):
    """Base of the object-store errors."""


class CorruptObjectError(StoreError):
    """Stored bytes that fail their hash or do not parse: history or a snapshot has been
    damaged or edited (versions, certificates, market-data snapshots alike)."""


class PreconditionFailedError(StoreError):
    """A conditional write lost: the key exists (put-if-absent) or changed (put-if-match)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or kept failing after the bounded retries."""


class InvalidKeyError(StoreError, ValueError):
    """A key outside the allowed alphabet or shape."""


@dataclass(frozen=True)
class Blob:
    """An object's bytes and the etag that a later put-if-match must quote."""

    data: bytes
    etag: str


@dataclass(frozen=True)
class Page:
    """One page of a listing; pass ``next_after`` back as ``start_after`` for the next.
    ``modified`` holds each key's last-modified time (Unix seconds)."""

    keys: list[str]
    modified: list[float]
    next_after: str | None


class ObjectStore(Protocol):
    """The five operations of an object store (see the module docstring)."""

    description: str

    async def get(self, key: str) -> Blob | None: ...

    async def put_if_absent(self, key: str, data: bytes) -> str: ...

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str: ...

    async def list(self, prefix: str, start_after: str | None = None, limit: int = MAX_PAGE) -> Page: ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


def check_key(key: str) -> str:
    """Keys are '/'-separated parts of letters, digits, '_', '.', '-', none starting with
    '.' (so no '..' and no clash with a local store's hidden directories)."""
    if not KEY_RE.fullmatch(key):
        raise InvalidKeyError(
            f"invalid object key {key!r}: use '/'-separated parts of letters, digits, '_', '.', '-' "
            "that do not start with '.'"
        )
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key prefix (it may end in '/' or mid-part)."""
    if prefix and not KEY_RE.fullmatch(prefix.rstrip("/") or "x"):
        raise InvalidKeyError(f"invalid listing prefix {prefix!r}")
    return prefix


async def list_all(store: ObjectStore, prefix: str, page_size: int = MAX_PAGE) -> list[tuple[str, float]]:
    """Every (key, modified) under ``prefix``, following the pages to the end."""
    items: list[tuple[str, float]] = []
    after: str | None = None
    while True:
        page = await store.list(prefix, after, page_size)
        items.extend(zip(page.keys, page.modified, strict=True))
        if page.next_after is None:
            return items
        after = page.next_after


def local_etag(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _may_hold(sub: str, prefix: str, start_after: str | None) -> bool:
    """Can directory ``sub`` (a key prefix ending in "/") hold keys of a listing of
    ``prefix`` after ``start_after``?"""
    if not (sub.startswith(prefix) or prefix.startswith(sub)):
        return False
    # every key below sub sorts before start_after ('~' follows every key character)
    return start_after is None or not (sub < start_after[: len(sub)] or start_after >= sub + "~")


class LocalObjectStore:
    """Objects as files under ``root``; atomic and safe across processes on one machine.

    - put-if-absent writes a temporary file and hard-links it into place: ``link(2)``
      fails if the name exists, so exactly one of several racing processes wins.
    - put-if-match takes an exclusive ``flock`` on a per-key lock file, compares the
      current etag (a hash of the bytes), and renames a temporary file over the key;
      readers never see a partial object (rename is atomic) and need no lock.
    - Temporary files live under ``.tmp/``; a writer killed midway leaves only such
      files, which :meth:`collect_temporaries` removes.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.description = f"file://{self.root}"
        self._tmp = self.root / ".tmp"
        self._locks = self.root / ".locks"
        for d in (self.root, self._tmp, self._locks):
            d.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_temp(self, data: bytes) -> Path:
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    async def get(self, key: str) -> Blob | None:
        path = self._path(key)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None  # a missing key (or a path through or onto a directory of keys)
        return Blob(data, local_etag(data))

    def _put_if_absent(self, key: str, data: bytes) -> str:
        path = self._path(key)
        if path.is_file():  # cheap early answer; link(2) below is what decides a race
            raise PreconditionFailedError(f"{key} already exists")
        if path.is_dir():
            raise StoreError(f"{key}: a local store cannot hold both {key} and keys under {key}/")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"{key}: a local store cannot hold a key under another key's name") from None
        tmp = self._write_temp(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise PreconditionFailedError(f"{key} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return local_etag(data)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        return await asyncio.to_thread(self._put_if_absent, key, data)

    def _put_if_match(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        lock_path = self._locks / (hashlib.sha256(key.encode()).hexdigest() + ".lock")
        with lock_path.open("a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise PreconditionFailedError(f"{key} does not exist") from None
            if local_etag(current) != etag:
                raise PreconditionFailedError(f"{key} changed (etag {local_etag(current)}, expected {etag})")
            tmp = self._write_temp(data)
            try:
                tmp.replace(path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        return local_etag(data)

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return await asyncio.to_thread(self._put_if_match, key, data, etag)

    def _list(self, prefix: str, start_after: str | None, limit: int) -> Page:
        # Walk only the directory that holds the prefix, in sorted order, so a listing
        # of N keys costs O(N) however many pages it takes.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start_dir = self.root / base if base else self.root
        keys: list[str] = []
        modified: list[float] = []
        if not start_dir.is_dir():
            return Page([], [], None)

        def order(entry: os.DirEntry[str]) -> str:
            # Full-key byte order, as S3 lists: a directory sorts as its name plus "/".
            return entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name

        def walk(d: Path, rel: str) -> bool:
            for entry in sorted(os.scandir(d), key=order):
                if not rel and entry.name in (".tmp", ".locks"):
                    continue
                key = f"{rel}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    sub = key + "/"
                    if _may_hold(sub, prefix, start_after) and walk(Path(entry.path), sub):
                        return True
                elif key.startswith(prefix) and (start_after is None or key > start_after):
                    keys.append(key)
                    modified.append(entry.stat(follow_symlinks=False).st_mtime)
                    if len(keys) > limit:
                        return True
            return False

        walk(start_dir, base + "/" if base else "")
        if len(keys) > limit:
            return Page(keys[:limit], modified[:limit], keys[limit - 1])
        return Page(keys, modified, None)

    async def list(self, prefix: str, start_after: str | None = None, limit: int = MAX_PAGE) -> Page:
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"page size must be in 1..{MAX_PAGE}, got {limit}")
        return await asyncio.to_thread(self._list, check_prefix(prefix), start_after, limit)

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return  # deleting what is not there is not an error
        # Drop directories the key leaves empty, so the name can hold an object again.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    async def close(self) -> None:
        return None

    def collect_temporaries(self, older_than_seconds: float = 3600.0) -> int:
        """Remove temporary files left by writers that died; returns how many.

        Only files not written for ``older_than_seconds`` go: a live writer (in this
        process or another one sharing the directory) writes, fsyncs and links or
        renames its temporary file within moments, and its mtime moves while it writes,
        so a file minutes old has no writer left. Servers run this when they open the
        store (with :data:`ORPHAN_TEMP_SECONDS`), and GC with its grace period."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for p in self._tmp.glob("*.part"):
            try:
                if p.is_file() and p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:  # some filesystems refuse to open directories
        if exc.errno in (errno.EISDIR, errno.EACCES):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
