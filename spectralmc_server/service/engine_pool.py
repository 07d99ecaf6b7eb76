"""EnginePool: several engine processes behind one HTTP process (``engine.processes``).

Each engine is a :class:`~spectralmc_server.service.engine_process.ProcessEngine` with
every served model loaded; engine 0 alone trains (the others start with training off).

- A job goes to the engine with the fewest jobs in flight, except that a job whose
  lead request already has a lease (a request being split) goes to the engine that
  holds it: one version per request, as with one engine. Calibrations stick to the
  engine they started on; commits go to engine 0; store polls to every engine.
- The served models shown are those of the lowest-numbered live engine (every engine
  polls the same store, so they agree but for a poll interval after a swap).
- One engine dying fails only what it was computing (503 ``engine_unavailable``);
  queued work goes to the others, and the dead one is restarted on its own. Health
  and readiness fail only while no engine is up.
- /metrics: the engines' own families, each sample labelled ``engine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterable
from typing import Any

from spectralmc_server.engine_service.messages import (
    CommitRefused,
    Committed,
    EngineDeadError,
    EngineStatus,
    FitSpec,
    PriceJob,
    PriceResult,
    SliceDone,
)
from spectralmc_server.engine_service.metrics import ProcessStats
from spectralmc_server.engine_service.views import Directory, ModelDirectory
from spectralmc_server.service.engine import EngineClient
from spectralmc_server.service.engine_process import ProcessEngine
from spectralmc_server.service.metrics import Metrics, merge_expositions
from spectralmc_server.settings import Settings


class _Relay(ModelDirectory):
    """One engine's directory; the pool shows the first live engine's."""

    def __init__(self, pool: EnginePool, index: int) -> None:
        super().__init__()
        self.pool = pool
        self.index = index

    def update(self, directory: Directory, *, renewed: bool = False) -> None:
        super().update(directory, renewed=renewed)
        self.pool._directory(self.index, renewed)


class EnginePool(EngineClient):
    """See the module docstring."""

    def __init__(self, settings: Settings, models: ModelDirectory, metrics: Metrics) -> None:
        super().__init__(models)
        n = settings.engine.processes
        quiet = settings.model_copy(
            update={"train": settings.train.model_copy(update={"enabled": False}), "role": "serve"}
        )
        self.engines = [
            ProcessEngine(settings if k == 0 else quiet, _Relay(self, k), metrics, index=k) for k in range(n)
        ]
        self._inflight = [0] * n
        self.jobs = [0] * n  # jobs sent to each engine
        self._held: dict[int, int] = {}  # request -> the engine holding its lease
        self._orphans: set[int] = set()  # requests whose lease died with its engine
        self._fits: dict[int, int] = {}  # calibration -> its engine
        self._shown: int | None = None
        for k, engine in enumerate(self.engines):
            engine.lost_listeners.append(functools.partial(self._engine_lost, k))

    # -- state

    def _live(self) -> list[int]:
        return [k for k, e in enumerate(self.engines) if e.alive]

    @property
    def status(self) -> EngineStatus:
        live = self._live()
        first = self.engines[live[0] if live else 0].status
        trainer = self.engines[0].status
        return EngineStatus(
            alive=bool(live),
            failure=None if live else first.failure,
            training_model=trainer.training_model,
            training_note=trainer.training_note,
            training=trainer.training,
            training_delay=min((self.engines[k].training_delay for k in live), default=0.0),
            budgets=first.budgets,
            pid=first.pid,
            rss_bytes=first.rss_bytes,
        )

    @property
    def alive(self) -> bool:
        return any(e.alive for e in self.engines)

    @property
    def parallel(self) -> int:
        return max(len(self._live()), 1)

    @property
    def training_delay(self) -> float:
        # the next job goes to the least busy engine: usually one that does not train
        return min((self.engines[k].training_delay for k in self._live()), default=0.0)

    def _directory(self, index: int, renewed: bool) -> None:
        live = self._live()
        shown = live[0] if live else index
        if index != shown:
            return
        self.models.update(self.engines[index].models.current, renewed=renewed or shown != self._shown)
        self._shown = shown

    def _engine_lost(self, index: int, reason: str) -> None:
        for req in [r for r, k in self._held.items() if k == index]:
            del self._held[req]
            self._orphans.add(req)  # its next chunk must not price with other versions
        for fit in [f for f, k in self._fits.items() if k == index]:
            del self._fits[fit]
        live = self._live()
        if not live:
            self._lost(reason)
        elif self._shown == index:
            self._directory(live[0], True)

    # -- lifecycle

    async def start(self) -> None:
        await asyncio.gather(*(e.start() for e in self.engines))
        self._directory(0, False)

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)

    # -- calls

    def _pick(self) -> int:
        live = self._live()
        if not live:
            raise EngineDeadError(self.engines[0].status.failure or "no engine is up")
        return min(live, key=lambda k: (self._inflight[k], k))

    def price(self, job: PriceJob) -> asyncio.Future[PriceResult]:
        if any(e.req in self._orphans for e in job.entries):
            dead: asyncio.Future[PriceResult] = asyncio.get_running_loop().create_future()
            dead.set_exception(EngineDeadError("the engine holding this request's model versions died"))
            return dead
        held = {self._held[e.req] for e in job.entries if e.req in self._held}
        if len(held) > 1:  # the batcher puts at most one request with a lease in a job
            raise RuntimeError(f"a job spans the leases of {len(held)} engines")
        k = held.pop() if held else self._pick()
        future = self.engines[k].price(job)
        self._inflight[k] += 1
        self.jobs[k] += 1

        def done(f: asyncio.Future[PriceResult]) -> None:
            self._inflight[k] -= 1
            if not f.cancelled() and f.exception() is None:
                for req in f.result().models:
                    self._held.setdefault(req, k)

        future.add_done_callback(done)
        return future

    def forget(self, reqs: Iterable[int]) -> None:
        by_engine: dict[int, list[int]] = {}
        for req in reqs:
            self._orphans.discard(req)
            k = self._held.pop(req, None)
            for j in range(len(self.engines)) if k is None else (k,):  # not priced yet: it may be anywhere
                by_engine.setdefault(j, []).append(req)
        for k, rs in by_engine.items():
            self.engines[k].forget(rs)

    def fit_start(self, fit_id: int, spec: FitSpec) -> None:
        k = self._pick()
        self.engines[k].fit_start(fit_id, spec)
        self._fits[fit_id] = k

    def fit_slice(self, fit_id: int, seconds: float) -> asyncio.Future[SliceDone]:
        k = self._fits.get(fit_id)
        if k is None:
            raise EngineDeadError(f"the engine of calibration {fit_id} is gone")
        return self.engines[k].fit_slice(fit_id, seconds)

    def fit_cancel(self, fit_id: int) -> None:
        k = self._fits.pop(fit_id, None)
        if k is not None:
            self.engines[k].fit_cancel(fit_id)

    async def commit(self, model: str, message: str, allow_unqualified: bool) -> Committed | CommitRefused:
        return await self.engines[0].commit(model, message, allow_unqualified)

    async def poll(self, model: str) -> None:
        results = await asyncio.gather(*(e.poll(model) for e in self.engines), return_exceptions=True)
        if all(isinstance(r, BaseException) for r in results):
            raise next(r for r in results if isinstance(r, BaseException))

    def hold(self, seconds: float) -> asyncio.Future[None]:
        futures = [self.engines[k].hold(seconds) for k in self._live()]
        return asyncio.ensure_future(_all(futures))

    def processes_rss(self) -> list[tuple[str, int | None]]:
        return [item for e in self.engines for item in e.processes_rss()]

    def processes_stats(self) -> list[tuple[str, ProcessStats | None]]:
        return [item for e in self.engines for item in e.processes_stats()]

    async def metrics_text(self) -> bytes:
        texts = await asyncio.gather(*(e.metrics_text() for e in self.engines))
        return merge_expositions([(text, {}) for text in texts])

    @property
    def pids(self) -> list[int | None]:
        return [e.pid for e in self.engines]


async def _all(futures: list[asyncio.Future[Any]]) -> None:
    for f in futures:
        with contextlib.suppress(EngineDeadError):
            await f
