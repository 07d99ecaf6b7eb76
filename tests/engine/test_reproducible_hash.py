"""Reproducible content hashes (issue 22, item 12): two runs that train the same bits get
the same content hash, whatever their command lines and wall-clock times, because those
run facts live under the manifest's ``run`` key, which the hash leaves out
(engine/checkpoint.py, ``manifest_hash``). Checkpoints written before ``run`` existed,
the bundled models among them, keep their hashes and still load and resume."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from spectralmc_server.engine.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    RUN,
    TRAINING_FILE,
    Checkpoint,
    canonical_json,
    decode,
    read_dir,
    run_facts,
    write_dir,
)
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.models import bundled_barrier_models, bundled_models
from spectralmc_server.store.objects import LocalObjectStore
from spectralmc_server.store.versions import VersionStore
from spectralmc_server.training.history import inspect_version

REPO = Path(__file__).resolve().parents[2]
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
TINY = {
    "batch_points": 16,
    "paths": 64,
    "validate_every": 5,
    "validation_grid": 3,
    "schedule_steps": 20,
    "network": {"width": 8, "depth": 1},
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its run facts: what the content hash covers."""
    return {k: v for k, v in manifest.items() if k != RUN}


def keys(obj: Any) -> Iterator[str]:
    """Every key of a JSON value, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from keys(v)


# -- two real `spectralmc train` runs --------------------------------------------------------


def test_equal_training_gives_an_equal_content_hash(tmp_path: Path) -> None:
    """Same seed and steps, different working directories, argv spellings and --out: the
    same hash and weights; the run facts differ and are still written. Another seed: another
    hash. The three runs go in parallel (about 3 s)."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    runs = {  # name -> (working directory, argv after "spectralmc")
        "a": (tmp_path / "one", ["train", "--process", "gbm", "--steps", "20", "--config", "../tiny.toml"]),
        "b": (tmp_path / "two", ["train", "--config", str(config), "--steps=20", "--process=gbm", "--seed", "0"]),
        "c": (tmp_path / "one", ["train", "--process", "gbm", "--steps", "20", "--config", str(config), "--seed", "1"]),
    }
    outs = {"a": Path("A"), "b": tmp_path / "B", "c": tmp_path / "C"}  # a: relative to its working directory
    # one thread each (the same for all three): three runs in parallel, not oversubscribed
    env = {**{k: v for k, v in os.environ.items() if k != "SPECTRALMC_DEBUG"}, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "spectralmc_server.cli", *argv, "--out", str(outs[name]), "--quiet", "--no-certify"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (cwd, argv) in runs.items()
    }
    summary: dict[str, dict[str, Any]] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, stderr)
        summary[name] = orjson.loads(stdout)
    dirs = {"a": tmp_path / "one" / "A", "b": tmp_path / "B", "c": tmp_path / "C"}
    raw = {name: (d / MANIFEST).read_bytes() for name, d in dirs.items()}
    manifest = {name: orjson.loads(data) for name, data in raw.items()}

    # equal training: byte-identical weights and the same content hash
    a, b = dirs["a"], dirs["b"]
    assert (a / MODEL_FILE).read_bytes() == (b / MODEL_FILE).read_bytes()
    assert (a / TRAINING_FILE).read_bytes() == (b / TRAINING_FILE).read_bytes()
    assert summary["a"]["content_hash"] == summary["b"]["content_hash"]
    assert read_dir(a).content_hash == read_dir(b).content_hash == summary["a"]["content_hash"]
    # the run facts are written and differ; only they differ
    assert raw["a"] != raw["b"]
    assert canonical_json(identity(manifest["a"])) == canonical_json(identity(manifest["b"]))
    for name in ("a", "b"):
        run = manifest[name][RUN]
        assert run["command"] == "spectralmc " + " ".join([*runs[name][1], "--out", str(outs[name])]) + (
            " --quiet --no-certify"
        )
        assert run["elapsed_seconds"] > 0
        assert len(run["validation_seconds"]) == len(manifest[name]["metrics"]["history"]) == 2
        assert run["validation_seconds"] == sorted(run["validation_seconds"])
        assert run_facts(manifest[name]) == run
        # the rule: SHA-256 of the canonical manifest without "run"; no run fact left in it
        assert summary[name]["content_hash"] == sha256(canonical_json(identity(manifest[name])))
        assert summary[name]["content_hash"] != sha256(raw[name])
        assert not {"command", "elapsed_seconds"} & set(keys(identity(manifest[name])))
    # the same training otherwise: step, paths, validation numbers
    assert manifest["a"]["metrics"]["history"] == manifest["b"]["metrics"]["history"]
    assert manifest["a"]["state"] == manifest["b"]["state"]

    # another seed: other weights, another hash
    assert (dirs["c"] / MODEL_FILE).read_bytes() != (a / MODEL_FILE).read_bytes()
    assert summary["c"]["content_hash"] != summary["a"]["content_hash"]
    assert manifest["c"]["training"]["seed"] == 1


# -- checkpoints written before "run" existed ---------------------------------------------------


def bundled() -> dict[str, Path]:
    return {**bundled_models(), **bundled_barrier_models()}


@pytest.mark.parametrize("name", sorted(bundled()))
def test_bundled_models_keep_their_content_hashes(name: str) -> None:
    """A model trained before manifests had a ``run`` key keeps the SHA-256 of its exact
    manifest bytes as its hash, as it always was; one trained since is hashed without its
    run facts. Either way the hash is the one its certificate names and
    docs/benchmarks.md records."""
    path = bundled()[name]
    data = (path / MANIFEST).read_bytes()
    ckpt = read_dir(path)  # verifies the tensor files and the certificate against the hash
    facts = run_facts(ckpt.manifest)
    history = ckpt.manifest["metrics"].get("history", [])
    if RUN in ckpt.manifest:  # new style: the run facts are outside the identity
        identity = {k: v for k, v in orjson.loads(data).items() if k != RUN}
        assert ckpt.content_hash == sha256(canonical_json(identity))
        assert facts["command"] == ckpt.manifest[RUN]["command"]
        assert facts["elapsed_seconds"] == ckpt.manifest[RUN]["elapsed_seconds"] > 0
        assert len(facts["validation_seconds"]) == len(history)
    else:  # old style: the exact bytes, and the run facts where it kept them
        assert ckpt.content_hash == sha256(data)
        assert facts["command"] == ckpt.manifest["metrics"]["command"]
        assert facts["elapsed_seconds"] == ckpt.manifest["state"]["elapsed_seconds"] > 0
        assert facts["validation_seconds"] == [h["elapsed_seconds"] for h in history]
    cert = path / "certificate.json"
    if cert.is_file():
        assert orjson.loads(cert.read_bytes())["model_hash"] == ckpt.content_hash
    assert f"`{ckpt.content_hash}`" in (REPO / "docs" / "benchmarks.md").read_text()


def old_style(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` laid out as checkpoints were before ``run``: command in metrics, elapsed
    seconds in state and in each validation."""
    m = dict(ckpt.manifest)
    run = m.pop(RUN)
    history = [
        {**h, "elapsed_seconds": t} for h, t in zip(m["metrics"]["history"], run["validation_seconds"], strict=True)
    ]
    m["state"] = {**m["state"], "elapsed_seconds": run["elapsed_seconds"]}
    m["metrics"] = {**m["metrics"], "history": history, "validation": history[-1], "command": run["command"]}
    return Checkpoint(m, ckpt.model, ckpt.training)


def test_an_old_style_checkpoint_keeps_its_hash_and_resumes(tmp_path: Path) -> None:
    t = Trainer(TrainConfig.model_validate(TINY))
    try:
        t.run(10)
        new = t.checkpoint(run={"command": "spectralmc train (test)"})
    finally:
        t.close()
    old = old_style(new)
    files = old.encode()
    assert old.content_hash == sha256(files[MANIFEST])  # no "run": the bytes themselves
    assert old.content_hash != new.content_hash  # its run facts are in its identity
    back = decode(files)
    assert back.content_hash == sha256(files[MANIFEST])
    # bytes no writer of this project produces (not canonical) still hash as themselves
    loose = orjson.dumps(back.manifest)
    assert loose != files[MANIFEST]
    assert decode({**files, MANIFEST: loose}).content_hash == sha256(loose)
    assert run_facts(back.manifest) == run_facts(new.manifest)
    resumed = Trainer.from_checkpoint(back)
    try:
        assert resumed.elapsed_seconds == new.manifest[RUN]["elapsed_seconds"] > 0
        assert [v.as_dict() for v in resumed.history] == old.manifest["metrics"]["history"]
        # written again, it is new-style and its hash is the new-style one
        assert resumed.checkpoint(run={"command": "spectralmc train (test)"}).content_hash == new.content_hash
    finally:
        resumed.close()


# -- resume -------------------------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_hash(tmp_path: Path) -> None:
    """10 steps, write, read, resume, 10 steps == 20 steps: the same bits and, with the
    run facts out of the identity, the same content hash (the run facts still differ)."""
    cfg = TrainConfig.model_validate(TINY)
    straight = Trainer(cfg)
    first = Trainer(cfg)
    try:
        straight.run(20)
        first.run(10)
        write_dir(first.checkpoint(run={"command": "first"}), tmp_path / "ck")
    finally:
        first.close()
    ck = read_dir(tmp_path / "ck")
    assert ck.manifest[RUN]["command"] == "first"
    resumed = Trainer.from_checkpoint(ck)
    try:
        assert resumed.elapsed_seconds == ck.manifest[RUN]["elapsed_seconds"]
        assert [v.elapsed_seconds for v in resumed.history] == ck.manifest[RUN]["validation_seconds"]
        resumed.run(10)
        a = straight.checkpoint(run={"command": "straight"})
        b = resumed.checkpoint(run={"command": "resumed"})
    finally:
        straight.close()
        resumed.close()
    fa, fb = a.encode(), b.encode()
    assert fa[MODEL_FILE] == fb[MODEL_FILE] and fa[TRAINING_FILE] == fb[TRAINING_FILE]
    assert fa[MANIFEST] != fb[MANIFEST]
    assert a.content_hash == b.content_hash == write_dir(b, tmp_path / "resumed")
    assert read_dir(tmp_path / "resumed").content_hash == a.content_hash


# -- the version store --------------------------------------------------------------------------


def test_the_store_records_verifies_and_loads_by_the_same_rule(tmp_path: Path) -> None:
    t = Trainer(TrainConfig.model_validate(TINY))
    try:
        t.run(5)
        one = t.checkpoint(run={"command": "run one"})
        two = t.checkpoint(run={"command": "run two"})
    finally:
        t.close()
    assert one.content_hash == two.content_hash
    manifests = {c.manifest[RUN]["command"]: c.encode()[MANIFEST] for c in (one, two)}

    async def scenario() -> None:
        vs = VersionStore(LocalObjectStore(tmp_path / "store"), "gbm")
        v1 = await vs.commit(one, "one")
        v2 = await vs.commit(two, "two")
        for stored, command in ((v1, "run one"), (v2, "run two")):
            # the record names the model's hash; its content, the manifest blob as written
            assert stored.content_hash == one.content_hash
            assert stored.record["content"]["manifest"] == sha256(manifests[command])
            loaded = await vs.load(stored.version, need_training=True)
            assert loaded.content_hash == one.content_hash
            assert loaded.manifest[RUN]["command"] == command
            shown = await inspect_version(vs, stored.version)
            assert shown["manifest"]["run"]["command"] == command
            assert shown["manifest"]["run"]["elapsed_seconds"] == one.manifest[RUN]["elapsed_seconds"]
        report = await vs.verify()
        assert report.ok, report.problems
        # A record whose content_hash is its manifest blob's SHA-256 (the rule before
        # "run") no longer names the model: verify reports it. Version 2 rewritten, the
        # head pointer dropped (readers roll forward), nothing else is out of place.
        key = vs.records.key(2)
        blob = await vs.objects.get(key)
        assert blob is not None
        edited = {**orjson.loads(blob.data), "content_hash": v2.record["content"]["manifest"]}
        await vs.objects.put_if_match(key, canonical_json(edited), blob.etag)
        await vs.objects.delete(vs.records.ref)
        report = await vs.verify()
        assert [(p["version"], p["reason"]) for p in report.problems] == [
            (2, "content_hash is not the manifest's hash")
        ]
        await vs.objects.close()

    asyncio.run(scenario())
