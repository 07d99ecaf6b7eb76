"""Market data in the service: snapshot puts (listeners notified) and resolution for
pricing (one per key per batch, loaded snapshots cached by hash, counted). Turning
contracts by reference into explicit ones is the pricing use case's
(:mod:`spectralmc_server.pricing.resolve`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotConflictError, SnapshotRecord, SnapshotStore, iso
from spectralmc_server.service.errors import NoMarketData
from spectralmc_server.service.metrics import Metrics

Listener = Callable[[SnapshotRecord], None]


class MarketData:
    """The snapshot store as the service uses it: puts notify listeners (streams),
    resolutions are counted."""

    def __init__(self, store: SnapshotStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.listeners: list[Listener] = []

    async def put(
        self,
        namespace: str,
        val_datetime: datetime,
        data_asof: datetime,
        snapshot: MarketSnapshot,
        lineage: dict[str, Any] | None = None,
    ) -> tuple[SnapshotRecord, bool]:
        try:
            record, created = await self.store.put(namespace, val_datetime, data_asof, snapshot, lineage)
        except SnapshotConflictError:
            self.metrics.snapshots_put.labels("conflict").inc()
            raise
        self.metrics.snapshots_put.labels("created" if created else "idempotent").inc()
        if created:
            for listener in list(self.listeners):
                listener(record)
        return record, created

    async def load(self, record: SnapshotRecord) -> MarketSnapshot:
        hits = self.store.cache_hits
        snapshot = await self.store.load(record)
        self.metrics.snapshot_cache.labels("hit" if self.store.cache_hits > hits else "miss").inc()
        return snapshot

    async def resolve(
        self, namespace: str, val_datetime: datetime, asof: datetime | None
    ) -> tuple[SnapshotRecord, MarketSnapshot]:
        """The snapshot a pricing request names, or 422 saying that there is none."""
        record = await self.store.resolve(namespace, val_datetime, asof)
        if record is None:
            self.metrics.snapshot_resolutions.labels("missing").inc()
            when = "latest" if asof is None else iso(asof)
            raise NoMarketData(
                f"no market-data snapshot for {namespace}/{iso(val_datetime)} as of {when}",
                details=[{"field": "data_asof" if asof is not None else "val_datetime", "reason": "no snapshot"}],
            )
        self.metrics.snapshot_resolutions.labels("found").inc()
        return record, await self.load(record)
