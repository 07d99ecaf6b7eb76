"""`spectralmc store` for the first hour of operations (issue 22): ``pins``, the pin log
(item 1); ``--config`` and its ``[s3]`` table, as ``serve`` reads them (item 6); read
commands on a store that does not exist refuse it on one line, exit 2, and create
nothing (item 13).

Commands run in-process through ``spectralmc_server.cli.main`` (what the console script
calls; one real process checks the exit code and stderr as users see them). S3 is the
session's SeaweedFS; the admin route ``GET .../pins`` is checked against it too, and
against the CLI reading the same bucket."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from server_util import TOKEN, settings_for
from store_util import tiny_files

from spectralmc_server.cli import main
from spectralmc_server.service.app import create_app
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.store.objects import LocalObjectStore, ObjectStore
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.versions import VersionStore

Result = tuple[int, str, str]
READS = (["list"], ["inspect", "1"], ["verify"], ["pins"], ["tensorboard", "--logdir", "tb"])
MODEL_VERIFY = ("--model", "gbm", "verify")
DEAD_ENDPOINT = "http://127.0.0.1:9"  # nothing listens there (discard): refused at once


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_json(result: Result) -> Any:
    code, out, _ = result
    assert code == 0, result
    assert len(out.splitlines()) == 1, out
    return orjson.loads(out)


def one_line_error(result: Result) -> str:
    code, out, err = result
    assert code == 2, result
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, result
    return err.strip()


async def fill(objects: ObjectStore) -> None:
    """gbm: versions 1 and 2, pinned 1 (alice), 2 with force (bob), unpinned (carol);
    other: one version, never pinned."""
    gbm, other = VersionStore(objects, "gbm"), VersionStore(objects, "other")
    for tag in (1, 2):
        await gbm.commit_files(tiny_files(tag), f"v{tag}")
    await other.commit_files(tiny_files(3), "only")
    await gbm.pin(1, "alice")
    await gbm.pin(2, "bob", force=True, gate=["no certificate"])
    await gbm.unpin("carol")
    await objects.close()


async def fill_s3(bucket: str, prefix: str, settings: S3Settings) -> None:
    await fill(await S3ObjectStore(bucket, prefix, settings).open())


EXPECTED = [
    (1, "pin", 1, "alice", False, []),
    (2, "pin", 2, "bob", True, ["no certificate"]),
    (3, "unpin", None, "carol", False, []),
]


def summary(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["seq"], r["action"], r["version"], r["by"], r["forced"], r["gate"]) for r in rows]


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("issue22") / "store"
    asyncio.run(fill(LocalObjectStore(root)))
    return root.as_uri()


def s3_toml(path: Path, endpoint: str, store: str | None = None, **extra: Any) -> Path:
    lines = [] if store is None else [f'store = "{store}"']
    lines += [
        "[s3]",
        f'endpoint_url = "{endpoint}"',
        'region = "us-east-1"',
        'access_key_id = "spectralmc"',
        'secret_access_key = "spectralmc-secret"',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- item 1: pins -------------------------------------------------------------------------


def test_pins_lists_the_log_oldest_first(local_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = one_json(run(capsys, "store", "--store", local_store, "--model", "gbm", "pins", "--json"))
    assert summary(rows) == EXPECTED
    assert all(r["time"].endswith("Z") for r in rows) and rows[0]["time"] <= rows[1]["time"] <= rows[2]["time"]
    assert rows[0]["record_hash"].startswith("sha256:") and rows[2]["record_hash"] is None
    assert one_json(run(capsys, "store", "--store", local_store, "--model", "gbm", "--json", "pins")) == rows

    code, out, err = run(capsys, "store", "--store", local_store, "--model", "gbm", "pins")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].split()[0] == "1" and " pin " in lines[0] and lines[0].endswith("by alice")
    assert "by bob" in lines[1] and "FORCED past its quality gate: no certificate" in lines[1]
    assert " unpin " in lines[2] and " - " in lines[2] and lines[2].endswith("by carol")


def test_pins_of_a_model_never_pinned_or_not_there(local_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "store", "--store", local_store, "--model", "other", "pins")
    assert code == 0 and out.strip() == "model 'other' has never been pinned: servers track the head"
    assert one_json(run(capsys, "store", "--store", local_store, "--model", "other", "pins", "--json")) == []
    err = one_line_error(run(capsys, "store", "--store", local_store, "--model", "nosuch", "pins"))
    assert err == f"error: model 'nosuch' is not in store {local_store}: it has no versions and no pins"


# -- item 13: a store that does not exist -------------------------------------------------


def test_read_commands_refuse_a_missing_local_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no" / "store"
    uri = missing.as_uri()
    monkeypatch.chdir(tmp_path)  # tensorboard's relative --logdir
    for op in READS:
        err = one_line_error(run(capsys, "store", "--store", uri, "--model", "gbm", *op))
        assert err == f"error: store {uri} does not exist", op
    assert not (tmp_path / "no").exists() and not (tmp_path / "tb").exists()  # nothing created
    a_file = tmp_path / "file"
    a_file.write_text("x")
    err = one_line_error(run(capsys, "store", "--store", a_file.as_uri(), "--model", "gbm", "list"))
    assert err == f"error: store {a_file.as_uri()} is not a directory"
    # a bad model name is still named first, as before
    assert "invalid model name" in one_line_error(run(capsys, "store", "--store", uri, "--model", "../x", "list"))


def test_write_commands_still_create_a_local_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = (tmp_path / "new").as_uri()
    code, out, _ = run(capsys, "store", "--store", uri, "--model", "gbm", "unpin", "--by", "x")
    assert code == 0 and out.startswith("unpinned") and (tmp_path / "new").is_dir()
    code, out, _ = run(capsys, "store", "--store", uri, "--model", "gbm", "list")
    assert code == 0 and out.strip() == "model 'gbm' has no versions"  # it exists now: an empty store


# -- item 6: --config ---------------------------------------------------------------------


def test_config_errors(tmp_path: Path, local_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--model", "gbm", "list")
    assert one_line_error(run(capsys, "store", *args)) == (
        "error: --store is required (or --config FILE, whose store is then used)"
    )
    nofile = tmp_path / "nope.toml"
    assert one_line_error(run(capsys, "store", "--config", nofile, *args)) == f"error: --config: no such file {nofile}"
    bad = tmp_path / "bad.toml"
    bad.write_text("[s3\n")
    assert f"--config {bad}: not valid TOML" in one_line_error(run(capsys, "store", "--config", bad, *args))
    invalid = s3_toml(tmp_path / "invalid.toml", DEAD_ENDPOINT, max_attempts=0)
    err = one_line_error(run(capsys, "store", "--config", invalid, "--store", local_store, *args))
    assert f"--config {invalid}: invalid settings" in err and "s3.max_attempts" in err


def test_config_s3_table_reaches_the_store(
    seaweedfs: Any,
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = make_bucket()
    asyncio.run(fill_s3(bucket, "team", s3_settings))
    # the AWS_* variables lead nowhere: only the config can reach the store
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "SPECTRALMC_S3__ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD_ENDPOINT)
    uri = f"s3://{bucket}/team"
    config = s3_toml(tmp_path / "server.toml", seaweedfs.endpoint_url, store=uri)

    # the store of the config, reached through its [s3] table
    rows = one_json(run(capsys, "store", "--config", config, "--model", "gbm", "--json", "pins"))
    assert summary(rows) == EXPECTED
    # --store wins over the config's store (another prefix: an empty store)
    other = f"s3://{bucket}/elsewhere"
    err = one_line_error(run(capsys, "store", "--config", config, "--store", other, "--model", "gbm", "pins"))
    assert err == f"error: model 'gbm' is not in store {other}: it has no versions and no pins"
    # without --config, AWS_ENDPOINT_URL is used, as before: the store cannot be reached
    assert "s3://" in one_line_error(run(capsys, "store", "--store", uri, "--model", "gbm", "list"))
    # SPECTRALMC_S3__* over the file, as for serve
    dead = s3_toml(tmp_path / "dead.toml", DEAD_ENDPOINT, store=uri, max_attempts=1)
    assert "s3://" in one_line_error(run(capsys, "store", "--config", dead, "--model", "gbm", "list"))
    monkeypatch.setenv("SPECTRALMC_S3__ENDPOINT_URL", seaweedfs.endpoint_url)
    listed = one_json(run(capsys, "store", "--config", dead, "--model", "gbm", "list", "--json"))
    assert [r["version"] for r in listed] == [1, 2]


def test_read_commands_refuse_a_missing_bucket(
    seaweedfs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = s3_toml(tmp_path / "server.toml", seaweedfs.endpoint_url)
    bucket = f"spectralmc-missing-{uuid.uuid4().hex[:12]}"
    uri = f"s3://{bucket}/models"
    monkeypatch.chdir(tmp_path)
    for op in READS:
        err = one_line_error(run(capsys, "store", "--config", config, "--store", uri, "--model", "gbm", *op))
        assert err == f"error: store {uri} does not exist: there is no bucket '{bucket}'", op
    # as users see it: a real process, one line on stderr, exit 2
    proc = subprocess.run(
        [sys.executable, "-m", "spectralmc_server.cli", "store", "--config", config, "--store", uri, *MODEL_VERIFY],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == f"error: store {uri} does not exist: there is no bucket '{bucket}'\n"


async def test_pins_route_and_cli_agree_on_s3(
    seaweedfs: Any,
    s3_settings: S3Settings,
    make_bucket: Callable[[], str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> None:
    uri = f"s3://{make_bucket()}/serving"
    s3 = {
        "endpoint_url": s3_settings.endpoint_url,
        "region": s3_settings.region,
        "access_key_id": s3_settings.access_key_id,
        "secret_access_key": s3_settings.secret_access_key,
    }
    client = await aiohttp_client(create_app(settings_for(tmp_path, store=uri, s3=s3, models=["gbm"]), Metrics()))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for route, body in (("pin", {"version": 1, "by": "alice"}), ("unpin", {"by": "bob"}), ("pin", {"version": 1})):
        r = await client.post(f"/v1/admin/models/gbm/{route}", json=body, headers=auth)
        assert r.status == 200, await r.text()
    r = await client.get("/v1/admin/models/gbm/pins", headers=auth)
    assert r.status == 200, await r.text()
    out = orjson.loads(await r.read())
    assert out["pinned"] == 1
    assert [(p["seq"], p["action"], p["version"], p["by"]) for p in out["pins"]] == [
        (1, "pin", 1, "alice"),
        (2, "unpin", None, "bob"),
        (3, "pin", 1, "admin api"),
    ]
    config = s3_toml(tmp_path / "server.toml", seaweedfs.endpoint_url, store=uri)
    # main runs its own event loop: off this test's loop, in a thread
    code = await asyncio.to_thread(main, ["store", "--config", str(config), "--model", "gbm", "--json", "pins"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert orjson.loads(captured.out) == out["pins"]
