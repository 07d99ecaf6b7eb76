"""`spectralmc train --store`, `spectralmc price --store` and `spectralmc store ...` as users
run them: real processes, exit codes 0 (ok), 1 (corruption found), 2 (error)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from conftest import SeaweedFS, boto3_client

from spectralmc_server.engine.checkpoint import read_dir, write_dir
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.store.objects import LocalObjectStore
from spectralmc_server.store.versions import VersionStore

TINY = """\
[train]
batch_points = 16
paths = 64
validate_every = 5
validation_grid = 3

[train.network]
width = 8
depth = 1
"""
# These tiny models (tens of steps) fail any quality gate: they are committed as
# unqualified, uncertified versions (certifying each would take ~30 s), which is what
# these tests of the store commands need. tests/test_cli_gate.py tests the gate itself.
UNQUALIFIED = ("--no-certify", "--allow-unqualified")
CONTRACT = {"id": "a", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0, "vol": 0.2}


def cli(*args: str | Path, stdin: bytes = b"", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", *map(str, args)],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


def one_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return orjson.loads(lines[0])


def usage_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    return proc.stderr.strip()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_train_commits_and_store_commands(tmp_path: Path, config: Path) -> None:
    uri = f"file://{tmp_path / 'store'}"
    summary = one_json(
        cli(
            "train",
            "--process",
            "gbm",
            "--steps",
            "20",
            "--config",
            config,
            "--store",
            uri,
            "--commit-every",
            "5",
            "--message",
            "s{step} p95 {val_bp:.1f}",
            "--quiet",
            *UNQUALIFIED,
        )
    )
    assert summary["committed"] == [1, 2, 3, 4] and summary["model"] == "gbm"  # steps 5, 10, 15, 20: no duplicate
    rows = one_json(cli("store", "--store", uri, "--model", "gbm", "--json", "list"))
    assert [r["version"] for r in rows] == [1, 2, 3, 4] and rows[-1]["head"]
    assert rows[0]["message"].startswith("s5 p95 ") and rows[0]["metrics"]["step"] == 5
    text = cli("store", "--store", uri, "--model", "gbm", "list")
    assert text.returncode == 0 and text.stdout.count("\n") == 4
    one = one_json(cli("store", "--store", uri, "--model", "gbm", "inspect", "2", "--json"))
    assert (
        one["version"] == 2 and one["manifest"]["state"]["step"] == 10 and "history" not in one["manifest"]["metrics"]
    )
    assert one_json(cli("store", "--store", uri, "--model", "gbm", "verify", "--json"))["ok"] is True
    pinned = one_json(cli("store", "--store", uri, "--model", "gbm", "pin", "2", "--by", "tester", "--force", "--json"))
    assert pinned["version"] == 2 and pinned["by"] == "tester"
    # Pricing from the store takes the pinned version (pinned with force: it fails the
    # gate); with no certificate nothing learned is served, and the note names it.
    body = orjson.dumps({"contracts": [CONTRACT]})
    proc = cli("price", "--store", uri, "--model", "gbm", stdin=body)
    priced = one_json(proc)
    assert "version 2 fails its quality gate (no certificate)" in proc.stderr and "pinned with force" in proc.stderr
    assert priced["results"][0]["method"] == "reference" and priced["models"] == {}
    preview = one_json(cli("store", "--store", uri, "--model", "gbm", "gc", "--keep", "1", "--dry-run", "--json"))
    assert preview["collected_versions"] == [1, 3] and preview["retained"] == [2, 4]
    done = one_json(cli("store", "--store", uri, "--model", "gbm", "gc", "--keep", "1", "--yes", "--json"))
    assert done["collected_versions"] == [1, 3] and len(done["deleted_objects"]) == 6
    again = one_json(cli("store", "--store", uri, "--model", "gbm", "gc", "--keep", "1", "--yes", "--json"))
    assert again["collected_versions"] == [] and again["deleted_objects"] == []
    report = one_json(cli("store", "--store", uri, "--model", "gbm", "verify", "--json"))
    assert report["ok"] and report["collected"] == [1, 3] and report["pinned"] == 2
    unpinned = cli("store", "--store", uri, "--model", "gbm", "unpin")
    assert unpinned.returncode == 0 and "the head" in unpinned.stdout
    assert "version 4 fails its quality gate" in cli("price", "--store", uri, "--model", "gbm", stdin=body).stderr


def test_verify_exits_1_on_damage_and_names_the_version(tmp_path: Path, config: Path) -> None:
    uri = f"file://{tmp_path / 's'}"
    one_json(
        cli(
            "train",
            "--process",
            "gbm",
            "--steps",
            "10",
            "--config",
            config,
            "--store",
            uri,
            "--commit-every",
            "5",
            "--quiet",
            *UNQUALIFIED,
        )
    )
    record = tmp_path / "s" / "models" / "gbm" / "records" / "000000000001.json"
    record.write_bytes(record.read_bytes().replace(b'"message": "', b'"message": "X'))
    proc = cli("store", "--store", uri, "--model", "gbm", "verify")
    assert proc.returncode == 1, proc.stdout
    assert "first bad version 1" in proc.stdout and "record bytes changed" in proc.stdout
    js = cli("store", "--store", uri, "--model", "gbm", "verify", "--json")
    assert js.returncode == 1 and orjson.loads(js.stdout)["first_bad_version"] == 1
    # Loading damaged content is also exit 1, one line.
    weights = next((tmp_path / "s" / "models" / "gbm" / "content").iterdir())
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    priced = cli("price", "--store", uri, "--model", "gbm", stdin=orjson.dumps({"contracts": [CONTRACT]}))
    if priced.returncode != 0:  # the damaged blob may belong to version 1, which is not served
        assert priced.returncode == 1 and priced.stderr.startswith("corrupt: ")


def test_resume_from_a_stored_version_is_bit_exact(tmp_path: Path) -> None:
    """N steps, commit, resume from the store, N steps == 2N steps straight."""
    cfg = TrainConfig.model_validate(
        {
            "batch_points": 16,
            "paths": 64,
            "validate_every": 5,
            "validation_grid": 3,
            "schedule_steps": 20,
            "network": {"width": 8, "depth": 1},
        }
    )
    straight = Trainer(cfg)
    straight.run(20)
    first = Trainer(cfg)
    first.run(10)
    src = tmp_path / "ck"
    write_dir(first.checkpoint(), src)
    first.close()

    async def commit() -> None:
        await VersionStore(LocalObjectStore(tmp_path / "store"), "gbm").commit(read_dir(src), "half way")

    asyncio.run(commit())
    out = tmp_path / "resumed"
    uri = f"file://{tmp_path / 'store'}"
    summary = one_json(
        cli(
            "train",
            "--process",
            "gbm",
            "--store",
            uri,
            "--resume",
            "1",
            "--steps",
            "10",
            "--out",
            out,
            "--quiet",
            *UNQUALIFIED,
        )
    )
    assert summary["step"] == 20 and summary["committed"] == [2]
    resumed = read_dir(out)
    expected = straight.checkpoint()
    straight.close()
    for k, v in expected.model.items():
        assert torch.equal(v, resumed.model[k]), k
    for k, v in expected.training.items():
        assert torch.equal(v, resumed.training[k]), k


def test_store_usage_errors(tmp_path: Path, config: Path) -> None:
    uri = f"file://{tmp_path / 's'}"
    assert "needs --store" in usage_error(cli("train", "--process", "gbm", "--steps", "2", "--commit-every", "1"))
    assert "file:///absolute/path" in usage_error(cli("store", "--store", "file://rel/x", "--model", "m", "list"))
    assert "use file:///absolute/path or s3://" in usage_error(
        cli("store", "--store", "http://x", "--model", "m", "list")
    )
    assert "invalid model name" in usage_error(cli("store", "--store", uri, "--model", "../x", "list"))
    missing = usage_error(cli("store", "--store", uri, "--model", "m", "inspect", "3"))
    assert missing == f"error: store {uri} does not exist"
    assert not (tmp_path / "s").exists()  # a read command creates nothing
    (tmp_path / "s").mkdir()
    assert "no version 3" in usage_error(cli("store", "--store", uri, "--model", "m", "inspect", "3"))
    assert "--dry-run" in usage_error(cli("store", "--store", uri, "--model", "m", "gc", "--keep", "1"))
    assert "--protect" in usage_error(
        cli("store", "--store", uri, "--model", "m", "gc", "--keep", "1", "--protect", "a,b", "--yes")
    )
    assert "no versions" in usage_error(
        cli("price", "--store", uri, "--model", "m", stdin=orjson.dumps({"contracts": [CONTRACT]}))
    )
    assert "template" in usage_error(
        cli("train", "--process", "gbm", "--steps", "2", "--store", uri, "--message", "{nope}")
    )
    assert "'head'" in usage_error(cli("train", "--process", "gbm", "--steps", "2", "--store", uri, "--resume", "x"))


def test_s3_store_through_the_cli(seaweedfs: SeaweedFS, tmp_path: Path, config: Path) -> None:
    bucket = "spectralmc-cli-" + os.urandom(4).hex()
    boto3_client(seaweedfs.endpoint_url).create_bucket(Bucket=bucket)
    env = {
        "AWS_ENDPOINT_URL": seaweedfs.endpoint_url,
        "AWS_ACCESS_KEY_ID": "spectralmc",
        "AWS_SECRET_ACCESS_KEY": "spectralmc-secret",
        "AWS_REGION": "us-east-1",
    }
    uri = f"s3://{bucket}/team/models"
    summary = one_json(
        cli(
            "train",
            "--process",
            "gbm",
            "--steps",
            "10",
            "--config",
            config,
            "--store",
            uri,
            "--commit-every",
            "5",
            "--quiet",
            *UNQUALIFIED,
            env=env,
        )
    )
    assert summary["committed"] == [1, 2]
    assert one_json(cli("store", "--store", uri, "--model", "gbm", "verify", "--json", env=env))["ok"]
    keys = [o["Key"] for o in boto3_client(seaweedfs.endpoint_url).list_objects_v2(Bucket=bucket)["Contents"]]
    assert all(k.startswith("team/models/models/gbm/") for k in keys)
    missing = usage_error(cli("store", "--store", "s3://no-such-bucket-here/x", "--model", "gbm", "list", env=env))
    assert "NoSuchBucket" in missing or "no-such-bucket" in missing


def test_tensorboard_writes_event_files(tmp_path: Path, config: Path) -> None:
    uri = f"file://{tmp_path / 's'}"
    one_json(
        cli(
            "train",
            "--process",
            "gbm",
            "--steps",
            "10",
            "--config",
            config,
            "--store",
            uri,
            "--commit-every",
            "5",
            "--quiet",
            *UNQUALIFIED,
        )
    )
    logdir = tmp_path / "tb"
    result = one_json(cli("store", "--store", uri, "--model", "gbm", "tensorboard", "--logdir", logdir, "--json"))
    assert result["versions"] == [1, 2]
    events = list((logdir / "gbm").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir / "gbm"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"commit/version", "commit/p95_bp", "model/parameters", "validation/p95_bp"} <= tags
    assert [e.value for e in acc.Scalars("commit/version")] == [1.0, 2.0]
