"""The version store on both backends: commits, conflicts, verification, tampering, GC,
pins, concurrency and crashes (each of the original project's storage defects has a
test here)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import Backend
from store_util import child_main, tiny_files, write_files

from spectralmc_server.store.objects import Blob, CorruptObjectError, ObjectStore, Page, StoreUnavailableError, list_all
from spectralmc_server.store.versions import (
    CommitConflictError,
    ContentCollectedError,
    VersionError,
    VersionNotFoundError,
    VersionStore,
)

STORE_UTIL = Path(__file__).with_name("store_util.py")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def spec(backend: Backend, name: str) -> dict[str, Any]:
    """A picklable description of the backend's store ``name`` for child processes."""
    location, prefix = backend.location(name)
    if backend.name == "local":
        return {"kind": "local", "root": location}
    assert backend.s3_settings is not None
    return {"kind": "s3", "bucket": location, "prefix": prefix, "settings": dataclasses.asdict(backend.s3_settings)}


def test_commit_chain_head_and_load(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "gbm")
            assert await vs.head() is None
            stored = [await vs.commit_files(tiny_files(i), f"commit {i}") for i in range(1, 4)]
            assert [s.version for s in stored] == [1, 2, 3]
            assert stored[0].record["parent"] is None
            assert stored[1].record["parent"] == stored[0].record_hash
            assert stored[2].record["parent"] == stored[1].record_hash
            head = await vs.head()
            assert head is not None and head.version == 3 and head.record_hash == stored[2].record_hash
            ckpt = await vs.load(2, need_training=True)
            assert float(ckpt.model["w"][0]) == 2.0 and ckpt.content_hash == stored[1].content_hash
            assert "weights/w" in ckpt.training
            with pytest.raises(VersionNotFoundError, match="no version 9"):
                await vs.version(9)
            assert (await vs.verify()).ok

    run(go())


def test_identical_content_is_stored_once(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            files = tiny_files(7)
            a = await vs.commit_files(files, "a")
            b = await vs.commit_files(files, "b")  # same bytes: idempotent content writes
            assert a.content_hash == b.content_hash and a.record_hash != b.record_hash
            assert len(await list_all(objects, "models/m/content/")) == 3

    run(go())


class Delegating:
    """An object store that passes every call through to ``inner``; subclasses change one."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.description = inner.description

    async def get(self, key: str) -> Blob | None:
        return await self.inner.get(key)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        return await self.inner.put_if_absent(key, data)

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return await self.inner.put_if_match(key, data, etag)

    async def list(self, prefix: str, start_after: str | None = None, limit: int = 1000) -> Page:
        return await self.inner.list(prefix, start_after, limit)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def close(self) -> None:
        await self.inner.close()


class RecordGate(Delegating):
    """Holds every record claim until ``parties`` writers reach it: a true race for one
    version number, whatever the scheduling."""

    def __init__(self, inner: ObjectStore, barrier: asyncio.Barrier) -> None:
        super().__init__(inner)
        self.barrier = barrier

    async def put_if_absent(self, key: str, data: bytes) -> str:
        if "/records/" in key:
            await self.barrier.wait()
        return await self.inner.put_if_absent(key, data)


def test_two_first_commits_cannot_both_succeed(backend: Backend) -> None:
    """Original defect: both first commits succeeded (no create-if-absent)."""

    async def go() -> None:
        async with backend.open("shared") as a, backend.open("shared") as b:
            barrier = asyncio.Barrier(2)
            va, vb = VersionStore(RecordGate(a, barrier), "m"), VersionStore(RecordGate(b, barrier), "m")
            results = await asyncio.gather(
                va.commit_files(tiny_files(1), "from a"),
                vb.commit_files(tiny_files(2), "from b"),
                return_exceptions=True,
            )
            wins = [r for r in results if not isinstance(r, BaseException)]
            losses = [r for r in results if isinstance(r, CommitConflictError)]
            assert len(wins) == 1 and len(losses) == 1, results
            assert losses[0].version == 1 and losses[0].winner["message"] == wins[0].record["message"]
            assert "committed first by another writer" in str(losses[0])
            # Rebase follows the winner instead.
            again = await VersionStore(b, "m").commit_files(tiny_files(2), "from b, rebased", rebase=True)
            assert again.version == 2 and again.record["parent"] == wins[0].record_hash
            assert (await VersionStore(a, "m").verify()).ok

    run(go())


def test_only_version_commits_that_version_or_nothing(backend: Backend) -> None:
    """Seeding: replicas that all saw an empty store each commit "version 1 or nothing";
    a plain commit after the check would land as version 2 (found by the cluster test)."""

    async def go() -> None:
        async with backend.open("shared") as a, backend.open("shared") as b:
            va, vb = VersionStore(a, "m"), VersionStore(b, "m")
            assert await va.head() is None and await vb.head() is None  # both see it empty
            first = await va.commit_files(tiny_files(1), "seed from a", only_version=1)
            assert first.version == 1
            with pytest.raises(CommitConflictError) as lost:
                await vb.commit_files(tiny_files(2), "seed from b", only_version=1)
            assert lost.value.version == 1 and lost.value.winner["message"] == "seed from a"
            assert [v.version for v in await vb.versions()] == [1]
            nxt = await vb.commit_files(tiny_files(2), "next", only_version=2)
            assert nxt.version == 2 and nxt.record["parent"] == first.record_hash

    run(go())


class FlakyHead(Delegating):
    """An object store whose head reads fail (as a network blip would)."""

    async def get(self, key: str) -> Blob | None:
        if key.endswith("/refs/head"):
            raise StoreUnavailableError("simulated outage on the head read")
        return await self.inner.get(key)


def test_a_failed_head_read_is_never_an_empty_store(backend: Backend) -> None:
    """Original defect: a transient head-read error reset history to version 0."""

    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            for i in range(3):
                await vs.commit_files(tiny_files(i), f"v{i}")
            flaky = VersionStore(FlakyHead(objects), "m")
            with pytest.raises(StoreUnavailableError):
                await flaky.commit_files(tiny_files(9), "during the outage", rebase=True)
            with pytest.raises(StoreUnavailableError):
                await flaky.head()
            versions = await vs.versions()
            assert [v.version for v in versions] == [1, 2, 3]
            assert (await vs.verify()).ok

    run(go())


def test_head_pointer_lagging_is_rolled_forward(backend: Backend) -> None:
    """A committer that dies after claiming version n but before moving the head."""

    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            await vs.commit_files(tiny_files(1), "one")
            v2 = await vs.commit_files(tiny_files(2), "two")
            # Put the pointer back on version 1, as if the writer of 2 had died.
            blob = await objects.get("models/m/refs/head")
            assert blob is not None
            one = await vs.version(1)
            await objects.put_if_match(
                "models/m/refs/head",
                orjson.dumps({"hash": one.record_hash, "index": 1}, option=orjson.OPT_SORT_KEYS),
                blob.etag,
            )
            report = await vs.verify()
            assert report.ok and any("lags" in n for n in report.notes)
            head = await vs.head()  # rolls forward, and moves the pointer
            assert head is not None and head.record_hash == v2.record_hash
            assert not any("lags" in n for n in (await vs.verify()).notes)
            v3 = await vs.commit_files(tiny_files(3), "three")
            assert v3.version == 3 and v3.record["parent"] == v2.record_hash

    run(go())


@pytest.mark.parametrize("target", ["record", "manifest", "weights", "training", "head", "pin", "pinlog"])
def test_tampering_with_any_object_is_named(backend: Backend, target: str) -> None:
    """Change one byte of any stored object: verify names the version and the reason."""

    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            stored = [await vs.commit_files(tiny_files(i), f"v{i}") for i in range(1, 5)]
            await vs.pin(2, "ops")
            assert (await vs.verify()).ok
            content = stored[2].record["content"]  # version 3's content
            key = {
                "record": "models/m/records/000000000003.json",
                "manifest": vs.content_key(content["manifest"]),
                "weights": vs.content_key(content["model"]),
                "training": vs.content_key(content["training"]),
                "head": "models/m/refs/head",
                "pin": "models/m/refs/pin",
                "pinlog": "models/m/pinlog/000000000001.json",
            }[target]
            blob = await objects.get(key)
            assert blob is not None
            data = bytearray(blob.data)
            i = data.index(b"2") if target in ("pin", "pinlog") else len(data) // 2
            data[i] = data[i] ^ 0x01  # one bit of one byte
            await objects.put_if_match(key, bytes(data), blob.etag)
            report = await vs.verify()
            assert not report.ok
            expected_version = {"head": 4, "pin": None, "pinlog": 2}.get(target, 3)
            versions = {p["version"] for p in report.problems}
            if expected_version is not None:
                assert report.first_bad == expected_version or expected_version in versions, report.problems
            assert any(p["object"] == key or "parent" in p["reason"] for p in report.problems), report.problems
            reasons = " ".join(p["reason"] for p in report.problems)
            assert any(w in reasons for w in ("hash", "SHA-256", "parent", "JSON", "does not match", "not name")), (
                reasons
            )
            if target in ("manifest", "weights", "training"):
                with pytest.raises(CorruptObjectError):  # loading checks hashes before deserialising
                    await vs.load(3, need_training=True)

    run(go())


def test_gc_keeps_head_pins_and_protected_and_verify_still_passes(backend: Backend) -> None:
    """Original defects: GC broke verify and list; GC must be idempotent."""

    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            for i in range(1, 9):
                await vs.commit_files(tiny_files(i), f"v{i}")
            await vs.pin(3, "ops")
            preview = await vs.gc(2, protect=[5], dry_run=True, grace_seconds=0)
            assert preview.retained == [3, 5, 7, 8] and preview.collected_versions == [1, 2, 4, 6]
            assert len(await list_all(objects, "models/m/content/")) == 24  # a dry run deletes nothing
            report = await vs.gc(2, protect=[5], dry_run=False, grace_seconds=0)
            assert report.collected_versions == [1, 2, 4, 6] and len(report.deleted_objects) == 12
            assert report.bytes_freed > 0
            assert len(await list_all(objects, "models/m/content/")) == 12
            check = await vs.verify()
            assert check.ok and check.collected == [1, 2, 4, 6] and check.pinned == 3 and check.head == 8
            assert [v.version for v in await vs.versions()] == list(range(1, 9))  # records stay
            again = await vs.gc(2, protect=[5], dry_run=False, grace_seconds=0)
            assert again.collected_versions == [] and again.deleted_objects == []
            with pytest.raises(ContentCollectedError):
                await vs.load(1)
            with pytest.raises(ContentCollectedError):
                await vs.pin(2)
            assert float((await vs.load(3)).model["w"][0]) == 3.0  # pinned survives
            with pytest.raises(VersionError, match="keep must be"):
                await vs.gc(-1)

    run(go())


def test_gc_collects_content_a_dead_committer_left(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            await vs.commit_files(tiny_files(1), "v1")
            orphan = tiny_files(99)["model.safetensors"]
            await objects.put_if_absent(vs.content_key("sha256:" + "0" * 64), orphan)
            young = await vs.gc(5, dry_run=False, grace_seconds=3600)
            assert young.deleted_objects == []  # could be a commit in flight: keep it
            old = await vs.gc(5, dry_run=False, grace_seconds=0)
            assert old.deleted_objects == [vs.content_key("sha256:" + "0" * 64)]
            assert (await vs.verify()).ok

    run(go())


def test_pins_and_the_pin_log(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            for i in range(1, 4):
                await vs.commit_files(tiny_files(i), f"v{i}")
            assert await vs.pinned() is None
            await vs.pin(2, "alice")
            assert await vs.pinned() == 2
            await asyncio.gather(vs.pin(1, "bob"), vs.pin(3, "carol"))  # racing pins: both logged
            await vs.unpin("dave")
            assert await vs.pinned() is None
            log = await vs.pin_log()
            assert [e.index for e in log] == [1, 2, 3, 4]
            assert log[0].body["by"] == "alice" and log[-1].body["action"] == "unpin"
            assert Counter(e.body["by"] for e in log[1:3]) == Counter(["bob", "carol"])
            assert all(log[i].body["parent"] == log[i - 1].hash for i in range(1, 4))
            with pytest.raises(VersionNotFoundError):
                await vs.pin(7)
            assert (await vs.verify()).ok

    run(go())


def test_more_than_a_thousand_versions_are_listed() -> None:
    """Original defect: only the first 1,000 versions were listed (local backend; the S3
    listing follows pages the same way, see test_objects.py)."""

    async def go(root: Path) -> None:
        from spectralmc_server.store.objects import LocalObjectStore

        vs = VersionStore(LocalObjectStore(root), "m")
        files = tiny_files(1, size=4)
        for i in range(1005):
            await vs.commit_files(files, f"v{i + 1}")
        versions = await vs.versions()
        assert [v.version for v in versions] == list(range(1, 1006))
        assert (await vs.verify()).ok

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run(go(Path(d)))


class Counting(Delegating):
    """Counts object reads and listed pages, to show walks are linear."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.gets = 0
        self.pages = 0

    async def get(self, key: str) -> Blob | None:
        self.gets += 1
        return await self.inner.get(key)

    async def list(self, prefix: str, start_after: str | None = None, limit: int = 1000) -> Page:
        self.pages += 1
        return await self.inner.list(prefix, start_after, limit)


@contextlib.contextmanager
def fsync_free_dir(fallback: Path) -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm) where there is one with a GiB free, else
    ``fallback``. A local store fsyncs every object and directory it writes: on this
    machine's disk that is ~1.7 of each commit's ~3 ms, which a test that counts reads
    does not need to wait for."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 1 << 30:
        with tempfile.TemporaryDirectory(dir=shm, prefix="spectralmc-test-") as d:
            yield Path(d)
    else:
        yield fallback


def test_ten_thousand_versions_stay_linear(tmp_path: Path) -> None:
    """10,000 versions: head lookup costs a constant number of reads, list and verify a
    number linear in the versions (no quadratic walks)."""
    from spectralmc_server.store.objects import LocalObjectStore

    n = 10_000

    async def go(root: Path) -> None:
        objects = Counting(LocalObjectStore(root))
        vs = VersionStore(objects, "m")
        files = tiny_files(1, size=4)
        t0 = time.perf_counter()
        for i in range(n):
            await vs.commit_files(files, f"v{i + 1}")
        commit_seconds = time.perf_counter() - t0
        objects.gets = objects.pages = 0
        head = await vs.head()
        assert head is not None and head.version == n
        assert objects.gets <= 3  # ref, probe of n+1, record n
        objects.gets = objects.pages = 0
        versions = await vs.versions()
        assert len(versions) == n and objects.gets == n and objects.pages <= n // 1000 + 1
        objects.gets = objects.pages = 0
        report = await vs.verify()
        assert report.ok and report.versions == n
        assert objects.gets <= n + 3 + 3  # records, 3 distinct content blobs, refs
        print(f"10,000 commits in {commit_seconds:.1f} s")

    with fsync_free_dir(tmp_path) as root:
        run(go(root))


def test_concurrent_committers_build_one_linear_chain(backend: Backend, tmp_path: Path) -> None:
    """8 processes x 25 commits each -> 200 versions, one chain, nothing lost."""
    per_process, processes = 25, 8
    dirs = [
        [str(write_files(tiny_files(p * 100 + i, size=8), tmp_path / f"p{p}" / f"c{i}")) for i in range(per_process)]
        for p in range(processes)
    ]
    s = spec(backend, "shared")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        results = pool.starmap(child_main, [(s, "m", dirs[p], False) for p in range(processes)])
    claimed = sorted(v for r in results for v in r)
    assert claimed == list(range(1, processes * per_process + 1))  # every commit got its own version

    async def go() -> None:
        async with backend.open("shared") as objects:
            vs = VersionStore(objects, "m")
            report = await vs.verify()
            assert report.ok and report.versions == 200 and report.head == 200, report.problems
            messages = Counter(v.record["message"] for v in await vs.versions())
            assert len(messages) == 200  # no commit lost or duplicated

    run(go())


def test_committers_killed_at_random_points_leave_a_sound_store(backend: Backend, tmp_path: Path) -> None:
    """SIGKILL a committer at random moments, 20 times: verify passes, the head loads, and
    what the dead writers left is collectable."""
    trials = 20
    rng = random.Random(1234)
    d = [str(write_files(tiny_files(i, size=2048), tmp_path / f"c{i}")) for i in range(6)]
    s = spec(backend, "crash")
    env = dict(os.environ)
    for trial in range(trials):
        child = subprocess.Popen(
            [sys.executable, str(STORE_UTIL), orjson.dumps(s).decode(), "m", *d],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Wait for the child to be committing (its start-up time depends on the machine),
        # then kill it at a random point: mid-upload, mid-claim or between commits.
        assert child.stdout is not None and child.stdout.readline() == b"ready\n", child.stderr
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else b""

        async def check(trial: int = trial) -> int:
            async with backend.open("crash") as objects:
                vs = VersionStore(objects, "m")
                report = await vs.verify()
                assert report.ok, (trial, report.problems)
                head = await vs.head()
                if head is not None:
                    await vs.load(head.version, need_training=True)
                return 0 if head is None else head.version

        run(check())

    async def collect() -> None:
        async with backend.open("crash") as objects:
            vs = VersionStore(objects, "m")
            head = await vs.head()
            assert head is not None and head.version >= trials // 2  # the children did commit
            await vs.gc(10**6, dry_run=False, grace_seconds=0)
            referenced = {h.removeprefix("sha256:") for v in await vs.versions() for h in v.record["content"].values()}
            stored = {k.rsplit("/", 1)[1] for k, _ in await list_all(objects, "models/m/content/")}
            assert stored == referenced  # every leftover blob is gone, nothing referenced is
            assert (await vs.verify()).ok

    run(collect())
    if backend.name == "local":
        location, _ = backend.location("crash")
        leftovers = list((Path(location) / ".tmp").iterdir())
        from spectralmc_server.store.objects import LocalObjectStore

        assert LocalObjectStore(Path(location)).collect_temporaries(0) == len(leftovers)


def test_invalid_model_names_are_refused(tmp_path: Path) -> None:
    from spectralmc_server.store.objects import LocalObjectStore

    for bad in ("", "../x", "a/b", "x" * 65, "-lead"):
        with pytest.raises(VersionError, match="invalid model name"):
            VersionStore(LocalObjectStore(tmp_path), bad)


def test_commit_refuses_files_that_do_not_belong_together(tmp_path: Path) -> None:
    from spectralmc_server.store.objects import LocalObjectStore

    vs = VersionStore(LocalObjectStore(tmp_path), "m")
    files = tiny_files(1)
    files["model.safetensors"] = tiny_files(2)["model.safetensors"]
    with pytest.raises(VersionError, match="does not list the hashes"):
        run(vs.commit_files(files))
    del files["training.safetensors"]
    with pytest.raises(VersionError, match="missing"):
        run(vs.commit_files(files))
