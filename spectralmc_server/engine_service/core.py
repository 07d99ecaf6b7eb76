"""EngineCore: everything that runs torch, behind the messages of engine_service/messages.py.

It owns the model host (stores, trackers, loaded versions, the hot swap), the compute
worker (the one thread that computes: pricing jobs, calibration slices, training
steps), online training and its commits. The HTTP side reaches it only through an
:class:`~spectralmc_server.service.engine.EngineClient`: in the server's own process
(``engine.mode = "thread"``, the tests' default) or in a process of its own
(``"process"``, what ``spectralmc serve`` runs: engine_service/process.py).

One version per request: a request's first computed slice takes the job's snapshot of
the served versions (its lease, by the request's id), which its later slices price
with; the HTTP side forgets the request when it is answered, failed or dropped, and a
forgotten request's slices not yet begun are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.engine.device import Budgets
from spectralmc_server.engine.served import ServedModel
from spectralmc_server.engine.trainer import Trainer
from spectralmc_server.engine_service.messages import (
    CommitRefused,
    Committed,
    EngineDeadError,
    EngineStatus,
    FitFailed,
    FitReport,
    FitSpec,
    JobFailedError,
    ModelId,
    PriceJob,
    PriceResult,
    Skipped,
    SliceDone,
)
from spectralmc_server.engine_service.metrics import EngineCounters, process_stats
from spectralmc_server.engine_service.models import ModelHost
from spectralmc_server.engine_service.online import announce, commit_at_shutdown, validation_p95
from spectralmc_server.engine_service.rss import rss_bytes
from spectralmc_server.engine_service.version_cache import VersionCache
from spectralmc_server.engine_service.views import Directory
from spectralmc_server.engine_service.worker import ComputeWorker, OnlineTraining, SliceCancelledError, SlicedTask
from spectralmc_server.pricing.calibration import CalibrationReport, SurfaceError, calibrate_snapshot
from spectralmc_server.pricing.door import Entry, value_batch
from spectralmc_server.settings import Settings
from spectralmc_server.store.objects import ObjectStore, StoreUnavailableError
from spectralmc_server.training.commit import CommitOutcome, GateResult, commit_certified
from spectralmc_server.training.policy import CommitPolicy
from spectralmc_server.training.resume import ResumeError, resume_version, trained_from

log = logging.getLogger(__name__)


class FitDeadlineError(Exception):
    """Raised by a fit's iteration hook once its deadline has passed."""

    def __init__(self, iterations: int) -> None:
        super().__init__(f"deadline passed after {iterations} iterations")
        self.iterations = iterations


class _Fit:
    def __init__(self, spec: FitSpec, served: ServedModel | None) -> None:
        self.spec = spec
        self.iterations = 0
        self.evaluations = 0  # over the fit and its re-fits
        self.reference_seconds = 0.0  # computing its corrections' Monte Carlo (pauses not counted)
        self.reference_cpu = 0.0  # the same in the thread's CPU time
        self.reference_paths = 0

        def run(checkpoint: Callable[[], None]) -> CalibrationReport:  # on the fit's own thread
            # iterations and evaluations of the fits before this one (a re-fit counts
            # from 0; what a fit's last step evaluated after its last hook is not seen)
            iterations_before = evaluations_before = 0
            mark = cpu_mark = 0.0

            def pause() -> None:
                if time.monotonic() >= spec.deadline:
                    raise FitDeadlineError(self.iterations)
                checkpoint()

            def hook(iterations: int, evaluations: int) -> None:
                self.iterations = iterations_before + iterations
                self.evaluations = evaluations_before + evaluations
                pause()

            def reference(paths: int) -> None:  # a correction's start (0), then each chunk
                nonlocal iterations_before, evaluations_before, mark, cpu_mark
                if paths:
                    self.reference_seconds += time.perf_counter() - mark
                    self.reference_cpu += time.thread_time() - cpu_mark
                    self.reference_paths += paths
                else:
                    iterations_before, evaluations_before = self.iterations, self.evaluations
                pause()
                mark, cpu_mark = time.perf_counter(), time.thread_time()

            return calibrate_snapshot(
                spec.snapshot,
                spec.underlying,
                spec.process,
                served,
                allow_arbitrage=spec.allow_arbitrage,
                max_iterations=spec.max_iterations,
                on_iteration=hook,
                corrections=spec.corrections,
                correction_paths=spec.correction_paths,
                on_reference=reference,
            )

        self.task: SlicedTask[CalibrationReport] = SlicedTask(run, name=f"calibration-{spec.process}")

    def outcome(self) -> FitReport | FitFailed:
        try:
            report = self.task.result()
        except FitDeadlineError as exc:
            return FitFailed("deadline", str(exc), exc.iterations)
        except SurfaceError as exc:
            return FitFailed("surface", str(exc), self.iterations)
        except SliceCancelledError:
            return FitFailed("error", "cancelled", self.iterations)
        except Exception as exc:
            log.exception("calibration failed")
            return FitFailed("error", f"{type(exc).__name__}: {exc}", self.iterations)
        return FitReport(
            underlying=report.underlying,
            process=report.process,
            model=report.model,
            description=report.describe(),
            params=report.model_params(),
            seconds=report.result.seconds,
            rmse_vol=report.result.rmse_vol,
        )


class EngineCore:
    """The engine: models, the compute worker, online training (see the module docstring).

    Runs on an asyncio loop (the trackers poll on it; commits certify in a thread from
    it); every torch computation runs on the worker's thread."""

    def __init__(self, settings: Settings, objects: ObjectStore, metrics: EngineCounters, budgets: Budgets) -> None:
        s = settings
        self.settings = settings
        self.objects = objects
        self.metrics = metrics
        self.budgets = budgets
        # A trainer needs the store (it exits, to be restarted): no fallback, no copy for it.
        cache_dir = s.version_cache_dir if s.serves else None
        self.host = ModelHost(
            objects,
            list(s.models),
            budgets,
            poll_seconds=s.poll_seconds,
            max_backoff_seconds=s.poll_max_backoff_seconds,
            seed_bundled=s.seed_bundled,
            certificate=s.certificate,
            cache=None if cache_dir is None else VersionCache(cache_dir, s.version_cache.keep),
            start_without_store=s.serves,
        )
        self.training: OnlineTraining | None = None
        self.training_note: str | None = None
        self.worker: ComputeWorker | None = None
        self.background: set[asyncio.Task[None]] = set()  # commit tasks kept alive
        self.leases: dict[int, dict[str, ServedModel]] = {}
        self.forgotten: set[int] = set()
        self.fits: dict[int, _Fit] = {}
        self.status_listeners: list[Callable[[EngineStatus], None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Seed and load the models, resume online training, start the worker."""
        try:
            await self.host.start()
        except BaseException:
            await self.host.stop()
            raise
        s = self.settings
        try:
            self.training = await self._training()
        except StoreUnavailableError as exc:
            if not s.serves:  # a trainer without the store has nothing to do: it exits, to be restarted
                await self.host.stop()
                raise
            # role all, started while the store is down (engine_service/models.py): serve only
            self.training_note = f"not training: the store was unreachable at start ({exc}); restart to train"
        self.worker = ComputeWorker(self.metrics, self.training, s.torch_threads, s.train.idle_gap_seconds)
        self.worker.start()

    async def stop(self) -> None:
        """Commit or discard, and log, the steps trained since the last commit (within
        ``train.shutdown_commit_seconds``: engine_service/online.py), finish the worker's
        jobs, stop the trackers."""
        s = self.settings
        worker, training = self.worker, self.training
        if worker is not None:
            if training is not None:
                await commit_at_shutdown(
                    training,
                    worker,
                    s,
                    in_flight=self.background,
                    served=lambda: self._served_p95(training.model),
                    commit=lambda ck, message: self.gated_commit(training.model, ck, message),
                )
            for task in list(self.background):
                with contextlib.suppress(Exception):
                    await task
            await asyncio.to_thread(worker.stop, s.shutdown_timeout_seconds)
        if training is not None:
            training.trainer.close()
        await self.host.stop()

    def _served_p95(self, model: str) -> tuple[int, float | None] | None:
        """The version served of ``model`` and its validation p95 (None: none served)."""
        cur = self.host.trackers[model].current
        return None if cur is None else (cur.version, validation_p95(cur.model.manifest))

    async def _training(self) -> OnlineTraining | None:
        """Resume online training from the version ``train.resume_from`` names (default
        the head), if it has training state; the start is logged (online.announce)."""
        training = await self._resume_training()
        if training is None and self.settings.trains:
            log.warning("online training of %s is off: %s", self.settings.train.model, self.training_note)
        return training

    async def _resume_training(self) -> OnlineTraining | None:
        s = self.settings
        if not s.trains:
            self.training_note = f"role {s.role!r} with train.enabled={s.train.enabled}: not training"
            return None
        store = self.host.stores.get(s.train.model)
        if store is None:
            self.training_note = f"train.model {s.train.model!r} is not among the served models"
            return None
        try:
            version, how = await resume_version(store, s.train.resume_from)
        except ResumeError as exc:
            self.training_note = f"train.resume_from = {s.train.resume_from!r}: {exc}"
            return None
        head = await store.head()  # named at start when training resumes from another version
        try:
            ckpt = await store.load(version, need_training=True)
        except Exception as exc:
            self.training_note = f"version {version} of {s.train.model!r} has no usable training state ({exc})"
            return None
        trainer = await asyncio.to_thread(
            Trainer.from_checkpoint,
            ckpt,
            self.budgets,
            validate_every=s.train.validate_every,
            device=s.train.device,
            kernels=s.train.kernels,
        )
        policy = CommitPolicy(
            every_seconds=s.train.commit_every_seconds,
            only_if_improved=s.train.commit_if_improved,
            final=False,
        )
        base = (ckpt.manifest.get("metrics", {}).get("validation") or {}).get("p95_bp")
        policy.committed(base)  # publish only what beats the version training resumed from
        loop = asyncio.get_running_loop()

        async def commit(ck: Checkpoint, message: str) -> None:
            val = (ck.manifest.get("metrics", {}).get("validation") or {}).get("p95_bp")
            if self.host.certify_lock.locked():
                # The previous state is still being certified (~30 s): this one is skipped,
                # not queued behind it (the next is due an interval later).
                policy.withdraw(val)  # the worker counted it as committed when it handed it over
                log.info("online training of %s: a certification is under way; %r skipped", store.name, message)
                return
            try:
                outcome = await self.gated_commit(store.name, ck, message)
                if outcome.stored is None:
                    policy.withdraw(val)
                    return
                step, first = int(ck.manifest["state"]["step"]), online.committed_step + 1
                online.mark_committed(step, trained_from(outcome.stored.version, outcome.stored.content_hash))
                log.info(
                    "online training committed %s version %d (steps %d..%d): %s",
                    store.name,
                    outcome.stored.version,
                    first,
                    step,
                    message,
                )
                await self.host.trackers[store.name].poll_once()
            except Exception:
                log.exception("auto-commit of %s failed", store.name)

        def publish(ck: Checkpoint, message: str) -> None:  # called on the worker thread
            def schedule() -> None:
                task = asyncio.create_task(commit(ck, message))
                self.background.add(task)
                task.add_done_callback(self.background.discard)

            loop.call_soon_threadsafe(schedule)

        self.training_note = None
        online = OnlineTraining(s.train.model, trainer, policy, publish, trained_from(version, ckpt.content_hash))
        announce(s, online, version, how, None if head is None else head.version)
        return online

    async def gated_commit(self, model: str, ckpt: Checkpoint, message: str) -> CommitOutcome:
        """Online training's commit step: certify a checkpoint in a thread (about 30 s;
        one at a time), check it against the model's gate and commit it when it passes;
        a failing one is logged, counted in ``spectralmc_training_rejected_total`` and
        not committed."""

        def rejected(result: GateResult) -> None:
            self.metrics.training_rejected.labels(model).inc()
            log.warning(
                "online training of %s: step %s not committed: it %s",
                model,
                ckpt.manifest.get("state", {}).get("step"),
                result.describe(),
            )

        return await commit_certified(
            self.host.stores[model], ckpt, message, certify=self._certifier(model), on_failure=rejected
        )

    def _certifier(self, model: str) -> Callable[[Checkpoint], Awaitable[GateResult]]:
        """The model's certification: in a thread, one at a time (ModelHost.certify)."""
        return lambda ck: self.host.certify(model, ck)

    # -- state ----------------------------------------------------------------------------

    def directory(self) -> Directory:
        return self.host.directory()

    def status(self) -> EngineStatus:
        worker, training = self.worker, self.training
        return EngineStatus(
            alive=worker is not None and worker.alive,
            failure=(
                "the engine has not started"
                if worker is None
                else worker.failure or (None if worker.alive else "the worker thread stopped")
            ),
            training_model=None if training is None else training.model,
            training_note=self.training_note,
            training=None if training is None else training.state(),
            training_delay=0.0 if worker is None else worker.training_delay,
            budgets=tuple(self.budgets.reports()),
            pid=os.getpid(),
            rss_bytes=rss_bytes(),
            process=process_stats(),
        )

    def _worker(self) -> ComputeWorker:
        if self.worker is None:
            raise EngineDeadError("the engine has not started")
        return self.worker

    # -- pricing --------------------------------------------------------------------------

    def price(self, job: PriceJob) -> asyncio.Future[PriceResult]:
        """Price a job on the worker (EngineDeadError at once when the worker is down)."""
        return self._worker().submit(lambda: self._price(job))

    def _price(self, job: PriceJob) -> PriceResult:  # on the worker
        t0 = time.perf_counter()
        c0 = time.thread_time()
        fresh: dict[str, ServedModel] | None = None
        entries: list[Entry] = []
        live: list[int] = []
        models: dict[int, dict[str, ModelId]] = {}
        # One identity dict per lease, shared by the requests holding it: pickled once a
        # job (pickle's memo), not a ModelId per served model per request.
        identities: dict[int, dict[str, ModelId]] = {}
        for k, e in enumerate(job.entries):
            if e.req in self.forgotten:
                continue
            lease = self.leases.get(e.req)
            if lease is None:  # one version per model for the whole request
                if fresh is None:
                    fresh = self.host.snapshot()
                lease = self.leases[e.req] = fresh
            ids = identities.get(id(lease))
            if ids is None:
                ids = identities[id(lease)] = {p: ModelId(s.name, s.version, s.content_hash) for p, s in lease.items()}
            models[e.req] = ids
            market = None
            if e.market is not None:
                record, snapshot = e.market
                assert snapshot is not None, "the snapshot is filled in before the job reaches the core"
                market = (record, snapshot)
            entries.append(Entry(e.head.request(e.contracts(job)), lease, market, e.offset, e.columnar))
            live.append(k)
        outcomes: list[Any] = [Skipped()] * len(job.entries)
        try:
            for k, answer in zip(live, value_batch(entries), strict=True):
                outcomes[k] = answer
        except Exception as exc:  # valid requests the engine could not price: a bug
            log.exception("batch of %d requests failed", len(entries))
            self._worker().mark_failed(f"batch failed: {type(exc).__name__}: {exc}")
            raise JobFailedError(f"{type(exc).__name__}: {exc}") from None
        finally:
            for req in models:  # forgotten while this job computed: no lease may outlive it
                if req in self.forgotten:
                    self.leases.pop(req, None)
        return PriceResult(tuple(outcomes), models, t0, time.perf_counter(), time.thread_time() - c0)

    def forget(self, reqs: Iterable[int]) -> None:
        """These requests are done with: their leases go, their slices not begun are skipped.
        (From the event loop; the worker reads the sets between jobs.)"""
        for req in reqs:
            self.forgotten.add(req)  # first: a job starting now then leases nothing that stays
            self.leases.pop(req, None)
        if len(self.forgotten) > 100_000:  # ids only grow: old ones never come back
            floor = max(self.forgotten) - 50_000
            self.forgotten = {r for r in self.forgotten if r >= floor}

    # -- calibration ----------------------------------------------------------------------

    def fit_start(self, fit_id: int, spec: FitSpec) -> None:
        """A calibration, run in slices by :meth:`fit_slice` (with the served version of
        its process now, or the analytic reference without one)."""
        self._worker()
        self.fits[fit_id] = _Fit(spec, self.host.snapshot().get(spec.process))

    def fit_slice(self, fit_id: int, seconds: float) -> asyncio.Future[SliceDone]:
        fit = self.fits.get(fit_id)
        if fit is None:
            raise EngineDeadError(f"calibration {fit_id} is not known to this engine")

        def work() -> SliceDone:
            t0 = time.perf_counter()
            before, cpu = fit.evaluations, fit.task.cpu_seconds
            reference, reference_cpu, paths = fit.reference_seconds, fit.reference_cpu, fit.reference_paths
            finished = fit.task.run_slice(seconds)
            done = SliceDone(
                finished=finished,
                started=t0,
                ended=time.perf_counter(),
                cpu=fit.task.cpu_seconds - cpu,
                evaluations=fit.evaluations - before,
                iterations=fit.iterations,
                outcome=fit.outcome() if finished else None,
                reference_seconds=fit.reference_seconds - reference,
                reference_cpu=fit.reference_cpu - reference_cpu,
                reference_paths=fit.reference_paths - paths,
            )
            if finished:
                self.fits.pop(fit_id, None)
            return done

        return self._worker().submit(work)

    def fit_cancel(self, fit_id: int) -> None:
        """Stop a calibration: its thread unwinds in one more (empty) slice."""
        fit = self.fits.pop(fit_id, None)
        if fit is None or fit.task.done:
            return
        fit.task.cancel()
        with contextlib.suppress(EngineDeadError):
            self._worker().submit(lambda: fit.task.run_slice(0.0))

    # -- admin ----------------------------------------------------------------------------

    async def commit(self, model: str, message: str, allow_unqualified: bool) -> Committed | CommitRefused:
        """Commit online training's state of ``model`` as a new version (certified first)."""
        training = self.training
        if training is None or training.model != model:
            note = self.training_note
            return CommitRefused(
                "not_training", f"this server does not train model {model!r}" + (f" ({note})" if note else "")
            )
        ckpt = await self._worker().submit(training.checkpoint)
        step = int(ckpt.manifest["state"]["step"])

        def rejected(result: GateResult) -> None:
            self.metrics.training_rejected.labels(model).inc()
            log.warning("admin commit of %s at step %s: it %s", model, step, result.describe())

        outcome = await commit_certified(  # certifies for ~30 s, in a thread
            self.host.stores[model],
            ckpt,
            message,
            certify=self._certifier(model),
            allow_unqualified=allow_unqualified,
            on_failure=rejected,
        )
        result, stored = outcome.gate, outcome.stored
        if stored is None:
            return CommitRefused(
                "gate",
                f"the training state of {model!r} at step {step} fails its quality gate and was not committed",
                list(result.failures),
                step,
            )
        training.mark_committed(step, trained_from(stored.version, stored.content_hash))
        return Committed(stored.version, stored.content_hash, step, not result.passed, list(result.failures))

    async def poll(self, model: str) -> None:
        """Serve what the store now says for ``model`` (after an admin change)."""
        try:
            await self.host.trackers[model].poll_once()
        except Exception as exc:  # the store move happened; the swap is retried by polling
            log.warning("model %s: refresh after an admin change failed: %s", model, exc)

    def hold(self, seconds: float) -> asyncio.Future[None]:
        """Keep the worker busy for ``seconds`` (tests: a worker that is computing)."""
        return self._worker().submit(lambda: time.sleep(seconds))
