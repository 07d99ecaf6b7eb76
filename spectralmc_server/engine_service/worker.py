"""ComputeWorker: the one thread that owns the device.

Inference batches go first; when no batch is waiting, the worker runs one online
training step, so a batch that arrives waits at most one step (a few ms on CPU; the
step time is in ``spectralmc_training_step_duration_seconds``). Torch never runs on
the event loop: handlers submit callables and await futures.

Two failure kinds, as in vLLM: a job that raises fails that job's requests; an engine
failure (marked by :meth:`mark_failed`, or a training step that raises) makes health
checks fail, so an orchestrator restarts the process.

A long computation that cannot be cut into independent jobs (a calibration) runs as a
:class:`SlicedTask`: its own thread computes only while a worker job waits for it, and
hands control back at its checkpoints once a slice has used its time, so other jobs run
between its slices and the compute stays serialized on the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.engine.trainer import Trainer
from spectralmc_server.engine_service.messages import EngineDeadError
from spectralmc_server.engine_service.metrics import EngineCounters, TrainingState
from spectralmc_server.training.policy import CommitPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)
_Job = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class SliceCancelledError(Exception):
    """Raised at a :class:`SlicedTask`'s checkpoint once it has been cancelled."""


class SlicedTask(Generic[T]):
    """``fn(checkpoint)`` run in slices of bounded time, each inside a worker job.

    ``fn`` runs on a thread of its own, but only while :meth:`run_slice` (called on the
    worker, as a job) waits for it: the worker thread is blocked meanwhile, so exactly
    one of the two computes at any time. ``fn`` must call ``checkpoint()`` between its
    steps (a calibration's iterations); once the slice has used its time, the checkpoint
    hands control back and blocks until the next slice. After :meth:`cancel` the next
    checkpoint raises :class:`SliceCancelledError`.
    """

    def __init__(self, fn: Callable[[Callable[[], None]], T], name: str = "sliced-task") -> None:
        self._fn = fn
        self._name = name
        self._resume = threading.Semaphore(0)  # worker -> task: compute
        self._paused = threading.Semaphore(0)  # task -> worker: paused or finished
        self._thread: threading.Thread | None = None
        self._slice_end = 0.0
        self._cancelled = False
        self.done = False
        self.slices = 0
        self.cpu_seconds = 0.0  # CPU time of its thread so far
        self._cpu_mark = 0.0
        self._result: T | None = None
        self._error: BaseException | None = None

    def run_slice(self, seconds: float) -> bool:
        """On the worker: let the task compute for about ``seconds`` (until its next
        checkpoint after that); True once it has finished (or failed)."""
        if self.done:
            return True
        self.slices += 1
        self._slice_end = time.perf_counter() + seconds
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
        self._resume.release()
        self._paused.acquire()
        return self.done

    def checkpoint(self) -> None:
        """On the task's thread, between steps: pause when the slice's time is up."""
        if self._cancelled:
            raise SliceCancelledError("cancelled")
        if time.perf_counter() >= self._slice_end:
            self.cpu_seconds += time.thread_time() - self._cpu_mark
            self._paused.release()
            self._resume.acquire()
            self._cpu_mark = time.thread_time()
            if self._cancelled:
                raise SliceCancelledError("cancelled")

    def cancel(self) -> None:
        """The next checkpoint raises; run one more slice (any length) to let it unwind."""
        self._cancelled = True

    def result(self) -> T:
        """The value ``fn`` returned, or the exception it raised (once :attr:`done`)."""
        if not self.done:
            raise RuntimeError("the task has not finished")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _main(self) -> None:
        self._resume.acquire()
        self._cpu_mark = time.thread_time()
        try:
            if self._cancelled:
                raise SliceCancelledError("cancelled")
            self._result = self._fn(self.checkpoint)
        except BaseException as exc:
            self._error = exc
        finally:
            self.cpu_seconds += time.thread_time() - self._cpu_mark
            self.done = True
            self._paused.release()


class OnlineTraining:
    """One model's trainer, stepped by the worker, with auto-commits by policy.

    ``publish(checkpoint, message)`` is called on the worker thread when a commit is
    due; it must only hand the checkpoint over (the app commits it on the event loop).
    ``origin``: the version training resumed from (the run fact ``trained_from``,
    training/resume.py); after each commit stored (:meth:`mark_committed`) the version
    committed, whose step also starts the steps counted as not yet committed.
    """

    def __init__(
        self,
        model: str,
        trainer: Trainer,
        policy: CommitPolicy,
        publish: Callable[[Checkpoint, str], None],
        origin: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.trainer = trainer
        self.policy = policy
        self.publish = publish
        self.origin = origin
        self.committed_step = trainer.step  # the step of the last version stored (or resumed from)
        self.commits = 0
        self.enabled = True
        # Unix times for the alerts (TrainingState): a stall is an old last step while the
        # worker is not holding training back for pricing work (``paused``, set by it)
        self.started = time.time()
        self.last_step = self.started
        self.last_validation: float | None = None
        self.validation_interval: float | None = None
        self.paused = False

    def step(self) -> None:
        t = self.trainer
        t.model.train()
        t.train_step()
        self.last_step = time.time()
        if t.step % t.config.validate_every == 0:
            self._validate()
        val = t.history[-1].p95_bp if t.history else None
        if self.policy.due(t.step, val):
            self.publish(self.checkpoint(), self.policy.render(step=t.step, loss=t.loss_ema, val_bp=val or math.nan))
            self.policy.committed(val)

    def checkpoint(self) -> Checkpoint:
        """The full training state now (validated first, so the manifest has metrics)."""
        t = self.trainer
        if not t.history or t.history[-1].step != t.step:
            self._validate()
        self.commits += 1
        run: dict[str, Any] = {"command": f"spectralmc serve (online training of {self.model})"}
        if self.origin is not None:
            run["trained_from"] = self.origin
        ckpt = t.checkpoint(run=run)
        # The trainer's state dicts alias its live tensors, which the next step updates in
        # place while the event loop encodes this checkpoint: commit copies.
        return Checkpoint(
            ckpt.manifest,
            {k: v.detach().clone() for k, v in ckpt.model.items()},
            {k: v.detach().clone() for k, v in ckpt.training.items()},
        )

    def halt(self) -> int:
        """On the worker: no training step after this one (shutdown); the step reached."""
        self.enabled = False
        return self.trainer.step

    def mark_committed(self, step: int, origin: dict[str, Any]) -> None:
        """A checkpoint taken at ``step`` is stored as the version ``origin`` names (from
        the event loop, after the store said so)."""
        if step >= self.committed_step:
            self.committed_step = step
            self.origin = origin

    def _validate(self) -> None:
        self.trainer.validate()
        now = time.time()
        self.validation_interval = now - (self.started if self.last_validation is None else self.last_validation)
        self.last_validation = now

    def state(self) -> TrainingState:
        t = self.trainer
        v = t.history[-1].as_dict() if t.history else {}
        return TrainingState(
            model=self.model,
            steps=t.step,
            loss=None if math.isnan(t.loss_ema) else t.loss_ema,
            validation_bp={k: float(v[k]) for k in ("p50_bp", "p95_bp", "max_bp") if k in v},
            commits=self.commits,
            last_step=self.last_step,
            last_validation=self.last_validation,
            validation_interval=self.validation_interval,
            paused=self.paused and self.enabled,
        )


class ComputeWorker:
    """Runs submitted callables first and training steps in the gaps, on one thread."""

    def __init__(
        self,
        metrics: EngineCounters,
        training: OnlineTraining | None = None,
        torch_threads: int | None = None,
        idle_gap_seconds: float = 0.0,
    ):
        self.metrics = metrics
        self.training = training
        self.torch_threads = torch_threads
        # A training step starts only after this long without a job: under sustained
        # load the CPU (and the GIL) goes to serving, and training resumes in the lulls.
        self.idle_gap_seconds = idle_gap_seconds
        self._last_job_end = 0.0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="compute-worker", daemon=True)
        self._stopping = False
        self.failure: str | None = None
        self.step_seconds = 0.0  # EWMA of a training step's wall time (0 before the first)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the worker before any further training step."""
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("the compute worker is stopped")
        cf: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, cf))
        return asyncio.wrap_future(cf)

    def mark_failed(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.error("compute engine failed: %s", reason)
        self.metrics.engine_failures.inc()
        if self.training is not None:
            self.training.paused = False  # training stopped: failed, not held back for load

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs, then stop (training stops at once)."""
        self._stopping = True
        self._jobs.put(None)
        self._thread.join(timeout)

    def _training_on(self) -> bool:
        return self.training is not None and self.training.enabled and not self._stopping and self.failure is None

    @property
    def training_delay(self) -> float:
        """The most a job waits for a training step already running (0 without training)."""
        return self.step_seconds if self._training_on() else 0.0

    def _run(self) -> None:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        while True:
            training = self._training_on()
            lull = time.monotonic() - self._last_job_end
            try:
                if not training:
                    item = self._jobs.get(timeout=0.5)
                elif lull >= self.idle_gap_seconds:
                    item = self._jobs.get_nowait()
                else:  # wait out the rest of the gap, unless a job comes first
                    item = self._jobs.get(timeout=self.idle_gap_seconds - lull)
            except queue.Empty:
                if training and time.monotonic() - self._last_job_end >= self.idle_gap_seconds:
                    self._train_step()
                continue
            if item is None:
                if self._stopping:
                    break
                continue
            fn, cf = item
            self._hold_training(training)
            if not cf.set_running_or_notify_cancel():
                continue
            try:
                cf.set_result(fn())
            except BaseException as exc:
                cf.set_exception(exc)
            finally:
                self._last_job_end = time.monotonic()
            # not held until the next job: the job's closure holds its batch's requests,
            # and cf its answers (for a 20,000-contract batch, tens of MB while idle)
            del item, fn, cf

    def _hold_training(self, training: bool) -> None:
        """A job runs instead of a step: training is paused for load (until the next step)."""
        if training and self.training is not None:
            self.training.paused = True

    def _train_step(self) -> None:
        assert self.training is not None
        self.training.paused = False
        t0 = time.perf_counter()
        try:
            self.training.step()
        except Exception as exc:
            self.mark_failed(f"training step failed: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t0
        self.metrics.training_step_seconds.observe(seconds)
        self.step_seconds = seconds if self.step_seconds == 0.0 else 0.8 * self.step_seconds + 0.2 * seconds
