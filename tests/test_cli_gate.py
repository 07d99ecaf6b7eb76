"""The quality gate on the command line: ``train --store`` commits only versions that
pass (``--allow-unqualified`` commits anyway and the version says so), ``train --out``
writes the certificate, ``store pin`` of a failing version needs ``--force``, and
``price --store`` never answers a failing version as ``cvnn``.

A 50-step GBM model is trained twice through the CLI for the module (once refused,
once committed as unqualified), each certified once (~30 s). Its certificate is far
outside the default gate; with loose tolerances its learned answers would be served
(the ``--checkpoint`` control shows it), so the gate is what keeps them out.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from spectralmc_server.engine.certificate import DEFAULT_TOLERANCE
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.store.objects import LocalObjectStore
from spectralmc_server.store.versions import VersionStore

TINY_TOML = """\
[train]
batch_points = 16
paths = 64
validate_every = 10
validation_grid = 3

[train.network]
width = 8
depth = 1
"""
LOOSE_TOLERANCE = "[certificate.tolerance]\n" + "".join(f"{m} = 10.0\n" for m in DEFAULT_TOLERANCE)
LOOSE_GATE = "[certificate.gate.default.price]\np95 = 10.0\nmax = 10.0\n"
CONTRACTS = {
    "contracts": [
        {"id": "atm", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0, "vol": 0.2},
        {"id": "otm", "right": "call", "strike": 105.0, "spot": 100.0, "expiry_years": 0.5, "vol": 0.25},
    ]
}


def cli(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRALMC_")}
    return subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", *map(str, args)],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def one_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr)
    value: dict[str, Any] = orjson.loads(lines[0])
    return value


def methods(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return [r["method"] for r in one_json(proc)["results"]]


@dataclass(frozen=True)
class Runs:
    root: Path
    config: Path
    refused_store: str
    refused: subprocess.CompletedProcess[str]
    store: str  # holds the 50-step model as version 1, unqualified
    allowed: subprocess.CompletedProcess[str]
    out: Path
    loose: Path  # settings: loose tolerances
    loose_gate: Path  # settings: loose tolerances and a gate the model passes


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("gate")
    config = root / "tiny.toml"
    config.write_text(TINY_TOML)
    train = ("train", "--process", "gbm", "--steps", "50", "--config", config, "--quiet")
    refused_store = (root / "refused").as_uri()
    refused = cli(*train, "--store", refused_store)
    store, out = (root / "store").as_uri(), root / "out"
    allowed = cli(*train, "--store", store, "--allow-unqualified", "--out", out)
    loose, loose_gate = root / "loose.toml", root / "loose_gate.toml"
    loose.write_text(LOOSE_TOLERANCE)
    loose_gate.write_text(LOOSE_TOLERANCE + LOOSE_GATE)
    return Runs(root, config, refused_store, refused, store, allowed, out, loose, loose_gate)


def versions(root: Path, name: str) -> VersionStore:
    return VersionStore(LocalObjectStore(root / name), "gbm")


def test_train_store_refuses_a_fifty_step_model(runs: Runs) -> None:
    proc = runs.refused
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    summary = one_json(proc)
    assert summary["committed"] == [] and summary["unqualified"] == []
    ((refusal),) = summary["refused"]
    assert refusal["step"] == 50
    assert any(f.startswith("price p95 ") for f in refusal["gate"]), refusal
    assert "quality gate: step 50 fails its quality gate: price p95" in proc.stderr
    assert "not committed" in proc.stderr
    assert asyncio.run(versions(runs.root, "refused").head()) is None


def test_allow_unqualified_commits_and_records_it(runs: Runs) -> None:
    proc = runs.allowed
    assert proc.returncode == 0, proc.stderr
    summary = one_json(proc)
    assert summary["committed"] == [1] and summary["unqualified"] == [1] and summary["refused"] == []
    assert "committing it as unqualified" in proc.stderr
    store = versions(runs.root, "store")
    head = asyncio.run(store.head())
    assert head is not None and head.record["unqualified"] is True
    assert head.record["metrics"]["gate_failures"] == summary["gate"]
    cert = asyncio.run(store.certificate(1))
    assert cert is not None and cert["model_hash"] == head.content_hash
    # --out: the same checkpoint, certificate.json beside it (certified once for both)
    assert summary["certified"] is True and summary["content_hash"] == head.content_hash
    assert (runs.out / "certificate.json").is_file()
    assert read_dir(runs.out).certificate == cert


def test_price_store_never_answers_a_failing_version_as_cvnn(runs: Runs) -> None:
    body = orjson.dumps(CONTRACTS)
    # control: the same model from its directory, loose tolerances: learned answers
    assert "cvnn" in methods(cli("price", "--checkpoint", runs.out, "--settings", runs.loose, stdin=body))
    for extra in ((), ("--settings", runs.loose)):
        proc = cli("price", "--store", runs.store, *extra, stdin=body)
        assert set(methods(proc)) == {"reference"}
        assert "version 1 fails its quality gate" in proc.stderr
    # a gate it passes: served as learned
    assert "cvnn" in methods(cli("price", "--store", runs.store, "--settings", runs.loose_gate, stdin=body))


def test_store_pin_needs_force(runs: Runs) -> None:
    store_args = ("store", "--store", runs.store, "--model", "gbm")
    proc = cli(*store_args, "pin", "1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "fails its quality gate (price p95" in proc.stderr and "--force" in proc.stderr
    assert asyncio.run(versions(runs.root, "store").pinned()) is None
    proc = cli(*store_args, "pin", "1", "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    out = one_json(proc)
    assert out["forced"] is True and out["force"] is True and out["version"] == 1
    assert any(f.startswith("price p95 ") for f in out["gate"])
    # price --store serves what a server would: the admin's forced pin, as learned
    proc = cli("price", "--store", runs.store, "--settings", runs.loose, stdin=orjson.dumps(CONTRACTS))
    assert "cvnn" in methods(proc)
    assert "pinned with force" in proc.stderr
    unpin = cli(*store_args, "unpin")
    assert unpin.returncode == 0, unpin.stderr


def test_gate_usage_errors(runs: Runs, tmp_path: Path) -> None:
    base = ("train", "--process", "gbm", "--steps", "2", "--config", runs.config)
    proc = cli(*base, "--allow-unqualified")
    assert proc.returncode == 2 and "--allow-unqualified needs --store" in proc.stderr
    proc = cli(*base, "--store", (tmp_path / "s").as_uri(), "--no-certify")
    assert proc.returncode == 2 and "--allow-unqualified" in proc.stderr
    proc = cli(*base, "--settings", tmp_path / "missing.toml", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--settings: no such file" in proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[certificate]\npoints = 5\n")
    proc = cli("price", "--settings", bad, stdin=orjson.dumps(CONTRACTS))
    assert proc.returncode == 2 and "certificate.points" in proc.stderr


def test_no_certify_writes_an_uncertified_checkpoint(runs: Runs, tmp_path: Path) -> None:
    out = tmp_path / "quick"
    proc = cli("train", "--process", "gbm", "--steps", "5", "--config", runs.config, "--out", out, "--no-certify")
    assert proc.returncode == 0, proc.stderr
    summary = one_json(proc)
    assert summary["certified"] is False and summary["gate"] is None
    assert not (out / "certificate.json").exists()
    body = orjson.dumps(CONTRACTS)
    assert set(methods(cli("price", "--checkpoint", out, "--settings", runs.loose, stdin=body))) == {"reference"}
