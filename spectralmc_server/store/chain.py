"""Hash-chained logs with a CAS-moved tip pointer, and the version store's errors.

A :class:`Chain` is entries created once at ``prefix/<index:012d>.json`` (index 1, 2,
...), each naming its parent's hash, and a ref pointing at the tip. Claiming entry n is
put-if-absent, so two writers can never both own it (a refused claim whose entry holds
the writer's own bytes is its own write, landed while the answer was lost: it is not a
race lost, so a retried commit never appends twice); the ref moves with
:func:`~spectralmc_server.store.cas.advance_ref` and is only a cache of the tip: a
writer that dies after its entry and before the ref leaves it behind, and every reader
rolls it forward (and moves it, helping) by probing the next entry. The model versions
(records, refs/head) and the pin log (pinlog, refs/pin) are both chains
(``store/versions.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from spectralmc_server.engine.checkpoint import canonical_json
from spectralmc_server.store.cas import advance_ref, sha256_hex
from spectralmc_server.store.objects import (
    CorruptObjectError,
    ObjectStore,
    PreconditionFailedError,
    StoreError,
    list_all,
)

CONCURRENCY = 32  # object reads in flight when walking history


class VersionError(StoreError):
    """A version-store operation that cannot be done as asked."""


class VersionNotFoundError(VersionError):
    """No record for that version."""


class ContentCollectedError(VersionError):
    """The version's record exists but garbage collection removed its content."""


class CertificateExistsError(VersionError):
    """The version already has a different certificate: links are created once."""

    def __init__(self, model: str, version: int, existing: str, offered: str) -> None:
        super().__init__(
            f"model {model!r} version {version} already has certificate {existing}; "
            f"refusing to replace it with {offered}"
        )
        self.version = version
        self.existing = existing
        self.offered = offered


class CommitConflictError(VersionError):
    """Another writer claimed the version number first."""

    def __init__(self, version: int, winner: dict[str, Any]) -> None:
        super().__init__(
            f"version {version} was committed first by another writer "
            f"({winner.get('message', '')!r} at {winner.get('time', '?')}); commit again with rebase to follow it"
        )
        self.version = version
        self.winner = winner


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object, or CorruptObjectError naming ``what``."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptObjectError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CorruptObjectError(f"{what} is not a JSON object")
    return value


@dataclass(frozen=True)
class Entry:
    """One chain entry: its index, parsed body, exact bytes and their hash."""

    index: int
    body: dict[str, Any]
    data: bytes
    hash: str


async def gather_limited(calls: Iterable[Callable[[], Awaitable[Any]]], limit: int = CONCURRENCY) -> list[Any]:
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
        body = parse(blob.data, self.key(index))
        return Entry(index, body, blob.data, sha256_hex(blob.data))

    async def read_ref(self) -> tuple[int, str | None]:
        blob = await self.objects.get(self.ref)
        return (0, None) if blob is None else self._parse_ref(blob.data)

    def _parse_ref(self, data: bytes) -> tuple[int, str]:
        body = parse(data, self.ref)
        index, h = body.get("index"), body.get("hash")
        if not isinstance(index, int) or index < 1 or not isinstance(h, str):
            raise CorruptObjectError(f"{self.ref} does not name an entry: {data[:200]!r}")
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
                raise CorruptObjectError(f"{self.key(index + 1)} does not name {self.key(index)} as its parent")
            index, h = index + 1, nxt.hash
        if index > start and h is not None:
            await self.move_ref(index, h)
        return index, h

    async def move_ref(self, index: int, h: str) -> None:
        """Move the pointer to (index, h) unless it already points at or beyond index
        (CAS with bounded, jittered retries: :func:`~spectralmc_server.store.cas.advance_ref`)."""
        data = canonical_json({"index": index, "hash": h})

        def update(current: bytes | None) -> bytes | None:
            if current is not None and self._parse_ref(current)[0] >= index:
                return None
            return data

        await advance_ref(self.objects, self.ref, update)

    async def append(
        self, make: Callable[[int, str | None], dict[str, Any]], *, retry: bool, only_index: int | None = None
    ) -> Entry:
        """Create the next entry with ``make(index, parent_hash)``; on losing the race,
        raise :class:`CommitConflictError` or (``retry``) build on the winner and try again.
        ``only_index``: create entry number ``only_index`` or nothing (CommitConflictError when
        the log has moved past it: "only if still empty" is ``only_index=1``)."""
        while True:
            index, parent = await self.tip()
            if only_index is not None and index + 1 != only_index:
                winner = await self.read(only_index)
                raise CommitConflictError(only_index, winner.body if winner else {})
            body = make(index + 1, parent)
            body[self.index_field] = index + 1
            body["parent"] = parent
            data = canonical_json(body)
            try:
                await self.objects.put_if_absent(self.key(index + 1), data)
            except PreconditionFailedError:
                # The entry exists: another writer's, or ours (a write that landed while
                # its answer was lost, then was retried): the same bytes are ours.
                winner = await self.read(index + 1)
                if winner is None or winner.data != data:
                    if not retry:
                        raise CommitConflictError(index + 1, winner.body if winner else {}) from None
                    continue
            h = sha256_hex(data)
            await self.move_ref(index + 1, h)
            return Entry(index + 1, body, data, h)

    async def all(self) -> list[Entry]:
        """Every entry in index order (listing pages, then reads in parallel)."""
        keys = [k for k, _ in await list_all(self.objects, self.prefix + "/")]
        entries: list[Entry] = []
        for key, blob in zip(keys, await gather_limited([partial(self.objects.get, k) for k in keys]), strict=True):
            if blob is None:
                continue  # deleted between listing and reading
            m = re.fullmatch(re.escape(self.prefix) + r"/(\d{12})\.json", key)
            if m is None:
                raise CorruptObjectError(f"unexpected object {key} among the entries")
            entries.append(Entry(int(m.group(1)), parse(blob.data, key), blob.data, sha256_hex(blob.data)))
        return entries
