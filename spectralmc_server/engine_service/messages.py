"""What the HTTP side and the engine say to each other: plain, picklable data.

The HTTP side (service/) holds no engine object. It sends a job of checked requests as
Books (numpy columns, pricing/book.py) and gets back one outcome per entry; it starts,
slices and cancels calibrations by id; it asks for commits and store polls; it hears
the served models (engine_service/views.py ``Directory``) and the engine's
:class:`EngineStatus` whenever they change. The same messages go through a function call (the engine in the
server's own process) or a Unix socket (the engine in its own process,
engine_service/process.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, cast

from spectralmc_server.engine.device import BudgetReport
from spectralmc_server.engine_service.metrics import ProcessStats, TrainingState
from spectralmc_server.marketdata.objects import MarketSnapshot, ModelParams
from spectralmc_server.marketdata.store import SnapshotRecord
from spectralmc_server.pricing.book import Book, LazyContracts
from spectralmc_server.pricing.calibratable import CORRECTION_PATHS
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import Contract, Measure, PriceRequest

SNAPSHOTS_KEPT = 128  # market snapshots an engine keeps per connection (first in, first out)


class Wire:
    """A message that pickles as its constructor's arguments. A slotted dataclass's own
    pickling (dataclasses' __getstate__ and __setstate__) calls ``fields()`` for every
    object both ways: ~3.5 us a WireEntry each way against ~1.6 (measured), and a job
    crosses per request a WireEntry and its Head one way and a ModelId per served model
    back."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __reduce__(self) -> tuple[type[Wire], tuple[Any, ...]]:
        return type(self), tuple([getattr(self, name) for name in self.__dataclass_fields__])


class EngineDeadError(RuntimeError):
    """The engine has failed, stopped or gone, and takes no more work."""


class JobFailedError(RuntimeError):
    """Valid requests the engine could not price (a bug): the engine marks itself failed."""


# -- pricing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head(Wire):
    """A request's fields other than its contracts."""

    namespace: str
    val_datetime: datetime | None
    data_asof: datetime | None
    measures: tuple[str, ...]
    quantile_levels: tuple[float, ...] | None

    def request(self, book: Book) -> PriceRequest:
        """A request with these fields and ``book`` as its contracts (checked already)."""
        contracts = LazyContracts(book)
        request = PriceRequest.model_construct(
            namespace=self.namespace,
            val_datetime=self.val_datetime,
            data_asof=self.data_asof,
            measures=cast(list[Measure], list(self.measures)),
            quantile_levels=None if self.quantile_levels is None else list(self.quantile_levels),
            contracts=cast(list[Contract], contracts),  # a Sequence where the schema says list (pricing/book.py)
        )
        request._book = (contracts, book)
        return request


@dataclass(frozen=True, slots=True)
class ModelId(Wire):
    """Which version of a served model an answer comes from."""

    name: str
    version: int | None
    content_hash: str


@dataclass(frozen=True, slots=True)
class WireEntry(Wire):
    """One request, or one slice of it, in a job. ``req`` names the request for all its
    slices: its first computed slice takes one snapshot of the served versions (the
    lease), which its later slices use, until the HTTP side forgets ``req``."""

    req: int
    head: Head
    book: Book | None  # None: rows ``rows`` of the job's book
    offset: int  # the slice's first contract in the whole request
    columnar: bool  # answer with ``columns`` in place of ``results``
    # the inputs of contracts by reference: the snapshot travels once per connection
    # (engine_service/server.py keeps the last SNAPSHOTS_KEPT by hash; None: sent before)
    market: tuple[SnapshotRecord, MarketSnapshot | None] | None = None
    rows: tuple[int, int] = (0, 0)  # [start, stop) in PriceJob.book, where ``book`` is None

    def contracts(self, job: PriceJob) -> Book:
        """This entry's contracts: its own book, or its rows of the job's."""
        if self.book is not None:
            return self.book
        if job.book is None:
            raise ValueError("an entry without a book in a job without one")
        return job.book.rows(*self.rows)


@dataclass(frozen=True, slots=True)
class PriceJob(Wire):
    """Entries to price. ``book`` holds the contracts of every entry whose own ``book``
    is None, one after the other: one set of columns crosses to the engine for a job
    of many small requests, not one per request."""

    entries: tuple[WireEntry, ...]
    book: Book | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """Not computed: its request was forgotten (the client went) before the job began."""


Outcome = dict[str, Any] | RequestRefusedError | Skipped


@dataclass(frozen=True, slots=True)
class PriceResult(Wire):
    outcomes: tuple[Outcome, ...]  # one per entry, in order
    models: dict[int, dict[str, ModelId]]  # req -> process -> the version its answers come from (its lease)
    started: float  # time.perf_counter() (CLOCK_MONOTONIC: one clock for every process of the host)
    ended: float
    cpu: float  # CPU seconds of the compute thread


# -- calibration --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FitSpec:
    snapshot: MarketSnapshot
    underlying: str
    process: str
    allow_arbitrage: bool
    max_iterations: int
    deadline: float  # time.monotonic(): the fit stops between iterations (and Monte Carlo chunks) past it
    corrections: int = 0  # reference corrections of a learned fit (pricing/calibration.py)
    correction_paths: int = CORRECTION_PATHS  # the reference Monte Carlo's paths per expiry


@dataclass(frozen=True, slots=True)
class FitReport:
    """A finished fit as plain data (pricing/calibration.py CalibrationReport)."""

    underlying: str
    process: str
    model: dict[str, Any] | None
    description: dict[str, Any]  # CalibrationReport.describe()
    params: ModelParams  # CalibrationReport.model_params()
    seconds: float
    rmse_vol: float

    def describe(self) -> dict[str, Any]:
        return self.description

    def model_params(self) -> ModelParams:
        return self.params


@dataclass(frozen=True, slots=True)
class FitFailed:
    """``kind``: ``surface`` (a surface it cannot fit: 422), ``deadline`` (504) or
    ``error`` (anything else)."""

    kind: str
    message: str
    iterations: int = 0


@dataclass(frozen=True, slots=True)
class SliceDone:
    finished: bool
    started: float  # perf_counter
    ended: float
    cpu: float
    evaluations: int  # evaluations in this slice
    iterations: int  # so far
    outcome: FitReport | FitFailed | None = None  # once finished
    reference_seconds: float = 0.0  # of this slice's wall time, in a correction's reference Monte Carlo
    reference_cpu: float = 0.0  # of its thread's CPU time, the same
    reference_paths: int = 0  # the paths (over all expiries) that Monte Carlo added in this slice


# -- admin --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Committed:
    version: int
    content_hash: str
    step: int
    unqualified: bool
    gate: list[str]


@dataclass(frozen=True, slots=True)
class CommitRefused:
    """``kind``: ``not_training`` (this engine does not train the model) or ``gate``."""

    kind: str
    message: str
    failures: list[str] = field(default_factory=list)
    step: int | None = None


# -- state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """The engine as health, readiness, admission and /metrics see it."""

    alive: bool
    failure: str | None
    training_model: str | None  # the model online training runs on, if any
    training_note: str | None  # why online training is off, when it is
    training: TrainingState | None
    training_delay: float  # seconds a job may wait behind a training step
    budgets: tuple[BudgetReport, ...] = ()
    pid: int = 0
    rss_bytes: int | None = None
    process: ProcessStats | None = None  # CPU, descriptors, Python GC of the engine's process


DOWN = EngineStatus(
    alive=False,
    failure="the engine has not started",
    training_model=None,
    training_note=None,
    training=None,
    training_delay=0.0,
)
