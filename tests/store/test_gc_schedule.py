"""Store GC on a schedule, two replicas on one real S3 store (SeaweedFS): each round is
run by exactly one of them (the other records a skip), the admin route answers 409
naming the holder while another has the lease, and a holder that crashes with the
lease (a real process, SIGKILLed while it renews) blocks GC no longer than the lease's
TTL. Both replicas are full apps (create_app, engine on a thread) in this process, so
their rounds fall at the same moments (rounds are at multiples of the interval)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_util import TOKEN, AppServer, app_of, settings_for
from store_util import tiny_files

from spectralmc_server.service.app import create_app
from spectralmc_server.service.gc_schedule import STORE_GC, RoundRecord
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.store.lease import LeaseHeldError
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import VersionStore

AUTH = {"Authorization": f"Bearer {TOKEN}"}
INTERVAL = 0.25
TTL = 1.0
SKIPS = {"skipped_lease_held", "skipped_not_due"}

# A process that takes gbm's GC lease (between two rounds' holds) and holds it, renewing,
# until it is killed.
HOLDER = """
import asyncio, sys, orjson
from spectralmc_server.store.lease import LeaseHeldError
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import VersionStore

async def main():
    spec = orjson.loads(sys.argv[1])
    async with S3ObjectStore(spec["bucket"], spec["prefix"], S3Settings(**spec["s3"])) as objects:
        lease = VersionStore(objects, "gbm").gc_lease("crashing holder", spec["ttl"])
        while True:
            try:
                async with lease.hold():
                    print("held", flush=True)
                    await asyncio.sleep(3600)
            except LeaseHeldError:
                await asyncio.sleep(0.02)

asyncio.run(main())
"""


def records(*clients: TestClient[Any, Any]) -> list[tuple[int, RoundRecord]]:
    return [(k, rec) for k, c in enumerate(clients) for rec in app_of(c)[STORE_GC].records]


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def scrape(client: TestClient[Any, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await client.get("/metrics")
    assert r.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await r.text())
        for s in family.samples
    }


def series(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_two_replicas_one_gc_per_round(
    tmp_path: Path,
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    bucket, prefix = make_bucket(), "gc"
    s3 = {
        "endpoint_url": s3_settings.endpoint_url,
        "region": s3_settings.region,
        "access_key_id": s3_settings.access_key_id,
        "secret_access_key": s3_settings.secret_access_key,
    }
    common: dict[str, Any] = {
        "store": f"s3://{bucket}/{prefix}",
        "s3": s3,
        "models": ["gbm", "merton"],
        "store_gc": {"interval_seconds": INTERVAL, "keep": 1, "lease_ttl_seconds": TTL},
    }

    async def replica(name: str) -> TestClient[Any, Any]:
        app = create_app(settings_for(tmp_path / name, **common), Metrics())
        return await aiohttp_client(AppServer(app))

    a = await replica("a")  # seeds the bundled models as version 1
    b = await replica("b")
    async with S3ObjectStore(bucket, prefix, s3_settings) as objects:
        gbm = VersionStore(objects, "gbm")
        for tag in range(2, 7):  # versions 2..6, uncertified: the replicas keep serving version 1
            await gbm.commit_files(tiny_files(tag), f"v{tag}")
        gc_a, gc_b = app_of(a)[STORE_GC], app_of(b)[STORE_GC]
        assert gc_a.holder != gc_b.holder
        joined = time.time()

        # -- rounds: both replicas try each one, exactly one runs it ------------------------
        def shared_rounds() -> int:
            seen = Counter(rec.tick for _, rec in records(a, b) if rec.model == "gbm" and rec.tick > joined)
            return sum(1 for n in seen.values() if n == 2)

        await wait_for(lambda: shared_rounds() >= 5, 20, "5 rounds run by both replicas")
        seen = records(a, b)  # rounds still running have no record yet
        assert not [rec for _, rec in seen if rec.outcome == "failed"]
        by_round: dict[tuple[float, str], list[tuple[int, str]]] = {}
        for k, rec in seen:
            by_round.setdefault((rec.tick, rec.model), []).append((k, rec.outcome))
        both = {key: outcomes for key, outcomes in by_round.items() if len(outcomes) == 2}
        assert len(both) >= 8, by_round  # 5 rounds x 2 models, less the last round's second model
        for (tick, model), outcomes in both.items():
            # one ran it, the other skipped: never two, never none
            assert sorted(o == "done" for _, o in outcomes) == [False, True], (tick, model, outcomes)
            assert all(o in SKIPS | {"done"} for _, o in outcomes), (tick, model, outcomes)
        assert all(sum(o == "done" for _, o in outcomes) <= 1 for outcomes in by_round.values()), by_round

        # versions 2..5 collected once; 6 (the head) and 1 (served by both) kept
        assert await gbm.collected() == {2, 3, 4, 5}
        assert await VersionStore(objects, "merton").collected() == set()

        # /metrics: the rounds each replica ran, and every version collected exactly once
        ma, mb = await scrape(a), await scrape(b)
        runs = "spectralmc_store_gc_runs_total"
        for m, gc in ((ma, gc_a), (mb, gc_b)):
            ran = Counter((rec.model, rec.outcome) for rec in gc.records)
            for model in ("gbm", "merton"):
                for outcome in ("done", "skipped_lease_held", "skipped_not_due", "failed"):
                    got = series(m, runs, model=model, trigger="schedule", outcome=outcome)
                    assert got >= ran[model, outcome]  # the records keep the last 256 rounds
            assert series(m, runs, model="gbm", trigger="schedule", outcome="failed") == 0
        collected = "spectralmc_store_gc_collected_versions_total"
        assert series(ma, collected, model="gbm") + series(mb, collected, model="gbm") == 4
        last = "spectralmc_store_gc_last_run_timestamp_seconds"
        assert max(series(ma, last, model="gbm"), series(mb, last, model="gbm")) > joined

        # -- the admin route: 409 naming the holder while the lease is held elsewhere ------
        desk = gbm.gc_lease("alice at her desk", 30.0)
        for _ in range(40):  # between two rounds' holds
            try:
                await desk.acquire()
                break
            except LeaseHeldError:
                await asyncio.sleep(0.05)
        assert desk.state is not None
        r = await a.post("/v1/admin/models/gbm/gc", json={"keep": 1, "dry_run": False}, headers=AUTH)
        assert r.status == 409, await r.text()
        err = (await r.json())["error"]
        assert err["code"] == "conflict"
        assert "store GC of model 'gbm' is running elsewhere" in err["message"]
        assert "held by 'alice at her desk' until" in err["message"]
        assert err["details"][0]["field"] == "lease" and err["details"][0]["holder"] == "alice at her desk"
        assert err["details"][0]["expires"].endswith("Z")
        r = await a.post("/v1/admin/models/gbm/gc", json={"keep": 1}, headers=AUTH)  # a dry run takes no lease
        assert r.status == 200 and (await r.json())["dry_run"] is True
        done_gbm = [rec.tick for _, rec in records(a, b) if rec.model == "gbm" and rec.outcome == "done"]
        before = max(done_gbm, default=0.0)
        await asyncio.sleep(3 * INTERVAL)
        held = [rec for _, rec in records(a, b) if rec.model == "gbm" and rec.tick > before]
        assert held and all(rec.outcome in SKIPS for rec in held), held  # the schedule waits too
        await desk.release()
        for _ in range(40):  # the schedule holds it a moment each round: a 409 then names a replica
            r = await a.post("/v1/admin/models/gbm/gc", json={"keep": 1, "dry_run": False}, headers=AUTH)
            if r.status == 200:
                break
            assert r.status == 409 and "gc schedule on" in (await r.json())["error"]["message"]
            await asyncio.sleep(0.05)
        assert r.status == 200, await r.text()
        ma = await scrape(a)
        assert series(ma, runs, model="gbm", trigger="admin", outcome="skipped_lease_held") >= 1
        assert series(ma, runs, model="gbm", trigger="admin", outcome="done") == 1

        # -- a holder that crashes: GC resumes within the TTL of its death -------------------
        spec = {"bucket": bucket, "prefix": prefix, "s3": s3, "ttl": TTL}
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, orjson.dumps(spec).decode()],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            assert line == b"held\n", line
            took = time.time()
            await asyncio.sleep(1.5 * TTL)  # alive, renewing: held past its TTL
            alive = [rec for _, rec in records(a, b) if rec.model == "gbm" and rec.started > took + INTERVAL]
            assert alive and all(rec.outcome == "skipped_lease_held" for rec in alive), alive
            merton = [rec for _, rec in records(a, b) if rec.model == "merton" and rec.started > took + INTERVAL]
            assert any(rec.outcome == "done" for rec in merton)  # a lease per model: merton's GC goes on
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        killed = time.time()

        def resumed() -> list[RoundRecord]:
            gbm_rounds = [rec for _, rec in records(a, b) if rec.model == "gbm" and rec.tick > killed]
            return [rec for rec in gbm_rounds if rec.outcome == "done"]

        await wait_for(lambda: bool(resumed()), TTL + 10 * INTERVAL + 5, "GC after the holder died")
        first = min(rec.finished for rec in resumed())
        assert first - killed < TTL + 3 * INTERVAL + 1.0  # blocked no longer than the TTL (+ a round)
        state = await gbm.gc_lease().read()
        assert state is not None and state.holder in (gc_a.holder, gc_b.holder)
