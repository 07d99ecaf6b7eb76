"""docker-compose.yml, its CPU override, the two Dockerfiles and the Prometheus and
Grafana configuration compose mounts: a real Compose implementation and promtool accept
them, and they agree with each other, with the settings the server reads and with the
metrics the application exposes. No image is built (that needs a Docker daemon)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

from spectralmc_server.cli import build_parser
from spectralmc_server.engine.device import BudgetConfig, Budgets
from spectralmc_server.engine_service.metrics import ModelState, TrainingState
from spectralmc_server.service.metrics import Metrics, StateSource
from spectralmc_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "deploy" / "compose.cpu.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERFILE_CUDA = ROOT / "deploy" / "Dockerfile.cuda"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "spectralmc.yml"
DASHBOARD = GRAFANA / "dashboards" / "spectralmc.json"

MiB = 1 << 20
# Process overhead each SpectralMC container's memory limit allows on top of its caps:
# two processes, the HTTP process and the engine, each with Python and torch
# (docker-compose.yml: ~560 MiB RSS measured for both together at ready, ~680 MiB under
# bench/server_load.py, CPU torch 2.13).
OVERHEAD = 768 * MiB
ROLE_CAPS = {  # the budgets each role reserves (deploy/k8s and docker-compose.yml explain)
    "serve": ("inference", "model_cache"),
    "train": ("normals", "simulator", "training", "inference", "model_cache"),
}
# Variables the compose files interpolate; unset so that the workstation defaults are checked.
COMPOSE_VARIABLES = re.compile(r"^(SPECTRALMC_|MINIO_|GRAFANA_|COMPOSE_)")
CMD = ["serve", "--host", "0.0.0.0", "--port", "8080"]


# -- Compose ----------------------------------------------------------------------------


def compose_command() -> list[str]:
    """``docker compose`` where the plugin exists, else Debian's ``docker-compose``."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], check=False, capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        return [legacy]
    pytest.fail(
        "no Compose implementation to check docker-compose.yml with: install the docker compose plugin "
        "or Debian's docker-compose (apt-get install -y docker-compose; no daemon needed)"
    )


def compose(*files: Path, args: tuple[str, ...] = ("config",)) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not COMPOSE_VARIABLES.match(k)}
    cmd = [*compose_command(), "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run([*cmd, *args], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    """The base file as Compose resolves it (variables at their defaults)."""
    r = compose(COMPOSE)
    assert r.returncode == 0, r.stderr
    config: dict[str, Any] = yaml.safe_load(r.stdout)
    return config


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    """The base file with deploy/compose.cpu.yml."""
    r = compose(COMPOSE, CPU_OVERRIDE)
    assert r.returncode == 0, r.stderr
    config: dict[str, Any] = yaml.safe_load(r.stdout)
    return config


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, CPU_OVERRIDE)], ids=["base", "cpu"])
def test_compose_config_is_valid(files: tuple[Path, ...]) -> None:
    r = compose(*files, args=("config", "-q"))
    assert r.returncode == 0, r.stdout + r.stderr


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def spectralmc_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run a SpectralMC server (they have SPECTRALMC_ROLE)."""
    return {name: s for name, s in config["services"].items() if "SPECTRALMC_ROLE" in env_of(s)}


def memory_bytes(value: str | int) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmg]?)i?b?", str(value).strip().lower())
    assert m, f"memory limit {value!r}"
    return int(float(m.group(1)) * {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source of each volume (short or long syntax)."""
    found = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            found[v["target"]] = v.get("source", "")
        else:
            source, target = v.split(":")[:2]
            found[target] = source
    return found


def published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(published host port or range, container port) of each port mapping."""
    found = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            found.append((str(p.get("published") or ""), int(p["target"])))
        else:
            spec = str(p).split("/")[0]
            *host, target = spec.split(":")
            found.append((host[-1] if host else "", int(target)))
    return found


def reservations(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []
    )
    return devices


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test")
    assert test, "no healthcheck"
    return " ".join(test) if isinstance(test, list) else str(test)


def test_api_replicas_serve(base: dict[str, Any]) -> None:
    api = base["services"]["api"]
    assert api["deploy"]["replicas"] == 2
    assert env_of(api)["SPECTRALMC_ROLE"] == "serve"
    assert api["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(api["build"]["context"]).resolve() == ROOT
    # Two replicas cannot share one fixed host port: none, or a range of at least two.
    for host, target in published(api):
        assert target == 8080
        if host:
            lo, _, hi = host.partition("-")
            assert hi and int(hi) - int(lo) + 1 >= api["deploy"]["replicas"], f"fixed host port {host}"
    assert "/readyz" in healthcheck_command(api)


def test_trainer_on_the_gpu(base: dict[str, Any]) -> None:
    trainer = base["services"]["trainer"]
    env = env_of(trainer)
    assert env["SPECTRALMC_ROLE"] == "train"
    assert env["SPECTRALMC_TRAIN__DEVICE"] == "cuda"
    assert trainer["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    [gpu] = reservations(trainer)
    assert gpu["driver"] == "nvidia"
    assert int(gpu["count"]) == 1
    assert "gpu" in gpu["capabilities"]
    assert "/readyz" in healthcheck_command(trainer)
    assert trainer.get("deploy", {}).get("replicas", 1) == 1  # two trainers would race their commits


def test_cpu_override_trains_on_the_cpu(cpu: dict[str, Any]) -> None:
    services = cpu["services"]
    # The GPU trainer is out of the default profile (Compose v2 leaves it out of `config`).
    assert "trainer" not in services or services["trainer"].get("profiles") == ["gpu"]
    trainer = services["trainer-cpu"]
    env = env_of(trainer)
    assert env["SPECTRALMC_ROLE"] == "train"
    assert env["SPECTRALMC_TRAIN__DEVICE"] == "cpu"
    assert trainer["build"]["dockerfile"] == "deploy/Dockerfile"
    assert not reservations(trainer)
    assert not trainer.get("profiles")
    # Prometheus scrapes trainer:8080 whichever trainer runs.
    assert "trainer" in trainer["networks"]["default"]["aliases"]
    assert "/readyz" in healthcheck_command(trainer)
    assert services["api"]["deploy"]["replicas"] == 2  # the rest as in the base file


def bucket_made_by_init(config: dict[str, Any]) -> tuple[str, str]:
    """(bucket, endpoint host:port) that minio-init creates with ``mc mb``."""
    init = config["services"]["minio-init"]
    entry = init.get("entrypoint") or []
    cmd = init.get("command") or []
    words = [*(entry if isinstance(entry, list) else shlex.split(entry)), *(cmd if isinstance(cmd, list) else [cmd])]
    assert words[:2] == ["mc", "mb"], words
    alias, bucket = words[-1].split("/", 1)
    url = urlsplit(env_of(init)[f"MC_HOST_{alias}"])
    return bucket, f"{url.hostname}:{url.port}"


@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_one_store_for_every_server(variant: str, request: pytest.FixtureRequest) -> None:
    config: dict[str, Any] = request.getfixturevalue(variant)
    services = config["services"]
    bucket, init_endpoint = bucket_made_by_init(config)
    assert bucket == "spectralmc"
    assert init_endpoint == "minio:9000"
    minio = env_of(services["minio"])
    init_url = urlsplit(env_of(services["minio-init"])["MC_HOST_local"])
    assert (init_url.username, init_url.password) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    servers = spectralmc_services(config)
    assert {"api", "trainer"} <= set(servers)
    tokens = set()
    for name, service in servers.items():
        env = env_of(service)
        store = urlsplit(env["SPECTRALMC_STORE"])
        assert (store.scheme, store.netloc) == ("s3", bucket), name
        assert store.path.strip("/"), f"{name}: a prefix inside the bucket"
        assert env["SPECTRALMC_S3__ENDPOINT_URL"] == f"http://{init_endpoint}", name
        assert env["SPECTRALMC_S3__ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"], name
        assert env["SPECTRALMC_S3__SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"], name
        assert store_env(env) == store_env(env_of(servers["api"])), name
        tokens.add(env["SPECTRALMC_ADMIN_TOKEN"])
        assert service["depends_on"]["minio-init"]["condition"] == "service_completed_successfully", name
    assert len(tokens) == 1
    assert services["minio"]["image"].startswith("minio/minio:")
    assert services["minio-init"]["image"].startswith("minio/mc:")
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def store_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("SPECTRALMC_S3__") or k == "SPECTRALMC_STORE"}


def setting_field(path: list[str]) -> bool:
    """Whether SPECTRALMC_A__B names a field (A, then B inside A's model)."""
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(path) - 1:
            sub = field.annotation
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                return False
            model = sub
    return True


@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_server_environments_are_valid_settings(
    variant: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    config: dict[str, Any] = request.getfixturevalue(variant)
    for name, service in spectralmc_services(config).items():
        env = env_of(service)
        for key in env:
            if key.startswith("SPECTRALMC_"):
                assert setting_field(key.removeprefix("SPECTRALMC_").lower().split("__")), f"{name}: {key}"
        with monkeypatch.context() as m:
            for key in list(os.environ):
                if key.startswith("SPECTRALMC_"):
                    m.delenv(key)
            for key, value in env.items():
                m.setenv(key, value)
            settings = Settings.load()
        assert settings.role == env["SPECTRALMC_ROLE"], name
        assert settings.store_uri == env["SPECTRALMC_STORE"], name
        assert settings.admin_token is not None, name
        if settings.role == "train":  # as in deploy/k8s: a shutdown commit skips the improvement check
            assert not settings.train.commit_on_shutdown, name
        # The limit holds the caps this role reserves plus the process.
        limit = memory_bytes(service["deploy"]["resources"]["limits"]["memory"])
        caps = sum(getattr(settings.budgets, f"{c}_bytes") for c in ROLE_CAPS[settings.role])
        assert limit >= caps + OVERHEAD, f"{name}: limit {limit / MiB:.0f} MiB < caps {caps / MiB:.0f} + overhead"
        # A cpus limit is a quota: it leaves sched_getaffinity, from which an engine would
        # size its threads, at the host's cores. So a limited service sets torch_threads,
        # leaving one core for the HTTP process: engines x threads + 1 = cpus.
        cpus = service["deploy"]["resources"]["limits"].get("cpus")
        if cpus is not None:
            assert settings.engine.mode == "process", name
            assert settings.torch_threads is not None, f"{name}: cpus {cpus} but SPECTRALMC_TORCH_THREADS unset"
            assert settings.torch_threads * settings.engine.processes + 1 == float(cpus), (
                f"{name}: {settings.engine.processes} engine(s) x {settings.torch_threads} threads + 1 != cpus {cpus}"
            )


@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_healthchecks_and_memory_limits(variant: str, request: pytest.FixtureRequest) -> None:
    config: dict[str, Any] = request.getfixturevalue(variant)
    for name, service in config["services"].items():
        assert service.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory"), name
        if name != "minio-init":  # runs once and exits
            assert healthcheck_command(service), name
            assert service.get("restart") == "unless-stopped", name
    for name in spectralmc_services(config):
        assert "8080" in healthcheck_command(config["services"][name]), name


def test_published_ports_are_local(base: dict[str, Any]) -> None:
    for name, service in base["services"].items():
        for p in service.get("ports") or []:
            host_ip = p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name}: {p}"


def test_budget_defaults_behind_the_limits() -> None:
    # docker-compose.yml's arithmetic is written for these caps: a change to the defaults
    # must revisit it (test_server_environments_are_valid_settings checks the sums).
    assert BudgetConfig().model_dump() == {
        "normals_bytes": 256 * MiB,
        "simulator_bytes": 512 * MiB,
        "training_bytes": 256 * MiB,
        "inference_bytes": 256 * MiB,
        "model_cache_bytes": 256 * MiB,
    }
    text = COMPOSE.read_text()
    for figure in (
        "256 + 256 + 768 = 1280 MiB",
        "256 + 512 + 256 + 256 + 256 + 2048 = 3584 MiB",
        "1536 + 768 = 2304 MiB",
    ):
        assert figure in text


def test_prometheus_and_grafana_mounts(base: dict[str, Any]) -> None:
    prom = mounts(base["services"]["prometheus"])
    assert Path(prom["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS
    assert Path(prom["/etc/prometheus/alerts.yml"]).resolve() == ALERTS
    assert ALERTS.is_file(), "deploy/prometheus/alerts.yml is mounted but missing"
    command = " ".join(base["services"]["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    graf = mounts(base["services"]["grafana"])
    assert Path(graf["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"
    provider = yaml.safe_load(PROVIDER.read_text())["providers"]
    [files] = [p for p in provider if p["type"] == "file"]
    assert Path(graf[files["options"]["path"]]).resolve() == DASHBOARD.parent
    source = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    [ds] = source
    url = urlsplit(ds["url"])
    assert ds["type"] == "prometheus"
    assert url.hostname == "prometheus"
    assert url.port == 9090
    assert "prometheus" in base["services"]


# -- Prometheus -------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed (apt-get install -y prometheus)")
    return subprocess.run([exe, *args], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_prometheus_config_syntax() -> None:
    # The compose DNS names only resolve inside the compose network, and the rule file
    # lives at its container path: check the syntax alone here...
    r = promtool("check", "config", "--syntax-only", str(PROMETHEUS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_config_with_its_rules(tmp_path: Path) -> None:
    # ... and everything, the rule file included, with rule_files pointing at the file
    # compose mounts there.
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    r = promtool("check", "config", str(copy))
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_every_server(base: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["global"]["scrape_interval"] in ("5s", "10s")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    api = jobs["spectralmc-api"]
    [sd] = api["dns_sd_configs"]
    assert (sd["names"], sd["type"], sd["port"]) == (["api"], "A", 8080)
    assert api.get("metrics_path", "/metrics") == "/metrics"
    [static] = jobs["spectralmc-trainer"]["static_configs"]
    assert static["targets"] == ["trainer:8080"]
    assert "prometheus" in jobs
    # alerts.yml selects the SpectralMC jobs as job=~"spectralmc.*".
    for name, job in jobs.items():
        scrapes_servers = any(s.get("names") == ["api"] for s in job.get("dns_sd_configs", [])) or any(
            "trainer:8080" in s["targets"] for s in job.get("static_configs", [])
        )
        assert scrapes_servers == name.startswith("spectralmc"), name
    assert {"api", "trainer"} <= set(base["services"])


# -- Grafana ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    panel: str
    ref: str
    expr: str
    legend: str


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])  # inside collapsed rows


def targets() -> list[Target]:
    return [
        Target(p["title"], t["refId"], t["expr"], t.get("legendFormat", ""))
        for p in panels(dashboard())
        for t in p.get("targets", [])
    ]


def exposed() -> dict[str, set[str]]:
    """Every series name the application's registry exposes, with its label names: the
    Metrics of an app (every labelled child made) and its scrape-time state collector
    fed one model, the five budgets, a training run, a job."""
    metrics = Metrics()
    for wrapper in vars(metrics).values():
        if isinstance(wrapper, MetricWrapperBase) and wrapper._labelnames:
            wrapper.labels(*("x" for _ in wrapper._labelnames))
    metrics.add_state(
        StateSource(
            models=lambda: [ModelState("gbm", "tracking", 1, "hash", 0, 0)],
            budgets=Budgets().reports,
            training=lambda: TrainingState("gbm", 1, 0.5, {"p50_bp": 1.0, "p95_bp": 2.0, "max_bp": 3.0}, 0),
            queue=lambda: (0, 0, 2048, 100_000),
            ready=lambda: True,
            streams=lambda: (0, 0),
            jobs=lambda: [("job", None)],
        )
    )
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        if family.samples:
            for s in family.samples:
                names.setdefault(s.name, set()).update(s.labels)
        else:  # empty here: the CUDA allocator gauges (no CUDA), the engines' process figures
            assert family.type in ("gauge", "counter"), family.name
            name = f"{family.name}_total" if family.type == "counter" else family.name
            names[name] = set(getattr(family, "_labelnames", ()))
    return names


STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
METRIC = re.compile(r"(?<![\w:])(spectralmc_\w+|up)\b(?!\s*\()")
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
TARGET_LABELS = {"instance", "job"}  # Prometheus adds them to every scraped series


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    board = dashboard()
    assert board["uid"] == "spectralmc"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for p in panels(board):
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"]) == p["datasource"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_dashboard_queries_use_exposed_metrics_and_labels() -> None:
    names = exposed()
    for t in targets():
        where = f"{t.panel} {t.ref}: {t.expr}"
        bare = STRING.sub('""', t.expr)
        used = set(METRIC.findall(bare))
        assert used, f"{where}: no metric"
        labels = set(TARGET_LABELS)
        for metric in used - {"up"}:
            assert metric in names, f"{where}: {metric} is not exposed by the application"
            labels |= names[metric]
        referenced = {
            label.strip() for group in LABEL_LIST.findall(bare) for label in group.split(",") if label.strip()
        }
        referenced |= set(MATCHER.findall(t.expr))
        referenced |= set(LEGEND.findall(t.legend))
        assert referenced <= labels, f"{where}: labels {sorted(referenced - labels)} are not on {sorted(used)}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool has no query command, but it parses every expression of a rule file:
    # one recording rule per query, Grafana's range variables made a fixed window.
    rules = [
        {"record": f"dashboard:query_{i}:{t.ref.lower()}", "expr": re.sub(r"\$__(rate_)?interval", "1m", t.expr)}
        for i, t in enumerate(targets())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = promtool("check", "rules", "--lint=none", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout


def test_dashboard_covers_the_service() -> None:
    used = {m for t in targets() for m in METRIC.findall(STRING.sub('""', t.expr))}
    for metric in (
        "spectralmc_http_requests_total",
        "spectralmc_http_request_duration_seconds_bucket",
        "spectralmc_queue_depth",
        "spectralmc_queue_capacity",
        "spectralmc_ready",
        "spectralmc_model_version",
        "spectralmc_model_swaps_total",
        "spectralmc_store_poll_failures_total",
        "spectralmc_training_steps_total",
        "spectralmc_training_loss",
        "spectralmc_validation_error_bp",
        "spectralmc_budget_used_bytes",
        "spectralmc_budget_live_bytes",
        "spectralmc_budget_cap_bytes",
        "spectralmc_stream_connections",
    ):
        assert metric in used, metric


# -- Dockerfiles ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    found: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        found.append(Instruction(stage, keyword.upper(), " ".join(args.split())))
    assert not pending, f"{path}: ends in a continuation"
    return found


def final_stage(ins: list[Instruction], keyword: str) -> list[str]:
    last = max(i.stage for i in ins)
    return [i.args for i in ins if i.stage == last and i.keyword == keyword]


def env_vars(ins: list[Instruction]) -> dict[str, str]:
    env = {}
    for args in final_stage(ins, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def torch_requirement() -> Requirement:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    [torch] = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    return torch


def check_common(path: Path) -> list[Instruction]:
    ins = instructions(path)
    keywords = [i.keyword for i in ins]
    assert keywords[0] == "FROM", path.name
    # torch is installed before the project is copied in and installed.
    torch_at = next(
        n for n, i in enumerate(ins) if i.keyword == "RUN" and "pip install" in i.args and "torch==" in i.args
    )
    first_copy = next(n for n, i in enumerate(ins) if i.keyword == "COPY" and "--from" not in i.args)
    project_at = next(n for n, i in enumerate(ins) if i.keyword == "RUN" and re.search(r"pip install '?\.", i.args))
    assert torch_at < first_copy < project_at, path.name
    assert ins[torch_at].stage == ins[project_at].stage
    [pin] = re.findall(r"torch==([\w.+]+)", ins[torch_at].args)
    assert torch_requirement().specifier.contains(pin), f"{path.name}: torch {pin} outside pyproject's range"
    assert "test" not in ins[project_at].args
    # The final stage: an unprivileged user, the CLI, the listen address, a healthcheck.
    [user] = final_stage(ins, "USER")
    assert user.split(":")[0] not in ("root", "0"), path.name
    assert final_stage(ins, "ENTRYPOINT") == ['["spectralmc"]'], path.name
    [cmd] = final_stage(ins, "CMD")
    assert json.loads(cmd) == CMD, path.name
    args = build_parser().parse_args(json.loads(cmd))  # flags the CLI really has
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8080)
    assert final_stage(ins, "EXPOSE") == ["8080"], path.name
    [health] = final_stage(ins, "HEALTHCHECK")
    assert "python" in health and "127.0.0.1:8080/healthz" in health and "curl" not in health, path.name
    env = env_vars(ins)
    assert env["SPECTRALMC_DATA_DIR"] == "/data", path.name
    for key in env:
        if key.startswith("SPECTRALMC_"):
            assert setting_field(key.removeprefix("SPECTRALMC_").lower().split("__")), f"{path.name}: {key}"
    return ins


def test_cpu_dockerfile() -> None:
    ins = check_common(DOCKERFILE)
    for base in (i.args for i in ins if i.keyword == "FROM"):
        assert base.split()[0].startswith("python:3.11-slim"), base
    torch = next(i.args for i in ins if i.keyword == "RUN" and "torch==" in i.args)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch
    assert any(re.search(r"pip install \.(\s|$)", i.args) for i in ins if i.keyword == "RUN")
    assert "SPECTRALMC_ROLE" not in env_vars(ins)  # role all unless told (compose says serve)


def test_cuda_dockerfile() -> None:
    ins = check_common(DOCKERFILE_CUDA)
    for base in (i.args for i in ins if i.keyword == "FROM"):
        assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-runtime-ubuntu24\.04( AS \w+)?", base), base
    torch = next(i.args for i in ins if i.keyword == "RUN" and "torch==" in i.args)
    assert "download.pytorch.org/whl/cpu" not in torch
    assert any("pip install '.[gpu]'" in i.args for i in ins if i.keyword == "RUN")
    env = env_vars(ins)
    assert env["SPECTRALMC_ROLE"] == "train"
    assert env["SPECTRALMC_TRAIN__DEVICE"] == "cuda"


def test_dockerignore_admits_exactly_what_is_copied() -> None:
    lines = [s for s in (raw.strip() for raw in DOCKERIGNORE.read_text().splitlines()) if s and not s.startswith("#")]
    assert lines[0] == "*", "an allow-list: everything out, then what the images need"
    allowed = {s[1:].rstrip("/") for s in lines if s.startswith("!")}
    copied: set[str] = set()
    for path in (DOCKERFILE, DOCKERFILE_CUDA):
        for i in instructions(path):
            if i.keyword == "COPY" and "--from" not in i.args:
                words = [w for w in i.args.split() if not w.startswith("--")]
                copied |= {w.rstrip("/") for w in words[:-1]}
    assert copied == allowed
    for name in allowed:
        assert (ROOT / name).exists(), name
    assert not allowed & {".venv", ".git", "tests", "bench"}
