"""Online training's start and end as the operator sees them (issue 22, item 11).

At start :func:`announce` logs what trains, from which version, and, for role ``all``
(which trains in the gaps between pricing batches), that idle training keeps a core
busy and which setting turns it off.

At graceful shutdown :func:`commit_at_shutdown` stops training, lets the auto-commits
under way finish, then commits the steps trained since the last commit when
``train.commit_on_shutdown`` is on, their validation p95 beats the served version's
(and, with ``train.commit_if_improved``, every version this run committed or resumed
from: the auto-commit's rule) and they pass the quality gate; all of it within
``train.shutdown_commit_seconds``. Either way it logs one line saying what happened to
those steps: ``committed version N (steps X..Y)`` or ``discarded K steps since last
commit (steps X..Y): reason``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.engine_service.messages import EngineDeadError
from spectralmc_server.engine_service.worker import ComputeWorker, OnlineTraining
from spectralmc_server.settings import Settings
from spectralmc_server.training.commit import CommitOutcome

log = logging.getLogger(__name__)

# how a role-all server says that it trains, and how to stop it (tests look for it)
TURN_OFF = "set train.enabled = false ([train] in the config file, or SPECTRALMC_TRAIN__ENABLED=false)"


def announce(settings: Settings, training: OnlineTraining, version: int, how: str, head: int | None) -> None:
    """The start-up line: what trains, from which version (``how`` it was named; ``head``:
    the head now, named when it is another), and (role all) how to turn it off."""
    t = settings.train
    notes = [] if how.startswith("version") else [how]
    if head is not None and head != version:
        notes.append(f"the head is version {head}, and commits go on top of it")
    what = f"{training.model} on {t.device} from step {training.trainer.step} of version {version}"
    what += f" ({'; '.join(notes)})" if notes else ""
    if settings.role == "all":
        log.info(
            "idle training is on: this server trains %s, between pricing batches, which keeps a %s busy "
            "whenever pricing leaves it idle; to serve only, %s",
            what,
            "GPU" if training.trainer.device.type == "cuda" else "CPU core",
            TURN_OFF,
        )
    else:
        log.info("training %s", what)
    if not t.commit_on_shutdown:
        log.info("train.commit_on_shutdown is false: steps not committed by then are discarded at shutdown")


def validation_p95(manifest: Mapping[str, Any]) -> float | None:
    """A manifest's validation p95 (bp), if it has a finite one."""
    metrics = manifest.get("metrics")
    validation = metrics.get("validation") if isinstance(metrics, dict) else None
    value = validation.get("p95_bp") if isinstance(validation, dict) else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass(frozen=True)
class ShutdownOutcome:
    """What :func:`commit_at_shutdown` did with the steps since the last commit."""

    first: int  # the first step not committed before shutdown
    last: int  # the step training stopped at
    version: int | None = None  # committed as this version
    reason: str | None = None  # why they were discarded (None: committed, or no steps)

    @property
    def steps(self) -> int:
        return max(0, self.last - self.first + 1)


async def commit_at_shutdown(
    training: OnlineTraining,
    worker: ComputeWorker,
    settings: Settings,
    *,
    in_flight: Collection[asyncio.Task[None]],
    served: Callable[[], tuple[int, float | None] | None],
    commit: Callable[[Checkpoint, str], Awaitable[CommitOutcome]],
) -> ShutdownOutcome:
    """Commit, or discard with a reason, the steps trained since the last commit (see the
    module docstring); logs one line either way. ``in_flight``: auto-commits under way
    (cancelled past the time limit); ``served``: the served version and its validation
    p95, if any; ``commit``: the gated commit (certify, gate, commit on top of the head)."""
    t = settings.train
    limit = t.shutdown_commit_seconds
    name = training.model
    step = training.trainer.step
    try:
        async with asyncio.timeout(limit):
            if worker.alive:
                step = await worker.submit(training.halt)  # no step after this one
            if in_flight:  # they move the last commit (each logs its own outcome)
                await asyncio.wait(list(in_flight))
            first = training.committed_step + 1
            outcome = await _decide(training, worker, settings, step, served, commit)
    except TimeoutError:
        pending = list(in_flight)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        first = training.committed_step + 1
        outcome = ShutdownOutcome(
            first,
            step,
            reason=f"the shutdown commit did not finish within train.shutdown_commit_seconds ({limit:g} s)",
        )
    except Exception as exc:  # the store failed, the engine failed mid-way: say so, do not hang
        first = training.committed_step + 1
        outcome = ShutdownOutcome(first, step, reason=f"the shutdown commit failed: {type(exc).__name__}: {exc}")
    _report(name, outcome, training)
    return outcome


async def _decide(
    training: OnlineTraining,
    worker: ComputeWorker,
    settings: Settings,
    step: int,
    served: Callable[[], tuple[int, float | None] | None],
    commit: Callable[[Checkpoint, str], Awaitable[CommitOutcome]],
) -> ShutdownOutcome:
    t = settings.train
    first = training.committed_step + 1
    if step < first:
        return ShutdownOutcome(first, step)
    if not worker.alive:
        return ShutdownOutcome(first, step, reason=f"the engine failed: {worker.failure or 'the worker stopped'}")
    if not t.commit_on_shutdown:
        return ShutdownOutcome(first, step, reason="train.commit_on_shutdown is false")
    try:
        ckpt = await worker.submit(training.checkpoint)  # validated at this step
    except EngineDeadError as exc:
        return ShutdownOutcome(first, step, reason=f"the engine failed: {exc}")
    val = validation_p95(ckpt.manifest)
    if val is None:
        return ShutdownOutcome(first, step, reason="its validation gave no p95")
    now = served()
    if now is not None and now[1] is not None and not val < now[1]:
        return ShutdownOutcome(
            first,
            step,
            reason=f"validation p95 {val:.4g} bp does not beat served version {now[0]} ({now[1]:.4g} bp)",
        )
    policy = training.policy
    if policy.only_if_improved and not policy.improves(val):
        return ShutdownOutcome(
            first,
            step,
            reason=f"validation p95 {val:.4g} bp does not beat the versions this run resumed from or committed "
            "(train.commit_if_improved)",
        )
    loss = training.trainer.loss_ema
    message = policy.render(step=step, loss=loss, val_bp=val) + " (at shutdown)"
    outcome = await commit(ckpt, message)
    if outcome.stored is None:
        return ShutdownOutcome(first, step, reason=f"it {outcome.gate.describe()}")
    from spectralmc_server.training.resume import trained_from

    training.mark_committed(step, trained_from(outcome.stored.version, outcome.stored.content_hash))
    return ShutdownOutcome(first, step, version=outcome.stored.version)


def _report(name: str, outcome: ShutdownOutcome, training: OnlineTraining) -> None:
    span = f"steps {outcome.first}..{outcome.last}"
    if outcome.version is not None:
        log.info("online training of %s at shutdown: committed version %d (%s)", name, outcome.version, span)
    elif outcome.reason is None:
        origin = training.origin or {}
        log.info(
            "online training of %s at shutdown: no steps trained since the last commit (version %s, step %d)",
            name,
            origin.get("version", origin.get("checkpoint", "?")),
            outcome.last,
        )
    else:
        log.warning(
            "online training of %s at shutdown: discarded %d steps since last commit (%s): %s",
            name,
            outcome.steps,
            span,
            outcome.reason,
        )
