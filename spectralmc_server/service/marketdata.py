"""Market data in the service: resolution for pricing (one per key per batch, loaded
snapshots cached by hash) and turning contracts by reference into explicit ones."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from spectralmc_server.engine.processes import get_process
from spectralmc_server.marketdata.inputs import MissingMarketData, contract_inputs
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotConflict, SnapshotRecord, SnapshotStore, iso
from spectralmc_server.service.errors import NoMarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.service.schemas import Contract, PriceRequest, format_validation_error
from spectralmc_server.service.valuation import RequestError

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
        except SnapshotConflict:
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


def needs_market_data(request: PriceRequest) -> bool:
    return any(not c.is_explicit for c in request.contracts)


def explicit_request(request: PriceRequest, record: SnapshotRecord, snapshot: MarketSnapshot) -> PriceRequest:
    """``request`` with every contract by reference given its explicit inputs from the
    snapshot; a missing object raises RequestError naming it and the contract."""
    where = f"{record.namespace}/{iso(record.val_datetime)} as of {iso(record.data_asof)}"
    contracts: list[Contract] = []
    for i, c in enumerate(request.contracts):
        if c.is_explicit:
            contracts.append(c)
            continue
        assert c.underlying is not None and c.expiry is not None  # the schema guarantees both
        names = get_process(c.process).market_param_names
        try:
            got = contract_inputs(
                snapshot,
                where,
                underlying=c.underlying,
                expiry=c.expiry,
                strike=c.strike,
                process=c.process,
                param_names=names,
                val_datetime=record.val_datetime,
            )
            explicit = Contract(
                id=c.id,
                right=c.right,
                strike=c.strike,
                spot=got.spot,
                expiry_years=got.expiry_years,
                rate=got.rate,
                dividend=got.dividend,
                process=c.process,
                vol=got.params["vol"] if names == ("vol",) else None,
                params=None if names == ("vol",) else got.params,
                fixings=c.fixings,
            )
        except MissingMarketData as exc:
            raise RequestError(f"contracts[{i}]", str(exc)) from None
        except ValidationError as exc:
            reason = "; ".join(f"{d['field']}: {d['reason']}" for d in format_validation_error(exc))
            raise RequestError(
                f"contracts[{i}]", f"the inputs resolved from {where} are out of range: {reason}"
            ) from None
        contracts.append(explicit)
    return request.model_copy(update={"contracts": contracts})
