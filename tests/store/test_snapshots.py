"""Market-data snapshots on the object-store protocol, once per backend (a local directory
and a real SeaweedFS S3 server): as-of resolution, immutability and idempotence,
reproducible content hashes, lineage, the latest ref under concurrent puts, tamper
detection on load, the bounded cache, paged listing, and the time spelling of keys."""

from __future__ import annotations

import asyncio
import hashlib
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from conftest import Backend

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import (
    SnapshotConflictError,
    SnapshotRecord,
    SnapshotStore,
    iso,
    token,
)
from spectralmc_server.store.objects import CorruptObjectError

NS = "default"
VDT = datetime(2026, 11, 26, 16, 0, tzinfo=UTC)


def at(seconds: float, base: datetime = VDT) -> datetime:
    return base + timedelta(seconds=seconds)


def snap(spot: float = 100.0, **extra: Any) -> MarketSnapshot:
    body: dict[str, Any] = {
        "spots": {"SPX": spot, "NDX": 15000.0},
        "yield_curves": {"USD": {"pillars": [{"years": 0.25, "zero_rate": 0.03}, {"years": 1.0, "zero_rate": 0.035}]}},
        "discounting": {"SPX": "USD", "NDX": "USD"},
        **extra,
    }
    return MarketSnapshot.model_validate(body)


# --- as of -------------------------------------------------------------------------------

# Stored: VDT as of +5 s (spot 101) and as of +60 s (spot 102).
FIRST, SECOND = at(5), at(60)


@pytest.mark.parametrize(
    ("case", "namespace", "vdt", "asof", "expected"),
    [
        ("before the first (by one microsecond)", NS, VDT, at(4.999999), None),
        ("exactly on the first", NS, VDT, FIRST, FIRST),
        ("between the two (one microsecond before the second)", NS, VDT, at(59.999999), FIRST),
        ("exactly on the second", NS, VDT, SECOND, SECOND),
        ("after the last", NS, VDT, at(3600), SECOND),
        ("asof=None: the latest", NS, VDT, None, SECOND),
        ("between the two, written in another zone", NS, VDT, at(30).astimezone(timezone(timedelta(hours=-5))), FIRST),
        ("other namespace", "other", VDT, None, None),
        ("other val_datetime", NS, at(1), at(3600), None),
    ],
)
async def test_resolve_as_of(
    backend: Backend, case: str, namespace: str, vdt: datetime, asof: datetime | None, expected: datetime | None
) -> None:
    async with backend.open() as objects:
        store = SnapshotStore(objects)
        await store.put(NS, VDT, SECOND, snap(102.0))  # out of order on purpose
        await store.put(NS, VDT, FIRST, snap(101.0))
        got = await store.resolve(namespace, vdt, asof)
        if expected is None:
            assert got is None, case
            return
        assert got is not None, case
        assert (got.namespace, got.val_datetime, got.data_asof) == (NS, VDT, expected), case
        spot = (await store.load(got)).spots["SPX"]
        assert spot == (101.0 if expected == FIRST else 102.0), case


async def test_resolve_in_an_empty_store_is_none(backend: Backend) -> None:
    async with backend.open() as objects:
        store = SnapshotStore(objects)
        assert await store.resolve(NS, VDT) is None
        assert await store.resolve(NS, VDT, at(10)) is None
        assert await store.latest(NS) is None


# --- immutability, idempotence, hashes, lineage --------------------------------------------


async def test_a_key_is_immutable(backend: Backend) -> None:
    async with backend.open("shared") as objects:
        store = SnapshotStore(objects)
        record, created = await store.put(NS, VDT, FIRST, snap(101.0))
        assert created
        with pytest.raises(SnapshotConflictError, match="already holds other content") as exc:
            await store.put(NS, VDT, FIRST, snap(999.0))
        assert record.hash in str(exc.value)
    async with backend.open("shared") as objects:  # a fresh client: nothing cached
        fresh = SnapshotStore(objects)
        found = await fresh.resolve(NS, VDT, FIRST)
        assert found is not None
        assert found.hash == record.hash
        assert (await fresh.load(found)).spots["SPX"] == 101.0
        assert await fresh.record(NS, VDT, FIRST) == found


async def test_same_content_again_is_idempotent(backend: Backend) -> None:
    """The same snapshot with its JSON keys in another order is the same content."""
    a = MarketSnapshot.model_validate_json(
        b'{"spots": {"SPX": 100.0, "NDX": 15000.0}, "yield_curves": {"USD": {"pillars": [{"years": 1.0,'
        b' "zero_rate": 0.03}]}}, "discounting": {"SPX": "USD"}}'
    )
    b = MarketSnapshot.model_validate_json(
        b'{"discounting": {"SPX": "USD"}, "yield_curves": {"USD": {"pillars": [{"zero_rate": 0.03,'
        b' "years": 1}]}}, "spots": {"NDX": 15000, "SPX": 100}}'
    )
    assert list(a.spots) != list(b.spots)  # the premise: the dicts really are in another order
    async with backend.open() as objects:
        store = SnapshotStore(objects)
        first, created = await store.put(NS, VDT, FIRST, a, lineage={"by": "first"})
        again, created_again = await store.put(NS, VDT, FIRST, b, lineage={"by": "second"})
        assert (created, created_again) == (True, False)
        assert again.hash == first.hash
        assert again == first  # the stored record, including its lineage and stored_at
        assert again.lineage == {"by": "first"}
        listed, _ = await store.list_keys(NS)
        assert listed == [(VDT, FIRST)]


async def test_the_hash_is_reproducible_and_is_the_stored_bytes(backend: Backend) -> None:
    async with backend.open() as one, backend.open() as two:
        r1, _ = await SnapshotStore(one).put(NS, VDT, FIRST, snap(101.0))
        r2, _ = await SnapshotStore(two).put("elsewhere", at(1), at(2), snap(101.0))
        r3, _ = await SnapshotStore(two).put(NS, VDT, FIRST, snap(101.5))
        assert r1.hash == r2.hash
        assert r3.hash != r1.hash
        assert r1.hash.startswith("sha256:") and len(r1.hash) == 7 + 64
        blob = await one.get(SnapshotStore(one).content_key(NS, r1.hash))
        assert blob is not None
        assert "sha256:" + hashlib.sha256(blob.data).hexdigest() == r1.hash
        # The canonical bytes: the snapshot's JSON with sorted keys.
        assert blob.data == orjson.dumps(snap(101.0).model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


async def test_lineage_round_trips_through_the_record(backend: Backend) -> None:
    lineage: dict[str, Any] = {
        "job": "derive-vols",
        "inputs": [{"namespace": NS, "val_datetime": iso(VDT), "data_asof": iso(FIRST), "hash": "sha256:" + "ab" * 32}],
        "params": {"tolerance": 1e-12, "underlyings": ["SPX", "NDX"], "retries": 3, "strict": True, "note": None},
    }
    async with backend.open("shared") as objects:
        stored, _ = await SnapshotStore(objects).put(NS, VDT, SECOND, snap(), lineage=lineage)
        plain, _ = await SnapshotStore(objects).put(NS, VDT, FIRST, snap(99.0))
        assert stored.lineage == lineage
        assert plain.lineage is None
    async with backend.open("shared") as objects:
        fresh = SnapshotStore(objects)
        found = await fresh.resolve(NS, VDT)
        assert found is not None
        assert found.lineage == lineage
        assert found.describe()["lineage"] == lineage
        assert found.stored_at == stored.stored_at
        latest = await fresh.latest(NS)
        assert latest is not None and latest.lineage == lineage
        older = await fresh.resolve(NS, VDT, FIRST)
        assert older is not None and older.lineage is None


def test_record_bytes_round_trip() -> None:
    record = SnapshotRecord(NS, VDT, at(0.25), "sha256:" + "0" * 64, {"job": "x", "n": [1, 2]}, "2026-11-26T16:00:01Z")
    assert SnapshotRecord.from_bytes(record.to_bytes(), "k") == record
    assert record.key() == {
        "namespace": NS,
        "val_datetime": "2026-11-26T16:00:00Z",
        "data_asof": "2026-11-26T16:00:00.250000Z",
        "hash": "sha256:" + "0" * 64,
    }
    with pytest.raises(CorruptObjectError, match="k is not a snapshot record"):
        SnapshotRecord.from_bytes(b'{"namespace": "x"}', "k")
    with pytest.raises(CorruptObjectError):
        SnapshotRecord.from_bytes(b"not json", "k")


# --- latest --------------------------------------------------------------------------------


async def test_latest_only_moves_forward(backend: Backend) -> None:
    async with backend.open() as objects:
        store = SnapshotStore(objects)

        async def latest() -> tuple[datetime, datetime]:
            record = await store.latest(NS)
            assert record is not None
            return record.val_datetime, record.data_asof

        await store.put(NS, VDT, SECOND, snap(102.0))
        assert await latest() == (VDT, SECOND)
        await store.put(NS, VDT, FIRST, snap(101.0))  # an older data_asof, put later
        assert await latest() == (VDT, SECOND)
        await store.put(NS, VDT - timedelta(days=1), at(7200), snap(100.0))  # an older val_datetime, later asof
        assert await latest() == (VDT, SECOND)
        await store.put(NS, VDT, SECOND, snap(102.0))  # idempotent re-put: no move
        assert await latest() == (VDT, SECOND)
        later_vdt = VDT + timedelta(days=1)
        await store.put(NS, later_vdt, later_vdt, snap(103.0))  # val_datetime orders first
        assert await latest() == (later_vdt, later_vdt)
        await store.put(NS, VDT, at(86_000), snap(104.0))
        assert await latest() == (later_vdt, later_vdt)
        assert await store.latest("other") is None


async def test_concurrent_puts_leave_latest_at_the_greatest_key(backend: Backend) -> None:
    stamps = [at(i) for i in range(1, 21)]
    order = stamps[:]
    random.Random(7).shuffle(order)
    async with backend.open("shared") as one, backend.open("shared") as two:
        stores = [SnapshotStore(one), SnapshotStore(two)]  # two clients, as two servers would be
        results = await asyncio.gather(
            *(
                stores[i % 2].put(NS, VDT, asof, snap(100.0 + (asof - VDT).total_seconds()))
                for i, asof in enumerate(order)
            )
        )
        assert all(created for _, created in results)
        latest = await stores[0].latest(NS)
        assert latest is not None
        assert (latest.val_datetime, latest.data_asof) == (VDT, max(stamps))
        assert (await stores[1].load(latest)).spots["SPX"] == 120.0
        assert await stores[1].asof_keys(NS, VDT) == stamps


# --- load ------------------------------------------------------------------------------------


async def test_load_detects_tampered_content(backend: Backend) -> None:
    async with backend.open("shared") as objects:
        store = SnapshotStore(objects)
        record, _ = await store.put(NS, VDT, FIRST, snap(101.0))
        key = store.content_key(NS, record.hash)
        blob = await objects.get(key)
        assert blob is not None
        forged = blob.data.replace(b"101.0", b"909.0")  # still a valid snapshot, other bytes
        assert forged != blob.data
        MarketSnapshot.model_validate_json(forged)
        await objects.put_if_match(key, forged, blob.etag)
        assert (await store.load(record)).spots["SPX"] == 101.0  # the writer's cache holds the checked copy
    async with backend.open("shared") as objects:
        fresh = SnapshotStore(objects)
        found = await fresh.resolve(NS, VDT)
        assert found is not None
        with pytest.raises(CorruptObjectError, match="fails its SHA-256"):
            await fresh.load(found)
        assert fresh._cache == {}  # nothing unchecked is cached
        with pytest.raises(CorruptObjectError):
            await fresh.load(found)


async def test_load_of_missing_content_is_corrupt(backend: Backend) -> None:
    async with backend.open() as objects:
        store = SnapshotStore(objects)
        record, _ = await store.put(NS, VDT, FIRST, snap())
        await objects.delete(store.content_key(NS, record.hash))
        with pytest.raises(CorruptObjectError, match="is missing"):
            await SnapshotStore(objects).load(record)


async def test_load_caches_by_hash_and_the_cache_is_bounded(backend: Backend) -> None:
    async with backend.open("shared") as objects:
        writer = SnapshotStore(objects)
        records = [(await writer.put(NS, VDT, at(i), snap(100.0 + i)))[0] for i in range(1, 4)]
    async with backend.open("shared") as objects:
        store = SnapshotStore(objects, cache_entries=2)
        for i, record in enumerate(records, start=1):
            assert (await store.load(record)).spots["SPX"] == 100.0 + i
            assert len(store._cache) <= 2
        assert (store.cache_hits, store.cache_misses) == (0, 3)
        assert (await store.load(records[2])).spots["SPX"] == 103.0  # the most recent: cached
        assert (store.cache_hits, store.cache_misses) == (1, 3)
        assert (await store.load(records[0])).spots["SPX"] == 101.0  # evicted: read again
        assert (store.cache_hits, store.cache_misses) == (1, 4)
        assert len(store._cache) == 2
        assert list(store._cache) == [records[2].hash, records[0].hash]


# --- listing ---------------------------------------------------------------------------------


async def test_list_keys_pages_in_time_order(backend: Backend) -> None:
    earlier, later = VDT - timedelta(days=1), VDT
    keys = [(earlier, at(s, earlier)) for s in (1, 2, 30)] + [(later, at(s)) for s in (0.5, 5, 60, 61, 3600)]
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    async with backend.open() as objects:
        store = SnapshotStore(objects)
        for vdt, asof in shuffled:
            await store.put(NS, vdt, asof, snap(100.0 + (asof - vdt).total_seconds()))
        await store.put("other", VDT, at(1), snap())

        pages: list[list[tuple[datetime, datetime]]] = []
        after: str | None = None
        while True:
            page, after = await store.list_keys(NS, after=after, limit=3)
            pages.append(page)
            if after is None:
                break
            assert len(pages) < 10, "the cursor does not advance"
        assert [len(p) for p in pages] == [3, 3, 2]
        assert [k for p in pages for k in p] == sorted(keys)

        one_vdt: list[tuple[datetime, datetime]] = []
        after = None
        while True:
            page, after = await store.list_keys(NS, val_datetime=later, after=after, limit=2)
            one_vdt.extend(page)
            if after is None:
                break
        assert one_vdt == sorted(k for k in keys if k[0] == later)
        assert await store.list_keys("nothing-here") == ([], None)


# --- time spelling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tok", "text"),
    [
        (datetime(153, 1, 2, 3, 4, 5, tzinfo=UTC), "01530102T030405.000000Z", "0153-01-02T03:04:05Z"),
        (datetime(153, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "01530102T030405.000006Z", "0153-01-02T03:04:05.000006Z"),
        (datetime(9, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "00091231T235959.999999Z", "0009-12-31T23:59:59.999999Z"),
        (
            datetime(2026, 11, 26, 16, 0, 0, 120000, tzinfo=UTC),
            "20261126T160000.120000Z",
            "2026-11-26T16:00:00.120000Z",
        ),
        (datetime(2026, 11, 26, 16, 0, tzinfo=UTC), "20261126T160000.000000Z", "2026-11-26T16:00:00Z"),
        (  # another zone: the UTC spelling, across a date boundary
            datetime(2026, 11, 26, 23, 30, 0, 1, tzinfo=timezone(timedelta(hours=-5))),
            "20261127T043000.000001Z",
            "2026-11-27T04:30:00.000001Z",
        ),
    ],
)
def test_token_and_iso(value: datetime, tok: str, text: str) -> None:
    assert token(value) == tok
    assert iso(value) == text
    assert datetime.fromisoformat(text) == value


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="time zone is required"):
        token(datetime(2026, 11, 26, 16, 0))
    with pytest.raises(ValueError, match="time zone is required"):
        iso(datetime(2026, 11, 26, 16, 0))


async def test_year_153_keys_store_resolve_and_sort(backend: Backend) -> None:
    """Zero-padded years keep the listing in time order (0153 before 2026) and the keys
    parseable; unpadded they would be skipped by the listing."""
    ancient = datetime(153, 3, 4, 5, 6, 7, 8, tzinfo=UTC)
    async with backend.open() as objects:
        store = SnapshotStore(objects)
        await store.put(NS, VDT, VDT, snap(102.0))
        record, _ = await store.put(NS, VDT, ancient, snap(101.0))
        assert record.key()["data_asof"] == "0153-03-04T05:06:07.000008Z"
        found = await store.resolve(NS, VDT, datetime(1000, 1, 1, tzinfo=UTC))
        assert found is not None
        assert found.data_asof == ancient
        assert (await store.load(found)).spots["SPX"] == 101.0
        assert await store.asof_keys(NS, VDT) == [ancient, VDT]
        await store.put(NS, ancient, ancient, snap(100.0))
        keys, _ = await store.list_keys(NS)
        assert keys == [(ancient, ancient), (VDT, ancient), (VDT, VDT)]
        latest = await store.latest(NS)
        assert latest is not None and (latest.val_datetime, latest.data_asof) == (VDT, VDT)
