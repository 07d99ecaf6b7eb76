"""ComputeWorker: jobs before training, training only in lulls, a job waits at most
one training step, failures make the engine dead."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import pytest
import torch

from spectralmc_server.engine_service.messages import EngineDeadError
from spectralmc_server.engine_service.worker import ComputeWorker, OnlineTraining
from spectralmc_server.service.metrics import Metrics


class CountingTraining(OnlineTraining):
    """A stand-in trainer whose step takes ``step_seconds`` and is counted."""

    def __init__(self, step_seconds: float = 0.0, fail_at: int | None = None) -> None:
        self.model = "fake"
        self.enabled = True
        self.steps = 0
        self.step_seconds = step_seconds
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def step(self) -> None:
        with self.lock:
            self.steps += 1
            n = self.steps
        if self.fail_at is not None and n >= self.fail_at:
            raise RuntimeError("diverged")
        time.sleep(self.step_seconds)


async def test_training_waits_for_a_lull() -> None:
    training = CountingTraining(step_seconds=0.001)
    worker = ComputeWorker(Metrics(), training, idle_gap_seconds=0.1)
    worker.start()
    try:
        await asyncio.sleep(0.2)
        assert training.steps > 0  # idle: it trains
        before = training.steps
        end = time.monotonic() + 0.6
        while time.monotonic() < end:  # a job every 20 ms: never a 100 ms lull
            assert await worker.submit(lambda: 1) == 1
            await asyncio.sleep(0.02)
        during = training.steps - before
        await asyncio.sleep(0.3)
        assert during <= 1, during  # at most the step already running when load began
        assert training.steps > before + during  # the lull after the load: training again
    finally:
        worker.stop()


async def test_a_job_waits_at_most_one_step() -> None:
    training = CountingTraining(step_seconds=0.05)
    worker = ComputeWorker(Metrics(), training)
    worker.start()
    try:
        await asyncio.sleep(0.12)  # training steps back to back
        waits = []
        for _ in range(5):
            t0 = time.perf_counter()
            await worker.submit(lambda: None)
            waits.append(time.perf_counter() - t0)
            await asyncio.sleep(0.03)
        assert max(waits) < 0.05 + 0.04, waits  # one 50 ms step plus scheduling slack
    finally:
        worker.stop()


async def test_a_failing_training_step_makes_the_engine_dead() -> None:
    worker = ComputeWorker(Metrics(), CountingTraining(fail_at=3))
    worker.start()
    try:
        for _ in range(100):
            if worker.failure is not None:
                break
            await asyncio.sleep(0.01)
        assert worker.failure is not None and "diverged" in worker.failure
        assert not worker.alive
        with pytest.raises(EngineDeadError):
            worker.submit(lambda: None)
    finally:
        worker.stop()


async def test_stop_finishes_queued_jobs() -> None:
    worker = ComputeWorker(Metrics())
    worker.start()

    def slow(i: int) -> int:
        time.sleep(0.01)
        return i

    futures = [worker.submit(functools.partial(slow, i)) for i in range(5)]
    await asyncio.to_thread(worker.stop)
    assert [await f for f in futures] == list(range(5))
    with pytest.raises(EngineDeadError):
        worker.submit(lambda: None)


def test_online_checkpoint_is_a_copy_not_the_live_weights() -> None:
    """The checkpoint handed to the event loop for committing must not change when the
    worker's next training step updates the weights in place."""
    from spectralmc_server.engine.trainer import TrainConfig, Trainer
    from spectralmc_server.training.policy import CommitPolicy

    config = TrainConfig(batch_points=4, paths=64, validate_every=1000, validation_grid=2)
    trainer = Trainer(config)
    try:
        training = OnlineTraining("gbm", trainer, CommitPolicy(), lambda ck, msg: None)
        training.step()
        ckpt = training.checkpoint()
        frozen = {k: v.clone() for k, v in ckpt.model.items()}
        for _ in range(3):
            training.step()
        assert all(torch.equal(ckpt.model[k], frozen[k]) for k in frozen)
        live = trainer.ema.state_dict()
        assert any(not torch.equal(live[k], frozen[k]) for k in frozen)  # training did move on
    finally:
        trainer.close()
