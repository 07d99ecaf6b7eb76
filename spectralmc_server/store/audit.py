"""Audit of a model's versions: verify (walk everything, report damage) and gc.

:class:`Audit` works on a :class:`~spectralmc_server.store.versions.VersionStore`
(its ``verify`` and ``gc`` delegate here): it reads the same objects the store writes
and changes nothing but GC markers, certificate links and content it collects.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from spectralmc_server.engine.checkpoint import MODEL_FILE, TRAINING_FILE, canonical_json, manifest_hash
from spectralmc_server.store.cas import sha256_hex
from spectralmc_server.store.chain import Entry, VersionError, gather_limited, now, parse
from spectralmc_server.store.objects import CorruptObjectError, LocalObjectStore, PreconditionFailedError, list_all
from spectralmc_server.store.records import (
    CONTENT_ROLES,
    GC_FORMAT,
    RECORD_FORMAT,
    StoredVersion,
    check_link,
    decode_certificate,
    hex_of,
)

if TYPE_CHECKING:
    from spectralmc_server.store.versions import VersionStore


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


class Audit:
    """Verify and garbage-collect the versions of ``vs``'s model."""

    def __init__(self, vs: VersionStore) -> None:
        self.vs = vs
        self.objects = vs.objects
        self.name = vs.name
        self.base = vs.base
        self.records = vs.records
        self.pins = vs.pins
        self.content_key = vs.content_key
        self.gc_key = vs.gc_key
        self.cert_key = vs.cert_key

    def check_link(self, data: bytes, stored: StoredVersion) -> str:
        return check_link(data, self.cert_key(stored.version), self.name, stored)

    async def verify(self) -> VerifyReport:
        """Walk every record, content blob, certificate link and blob, ref, pin-log
        entry and GC marker."""
        report = VerifyReport(self.name)
        try:
            entries = await self.records.all()
        except CorruptObjectError as exc:
            report.problem(None, self.records.prefix, str(exc))
            return report
        report.versions = len(entries)
        by_version = {e.index: e for e in entries}
        collected = await self.vs.collected()
        report.collected = sorted(collected)
        try:
            head_ref = await self.records.read_ref()
        except CorruptObjectError:
            head_ref = (0, None)  # reported by verify_head

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
        await self.verify_content(entries, collected, report)
        await self.verify_certificates(by_version, collected, report)
        await self.verify_head(by_version, report)
        await self.verify_pins(by_version, collected, report)
        for v in collected:
            if v not in by_version:
                report.problem(v, self.gc_key(v), "GC marker for a version that has no record")
        return report

    async def verify_content(self, entries: list[Entry], collected: set[int], report: VerifyReport) -> None:
        wanted = self._wanted_content(entries, collected, report)
        hashes = sorted(wanted)
        blobs = await gather_limited([partial(self.objects.get, self.content_key(h)) for h in hashes])
        manifests: dict[int, bytes] = {}
        for h, blob in zip(hashes, blobs, strict=True):
            users = wanted[h]
            problem = None
            if blob is None:
                problem = "content missing (and not collected by GC)"
            elif sha256_hex(blob.data) != h:
                problem = "content fails its SHA-256 (bytes changed)"
            if problem is not None:
                for v, role in users:
                    report.problem(v, self.content_key(h), f"{role} {problem}")
                continue
            assert blob is not None
            manifests.update((v, blob.data) for v, role in users if role == "manifest")
        for e in entries:
            data = manifests.get(e.index)
            if data is not None:
                self._check_manifest(e, data, report)

    def _wanted_content(
        self, entries: list[Entry], collected: set[int], report: VerifyReport
    ) -> dict[str, list[tuple[int, str]]]:
        """content hash -> the (version, role) pairs whose records name it; records that
        name no content are reported (a content_hash other than their manifest's is found
        by _check_manifest, which reads the manifest)."""
        wanted: dict[str, list[tuple[int, str]]] = {}
        for e in entries:
            if e.index in collected:
                continue
            content = e.body.get("content")
            if not isinstance(content, dict) or set(content) != set(CONTENT_ROLES):
                report.problem(e.index, self.records.key(e.index), "record lists no content hashes")
                continue
            for role, h in content.items():
                wanted.setdefault(str(h), []).append((e.index, role))
        return wanted

    def _check_manifest(self, e: Entry, data: bytes, report: VerifyReport) -> None:
        """The manifest parses, is the model the record's content_hash names (its blob's
        hash, or without its run facts when it has them: engine/checkpoint.py,
        manifest_hash) and names the record's weight files."""
        try:
            manifest = parse(data, "manifest")
        except CorruptObjectError as exc:
            report.problem(e.index, self.content_key(e.body["content"]["manifest"]), str(exc))
            return
        if e.body.get("content_hash") != manifest_hash(manifest, data):
            report.problem(e.index, self.records.key(e.index), "content_hash is not the manifest's hash")
        files = manifest.get("files", {})
        content = e.body["content"]
        if files.get(MODEL_FILE) != content["model"] or files.get(TRAINING_FILE) != content["training"]:
            report.problem(e.index, self.records.key(e.index), "record and manifest disagree on the weight files")

    async def verify_certificates(
        self, by_version: dict[int, Entry], collected: set[int], report: VerifyReport
    ) -> None:
        """Each link names its version's record and model hash and an intact blob that
        parses as a certificate of that model. GC deletes the links and blobs of the
        versions it collects; a link of a collected version (a GC interrupted after its
        markers) is a note, and the next GC removes it."""
        keys = [k for k, _ in await list_all(self.objects, f"{self.base}/certs/")]
        links = await gather_limited([partial(self.objects.get, k) for k in keys])
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
                h = self.check_link(link.data, stored)
            except CorruptObjectError as exc:
                report.problem(v, key, str(exc).removeprefix(f"{key}: "))
                continue
            named.append((v, key, h, stored.content_hash))
        hashes = sorted({h for _, _, h, _ in named})
        blobs = dict(
            zip(
                hashes,
                await gather_limited([partial(self.objects.get, self.content_key(h)) for h in hashes]),
                strict=True,
            )
        )
        for v, key, h, model_hash in named:
            blob = blobs[h]
            if blob is None:
                report.problem(v, key, f"names certificate {h}, which is missing")
                continue
            try:
                await asyncio.to_thread(decode_certificate, blob.data, h, model_hash, f"version {v}")
            except CorruptObjectError as exc:
                report.problem(v, self.content_key(h), str(exc).removeprefix(f"version {v}: "))

    async def verify_head(self, by_version: dict[int, Entry], report: VerifyReport) -> None:
        try:
            index, h = await self.records.read_ref()
        except CorruptObjectError as exc:
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

    async def verify_pins(self, by_version: dict[int, Entry], collected: set[int], report: VerifyReport) -> None:
        try:
            log = await self.pins.all()
            index, h = await self.pins.read_ref()
        except CorruptObjectError as exc:
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

    async def read_links(self, by_version: dict[int, Entry]) -> list[tuple[str, int, str | None]]:
        """(key, version, certificate hash or None when the link is damaged) of every
        certificate link of a version with a record."""
        keys = [k for k, _ in await list_all(self.objects, f"{self.base}/certs/")]
        out: list[tuple[str, int, str | None]] = []
        for key, blob in zip(keys, await gather_limited([partial(self.objects.get, k) for k in keys]), strict=True):
            m = re.fullmatch(re.escape(self.base) + r"/certs/(\d{12})\.json", key)
            if blob is None or m is None or int(m.group(1)) not in by_version:
                continue
            v = int(m.group(1))
            e = by_version[v]
            try:
                h: str | None = self.check_link(blob.data, StoredVersion(v, e.body, e.hash))
            except CorruptObjectError:
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
        head = await self.vs.head()
        pinned = await self.vs.pinned()
        n_keep = max(keep, min_keep)
        retained = set(versions[-n_keep:]) | {v for v in protect if v in versions}
        retained |= {v for v in (head.version if head else None, pinned) if v is not None}
        doomed = [v for v in versions if v not in retained]
        delete = await self._doomed_objects(entries, retained, grace_seconds)
        already = await self.vs.collected()
        sizes = 0
        if not dry_run:
            sizes = await self._collect([v for v in doomed if v not in already], delete, n_keep, grace_seconds)
        return GCReport(
            model=self.name,
            dry_run=dry_run,
            retained=sorted(retained),
            collected_versions=[v for v in doomed if v not in already],
            deleted_objects=delete,
            bytes_freed=sizes,
        )

    async def _doomed_objects(self, entries: list[Entry], retained: set[int], grace_seconds: float) -> list[str]:
        """The keys GC deletes: certificate links of versions not retained, then content
        blobs no retained version needs (referenced ones at once, leftovers of dead
        committers once older than ``grace_seconds``)."""
        keep_blobs: set[str] = set()
        for e in entries:
            if e.index in retained:
                keep_blobs.update(hex_of(str(h)) for h in e.body.get("content", {}).values())
        referenced = {hex_of(str(h)) for e in entries for h in e.body.get("content", {}).values()}
        # Certificates go with their version's content: the links of versions not
        # retained are deleted (before their blobs, so a GC stopped in between leaves
        # only unlinked blobs, collected after the grace period like any leftover).
        by_version = {e.index: e for e in entries}
        delete: list[str] = []
        for key, v, h in await self.read_links(by_version):
            if v in retained:
                if h is None:
                    raise CorruptObjectError(f"{key} is damaged: gc cannot tell which certificate to keep (run verify)")
                keep_blobs.add(hex_of(h))
            elif v in by_version:
                delete.append(key)
                if h is not None:
                    referenced.add(hex_of(h))
        wall = time.time()
        for key, modified in await list_all(self.objects, f"{self.base}/content/"):
            h = key.rsplit("/", 1)[1]
            if h not in keep_blobs and (h in referenced or wall - modified >= grace_seconds):
                delete.append(key)
        return delete

    async def _collect(self, doomed: list[int], delete: list[str], n_keep: int, grace_seconds: float) -> int:
        """Write the markers of ``doomed`` versions, then delete ``delete``: the bytes freed."""
        for v in doomed:
            marker = canonical_json({"format": GC_FORMAT, "version": v, "time": now(), "keep": n_keep})
            with contextlib.suppress(PreconditionFailedError):
                await self.objects.put_if_absent(self.gc_key(v), marker)
        sizes = 0
        for key in delete:
            blob = await self.objects.get(key)
            sizes += len(blob.data) if blob else 0
            await self.objects.delete(key)
        if isinstance(self.objects, LocalObjectStore):
            self.objects.collect_temporaries(grace_seconds)
        return sizes
