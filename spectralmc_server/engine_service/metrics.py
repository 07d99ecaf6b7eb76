"""The engine's metrics: the families it counts, its device memory, and the state it reports.

The engine counts what happens on its side (engine failures, training steps, training
rejections) on the registry it is given: the app's own when the engine runs on a thread
of the HTTP process (service/metrics.py ``Metrics`` creates these families with the
functions below), an :class:`EngineMetrics` of its own in an engine process (rendered at
each scrape of the HTTP side: engine_service/server.py). :class:`ModelState` and
:class:`TrainingState` are plain data: what the HTTP side's scrape-time collector reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class ModelState:
    """One served model as the exporter sees it."""

    name: str
    mode: str
    version: int | None
    content_hash: str | None
    swaps: int
    poll_failures: int
    consecutive_poll_failures: int = 0
    last_good_poll: float | None = None  # Unix time
    rejected: dict[str, int] = field(default_factory=dict)  # versions refused by the gate, by kind
    forced: bool = False  # the served version was pinned with force past its gate


@dataclass
class TrainingState:
    """The online trainer as the exporter sees it."""

    model: str
    steps: int
    loss: float | None
    validation_bp: dict[str, float] = field(default_factory=dict)  # p50_bp, p95_bp, max_bp
    commits: int = 0
    # Unix times, for alerts that must tell a stall from a pause (deploy/prometheus/alerts.yml)
    last_step: float | None = None  # the last step; before the first, when training started
    last_validation: float | None = None  # the last validation this process ran (None: none yet)
    # seconds from the validation before it (or the start of training) to the last one
    validation_interval: float | None = None
    paused: bool = False  # the worker is holding training back for pricing work (train.idle_gap_seconds)


def engine_failures_counter(registry: CollectorRegistry | None) -> Counter:
    return Counter("spectralmc_engine_failures", "Unexpected errors in the compute worker", registry=registry)


def training_step_histogram(registry: CollectorRegistry | None) -> Histogram:
    return Histogram(
        "spectralmc_training_step_duration_seconds",
        "Wall time of one training step (a queued request waits at most one)",
        buckets=STEP_BUCKETS,
        registry=registry,
    )


def training_rejected_counter(registry: CollectorRegistry | None) -> Counter:
    return Counter(
        "spectralmc_training_rejected",
        "Versions online training did not commit: their certificate fails the quality gate",
        ["model"],
        registry=registry,
    )


class EngineCounters(Protocol):
    """What the engine counts on (the compute worker, online training's commits)."""

    @property
    def engine_failures(self) -> Counter: ...

    @property
    def training_step_seconds(self) -> Histogram: ...

    @property
    def training_rejected(self) -> Counter: ...


class EngineMetrics:
    """The engine's families on a registry of their own (an engine process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.engine_failures = engine_failures_counter(self.registry)
        self.training_step_seconds = training_step_histogram(self.registry)
        self.training_rejected = training_rejected_counter(self.registry)


DEVICE_FAMILIES = (
    "spectralmc_device_allocated_bytes",
    "spectralmc_device_peak_allocated_bytes",
    "spectralmc_device_reserved_bytes",
    "spectralmc_device_total_bytes",
)


def device_memory_metrics() -> list[GaugeMetricFamily]:
    """torch's CUDA caching-allocator statistics per device, where this process has
    initialised CUDA (a CPU-only process exports none: there is no device to report)."""
    allocated = GaugeMetricFamily(
        "spectralmc_device_allocated_bytes", "Bytes in live tensors on the device (torch allocator)", labels=["device"]
    )
    peak = GaugeMetricFamily(
        "spectralmc_device_peak_allocated_bytes",
        "Peak of allocated bytes since start (torch allocator)",
        labels=["device"],
    )
    reserved = GaugeMetricFamily(
        "spectralmc_device_reserved_bytes", "Bytes the caching allocator holds from the driver", labels=["device"]
    )
    total = GaugeMetricFamily("spectralmc_device_total_bytes", "The device's memory", labels=["device"])
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i in range(torch.cuda.device_count()):
            label = [f"cuda:{i}"]
            allocated.add_metric(label, torch.cuda.memory_allocated(i))
            peak.add_metric(label, torch.cuda.max_memory_allocated(i))
            reserved.add_metric(label, torch.cuda.memory_reserved(i))
            total.add_metric(label, torch.cuda.get_device_properties(i).total_memory)
    return [allocated, peak, reserved, total]
