"""A conditional write that lands while its answer is lost, on a real S3 server.

The S3 backend retries a dropped connection (store/s3.py). When the dropped attempt had
already landed, the retry finds its own write and the store answers 412: a failed
precondition that is no lost race. Every conditional writer must tell the two apart:

- a commit must not append its version twice (store/chain.py), nor report a conflict
  with itself;
- a ref moved by compare-and-swap reports it moved it (store/cas.py);
- a lease taken, renewed or released that way is still this holder's (store/lease.py),
  so it is released at once rather than held to its expiry;
- a market-data snapshot stored that way was created by this PUT (marketdata/store.py),
  so the server tells its streams about it.

The answers are lost by a TCP proxy on loopback between the client and SeaweedFS: it
forwards a chosen PUT and drops the connection when the server's answer comes back,
so the server, the client and its retries are all the real ones."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from marketdata_util import snapshot
from store_util import tiny_files

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotStore
from spectralmc_server.store.cas import advance_ref
from spectralmc_server.store.lease import Lease
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import VersionStore


class AnswerDropper:
    """A loopback TCP proxy to ``upstream`` that drops the answer to the next ``drops``
    PUT requests whose request line names ``target`` (a substring of the path): the
    request reaches the server whole (an interim 100 Continue is passed on), then the
    connection is closed instead of the final answer being forwarded."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.target = ""
        self.drops = 0
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def arm(self, target: str, drops: int = 1) -> None:
        self.target, self.drops = target, drops

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        me.add_done_callback(self._handlers.discard)
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        doomed = asyncio.Event()  # the request in flight is one whose answer is dropped

        async def requests() -> None:
            while data := await reader.read(65536):
                first = data.split(b"\r\n", 1)[0]
                if self.drops and first.startswith(b"PUT ") and self.target.encode() in first:
                    self.drops -= 1
                    doomed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def answers() -> None:
            while data := await up_reader.read(65536):
                if doomed.is_set():
                    if data.startswith(b"HTTP/1.1 100 "):  # "send the body" (Expect: 100-continue)
                        interim, _, data = data.partition(b"\r\n\r\n")
                        writer.write(interim + b"\r\n\r\n")
                        await writer.drain()
                    if data:  # the final answer: the server has done the write, its answer is lost
                        self.dropped += 1
                        return
                    continue
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(answers())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            up_writer.close()


@contextlib.asynccontextmanager
async def proxied_store(
    s3_settings: S3Settings, make_bucket: Callable[[], str]
) -> AsyncIterator[tuple[S3ObjectStore, AnswerDropper]]:
    assert s3_settings.endpoint_url is not None
    host, port = s3_settings.endpoint_url.removeprefix("http://").split(":")
    proxy = AnswerDropper(host, int(port))
    await proxy.start()
    settings = dataclasses.replace(s3_settings, endpoint_url=f"http://127.0.0.1:{proxy.port}")
    try:
        async with S3ObjectStore(make_bucket(), "lost", settings) as store:
            yield store, proxy
    finally:
        await proxy.close()


async def test_a_commit_whose_answer_was_lost_appends_once(
    s3_settings: S3Settings, make_bucket: Callable[[], str]
) -> None:
    async with proxied_store(s3_settings, make_bucket) as (store, proxy):
        vs = VersionStore(store, "m")
        assert (await vs.commit_files(tiny_files(1), "v1")).version == 1
        for rebase in (False, True):  # a plain commit and one that rebases on a lost race
            version = 2 + rebase
            proxy.arm(f"/records/{version:012d}.json")
            stored = await vs.commit_files(tiny_files(version), f"v{version}", rebase=rebase)
            assert proxy.dropped == version - 1  # the answer was lost (and the write retried)
            assert stored.version == version  # not a conflict with itself, not appended again
            assert [v.version for v in await vs.versions()] == list(range(1, version + 1))
            head = await vs.head()
            assert head is not None and head.version == version


async def test_a_ref_moved_with_its_answer_lost_reports_it_moved(
    s3_settings: S3Settings, make_bucket: Callable[[], str]
) -> None:
    async with proxied_store(s3_settings, make_bucket) as (store, proxy):
        await store.put_if_absent("refs/head", b"1")
        asked: list[bytes | None] = []

        def update(current: bytes | None) -> bytes | None:
            asked.append(current)
            return b"2"

        proxy.arm("refs/head")
        assert await advance_ref(store, "refs/head", update) is True
        assert proxy.dropped == 1 and asked == [b"1"]  # done on the first read: no lost race retried
        blob = await store.get("refs/head")
        assert blob is not None and blob.data == b"2"


async def test_a_lease_taken_renewed_and_released_with_answers_lost_stays_ours(
    s3_settings: S3Settings, make_bucket: Callable[[], str]
) -> None:
    async with proxied_store(s3_settings, make_bucket) as (store, proxy):
        key = "models/m/leases/gc.json"
        mine, other = Lease(store, key, "mine", 60.0), Lease(store, key, "other", 60.0)
        proxy.arm("leases/gc.json")
        acquired = await mine.acquire()  # created; the answer lost: ours, not held by "another"
        assert proxy.dropped == 1 and acquired.holder == "mine"
        proxy.arm("leases/gc.json")
        renewed = await mine.renew()
        assert proxy.dropped == 2 and renewed.acquired == acquired.acquired
        proxy.arm("leases/gc.json")
        await mine.release(last_round=3.0)
        assert proxy.dropped == 3
        stored = await other.read()
        assert stored is not None and stored.released and stored.holder == "mine" and stored.last_round == 3.0
        assert (await other.acquire()).last_round == 3.0  # free at once, not at its expiry


async def test_a_snapshot_put_with_its_answer_lost_is_created(
    s3_settings: S3Settings, make_bucket: Callable[[], str]
) -> None:
    """The record's own bytes found on the re-read: created (so the server tells its
    listeners, the streams, which a repeat PUT does not), and refs/latest moved."""
    async with proxied_store(s3_settings, make_bucket) as (store, proxy):
        snapshots = SnapshotStore(store)
        vdt, asof = datetime(2026, 11, 26, 16, tzinfo=UTC), datetime(2026, 11, 26, 16, 0, 5, tzinfo=UTC)
        body = MarketSnapshot.model_validate(snapshot())
        proxy.arm("/snapshots/")
        record, created = await snapshots.put("ns", vdt, asof, body)
        assert proxy.dropped == 1 and created
        assert (await snapshots.latest("ns")) == record
        again, created = await snapshots.put("ns", vdt, asof, body)  # a repeat: not created
        assert not created and again == record
