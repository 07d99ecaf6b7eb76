"""The engine's metrics: the families it counts, its device memory, and the state it reports
(its models, its training, its process: CPU, descriptors, Python GC).

The engine counts what happens on its side (engine failures, training steps, training
rejections) on the registry it is given: the app's own when the engine runs on a thread
of the HTTP process (service/metrics.py ``Metrics`` creates these families with the
functions below), an :class:`EngineMetrics` of its own in an engine process (rendered at
each scrape of the HTTP side: engine_service/server.py). :class:`ModelState` and
:class:`TrainingState` are plain data: what the HTTP side's scrape-time collector reads.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from spectralmc_server.engine_service.rss import cpu_seconds, gc_generations, max_fds, open_fds

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
        self.memory_reclaims = Counter(
            "spectralmc_engine_memory_reclaims",
            "Idle reclaims of the engine process: a full collection and malloc_trim",
            registry=self.registry,
        )
        self.memory_reclaimed = Counter(
            "spectralmc_engine_memory_reclaimed_bytes",
            "RSS the engine process's reclaims gave back",
            registry=self.registry,
        )


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


@dataclass(frozen=True)
class ProcessStats:
    """One process as it reads itself (engine_service/rss.py): the engine sends its own in
    its status, the HTTP process reads its own at each scrape. None: not readable here."""

    cpu_seconds: float  # user + system
    open_fds: int | None
    max_fds: int | None
    gc: tuple[tuple[int, int, int], ...]  # per generation: collections, collected, uncollectable
    gc_frozen: int = 0  # objects in the permanent generation (gc_freeze at start-up)


def process_stats() -> ProcessStats:
    """This process's :class:`ProcessStats` now."""
    return ProcessStats(cpu_seconds(), open_fds(), max_fds(), gc_generations(), gc.get_freeze_count())


PROCESS_FAMILIES = (
    "spectralmc_process_cpu_seconds",
    "spectralmc_process_open_fds",
    "spectralmc_process_max_fds",
    "spectralmc_python_gc_collections",
    "spectralmc_python_gc_objects_collected",
    "spectralmc_python_gc_objects_uncollectable",
    "spectralmc_python_gc_frozen_objects",
)


def process_metrics(processes: Iterable[tuple[str, ProcessStats | None]]) -> list[Metric]:
    """CPU time, open descriptors and Python GC of each of the server's processes,
    labelled ``process`` as ``spectralmc_process_resident_bytes`` is (``http``, ``engine``
    or ``engine-K``); a process with no stats (an engine that is down) is left out."""
    label = ["process"]
    cpu = CounterMetricFamily(
        "spectralmc_process_cpu_seconds", "CPU time (user + system) of each of the server's processes", labels=label
    )
    fds = GaugeMetricFamily("spectralmc_process_open_fds", "Open file descriptors of each process", labels=label)
    limit = GaugeMetricFamily(
        "spectralmc_process_max_fds", "Each process's limit on open file descriptors (soft RLIMIT_NOFILE)", labels=label
    )
    gen = ["process", "generation"]
    runs = CounterMetricFamily(
        "spectralmc_python_gc_collections", "Python cyclic GC collections, by process and generation", labels=gen
    )
    collected = CounterMetricFamily(
        "spectralmc_python_gc_objects_collected", "Objects Python's cyclic GC collected", labels=gen
    )
    uncollectable = CounterMetricFamily(
        "spectralmc_python_gc_objects_uncollectable", "Objects Python's cyclic GC found uncollectable", labels=gen
    )
    frozen = GaugeMetricFamily(
        "spectralmc_python_gc_frozen_objects",
        "Objects frozen out of Python's cyclic GC at start-up (gc_freeze), by process",
        labels=label,
    )
    for name, stats in processes:
        if stats is None:
            continue
        cpu.add_metric([name], stats.cpu_seconds)
        frozen.add_metric([name], stats.gc_frozen)
        if stats.open_fds is not None:
            fds.add_metric([name], stats.open_fds)
        if stats.max_fds is not None:
            limit.add_metric([name], stats.max_fds)
        for g, (n, c, u) in enumerate(stats.gc):
            runs.add_metric([name, str(g)], n)
            collected.add_metric([name, str(g)], c)
            uncollectable.add_metric([name, str(g)], u)
    return [cpu, fds, limit, runs, collected, uncollectable, frozen]
