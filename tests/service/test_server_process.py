"""``spectralmc serve`` as a real process on loopback: its metrics pass promtool and a
real Prometheus scrapes them, schemathesis fuzzes it from its own OpenAPI description
without a 5xx, SIGTERM drains in-flight work and exits 0, bad command lines exit 2 with
one line, and settings reach it through a TOML file and the environment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from server_util import CONTRACT, TOKEN, ServerProcess, free_port

Serve = Callable[..., ServerProcess]
PRICE_BODY: dict[str, Any] = {"contracts": [CONTRACT]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- helpers ------------------------------------------------------------------------------


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    """One request; the status and body, for error statuses too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status: int = r.status
            return status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def price(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    status, raw = http("POST", f"{url}/v1/price", body or PRICE_BODY)
    assert status == 200, f"POST /v1/price answered {status}: {raw!r}"
    answer: dict[str, Any] = json.loads(raw)
    return answer


def metric_value(text: str, sample: str) -> float | None:
    """The value of one exposition line ``sample value`` (labels included in ``sample``)."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return None


def require_tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: apt-get install -y prometheus (it ships {name})"
    return path


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it does not go (by this process's own PID)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def log_text(server: ServerProcess) -> str:
    return server.log.read_text(errors="replace")


# -- metrics ------------------------------------------------------------------------------


def test_metrics_pass_promtool(serve: Serve) -> None:
    promtool = require_tool("promtool")
    server = serve()
    price(server.url)
    status, body = http("GET", f"{server.url}/metrics")
    assert status == 200
    assert b"spectralmc_contracts_priced_total" in body
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False)
    assert check.returncode == 0, (
        f"promtool check metrics exited {check.returncode}:\n{check.stdout.decode()}{check.stderr.decode()}"
    )


def _prom_query(base: str, query: str) -> list[dict[str, Any]]:
    status, raw = http("GET", f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}", timeout=5)
    assert status == 200, f"Prometheus query {query!r} answered {status}: {raw!r}"
    doc = json.loads(raw)
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


@pytest.mark.slow
def test_real_prometheus_scrapes_the_server(serve: Serve, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    server = serve()
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: spectralmc\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    prom_log = tmp_path / "prometheus.log"
    with prom_log.open("wb") as out:
        prom = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{prom_port}"
    try:
        ready_by = time.monotonic() + 60.0  # Prometheus answers 503 until its TSDB is open
        while True:
            assert prom.poll() is None, f"prometheus exited with {prom.returncode}:\n{prom_log.read_text()}"
            try:
                if http("GET", f"{base}/-/ready", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < ready_by, f"prometheus not ready within 60 s:\n{prom_log.read_text()}"
            time.sleep(0.2)
        for _ in range(3):
            price(server.url)
        deadline = time.monotonic() + 30.0
        priced = up = 0.0
        info: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert prom.poll() is None, f"prometheus exited with {prom.returncode}:\n{prom_log.read_text()}"
            try:
                rows = _prom_query(base, "spectralmc_contracts_priced_total")
                priced = sum(float(r["value"][1]) for r in rows)
                up_rows = _prom_query(base, 'up{job="spectralmc"}')
                up = float(up_rows[0]["value"][1]) if up_rows else 0.0
                info = _prom_query(base, "spectralmc_model_info")
            except OSError:  # prometheus still starting
                pass
            if priced >= 3 and up == 1 and info:
                break
            time.sleep(0.5)
        assert up == 1, f"the scrape target is not up:\n{prom_log.read_text()}"
        assert priced == 3, f"spectralmc_contracts_priced_total summed to {priced}, expected 3"
        assert sorted(r["metric"]["model"] for r in info) == ["asian", "gbm", "heston", "merton", "rbergomi"], info
        labels = next(r["metric"] for r in info if r["metric"]["model"] == "gbm")
        assert labels["model"] == "gbm"
        assert labels["version"] == "1"
        assert labels["mode"] == "tracking"
        assert labels["content_hash"].startswith("sha256:")
        assert float(info[0]["value"][1]) == 1.0
    finally:
        stop_process(prom)


# -- fuzzing ------------------------------------------------------------------------------

SCHEMATHESIS_CONFIG = """\
generation.max-examples = 20

# Admin routes get the served model's name most of the time (random names: 404).
[dictionaries.models]
values = ["gbm"]

[parameters]
"path.name" = { dictionary = "models", probability = 0.7 }

# A commit that passes validation certifies a version (seconds of this machine each):
# fewer examples there, where the rest of a body is a message and two flags.
[[operations]]
include-path-regex = "/commit$"
generation.max-examples = 8
"""


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(serve: Serve, tmp_path: Path) -> None:
    # Training on, so the commit route commits (and pin, gc and verify see many versions).
    server = serve(env={"SPECTRALMC_TRAIN__ENABLED": "true"})
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{server.url}/v1/openapi.json",
        "--checks",
        "not_a_server_error",
        "--mode",
        "all",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--no-color",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    output = f"{run.stdout}{run.stderr}\n--- server log ---\n{log_text(server)}"
    assert run.returncode == 0, f"schemathesis exited {run.returncode}:\n{output}"
    assert "unhandled error" not in log_text(server), log_text(server)
    assert server.proc.poll() is None, "the server died during fuzzing"
    # nothing the fuzzer sent made the HTTP process load torch (lazy_torch.py)
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps, "the HTTP process loaded torch"


# -- graceful shutdown --------------------------------------------------------------------

N_CONCURRENT = 20


def test_sigterm_answers_in_flight_requests_and_exits_0(serve: Serve) -> None:
    shutdown_timeout = 15.0
    # Batches wait up to 1 s to fill: every request is still queued when SIGTERM arrives.
    server = serve(
        env={
            "SPECTRALMC_QUEUE__MAX_WAIT_SECONDS": "1",
            "SPECTRALMC_SHUTDOWN_TIMEOUT_SECONDS": str(shutdown_timeout),
        }
    )
    bodies = [{"contracts": [{**CONTRACT, "id": f"c{i}", "strike": 90.0 + i}]} for i in range(N_CONCURRENT)]

    def one(body: dict[str, Any]) -> tuple[int, bytes] | BaseException:
        try:
            return http("POST", f"{server.url}/v1/price", body, timeout=shutdown_timeout + 10)
        except Exception as exc:  # a connection error: recorded, judged below
            return exc

    with ThreadPoolExecutor(N_CONCURRENT) as pool:
        futures = [pool.submit(one, b) for b in bodies]
        # Wait until the server holds all of them: queued (the first batch waits 1 s to
        # fill) or handed to the worker.
        deadline = time.monotonic() + 10.0
        received = 0.0
        while time.monotonic() < deadline:
            _, raw = http("GET", f"{server.url}/metrics", timeout=2)
            text = raw.decode()
            received = (metric_value(text, "spectralmc_queue_depth") or 0.0) + (
                metric_value(text, "spectralmc_queue_wait_seconds_count") or 0.0
            )
            if received == N_CONCURRENT:
                break
            time.sleep(0.01)
        assert received == N_CONCURRENT, f"the server received only {received} of {N_CONCURRENT} requests"
        answered_before = sum(f.done() for f in futures)
        assert answered_before < N_CONCURRENT, "every request was answered before SIGTERM: nothing was in flight"
        server.proc.send_signal(signal.SIGTERM)
        outcomes = [f.result() for f in futures]
    try:
        code = server.proc.wait(shutdown_timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {shutdown_timeout} s of SIGTERM:\n{log_text(server)}")
    log = log_text(server)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failed, f"requests in flight at SIGTERM failed: {failed!r}\n{log}"
    statuses = [o[0] for o in outcomes if not isinstance(o, BaseException)]
    # Every request was queued before SIGTERM, so every one is answered with a price.
    assert statuses == [200] * N_CONCURRENT, f"statuses {statuses}\n{log}"
    for i, o in enumerate(outcomes):
        assert not isinstance(o, BaseException)
        answer = json.loads(o[1])
        assert [r["id"] for r in answer["results"]] == [f"c{i}"]
        assert answer["results"][0]["price"] > 0
    assert code == 0, f"exit code {code}\n{log}"
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


# -- usage errors -------------------------------------------------------------------------


def run_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRALMC_")}
    cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--data-dir", str(tmp_path / "data"), *args]
    return subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        env={**base, "SPECTRALMC_TRAIN__ENABLED": "false", **(env or {})},
    )


def assert_usage_error(run: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert run.returncode == 2, f"exit {run.returncode}\nstdout: {run.stdout}\nstderr: {run.stderr}"
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{run.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_serve_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert_usage_error(run_serve(tmp_path, "--config", str(missing)), "--config", str(missing))


def test_serve_invalid_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [\n")
    assert_usage_error(run_serve(tmp_path, "--config", str(bad)), "not valid TOML", str(bad))


@pytest.mark.parametrize("content", [None, "port = [\n", b"\xff\xfe"])
def test_a_bad_config_file_is_refused_before_torch_is_imported(tmp_path: Path, content: str | bytes | None) -> None:
    config = tmp_path / "server.toml"
    if isinstance(content, str):
        config.write_text(content)
    elif isinstance(content, bytes):
        config.write_bytes(content)
    probe = (
        "import sys\n"
        "from spectralmc_server.cli import main\n"
        f"code = main(['serve', '--config', {str(config)!r}])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert run.stdout.split() == ["2", "False"], (run.stdout, run.stderr)
    assert run.stderr.startswith("error: --config") and str(config) in run.stderr, run.stderr


def test_an_unreadable_config_file_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from spectralmc_server.cli import main

    config = tmp_path / "server.toml"
    config.write_text("port = 8080\n")

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # root reads any file: the error is simulated
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --config {config}: cannot read it: Permission denied\n", err


def test_serve_invalid_env_setting(tmp_path: Path) -> None:
    run = run_serve(tmp_path, env={"SPECTRALMC_PORT": "notaport", "SPECTRALMC_QUEUE__MAX_WAIT_SECONDS": "5"})
    assert_usage_error(run, "invalid settings", "port", "queue.max_wait_seconds")


def test_serve_invalid_toml_setting(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('role = "bogus"\nadmin_tokn = "x"\n')
    assert_usage_error(run_serve(tmp_path, "--config", str(config)), "invalid settings", "role", "admin_tokn")


def test_serve_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = run_serve(tmp_path, "--port", str(port))
    assert run.returncode == 2, f"exit {run.returncode}\nstderr: {run.stderr}"
    last = run.stderr.strip().splitlines()[-1]  # after the startup log lines
    assert last.startswith("error: cannot listen on 127.0.0.1:") and str(port) in last, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


# -- settings through a file and the environment ------------------------------------------


def test_settings_from_toml_and_env(serve: Serve, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        'admin_token = "from-the-file"\n'
        "poll_seconds = 0.5\n"
        "[queue]\n"
        "max_batch_contracts = 128\n"
        "max_pending_requests = 77\n"
        "[train]\n"
        "enabled = false\n"
    )
    env_token = "from-the-environment"
    server = serve("--config", str(config), env={"SPECTRALMC_ADMIN_TOKEN": env_token})
    versions = f"{server.url}/v1/admin/models/gbm/versions"
    status, raw = http("GET", versions, headers={"Authorization": f"Bearer {env_token}"})
    assert status == 200, raw
    assert [v["version"] for v in json.loads(raw)["versions"]] == [1]
    # The environment overrides the file: the file's token is wrong now.
    status, raw = http("GET", versions, headers={"Authorization": "Bearer from-the-file"})
    assert status == 403, raw
    # The file's [queue] table reached the server.
    _, text = http("GET", f"{server.url}/metrics")
    assert metric_value(text.decode(), 'spectralmc_queue_capacity{unit="requests"}') == 77
    status, raw = http("GET", f"{server.url}/readyz")
    assert status == 200 and json.loads(raw)["training"] is None, raw


def test_malformed_http_is_a_400_and_one_log_line(serve: Serve) -> None:
    """A request aiohttp cannot parse is the client's fault: 400, and one warning line in
    the log rather than a traceback."""
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.split(b" ", 2)[1] == b"400", reply[:200]
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=10) as r:  # still serving
        assert r.status == 200
    server.stop()
    log = server.log.read_text()
    assert "malformed HTTP request" in log
    assert "Traceback" not in log, log


def test_a_trainer_with_an_unreachable_store_exits_1_with_one_line(tmp_path: Path) -> None:
    """The store is down at start-up of a trainer (a serving replica starts from its
    version cache instead: test_store_down_at_start.py): exit 1 with one line naming the
    store, no traceback and no unclosed-session noise."""
    port = free_port()
    dead = free_port()  # nothing listens there
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{dead}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_REGION": "us-east-1",
        "SPECTRALMC_TRAIN__ENABLED": "false",
    }
    cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--port", str(port), "--role", "train"]
    cmd += ["--store", "s3://absent-bucket/p", "--data-dir", str(tmp_path / "d"), "--log-level", "warning"]
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot start: model store s3://absent-bucket/p"), r.stderr
    assert "Traceback" not in r.stderr and "Unclosed" not in r.stderr, r.stderr
