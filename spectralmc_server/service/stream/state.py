"""The stream hub's state and its triggers (called on the loop; none of them blocks)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import orjson

from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.pricing.schemas import (
    Contract,
)
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.service.stream.connection import Connection, InflightBudget, Interned, Price, Subscription
from spectralmc_server.settings import StreamSettings


class HubState:
    """Every stream connection, the triggers that requote them, and topic publishing."""

    def __init__(
        self,
        settings: StreamSettings,
        metrics: Metrics,
        price: Price,
        market: MarketData,
        poll_seconds: float,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.price = price
        self.market = market
        self.poll_seconds = poll_seconds
        self.connections: set[Connection] = set()
        self.topics: dict[str, dict[str, Any]] = {}  # topic -> last published body
        self._namespaces: dict[str, str] = {}  # namespace -> pending reason
        self._all: str | None = None  # pending reason for every subscription (model change)
        self._due: dict[tuple[int, str], tuple[Connection, Subscription, str]] = {}
        self._wake = asyncio.Event()
        self._seen: dict[str, tuple[datetime, datetime]] = {}  # namespace -> latest key seen
        self._trigger_time: float | None = None
        self.declared: set[str] = set()  # topics the price jobs publish
        self._interned: dict[bytes, Interned] = {}  # the distinct contracts of live subscriptions
        self._next_id = 0
        self._budget = InflightBudget(settings.max_inflight_requests, settings.max_inflight_contracts)
        self.queue_requests = 0  # requests the hub submitted to the queue (each retry counted)
        # (measures, quantile levels, by reference) -> distinct contracts per merged request,
        # for a measure set whose merged request missed its deadline
        self._caps: dict[tuple[tuple[str, ...], tuple[float, ...] | None, bool], int] = {}
        self.overload_retries = 0  # of which retries after an 'overloaded' refusal

    # -- triggers (called on the loop; none of them blocks) --------------------------------

    def _trigger(self) -> None:
        if self._trigger_time is None:
            self._trigger_time = time.perf_counter()
        self._wake.set()

    def snapshot_stored(self, record: SnapshotRecord) -> None:
        seen = self._seen.get(record.namespace)
        if seen is None or record.sort_key() > seen:
            self._seen[record.namespace] = record.sort_key()
        self._namespaces[record.namespace] = "snapshot"
        self._trigger()

    def models_changed(self, _model: str, _version: int) -> None:
        self._all = "model"
        self._trigger()

    def due(self, conn: Connection, sub: Subscription, reason: str) -> None:
        self._due[(id(conn), sub.id)] = (conn, sub, reason)
        self._trigger()

    @property
    def subscriptions(self) -> int:
        return sum(len(c.subs) for c in self.connections)

    @property
    def distinct_contracts(self) -> int:
        """Distinct contract terms held by live subscriptions (each priced once per round)."""
        return len(self._interned)

    def declare_topic(self, topic: str) -> None:
        """A price job publishes ``topic``: subscriptions to it are accepted."""
        self.declared.add(topic)

    @property
    def known_topics(self) -> set[str]:
        return self.declared | self.topics.keys()

    def _intern(self, contract: Contract) -> Interned:
        key = orjson.dumps(contract.model_dump(mode="json", exclude={"id"}), option=orjson.OPT_SORT_KEYS)
        entry = self._interned.get(key)
        if entry is None:
            self._next_id += 1
            entry = self._interned[key] = Interned(key, contract.model_copy(update={"id": f"k{self._next_id}"}))
        entry.refs += 1
        return entry

    def _release(self, sub: Subscription) -> None:
        for entry in sub.entries:
            entry.refs -= 1
            if entry.refs == 0 and self._interned.get(entry.key) is entry:
                del self._interned[entry.key]
