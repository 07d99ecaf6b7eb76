"""Prometheus metrics: one registry per app, names prefixed ``spectralmc_``, base units.

Event counters and histograms are updated where the event happens (handlers, the
queue, the worker thread; prometheus_client is thread safe). State that already lives
somewhere (model versions, budgets, training progress) is read at scrape time by
:class:`StateCollector`, so there is one source of truth and nothing to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from spectralmc_server.engine.device import BudgetReport
from spectralmc_server.engine_service.metrics import (
    ModelState,
    ProcessStats,
    TrainingState,
    device_memory_metrics,
    engine_failures_counter,
    process_metrics,
    training_rejected_counter,
    training_step_histogram,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DROP_REASONS = (
    "overloaded",
    "estimated_wait",
    "too_costly",
    "calibration_limit",
    "deadline",
    "disconnected",
    "shutting_down",
    "engine_unavailable",
)

REJECT_REASONS = ("gate", "no_certificate")


# the methods counted by name in spectralmc_http_requests_total (others: "other")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})


@dataclass
class StateSource:
    """Callables the collector reads at scrape time."""

    models: Callable[[], list[ModelState]]
    budgets: Callable[[], list[BudgetReport]]
    training: Callable[[], TrainingState | None]
    queue: Callable[[], tuple[int, int, int, int]]  # requests, contracts, cap requests, cap contracts
    ready: Callable[[], bool]
    streams: Callable[[], tuple[int, int]] = lambda: (0, 0)  # connections, subscriptions
    jobs: Callable[[], list[tuple[str, float | None]]] = list  # (job, unix time of its last success)
    device: bool = True  # the device's memory is this process's to report (the engine runs here)
    # (process, CPU / descriptors / Python GC) of each of the server's processes: http, engine(s)
    processes: Callable[[], list[tuple[str, ProcessStats | None]]] = list


class StateCollector(Collector):
    """Turns the app's live state into gauges on each scrape."""

    def __init__(self, source: StateSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from self._models()
        yield from self._budgets()
        yield from self._queue_and_streams()
        yield from self._training()
        yield from process_metrics(self.source.processes())

    def _models(self) -> Iterator[Metric]:
        models = self.source.models()
        info = InfoMetricFamily(
            "spectralmc_model", "The model version each served model answers with", labels=["model"]
        )
        version = GaugeMetricFamily("spectralmc_model_version", "Served version number", labels=["model"])
        swaps = CounterMetricFamily("spectralmc_model_swaps", "Hot swaps to a new version", labels=["model"])
        polls = CounterMetricFamily(
            "spectralmc_store_poll_failures", "Failed polls of the version store", labels=["model"]
        )
        for m in models:
            info.add_metric(
                [m.name],
                {
                    "version": "" if m.version is None else str(m.version),
                    "content_hash": m.content_hash or "",
                    "mode": m.mode,
                },
            )
            version.add_metric([m.name], float("nan") if m.version is None else m.version)
            swaps.add_metric([m.name], m.swaps)
            polls.add_metric([m.name], m.poll_failures)
        streak = GaugeMetricFamily(
            "spectralmc_store_consecutive_poll_failures",
            "Failed polls of the version store since the last good one (0: the store answers)",
            labels=["model"],
        )
        good = GaugeMetricFamily(
            "spectralmc_store_last_good_poll_timestamp_seconds",
            "Unix time of the last successful poll of the version store",
            labels=["model"],
        )
        for m in models:
            streak.add_metric([m.name], m.consecutive_poll_failures)
            good.add_metric([m.name], float("nan") if m.last_good_poll is None else m.last_good_poll)
        yield from (info, version, swaps, polls, streak, good)
        rejected = CounterMetricFamily(
            "spectralmc_model_rejected",
            "Versions the tracker refused to serve: reason gate (the certificate fails the quality gate) "
            "or no_certificate",
            labels=["model", "reason"],
        )
        forced = GaugeMetricFamily(
            "spectralmc_model_forced",
            "1 while the served version is one an admin pinned with force past its quality gate",
            labels=["model"],
        )
        for m in models:
            for reason in REJECT_REASONS:  # both series exist from the start (rate() needs a zero)
                rejected.add_metric([m.name, reason], m.rejected.get(reason, 0))
            forced.add_metric([m.name], 1.0 if m.forced else 0.0)
        yield from (rejected, forced)

    def _budgets(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            "spectralmc_budget_used_bytes", "Bytes reserved against each capped component", labels=["component"]
        )
        cap = GaugeMetricFamily("spectralmc_budget_cap_bytes", "Byte cap of each component", labels=["component"])
        live = GaugeMetricFamily(
            "spectralmc_budget_live_bytes",
            "Bytes the component's tensors hold now, measured from the tensors (holders that report)",
            labels=["component"],
        )
        for b in self.source.budgets():
            used.add_metric([b.name], b.reserved_bytes)
            cap.add_metric([b.name], b.cap_bytes)
            live.add_metric([b.name], b.live_bytes)
        yield from (used, cap, live)
        if self.source.device:  # the engine computes in this process
            yield from device_memory_metrics()

    def _queue_and_streams(self) -> Iterator[Metric]:
        requests, contracts, cap_requests, cap_contracts = self.source.queue()
        depth = GaugeMetricFamily("spectralmc_queue_depth", "Requests waiting for the compute worker")
        depth.add_metric([], requests)
        qc = GaugeMetricFamily("spectralmc_queue_contracts", "Contracts waiting for the compute worker")
        qc.add_metric([], contracts)
        qcap = GaugeMetricFamily(
            "spectralmc_queue_capacity", "Queue bound; beyond it requests get 503", labels=["unit"]
        )
        qcap.add_metric(["requests"], cap_requests)
        qcap.add_metric(["contracts"], cap_contracts)
        ready = GaugeMetricFamily("spectralmc_ready", "1 when models are loaded and work is accepted")
        ready.add_metric([], 1.0 if self.source.ready() else 0.0)
        yield from (depth, qc, qcap, ready)

        connections, subscriptions = self.source.streams()
        conn = GaugeMetricFamily("spectralmc_stream_connections", "Open WebSocket stream connections")
        conn.add_metric([], connections)
        subs = GaugeMetricFamily("spectralmc_stream_subscriptions", "Live stream subscriptions")
        subs.add_metric([], subscriptions)
        yield from (conn, subs)
        last = GaugeMetricFamily(
            "spectralmc_job_last_success_timestamp_seconds",
            "Unix time of each job's last successful run",
            labels=["job"],
        )
        for job, when in self.source.jobs():
            last.add_metric([job], float("nan") if when is None else when)
        yield last

    def _training(self) -> Iterator[Metric]:
        training = self.source.training()
        if training is not None:
            steps = CounterMetricFamily("spectralmc_training_steps", "Online training steps", labels=["model"])
            steps.add_metric([training.model], training.steps)
            loss = GaugeMetricFamily("spectralmc_training_loss", "Training loss (EMA of steps)", labels=["model"])
            loss.add_metric([training.model], float("nan") if training.loss is None else training.loss)
            val = GaugeMetricFamily(
                "spectralmc_validation_error_bp",
                "Validation price error in basis points of spot",
                labels=["model", "stat"],
            )
            for stat, value in sorted(training.validation_bp.items()):
                val.add_metric([training.model, stat.removesuffix("_bp")], value)
            commits = CounterMetricFamily("spectralmc_training_commits", "Versions committed by the trainer")
            commits.add_metric([], training.commits)
            yield from (steps, loss, val, commits)
            yield from self._training_times(training)

    @staticmethod
    def _training_times(training: TrainingState) -> Iterator[Metric]:
        """When training last stepped and validated, and whether it is paused for load:
        what SpectralMCTrainingStalled and SpectralMCValidationErrorHigh read."""

        def nan(value: float | None) -> float:
            return float("nan") if value is None else value

        m = [training.model]
        step = GaugeMetricFamily(
            "spectralmc_training_last_step_timestamp_seconds",
            "Unix time of the last online training step (before the first: when training started)",
            labels=["model"],
        )
        step.add_metric(m, nan(training.last_step))
        validated = GaugeMetricFamily(
            "spectralmc_training_last_validation_timestamp_seconds",
            "Unix time of the last validation this process ran (NaN: none yet; "
            "spectralmc_validation_error_bp may then be the resumed version's)",
            labels=["model"],
        )
        validated.add_metric(m, nan(training.last_validation))
        interval = GaugeMetricFamily(
            "spectralmc_training_validation_interval_seconds",
            "Seconds between the last validation and the one before it (or the start of training)",
            labels=["model"],
        )
        interval.add_metric(m, nan(training.validation_interval))
        paused = GaugeMetricFamily(
            "spectralmc_training_paused",
            "1 while the worker holds training back for pricing work (a job runs, or ran less than "
            "train.idle_gap_seconds ago); 0 otherwise: training steps, or cannot (a failed engine, a hung step)",
            labels=["model"],
        )
        paused.add_metric(m, 1.0 if training.paused else 0.0)
        yield from (step, validated, interval, paused)


class Metrics:
    """Every metric of one app, on its own registry.

    With ``engine_families=False`` (an HTTP process whose engine runs in its own process)
    the families the engine counts (engine failures, training steps, training rejections)
    are left out of this registry: the engine renders them (engine_service/server.py)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, engine_families: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        e = r if engine_families else None
        self._http_and_queue(r, e)
        self._market_data(r)
        self._streams(r)
        self._jobs(r, e)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request by route, method and status, and time it by route. A
        method outside the standard ones is counted as ``other``: a client must not add
        series (nor entries here) at will."""
        if method not in HTTP_METHODS:
            method = "other"
        key = (route, method, status)
        count = self._request_counts.get(key)
        if count is None:
            count = self._request_counts[key] = self.requests.labels(route, method, str(status))
        count.inc()
        timer = self._request_timers.get(route)
        if timer is None:
            timer = self._request_timers[route] = self.request_seconds.labels(route)
        timer.observe(seconds)

    def _http_and_queue(self, r: CollectorRegistry, e: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "spectralmc_http_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "spectralmc_http_request_duration_seconds",
            "HTTP request duration",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # the label children by their labels: prometheus_client's labels() checks and
        # locks on every call (~1 us each, twice a request)
        self._request_counts: dict[tuple[str, str, int], Counter] = {}
        self._request_timers: dict[str, Histogram] = {}
        self.batch_contracts = Histogram(
            "spectralmc_batch_contracts", "Contracts per compute batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "spectralmc_batch_requests", "Requests per compute batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "spectralmc_batch_duration_seconds", "Compute time of one batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "spectralmc_queue_wait_seconds", "Time from enqueue to batch start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.contracts_priced = Counter(
            "spectralmc_contracts_priced", "Contracts priced", ["model", "method"], registry=r
        )
        self.dropped = Counter(
            "spectralmc_requests_dropped",
            "Requests not computed: overloaded (queue bounds), estimated_wait (would miss its deadline), "
            "too_costly (own compute over its deadline), calibration_limit, deadline, disconnected, shutting_down, "
            "engine_unavailable (the engine was down or lost)",
            ["reason"],
            registry=r,
        )
        self.queue_estimated_wait = Gauge(
            "spectralmc_queue_estimated_wait_seconds",
            "Estimated wait before a new request's own compute starts (queued and in-flight work, a training step)",
            registry=r,
        )
        self.queue_unit_seconds = Gauge(
            "spectralmc_queue_unit_cost_seconds",
            "Learned compute per contract (per quote-evaluation for fits, per path and expiry for a fit's "
            "reference correction) by cost class",
            ["process", "method", "tier"],
            registry=r,
        )
        self.engine_failures = engine_failures_counter(e)
        self.training_step_seconds = training_step_histogram(e)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)

    def _market_data(self, r: CollectorRegistry) -> None:
        """Snapshots and calibrations."""
        self.snapshots_put = Counter(
            "spectralmc_snapshots_put",
            "Snapshot PUTs by outcome: created, idempotent, conflict",
            ["outcome"],
            registry=r,
        )
        self.snapshot_resolutions = Counter(
            "spectralmc_snapshot_resolutions",
            "Snapshot resolutions for pricing (one per key per batch) by outcome: found, missing",
            ["outcome"],
            registry=r,
        )
        self.snapshot_cache = Counter(
            "spectralmc_snapshot_cache", "Loads of resolved snapshots by result: hit, miss", ["result"], registry=r
        )
        # calibration
        self.calibrations = Counter(
            "spectralmc_calibrations",
            "Calibrations by process and outcome: ok, rejected (a surface that cannot be fitted)",
            ["process", "outcome"],
            registry=r,
        )
        self.calibration_seconds = Histogram(
            "spectralmc_calibration_seconds",
            "Time of one calibration on the compute worker",
            ["process"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )

    def _streams(self, r: CollectorRegistry) -> None:
        self.stream_messages = Counter(
            "spectralmc_stream_messages", "WebSocket messages sent, by type", ["type"], registry=r
        )
        self.stream_dropped = Counter(
            "spectralmc_stream_dropped",
            "Stream messages not delivered: coalesced (a newer quote replaced it), control_overflow, closed",
            ["reason"],
            registry=r,
        )
        self.stream_closed = Counter(
            "spectralmc_stream_disconnects", "Stream connections closed by reason", ["reason"], registry=r
        )
        self.stream_publish_seconds = Histogram(
            "spectralmc_stream_publish_seconds",
            "From a trigger (snapshot, model, interval) to quotes queued on every connection",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for reason in ("coalesced", "control_overflow", "closed"):
            self.stream_dropped.labels(reason)

    def _jobs(self, r: CollectorRegistry, e: CollectorRegistry | None) -> None:
        """Declared jobs, and online training's rejections (an engine family)."""
        self.job_runs = Counter(
            "spectralmc_job_runs", "Job runs by outcome: success, unchanged, error", ["job", "outcome"], registry=r
        )
        self.job_skipped = Counter(
            "spectralmc_job_skipped",
            "Ticks not run: overlap (the previous run was still going) or late (the loop fell behind)",
            ["job", "reason"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "spectralmc_job_duration_seconds", "Wall time of one job run", ["job"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.job_lag_seconds = Histogram(
            "spectralmc_job_start_lag_seconds",
            "How late a run started after its scheduled tick",
            ["job"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.training_rejected = training_rejected_counter(e)

    def add_state(self, source: StateSource) -> None:
        self.registry.register(StateCollector(source))


def merge_expositions(parts: list[tuple[bytes, dict[str, str]]], extra: Iterable[Metric] = ()) -> bytes:
    """One exposition from several (each with labels added to all of its samples): a
    family keeps one HELP and TYPE whatever number of parts carry it; ``extra`` families
    are appended. How the server shows its engines' and its HTTP workers' metrics."""
    families: dict[str, Metric] = {}
    for text, labels in parts:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples.extend(
                Sample(s.name, {**s.labels, **labels}, s.value, s.timestamp, s.exemplar) for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), *extra]))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
