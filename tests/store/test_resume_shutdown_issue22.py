"""Training resumes from a pin or any version, and idle training is never silently lost
(issue 22, items 2 and 11), on the session's SeaweedFS (real S3).

- ``spectralmc train --store --resume pin`` / ``--resume N``: the commit holds exactly
  the bits of that version's state trained on (the content hash of an in-process
  continuation), goes on top of the current head (the chain stays linear), and its
  manifest's run facts name the version it trained from; no pin is one line, exit 2.
- online training with ``train.resume_from = "pin"`` (and a number) starts from that
  version; an admin commit lands on the head and names the pin as what it trained from;
  at shutdown, with ``train.commit_on_shutdown`` off, the steps since then are logged as
  discarded, with the reason.
- a real ``spectralmc serve`` (role all) says at start that idle training uses a core and
  which setting turns it off, and on SIGTERM commits the steps it trained, which beat the
  version it serves, logging the version and the steps.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from conftest import SeaweedFS
from server_util import TOKEN, ServerProcess, settings_for

from spectralmc_server.cli import main
from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.service import keys
from spectralmc_server.service.app import create_app
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import StoredVersion, VersionStore

TINY: dict[str, Any] = {
    "batch_points": 16,
    "paths": 64,
    "validate_every": 5,
    "validation_grid": 3,
    "schedule_steps": 400,
    "network": {"width": 8, "depth": 1},
}
# A gate a 10-step model passes (normalised price error up to 1 = 100% of spot): its
# commits are certified (a few seconds for these tiny models) and pass.
LOOSE_GATE = {"gbm": {"price": {"p95": 1.0, "max": 1.0}}}
UNQUALIFIED = ("--no-certify", "--allow-unqualified")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def s3_table(s3: S3Settings) -> dict[str, Any]:
    return {
        "endpoint_url": s3.endpoint_url,
        "region": s3.region,
        "access_key_id": s3.access_key_id,
        "secret_access_key": s3.secret_access_key,
    }


async def open_versions(s3: S3Settings, bucket: str) -> tuple[S3ObjectStore, VersionStore]:
    objects = await S3ObjectStore(bucket, "models", s3).open()
    return objects, VersionStore(objects, "gbm")


def tiny_state(seed: int, steps: int) -> Checkpoint:
    t = Trainer(TrainConfig.model_validate({**TINY, "seed": seed}))
    try:
        t.run(steps)
        return t.checkpoint(run={"command": "test"})
    finally:
        t.close()


async def seed_store(vs: VersionStore) -> list[StoredVersion]:
    """v1: seed 0 at step 10; v2, v3: another run (seed 1) at steps 20 and 30, so a state
    resumed from v1 is told from one resumed from the head by its config."""
    out = [await vs.commit(tiny_state(0, 10), "v1")]
    for steps in (20, 30):
        out.append(await vs.commit(tiny_state(1, steps), f"seed 1 step {steps}"))
    return out


def continued(ckpt: Checkpoint, steps: int) -> str:
    """The content hash of ``ckpt``'s state trained ``steps`` more steps, as train --store
    commits it (validated at its last step)."""
    t = Trainer.from_checkpoint(ckpt)
    try:
        t.run(steps)
        if not t.history or t.history[-1].step != t.step:
            t.validate()
        return t.checkpoint().content_hash
    finally:
        t.close()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- spectralmc train --resume pin / N ---------------------------------------------------


def test_cli_resumes_from_the_pin_and_from_a_version(
    seaweedfs: SeaweedFS,
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket = make_bucket()
    for key, value in {
        "AWS_ENDPOINT_URL": seaweedfs.endpoint_url,
        "AWS_ACCESS_KEY_ID": str(s3_settings.access_key_id),
        "AWS_SECRET_ACCESS_KEY": str(s3_settings.secret_access_key),
        "AWS_REGION": str(s3_settings.region),
    }.items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{bucket}/models"

    async def setup() -> tuple[list[StoredVersion], Checkpoint, Checkpoint]:
        objects, vs = await open_versions(s3_settings, bucket)
        try:
            seeded = await seed_store(vs)
            await vs.pin(2, "test", force=True)
            return seeded, await vs.load(2, need_training=True), await vs.load(1, need_training=True)
        finally:
            await objects.close()

    seeded, v2, v1 = asyncio.run(setup())
    train = ("train", "--process", "gbm", "--store", uri, "--steps", "5", *UNQUALIFIED)

    code, out, err = cli(capsys, *train, "--resume", "pin")
    assert code == 0, err
    assert '"committed":[4]' in out and '"step":25' in out
    assert "resuming from version 2 (the pinned version) at step 20" in err
    code, out, err = cli(capsys, *train, "--resume", "1", "--quiet")
    assert code == 0, err
    assert '"committed":[5]' in out and '"step":15' in out

    async def read() -> tuple[list[StoredVersion], dict[str, Any], dict[str, Any]]:
        objects, vs = await open_versions(s3_settings, bucket)
        try:
            m4, m5 = await vs.manifest(4), await vs.manifest(5)
            assert m4 is not None and m5 is not None
            return await vs.versions(), m4, m5
        finally:
            await objects.close()

    versions, m4, m5 = asyncio.run(read())
    v4, v5 = versions[3], versions[4]
    # The same bits as continuing that version's state, whatever the head was
    assert v4.record["content_hash"] == continued(v2, 5)
    assert v5.record["content_hash"] == continued(v1, 5)
    # ... committed on top of the head: one linear chain
    assert v4.record["parent"] == seeded[2].record_hash and v5.record["parent"] == v4.record_hash
    # ... and the manifest's run facts (outside the content hash) name what it trained from
    assert m4["run"]["trained_from"] == {"version": 2, "content_hash": v2.content_hash}
    assert m5["run"]["trained_from"] == {"version": 1, "content_hash": v1.content_hash}
    assert m4["training"]["seed"] == 1 and m5["training"]["seed"] == 0
    code, out, _ = cli(capsys, "store", "--store", uri, "--model", "gbm", "inspect", "5", "--json")
    assert code == 0 and orjson.loads(out)["manifest"]["run"]["trained_from"] == m5["run"]["trained_from"]

    # Nothing pinned, no such version: one line each, exit 2, nothing committed
    assert cli(capsys, "store", "--store", uri, "--model", "gbm", "unpin")[0] == 0
    for where, needle in (("pin", "is not pinned"), ("9", "has no version 9 (the newest is 5)"), ("0", "'pin'")):
        code, out, err = cli(capsys, *train, "--resume", where)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (where, code, out, err)
        assert needle in err and "Traceback" not in err, err
    code, _, err = cli(capsys, "train", "--process", "gbm", "--steps", "1", "--resume", "pin")
    assert code == 2 and "needs --store" in err
    code, out, _ = cli(capsys, "store", "--store", uri, "--model", "gbm", "list", "--json")
    assert code == 0 and '"version":6' not in out


# -- online training: train.resume_from ---------------------------------------------------


async def test_online_training_resumes_from_the_pin(
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    caplog.set_level(logging.INFO, logger="spectralmc_server")
    bucket = make_bucket()
    objects, vs = await open_versions(s3_settings, bucket)
    try:
        seeded = await seed_store(vs)
        await vs.pin(1, "test", force=True)  # uncertified: served only because forced

        def settings(**train: Any) -> Any:
            return settings_for(
                tmp_path,
                store=f"s3://{bucket}/models",
                s3=s3_table(s3_settings),
                models=["gbm"],
                seed_bundled=False,
                certificate={"gate": LOOSE_GATE},
                train={
                    "enabled": True,
                    "validate_every": 5,
                    "idle_gap_seconds": 0.0,
                    "commit_every_seconds": None,
                    "commit_on_shutdown": False,
                    **train,
                },
            )

        client = await aiohttp_client(create_app(settings(resume_from="pin"), Metrics()))
        assert (
            "from step 10 of version 1 (the pinned version; the head is version 3, and commits go on top of it)"
            in caplog.text
        )
        r = await client.post("/v1/admin/models/gbm/commit", json={"message": "from the pin"}, headers=AUTH)
        assert r.status == 201, await r.text()
        committed = await r.json()
        assert committed["version"] == 4
        await client.close()  # shutdown: commit_on_shutdown is off, so the steps since are discarded
        lines = [r.getMessage() for r in caplog.records if "online training of gbm at shutdown" in r.getMessage()]
        assert len(lines) == 1, lines
        span = re.search(r"discarded (\d+) steps since last commit \(steps (\d+)\.\.(\d+)\): (.*)", lines[0])
        assert span is not None, lines
        assert int(span[2]) == committed["step"] + 1 and int(span[1]) == int(span[3]) - int(span[2]) + 1
        assert span[4] == "train.commit_on_shutdown is false"

        v4 = await vs.version(4)
        m4 = await vs.manifest(4)
        assert m4 is not None
        assert v4.record["parent"] == seeded[2].record_hash  # on top of the head, not of the pin
        assert m4["run"]["trained_from"] == {"version": 1, "content_hash": seeded[0].record["content_hash"]}
        assert m4["training"]["seed"] == 0 and m4["state"]["step"] == committed["step"] > 10

        # A version number; and "pin" with nothing pinned: no training, and the note says why
        caplog.clear()
        client = await aiohttp_client(create_app(settings(resume_from=2), Metrics()))
        assert "from step 20 of version 2 (the head is version 4, and commits go on top of it)" in caplog.text
        await client.close()
        await vs.unpin("test")
        client = await aiohttp_client(create_app(settings(resume_from="pin"), Metrics()))
        r = await client.get("/readyz")
        body = await r.json()
        assert body["training"] is None
        assert body["training_note"] == "train.resume_from = 'pin': model 'gbm' is not pinned (servers track the head)"
        assert "online training of gbm is off: train.resume_from = 'pin'" in caplog.text
        assert client.app is not None and client.app.get(keys.TRAINING) is None
        await client.close()
    finally:
        await objects.close()


async def test_shutdown_discards_what_does_not_beat_the_served_version(
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    """The served version's validation p95 is out of reach (1e-6 bp), so the steps trained
    at shutdown are discarded, not committed, and the log says why; a shutdown commit
    that cannot finish within train.shutdown_commit_seconds is given up, and says so."""
    caplog.set_level(logging.INFO, logger="spectralmc_server")
    bucket = make_bucket()
    objects, vs = await open_versions(s3_settings, bucket)
    try:
        await vs.commit(tiny_state(0, 10), "v1")
        best = tiny_state(1, 10)
        best.manifest["metrics"]["validation"]["p95_bp"] = 1e-6
        await vs.commit(best, "v2: out of reach")
        await vs.pin(2, "test", force=True)

        async def run(hold: float, **train: Any) -> str:
            caplog.clear()
            settings = settings_for(
                tmp_path,
                store=f"s3://{bucket}/models",
                s3=s3_table(s3_settings),
                models=["gbm"],
                seed_bundled=False,
                train={"enabled": True, "resume_from": 1, "validate_every": 5, "idle_gap_seconds": 0.0, **train},
            )
            client = await aiohttp_client(create_app(settings, Metrics()))
            app = client.app
            assert app is not None

            def steps() -> int:
                state = app[keys.ENGINE].status.training
                return 0 if state is None else state.steps

            deadline = time.monotonic() + 20
            while steps() < 12 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            held = app[keys.ENGINE].hold(hold) if hold else None
            await client.close()
            if held is not None:
                await held
            lines = [r.getMessage() for r in caplog.records if "online training of gbm at shutdown" in r.getMessage()]
            assert len(lines) == 1, lines
            return lines[0]

        line = await run(0.0)
        found = re.search(r"discarded (\d+) steps since last commit \(steps 11\.\.(\d+)\): (.*)", line)
        assert found is not None and int(found[1]) == int(found[2]) - 10 >= 2, line
        assert re.fullmatch(r"validation p95 \S+ bp does not beat served version 2 \(1e-06 bp\)", found[3]), line
        # the worker is busy past the limit: nothing waits longer than the limit
        t0 = time.monotonic()
        line = await run(1.0, shutdown_commit_seconds=0.2)
        assert "did not finish within train.shutdown_commit_seconds (0.2 s)" in line, line
        head = await vs.head()
        assert head is not None and head.version == 2  # nothing committed
        assert time.monotonic() - t0 < 20
    finally:
        await objects.close()


def test_resume_from_is_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for value in ('"pinned"', "0", "-3", "true"):
        config = tmp_path / "server.toml"
        config.write_text(f"[train]\nresume_from = {value}\n")
        code = main(["serve", "--config", str(config)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (value, err)
        assert "train.resume_from" in err and "must be 'head', 'served', 'pin' or a version number" in err, err


# -- role all: announced at start, committed at SIGTERM -----------------------------------


def steps_trained(server: ServerProcess) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(r'^spectralmc_training_steps_total\{model="gbm"\} (\S+)$', text, re.M)
    return 0.0 if found is None else float(found[1])


@pytest.mark.slow
def test_role_all_announces_idle_training_and_commits_at_sigterm(
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    tmp_path: Path,
    serve: Callable[..., ServerProcess],
) -> None:
    bucket = make_bucket()

    async def setup() -> StoredVersion:
        objects, vs = await open_versions(s3_settings, bucket)
        try:
            stored = await vs.commit(tiny_state(0, 10), "v1")
            # uncertified (certifying takes seconds): served because pinned with force
            await vs.pin(1, "test", force=True)
            return stored
        finally:
            await objects.close()

    v1 = asyncio.run(setup())
    config = tmp_path / "server.toml"
    s3 = s3_table(s3_settings)
    config.write_text(
        f'role = "all"\nmodels = ["gbm"]\nseed_bundled = false\nstore = "s3://{bucket}/models"\n'
        "[s3]\n" + "".join(f'{k} = "{v}"\n' for k, v in s3.items()) + "[train]\nvalidate_every = 5\n"
        "idle_gap_seconds = 0.0\ncommit_every_seconds = 100000.0\n"
        "[certificate.gate.gbm.price]\np95 = 1.0\nmax = 1.0\n"
    )
    server = serve("--config", str(config), env={"SPECTRALMC_TRAIN__ENABLED": "true"})
    deadline = time.monotonic() + 30
    while steps_trained(server) < 40 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert steps_trained(server) >= 40
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(90) == 0
    log = server.log.read_text()
    announced = [line for line in log.splitlines() if "idle training is on" in line]
    assert len(announced) == 1, log
    assert "CPU core busy" in announced[0] and "SPECTRALMC_TRAIN__ENABLED=false" in announced[0], announced
    assert "gbm on cpu from step 10 of version 1 (the head), between pricing batches" in announced[0]
    done = re.search(r"at shutdown: committed version 2 \(steps 11\.\.(\d+)\)", log)
    assert done is not None, log

    async def read() -> tuple[StoredVersion, dict[str, Any] | None]:
        objects, vs = await open_versions(s3_settings, bucket)
        try:
            return await vs.version(2), await vs.manifest(2)
        finally:
            await objects.close()

    v2, m2 = asyncio.run(read())
    assert m2 is not None and m2["state"]["step"] == int(done[1]) >= 40
    assert v2.record["parent"] == v1.record_hash and v2.record["message"].endswith("(at shutdown)")
    assert m2["run"]["trained_from"] == {"version": 1, "content_hash": v1.content_hash}
    assert m2["metrics"]["validation"]["p95_bp"] < v1.record["metrics"]["p95_bp"]  # it beat the served version
