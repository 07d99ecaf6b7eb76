"""The ``spectralmc`` command line as users run it: real processes, stdout, stderr and
exit codes (docs/api.md: bad input is one line on stderr and exit code 2)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_util import main_in_process

from spectralmc_server.engine.certificate import DEFAULT_TOLERANCE

SCRIPT = Path(sys.executable).parent / "spectralmc"
REPO = Path(__file__).resolve().parent.parent
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
IN_DOMAIN = {
    "id": "atm",
    "right": "call",
    "strike": 100.0,
    "spot": 100.0,
    "expiry_years": 1.0,
    "rate": 0.0,
    "dividend": 0.0,
    "vol": 0.2,
}


def _env(**changes: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SPECTRALMC_DEBUG", None)
    env.update(changes)
    return env


def _run(
    *args: str | Path,
    stdin: bytes = b"",
    entry_point: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if entry_point else [sys.executable, "-m", "spectralmc_server.cli"]
    return subprocess.run(
        [*command, *map(str, args)],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=120,
        check=False,
    )


def _usage_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert the bad-input convention and return the message."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stderr.endswith("\n")
    assert "Traceback" not in proc.stderr
    return lines[0]


def _json_line(stdout: str) -> dict[str, Any]:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    value = orjson.loads(lines[0])
    assert isinstance(value, dict)
    return value


@dataclass(frozen=True)
class Trained:
    dir: Path
    config: Path
    proc: subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One tiny checkpoint for the session, trained through the console script."""
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.toml"
    config.write_text(TINY_TOML)
    out = root / "A"
    proc = _run(
        "train", "--process", "gbm", "--steps", "20", "--config", config, "--out", out, "--quiet", entry_point=True
    )
    return Trained(out, config, proc)


def _price_body(*contracts: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"contracts": list(contracts), **extra})


# -- train --------------------------------------------------------------------------------


def test_entry_point_is_installed() -> None:
    assert SCRIPT.is_file()
    assert os.access(SCRIPT, os.X_OK)


def test_train_writes_a_checkpoint(trained: Trained) -> None:
    proc = trained.proc
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in trained.dir.iterdir()) == [
        "certificate.json",  # certified at the end: the directory is servable as learned
        "manifest.json",
        "model.safetensors",
        "training.safetensors",
    ]
    summary = _json_line(proc.stdout)
    assert summary["certified"] is True
    assert summary["gate"]  # a 20-step model is far outside the default gate (reported, not refused)
    cert = orjson.loads((trained.dir / "certificate.json").read_bytes())
    assert summary["step"] == 20
    assert summary["paths_simulated"] == 20 * 16 * 64
    assert summary["out"] == str(trained.dir)
    manifest_bytes = (trained.dir / "manifest.json").read_bytes()
    manifest = orjson.loads(manifest_bytes)
    # the content hash leaves out the run facts (command line, times: engine/checkpoint.py)
    identity = {k: v for k, v in manifest.items() if k != "run"}
    assert manifest["run"]["command"].startswith("spectralmc train --process gbm --steps 20")
    identity_bytes = orjson.dumps(identity, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
    assert summary["content_hash"] == "sha256:" + hashlib.sha256(identity_bytes).hexdigest()
    assert cert["model_hash"] == summary["content_hash"]
    assert manifest["state"]["step"] == 20
    assert manifest["training"]["batch_points"] == 16
    assert manifest["training"]["network"]["width"] == 8
    assert summary["validation"]["step"] == 20


def test_price_round_trip(trained: Trained) -> None:
    contracts = [
        IN_DOMAIN,
        {**IN_DOMAIN, "id": "put", "right": "put", "strike": 90.0},
        {**IN_DOMAIN, "id": "far", "expiry_years": 10.0},
    ]
    body = _price_body(*contracts, measures=["price", "delta", "quantiles"], quantile_levels=[0.05, 0.5])
    # A 20-step model's certified bounds are far past the default tolerances (its answers
    # would all come from the reference): tolerances this loose let the learned ones through.
    loose = trained.dir.parent / "loose.toml"
    loose.write_text("[certificate.tolerance]\n" + "".join(f"{m} = 10.0\n" for m in DEFAULT_TOLERANCE))
    strict = _run("price", "--checkpoint", trained.dir, stdin=body)
    assert strict.returncode == 0, strict.stderr
    assert {r["method"] for r in _json_line(strict.stdout)["results"]} == {"reference"}
    proc = _run("price", "--checkpoint", trained.dir, "--settings", loose, stdin=body)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    response = _json_line(proc.stdout)
    assert [r["id"] for r in response["results"]] == ["atm", "put", "far"]
    assert [r["method"] for r in response["results"]] == ["cvnn", "cvnn", "reference"]
    for row in response["results"]:
        assert row["model"] == "gbm"
        assert isinstance(row["price"], float)
        assert isinstance(row["delta"], float)
        assert list(row["quantiles"]) == ["0.05", "0.5"]
    summary = _json_line(trained.proc.stdout)
    assert response["models"]["gbm"]["content_hash"] == summary["content_hash"]
    assert response["market_data"] is None
    again = _run("price", "--checkpoint", trained.dir, "--settings", loose, stdin=body)
    assert again.stdout == proc.stdout  # same request, same model: same bytes


def test_resume(tmp_path: Path, trained: Trained) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    first = _run(
        "train", "--process", "gbm", "--steps", "10", "--config", trained.config, "--out", a, "--quiet", "--no-certify"
    )
    assert first.returncode == 0, first.stderr
    assert _json_line(first.stdout)["step"] == 10
    # Without --quiet: the progress bar goes to stderr, stdout stays one JSON line.
    second = _run("train", "--process", "gbm", "--resume", a, "--steps", "10", "--out", b, "--no-certify")
    assert second.returncode == 0, second.stderr
    summary = _json_line(second.stdout)
    assert summary["step"] == 20
    assert summary["paths_simulated"] == 20 * 16 * 64
    assert summary["content_hash"] != _json_line(first.stdout)["content_hash"]
    assert orjson.loads((b / "manifest.json").read_bytes())["state"]["step"] == 20
    assert orjson.loads((a / "manifest.json").read_bytes())["state"]["step"] == 10  # the source is left alone


def test_train_a_barrier_law_to_a_directory_but_never_to_a_store(tmp_path: Path) -> None:
    """gbm_barrier (a defective law) trains to --out without a certificate, and --store
    is refused: barrier laws are neither certified nor served."""
    out = tmp_path / "barrier"
    config = REPO / "config" / "gbm_barrier.toml"
    proc = _run("train", "--process", "gbm_barrier", "--steps", "5", "--config", config, "--out", out)
    assert proc.returncode == 0, proc.stderr
    summary = _json_line(proc.stdout)
    assert summary["certified"] is False and summary["step"] == 5
    assert "gbm_barrier: no certificate" in proc.stderr
    assert orjson.loads((out / "manifest.json").read_bytes())["model"]["process"] == "gbm_barrier"
    store = _run("train", "--process", "gbm_barrier", "--steps", "5", "--store", f"file://{tmp_path / 'store'}")
    assert "barrier law" in _usage_error(store)
    assert not (tmp_path / "store").exists()


def test_version() -> None:
    proc = _run("--version", entry_point=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "spectralmc 0.1.0"


def test_bundled_model_prices_without_checkpoint() -> None:
    proc = _run("price", stdin=_price_body(IN_DOMAIN), entry_point=True)
    assert proc.returncode == 0, proc.stderr
    response = _json_line(proc.stdout)
    assert [r["id"] for r in response["results"]] == ["atm"]
    assert response["results"][0]["method"] == "cvnn"
    assert response["models"]["gbm"]["content_hash"].startswith("sha256:")


# -- bad input: one line on stderr, exit 2 ----------------------------------------------


@pytest.mark.parametrize("text", [b"{not json", b"", b'{"contracts": [{"strike": NaN}]}'])
def test_price_invalid_json(text: bytes) -> None:
    message = _usage_error(_run("price", stdin=text))
    assert "not valid JSON" in message


def test_price_validation_error(trained: Trained) -> None:
    body = _price_body({**IN_DOMAIN, "strike": -5.0})
    message = _usage_error(_run("price", "--checkpoint", trained.dir, stdin=body, entry_point=True))
    assert "contracts[0].strike" in message
    assert "greater than or equal to 0.000001" in message


def test_price_market_data_contract(trained: Trained) -> None:
    body = _price_body(
        IN_DOMAIN, {"id": "c3", "right": "call", "strike": 4100.0, "underlying": "SPX", "expiry": "2027-06-18"}
    )
    message = _usage_error(_run("price", "--checkpoint", trained.dir, stdin=body))
    assert "val_datetime" in message
    dated = orjson.dumps({**orjson.loads(body), "val_datetime": "2026-11-26T16:00:00Z"})
    message = _usage_error(_run("price", "--checkpoint", trained.dir, stdin=dated))
    assert "contracts[1]" in message and "market-data snapshot" in message


def test_price_by_reference_from_a_store(tmp_path: Path) -> None:
    """--marketdata: contracts by reference priced from the snapshot the request names,
    exactly as the explicit contract with the snapshot's inputs."""
    from spectralmc_server.marketdata.objects import MarketSnapshot
    from spectralmc_server.marketdata.store import SnapshotStore
    from spectralmc_server.store.objects import LocalObjectStore

    snap = MarketSnapshot.model_validate(
        {
            "spots": {"SPX": 100.0},
            "yield_curves": {"USD": {"pillars": [{"years": 1.0, "zero_rate": 0.03}]}},
            "discounting": {"SPX": "USD"},
            "vol_surfaces": {"SPX": {"expiries_years": [1.0], "strikes": [100.0], "vols": [[0.2]]}},
        }
    )
    vdt = datetime(2026, 11, 26, 16, tzinfo=UTC)
    record, _ = asyncio.run(SnapshotStore(LocalObjectStore(tmp_path)).put("default", vdt, vdt, snap))
    ref = {"id": "r", "right": "call", "strike": 100.0, "underlying": "SPX", "expiry": "2027-06-18"}
    body = orjson.dumps({"val_datetime": "2026-11-26T16:00:00Z", "contracts": [ref]})
    proc = _run("price", "--marketdata", tmp_path.as_uri(), stdin=body)
    assert proc.returncode == 0, proc.stderr
    out = _json_line(proc.stdout)
    assert out["market_data"] == record.key()
    t = (date(2027, 6, 18) - date(2026, 11, 26)).days / 365
    explicit = {"id": "r", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": t, "rate": 0.03, "vol": 0.2}
    proc = _run("price", stdin=orjson.dumps({"contracts": [{**explicit, "dividend": 0.0}]}))
    assert _json_line(proc.stdout)["results"] == out["results"]
    later = orjson.dumps({"val_datetime": "2026-11-27T16:00:00Z", "contracts": [ref]})
    message = _usage_error(_run("price", "--marketdata", tmp_path.as_uri(), stdin=later))
    assert "no market-data snapshot for default/2026-11-27T16:00:00Z" in message


def test_price_checkpoint_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    message = _usage_error(_run("price", "--checkpoint", tmp_path, stdin=_price_body(IN_DOMAIN)))
    assert str(tmp_path) in message
    assert "checkpoint" in message


def test_price_unknown_bundled_model() -> None:
    message = _usage_error(_run("price", "--model", "no-such-model", stdin=_price_body(IN_DOMAIN)))
    assert "no-such-model" in message


def test_train_unknown_process(tmp_path: Path) -> None:
    message = _usage_error(_run("train", "--process", "sabr", "--steps", "5", "--out", tmp_path / "x"))
    assert "sabr" in message
    assert "gbm" in message and "heston" in message and "merton" in message
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_non_positive_steps(steps: str, tmp_path: Path) -> None:
    message = _usage_error(_run("train", "--process", "gbm", "--steps", steps, "--out", tmp_path / "x"))
    assert "--steps" in message
    assert not (tmp_path / "x").exists()


def test_train_steps_and_minutes_together() -> None:
    message = _usage_error(_run("train", "--process", "gbm", "--steps", "5", "--minutes", "1", entry_point=True))
    assert "--steps" in message
    assert "--minutes" in message


def test_train_missing_process() -> None:
    message = _usage_error(_run("train", "--steps", "5"))
    assert "--process" in message


def test_train_invalid_toml(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[train\nbatch_points = = 3\n")
    message = _usage_error(_run("train", "--process", "gbm", "--steps", "5", "--config", config))
    assert "--config" in message
    assert "TOML" in message


def test_train_unknown_config_field(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text(TINY_TOML.replace("paths = 64", "pathz = 64"))
    message = _usage_error(_run("train", "--process", "gbm", "--steps", "5", "--config", config))
    assert "pathz" in message


PHASE_TOML = """\
[train]
lr = 1e-3
warmup_steps = 2
focus = { share = 0.25, ranges = { vol = [0.5, 1.0] } }
"""


def _train_in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``spectralmc train ...`` without a fresh interpreter (the console script's own
    train runs are the tests above)."""
    return main_in_process(capsys, "train", *args)


def test_a_fine_tuning_phase_restarts_the_schedule_from_the_checkpoint(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    phase = tmp_path / "phase.toml"
    phase.write_text(PHASE_TOML)
    out = tmp_path / "tuned"
    args = ("--process", "gbm", "--resume", trained.dir, "--config", phase, "--steps", "10", "--out", out)
    proc = _train_in_process(capsys, *args, "--quiet", "--no-certify")
    assert proc.returncode == 0, proc.stderr
    assert _json_line(proc.stdout)["step"] == 30
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    training = manifest["training"]
    assert (training["schedule_start"], training["schedule_steps"], training["lr"]) == (20, 10, 1e-3)
    assert training["focus"] == {"share": 0.25, "ranges": {"vol": [0.5, 1.0]}}
    assert training["paths"] == 64  # the rest is the checkpoint's
    first = orjson.loads((trained.dir / "manifest.json").read_bytes())
    origin = manifest["run"]["trained_from"]
    from spectralmc_server.engine.checkpoint import read_dir

    assert origin["content_hash"] == read_dir(trained.dir).content_hash
    assert origin["phase_of"] == {
        "lr": first["training"]["lr"],
        "warmup_steps": first["training"]["warmup_steps"],
        "focus": None,
        "schedule_start": 0,
        "schedule_steps": 20,
    }
    # a plain resume of the tuned checkpoint continues its phase as configured
    again = _train_in_process(capsys, "--process", "gbm", "--resume", out, "--steps", "2", "--out", tmp_path / "on")
    assert again.returncode == 0, again.stderr
    on = orjson.loads((tmp_path / "on" / "manifest.json").read_bytes())["training"]
    assert (on["schedule_start"], on["schedule_steps"], on["focus"]) == (20, 10, training["focus"])


@pytest.mark.parametrize(
    ("toml", "steps", "needle"),
    [
        ("[train]\nlr = 1e-3\npaths = 128\n", True, "paths would change what the checkpoint learned"),
        ("[train]\nlr = 1e-3\n", False, "give its length with --steps or --minutes"),
        ("[train]\nfocus = { share = 0.5, ranges = { kappa = [1, 2] } }\n", True, "focus.ranges.kappa"),
    ],
)
def test_a_fine_tuning_phase_refuses_what_it_may_not_set(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, steps: bool, needle: str
) -> None:
    phase = tmp_path / "phase.toml"
    phase.write_text(toml)
    length = ("--steps", "5") if steps else ()
    out = tmp_path / "x"
    args = ("--process", "gbm", "--resume", trained.dir, "--config", phase, *length, "--out", out)
    message = _usage_error(_train_in_process(capsys, *args))
    assert needle in message
    assert not out.exists()


def test_a_fine_tuning_phase_file_is_read_before_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    phase = tmp_path / "phase.toml"
    phase.write_text("[train]\npaths = 128\n")
    args = ("--process", "gbm", "--resume", tmp_path / "no-such-checkpoint", "--config", phase, "--steps", "5")
    assert "paths would change what the checkpoint learned" in _usage_error(_train_in_process(capsys, *args))


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[train]\npaths = 128\n", "may set only lr, lr_final_ratio, warmup_steps"),
        ('[train]\nprocess = "heston"\nlr = 1e-3\n', "process 'heston' does not match --process gbm"),
        ("[train]\n", "sets no phase field"),
    ],
)
def test_a_fine_tuning_phase_file_is_checked_before_anything_loads(tmp_path: Path, toml: str, needle: str) -> None:
    from spectralmc_server.cli.common import UsageError
    from spectralmc_server.cli.train import _phase_fields

    phase = tmp_path / "phase.toml"
    phase.write_text(toml)
    with pytest.raises(UsageError, match=needle):
        _phase_fields(phase, "gbm")


def test_train_resume_with_seed(trained: Trained, tmp_path: Path) -> None:
    args = (
        "train",
        "--process",
        "gbm",
        "--resume",
        trained.dir,
        "--seed",
        "3",
        "--steps",
        "5",
        "--out",
        tmp_path / "x",
    )
    message = _usage_error(_run(*args))
    assert "--seed" in message
    assert "--resume" in message
    assert not (tmp_path / "x").exists()


def test_train_cuda_without_cuda(tmp_path: Path) -> None:
    env = _env(CUDA_VISIBLE_DEVICES="")  # no usable GPU, even on a machine that has one
    proc = _run("train", "--process", "gbm", "--steps", "5", "--device", "cuda", "--out", tmp_path / "x", env=env)
    message = _usage_error(proc)
    assert "cuda" in message
    assert not (tmp_path / "x").exists()


def test_no_command() -> None:
    _usage_error(_run())


def test_train_minutes_turns_a_budget_into_steps(tmp_path: Path, trained: Trained) -> None:
    out = tmp_path / "M"
    proc = _run(
        "train",
        "--process",
        "gbm",
        "--minutes",
        "0.02",
        "--config",
        trained.config,
        "--out",
        out,
        "--quiet",
        "--no-certify",
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("--minutes 0.02:"))
    steps = int(line.rsplit("->", 1)[1].split()[0])
    summary = _json_line(proc.stdout)
    assert summary["step"] == steps >= 1
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["training"]["schedule_steps"] == steps  # --steps N reproduces the run


def test_train_interrupt_writes_a_checkpoint_and_exits_130(tmp_path: Path, trained: Trained) -> None:
    out = tmp_path / "I"
    command = [sys.executable, "-m", "spectralmc_server.cli", "train", "--process", "gbm", "--steps", "1000000"]
    command += ["--config", str(trained.config), "--out", str(out), "--checkpoint-every", "20", "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        while not (out / "manifest.json").exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    summary = _json_line(stdout)
    assert 20 <= summary["step"] < 1_000_000
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["state"]["step"] == summary["step"]  # nothing trained is lost


def test_train_out_must_be_writable_before_training(tmp_path: Path, trained: Trained) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    message = _usage_error(_run("train", "--process", "gbm", "--steps", "5", "--out", blocker))
    assert "exists and is not a directory" in message
    message = _usage_error(_run("train", "--process", "gbm", "--steps", "5", "--out", blocker / "sub" / "ck"))
    assert "--out: cannot create" in message
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: nothing to refuse
            return
        message = _usage_error(_run("train", "--process", "gbm", "--steps", "5", "--out", locked / "ck"))
        assert "is not writable" in message
    finally:
        locked.chmod(0o700)


def test_the_shipped_fine_tuning_phase_applies_to_the_rbergomi_configuration() -> None:
    import tomllib

    from spectralmc_server.cli.train import _phase_fields
    from spectralmc_server.engine.trainer import TrainConfig

    root = Path(__file__).resolve().parents[1]
    phase = _phase_fields(root / "config" / "rbergomi_focus.toml", "rbergomi")
    assert set(phase) == {"lr", "lr_final_ratio", "warmup_steps", "focus"}
    first = tomllib.loads((root / "config" / "rbergomi.toml").read_text())["train"]
    tuned = TrainConfig.model_validate({**first, **phase})
    assert tuned.focus is not None and tuned.focus.ranges == {"eta": (2.5, 4.0), "expiry_years": (0.7, 2.0)}
    anneal = _phase_fields(root / "config" / "rbergomi_anneal.toml", "rbergomi")  # the second phase tried
    assert set(anneal) == {"lr", "lr_final_ratio", "warmup_steps", "ema_decay", "focus"}
    low = TrainConfig.model_validate({**first, **anneal})
    assert low.lr == 2e-4 and low.ema_decay == 0.9995
    assert low.focus is not None and low.focus.share == 0.125
