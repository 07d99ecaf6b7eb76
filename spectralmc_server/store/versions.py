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
    models/NAME/leases/gc.json             who may run GC now (store/lease.py)

A record names its parent's record hash, so editing any byte of history breaks the
chain. Claiming record n with put-if-absent means two writers can never both own
version n; the loser gets :class:`CommitConflictError` naming the winner, or rebases onto
it. The head pointer is a cache of the chain's tip: a committer that dies after
claiming version n but before moving the head leaves the pointer one behind, and
every reader rolls it forward (and moves it, helping) by probing the next record.

A certificate is linked to its version, not written into the record: records are
immutable and hash-chained, and a version committed before certificates existed (or
whose certification failed or was interrupted) must be certifiable later in place,
without renumbering anything. The link names the record's hash and the model's content
hash, so it cannot be moved to another version unnoticed, and is created once.

The code is in layers: ``store/cas.py`` (content-addressed puts, CAS refs, the hash),
``store/chain.py`` (hash-chained logs and their tip refs; the errors),
``store/records.py`` (formats, records, certificate links), this module (commit, load,
certificates, pins) and ``store/audit.py`` (verify and gc, which :class:`VersionStore`
delegates to).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from spectralmc_server.engine.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    TRAINING_FILE,
    Checkpoint,
    CheckpointError,
    canonical_json,
    decode,
    manifest_hash,
)
from spectralmc_server.store.audit import Audit, GCReport, VerifyReport
from spectralmc_server.store.cas import content_key, create_once, put_content, sha256_hex
from spectralmc_server.store.chain import (
    CONCURRENCY,
    CertificateExistsError,
    Chain,
    CommitConflictError,
    ContentCollectedError,
    Entry,
    VersionError,
    VersionNotFoundError,
    now,
    parse,
)
from spectralmc_server.store.lease import Lease, holder_name
from spectralmc_server.store.objects import CorruptObjectError, ObjectStore, PreconditionFailedError, list_all
from spectralmc_server.store.records import (
    CONTENT_ROLES,
    GC_FORMAT,
    LIBRARY,
    LINK_FIELDS,
    LINK_FORMAT,
    NAME_RE,
    PIN_FORMAT,
    RECORD_FORMAT,
    StoredVersion,
    certificate_bytes,
    check_link,
    decode_certificate,
    make_link,
)

GC_LEASE_SECONDS = 120.0  # a GC lease's default lifetime: renewed every third of it while GC runs

__all__ = [  # the names importers use, wherever they are defined now
    "CONCURRENCY",
    "CONTENT_ROLES",
    "GC_FORMAT",
    "GC_LEASE_SECONDS",
    "LIBRARY",
    "LINK_FIELDS",
    "LINK_FORMAT",
    "NAME_RE",
    "PIN_FORMAT",
    "RECORD_FORMAT",
    "CertificateExistsError",
    "Chain",
    "CommitConflictError",
    "ContentCollectedError",
    "Entry",
    "GCReport",
    "StoredVersion",
    "VerifyReport",
    "VersionError",
    "VersionNotFoundError",
    "VersionStore",
]


class VersionStore:
    """The versions of one model on an object store."""

    def __init__(self, objects: ObjectStore, name: str) -> None:
        if not NAME_RE.match(name):
            raise VersionError(f"invalid model name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
        self.objects = objects
        self.name = name
        self.base = f"models/{name}"
        self.contents = f"{self.base}/content"  # content-addressed blobs (store/cas.py)
        self.records = Chain(objects, f"{self.base}/records", f"{self.base}/refs/head", "version")
        self.pins = Chain(objects, f"{self.base}/pinlog", f"{self.base}/refs/pin", "seq")

    def content_key(self, h: str) -> str:
        return content_key(self.contents, h)

    def gc_key(self, version: int) -> str:
        return f"{self.base}/gc/{version:012d}.json"

    def cert_key(self, version: int) -> str:
        return f"{self.base}/certs/{version:012d}.json"

    def gc_lease(self, holder: str | None = None, ttl_seconds: float = GC_LEASE_SECONDS) -> Lease:
        """The lease a real (not dry-run) GC of this model holds, so that two never run
        at once: the GC schedule, the admin route and ``spectralmc store gc --yes`` all
        take it (store/lease.py). ``holder``: who asks (default: this process)."""
        return Lease(
            self.objects,
            f"{self.base}/leases/gc.json",
            holder or holder_name("gc"),
            ttl_seconds,
            what=f"store GC of model {self.name!r}",
        )

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
        ``only_version``: commit as exactly that version or raise CommitConflictError.
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
        manifest = parse(files[MANIFEST], MANIFEST)
        hashes = await asyncio.to_thread(lambda: {role: sha256_hex(files[n]) for role, n in CONTENT_ROLES.items()})
        if manifest.get("files", {}) != {MODEL_FILE: hashes["model"], TRAINING_FILE: hashes["training"]}:
            raise VersionError("the manifest does not list the hashes of the weight files given with it")
        # The model's content hash: the manifest blob's own hash unless the manifest has run
        # facts, which the content hash leaves out (engine/checkpoint.py, manifest_hash).
        model_hash = manifest_hash(manifest, files[MANIFEST])
        cert_data = None if certificate is None else certificate_bytes(certificate, model_hash, "commit")

        await asyncio.gather(
            *(put_content(self.objects, self.contents, files[n], hashes[role]) for role, n in CONTENT_ROLES.items())
        )
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
                "content_hash": model_hash,
                "content": hashes,
                "time": now(),
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
            raise VersionNotFoundError(f"model {self.name!r} has no version {version}")
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
                    raise ContentCollectedError(f"model {self.name!r} version {version}: content was garbage-collected")
                raise CorruptObjectError(f"model {self.name!r} version {version}: {role} content is missing")
            files[CONTENT_ROLES[role]] = blob.data

        def check_and_decode() -> Checkpoint:  # in a thread: hashing and tensors stay off the event loop
            for role in roles:
                if sha256_hex(files[CONTENT_ROLES[role]]) != content[role]:
                    raise CorruptObjectError(f"model {self.name!r} version {version}: {role} content fails its hash")
            try:
                return decode(files, need_training=need_training)
            except CheckpointError as exc:
                raise CorruptObjectError(f"model {self.name!r} version {version}: {exc}") from None

        ckpt = await asyncio.to_thread(check_and_decode)
        if ckpt.content_hash != stored.content_hash:
            raise CorruptObjectError(f"model {self.name!r} version {version}: manifest does not match the record")
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
        or blob raises CorruptObjectError; a blob gone with the version's content,
        ContentCollectedError."""
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
                raise ContentCollectedError(f"{what}: content was garbage-collected")
            raise CorruptObjectError(f"{what}: certificate {h} named by {key} is missing")
        cert = await asyncio.to_thread(decode_certificate, blob.data, h, stored.content_hash, what)
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
        no-op (and restores a lost blob); a different one raises CertificateExistsError."""
        stored = await self.version(version)
        data = certificate_bytes(cert, stored.content_hash, f"model {self.name!r} version {version}")
        if await self.objects.get(self.gc_key(version)) is not None:
            raise ContentCollectedError(f"model {self.name!r} version {version}: content was garbage-collected")
        return await self._link_certificate(stored, data)

    def _check_link(self, data: bytes, stored: StoredVersion) -> str:
        """The certificate hash a link names, once it is checked against the record."""
        return check_link(data, self.cert_key(stored.version), self.name, stored)

    async def _link_certificate(self, stored: StoredVersion, data: bytes) -> str:
        h = sha256_hex(data)
        key = self.cert_key(stored.version)
        existing = await self.objects.get(key)
        if existing is None:
            await put_content(self.objects, self.contents, data, h)
            try:
                existing = await create_once(self.objects, key, canonical_json(make_link(self.name, stored, h)))
            except PreconditionFailedError:
                raise VersionError(f"{key} changed while it was being created; attach again") from None
            if existing is None:
                return h
            # another writer linked one first: compare with it
        have = self._check_link(existing.data, stored)
        if have != h:
            raise CertificateExistsError(self.name, stored.version, have, h)
        await put_content(self.objects, self.contents, data, h)  # the same certificate: restore a lost blob
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
            raise CorruptObjectError(f"{self.pins.key(index)} is missing")
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
            raise ContentCollectedError(f"model {self.name!r} version {version}: content was garbage-collected")
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
            lambda seq, parent: {"format": PIN_FORMAT, "model": self.name, "time": now(), "by": by, **what},
            retry=True,
        )

    async def pin_log(self) -> list[Entry]:
        return await self.pins.all()

    async def pin_history(self) -> list[dict[str, Any]]:
        """The pin log as data, oldest first (``seq`` 1, 2, ...): per entry its ``seq``,
        ``time`` (UTC, RFC 3339), ``by`` (who, as given; "" when nobody said), ``action``
        ("pin" or "unpin"), ``version`` (None for an unpin), ``record_hash`` (the pinned
        record's hash), ``forced`` (pinned past the version's quality gate) with the
        ``gate`` failures recorded then, and ``hash`` (the entry's own hash, which the
        next entry names as its parent). The last entry says what servers serve."""
        return [
            {
                "seq": e.index,
                "time": e.body.get("time"),
                "by": e.body.get("by", ""),
                "action": e.body.get("action"),
                "version": e.body.get("version"),
                "record_hash": e.body.get("record_hash"),
                "forced": e.body.get("force") is True,
                "gate": list(e.body.get("gate") or []),
                "hash": e.hash,
            }
            for e in await self.pins.all()
        ]

    # -- verification --------------------------------------------------------------------
    async def manifest(self, version: int) -> dict[str, Any] | None:
        """The parsed manifest of ``version`` (hash-checked), or None once collected."""
        stored = await self.version(version)
        h = str(stored.record.get("content", {}).get("manifest", ""))
        blob = await self.objects.get(self.content_key(h))
        if blob is None:
            return None
        if sha256_hex(blob.data) != h:
            raise CorruptObjectError(f"model {self.name!r} version {version}: manifest fails its hash")
        return parse(blob.data, "manifest")

    async def collected(self) -> set[int]:
        """Versions whose content garbage collection has removed."""
        return await self._versions_under("gc")

    # -- audit (store/audit.py) ----------------------------------------------------------
    async def verify(self) -> VerifyReport:
        """Walk every record, content blob, certificate link and blob, ref, pin-log
        entry and GC marker (:meth:`Audit.verify`)."""
        return await Audit(self).verify()

    async def gc(
        self,
        keep: int,
        *,
        protect: Iterable[int] = (),
        min_keep: int = 1,
        dry_run: bool = True,
        grace_seconds: float = 3600.0,
    ) -> GCReport:
        """Delete the content of versions outside the retention policy; records stay
        (:meth:`Audit.gc`)."""
        return await Audit(self).gc(
            keep, protect=protect, min_keep=min_keep, dry_run=dry_run, grace_seconds=grace_seconds
        )
