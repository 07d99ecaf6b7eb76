"""Market-data snapshots on the object-store protocol (the one model versions use).

Layout of namespace ``NS``::

    marketdata/NS/content/<sha256>              canonical JSON of a MarketSnapshot, immutable
    marketdata/NS/snapshots/<VDT>/<ASOF>.json   the key record, created once (put-if-absent)
    marketdata/NS/refs/latest                   the greatest (VDT, ASOF) stored, moved by CAS

VDT and ASOF are UTC times written ``20261126T160000.000000Z``, so the store's
lexicographic listing is the time order and "as of T" is the last ASOF <= T under one
VDT. Putting a key again with the same content is idempotent; with other content it is
refused (:class:`SnapshotConflictError`), so an answer that names a key and hash can always
be reproduced. Derived snapshots carry ``lineage``: the job and the exact inputs.

refs/latest is the one pointer here, and a cache: a writer killed after its record and
before the ref leaves it behind a stored snapshot. A repeated PUT of that key, and
every server opening the store (:meth:`SnapshotStore.repair`), move it forward to the
greatest stored record by the same CAS, never backwards.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.store.cas import CAS_ATTEMPTS, advance_ref, content_key, create_once, put_content, sha256_hex
from spectralmc_server.store.objects import CorruptObjectError, ObjectStore, PreconditionFailedError, list_all

TOKEN_FORMAT = "%Y%m%dT%H%M%S.%fZ"
TOKEN_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
RECORD_NAME_RE = re.compile(rf"{TOKEN_RE.pattern}/{TOKEN_RE.pattern}\.json")  # <VDT>/<ASOF>.json
CAS_RETRIES = CAS_ATTEMPTS  # tries of a refs/latest move (store/cas.py's advance_ref)
AFTER_EVERY_KEY = "~"  # sorts after every character a key may hold (letters, digits, _ . - /)


class SnapshotConflictError(Exception):
    """The key already holds a snapshot with different content."""


def utc(value: datetime) -> datetime:
    """An aware datetime in UTC (naive ones are refused earlier, by the schemas)."""
    if value.tzinfo is None:
        raise ValueError("a time zone is required (e.g. 2026-11-26T16:00:00Z)")
    return value.astimezone(UTC)


def token(value: datetime) -> str:
    v = utc(value)  # formatted by hand: strftime does not zero-pad years below 1000
    return f"{v.year:04d}{v.month:02d}{v.day:02d}T{v.hour:02d}{v.minute:02d}{v.second:02d}.{v.microsecond:06d}Z"


def from_token(text: str) -> datetime:
    return datetime.strptime(text, TOKEN_FORMAT).replace(tzinfo=UTC)


def iso(value: datetime) -> str:
    """The one spelling of a time in answers: ``2026-11-26T16:00:00Z`` (micros if any)."""
    v = utc(value)
    text = f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
    return text + (f".{v.microsecond:06d}" if v.microsecond else "") + "Z"


def canonical(snapshot: MarketSnapshot) -> bytes:
    return orjson.dumps(snapshot.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class SnapshotRecord:
    """One stored key: which content it names, and where that content came from."""

    namespace: str
    val_datetime: datetime
    data_asof: datetime
    hash: str
    lineage: dict[str, Any] | None
    stored_at: str

    def key(self) -> dict[str, Any]:
        """The identity echoed by answers (``market_data``)."""
        return {
            "namespace": self.namespace,
            "val_datetime": iso(self.val_datetime),
            "data_asof": iso(self.data_asof),
            "hash": self.hash,
        }

    def describe(self) -> dict[str, Any]:
        return {**self.key(), "lineage": self.lineage, "stored_at": self.stored_at}

    def sort_key(self) -> tuple[datetime, datetime]:
        return self.val_datetime, self.data_asof

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {**self.key(), "lineage": self.lineage, "stored_at": self.stored_at}, option=orjson.OPT_SORT_KEYS
        )

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> SnapshotRecord:
        try:
            body = orjson.loads(data)
            return cls(
                namespace=body["namespace"],
                val_datetime=utc(datetime.fromisoformat(body["val_datetime"])),
                data_asof=utc(datetime.fromisoformat(body["data_asof"])),
                hash=body["hash"],
                lineage=body.get("lineage"),
                stored_at=body["stored_at"],
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptObjectError(f"{where} is not a snapshot record: {exc}") from None


@dataclass
class RepairReport:
    """What :meth:`SnapshotStore.repair` found: namespaces checked, the refs it moved
    forward (namespace -> the record the ref now names) and what it could not read."""

    checked: int = 0
    moved: dict[str, SnapshotRecord] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


class SnapshotStore:
    """Put, resolve, list and load snapshots; loaded content is cached by hash (it is
    immutable, so the cache never goes stale), bounded by ``cache_entries``."""

    def __init__(self, objects: ObjectStore, cache_entries: int = 64) -> None:
        self.objects = objects
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, MarketSnapshot] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    @staticmethod
    def _base(namespace: str) -> str:
        return f"marketdata/{namespace}"

    def record_key(self, namespace: str, val_datetime: datetime, data_asof: datetime) -> str:
        return f"{self._base(namespace)}/snapshots/{token(val_datetime)}/{token(data_asof)}.json"

    def content_key(self, namespace: str, h: str) -> str:
        return content_key(self._content_prefix(namespace), h)

    def _content_prefix(self, namespace: str) -> str:
        return f"{self._base(namespace)}/content"

    def latest_key(self, namespace: str) -> str:
        return f"{self._base(namespace)}/refs/latest"

    async def put(
        self,
        namespace: str,
        val_datetime: datetime,
        data_asof: datetime,
        snapshot: MarketSnapshot,
        lineage: dict[str, Any] | None = None,
    ) -> tuple[SnapshotRecord, bool]:
        """Store ``snapshot`` under the key; ``(record, created)``. Same content again is
        idempotent (``created`` False); different content raises SnapshotConflictError.
        A record found holding this call's own bytes (its stored_at is this call's) was
        created by this call: its write landed while the answer was lost and the
        store client's retry was refused, so it is ``created`` (and its listeners told)."""
        data = await asyncio.to_thread(canonical, snapshot)
        h = await put_content(self.objects, self._content_prefix(namespace), data)  # content first; idempotent
        record = SnapshotRecord(
            namespace=namespace,
            val_datetime=utc(val_datetime),
            data_asof=utc(data_asof),
            hash=h,
            lineage=lineage,
            stored_at=iso(datetime.now(UTC)),
        )
        key = self.record_key(namespace, val_datetime, data_asof)
        try:
            first = await create_once(self.objects, key, record.to_bytes())
        except PreconditionFailedError:  # created, then deleted before it could be read: not something this store does
            raise SnapshotConflictError(f"{key} changed while it was written; put it again") from None
        if first is not None and first.data != record.to_bytes():  # the same bytes: ours, its answer lost
            existing = SnapshotRecord.from_bytes(first.data, key)
            if existing.hash != h:
                raise SnapshotConflictError(
                    f"{namespace}/{iso(val_datetime)}/{iso(data_asof)} already holds other content "
                    f"({existing.hash}); snapshots are immutable: put it under a later data_asof"
                )
            self._remember(h, snapshot)
            # The first writer may have died between its record and the ref: a retry of
            # the same PUT finishes its work (and any other record the ref is behind).
            await self.repair_latest(namespace)
            return existing, False
        self._remember(h, snapshot)
        await self._advance_latest(namespace, record)
        return record, True

    async def _read_record(self, key: str) -> SnapshotRecord | None:
        blob = await self.objects.get(key)
        return None if blob is None else SnapshotRecord.from_bytes(blob.data, key)

    async def _advance_latest(self, namespace: str, record: SnapshotRecord) -> bool:
        """Move refs/latest to ``record`` if it is later than what it names (CAS with
        bounded, jittered retries: ``store/cas.py``'s advance_ref, which raises its
        RefContentionError, a PreconditionFailedError, after CAS_RETRIES lost races); True when
        this call moved it."""
        ref = self.latest_key(namespace)
        data = record.to_bytes()

        def update(current: bytes | None) -> bytes | None:
            if current is not None and SnapshotRecord.from_bytes(current, ref).sort_key() >= record.sort_key():
                return None
            return data

        return await advance_ref(self.objects, ref, update, attempts=CAS_RETRIES)

    async def repair_latest(self, namespace: str) -> SnapshotRecord | None:
        """Move refs/latest forward to the greatest record stored in the namespace when
        it is behind one (a writer stopped between creating its record and moving the
        ref); the record it moved to, or None when the ref was already right.

        Only keys after the one the ref names are listed (record keys sort in time
        order), so this costs a read and a short listing whatever the history. The move
        is the CAS of :meth:`_advance_latest`: never backwards, and replicas repairing
        (or putting) at once converge on the greatest record without conflict."""
        ref = self.latest_key(namespace)
        blob = await self.objects.get(ref)
        after = None
        if blob is not None:
            current = SnapshotRecord.from_bytes(blob.data, ref)
            after = self.record_key(namespace, current.val_datetime, current.data_asof)
        prefix = f"{self._base(namespace)}/snapshots/"
        newest = None
        while True:
            page = await self.objects.list(prefix, after)
            for key in page.keys:
                if RECORD_NAME_RE.fullmatch(key[len(prefix) :]):
                    newest = key
            if page.next_after is None:
                break
            after = page.next_after
        if newest is None:
            return None
        record = await self._read_record(newest)
        if record is None:  # listed, then gone: not something this store does
            raise CorruptObjectError(f"{newest} was listed but cannot be read")
        return record if await self._advance_latest(namespace, record) else None

    async def namespaces(self) -> list[str]:
        """Every namespace holding anything, each once, in the store's listing order: one
        one-key listing per namespace (after a namespace's first key the next listing
        starts past all of its keys)."""
        found: list[str] = []
        after: str | None = None
        while True:
            page = await self.objects.list("marketdata/", after, 1)
            if not page.keys:
                return found
            ns = page.keys[0].split("/")[1]
            found.append(ns)
            after = f"marketdata/{ns}/{AFTER_EVERY_KEY}"

    async def repair(self) -> RepairReport:
        """:meth:`repair_latest` for every namespace (a server does this when it opens the
        store). A namespace whose ref or newest record does not parse is reported, and
        the others are still repaired."""
        report = RepairReport()
        for ns in await self.namespaces():
            report.checked += 1
            try:
                moved = await self.repair_latest(ns)
            except CorruptObjectError as exc:
                report.problems[ns] = str(exc)
                continue
            if moved is not None:
                report.moved[ns] = moved
        return report

    async def latest(self, namespace: str) -> SnapshotRecord | None:
        """The greatest (val_datetime, data_asof) stored in the namespace."""
        ref = self.latest_key(namespace)
        blob = await self.objects.get(ref)
        return None if blob is None else SnapshotRecord.from_bytes(blob.data, ref)

    async def asof_keys(self, namespace: str, val_datetime: datetime) -> list[datetime]:
        """Every data_asof stored under (namespace, val_datetime), ascending."""
        prefix = f"{self._base(namespace)}/snapshots/{token(val_datetime)}/"
        out = []
        for key, _ in await list_all(self.objects, prefix):
            name = key[len(prefix) :].removesuffix(".json")
            if TOKEN_RE.fullmatch(name):
                out.append(from_token(name))
        return out

    async def resolve(
        self, namespace: str, val_datetime: datetime, asof: datetime | None = None
    ) -> SnapshotRecord | None:
        """The record with the latest data_asof <= ``asof`` (None: the latest of all)."""
        stamps = await self.asof_keys(namespace, val_datetime)
        if asof is not None:
            limit = utc(asof)
            stamps = [s for s in stamps if s <= limit]
        if not stamps:
            return None
        key = self.record_key(namespace, val_datetime, stamps[-1])
        record = await self._read_record(key)
        if record is None:
            raise CorruptObjectError(f"{key} was listed but cannot be read")
        return record

    async def list_keys(
        self, namespace: str, val_datetime: datetime | None = None, after: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[datetime, datetime]], str | None]:
        """Stored keys (val_datetime, data_asof) in time order, one page; pass the
        returned cursor back as ``after`` for the next."""
        prefix = f"{self._base(namespace)}/snapshots/" + (f"{token(val_datetime)}/" if val_datetime else "")
        page = await self.objects.list(prefix, after, limit)
        keys = []
        for key in page.keys:
            parts = key.split("/")
            if len(parts) == 5 and TOKEN_RE.fullmatch(parts[3]) and TOKEN_RE.fullmatch(parts[4].removesuffix(".json")):
                keys.append((from_token(parts[3]), from_token(parts[4].removesuffix(".json"))))
        return keys, page.next_after

    async def record(self, namespace: str, val_datetime: datetime, data_asof: datetime) -> SnapshotRecord | None:
        return await self._read_record(self.record_key(namespace, val_datetime, data_asof))

    def _remember(self, h: str, snapshot: MarketSnapshot) -> None:
        self._cache[h] = snapshot
        self._cache.move_to_end(h)
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)

    async def load(self, record: SnapshotRecord) -> MarketSnapshot:
        """The record's content, checked against its hash (cached once checked)."""
        cached = self._cache.get(record.hash)
        if cached is not None:
            self.cache_hits += 1
            self._cache.move_to_end(record.hash)
            return cached
        self.cache_misses += 1
        key = self.content_key(record.namespace, record.hash)
        blob = await self.objects.get(key)
        if blob is None:
            raise CorruptObjectError(f"{key} is missing (named by {iso(record.val_datetime)}/{iso(record.data_asof)})")

        def parse() -> MarketSnapshot:
            if sha256_hex(blob.data) != record.hash:
                raise CorruptObjectError(f"{key} fails its SHA-256 (bytes changed)")
            try:
                return MarketSnapshot.model_validate_json(blob.data)
            except ValidationError as exc:
                raise CorruptObjectError(f"{key} does not parse as a snapshot: {exc}") from None

        snapshot = await asyncio.to_thread(parse)
        self._remember(record.hash, snapshot)
        return snapshot
