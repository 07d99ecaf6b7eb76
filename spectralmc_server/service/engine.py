"""The engine as the HTTP side reaches it: :class:`EngineClient`.

The batcher, the routes, calibration and the admin routes hold no engine object: they
send the messages of engine_service/messages.py through an :class:`EngineClient` and
read what it was last told, the served models (``models``, a
:class:`~spectralmc_server.engine_service.views.ModelDirectory`) and the engine's
:class:`~spectralmc_server.engine_service.messages.EngineStatus`.

- :class:`LocalEngine`: the engine on a thread of this process (``engine.mode =
  "thread"``): calls, no copies.
- :class:`~spectralmc_server.service.engine_process.ProcessEngine`: the engine in a
  process of its own (``"process"``), over a Unix socket.

When the engine is lost every listener in ``lost_listeners`` hears it at once (the
batcher answers everything queued or in flight 503 ``engine_unavailable``).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from spectralmc_server.engine_service.messages import (
    CommitRefused,
    Committed,
    EngineStatus,
    FitSpec,
    PriceJob,
    PriceResult,
    SliceDone,
)
from spectralmc_server.engine_service.metrics import ProcessStats
from spectralmc_server.engine_service.views import ModelDirectory

if TYPE_CHECKING:  # the engine side (thread mode only): not imported by the HTTP side's modules
    from spectralmc_server.engine_service.core import EngineCore


class EngineClient(ABC):
    """What the HTTP side may ask of the engine (see the module docstring)."""

    def __init__(self, models: ModelDirectory) -> None:
        self.models = models
        self.lost_listeners: list[Callable[[str], None]] = []

    @property
    @abstractmethod
    def status(self) -> EngineStatus:
        """The engine's last reported status."""

    @property
    def alive(self) -> bool:
        return self.status.alive

    @property
    def parallel(self) -> int:
        """Jobs the engine computes at once (one per live engine process)."""
        return 1

    @property
    @abstractmethod
    def training_delay(self) -> float:
        """Seconds a job may wait behind a training step (admission's estimate)."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def price(self, job: PriceJob) -> asyncio.Future[PriceResult]:
        """Price a job; raises EngineDeadError at once when the engine is down."""

    @abstractmethod
    def forget(self, reqs: Iterable[int]) -> None:
        """These requests are done with (their leases go; slices not begun are skipped)."""

    @abstractmethod
    def fit_start(self, fit_id: int, spec: FitSpec) -> None: ...

    @abstractmethod
    def fit_slice(self, fit_id: int, seconds: float) -> asyncio.Future[SliceDone]: ...

    @abstractmethod
    def fit_cancel(self, fit_id: int) -> None: ...

    @abstractmethod
    async def commit(self, model: str, message: str, allow_unqualified: bool) -> Committed | CommitRefused: ...

    @abstractmethod
    async def poll(self, model: str) -> None:
        """Make the engine serve what the store now says for ``model``; the directory is
        up to date when this returns."""

    @abstractmethod
    def hold(self, seconds: float) -> asyncio.Future[None]:
        """Keep the engine's compute busy for ``seconds`` (tests)."""

    def processes_rss(self) -> list[tuple[str, int | None]]:
        """(name, resident set size) of each engine process (none when on a thread here)."""
        return []

    def processes_stats(self) -> list[tuple[str, ProcessStats | None]]:
        """(name, CPU, descriptors, Python GC) of each engine process, as of its last
        status (none when on a thread here: the HTTP process's own figures cover it)."""
        return []

    async def metrics_text(self) -> bytes:
        """The engine's own metric families (Prometheus text), where it keeps its own."""
        return b""

    def _lost(self, reason: str) -> None:
        for listener in list(self.lost_listeners):
            listener(reason)


class LocalEngine(EngineClient):
    """The engine core on a thread of this process."""

    def __init__(self, core: EngineCore, models: ModelDirectory) -> None:
        super().__init__(models)
        self.core = core

    @property
    def status(self) -> EngineStatus:
        return self.core.status()

    @property
    def alive(self) -> bool:
        worker = self.core.worker
        return worker is not None and worker.alive

    @property
    def training_delay(self) -> float:
        worker = self.core.worker
        return 0.0 if worker is None else worker.training_delay

    async def start(self) -> None:
        self.core.host.on_change.append(self.models.update)
        await self.core.start()
        self.models.update(self.core.directory())

    async def stop(self) -> None:
        await self.core.stop()
        self.core.host.on_change.remove(self.models.update)

    def price(self, job: PriceJob) -> asyncio.Future[PriceResult]:
        return self.core.price(job)

    def forget(self, reqs: Iterable[int]) -> None:
        self.core.forget(reqs)

    def fit_start(self, fit_id: int, spec: FitSpec) -> None:
        self.core.fit_start(fit_id, spec)

    def fit_slice(self, fit_id: int, seconds: float) -> asyncio.Future[SliceDone]:
        return self.core.fit_slice(fit_id, seconds)

    def fit_cancel(self, fit_id: int) -> None:
        self.core.fit_cancel(fit_id)

    async def commit(self, model: str, message: str, allow_unqualified: bool) -> Committed | CommitRefused:
        return await self.core.commit(model, message, allow_unqualified)

    async def poll(self, model: str) -> None:
        await self.core.poll(model)

    def hold(self, seconds: float) -> asyncio.Future[None]:
        return self.core.hold(seconds)
