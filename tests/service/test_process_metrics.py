"""Process metrics in /metrics for every process the server runs: the HTTP process and
each engine process (two here, ``engine.processes = 2``), labelled ``process`` as
``spectralmc_process_resident_bytes`` is. Each figure is checked against what Linux says
of that process (``/proc/PID``), so a figure read from the wrong process, or a stale
one, fails; promtool accepts the exposition."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_util import CONTRACT, MakeClient, app_of

from spectralmc_server.service import keys
from spectralmc_server.service.engine_pool import EnginePool

TICK = os.sysconf("SC_CLK_TCK")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/PID/stat, after the command)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def proc_max_fds(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    return int(line.split()[3])


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in got, f"{name}{labels} missing from /metrics"
    return got[key]


async def test_cpu_fds_and_gc_of_every_process(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"], engine={"mode": "process", "processes": 2, "status_seconds": 0.2})
    pool = app_of(client)[keys.ENGINE]
    assert isinstance(pool, EnginePool)
    engine_pids = pool.pids
    assert None not in engine_pids
    pids = {"http": os.getpid(), "engine-0": engine_pids[0], "engine-1": engine_pids[1]}
    r = await client.post("/v1/price", json={"contracts": [CONTRACT]})  # some work on an engine
    assert r.status == 200
    await asyncio.sleep(0.5)  # each engine's status (with its figures) is at most 0.2 s old

    text = await (await client.get("/metrics")).text()
    got = samples(text)
    for name, pid in pids.items():
        assert pid is not None
        cpu = value(got, "spectralmc_process_cpu_seconds_total", process=name)
        now = proc_cpu_seconds(pid)
        # read a moment before /proc here (an engine's up to one status period before)
        assert now - 0.5 <= cpu <= now + 0.02, (name, cpu, now)
        fds = value(got, "spectralmc_process_open_fds", process=name)
        assert fds > 2 and abs(fds - proc_fds(pid)) <= (6 if name == "http" else 2), (name, fds, proc_fds(pid))
        assert value(got, "spectralmc_process_max_fds", process=name) == proc_max_fds(pid)
        for generation in ("0", "1", "2"):
            for family in ("collections", "objects_collected", "objects_uncollectable"):
                assert value(got, f"spectralmc_python_gc_{family}_total", process=name, generation=generation) >= 0
        assert value(got, "spectralmc_python_gc_collections_total", process=name, generation="0") > 0
        assert value(got, "spectralmc_python_gc_frozen_objects", process=name) == 0  # gc_freeze off here
        value(got, "spectralmc_process_resident_bytes", process=name)  # the label RSS has, for the same processes
    # the engines' figures are their own, not the HTTP process's (which runs pytest and more)
    http_cpu = value(got, "spectralmc_process_cpu_seconds_total", process="http")
    assert all(
        abs(value(got, "spectralmc_process_cpu_seconds_total", process=e) - http_cpu) > 0.1
        for e in ("engine-0", "engine-1")
    )

    # live: a full collection in the HTTP process shows at the next scrape
    before = value(got, "spectralmc_python_gc_collections_total", process="http", generation="2")
    gc.collect()
    after = samples(await (await client.get("/metrics")).text())
    assert value(after, "spectralmc_python_gc_collections_total", process="http", generation="2") >= before + 1

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (apt-get install -y prometheus)")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60, check=False
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


async def test_each_engine_freezes_what_it_loaded(make_client: MakeClient) -> None:
    """gc_freeze reaches the engine processes: at ready each has collected once and frozen
    what it loaded, and its young-generation threshold is the setting's. Without it an
    engine's first full collection (over torch's and the models' objects) stalled pricing
    within the first seconds of load: p99 42-103 ms in the first 4 s against ~14 ms after
    (docs/benchmarks.md)."""
    client = await make_client(
        models=["gbm"], engine={"mode": "process", "processes": 2, "status_seconds": 0.2}, gc_freeze=True
    )
    r = await client.post("/v1/price", json={"contracts": [CONTRACT]})
    assert r.status == 200
    await asyncio.sleep(0.5)  # each engine's status is at most 0.2 s old
    got = samples(await (await client.get("/metrics")).text())
    for name in ("http", "engine-0", "engine-1"):
        # an engine holds torch's and the models' objects: hundreds of thousands
        assert value(got, "spectralmc_python_gc_frozen_objects", process=name) > 10_000, name
