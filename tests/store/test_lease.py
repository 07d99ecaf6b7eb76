"""The store lease (store/lease.py) on both backends, a real SeaweedFS among them: one
holder at a time however many race, an expired lease taken over, renewals that keep it
and fail once it was taken, release that leaves the next holder free at once, a damaged
object treated as free; the background renewal of ``hold``; ``spectralmc store gc --yes``
refusing on one line while another holder has the model's GC lease.

Expiry is tested with a clock the test moves (the lease reads the time from ``clock``):
the store, its conditional writes and the lease logic are the real ones."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import Backend
from store_util import tiny_files

from spectralmc_server.store.lease import LEASE_FORMAT, Lease, LeaseHeldError, LeaseLostError
from spectralmc_server.store.objects import MAX_PAGE, Blob, LocalObjectStore, ObjectStore, Page
from spectralmc_server.store.versions import VersionStore

KEY = "models/m/leases/gc.json"


class Clock:
    """Unix time that moves only when the test says."""

    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def lease(store: ObjectStore, holder: str, clock: Clock, ttl: float = 10.0) -> Lease:
    return Lease(store, KEY, holder, ttl, what="store GC of model 'm'", clock=clock)


async def test_one_holder_among_racers(backend: Backend) -> None:
    """Five contenders at once, twice (the first round creates the object, the second
    takes over a released one): exactly one wins each round, every loser is told who
    holds it and until when. (SeaweedFS answers some contended If-Match writes after a
    second: more rounds would only make this slower.)"""
    clock = Clock()
    async with backend.open() as store:
        for round_ in range(2):
            racers = [lease(store, f"racer-{round_}-{k}", clock) for k in range(5)]
            results = await asyncio.gather(*(r.acquire() for r in racers), return_exceptions=True)
            winners = [r for r, out in zip(racers, results, strict=True) if not isinstance(out, BaseException)]
            assert len(winners) == 1, results
            losses = [out for out in results if isinstance(out, BaseException)]
            assert all(isinstance(e, LeaseHeldError) for e in losses), losses
            for e in losses:
                assert isinstance(e, LeaseHeldError)
                assert e.holder == winners[0].holder and e.expires == clock.t + 10.0
                assert f"held by {winners[0].holder!r} until" in str(e)
            stored = await winners[0].read()
            assert stored is not None and stored.holder == winners[0].holder and stored.live(clock.t)
            await winners[0].release()
            clock.t += 1.0


async def test_expiry_takeover_renew_and_release(backend: Backend) -> None:
    clock = Clock()
    async with backend.open() as store:
        a, b = lease(store, "a", clock), lease(store, "b", clock)
        first = await a.acquire()
        assert (first.acquired, first.expires, first.released) == (clock.t, clock.t + 10.0, False)

        clock.t += 8.0
        renewed = await a.renew()  # a renewal moves the expiry on from now
        assert renewed.expires == clock.t + 10.0 and renewed.acquired == first.acquired
        clock.t += 9.0  # past the first expiry, within the renewed one
        with pytest.raises(LeaseHeldError, match="held by 'a'"):
            await b.acquire()

        clock.t += 2.0  # a stopped renewing (a crash): the lease expired, b takes it over
        taken = await b.acquire()
        assert taken.holder == "b"
        with pytest.raises(LeaseLostError):
            await a.renew()  # a learns it lost the lease; b's lease is untouched
        with pytest.raises(LeaseLostError):
            await a.release()
        stored = await b.read()
        assert stored is not None and stored.holder == "b" and stored.live(clock.t)

        await b.release(last_round=42.0)  # released: free at once, long before its expiry
        stored = await b.read()
        assert stored is not None and stored.released and not stored.live(clock.t)
        again = await a.acquire()
        assert again.holder == "a" and again.last_round == 42.0  # the note is carried to the next holder
        with pytest.raises(RuntimeError, match="already holds"):
            await a.acquire()


async def test_a_damaged_lease_is_free(backend: Backend) -> None:
    clock = Clock()
    async with backend.open() as store:
        await store.put_if_absent(KEY, b"not a lease")
        state = await lease(store, "a", clock).acquire()
        blob = await store.get(KEY)
        assert blob is not None and orjson.loads(blob.data)["format"] == LEASE_FORMAT
        assert state.holder == "a"


async def test_hold_renews_in_the_background_and_releases(backend: Backend) -> None:
    """hold(): a body that runs past the TTL keeps the lease (renewed every TTL/3), and
    the lease is free again the moment the body ends, also when it raises."""
    async with backend.open() as store:
        holder = Lease(store, KEY, "long job", 0.3)
        other = Lease(store, KEY, "other", 0.3)
        async with holder.hold() as holding:
            await asyncio.sleep(0.8)  # 2.7 TTLs
            with pytest.raises(LeaseHeldError, match="long job"):
                await other.acquire()
            assert not holding.lost
        await other.acquire()
        await other.release()

        with pytest.raises(ZeroDivisionError):
            async with holder.hold():
                _ = 1 / 0
        stored = await other.read()
        assert stored is not None and stored.released and stored.holder == "long job"


class LostReplies:
    """The store, except that the next ``lose`` conditional replacements land and then
    raise ``error`` instead of answering: the write happened, its etag never arrived (a
    client timeout, or a renewal cancelled in flight)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.description = f"{store.description} (losing answers)"
        self.lose = 0
        self.error: BaseException = TimeoutError("the store's answer was lost")
        self.lost = 0

    async def get(self, key: str) -> Blob | None:
        return await self.store.get(key)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        return await self.store.put_if_absent(key, data)

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        out = await self.store.put_if_match(key, data, etag)
        if self.lose:
            self.lose -= 1
            self.lost += 1
            raise self.error
        return out

    async def list(self, prefix: str, start_after: str | None = None, limit: int = MAX_PAGE) -> Page:
        return await self.store.list(prefix, start_after, limit)

    async def delete(self, key: str) -> None:
        await self.store.delete(key)

    async def close(self) -> None:
        await self.store.close()


async def test_a_write_whose_answer_was_lost_keeps_the_lease(backend: Backend) -> None:
    """A renewal or release of ours that landed without its answer leaves the etag we
    know stale; the lease is still ours, so the next renewal and the release re-read it
    and go on: no false 'lost', and the lease is free when released (not held until it
    expires, which would make other replicas skip their GC rounds)."""
    clock = Clock()
    async with backend.open() as raw:
        store = LostReplies(raw)
        a, b = lease(store, "a", clock), lease(store, "b", clock)
        first = await a.acquire()
        store.lose = 1
        clock.t += 1.0
        with pytest.raises(TimeoutError):
            await a.renew()
        assert store.lost == 1
        clock.t += 1.0
        renewed = await a.renew()  # on the stale etag: refused, re-read, still ours
        assert renewed.acquired == first.acquired and renewed.expires == clock.t + 10.0
        await a.release(last_round=7.0)
        stored = await a.read()
        assert stored is not None and stored.released and stored.last_round == 7.0
        again = await b.acquire()  # free at once
        assert again.holder == "b" and again.last_round == 7.0

        store.lose = 1  # b's release lands, its answer is lost; b's retry finds it done
        with pytest.raises(TimeoutError):
            await b.release()
        b.state = again  # as if that release had never been tried: the retry
        await b.release()
        stored = await b.read()
        assert stored is not None and stored.released and stored.holder == "b"

        # another holder's lease is never taken for ours: same holder name, later acquisition
        await a.acquire()
        stale = a.state
        await a.release()
        clock.t += 1.0
        await lease(store, "a", clock).acquire()
        a.state = stale
        with pytest.raises(LeaseLostError):
            await a.renew()


async def test_hold_releases_after_a_renewal_cancelled_in_flight(backend: Backend) -> None:
    """``hold`` cancels its renewer when the body ends; a renewal that had landed without
    its answer must not stop the release (the lease would stay held to its expiry)."""
    async with backend.open() as raw:
        store = LostReplies(raw)
        holder = Lease(store, KEY, "job", 0.3)
        store.lose, store.error = 1, asyncio.CancelledError()
        async with holder.hold() as holding:
            await asyncio.sleep(0.2)  # the first renewal (at 0.1 s) lands, its answer is lost
            assert store.lost == 1 and not holding.lost
        stored = await holder.read()
        assert stored is not None and stored.released and stored.holder == "job"


def test_cli_gc_refuses_while_the_lease_is_held(tmp_path: Path) -> None:
    """``spectralmc store gc --yes`` while another holder has the model's GC lease: one
    line naming the holder and its expiry, exit 2, nothing deleted; a dry run still
    answers. After the lease is released the same command collects."""
    root = tmp_path / "store"
    uri = root.as_uri()

    async def setup() -> Lease:
        store = LocalObjectStore(root)
        vs = VersionStore(store, "m")
        for tag in range(3):
            await vs.commit_files(tiny_files(tag), f"v{tag}")
        held = vs.gc_lease("trainer-7 maintenance", 60.0)
        await held.acquire()
        return held

    held = asyncio.run(setup())
    env = {**os.environ, "USER": "alice"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "spectralmc_server.cli", "store", "--store", uri, "--model", "m", "gc", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)

    t0 = time.time()
    refused = cli("--keep", "1", "--yes")
    assert refused.returncode == 2, refused
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and refused.stdout == "", refused
    assert "store GC of model 'm' is running elsewhere" in lines[0]
    assert "held by 'trainer-7 maintenance' until" in lines[0] and "nothing deleted" in lines[0]
    assert not (root / "models" / "m" / "gc").exists()  # no version was collected

    dry = cli("--keep", "1", "--dry-run", "--json")  # writes nothing: needs no lease
    assert dry.returncode == 0 and orjson.loads(dry.stdout)["collected_versions"] == [1, 2], dry

    asyncio.run(held.release())
    done = cli("--keep", "1", "--yes", "--json")
    assert done.returncode == 0 and orjson.loads(done.stdout)["collected_versions"] == [1, 2], done
    stored = asyncio.run(held.read())
    assert stored is not None and stored.released and stored.holder.startswith("spectralmc store gc by alice on ")
    assert stored.acquired >= t0
