"""A market-data writer that stops between its record and the latest ref, to be SIGKILLed
there: ``python snapshot_writer.py SPEC_JSON``.

SPEC_JSON: ``{"store": {"kind": "local", "root": ...} | {"kind": "s3", "bucket", "prefix",
"endpoint_url", "region", "access_key_id", "secret_access_key"}, "namespace",
"val_datetime", "data_asof", "snapshot"}``. The child puts the snapshot through
:class:`SnapshotStore` (content, then the record); when the store is about to move
refs/latest it prints ``RECORD WRITTEN`` and waits to be killed, so the test kills it
exactly at that point every time. Only the store is imported (no torch): it starts fast.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord, SnapshotStore
from spectralmc_server.rfc3339 import parse_datetime
from spectralmc_server.store.objects import LocalObjectStore, ObjectStore
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings

READY = "RECORD WRITTEN"
WAIT_SECONDS = 60.0  # the test kills the writer long before this


async def stop_before_the_ref(self: SnapshotStore, namespace: str, record: SnapshotRecord) -> bool:
    print(READY, flush=True)
    await asyncio.sleep(WAIT_SECONDS)
    raise SystemExit("the writer was not killed")


async def write(spec: dict[str, Any]) -> None:
    where = spec["store"]
    objects: ObjectStore
    if where["kind"] == "local":
        objects = LocalObjectStore(where["root"])
    else:
        settings = S3Settings(
            endpoint_url=where["endpoint_url"],
            region=where["region"],
            access_key_id=where["access_key_id"],
            secret_access_key=where["secret_access_key"],
        )
        objects = await S3ObjectStore(where["bucket"], where["prefix"], settings).open()
    SnapshotStore._advance_latest = stop_before_the_ref  # type: ignore[method-assign]
    store = SnapshotStore(objects)
    await store.put(
        spec["namespace"],
        parse_datetime(spec["val_datetime"]),
        parse_datetime(spec["data_asof"]),
        MarketSnapshot.model_validate(spec["snapshot"]),
    )


if __name__ == "__main__":
    asyncio.run(write(orjson.loads(sys.argv[1])))
