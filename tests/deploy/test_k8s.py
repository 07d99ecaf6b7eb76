"""The Kubernetes manifests in deploy/k8s (issue 8).

Every manifest validates against the Kubernetes 1.30 JSON schemas that
kubernetes-validate bundles (offline), in strict mode: an unknown or misspelt field fails,
and a deliberately broken manifest is shown to fail. Then the manifests agree with each
other and with the server:

- the ConfigMap's server.toml, with each Deployment's args (parsed by ``spectralmc
  serve``'s own parser) and environment (secrets resolved from secret.yaml), loads into
  :class:`Settings` for the role the Deployment names; every ``SPECTRALMC_`` variable
  names a real setting (pydantic-settings silently ignores one that does not);
- each Deployment's memory limit covers the [budgets] caps its role reserves plus the
  stated process overhead, its request is at most the limit, and the arithmetic in its
  header comment uses the ConfigMap's numbers;
- probes: readiness on /readyz, liveness on /healthz, on the named port ``http`` that
  the settings' port opens; Prometheus annotations point at /metrics on it;
- the trainer asks for one nvidia.com/gpu, and trains on cuda; the api pods never train;
- every secretKeyRef / envFrom names a Secret key secret.yaml defines, whose values are
  all placeholders; the HPA targets the api Deployment; the Services and the PDB select
  the right pods; kustomization.yaml lists every manifest.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from pydantic import BaseModel

from spectralmc_server.cli import build_parser
from spectralmc_server.engine.device import BudgetConfig
from spectralmc_server.settings import Settings
from spectralmc_server.store.uri import parse_store_uri

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests target (preStop sleep: 1.30)
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
NAMESPACE = "spectralmc"

# The [budgets] caps a server reserves, by role (read from the code), all in its engine
# process ([engine] mode = "process", the default):
# - every role builds a ModelHost (engine_service/core.py), which reserves the inference
#   working set and each loaded version in model_cache (engine_service/models.py);
# - only a training server builds a Trainer (engine_service/core.py _training), which
#   reserves training and simulator (engine/trainer.py) and the normals pool
#   (engine/normals.py).
ROLE_BUDGETS = {
    "serve": {"inference", "model_cache"},
    "train": {"normals", "simulator", "training", "inference", "model_cache"},
}
DEPLOYMENTS = {"api.yaml": "serve", "trainer.yaml": "train"}
IMAGES = {"api.yaml": "spectralmc-server:latest", "trainer.yaml": "spectralmc-server-cuda:latest"}

_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "m": 1e-3,
    "": 1,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (``1024Mi``, ``2``, ``500m``) as a number."""
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m|)", value)
    assert m is not None, f"not a quantity this test reads: {value!r}"
    return float(m.group(1)) * _SUFFIXES[m.group(2)]


def docs(name: str) -> list[dict[str, Any]]:
    with (K8S / name).open() as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def one(name: str) -> dict[str, Any]:
    (doc,) = docs(name)
    return doc


def all_docs() -> list[dict[str, Any]]:
    return [d for name in MANIFESTS for d in docs(name)]


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def config_map() -> dict[str, Any]:
    return one("configmap.yaml")


def config_toml() -> dict[str, Any]:
    return tomllib.loads(config_map()["data"]["server.toml"])


def secret_data() -> dict[str, str]:
    secret = one("secret.yaml")
    assert "data" not in secret, "placeholders go in stringData, readable and clearly marked"
    data: dict[str, str] = secret["stringData"]
    return data


# -- schema validation -------------------------------------------------------------------


def validate(doc: dict[str, Any]) -> None:
    """Raises kubernetes_validate.ValidationError (or SchemaNotFoundError for an unknown
    kind/apiVersion); never skips a kind silently."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_expected_manifest_is_there() -> None:
    expected = {
        "namespace.yaml",
        "configmap.yaml",
        "secret.yaml",
        "api.yaml",
        "api-hpa.yaml",
        "api-pdb.yaml",
        "trainer.yaml",
        "service.yaml",
    }
    assert set(MANIFESTS) == expected


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_the_kubernetes_schema(name: str) -> None:
    found = docs(name)
    assert found, f"{name} holds no object"
    for doc in found:
        validate(doc)


def _unknown_container_field(d: dict[str, Any]) -> None:
    container(d)["imagePullPolcy"] = "Always"  # misspelt: strict mode must refuse it


def _unknown_pod_field(d: dict[str, Any]) -> None:
    d["spec"]["template"]["spec"]["nodeSelecter"] = {"a": "b"}


def _replicas_not_an_integer(d: dict[str, Any]) -> None:
    d["spec"]["replicas"] = "two"


def _container_without_name(d: dict[str, Any]) -> None:
    del container(d)["name"]


def _probe_port_not_a_port(d: dict[str, Any]) -> None:
    container(d)["readinessProbe"]["httpGet"]["port"] = ["http"]


@pytest.mark.parametrize(
    "breaks",
    [
        _unknown_container_field,
        _unknown_pod_field,
        _replicas_not_an_integer,
        _container_without_name,
        _probe_port_not_a_port,
    ],
)
def test_the_validator_rejects_a_broken_manifest(breaks: Callable[[dict[str, Any]], None]) -> None:
    """The validation above can fail: the same Deployment, broken, is refused."""
    broken = copy.deepcopy(one("api.yaml"))
    breaks(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_the_validator_rejects_an_unknown_api_version() -> None:
    hpa = copy.deepcopy(one("api-hpa.yaml"))
    hpa["apiVersion"] = "autoscaling/v9"
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(hpa)


# -- the settings each process would load ------------------------------------------------


def _field_path_exists(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    sub = field.annotation
    return isinstance(sub, type) and issubclass(sub, BaseModel) and _field_path_exists(sub, parts[1:])


def container_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the process sees it (Secret values resolved)."""
    secret_name = one("secret.yaml")["metadata"]["name"]
    secrets = secret_data()
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        ref = source.get("secretRef")
        assert ref is not None, f"envFrom {source}: only the Secret is read whole"
        assert ref["name"] == secret_name
        env.update({source.get("prefix", "") + k: v for k, v in secrets.items()})
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret_name, f"{var['name']} reads Secret {ref['name']!r}, not {secret_name!r}"
        assert ref["key"] in secrets, f"{var['name']} reads key {ref['key']!r}, which secret.yaml does not define"
        env[var["name"]] = secrets[ref["key"]]
    return env


def load_settings(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, dict[str, Any], dict[str, str]]:
    """The settings ``spectralmc serve`` builds in this Deployment's container."""
    deploy = one(name)
    c = container(deploy)
    args = build_parser().parse_args(c["args"])
    assert args.command == "serve"
    # --config is the ConfigMap's server.toml where the config volume is mounted
    pod = deploy["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if "configMap" in v]
    assert vol["configMap"]["name"] == config_map()["metadata"]["name"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    (item,) = vol["configMap"]["items"]
    assert item["key"] == "server.toml"
    assert args.config == Path(mount["mountPath"]) / item["path"]
    config = tmp_path / "server.toml"
    config.write_text(config_map()["data"]["server.toml"])

    for var in [k for k in os.environ if k.startswith("SPECTRALMC_")]:
        monkeypatch.delenv(var)
    env = container_env(c)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = Settings.load(
        config, host=args.host, port=args.port, role=args.role, data_dir=args.data_dir, store=args.store
    )
    parse_store_uri(settings.store_uri)  # what `serve` checks before it starts
    return settings, deploy, env


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_the_config_map_loads_into_settings_for_each_role(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, deploy, env = load_settings(name, tmp_path, monkeypatch)
    c = container(deploy)
    assert settings.role == DEPLOYMENTS[name]
    assert settings.host == "0.0.0.0"  # reachable from the kubelet and the Service
    assert settings.store_uri == "s3://spectralmc/models"
    assert parse_store_uri(settings.store_uri) == ("s3", "spectralmc", "models")
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == secret_data()["SPECTRALMC_ADMIN_TOKEN"]
    # the environment does not override the budgets the memory limits are sized from
    assert settings.budgets == BudgetConfig.model_validate(config_toml()["budgets"])
    # every SPECTRALMC_ variable is a setting: a misspelt one would be ignored silently
    for var in env:
        if var.startswith("SPECTRALMC_"):
            parts = var.removeprefix("SPECTRALMC_").lower().split("__")
            assert _field_path_exists(Settings, parts), f"{var} names no setting"
    # the data dir and /tmp are writable emptyDirs under a read-only root filesystem
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    empty_dirs = {v["name"] for v in deploy["spec"]["template"]["spec"]["volumes"] if "emptyDir" in v}
    assert env["SPECTRALMC_DATA_DIR"] == str(settings.data_dir)
    assert mounts.get(str(settings.data_dir)) in empty_dirs
    assert mounts.get("/tmp") in empty_dirs
    # torch's intra-op threads fit the CPU limit. They are set: unset, each engine sizes
    # its pool from sched_getaffinity, which a CPU limit does not change (the node's
    # cores). The HTTP process runs no torch work but needs a core: the engines' threads
    # + 1 = the limit (api: 1 + 1 = 2, trainer: 3 + 1 = 4).
    assert settings.engine.mode == "process"
    assert settings.torch_threads is not None
    cpu_limit = quantity(c["resources"]["limits"]["cpu"])
    assert settings.torch_threads * settings.engine.processes + 1 == cpu_limit, (
        f"{name}: {settings.engine.processes} engine(s) x {settings.torch_threads} threads + 1 for the HTTP "
        f"process != CPU limit {cpu_limit:g}"
    )
    # graceful shutdown fits in the grace period: preStop, then the queue's drain
    pod = deploy["spec"]["template"]["spec"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.shutdown_timeout_seconds + 10


def test_the_api_serves_and_never_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, deploy, _ = load_settings("api.yaml", tmp_path, monkeypatch)
    assert settings.serves and not settings.trains
    assert deploy["spec"]["replicas"] == 2
    assert "nvidia.com/gpu" not in container(deploy)["resources"].get("limits", {})


def test_the_trainer_trains_on_one_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, deploy, _ = load_settings("trainer.yaml", tmp_path, monkeypatch)
    assert settings.trains and not settings.serves
    assert settings.train.model in settings.models
    assert settings.train.device == "cuda"  # no GPU is an error at start, not a CPU fallback
    resources = container(deploy)["resources"]
    assert quantity(resources["limits"]["nvidia.com/gpu"]) == 1
    assert quantity(resources["requests"].get("nvidia.com/gpu", 1)) == 1
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"  # never two trainers, nor two GPUs held
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"], "the trainer is placed on GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])


# -- memory limits against the budgets ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_memory_limit_covers_the_budgets_the_role_reserves(name: str) -> None:
    deploy = one(name)
    role = DEPLOYMENTS[name]
    budgets = BudgetConfig.model_validate(config_toml()["budgets"])
    annotations = deploy["metadata"]["annotations"]
    stated = set(annotations["spectralmc.io/memory-budgets"].split(","))
    assert stated == ROLE_BUDGETS[role], f"role {role} reserves {sorted(ROLE_BUDGETS[role])}"
    caps = {b: int(getattr(budgets, f"{b}_bytes")) for b in ROLE_BUDGETS[role]}
    overhead = quantity(annotations["spectralmc.io/memory-overhead"])
    # two processes, the HTTP process and the engine, each with python and torch:
    # ~560 MiB RSS together at ready, ~680 MiB under bench/server_load.py (CPU torch 2.13)
    assert overhead >= 680 * 2**20, "the HTTP and engine processes together take ~680 MiB under load"

    resources = container(deploy)["resources"]
    limit = quantity(resources["limits"]["memory"])
    request = quantity(resources["requests"]["memory"])
    assert limit >= sum(caps.values()) + overhead
    assert request <= limit
    assert request >= sum(caps.values()), "the scheduler sets aside at least the capped memory"

    # the arithmetic written in the header comment uses these numbers
    text = (K8S / name).read_text()
    for budget, cap in caps.items():
        m = re.search(rf"#.*{budget}_bytes\s+(\d+) B =\s+(\d+) MiB", text)
        assert m is not None, f"{name}: the comment does not show {budget}_bytes"
        assert int(m.group(1)) == cap and int(m.group(2)) * 2**20 == cap, f"{name}: {budget}_bytes is {cap}"
    m = re.search(r"#\s+\+ process overhead\s+=\s+(\d+) MiB", text)
    assert m is not None and int(m.group(1)) * 2**20 == overhead
    m = re.search(r"#\s+= limit\s+=\s+(\d+) MiB", text)
    assert m is not None and int(m.group(1)) * 2**20 == limit
    assert int(m.group(1)) == sum(caps.values()) // 2**20 + int(overhead) // 2**20


# -- probes, ports, metrics, security ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_probes_and_metrics_on_the_named_port(name: str) -> None:
    deploy = one(name)
    c = container(deploy)
    assert c["image"] == IMAGES[name]
    (port,) = c["ports"]
    assert port["name"] == "http"
    assert port["containerPort"] == config_toml()["port"] == 8080
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_pods_run_locked_down(name: str) -> None:
    deploy = one(name)
    pod = deploy["spec"]["template"]["spec"]
    c = container(deploy)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # Service links would put SPECTRALMC_<SERVICE>_PORT=tcp://... into the environment,
    # which the settings read (a Service named "spectralmc" sets `port`).
    assert pod["enableServiceLinks"] is False


def test_every_secret_value_is_a_placeholder() -> None:
    data = secret_data()
    assert {"SPECTRALMC_ADMIN_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(data)
    for key, value in data.items():
        assert value.startswith("REPLACE_ME"), f"{key}: commit placeholders only, never a credential"


def test_every_secret_key_is_read_by_some_pod() -> None:
    read = {
        var["valueFrom"]["secretKeyRef"]["key"]
        for name in DEPLOYMENTS
        for var in container(one(name)).get("env", [])
        if "valueFrom" in var
    }
    assert read == set(secret_data())


# -- the objects point at each other -----------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(name: str) -> dict[str, str]:
    labels: dict[str, str] = one(name)["spec"]["template"]["metadata"]["labels"]
    return labels


def test_deployment_selectors_match_their_pods() -> None:
    for name in DEPLOYMENTS:
        assert _selects(one(name)["spec"]["selector"]["matchLabels"], pod_labels(name))
    api, trainer = one("api.yaml"), one("trainer.yaml")
    assert not _selects(api["spec"]["selector"]["matchLabels"], pod_labels("trainer.yaml"))
    assert not _selects(trainer["spec"]["selector"]["matchLabels"], pod_labels("api.yaml"))


def test_services_select_their_pods_on_the_named_port() -> None:
    services = {d["metadata"]["name"]: d for d in docs("service.yaml")}
    api = services["spectralmc-api"]["spec"]
    assert api["type"] == "ClusterIP"
    assert _selects(api["selector"], pod_labels("api.yaml"))
    assert not _selects(api["selector"], pod_labels("trainer.yaml")), "the trainer prices nothing"
    (port,) = api["ports"]
    assert (port["port"], port["targetPort"]) == (80, "http")
    trainer = services["spectralmc-trainer"]["spec"]
    assert _selects(trainer["selector"], pod_labels("trainer.yaml"))
    assert not _selects(trainer["selector"], pod_labels("api.yaml"))
    assert all(p["targetPort"] == "http" for p in trainer["ports"])


def test_the_hpa_scales_the_api_on_cpu() -> None:
    hpa = one("api-hpa.yaml")["spec"]
    api = one("api.yaml")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": api["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert api["spec"]["replicas"] == hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(api)["resources"]["requests"], "utilisation is measured against the request"


def test_the_pdb_keeps_one_api_pod() -> None:
    pdb = one("api-pdb.yaml")["spec"]
    assert pdb["minAvailable"] == 1
    assert _selects(pdb["selector"]["matchLabels"], pod_labels("api.yaml"))
    assert not _selects(pdb["selector"]["matchLabels"], pod_labels("trainer.yaml"))
    assert pdb["minAvailable"] < one("api-hpa.yaml")["spec"]["minReplicas"], "a node can still be drained"


def test_everything_lives_in_one_namespace() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == one("namespace.yaml")["metadata"]["name"] == NAMESPACE
    for doc in all_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == MANIFESTS
    images = {i["name"] for i in kustomization["images"]}
    assert images == {IMAGES[n].split(":")[0] for n in DEPLOYMENTS}
