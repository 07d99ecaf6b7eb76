"""The Prometheus alert rules in deploy/prometheus: promtool accepts them, their unit
tests pass, they are the alerts the runbook names, and every metric and label value
they select is one a real server exposes on /metrics."""

from __future__ import annotations

import asyncio
import difflib
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from server_util import MakeClient

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"

ALERTS = {
    "SpectralMCTargetDown",
    "SpectralMCNotReady",
    "SpectralMCQueueSaturated",
    "SpectralMCStorePollFailing",
    "SpectralMCTrainingStalled",
    "SpectralMCValidationErrorHigh",
    "SpectralMCMemoryNearCap",
    "SpectralMCModelRejected",
    "SpectralMCModelForced",
    "SpectralMCStoreGCFailing",
}
SCRAPE_JOBS = ("spectralmc-api", "spectralmc-trainer")
# Series Prometheus itself makes for each target, not the server.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}

SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
RANGE = re.compile(r"\[[^\]]*\]")
IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)\b(?!\s*\()")


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    groups = doc["groups"]
    assert [g["name"] for g in groups] == ["spectralmc"]
    found: list[dict[str, Any]] = groups[0]["rules"]
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, label names, strings,
    durations and numbers removed)."""
    expr = re.sub(r"#[^\n]*", "", expr)
    expr = SELECTOR.sub(lambda m: (m.group(1) or "") + " ", expr)
    expr = STRING.sub(" ", expr)
    expr = LABEL_LIST.sub(" ", expr)
    expr = RANGE.sub(" ", expr)
    return {name for name in IDENT.findall(expr) if name not in PROMQL_WORDS}


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher of a named selector."""
    found = []
    for sel in SELECTOR.finditer(re.sub(r"#[^\n]*", "", expr)):
        name = sel.group(1)
        assert name, f"a selector without a metric name: {sel.group(0)}"
        for label, op, value in MATCHER.findall(sel.group(2)):
            found.append((name, label, op, value))
    return found


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed (apt-get install -y prometheus)")
    return subprocess.run([exe, *args], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_check_rules() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout, r.stdout


def test_promtool_unit_tests() -> None:
    r = promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


def test_alert_names_and_annotations() -> None:
    rs = rules()
    names = [r["alert"] for r in rs]
    assert len(names) == len(set(names)), names
    assert set(names) == ALERTS
    for r in rs:
        name = r["alert"]
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert r.get("for"), f"{name}: no `for`"
        assert r["labels"].get("severity") in ("page", "ticket"), name
        notes = r["annotations"]
        assert notes.get("summary"), name
        assert "{{ $labels.instance }}" in notes.get("description", ""), name
        assert "$value" in notes["description"], name
        assert notes.get("runbook_url") == f"docs/operations.md#{name.lower()}", name


def test_every_runbook_url_has_its_section() -> None:
    """Each alert's runbook_url anchor is a heading of docs/operations.md (GitHub's
    anchor of a heading is its text lowercased)."""
    headings = {
        line.lstrip("#").strip().lower()
        for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
        if line.startswith("#")
    }
    for r in rules():
        anchor = r["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in headings, anchor


def test_target_down_covers_the_scrape_jobs() -> None:
    expr = next(r["expr"] for r in rules() if r["alert"] == "SpectralMCTargetDown")
    [(name, label, op, value)] = matchers(expr)
    assert (name, label, op) == ("up", "job", "=~")
    for job in SCRAPE_JOBS:
        assert re.fullmatch(value, job), job  # Prometheus anchors =~ at both ends
    assert not re.fullmatch(value, "node")


async def scrape_with_training(make_client: MakeClient) -> str:
    """/metrics of an in-process server (role all) that trains and has validated once."""
    client = await make_client(train={"enabled": True, "validate_every": 1})
    deadline = time.monotonic() + 120
    while True:
        r = await client.get("/metrics")
        assert r.status == 200
        text = await r.text()
        if 'spectralmc_validation_error_bp{model="gbm",stat="p95"}' in text:
            return text
        assert time.monotonic() < deadline, "no validation within 120 s:\n" + text
        await asyncio.sleep(0.2)


async def test_alerts_select_exposed_metrics_and_labels(make_client: MakeClient) -> None:
    text = await scrape_with_training(make_client)
    samples: dict[str, list[dict[str, str]]] = {}
    families: dict[str, str] = {}  # sample name (..._total, _bucket, _count, _sum, _info) -> family
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s.labels)
            families[s.name] = family.name
    assert "spectralmc_training_steps_total" in samples  # training is on

    used: set[str] = set()
    for r in rules():
        name, expr = r["alert"], r["expr"]
        names = metric_names(expr)
        assert names, f"{name}: no metric found in {expr!r}"
        used |= names
        for metric in names - PROMETHEUS_SERIES:
            close = difflib.get_close_matches(metric, samples)
            assert metric in samples, f"{name}: {metric} is not on /metrics (close: {close})"
        for metric, label, op, value in matchers(expr):
            if metric in PROMETHEUS_SERIES:
                continue
            values = {labels[label] for labels in samples[metric] if label in labels}
            assert values, f"{name}: {metric} has no label {label!r}"
            if op == "=":
                assert value in values, f"{name}: {metric}{{{label}={value!r}}}: exposed values {sorted(values)}"
            elif op == "!=":
                assert value in values, f"{name}: {metric}{{{label}!={value!r}}} excludes a value never exposed"
    exposed_families = {families[m] for m in used - PROMETHEUS_SERIES}
    assert "spectralmc_store_poll_failures" in exposed_families  # counters map to their family
    assert "spectralmc_training_last_step_timestamp_seconds" in exposed_families
    assert "spectralmc_training_paused" in exposed_families
    assert "spectralmc_training_last_validation_timestamp_seconds" in exposed_families


def test_metric_name_parser() -> None:
    expr = """
        (
          spectralmc_queue_depth / ignoring(unit) group_right spectralmc_queue_capacity{unit="requests"}
          or label_replace(rate(x_total[5m]) > 0.8, "measure", "live", "", "")  # y_not_a_metric
        ) > on(instance, job) sum by (job) (z{job=~"a.*"} offset 5m)
    """
    assert metric_names(expr) == {"spectralmc_queue_depth", "spectralmc_queue_capacity", "x_total", "z"}
    assert matchers(expr) == [("spectralmc_queue_capacity", "unit", "=", "requests"), ("z", "job", "=~", "a.*")]
