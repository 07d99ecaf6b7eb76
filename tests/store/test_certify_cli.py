"""`spectralmc store certify N` end to end on a store holding a tiny GBM model: a real
4,096-point certification attached in place, shown by `store inspect` and `store list`,
checked by `store verify`, and reproduced byte for byte by certifying again. The two
certifications (about 30 s each on two cores) share one module-scoped store."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from spectralmc_server import cli as cli_module
from spectralmc_server.engine import certify as certify_module
from spectralmc_server.engine.certificate import certificate_hash
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.store.objects import LocalObjectStore, list_all
from spectralmc_server.store.versions import VersionStore

pytestmark = pytest.mark.slow

TINY = {
    "batch_points": 16,
    "paths": 64,
    "validate_every": 5,
    "validation_grid": 3,
    "network": {"width": 8, "depth": 1},
}


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )


def usage_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    return proc.stderr.strip()


@dataclass(frozen=True)
class Certified:
    root: Path
    uri: str
    first: subprocess.CompletedProcess[str]  # `store certify 2`: attaches
    again: subprocess.CompletedProcess[str]  # `store certify 2 --json`: reproduces


def store_cmd(uri: str, *args: str) -> list[str]:
    return ["store", "--store", uri, "--model", "gbm", *args]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Versions 1 (model A, collected by GC), 2 (model B) and 3 (model B again, left
    uncertified), none certified: a few seconds of training, no certification."""
    root = tmp_path_factory.mktemp("certify-cli") / "store"
    cfg = TrainConfig.model_validate(TINY)
    trainer = Trainer(cfg)
    trainer.run(5)
    model_a = trainer.checkpoint({"command": "test"})
    trainer.run(5)
    model_b = trainer.checkpoint({"command": "test"})
    trainer.close()

    async def build() -> None:
        vs = VersionStore(LocalObjectStore(root), "gbm")
        await vs.commit(model_a, "model A")
        await vs.commit(model_b, "model B")
        await vs.commit(model_b, "model B again")
        report = await vs.gc(2, dry_run=False, grace_seconds=0)
        assert report.collected_versions == [1]

    asyncio.run(build())
    return root


@pytest.fixture(scope="module")
def certified(store_root: Path) -> Certified:
    """Version 2 certified twice through the CLI: attached, then reproduced."""
    root = store_root
    uri = f"file://{root}"
    first = cli(*store_cmd(uri, "certify", "2"))
    again = cli(*store_cmd(uri, "certify", "2", "--json"))
    return Certified(root, uri, first, again)


def test_certify_attaches_and_prints_the_table(certified: Certified) -> None:
    proc = certified.first
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "attached: version 2 is now certified by sha256:" in out
    assert "4096 held-out points, seed 2147483749, truth: Black-Scholes closed forms" in out
    price = next(line.split() for line in out.splitlines() if line.strip().startswith("price "))
    # price, unit "D F", p50, p95, max, then the same in bp of spot (x 1e4)
    p50, p95, worst = (float(x) for x in price[3:6])
    assert 0 <= p50 <= p95 <= worst
    assert [float(x) for x in price[6:9]] == pytest.approx([p50 * 1e4, p95 * 1e4, worst * 1e4], rel=1e-3, abs=1e-3)
    assert "certified version 2 in " in out


def test_certifying_again_reproduces_the_same_hash(certified: Certified) -> None:
    assert certified.again.returncode == 0, certified.again.stderr
    again = orjson.loads(certified.again.stdout)
    attached = next(w for w in certified.first.stdout.split() if w.startswith("sha256:"))
    assert again["outcome"] == "reproduced"
    assert again["certificate"] == again["computed"] == attached
    assert again["points"] == 4096 and again["summary"]["seed"] == 2147483749


def test_inspect_list_and_verify_show_the_certificate(certified: Certified) -> None:
    attached = orjson.loads(certified.again.stdout)["certificate"]
    text = cli(*store_cmd(certified.uri, "inspect", "2"))
    assert text.returncode == 0, text.stderr
    assert f"certificate {attached}" in text.stdout and "\n  price " in text.stdout
    assert "unqualified" not in text.stdout.split("certificate ")[-1]
    js = orjson.loads(cli(*store_cmd(certified.uri, "inspect", "2", "--json")).stdout)
    assert js["certificate"]["hash"] == attached and js["certificate"]["points"] == 4096
    assert set(js["certificate"]["measures"]) >= {"price", "delta", "digital"}
    uncertified = cli(*store_cmd(certified.uri, "inspect", "3"))
    assert "certificate: none (spectralmc store certify 3 makes one)" in uncertified.stdout
    rows = orjson.loads(cli(*store_cmd(certified.uri, "list", "--json")).stdout)
    assert [(r["version"], r["certified"], r["collected"]) for r in rows] == [
        (1, False, True),
        (2, True, False),
        (3, False, False),
    ]
    verify = cli(*store_cmd(certified.uri, "verify", "--json"))
    assert verify.returncode == 0 and orjson.loads(verify.stdout)["ok"] is True


def test_a_certificate_that_does_not_reproduce_exits_1_and_changes_nothing(
    certified: Certified, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a machine whose arithmetic differed would see. Certifying again takes half
    a minute and reproduces exactly (tested above), so this stands in for the
    arithmetic: the stored certificate with one figure changed (the store is real)."""
    stored = asyncio.run(VersionStore(LocalObjectStore(certified.root), "gbm").certificate(2))
    assert stored is not None
    other = orjson.loads(orjson.dumps(stored))
    other["measures"]["price"]["p95"] *= 1.5
    monkeypatch.setattr(certify_module, "certify", lambda served, *, points: other)
    before = sorted(k for k, _ in asyncio.run(list_all(LocalObjectStore(certified.root), "models/")))
    code = cli_module.main(store_cmd(certified.uri, "certify", "2"))
    out = capsys.readouterr().out
    assert code == 1
    assert f"version 2 is certified by {certificate_hash(stored)}" in out
    assert f"this run computed {certificate_hash(other)}" in out and "store is unchanged" in out
    after = sorted(k for k, _ in asyncio.run(list_all(LocalObjectStore(certified.root), "models/")))
    assert after == before


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("certify", "9"), {}, "no version 9"),
        (("certify", "1"), {}, "garbage-collected"),
        (("certify", "2", "--points", "100"), {}, "--points must be from 4096 to 65536, got 100"),
        (("certify", "2", "--points", "many"), {}, "invalid int value"),
        (("certify", "2"), {"SPECTRALMC_CERTIFICATE__POINTS": "100"}, "certificate.points"),
    ],
)
def test_certify_usage_errors(store_root: Path, args: tuple[str, ...], env: dict[str, str], expected: str) -> None:
    assert expected in usage_error(cli(*store_cmd(f"file://{store_root}", *args), env=env))
