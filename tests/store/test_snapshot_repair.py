"""The market-data latest ref after a writer dies between its record and the ref, once
per backend (a local directory and a real SeaweedFS S3 server): a writer process is
SIGKILLed exactly there, then a repeated PUT repairs the ref, and so does a server
starting on the store; two stores repairing (and a writer putting) at once converge on
the greatest record without error; the ref never moves backwards; the namespace walk
finds every namespace once, whatever its name sorts next to."""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from conftest import Backend
from server_util import settings_for
from snapshot_writer import READY

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord, SnapshotStore, iso
from spectralmc_server.service.app import create_app
from spectralmc_server.service.metrics import Metrics

NS = "desk"
VDT = datetime(2026, 11, 26, 16, 0, tzinfo=UTC)
WRITER = Path(__file__).with_name("snapshot_writer.py")
READY_TIMEOUT_SECONDS = 30.0


def at(seconds: float) -> datetime:
    return VDT + timedelta(seconds=seconds)


def body(spot: float) -> dict[str, Any]:
    return {"spots": {"SPX": spot}, "yield_curves": {"USD": {"pillars": [{"years": 1.0, "zero_rate": 0.03}]}}}


def snap(spot: float) -> MarketSnapshot:
    return MarketSnapshot.model_validate(body(spot))


def where(backend: Backend, name: str) -> dict[str, Any]:
    """The store ``name`` of ``backend`` as the writer process opens it."""
    location, prefix = backend.location(name)
    if backend.s3_settings is None:
        return {"kind": "local", "root": location}
    s = backend.s3_settings
    return {
        "kind": "s3",
        "bucket": location,
        "prefix": prefix,
        "endpoint_url": s.endpoint_url,
        "region": s.region,
        "access_key_id": s.access_key_id,
        "secret_access_key": s.secret_access_key,
    }


def kill_between_record_and_ref(backend: Backend, name: str, namespace: str, asof: datetime, spot: float) -> None:
    """Run a writer of (namespace, VDT, asof) and SIGKILL it after its record, before the ref."""
    spec = {
        "store": where(backend, name),
        "namespace": namespace,
        "val_datetime": iso(VDT),
        "data_asof": iso(asof),
        "snapshot": body(spot),
    }
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), orjson.dumps(spec).decode()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            line = b""
            while not line.endswith(b"\n") and time.monotonic() < deadline and proc.poll() is None:
                if sel.select(timeout=0.5):
                    line += os.read(proc.stdout.fileno(), 4096)
        assert line.decode().strip() == READY, (line, proc.poll())
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err.decode())


def key_of(record: SnapshotRecord | None) -> tuple[datetime, datetime] | None:
    return None if record is None else (record.val_datetime, record.data_asof)


class RecordOnly(SnapshotStore):
    """A writer that stops after its record: the ref is never moved."""

    async def _advance_latest(self, namespace: str, record: SnapshotRecord) -> bool:
        return False


# --- a killed writer, then a repeated PUT ---------------------------------------------------


async def test_killed_writer_leaves_latest_behind_and_a_repeated_put_repairs_it(backend: Backend) -> None:
    async with backend.open("shared") as objects:
        store = SnapshotStore(objects)
        await store.put(NS, VDT, at(1), snap(101.0))
        kill_between_record_and_ref(backend, "shared", NS, at(2), 102.0)

        # The premise: the record (and its content) are stored, the ref still names at(1).
        stored = await store.record(NS, VDT, at(2))
        assert stored is not None
        assert (await store.load(stored)).spots["SPX"] == 102.0
        assert key_of(await store.latest(NS)) == (VDT, at(1))

        again, created = await store.put(NS, VDT, at(2), snap(102.0))  # the client's retry
        assert not created and again == stored
        assert key_of(await store.latest(NS)) == (VDT, at(2))
        latest = await store.latest(NS)
        assert latest == stored  # the ref holds the stored record itself

        # An idempotent PUT of an older key also finishes a dead writer's later record.
        kill_between_record_and_ref(backend, "shared", NS, at(3), 103.0)
        assert key_of(await store.latest(NS)) == (VDT, at(2))
        await store.put(NS, VDT, at(1), snap(101.0))
        assert key_of(await store.latest(NS)) == (VDT, at(3))


# --- a killed writer, then a server starting on the store -----------------------------------


async def test_server_start_repairs_latest(
    backend: Backend,
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with backend.open("served") as objects:
        store = SnapshotStore(objects)
        await store.put(NS, VDT, at(1), snap(101.0))
        await store.put("fine", VDT, at(1), snap(99.0))
    kill_between_record_and_ref(backend, "served", NS, at(2), 102.0)  # behind a stored snapshot
    kill_between_record_and_ref(backend, "served", "fresh", at(5), 105.0)  # no ref at all

    location, prefix = backend.location("served")
    if backend.s3_settings is None:
        settings = settings_for(tmp_path, store=Path(location).as_uri())
    else:
        s = backend.s3_settings
        s3 = {"endpoint_url": s.endpoint_url, "region": s.region, "access_key_id": s.access_key_id}
        settings = settings_for(
            tmp_path,
            store=f"s3://{location}/{prefix}",
            s3={**s3, "secret_access_key": s.secret_access_key},
        )
    caplog.set_level(logging.INFO, logger="spectralmc_server.service.app")
    client = await aiohttp_client(create_app(settings, Metrics()))

    r = await client.get(f"/v1/marketdata/{NS}/latest")
    assert r.status == 200, await r.text()
    got = await r.json()
    assert (got["data_asof"], got["data"]["spots"]["SPX"]) == (iso(at(2)), 102.0)
    r = await client.get("/v1/marketdata/fresh/latest")
    assert r.status == 200, await r.text()
    assert (await r.json())["data_asof"] == iso(at(5))
    r = await client.get("/v1/marketdata/fine/latest")
    assert (await r.json())["data_asof"] == iso(at(1))

    messages = [rec.getMessage() for rec in caplog.records if rec.name == "spectralmc_server.service.app"]
    moved = [m for m in messages if "refs/latest was behind" in m]
    assert len(moved) == 2, messages
    assert any(f"market data {NS}:" in m and iso(at(2)) in m for m in moved), moved
    assert "market data: checked the latest ref of 3 namespace(s), moved 2" in messages


# --- concurrent repair -----------------------------------------------------------------------


async def test_concurrent_repairs_converge_and_never_move_back(backend: Backend) -> None:
    async with backend.open("shared") as one, backend.open("shared") as two, backend.open("shared") as three:
        writer, stopped = SnapshotStore(three), RecordOnly(three)
        for rnd in range(3):  # each round's keys are later than the last round's
            v = VDT + timedelta(days=rnd)

            def t(seconds: float, v: datetime = v) -> datetime:
                return v + timedelta(seconds=seconds)

            # behind: the ref names (v, +1); stored records go up to (v + 1 h, +2)
            await writer.put("behind", v, t(1), snap(1.0))
            await stopped.put("behind", v, t(3), snap(3.0))
            await stopped.put("behind", t(3600), t(2), snap(2.0))
            await stopped.put("behind", v, t(2), snap(2.0))
            # missing: a record and no ref at all (only in the first round)
            if rnd == 0:
                await stopped.put("missing", v, t(7), snap(7.0))
            # ahead: a stopped writer's record is older than the ref: nothing to do
            await stopped.put("ahead", v, t(4), snap(4.0))
            await writer.put("ahead", v, t(5), snap(5.0))
            assert key_of(await writer.latest("behind")) == (v, t(1))

            stores = [SnapshotStore(one), SnapshotStore(two)]  # two replicas starting together
            reports = await asyncio.gather(
                stores[0].repair(),
                stores[1].repair(),
                stores[0].repair(),
                stores[1].repair(),
                writer.put("behind", v, t(50), snap(50.0)),  # a live writer meanwhile, of an older key
            )
            for report in reports[:4]:
                assert not isinstance(report, tuple)
                assert report.checked == 3 and report.problems == {}, report
                assert "ahead" not in report.moved, report
            assert key_of(await stores[0].latest("behind")) == (t(3600), t(2))
            assert key_of(await stores[1].latest("missing")) == (VDT, at(7))
            assert key_of(await stores[1].latest("ahead")) == (v, t(5))
            again = await stores[0].repair()
            assert again.moved == {} and again.checked == 3


async def test_repair_walks_every_namespace_once(backend: Backend) -> None:
    names = ["NS", "NS-x", "NS.x", "NS0", "NS_x", "NSx", "ns", "a", "z.z"]  # neighbours of "NS/" in byte order
    async with backend.open() as objects:
        writer = RecordOnly(objects)
        for i, ns in enumerate(names):
            await writer.put(ns, VDT, at(i), snap(100.0 + i))
        store = SnapshotStore(objects)
        found = await store.namespaces()  # byte order on a local store, SeaweedFS lists directory by directory
        assert sorted(found) == sorted(names) and len(found) == len(names), found
        report = await store.repair()
        assert report.checked == len(names) and report.problems == {}
        assert {ns: key_of(r) for ns, r in report.moved.items()} == {ns: (VDT, at(i)) for i, ns in enumerate(names)}
        for i, ns in enumerate(names):
            assert key_of(await store.latest(ns)) == (VDT, at(i))
        assert await SnapshotStore(objects).namespaces() == found


async def test_repair_reports_an_unreadable_ref_and_repairs_the_rest(backend: Backend) -> None:
    async with backend.open() as objects:
        store = SnapshotStore(objects)
        await store.put("broken", VDT, at(1), snap(1.0))
        await RecordOnly(objects).put("stale", VDT, at(2), snap(2.0))
        ref = store.latest_key("broken")
        blob = await objects.get(ref)
        assert blob is not None
        await objects.put_if_match(ref, b"not a record", blob.etag)
        report = await store.repair()
        assert set(report.problems) == {"broken"} and "not a snapshot record" in report.problems["broken"]
        assert key_of(report.moved["stale"]) == (VDT, at(2))
