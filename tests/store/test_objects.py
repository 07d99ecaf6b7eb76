"""The object-store conformance suite: every test that takes the ``backend`` fixture runs
against the local directory store and against S3 (a real SeaweedFS server), and both must
behave the same. Backend-specific promises follow (cross-process safety of the local
store, bounded retries of the S3 client), then store URIs. The test that stops the S3
server comes last."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from conftest import Backend, SeaweedFS, boto3_client

from devtools.seaweed import VOLUME_SLOTS, free_ports
from spectralmc_server.store.objects import (
    MAX_PAGE,
    InvalidKeyError,
    LocalObjectStore,
    ObjectStore,
    PreconditionFailedError,
    StoreUnavailableError,
    list_all,
)
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.uri import InvalidStoreURIError, open_store, parse_store_uri

WRITERS = 16
PROCESSES = 8
INCREMENTS_PER_PROCESS = 10


async def try_create(store: ObjectStore, key: str, data: bytes) -> bool:
    """put-if-absent that reports whether this writer won."""
    try:
        await store.put_if_absent(key, data)
    except PreconditionFailedError:
        return False
    return True


async def increment(store: ObjectStore, key: str) -> int:
    """read → put-if-match, retried on a lost race; returns how many races it lost."""
    for lost in range(1000):
        blob = await store.get(key)
        assert blob is not None
        try:
            await store.put_if_match(key, str(int(blob.data) + 1).encode(), blob.etag)
        except PreconditionFailedError:
            continue
        return lost
    raise AssertionError(f"{key}: no increment got through in 1000 tries")


# --- get, put-if-absent, put-if-match, delete ----------------------------------------


def test_get_of_a_missing_key_is_none(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            assert await store.get("missing") is None
            assert await store.get("no/such/dir/key") is None

    asyncio.run(run())


def test_put_if_absent_creates_once(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            etag = await store.put_if_absent("refs/main", b"first")
            blob = await store.get("refs/main")
            assert blob is not None
            assert blob.data == b"first"
            assert blob.etag == etag, "get must return the etag that put returned"
            with pytest.raises(PreconditionFailedError):
                await store.put_if_absent("refs/main", b"second")
            again = await store.get("refs/main")
            assert again is not None
            assert again.data == b"first"
            assert again.etag == etag

    asyncio.run(run())


def test_put_if_match_replaces_only_the_current_version(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            old = await store.put_if_absent("head", b"v1")
            new = await store.put_if_match("head", b"v2", old)
            assert new != old
            blob = await store.get("head")
            assert blob is not None
            assert (blob.data, blob.etag) == (b"v2", new)

            with pytest.raises(PreconditionFailedError):
                await store.put_if_match("head", b"v3", old)  # stale etag
            blob = await store.get("head")
            assert blob is not None
            assert (blob.data, blob.etag) == (b"v2", new)

            with pytest.raises(PreconditionFailedError):  # S3 answers 404 here, SeaweedFS 412
                await store.put_if_match("never-written", b"x", new)
            assert await store.get("never-written") is None

    asyncio.run(run())


def test_delete_removes_and_tolerates_missing_keys(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            await store.put_if_absent("a/b", b"x")
            await store.put_if_absent("keep", b"y")
            await store.delete("a/b")
            assert await store.get("a/b") is None
            await store.delete("a/b")  # gone already: not an error
            await store.delete("never/written")
            assert [k for k, _ in await list_all(store, "")] == ["keep"]
            await store.put_if_absent("a/b", b"again")  # a deleted key can be created anew
            blob = await store.get("a/b")
            assert blob is not None
            assert blob.data == b"again"

    asyncio.run(run())


def test_two_clients_of_one_store_see_each_other(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open("shared") as one, backend.open("shared") as two:
            etag = await one.put_if_absent("k", b"from one")
            blob = await two.get("k")
            assert blob is not None
            assert (blob.data, blob.etag) == (b"from one", etag)
            with pytest.raises(PreconditionFailedError):
                await two.put_if_absent("k", b"from two")

    asyncio.run(run())


# --- list ----------------------------------------------------------------------------

# Full-key byte order, as S3 lists: '-' (0x2d) < '.' (0x2e) < '/' (0x2f) < '0' < 'A' < '_' < 'a',
# so "a-c" and "a.x" come before everything under "a/", and "a0", "a_", "ab" after it.
TRICKY_KEYS = [
    "a-c",
    "a.x",
    "a/b",
    "a/b-c",
    "a/b.d",
    "a/b0",
    "a/bc/d",
    "a/c/d/e",
    "a0",
    "aB",
    "a_",
    "ab",
    "b",
]
# Byte order among the entries of one directory, none of whose names is a sibling
# directory's name followed by a character below '/'.
ONE_DIRECTORY = ["d/A", "d/Z", "d/a-c", "d/a.x", "d/a0", "d/a_", "d/ab", "d/sub/k", "d/sub0", "d/z"]


async def put_all(store: ObjectStore, keys: list[str]) -> None:
    for key in keys:
        await store.put_if_absent(key, key.encode())


def test_list_is_in_byte_order_and_filters_by_prefix(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            keys = [*ONE_DIRECTORY, "d0", "d-x", "e"]
            assert sorted(ONE_DIRECTORY) == ONE_DIRECTORY  # the expectation itself is byte order
            await put_all(store, keys[::-1])
            page = await store.list("d/")
            assert page.keys == ONE_DIRECTORY
            assert page.next_after is None
            assert sorted((await store.list("d")).keys) == sorted(keys[:-1])
            assert (await store.list("d/a")).keys == ["d/a-c", "d/a.x", "d/a0", "d/a_", "d/ab"]
            assert (await store.list("d/sub")).keys == ["d/sub/k", "d/sub0"]
            assert (await store.list("d/sub/")).keys == ["d/sub/k"]
            assert (await store.list("d/sub/k")).keys == ["d/sub/k"]
            assert (await store.list("d/", start_after="d/a_")).keys == ["d/ab", "d/sub/k", "d/sub0", "d/z"]
            assert (await store.list("zzz")).keys == []
            assert (await store.list("d/zz")).keys == []

    asyncio.run(run())


def test_list_prefix_a_slash_excludes_ab(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            await put_all(store, TRICKY_KEYS)
            under_a = [k for k in TRICKY_KEYS if k.startswith("a/")]
            assert (await store.list("a/")).keys == under_a
            assert (await store.list("a/b")).keys == ["a/b", "a/b-c", "a/b.d", "a/b0", "a/bc/d"]
            assert (await store.list("a/", start_after="a/b0")).keys == ["a/bc/d", "a/c/d/e"]
            assert sorted((await store.list("a")).keys) == TRICKY_KEYS[:-1]

    asyncio.run(run())


def test_local_list_orders_full_keys_by_bytes_as_s3_does(tmp_path: Path) -> None:
    """A directory sorts as its name plus '/': "a-c" < "a.x" < "a/b" < "a0". (SeaweedFS 4.48
    lists "a/..." before "a-c", so this is asserted for the local store only.)"""

    async def run() -> None:
        store = LocalObjectStore(tmp_path / "store")
        await put_all(store, TRICKY_KEYS[::-1])
        assert (await store.list("")).keys == TRICKY_KEYS
        assert (await store.list("a")).keys == TRICKY_KEYS[:-1]
        assert (await store.list("", start_after="a-c")).keys == TRICKY_KEYS[1:]
        assert (await store.list("", start_after="a/c/d/e")).keys == TRICKY_KEYS[8:]
        for limit in range(1, len(TRICKY_KEYS) + 1):
            assert [k for k, _ in await list_all(store, "", page_size=limit)] == TRICKY_KEYS, limit

    asyncio.run(run())


def test_list_pages(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            keys = [f"runs/{i:02d}" for i in range(7)]
            await put_all(store, keys[::-1])
            await store.put_if_absent("runt", b"outside the prefix")
            pages = []
            after: str | None = None
            while True:
                page = await store.list("runs/", after, limit=3)
                pages.append(page.keys)
                assert len(page.modified) == len(page.keys)
                if page.next_after is None:
                    break
                assert page.next_after == page.keys[-1]
                after = page.next_after
                assert len(pages) < 10, "listing never ends"
            assert pages == [keys[0:3], keys[3:6], keys[6:7]]
            assert [k for k, _ in await list_all(store, "runs/", page_size=3)] == keys
            assert [k for k, _ in await list_all(store, "")] == [*keys, "runt"]

    asyncio.run(run())


def test_list_pages_of_every_size_give_the_same_listing(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            await put_all(store, TRICKY_KEYS)
            whole = (await store.list("")).keys
            assert sorted(whole) == TRICKY_KEYS, "every key exactly once"
            for limit in range(1, len(TRICKY_KEYS) + 1):
                assert [k for k, _ in await list_all(store, "", page_size=limit)] == whole, limit
                assert [k for k, _ in await list_all(store, "a/", page_size=limit)] == TRICKY_KEYS[2:8], limit

    asyncio.run(run())


def test_list_page_size_is_bounded(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            for bad in (0, -1, MAX_PAGE + 1):
                with pytest.raises(ValueError, match="page size"):
                    await store.list("", limit=bad)
            assert (await store.list("", limit=MAX_PAGE)).keys == []
            assert (await store.list("", limit=1)).keys == []

    asyncio.run(run())


def test_list_gives_each_key_its_modification_time(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            before = time.time()
            await put_all(store, ["m/1", "m/2", "m/3/x"])
            after = time.time()
            page = await store.list("m/")
            assert page.keys == ["m/1", "m/2", "m/3/x"]
            assert len(page.modified) == 3
            for stamp in page.modified:
                assert isinstance(stamp, float)
                assert before - 5 <= stamp <= after + 5  # S3 keeps whole seconds

    asyncio.run(run())


# --- keys ----------------------------------------------------------------------------

INVALID_KEYS = ["../x", "a/../../x", "a//b", "/abs", "a/", "a b", "", ".", "a/./b", "é", "a\\b", "a\nb"]


def snapshot(root: Path) -> list[tuple[str, bytes]]:
    return sorted((str(p), p.read_bytes() if p.is_file() else b"") for p in root.rglob("*"))


def test_invalid_keys_are_refused_and_touch_nothing(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            etag = await store.put_if_absent("x", b"kept")
            on_disk = snapshot(backend.tmp_path)
            for key in INVALID_KEYS:
                with pytest.raises(InvalidKeyError):
                    await store.get(key)
                with pytest.raises(InvalidKeyError):
                    await store.put_if_absent(key, b"evil")
                with pytest.raises(InvalidKeyError):
                    await store.put_if_match(key, b"evil", etag)
                with pytest.raises(InvalidKeyError):
                    await store.delete(key)
            assert snapshot(backend.tmp_path) == on_disk
            assert [k for k, _ in await list_all(store, "")] == ["x"]
            blob = await store.get("x")
            assert blob is not None
            assert blob.data == b"kept"

    asyncio.run(run())


# --- racing writers ------------------------------------------------------------------


def test_racing_put_if_absent_has_one_winner(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            won = await asyncio.gather(*(try_create(store, "lock", f"writer {i}".encode()) for i in range(WRITERS)))
            assert sum(won) == 1, won
            blob = await store.get("lock")
            assert blob is not None
            assert blob.data == f"writer {won.index(True)}".encode()

    asyncio.run(run())


def test_racing_compare_and_swap_loses_no_update(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            await store.put_if_absent("counter", b"0")
            lost = await asyncio.gather(*(increment(store, "counter") for _ in range(WRITERS)))
            blob = await store.get("counter")
            assert blob is not None
            assert int(blob.data) == WRITERS, f"lost updates; races lost per writer: {lost}"

    asyncio.run(run())


def test_clients_racing_one_content_addressed_key_all_succeed(backend: Backend) -> None:
    """Several clients (own connections each, as servers sharing a bucket have) put the
    same bytes under one key at once, key after key: one creates it, the rest are refused,
    none is left StoreUnavailableError, and every client reads the bytes back."""
    clients, rounds = 4, 3

    async def run() -> None:
        async with contextlib.AsyncExitStack() as stack:
            stores = [await stack.enter_async_context(backend.open("shared")) for _ in range(clients)]
            for r in range(rounds):
                key, data = f"content/{r:02d}", f"blob {r} ".encode() * 512
                won = await asyncio.gather(*(try_create(s, key, data) for s in stores))
                assert sum(won) == 1, (r, won)
                for s in stores:
                    blob = await s.get(key)
                    assert blob is not None and blob.data == data, r

    asyncio.run(run())


# --- the local store across processes ------------------------------------------------


def _child_create(barrier: Barrier, results: Any, root: str, index: int) -> None:
    """One process of the put-if-absent race (module level: 'spawn' imports it)."""
    try:
        barrier.wait(timeout=60)
        won = asyncio.run(try_create(LocalObjectStore(Path(root)), "lock", f"process {index}".encode()))
        results.put((index, won))
    except BaseException as exc:
        results.put((index, repr(exc)))
        raise


def _child_increment(barrier: Barrier, results: Any, root: str, index: int) -> None:
    """One process of the compare-and-swap race."""

    async def run() -> int:
        store = LocalObjectStore(Path(root))
        return sum([await increment(store, "counter") for _ in range(INCREMENTS_PER_PROCESS)])

    try:
        barrier.wait(timeout=60)
        results.put((index, asyncio.run(run())))
    except BaseException as exc:
        results.put((index, repr(exc)))
        raise


def run_processes(target: Callable[..., None], root: Path) -> dict[int, Any]:
    """Start PROCESSES spawned processes that pass a barrier together; their results by index."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, results, str(root), i)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    errors = {i: r for i, r in out.items() if isinstance(r, str)}
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    return out


def test_local_put_if_absent_across_processes_has_one_winner(tmp_path: Path) -> None:
    root = tmp_path / "store"
    won = run_processes(_child_create, root)
    winners = [i for i, w in won.items() if w is True]
    assert len(winners) == 1, won
    blob = asyncio.run(LocalObjectStore(root).get("lock"))
    assert blob is not None
    assert blob.data == f"process {winners[0]}".encode()


def test_local_compare_and_swap_across_processes_loses_no_update(tmp_path: Path) -> None:
    root = tmp_path / "store"
    asyncio.run(LocalObjectStore(root).put_if_absent("counter", b"0"))
    lost = run_processes(_child_increment, root)
    blob = asyncio.run(LocalObjectStore(root).get("counter"))
    assert blob is not None
    assert int(blob.data) == PROCESSES * INCREMENTS_PER_PROCESS, f"races lost per process: {lost}"


def test_local_collect_temporaries_removes_only_stale_parts(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    asyncio.run(store.put_if_absent("a/b", b"data"))
    tmp = store.root / ".tmp"
    assert list(tmp.iterdir()) == [], "a finished write leaves no temporary behind"
    stale = [tmp / f"{uuid.uuid4().hex}.part" for _ in range(3)]
    fresh = tmp / f"{uuid.uuid4().hex}.part"
    for p in [*stale, fresh]:
        p.write_bytes(b"half a write")
    hour_ago = time.time() - 7200
    for p in stale:
        os.utime(p, (hour_ago, hour_ago))
    assert store.collect_temporaries(older_than_seconds=3600) == 3
    assert list(tmp.iterdir()) == [fresh]
    assert store.collect_temporaries(older_than_seconds=3600) == 0
    assert store.collect_temporaries(older_than_seconds=-1) == 1
    assert list(tmp.iterdir()) == []
    blob = asyncio.run(store.get("a/b"))
    assert blob is not None
    assert blob.data == b"data"
    assert [k for k, _ in asyncio.run(list_all(store, ""))] == ["a/b"]


# --- store URIs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///abs", ("file", "/abs", "")),
        ("file:///var/lib/spectralmc/store", ("file", "/var/lib/spectralmc/store", "")),
        ("file://localhost/abs", ("file", "/abs", "")),
        ("file:///with%20space", ("file", "/with space", "")),
        ("s3://bucket/a/b", ("s3", "bucket", "a/b")),
        ("s3://my-bucket.eu/a/b/", ("s3", "my-bucket.eu", "a/b")),
        ("s3://bucket", ("s3", "bucket", "")),
        ("s3://bucket/", ("s3", "bucket", "")),
    ],
)
def test_parse_store_uri(uri: str, expected: tuple[str, str, str]) -> None:
    assert parse_store_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file:relative/path", "must be absolute"),
        ("file://host/x", "names a local path"),
        ("file://relative/path", "names a local path"),
        ("relative/path", "use file:///absolute/path or s3://bucket/prefix"),
        ("/abs/without/scheme", "use file:///absolute/path or s3://bucket/prefix"),
        ("http://example.com/x", "use file:///absolute/path or s3://bucket/prefix"),
        ("", "use file:///absolute/path or s3://bucket/prefix"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://ab/x", "not a valid S3 bucket name"),
        ("s3:///x", "not a valid S3 bucket name"),
        ("s3://-bucket/x", "not a valid S3 bucket name"),
        (f"s3://{'b' * 64}/x", "not a valid S3 bucket name"),
    ],
)
def test_parse_store_uri_refuses(uri: str, message: str) -> None:
    with pytest.raises(InvalidStoreURIError, match=message) as info:
        parse_store_uri(uri)
    assert repr(uri) in str(info.value), "the message quotes the URI"
    assert isinstance(info.value, ValueError)


def test_open_store_file_uri_is_a_local_store(tmp_path: Path) -> None:
    async def run() -> None:
        store = await open_store(f"file://{tmp_path}/objects")
        try:
            assert isinstance(store, LocalObjectStore)
            assert store.root == tmp_path / "objects"
            await store.put_if_absent("k", b"v")
        finally:
            await store.close()
        assert (tmp_path / "objects" / "k").read_bytes() == b"v"

    asyncio.run(run())


def test_open_store_s3_uri_keeps_keys_under_the_prefix(
    s3_settings: S3Settings, make_bucket: Callable[[], str], seaweedfs: SeaweedFS
) -> None:
    bucket = make_bucket()

    async def run() -> None:
        store = await open_store(f"s3://{bucket}/team/models", s3_settings)
        try:
            assert isinstance(store, S3ObjectStore)
            await store.put_if_absent("refs/main", b"v")
            assert [k for k, _ in await list_all(store, "")] == ["refs/main"]
        finally:
            await store.close()

    asyncio.run(run())
    listed = boto3_client(seaweedfs.endpoint_url).list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed.get("Contents", [])] == ["team/models/refs/main"]


# --- S3: bounded retries, unavailability (stops the server: keep it last) -------------


def test_s3_server_has_a_volume_slot_for_every_bucket_the_suite_makes(seaweedfs: SeaweedFS) -> None:
    """Each bucket written to takes a SeaweedFS volume slot for good; with the slot count
    left to `weed mini` (free disk / 1 GiB) a machine with less free disk ran out late in
    the session, and every write to a new bucket failed with InternalError."""
    total, free = seaweedfs.volume_slots()
    assert total == VOLUME_SLOTS, "the slot count must not depend on the machine's free disk"
    assert free >= VOLUME_SLOTS // 2, f"{free} of {total} slots left: the suite makes more buckets than it can hold"


def test_s3_counts_retries_and_gives_up_on_a_dead_endpoint() -> None:
    (dead_port,) = free_ports(1)  # nothing listens there
    settings = S3Settings(
        endpoint_url=f"http://127.0.0.1:{dead_port}",
        region="us-east-1",
        access_key_id="spectralmc",
        secret_access_key="spectralmc-secret",
        max_attempts=2,
        base_delay_seconds=0.01,
        max_delay_seconds=0.05,
        timeout_seconds=2.0,
    )

    async def run() -> None:
        async with S3ObjectStore("bucket", "p", settings) as store:
            assert store.retries == 0
            with pytest.raises(StoreUnavailableError, match="after 2 attempts"):
                await store.get("k")
            assert store.retries == 1
            with pytest.raises(StoreUnavailableError):
                await store.put_if_absent("k", b"v")
            assert store.retries == 2

    asyncio.run(run())


def test_s3_store_unavailable_while_the_server_is_down(
    seaweedfs: SeaweedFS, s3_settings: S3Settings, make_bucket: Callable[[], str]
) -> None:
    bucket = make_bucket()

    async def run() -> None:
        async with S3ObjectStore(bucket, "", s3_settings) as live:  # a client that outlives the outage
            etag = await live.put_if_absent("kept", b"survives a restart")
            await asyncio.to_thread(seaweedfs.stop)
            try:
                async with S3ObjectStore(bucket, "", replace(s3_settings, max_attempts=2)) as down:
                    started = time.monotonic()
                    with pytest.raises(StoreUnavailableError, match="after 2 attempts"):
                        await down.get("kept")  # never None: the key may well exist
                    with pytest.raises(StoreUnavailableError):
                        await down.put_if_absent("new", b"x")
                    with pytest.raises(StoreUnavailableError):
                        await down.put_if_match("kept", b"x", etag)
                    with pytest.raises(StoreUnavailableError):
                        await down.list("")
                    with pytest.raises(StoreUnavailableError):
                        await down.delete("kept")
                    assert down.retries == 5, "one retry per operation with max_attempts=2"
                    assert time.monotonic() - started < 10, "failing must be fast, not a hang"
            finally:
                await asyncio.to_thread(seaweedfs.start)

            blob = await live.get("kept")  # the same client, its old connections gone
            assert blob is not None
            assert (blob.data, blob.etag) == (b"survives a restart", etag)
            await live.put_if_match("kept", b"still writable", etag)

        async with S3ObjectStore(bucket, "", s3_settings) as fresh:
            blob = await fresh.get("kept")
            assert blob is not None
            assert blob.data == b"still writable"

    asyncio.run(run())
