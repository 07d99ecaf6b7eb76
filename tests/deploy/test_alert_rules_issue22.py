"""The gauges behind SpectralMCTrainingStalled and SpectralMCValidationErrorHigh (issue
22, item 9): when training last stepped and validated, and whether the worker is
holding training back for pricing load.

The rules themselves are unit-tested by promtool (deploy/prometheus/alerts_test.yml, run
by tests/deploy/test_alerts.py): a stall fires, a pause for load does not, a stale
validation does not fire ValidationErrorHigh, a fresh high error does. Here: the real
worker and trainer set the gauges as those tests assume, a real server exports them on
/metrics (accepted by ``promtool check metrics``), and sustained pricing load on
loopback sets ``spectralmc_training_paused`` while the last step stays put."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_util import CONTRACT, Client, MakeClient, ServerProcess, block_worker

from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.engine_service.worker import ComputeWorker, OnlineTraining
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.training.policy import CommitPolicy

LAST_STEP = "spectralmc_training_last_step_timestamp_seconds"
LAST_VALIDATION = "spectralmc_training_last_validation_timestamp_seconds"
INTERVAL = "spectralmc_training_validation_interval_seconds"
PAUSED = "spectralmc_training_paused"


# -- the worker and the trainer -----------------------------------------------------------


@pytest.fixture
def training() -> Iterator[OnlineTraining]:
    trainer = Trainer(TrainConfig(batch_points=4, paths=64, validate_every=2, validation_grid=2))
    try:
        yield OnlineTraining("gbm", trainer, CommitPolicy(every_seconds=None), lambda ck, msg: None)
    finally:
        trainer.close()


def test_step_and_validation_times(training: OnlineTraining) -> None:
    t0 = time.time()
    state = training.state()
    assert state.last_step == training.started <= t0  # before the first step: the start
    assert state.last_validation is None and state.validation_interval is None
    assert state.paused is False
    training.step()  # step 1: no validation (every 2)
    state = training.state()
    assert state.last_step is not None and t0 <= state.last_step <= time.time()
    assert state.last_validation is None
    training.step()  # step 2: validated
    first = training.state()
    assert first.last_validation is not None and first.last_step is not None
    assert first.last_step <= first.last_validation <= time.time()
    assert first.validation_interval == pytest.approx(first.last_validation - training.started)
    assert first.validation_bp  # what the alert compares is there
    time.sleep(0.01)
    training.checkpoint()  # a commit validates too (at step 2 already: no new validation)
    assert training.state().last_validation == first.last_validation
    training.step()
    training.step()  # step 4
    second = training.state()
    assert second.last_validation is not None and second.last_validation > first.last_validation
    assert second.validation_interval == pytest.approx(second.last_validation - first.last_validation)


async def wait_for(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_the_worker_sets_paused_while_it_holds_training_back(training: OnlineTraining) -> None:
    worker = ComputeWorker(Metrics(), training, idle_gap_seconds=0.2)
    worker.start()
    try:
        await wait_for(lambda: training.trainer.step >= 2, 30, "no training step within 30 s")
        assert training.state().paused is False  # idle: it trains
        job = worker.submit(lambda: time.sleep(0.4))  # pricing work
        await wait_for(lambda: training.state().paused, 5, "not paused while a job runs")
        held = training.state().last_step
        await asyncio.sleep(0.3)
        assert training.state().paused is True
        assert training.state().last_step == held  # no step while held back
        await job
        await asyncio.sleep(0.1)  # within the idle gap after the job: still held back
        assert training.state().paused is True
        await wait_for(
            lambda: not training.state().paused and (training.state().last_step or 0) > (held or 0),
            5,
            "training did not resume after the idle gap",
        )

        # a failed engine is not a pause: the stall alert must see it
        blocker = worker.submit(lambda: time.sleep(0.3))
        await wait_for(lambda: training.state().paused, 5, "not paused while a job runs")
        worker.mark_failed("a batch failed (test)")
        assert training.state().paused is False
        await blocker
    finally:
        worker.stop()


def test_paused_is_off_while_training_is_disabled(training: OnlineTraining) -> None:
    training.paused = True
    training.enabled = False
    assert training.state().paused is False


# -- a real server ------------------------------------------------------------------------


def gauges(text: str, model: str = "gbm") -> dict[str, float]:
    """This model's sample of every gauge family in a /metrics text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == model and family.type == "gauge" and s.name.startswith("spectralmc_training_"):
                found[s.name] = s.value
    return found


async def scrape(client: Client) -> str:
    r = await client.get("/metrics")
    assert r.status == 200
    return await r.text()


def promtool_check_metrics(text: str) -> None:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed (apt-get install -y prometheus)")
    r = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_a_real_server_exports_the_training_times(make_client: MakeClient) -> None:
    t0 = time.time()
    client = await make_client(models=["gbm"], train={"enabled": True, "validate_every": 3})
    deadline = time.monotonic() + 60
    while True:
        text = await scrape(client)
        g = gauges(text)
        if not math.isnan(g.get(LAST_VALIDATION, math.nan)):
            break
        assert time.monotonic() < deadline, "no validation within 60 s:\n" + text
        await asyncio.sleep(0.05)
    now = time.time()
    assert set(g) >= {LAST_STEP, LAST_VALIDATION, INTERVAL, PAUSED}, g
    assert t0 <= g[LAST_STEP] <= now
    assert t0 <= g[LAST_VALIDATION] <= now
    assert 0 < g[INTERVAL] <= now - t0
    assert g[PAUSED] in (0.0, 1.0)
    await asyncio.sleep(0.3)
    later = gauges(await scrape(client))
    assert later[LAST_STEP] > g[LAST_STEP]  # idle: it keeps training
    assert later[PAUSED] == 0.0
    promtool_check_metrics(text)


async def test_pricing_load_pauses_training_on_a_real_server(make_client: MakeClient) -> None:
    """A bounded loop of valuations on loopback (at most 300 requests and 1.5 s), closer
    together than train.idle_gap_seconds: the worker holds training back, says so, and
    the last step stays put; once the load stops, training resumes."""
    client = await make_client(models=["gbm"], train={"enabled": True, "validate_every": 50, "idle_gap_seconds": 0.5})
    deadline = time.monotonic() + 60
    while LAST_STEP not in gauges(await scrape(client)):  # training resumed and stepping
        assert time.monotonic() < deadline, "no training state within 60 s"
        await asyncio.sleep(0.05)
    start = time.monotonic()
    samples: list[dict[str, float]] = []
    for i in range(300):
        if time.monotonic() - start > 1.5:
            break
        r = await client.post("/v1/price", json={"contracts": [CONTRACT]})
        assert r.status == 200, await r.text()
        if i >= 3 and i % 3 == 0:  # after the step that may have been running at the start
            samples.append(gauges(await scrape(client)))
    assert len(samples) >= 3, samples
    assert all(s[PAUSED] == 1.0 for s in samples), [s[PAUSED] for s in samples]
    assert len({s[LAST_STEP] for s in samples}) == 1, "training stepped under sustained load"
    held = samples[-1][LAST_STEP]
    end = time.monotonic() + 10
    while True:  # the load is over: after the idle gap it trains again
        g = gauges(await scrape(client))
        if g[PAUSED] == 0.0 and g[LAST_STEP] > held:
            break
        assert time.monotonic() < end, f"training did not resume: {g}"
        await asyncio.sleep(0.05)

    # the engine's compute held by one long job is load too
    hold = block_worker(client, 1.0)
    await asyncio.sleep(0.3)
    g = gauges(await scrape(client))
    assert g[PAUSED] == 1.0
    await hold


def test_an_engine_process_exports_them_through_the_server(serve: Callable[..., ServerProcess]) -> None:
    """``spectralmc serve``: the engine trains in a process of its own; its training
    state reaches the server's /metrics, which promtool accepts."""
    t0 = time.time()
    server = serve(
        env={
            "SPECTRALMC_TRAIN__ENABLED": "true",
            "SPECTRALMC_TRAIN__VALIDATE_EVERY": "3",
            "SPECTRALMC_MODELS": '["gbm"]',
        }
    )
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
        g = gauges(text)
        if not math.isnan(g.get(LAST_VALIDATION, math.nan)):
            break
        assert time.monotonic() < deadline, "no validation within 60 s:\n" + text
        time.sleep(0.1)
    now = time.time()
    assert t0 <= g[LAST_STEP] <= now and t0 <= g[LAST_VALIDATION] <= now, g
    assert 0 < g[INTERVAL] <= now - t0 and g[PAUSED] in (0.0, 1.0), g
    promtool_check_metrics(text)
