"""The batcher's shared state. The parts build on it in this order, each a class over
the one before: estimates (the wait ahead, admission), choosing (the next job and its
slices), computing (jobs on the engine) and core (the entries and the loop)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque

from spectralmc_server.service.batcher.costs import ClassKey, CostModel
from spectralmc_server.service.batcher.items import FitItem, GroupKey, Item, _Job, _Slice
from spectralmc_server.service.engine import EngineClient
from spectralmc_server.service.marketdata import MarketData
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import QueueSettings

SLOTS = 2  # jobs in flight (the worker runs them in order, so it never waits for the next)
MAX_SLOTS = 8  # ... up to this many while the event loop is slow to hear that one has ended
SHARED_BOOK_MAX = 256  # requests smaller than this share their job's one book (PriceJob.book)
MAX_PRESSURE = 50.0  # the most a job overrunning its estimate scales the queue's by
HICCUP_SECONDS = 0.02  # an overrun shorter than this says nothing
# a job is queued behind a running one only with at least this many contracts (a smaller
# one waits for the running job to end, growing meanwhile): a learned-model job's fixed
# cost is about the work of 400 contracts
PIPELINE_CONTRACTS = 256
FILL_WORTH = 10  # a batch waits max_wait_seconds to fill only when its job is shorter than this many times that


class BatcherState:
    """The queue, the jobs in flight and what is learned from them, shared by the parts."""

    def __init__(
        self,
        settings: QueueSettings,
        engine: EngineClient,
        metrics: Metrics,
        market: MarketData | None = None,
    ) -> None:
        self.settings = settings
        self.market = market
        self.engine = engine
        self.models = engine.models
        engine.lost_listeners.append(self.engine_lost)
        self._ids = itertools.count(1)  # requests' and calibrations' ids at the engine
        self.metrics = metrics
        self.cost = CostModel(metrics)
        self._items: deque[Item] = deque()
        self._contracts = 0  # contracts queued, not yet sent to the worker
        self._queued: Counter[ClassKey] = Counter()  # the same, by cost class
        self._keys: Counter[GroupKey] = Counter()  # queued requests by batch key
        self._fits: set[FitItem] = set()  # queued or running
        self._large: set[Item] = set()  # queued requests of several jobs (or being split), calibrations
        self._wake = asyncio.Event()
        self._jobs: set[_Job] = set()
        self._inflight: set[asyncio.Task[None]] = set()
        self._plans: dict[int, list[_Slice]] = {}  # in flight, by id of their job
        self.closed = False
        self._stopped = False
        self._slots = SLOTS  # jobs kept on the worker (more while the event loop lags)
        self._lag = 0.0  # EWMA: seconds from a job's end on the worker to the loop hearing of it
        self._job_time = 0.01  # EWMA: seconds of a job on the worker
        metrics.queue_estimated_wait.set_function(self.estimated_wait)

    @property
    def depth(self) -> tuple[int, int]:
        """Queued requests (with work not yet sent to the worker) and their contracts."""
        return len(self._items), self._contracts

    # -- defined by Batcher (core.py), called by the parts below it -----------------

    def _pump(self) -> float | None:
        raise NotImplementedError

    def _finished(self, job: _Job) -> None:
        raise NotImplementedError

    def engine_lost(self, reason: str) -> None:
        raise NotImplementedError

    def estimated_wait(self, own: float = 0.0) -> float:
        raise NotImplementedError
