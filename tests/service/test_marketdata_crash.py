"""Market data after crashes, over HTTP on a local store, and the time format of the
market-data routes: a writer that stopped between its record and the latest ref is
finished by the client's repeated PUT (200 ``created: false``) and by the next server
start; orphaned ``.part`` files of killed writers are removed at start (a recent one,
which may belong to a live writer in another process, is kept); times in paths,
queries and bodies are RFC 3339 only, so Unix seconds and lenient ISO 8601 spellings
are a 422 naming the field. (The same repair against a real S3 server, with a writer
process SIGKILLed between record and ref: tests/store/test_snapshot_repair.py.)"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from marketdata_util import ASOF, VDT, by_reference, snapshot
from server_util import MakeClient, assert_error

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord, SnapshotStore
from spectralmc_server.rfc3339 import parse_datetime
from spectralmc_server.service.stream import Subscribe
from spectralmc_server.store.objects import ORPHAN_TEMP_SECONDS, LocalObjectStore

ASOF2 = "2026-11-26T16:30:00Z"
APP_LOG = "spectralmc_server.service.app"


class RecordOnly(SnapshotStore):
    """A writer that stops after its record (as one killed there would): no ref move."""

    async def _advance_latest(self, namespace: str, record: SnapshotRecord) -> bool:
        return False


def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "store"  # where settings_for's server keeps its local store


async def stop_after_record(tmp_path: Path, namespace: str, vdt: str, asof: str, body: dict[str, Any]) -> None:
    objects = LocalObjectStore(store_dir(tmp_path))
    await RecordOnly(objects).put(namespace, parse_datetime(vdt), parse_datetime(asof), MarketSnapshot(**body))


async def latest_asof(client: Any, namespace: str = "default") -> str:
    r = await client.get(f"/v1/marketdata/{namespace}/latest")
    assert r.status == 200, await r.text()
    asof: str = (await r.json())["data_asof"]
    return asof


# --- the latest ref after a writer stopped ----------------------------------------------------


async def test_repeated_put_repairs_latest(make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client()
    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot(100.0))
    assert r.status == 201, await r.text()
    await stop_after_record(tmp_path, "default", VDT, ASOF2, snapshot(101.0))
    assert await latest_asof(client) == ASOF  # the premise: the ref is behind a stored snapshot

    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF2}", json=snapshot(101.0))
    assert r.status == 200, await r.text()
    assert (await r.json())["created"] is False
    assert await latest_asof(client) == ASOF2
    r = await client.get(f"/v1/marketdata/default/{VDT}")
    assert (await r.json())["data"]["spots"]["SPX"] == 101.0


async def test_server_start_repairs_latest(
    make_client: MakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = await make_client()
    assert (await first.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot(100.0))).status == 201
    await stop_after_record(tmp_path, "default", VDT, ASOF2, snapshot(101.0))
    assert await latest_asof(first) == ASOF
    await first.close()

    caplog.set_level(logging.INFO, logger=APP_LOG)
    second = await make_client()  # a restart on the same store
    assert await latest_asof(second) == ASOF2
    assert any("refs/latest was behind" in rec.getMessage() for rec in caplog.records if rec.name == APP_LOG)


# --- orphaned temporary files ------------------------------------------------------------------


async def test_start_removes_old_part_files_and_keeps_recent_ones(
    make_client: MakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp = store_dir(tmp_path) / ".tmp"
    tmp.mkdir(parents=True)
    old = [tmp / "0123456789abcdef0123456789abcdef.part", tmp / "fedcba9876543210fedcba9876543210.part"]
    for p in old:
        p.write_bytes(b"half a blob")
        stamp = time.time() - ORPHAN_TEMP_SECONDS - 60
        os.utime(p, (stamp, stamp))
    recent = tmp / "00000000000000000000000000000000.part"  # as a live writer elsewhere would have it
    recent.write_bytes(b"being written")
    stamp = time.time() - ORPHAN_TEMP_SECONDS / 2
    os.utime(recent, (stamp, stamp))
    other = tmp / "notes.txt"  # not a temporary file of the store
    other.write_bytes(b"x")
    os.utime(other, (0, 0))

    caplog.set_level(logging.INFO, logger=APP_LOG)
    client = await make_client()
    assert not any(p.exists() for p in old)
    assert recent.read_bytes() == b"being written"
    assert other.exists()
    messages = [rec.getMessage() for rec in caplog.records if rec.name == APP_LOG]
    assert any("removed 2 orphaned temporary file(s)" in m for m in messages), messages
    r = await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot())  # the store still writes
    assert r.status == 201, await r.text()
    assert recent.exists()


# --- RFC 3339 only ---------------------------------------------------------------------------

NOT_RFC3339 = [
    "1700000000",  # Unix seconds
    "0",
    "-1",
    "1700000000.5",
    "2026-11-26",  # a date alone
    "2026-11-26T16:00:00",  # no zone
    "2026-11-26T16:00Z",  # no seconds
    "2026-11-26 16:00:00Z",  # a space for T
    "20261126T160000Z",  # ISO 8601 basic format
    "2026-11-26T16:00:00+0100",  # offset without its colon
    "2026-11-26T16:00:00+01",
    "2026-11-26T16:00:00.1234567Z",  # finer than the store's microseconds
    "2026-13-01T00:00:00Z",  # no such month
    "2026-11-26T16:00:00+24:00",
    "yesterday",
]


def _routes(bad: str) -> list[tuple[str, str, dict[str, str] | None, str]]:
    """(method, path, query, field) for every market-data route that takes a time."""
    seg = quote(bad, safe=":+")
    return [
        ("PUT", f"/v1/marketdata/default/{seg}/{ASOF}", None, "path.val_datetime"),
        ("PUT", f"/v1/marketdata/default/{VDT}/{seg}", None, "path.data_asof"),
        ("GET", f"/v1/marketdata/default/{seg}", None, "path.val_datetime"),
        ("GET", f"/v1/marketdata/default/{VDT}", {"asof": bad}, "query.asof"),
        ("GET", "/v1/marketdata/default", {"val_datetime": bad}, "query.val_datetime"),
    ]


async def test_route_times_are_rfc3339_only(make_client: MakeClient) -> None:
    client = await make_client()
    assert (await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot())).status == 201
    for bad in NOT_RFC3339:
        for method, path, query, field in _routes(bad):
            r = await client.request(method, path, params=query, json=snapshot() if method == "PUT" else None)
            err = await assert_error(r, 422, "invalid", (field,))
            assert "RFC 3339" in err["message"], (bad, path, err)
            reason = next(d["reason"] for d in err["details"] if d["field"] == field)
            assert "RFC 3339" in reason and repr(bad) in reason, (bad, path, reason)
    r = await client.get("/v1/marketdata/default", params={"val_datetime": VDT})
    assert [k["data_asof"] for k in (await r.json())["snapshots"]] == [ASOF]  # nothing else was stored


@pytest.mark.parametrize(
    ("vdt", "asof", "stored"),
    [
        ("2026-11-26t16:00:00z", "2026-11-26t16:00:05.5z", ("2026-11-26T16:00:00Z", "2026-11-26T16:00:05.500000Z")),
        ("2026-11-26T11:00:00-05:00", "2026-11-26T17:00:05+01:00", (VDT, ASOF)),
        ("2026-11-26T16:00:00.000000Z", "2026-11-26T16:00:05+00:00", (VDT, ASOF)),
    ],
)
async def test_every_rfc3339_spelling_is_accepted(
    make_client: MakeClient, vdt: str, asof: str, stored: tuple[str, str]
) -> None:
    client = await make_client()
    r = await client.put(f"/v1/marketdata/default/{quote(vdt, safe=':+')}/{quote(asof, safe=':+')}", json=snapshot())
    assert r.status == 201, await r.text()
    got = await r.json()
    assert (got["val_datetime"], got["data_asof"]) == stored
    r = await client.get(f"/v1/marketdata/default/{quote(vdt, safe=':+')}", params={"asof": asof})
    assert r.status == 200, await r.text()


async def test_body_times_are_rfc3339_only(make_client: MakeClient) -> None:
    client = await make_client()
    assert (await client.put(f"/v1/marketdata/default/{VDT}/{ASOF}", json=snapshot())).status == 201
    for bad in [1700000000, "1700000000", 0, "0", -1, "2026-11-26T16:00:00", "2026-11-26 16:00:00Z"]:
        for field in ("val_datetime", "data_asof"):
            body = {"val_datetime": VDT, "data_asof": ASOF, "contracts": [by_reference()], field: bad}
            err = await assert_error(await client.post("/v1/price", json=body), 422, "invalid", (field,))
            reason = next(d["reason"] for d in err["details"] if d["field"] == field)
            assert "RFC 3339" in reason, reason
        body = {"val_datetime": bad, "underlying": "SPX"}
        await assert_error(await client.post("/v1/calibrate", json=body), 422, "invalid", ("val_datetime",))
        with pytest.raises(ValueError, match="RFC 3339"):
            Subscribe.model_validate({"op": "subscribe", "id": "s", "val_datetime": bad, "topic": "t"})
    for bad_date in [0, 1700000000, "1700000000", "2027-06-18T00:00:00Z", "20270618"]:
        body = {"val_datetime": VDT, "contracts": [{**by_reference(), "expiry": bad_date}]}
        err = await assert_error(await client.post("/v1/price", json=body), 422, "invalid", ("contracts[0].expiry",))
        assert "RFC 3339 full-date" in err["details"][0]["reason"], err
        snap = {**snapshot(), "fixings": {"SPX": [{"date": bad_date, "value": 100.0}]}}
        r = await client.put(f"/v1/marketdata/default/{VDT}/2026-11-26T16:00:09Z", json=snap)
        await assert_error(r, 422, "invalid", ("fixings.SPX[0].date",))
    # the same requests with RFC 3339 times are fine
    body = {"val_datetime": "2026-11-26T11:00:00-05:00", "data_asof": ASOF, "contracts": [by_reference()]}
    r = await client.post("/v1/price", json=body)
    assert r.status == 200, await r.text()
