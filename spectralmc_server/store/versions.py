"""Model versions the git/lakeFS way: immutable content, hash-chained records, CAS refs.

Layout of model ``NAME`` in an object store::

    models/NAME/content/<sha256>           immutable blobs: manifest, weights (safetensors),
                                           certificates (engine/certify.py)
    models/NAME/records/<version>.json     version records, each created once (put-if-absent)
    models/NAME/refs/head                  {"index": n, "hash": record hash}, moved by CAS
    models/NAME/pinlog/<seq>.json          append-only log of pin / unpin, hash-chained
    models/NAME/refs/pin                   pointer to the last pin-log entry, moved by CAS
    models/NAME/gc/<version>.json          marker: this version's content was collected
    models/NAME/certs/<version>.json       link: version -> its certificate blob, created once

A record names its parent's record hash, so editing any byte of history breaks the
chain. Claiming record n with put-if-absent means two writers can never both own
version n; the loser gets :class:`CommitConflict` naming the winner, or rebases onto
it. The head pointer is a cache of the chain's tip: a committer that dies after
claiming version n but before moving the head leaves the pointer one behind, and
every reader rolls it forward (and moves it, helping) by probing the next record.

A certificate is linked to its version, not written into the record: records are
immutable and hash-chained, and a version committed before certificates existed (or
whose certification failed or was interrupted) must be certifiable later in place,
without renumbering anything. The link names the record's hash and the model's content
hash, so it cannot be moved to another version unnoticed, and is created once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import orjson

from spectralmc_server.engine.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    TRAINING_FILE,
    Checkpoint,
    CheckpointError,
    canonical_json,
    decode,
    library_versions,
    sha256_hex,
)
from spectralmc_server.store.objects import (
    LocalObjectStore,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    list_all,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
RECORD_FORMAT = "spectralmc-version/1"
PIN_FORMAT = "spectralmc-pin/1"
GC_FORMAT = "spectralmc-gc/1"
LINK_FORMAT = "spectralmc-certificate-link/1"
LINK_FIELDS = frozenset({"format", "model", "version", "record", "model_hash", "certificate"})
CONTENT_ROLES = {"manifest": MANIFEST, "model": MODEL_FILE, "training": TRAINING_FILE}
CONCURRENCY = 32  # object reads in flight when walking history

LIBRARY = library_versions()


class VersionError(StoreError):
    """A version-store operation that cannot be done as asked."""


class VersionNotFound(VersionError):  # noqa: N818
    """No record for that version."""


class ContentCollected(VersionError):  # noqa: N818
    """The version's record exists but garbage collection removed its content."""


class CorruptObject(VersionError):  # noqa: N818
    """An object fails its hash or does not parse: history has been damaged or edited."""


class CertificateExists(VersionError):  # noqa: N818
    """The version already has a different certificate: links are created once."""

    def __init__(self, model: str, version: int, existing: str, offered: str) -> None:
        super().__init__(
            f"model {model!r} version {version} already has certificate {existing}; "
            f"refusing to replace it with {offered}"
        )
        self.version = version
        self.existing = existing
        self.offered = offered


class CommitConflict(VersionError):  # noqa: N818
    """Another writer claimed the version number first."""

    def __init__(self, version: int, winner: dict[str, Any]) -> None:
        super().__init__(
            f"version {version} was committed first by another writer "
            f"({winner.get('message', '')!r} at {winner.get('time', '?')}); commit again with rebase to follow it"
        )
        self.version = version
        self.winner = winner


def _hex(h: str) -> str:
    return h.removeprefix("sha256:")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptObject(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CorruptObject(f"{what} is not a JSON object")
    return value


def _certificate_bytes(cert: Mapping[str, Any], model_hash: str, what: str) -> bytes:
    """The bytes a certificate is stored as (``certify.encode``: canonical JSON), once it
    is known to be a certificate of ``model_hash``; VersionError otherwise (the caller's
    mistake, caught before anything is written)."""
    from spectralmc_server.engine import certify  # imports torch: only where a certificate is handled

    if cert.get("model_hash") != model_hash:
        raise VersionError(f"{what}: the certificate is for model {cert.get('model_hash')!r}, not {model_hash!r}")
    data = certify.encode(cert)
    try:
        certify.decode(data, model_hash)
    except certify.CertificateError as exc:
        raise VersionError(f"{what}: {exc}") from None
    return data


def _decode_certificate(data: bytes, h: str, model_hash: str, what: str) -> dict[str, Any]:
    """A stored certificate blob, checked against its hash and the model it must certify."""
    from spectralmc_server.engine import certify

    if sha256_hex(data) != h:
        raise CorruptObject(f"{what}: certificate {h} fails its SHA-256 (bytes changed)")
    try:
        return certify.decode(data, model_hash)
    except certify.CertificateError as exc:
        raise CorruptObject(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Entry:
    """One chain entry: its index, parsed body, exact bytes and their hash."""

    index: int
    body: dict[str, Any]
    data: bytes
    hash: str


async def _gather_limited(calls: Iterable[Callable[[], Awaitable[Any]]], limit: int = CONCURRENCY) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def run(call: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await call()

    return list(await asyncio.gather(*(run(c) for c in calls)))


class Chain:
    """Entries created once at ``prefix/<index>.json`` (index 1, 2, ...), each naming
    its parent's hash, with a pointer at ``ref`` moved forward by CAS."""

    def __init__(self, objects: ObjectStore, prefix: str, ref: str, index_field: str) -> None:
        self.objects = objects
        self.prefix = prefix
        self.ref = ref
        self.index_field = index_field

    def key(self, index: int) -> str:
        return f"{self.prefix}/{index:012d}.json"

    async def read(self, index: int) -> Entry | None:
        blob = await self.objects.get(self.key(index))
        if blob is None:
            return None
        body = _parse(blob.data, self.key(index))
        return Entry(index, body, blob.data, sha256_hex(blob.data))

    async def read_ref(self) -> tuple[int, str | None]:
        blob = await self.objects.get(self.ref)
        return (0, None) if blob is None else self._parse_ref(blob.data)

    def _parse_ref(self, data: bytes) -> tuple[int, str]:
        body = _parse(data, self.ref)
        index, h = body.get("index"), body.get("hash")
        if not isinstance(index, int) or index < 1 or not isinstance(h, str):
            raise CorruptObject(f"{self.ref} does not name an entry: {data[:200]!r}")
        return index, h

    async def tip(self) -> tuple[int, str | None]:
        """(index, hash) of the last entry, rolling the pointer forward over entries a
        writer created without moving it (and moving it, to help)."""
        index, h = await self.read_ref()
        start = index
        while True:
            nxt = await self.read(index + 1)
            if nxt is None:
                break
            if nxt.body.get("parent") != h:
                raise CorruptObject(f"{self.key(index + 1)} does not name {self.key(index)} as its parent")
            index, h = index + 1, nxt.hash
        if index > start and h is not None:
            await self.move_ref(index, h)
        return index, h

    async def move_ref(self, index: int, h: str) -> None:
        """Move the pointer to (index, h) unless it already points at or beyond index."""
        data = canonical_json({"index": index, "hash": h})
        while True:
            blob = await self.objects.get(self.ref)
            try:
                if blob is None:
                    await self.objects.put_if_absent(self.ref, data)
                    return
                current, _ = self._parse_ref(blob.data)
                if current >= index:
                    return
                await self.objects.put_if_match(self.ref, data, blob.etag)
                return
            except PreconditionFailed:
                continue  # another writer moved it; look again

    async def append(
        self, make: Callable[[int, str | None], dict[str, Any]], *, retry: bool, only_index: int | None = None
    ) -> Entry:
        """Create the next entry with ``make(index, parent_hash)``; on losing the race,
        raise :class:`CommitConflict` or (``retry``) build on the winner and try again.
        ``only_index``: create entry number ``only_index`` or nothing (CommitConflict when
        the log has moved past it: "only if still empty" is ``only_index=1``)."""
        while True:
            index, parent = await self.tip()
            if only_index is not None and index + 1 != only_index:
                winner = await self.read(only_index)
                raise CommitConflict(only_index, winner.body if winner else {})
            body = make(index + 1, parent)
            body[self.index_field] = index + 1
            body["parent"] = parent
            data = canonical_json(body)
            try:
                await self.objects.put_if_absent(self.key(index + 1), data)
            except PreconditionFailed:
                if not retry:
                    winner = await self.read(index + 1)
                    raise CommitConflict(index + 1, winner.body if winner else {}) from None
                continue
            h = sha256_hex(data)
            await self.move_ref(index + 1, h)
            return Entry(index + 1, body, data, h)

    async def all(self) -> list[Entry]:
        """Every entry in index order (listing pages, then reads in parallel)."""
        keys = [k for k, _ in await list_all(self.objects, self.prefix + "/")]
        entries: list[Entry] = []
        for key, blob in zip(keys, await _gather_limited([partial(self.objects.get, k) for k in keys]), strict=True):
            if blob is None:
                continue  # deleted between listing and reading
            m = re.fullmatch(re.escape(self.prefix) + r"/(\d{12})\.json", key)
            if m is None:
                raise CorruptObject(f"unexpected object {key} among the entries")
            entries.append(Entry(int(m.group(1)), _parse(blob.data, key), blob.data, sha256_hex(blob.data)))
        return entries


@dataclass(frozen=True)
class StoredVersion:
    """A version record as stored, with its hash."""

    version: int
    record: dict[str, Any]
    record_hash: str

    @property
    def content_hash(self) -> str:
        return str(self.record["content_hash"])


@dataclass
class VerifyReport:
    model: str
    versions: int = 0
    head: int | None = None
    pinned: int | None = None
    collected: list[int] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> int | None:
        bad = [p["version"] for p in self.problems if p.get("version") is not None]
        return min(bad) if bad else None

    def problem(self, version: int | None, key: str, reason: str) -> None:
        self.problems.append({"version": version, "object": key, "reason": reason})

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ok": self.ok,
            "versions": self.versions,
            "head": self.head,
            "pinned": self.pinned,
            "first_bad_version": self.first_bad,
            "collected": self.collected,
            "problems": self.problems,
            "notes": self.notes,
        }


@dataclass
class GCReport:
    model: str
    dry_run: bool
    retained: list[int]
    collected_versions: list[int]
    deleted_objects: list[str]
    bytes_freed: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class VersionStore:
    """The versions of one model on an object store."""

    def __init__(self, objects: ObjectStore, name: str) -> None:
        if not NAME_RE.match(name):
            raise VersionError(f"invalid model name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
        self.objects = objects
        self.name = name
        self.base = f"models/{name}"
        self.records = Chain(objects, f"{self.base}/records", f"{self.base}/refs/head", "version")
        self.pins = Chain(objects, f"{self.base}/pinlog", f"{self.base}/refs/pin", "seq")

    def content_key(self, h: str) -> str:
        return f"{self.base}/content/{_hex(h)}"

    def gc_key(self, version: int) -> str:
        return f"{self.base}/gc/{version:012d}.json"

    def cert_key(self, version: int) -> str:
        return f"{self.base}/certs/{version:012d}.json"

    # -- commit --------------------------------------------------------------------------
    async def commit(
        self,
        ckpt: Checkpoint,
        message: str = "",
        *,
        rebase: bool = False,
        metrics: dict[str, Any] | None = None,
        only_version: int | None = None,
        unqualified: bool = False,
        gate: list[str] | None = None,
    ) -> StoredVersion:
        """Store the checkpoint's content, then claim the next version for it, then link
        its certificate (``ckpt.certificate``) when it has one. Encoding and hashing run
        in a thread: a server's event loop never serialises tensors.
        ``only_version``: commit as exactly that version or raise CommitConflict.
        ``unqualified``: the version is committed past a failing quality gate (recorded
        in the record, so no one mistakes it for a qualified one); ``gate``: the gate's
        failures at commit (recorded in the record's metrics as ``gate_failures``)."""
        files = await asyncio.to_thread(ckpt.encode)
        return await self.commit_files(
            files,
            message,
            rebase=rebase,
            metrics=metrics,
            only_version=only_version,
            certificate=ckpt.certificate,
            unqualified=unqualified,
            gate=gate,
        )

    async def commit_files(
        self,
        files: dict[str, bytes],
        message: str = "",
        *,
        rebase: bool = False,
        metrics: dict[str, Any] | None = None,
        only_version: int | None = None,
        certificate: Mapping[str, Any] | None = None,
        unqualified: bool = False,
        gate: list[str] | None = None,
    ) -> StoredVersion:
        """:meth:`commit` for an already encoded checkpoint (``Checkpoint.encode()``),
        with its ``certificate`` if any (checked to certify this content before anything
        is written, linked after the record is claimed)."""
        missing = [name for name in CONTENT_ROLES.values() if name not in files]
        if missing:
            raise VersionError(f"checkpoint files missing: {', '.join(missing)}")
        manifest = _parse(files[MANIFEST], MANIFEST)
        hashes = await asyncio.to_thread(lambda: {role: sha256_hex(files[n]) for role, n in CONTENT_ROLES.items()})
        if manifest.get("files", {}) != {MODEL_FILE: hashes["model"], TRAINING_FILE: hashes["training"]}:
            raise VersionError("the manifest does not list the hashes of the weight files given with it")
        cert_data = None if certificate is None else _certificate_bytes(certificate, hashes["manifest"], "commit")

        async def upload(role: str) -> None:
            with contextlib.suppress(PreconditionFailed):  # content-addressed: same bytes already there
                await self.objects.put_if_absent(self.content_key(hashes[role]), files[CONTENT_ROLES[role]])

        await asyncio.gather(*(upload(r) for r in CONTENT_ROLES))
        state = manifest.get("state", {})
        validation = manifest.get("metrics", {}).get("validation") or {}
        summary = {
            "step": state.get("step"),
            **{k: validation[k] for k in ("p50_bp", "p95_bp", "max_bp") if k in validation},
        }

        extra: dict[str, Any] = {} if gate is None else {"gate_failures": list(gate)}

        def make(version: int, parent: str | None) -> dict[str, Any]:
            body: dict[str, Any] = {
                "format": RECORD_FORMAT,
                "model": self.name,
                "content_hash": hashes["manifest"],
                "content": hashes,
                "time": _now(),
                "message": message,
                "metrics": {**summary, **(metrics or {}), **extra},
                "library": LIBRARY,
            }
            if unqualified:  # only when set: a qualified version's record is as it always was
                body["unqualified"] = True
            return body

        entry = await self.records.append(make, retry=rebase, only_index=only_version)
        stored = StoredVersion(entry.index, entry.body, entry.hash)
        if cert_data is not None:
            # A crash here leaves the version uncertified (never served as learned);
            # ``spectralmc store certify N`` certifies it in place.
            await self._link_certificate(stored, cert_data)
        return stored

    # -- reading -------------------------------------------------------------------------
    async def head(self) -> StoredVersion | None:
        index, _ = await self.records.tip()
        return None if index == 0 else await self.version(index)

    async def version(self, version: int) -> StoredVersion:
        entry = await self.records.read(version)
        if entry is None:
            raise VersionNotFound(f"model {self.name!r} has no version {version}")
        return StoredVersion(entry.index, entry.body, entry.hash)

    async def versions(self) -> list[StoredVersion]:
        return [StoredVersion(e.index, e.body, e.hash) for e in await self.records.all()]

    async def load(self, version: int, *, need_training: bool = False) -> Checkpoint:
        """The checkpoint of ``version``, with its certificate when it has one; every
        blob's hash is checked before it is deserialised (and the manifest and the
        certificate's link against the record)."""
        stored = await self.version(version)
        content = stored.record.get("content", {})
        roles = ["manifest", "model"] + (["training"] if need_training else [])
        blobs = await asyncio.gather(*(self.objects.get(self.content_key(content[r])) for r in roles))
        files: dict[str, bytes] = {}
        for role, blob in zip(roles, blobs, strict=True):
            if blob is None:
                if await self.objects.get(self.gc_key(version)) is not None:
                    raise ContentCollected(f"model {self.name!r} version {version}: content was garbage-collected")
                raise CorruptObject(f"model {self.name!r} version {version}: {role} content is missing")
            files[CONTENT_ROLES[role]] = blob.data

        def check_and_decode() -> Checkpoint:  # in a thread: hashing and tensors stay off the event loop
            for role in roles:
                if sha256_hex(files[CONTENT_ROLES[role]]) != content[role]:
                    raise CorruptObject(f"model {self.name!r} version {version}: {role} content fails its hash")
            try:
                return decode(files, need_training=need_training)
            except CheckpointError as exc:
                raise CorruptObject(f"model {self.name!r} version {version}: {exc}") from None

        ckpt = await asyncio.to_thread(check_and_decode)
        if ckpt.content_hash != stored.content_hash:
            raise CorruptObject(f"model {self.name!r} version {version}: manifest does not match the record")
        found = await self.certificate_with_hash(version, stored)
        return ckpt if found is None else replace(ckpt, certificate=found[1])

    # -- certificates --------------------------------------------------------------------
    async def certificate(self, version: int) -> dict[str, Any] | None:
        """The certificate of ``version`` (link and blob checked), or None if it has none."""
        found = await self.certificate_with_hash(version)
        return None if found is None else found[1]

    async def certificate_with_hash(
        self, version: int, stored: StoredVersion | None = None
    ) -> tuple[str, dict[str, Any]] | None:
        """(hash, certificate) of ``version``, or None if it has no link. A damaged link
        or blob raises CorruptObject; a blob gone with the version's content,
        ContentCollected."""
        stored = stored or await self.version(version)
        key = self.cert_key(version)
        link = await self.objects.get(key)
        if link is None:
            return None
        h = self._check_link(link.data, stored)
        blob = await self.objects.get(self.content_key(h))
        what = f"model {self.name!r} version {version}"
        if blob is None:
            if await self.objects.get(self.gc_key(version)) is not None:
                raise ContentCollected(f"{what}: content was garbage-collected")
            raise CorruptObject(f"{what}: certificate {h} named by {key} is missing")
        cert = await asyncio.to_thread(_decode_certificate, blob.data, h, stored.content_hash, what)
        return h, cert

    async def certified(self) -> set[int]:
        """Versions with a certificate link (a listing: links are not read or checked)."""
        return await self._versions_under("certs")

    async def _versions_under(self, folder: str) -> set[int]:
        """The versions named by ``<base>/<folder>/<version:012d>.json`` keys (a listing)."""
        out = set()
        for key, _ in await list_all(self.objects, f"{self.base}/{folder}/"):
            m = re.fullmatch(re.escape(f"{self.base}/{folder}/") + r"(\d{12})\.json", key)
            if m:
                out.add(int(m.group(1)))
        return out

    async def attach_certificate(self, version: int, cert: Mapping[str, Any]) -> str:
        """Certify ``version`` in place and return the certificate's hash: the blob is
        stored, then the link created once. Attaching the same certificate again is a
        no-op (and restores a lost blob); a different one raises CertificateExists."""
        stored = await self.version(version)
        data = _certificate_bytes(cert, stored.content_hash, f"model {self.name!r} version {version}")
        if await self.objects.get(self.gc_key(version)) is not None:
            raise ContentCollected(f"model {self.name!r} version {version}: content was garbage-collected")
        return await self._link_certificate(stored, data)

    def _link_problem(self, body: dict[str, Any], stored: StoredVersion) -> str | None:
        """Why a parsed link does not belong to ``stored`` (None: it does)."""
        if set(body) != LINK_FIELDS or body.get("format") != LINK_FORMAT:
            return f"not a certificate link (expected the fields of {LINK_FORMAT!r})"
        if body.get("model") != self.name or body.get("version") != stored.version:
            return "link names another model or version than its key"
        if body.get("record") != stored.record_hash:
            return "link names another record hash than the version's record"
        if body.get("model_hash") != stored.content_hash:
            return "link names another model hash than the version's record"
        h = body.get("certificate")
        if not isinstance(h, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", h):
            return "link does not name a certificate blob"
        return None

    def _check_link(self, data: bytes, stored: StoredVersion) -> str:
        """The certificate hash a link names, once it is checked against the record."""
        key = self.cert_key(stored.version)
        body = _parse(data, key)
        problem = self._link_problem(body, stored)
        if problem is not None:
            raise CorruptObject(f"{key}: {problem}")
        return str(body["certificate"])

    async def _link_certificate(self, stored: StoredVersion, data: bytes) -> str:
        h = sha256_hex(data)
        key = self.cert_key(stored.version)
        existing = await self.objects.get(key)
        if existing is None:
            with contextlib.suppress(PreconditionFailed):  # content-addressed: same bytes already there
                await self.objects.put_if_absent(self.content_key(h), data)
            link = {
                "format": LINK_FORMAT,
                "model": self.name,
                "version": stored.version,
                "record": stored.record_hash,
                "model_hash": stored.content_hash,
                "certificate": h,
            }
            try:
                await self.objects.put_if_absent(key, canonical_json(link))
                return h
            except PreconditionFailed:  # another writer linked one first: compare with it
                existing = await self.objects.get(key)
                if existing is None:
                    raise VersionError(f"{key} changed while it was being created; attach again") from None
        have = self._check_link(existing.data, stored)
        if have != h:
            raise CertificateExists(self.name, stored.version, have, h)
        with contextlib.suppress(PreconditionFailed):  # the same certificate: restore its blob if lost
            await self.objects.put_if_absent(self.content_key(h), data)
        return h

    # -- pins ----------------------------------------------------------------------------
    async def pin_entry(self) -> Entry | None:
        """The pin log's last entry (None: never pinned). Its body says which version
        servers are told to serve (``version``, None after an unpin) and whether the pin
        was forced past the version's quality gate (``force``, with the ``gate`` failures)."""
        index, _ = await self.pins.tip()
        if index == 0:
            return None
        entry = await self.pins.read(index)
        if entry is None:
            raise CorruptObject(f"{self.pins.key(index)} is missing")
        return entry

    async def pinned(self) -> int | None:
        """The version servers are told to serve, or None when they track the head."""
        entry = await self.pin_entry()
        v = None if entry is None else entry.body.get("version")
        return int(v) if isinstance(v, int) else None

    async def pin(self, version: int, by: str = "", *, force: bool = False, gate: list[str] | None = None) -> Entry:
        """Serve ``version`` (rollback): a new pin-log entry, then the pin ref moves.

        ``force``: the version fails its quality gate (``gate``: why) and is pinned
        anyway. The entry records it, so servers serve it (they serve no failing version
        otherwise) and anyone reading the log sees that it was an exception. Deciding
        whether a version passes is the caller's (the gate's limits are server settings)."""
        stored = await self.version(version)
        if await self.objects.get(self.gc_key(version)) is not None:
            raise ContentCollected(f"model {self.name!r} version {version}: content was garbage-collected")
        what: dict[str, Any] = {"action": "pin", "version": version, "record_hash": stored.record_hash}
        if force:  # only when set: an ordinary pin's entry is as it always was
            what["force"] = True
            what["gate"] = list(gate or [])
        return await self._log_pin(what, by)

    async def unpin(self, by: str = "") -> Entry:
        """Track the head again."""
        return await self._log_pin({"action": "unpin", "version": None, "record_hash": None}, by)

    async def _log_pin(self, what: dict[str, Any], by: str) -> Entry:
        return await self.pins.append(
            lambda seq, parent: {"format": PIN_FORMAT, "model": self.name, "time": _now(), "by": by, **what},
            retry=True,
        )

    async def pin_log(self) -> list[Entry]:
        return await self.pins.all()

    # -- verification --------------------------------------------------------------------
    async def verify(self) -> VerifyReport:
        """Walk every record, content blob, certificate link and blob, ref, pin-log
        entry and GC marker."""
        report = VerifyReport(self.name)
        try:
            entries = await self.records.all()
        except CorruptObject as exc:
            report.problem(None, self.records.prefix, str(exc))
            return report
        report.versions = len(entries)
        by_version = {e.index: e for e in entries}
        collected = await self.collected()
        report.collected = sorted(collected)
        try:
            head_ref = await self.records.read_ref()
        except CorruptObject:
            head_ref = (0, None)  # reported by _verify_head

        def vouched(v: int) -> bool:
            """Does a later object still name record v's current hash?"""
            nxt = by_version.get(v + 1)
            e = by_version[v]
            return (nxt is not None and nxt.body.get("parent") == e.hash) or head_ref == (v, e.hash)

        last = max(by_version) if by_version else 0
        for v in range(1, last + 1):
            e = by_version.get(v)
            key = self.records.key(v)
            if e is None:
                report.problem(v, key, "record missing: the chain has a gap")
                continue
            body = e.body
            if body.get("format") != RECORD_FORMAT or body.get("model") != self.name or body.get("version") != v:
                report.problem(v, key, "record fields do not match its name (format, model or version)")
            prev = by_version.get(v - 1)
            if body.get("parent") != (prev.hash if prev else None) and (v == 1 or prev is not None):
                if prev is not None and vouched(v):
                    # Record v is intact (something later names it): v - 1 changed.
                    report.problem(
                        v - 1,
                        self.records.key(v - 1),
                        f"record bytes changed: its hash no longer matches the parent named by version {v}",
                    )
                else:
                    report.problem(v, key, "parent hash does not match the previous record (history edited)")
        await self._verify_content(entries, collected, report)
        await self._verify_certificates(by_version, collected, report)
        await self._verify_head(by_version, report)
        await self._verify_pins(by_version, collected, report)
        for v in collected:
            if v not in by_version:
                report.problem(v, self.gc_key(v), "GC marker for a version that has no record")
        return report

    async def manifest(self, version: int) -> dict[str, Any] | None:
        """The parsed manifest of ``version`` (hash-checked), or None once collected."""
        stored = await self.version(version)
        h = str(stored.record.get("content", {}).get("manifest", ""))
        blob = await self.objects.get(self.content_key(h))
        if blob is None:
            return None
        if sha256_hex(blob.data) != h:
            raise CorruptObject(f"model {self.name!r} version {version}: manifest fails its hash")
        return _parse(blob.data, "manifest")

    async def collected(self) -> set[int]:
        """Versions whose content garbage collection has removed."""
        return await self._versions_under("gc")

    async def _verify_content(self, entries: list[Entry], collected: set[int], report: VerifyReport) -> None:
        wanted: dict[str, list[tuple[int, str]]] = {}
        for e in entries:
            if e.index in collected:
                continue
            content = e.body.get("content")
            if not isinstance(content, dict) or set(content) != set(CONTENT_ROLES):
                report.problem(e.index, self.records.key(e.index), "record lists no content hashes")
                continue
            if e.body.get("content_hash") != content.get("manifest"):
                report.problem(e.index, self.records.key(e.index), "content_hash is not the manifest's hash")
            for role, h in content.items():
                wanted.setdefault(str(h), []).append((e.index, role))
        hashes = sorted(wanted)
        blobs = await _gather_limited([partial(self.objects.get, self.content_key(h)) for h in hashes])
        manifests: dict[int, bytes] = {}
        for h, blob in zip(hashes, blobs, strict=True):
            users = wanted[h]
            if blob is None:
                for v, role in users:
                    report.problem(v, self.content_key(h), f"{role} content missing (and not collected by GC)")
                continue
            if sha256_hex(blob.data) != h:
                for v, role in users:
                    report.problem(v, self.content_key(h), f"{role} content fails its SHA-256 (bytes changed)")
                continue
            for v, role in users:
                if role == "manifest":
                    manifests[v] = blob.data
        for e in entries:
            data = manifests.get(e.index)
            if data is None:
                continue
            try:
                files = _parse(data, "manifest").get("files", {})
            except CorruptObject as exc:
                report.problem(e.index, self.content_key(e.body["content"]["manifest"]), str(exc))
                continue
            content = e.body["content"]
            if files.get(MODEL_FILE) != content["model"] or files.get(TRAINING_FILE) != content["training"]:
                report.problem(e.index, self.records.key(e.index), "record and manifest disagree on the weight files")

    async def _verify_certificates(
        self, by_version: dict[int, Entry], collected: set[int], report: VerifyReport
    ) -> None:
        """Each link names its version's record and model hash and an intact blob that
        parses as a certificate of that model. GC deletes the links and blobs of the
        versions it collects; a link of a collected version (a GC interrupted after its
        markers) is a note, and the next GC removes it."""
        keys = [k for k, _ in await list_all(self.objects, f"{self.base}/certs/")]
        links = await _gather_limited([partial(self.objects.get, k) for k in keys])
        named: list[tuple[int, str, str, str]] = []  # version, link key, certificate hash, model hash
        for key, link in zip(keys, links, strict=True):
            if link is None:
                continue  # deleted between listing and reading (a GC)
            m = re.fullmatch(re.escape(self.base) + r"/certs/(\d{12})\.json", key)
            if m is None:
                report.problem(None, key, "unexpected object among the certificate links")
                continue
            v = int(m.group(1))
            if v in collected:
                report.notes.append(
                    f"version {v} was collected but its certificate link remains; the next gc removes it"
                )
                continue
            e = by_version.get(v)
            if e is None:
                report.problem(v, key, "certificate link for a version that has no record")
                continue
            stored = StoredVersion(v, e.body, e.hash)
            try:
                h = self._check_link(link.data, stored)
            except CorruptObject as exc:
                report.problem(v, key, str(exc).removeprefix(f"{key}: "))
                continue
            named.append((v, key, h, stored.content_hash))
        hashes = sorted({h for _, _, h, _ in named})
        blobs = dict(
            zip(
                hashes,
                await _gather_limited([partial(self.objects.get, self.content_key(h)) for h in hashes]),
                strict=True,
            )
        )
        for v, key, h, model_hash in named:
            blob = blobs[h]
            if blob is None:
                report.problem(v, key, f"names certificate {h}, which is missing")
                continue
            try:
                await asyncio.to_thread(_decode_certificate, blob.data, h, model_hash, f"version {v}")
            except CorruptObject as exc:
                report.problem(v, self.content_key(h), str(exc).removeprefix(f"version {v}: "))

    async def _verify_head(self, by_version: dict[int, Entry], report: VerifyReport) -> None:
        try:
            index, h = await self.records.read_ref()
        except CorruptObject as exc:
            report.problem(None, self.records.ref, str(exc))
            return
        last = max(by_version) if by_version else 0
        if index == 0:
            if last:
                report.notes.append(f"no head pointer yet; the chain's tip is version {last}")
            report.head = last or None
            return
        e = by_version.get(index)
        if e is None:
            report.problem(index, self.records.ref, f"head names version {index}, which has no record")
            return
        if e.hash != h:
            report.problem(index, self.records.ref, f"head's hash does not match version {index}'s record")
        if index < last:
            report.notes.append(
                f"head pointer at {index} lags the last record {last} (a committer stopped before moving it); "
                "readers roll forward and the next commit moves it"
            )
        report.head = last

    async def _verify_pins(self, by_version: dict[int, Entry], collected: set[int], report: VerifyReport) -> None:
        try:
            log = await self.pins.all()
            index, h = await self.pins.read_ref()
        except CorruptObject as exc:
            report.problem(None, self.pins.prefix, str(exc))
            return
        prev: str | None = None
        for i, e in enumerate(log, start=1):
            key = self.pins.key(e.index)
            if e.index != i or e.body.get("seq") != i:
                report.problem(None, key, f"pin log entry out of sequence (expected {i})")
            if e.body.get("parent") != prev:
                report.problem(e.body.get("version"), key, "pin log entry's parent hash does not match (log edited)")
            v = e.body.get("version")
            if v is not None:
                rec = by_version.get(v) if isinstance(v, int) else None
                if rec is None or rec.hash != e.body.get("record_hash"):
                    report.problem(v if isinstance(v, int) else None, key, "pin names a record that does not match")
            force, gate = e.body.get("force"), e.body.get("gate")
            if "force" in e.body and (force is not True or v is None or not isinstance(gate, list)):
                # a forced pin names its version and why it failed; nothing else carries the flag
                report.problem(v if isinstance(v, int) else None, key, "pin log entry's force flag is malformed")
            prev = e.hash
        if index:
            entry = next((e for e in log if e.index == index), None)
            if entry is None or entry.hash != h:
                report.problem(None, self.pins.ref, "pin ref does not match its log entry")
                return
        if log:
            v = log[-1].body.get("version")
            report.pinned = v if isinstance(v, int) else None
            if report.pinned is not None and report.pinned in collected:
                report.problem(report.pinned, self.gc_key(report.pinned), "the pinned version's content was collected")

    async def _read_links(self, by_version: dict[int, Entry]) -> list[tuple[str, int, str | None]]:
        """(key, version, certificate hash or None when the link is damaged) of every
        certificate link of a version with a record."""
        keys = [k for k, _ in await list_all(self.objects, f"{self.base}/certs/")]
        out: list[tuple[str, int, str | None]] = []
        for key, blob in zip(keys, await _gather_limited([partial(self.objects.get, k) for k in keys]), strict=True):
            m = re.fullmatch(re.escape(self.base) + r"/certs/(\d{12})\.json", key)
            if blob is None or m is None or int(m.group(1)) not in by_version:
                continue
            v = int(m.group(1))
            e = by_version[v]
            try:
                h: str | None = self._check_link(blob.data, StoredVersion(v, e.body, e.hash))
            except CorruptObject:
                h = None
            out.append((key, v, h))
        return out

    # -- garbage collection --------------------------------------------------------------
    async def gc(
        self,
        keep: int,
        *,
        protect: Iterable[int] = (),
        min_keep: int = 1,
        dry_run: bool = True,
        grace_seconds: float = 3600.0,
    ) -> GCReport:
        """Delete the content of versions outside the retention policy; records stay.

        Retained: the last max(keep, min_keep) versions, ``protect``, the head and the
        pinned version. Content blobs no record references (left by committers that
        died) are deleted once older than ``grace_seconds``. Markers are written before
        anything is deleted, so an interrupted GC is finished by the next one, and a
        second GC finds nothing to do.
        """
        if keep < 0 or min_keep < 1:
            raise VersionError(f"keep must be >= 0 and min_keep >= 1, got {keep} and {min_keep}")
        entries = await self.records.all()
        versions = sorted(e.index for e in entries)
        head = await self.head()
        pinned = await self.pinned()
        n_keep = max(keep, min_keep)
        retained = set(versions[-n_keep:]) | {v for v in protect if v in versions}
        retained |= {v for v in (head.version if head else None, pinned) if v is not None}
        doomed = [v for v in versions if v not in retained]
        keep_blobs: set[str] = set()
        for e in entries:
            if e.index in retained:
                keep_blobs.update(_hex(str(h)) for h in e.body.get("content", {}).values())
        referenced = {_hex(str(h)) for e in entries for h in e.body.get("content", {}).values()}
        # Certificates go with their version's content: the links of versions not
        # retained are deleted (before their blobs, so a GC stopped in between leaves
        # only unlinked blobs, collected after the grace period like any leftover).
        by_version = {e.index: e for e in entries}
        delete: list[str] = []
        for key, v, h in await self._read_links(by_version):
            if v in retained:
                if h is None:
                    raise CorruptObject(f"{key} is damaged: gc cannot tell which certificate to keep (run verify)")
                keep_blobs.add(_hex(h))
            elif v in by_version:
                delete.append(key)
                if h is not None:
                    referenced.add(_hex(h))
        now = time.time()
        for key, modified in await list_all(self.objects, f"{self.base}/content/"):
            h = key.rsplit("/", 1)[1]
            if h in keep_blobs:
                continue
            if h in referenced or now - modified >= grace_seconds:
                delete.append(key)
        already = await self.collected()
        sizes = 0
        if not dry_run:
            for v in doomed:
                if v not in already:
                    marker = canonical_json({"format": GC_FORMAT, "version": v, "time": _now(), "keep": n_keep})
                    with contextlib.suppress(PreconditionFailed):
                        await self.objects.put_if_absent(self.gc_key(v), marker)
            for key in delete:
                blob = await self.objects.get(key)
                sizes += len(blob.data) if blob else 0
                await self.objects.delete(key)
            if isinstance(self.objects, LocalObjectStore):
                self.objects.collect_temporaries(grace_seconds)
        return GCReport(
            model=self.name,
            dry_run=dry_run,
            retained=sorted(retained),
            collected_versions=[v for v in doomed if v not in already],
            deleted_objects=delete,
            bytes_freed=sizes,
        )
