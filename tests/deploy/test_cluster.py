"""The deployment topology with real processes on loopback (issue 8).

One S3 server (SeaweedFS), two ``spectralmc serve --role serve`` replicas, one
``--role train`` process (a second joins for the concurrent-commit check) and a real
Prometheus loading ``deploy/prometheus/alerts.yml``, all on 127.0.0.1. A client load
runs against the replicas through every step and records each answer:

1. two versions committed by the trainer, each served by both replicas within one
   poll interval (plus the load of the new weights), no failed request through the swaps;
2. Prometheus scrapes every process and loads the alert rules;
3. the object store stopped for 6 s under load: no failed pricing request, /readyz of
   both replicas says ``degraded`` with the reason, and after the store returns the
   replicas serve a new version again;
4. two trainers commit concurrently: one linear chain of versions, ``verify`` ok;
5. one replica SIGKILLed: the other keeps answering, and Prometheus sees it down (its
   SpectralMCTargetDown alert pending).

The steps share the processes, so they run as one test, in that order.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.seaweed import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, boto3_client, free_ports

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
TOKEN = "cluster-admin-token"
BUCKET = "spectralmc"
POLL_SECONDS = 1.0
LOAD_SECONDS_ALLOWANCE = 1.0  # fetching and loading a new version after the poll that finds it
MAX_BACKOFF_SECONDS = 2.0
OUTAGE_SECONDS = 6.0  # several of the replicas' 1 s polls fail in it
SWAPS = 2  # commits served through under load (step 1; each certifies: seconds under load)
RACE_ROUNDS = 1  # rounds of two concurrent commits (step 4)
CONTRACTS = [
    {"id": "c", "right": "call", "strike": 105.0, "spot": 100.0, "expiry_years": 0.5, "vol": 0.25},
    {"id": "p", "right": "put", "strike": 95.0, "spot": 100.0, "expiry_years": 1.0, "vol": 0.3, "rate": 0.02},
]

pytestmark = pytest.mark.slow


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Cluster:
    tmp: Path
    s3: SeaweedFS
    env: dict[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)

    def start(self, name: str, role: str, port: int) -> Proc:
        log = self.tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--role", role, "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--store", f"s3://{BUCKET}/models", "--data-dir", str(self.tmp / name)]
        cmd += ["--log-level", "info"]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.procs[name] = Proc(name, proc, port, log)
        return self.procs[name]

    def wait_ready(self, *names: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            p = self.procs[name]
            while True:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.proc.returncode}:\n{p.log_tail()}")
                try:
                    with urllib.request.urlopen(f"{p.url}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready within {timeout} s:\n{p.log_tail()}")
                time.sleep(0.2)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.proc.wait(30)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    data = tmp_path / "s3"
    data.mkdir()
    s3 = SeaweedFS(data, tmp_path / "weed.log")
    s3.start()
    boto3_client(s3.endpoint_url).create_bucket(Bucket=BUCKET)
    env = {
        **os.environ,
        "SPECTRALMC_MODELS": '["gbm"]',
        "SPECTRALMC_POLL_SECONDS": str(POLL_SECONDS),
        "SPECTRALMC_POLL_MAX_BACKOFF_SECONDS": str(MAX_BACKOFF_SECONDS),
        "SPECTRALMC_ADMIN_TOKEN": TOKEN,
        "SPECTRALMC_S3__ENDPOINT_URL": s3.endpoint_url,
        "SPECTRALMC_S3__REGION": REGION,
        "SPECTRALMC_S3__ACCESS_KEY_ID": ACCESS_KEY,
        "SPECTRALMC_S3__SECRET_ACCESS_KEY": SECRET_KEY,
        "SPECTRALMC_S3__MAX_ATTEMPTS": "2",
        "SPECTRALMC_S3__TIMEOUT_SECONDS": "2",
        "SPECTRALMC_TORCH_THREADS": "1",
        "SPECTRALMC_TRAIN__MODEL": "gbm",
        "SPECTRALMC_TRAIN__COMMIT_EVERY_SECONDS": "1000000",  # commits come from the admin route here
        "SPECTRALMC_TRAIN__VALIDATE_EVERY": "1000000",
    }
    c = Cluster(tmp_path, s3, env)
    try:
        yield c
    finally:
        c.stop_all()
        s3.stop()


# -- the client load -----------------------------------------------------------------------


@dataclass
class Answer:
    t: float  # sent
    done: float  # answered or failed
    target: str
    status: int  # 0: no HTTP answer (connection refused or reset)
    version: int | None
    error: str = ""


class Load:
    """``per_target`` clients per replica pricing in a loop until stopped."""

    def __init__(self, session: aiohttp.ClientSession, targets: dict[str, str], per_target: int = 2) -> None:
        self.session = session
        self.targets = dict(targets)
        self.answers: list[Answer] = []
        self.stopped = asyncio.Event()
        self.tasks = [asyncio.create_task(self._client(name)) for name in self.targets for _ in range(per_target)]

    async def _client(self, name: str) -> None:
        body = {"contracts": CONTRACTS, "measures": ["price", "delta"]}
        while not self.stopped.is_set() and name in self.targets:
            t = time.monotonic()
            try:
                async with self.session.post(f"{self.targets[name]}/v1/price", json=body) as r:
                    out = await r.json()
                    version = out["models"]["gbm"]["version"] if r.status == 200 else None
                    error = "" if r.status == 200 else str(out)
                    self.answers.append(Answer(t, time.monotonic(), name, r.status, version, error))
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.answers.append(Answer(t, time.monotonic(), name, 0, None, repr(exc)))
                await asyncio.sleep(0.05)

    def drop(self, name: str) -> None:
        """Stop sending to ``name`` (what a load balancer does once its probes fail)."""
        self.targets.pop(name, None)

    async def stop(self) -> None:
        self.stopped.set()
        await asyncio.gather(*self.tasks)

    def since(self, t0: float, target: str | None = None) -> list[Answer]:
        return [a for a in self.answers if a.t >= t0 and (target is None or a.target == target)]

    def failures(self, t0: float = 0.0, target: str | None = None) -> list[Answer]:
        return [a for a in self.since(t0, target) if a.status != 200]


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.json()


async def commit(session: aiohttp.ClientSession, trainer: Proc, message: str) -> dict[str, Any]:
    url = f"{trainer.url}/v1/admin/models/gbm/commit"
    async with session.post(url, json={"message": message}, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        body = await r.json()
        assert r.status == 201, (r.status, body)
        return dict(body)


async def served_version(session: aiohttp.ClientSession, replica: Proc) -> int | None:
    status, body = await get_json(session, f"{replica.url}/v1/models")
    assert status == 200, body
    version: int | None = next(m["version"] for m in body["models"] if m["name"] == "gbm")
    return version


async def wait_served(session: aiohttp.ClientSession, replicas: list[Proc], version: int, timeout: float) -> float:
    """Seconds until every replica serves ``version`` (polled every 20 ms)."""
    t0 = time.monotonic()
    pending = list(replicas)
    while pending:
        pending = [r for r in pending if (await served_version(session, r)) != version]
        if not pending:
            break
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{[r.name for r in pending]} do not serve version {version} after {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


# -- Prometheus ----------------------------------------------------------------------------


def start_prometheus(c: Cluster, port: int) -> Proc:
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus is not installed: apt-get install -y prometheus"
    jobs = {
        "spectralmc-api": [c.procs["api-1"], c.procs["api-2"]],
        "spectralmc-trainer": [c.procs["trainer-1"]],
    }
    lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s", "rule_files:", f"  - {ALERTS}"]
    lines.append("scrape_configs:")
    for job, procs in jobs.items():
        targets = ", ".join(f"'127.0.0.1:{p.port}'" for p in procs)
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: [{targets}]"]
    config = c.tmp / "prometheus.yml"
    config.write_text("\n".join(lines) + "\n")
    log = c.tmp / "prometheus.log"
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={c.tmp / 'tsdb'}"]
    cmd += [f"--web.listen-address=127.0.0.1:{port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    c.procs["prometheus"] = Proc("prometheus", proc, port, log)
    return c.procs["prometheus"]


async def prometheus_api(session: aiohttp.ClientSession, prom: Proc, path: str) -> Any:
    async with session.get(f"{prom.url}/api/v1/{path}") as r:
        body = await r.json()
        assert r.status == 200 and body["status"] == "success", body
        return body["data"]


async def wait_targets(session: aiohttp.ClientSession, prom: Proc, want: dict[str, str], timeout: float) -> None:
    """Until Prometheus reports each target (host:port) with the health wanted."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            data = await prometheus_api(session, prom, "targets")
            seen = {t["labels"]["instance"]: t["health"] for t in data["activeTargets"]}
            if all(seen.get(k) == v for k, v in want.items()):
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.25)
    raise AssertionError(f"Prometheus targets {seen}, wanted {want}:\n{prom.log_tail()}")


# -- the test ------------------------------------------------------------------------------


async def test_cluster(cluster: Cluster) -> None:
    c = cluster
    t_test = time.monotonic()

    def mark(what: str) -> None:
        print(f"[{time.monotonic() - t_test:6.1f} s] {what}", flush=True)

    ports = free_ports(5)
    # All three start on the empty bucket at once: one of them seeds the bundled model as
    # version 1 (a compare-and-swap), the others find it there.
    c.start("trainer-1", "train", ports[0])
    api = [c.start("api-1", "serve", ports[1]), c.start("api-2", "serve", ports[2])]
    c.wait_ready("trainer-1", "api-1", "api-2")
    mark("trainer and two replicas ready")
    trainer = c.procs["trainer-1"]

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        load = Load(session, {p.name: p.url for p in api})
        await asyncio.sleep(1.0)

        # 1. Swaps under load, each reaching both replicas within one poll interval
        # (each commit certifies its version: a few seconds of this 2-core machine under load).
        lags: list[float] = []
        versions: list[int] = []
        t_start = time.monotonic()
        for i in range(SWAPS):
            out = await commit(session, trainer, f"cluster swap {i + 1}")
            versions.append(out["version"])
            lags.append(await wait_served(session, api, out["version"], timeout=10 * POLL_SECONDS))
            await asyncio.sleep(0.3)
        assert versions == list(range(2, SWAPS + 2)), versions  # one seed, then the commits
        assert max(lags) <= POLL_SECONDS + LOAD_SECONDS_ALLOWANCE, lags
        during = load.since(t_start)
        assert len(during) > 20 and not load.failures(t_start), load.failures(t_start)[:5]
        for p in api:  # each replica's answers name versions that only go forward
            seen = [a.version for a in during if a.target == p.name and a.version is not None]
            assert seen == sorted(seen) and seen[-1] == versions[-1], (p.name, seen[-10:])
        print(f"swap lag per version (s): {[round(x, 3) for x in lags]}; {len(during)} requests, none failed")

        mark("swaps done")
        c.start("trainer-2", "train", ports[4])  # for step 4; it starts while step 2 runs
        # 2. Prometheus scrapes every process and loads the alert rules.
        prom = start_prometheus(c, ports[3])
        want = {f"127.0.0.1:{p.port}": "up" for p in (*api, trainer)}
        await wait_targets(session, prom, want, timeout=60)
        groups = (await prometheus_api(session, prom, "rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert groups and rules and all(r["health"] == "ok" for r in rules), rules
        assert {r["name"] for r in rules if r["type"] == "alerting"} >= {"SpectralMCNotReady", "SpectralMCTargetDown"}
        await asyncio.sleep(2.5)  # a scrape after the last swap
        data = await prometheus_api(session, prom, "query?query=spectralmc_model_version")
        served = {s["metric"]["instance"]: float(s["value"][1]) for s in data["result"]}
        assert all(served.get(f"127.0.0.1:{p.port}") == versions[-1] for p in api), served

        mark("Prometheus checked")
        await asyncio.to_thread(c.wait_ready, "trainer-2")  # up before the outage, which it rides out too
        # 3. The object store down under load.
        t_down = time.monotonic()
        await asyncio.to_thread(c.s3.stop)
        degraded: dict[str, str] = {}
        while time.monotonic() - t_down < OUTAGE_SECONDS:
            for p in api:
                status, body = await get_json(session, f"{p.url}/readyz")
                assert status == 200, body  # still ready: it answers from its version
                if body["status"] == "degraded":
                    degraded[p.name] = body["degraded"][0]
            await asyncio.sleep(0.25)
        assert set(degraded) == {"api-1", "api-2"}, degraded
        assert all(d.startswith(f"gbm: serving version {versions[-1]};") for d in degraded.values()), degraded
        outage = load.since(t_down)
        assert len(outage) > 10 and not load.failures(t_down), load.failures(t_down)[:5]
        await asyncio.to_thread(c.s3.start)
        t_back = time.monotonic()
        out = await commit(session, trainer, "after the outage")  # the trainer writes again
        resume = await wait_served(session, api, out["version"], timeout=30)
        for p in api:
            status, body = await get_json(session, f"{p.url}/readyz")
            assert status == 200 and body["status"] == "ready" and body["degraded"] == [], body
        for p in api:  # and the logs say what happened, once each way
            text = p.log.read_text(errors="replace")
            assert "model gbm: store poll failed (1 in a row; serving version" in text, p.log_tail()
            assert "model gbm: store polls succeed after" in text, p.log_tail()
        versions.append(out["version"])
        print(
            f"store outage {OUTAGE_SECONDS:.0f} s: {len(outage)} requests, none failed; new version served "
            f"{time.monotonic() - t_back:.2f} s after the store returned (wait after commit {resume:.2f} s)"
        )

        mark("store outage done")
        # 4. Two trainers commit concurrently: one linear chain.
        trainers = [trainer, c.procs["trainer-2"]]
        made: list[int] = []
        for rnd in range(RACE_ROUNDS):
            outs = await asyncio.gather(*(commit(session, t, f"race {rnd} from {t.name}") for t in trainers))
            made += [o["version"] for o in outs]
        assert sorted(made) == list(range(versions[-1] + 1, versions[-1] + 1 + 2 * RACE_ROUNDS)), made
        status, listing = await get_json(session, f"{trainer.url}/v1/admin/models/gbm/versions")
        assert status == 200
        numbers = [v["version"] for v in listing["versions"]]
        assert numbers == list(range(1, max(made) + 1)), numbers
        status, report = await get_json(session, f"{api[0].url}/v1/admin/models/gbm/verify")
        assert status == 200 and report["ok"] and report["problems"] == [], report
        assert report["versions"] == max(made) and report["head"] == max(made), report

        mark("concurrent commits done")
        # 5. SIGKILL one replica: the other keeps serving; Prometheus sees it down.
        await wait_served(session, api, max(made), timeout=10 * POLL_SECONDS)
        t_kill = time.monotonic()
        api[0].proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(api[0].proc.wait, 10)
        load.drop("api-1")  # its clients stop, as a load balancer's would once probes fail
        await asyncio.sleep(3.0)
        survivor = load.since(t_kill, "api-2")
        assert len(survivor) > 5 and not load.failures(t_kill, "api-2"), load.failures(t_kill, "api-2")[:5]
        await wait_targets(session, prom, {f"127.0.0.1:{api[0].port}": "down"}, timeout=30)
        killed = f"127.0.0.1:{api[0].port}"
        for _ in range(60):  # the rule sees it: SpectralMCTargetDown pending (it fires after its `for`)
            alerts = (await prometheus_api(session, prom, "alerts"))["alerts"]
            down = [a for a in alerts if a["labels"]["alertname"] == "SpectralMCTargetDown"]
            if down:
                break
            await asyncio.sleep(0.25)
        assert [(a["labels"]["instance"], a["state"]) for a in down] == [(killed, "pending")], alerts
        await load.stop()
        mark("replica kill done")

    total = load.answers
    print(
        f"{len(total)} requests in all; failures only at the killed replica: "
        f"{sum(a.status != 200 for a in total if a.target == 'api-1')}"
    )
    assert not [a for a in total if a.status != 200 and a.target != "api-1"]
    assert not [a for a in total if a.status != 200 and a.done < t_kill]  # only requests the kill cut off
    assert json.dumps(report)  # the verify report is plain JSON
