"""Server settings: defaults, then a TOML file, then ``SPECTRALMC_`` environment
variables, then command-line flags (each overrides the one before).

Nested fields take ``__`` in the environment: ``SPECTRALMC_QUEUE__MAX_WAIT_SECONDS=0.005``.
With no file and no variables the server runs on a fresh machine: role ``all``, a local
store under ``data_dir``, the bundled models seeded into it, 127.0.0.1:8080.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from spectralmc_server.engine.certificate import DEFAULT_TOLERANCE, GateLimit
from spectralmc_server.engine.certify import MIN_POINTS
from spectralmc_server.engine.device import BudgetConfig, DeviceName
from spectralmc_server.engine.kernels import KernelPolicy
from spectralmc_server.pricing.calibratable import (
    CORRECTION_PATHS,
    MAX_CORRECTION_PATHS,
    MAX_CORRECTIONS,
    MIN_CORRECTION_PATHS,
    CalibratableProcess,
    paths_need_corrections,
)
from spectralmc_server.pricing.schemas import MAX_CONTRACTS, Contract, Measure

if TYPE_CHECKING:  # imported where used: the settings load without the S3 client
    from spectralmc_server.store.s3 import S3Settings

_TOML: ContextVar[dict[str, Any] | None] = ContextVar("spectralmc_settings_toml", default=None)


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/spectralmc`` (``~/.local/share/spectralmc`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "spectralmc"


def _token_problems(name: str, env: str, current: SecretStr | None, previous: SecretStr | None) -> list[str]:
    """What is wrong with a bearer-token pair: setting ``name`` (environment variable
    ``env``), the current token, and ``name_previous``, during a rotation the old token,
    still accepted. The messages never quote a token: they reach logs."""
    problems = []
    for field, var, token in ((name, env, current), (f"{name}_previous", f"{env}_PREVIOUS", previous)):
        if token is None:
            continue
        value = token.get_secret_value()
        if not value.strip():
            problems.append(f"{field} ({var}) is empty: unset it, or give a token")
        elif value != value.strip():
            problems.append(
                f"{field} ({var}) starts or ends with whitespace, which a bearer token cannot carry "
                "(a trailing newline?)"
            )
    if previous is not None and current is None:
        problems.append(
            f"{name}_previous is set without {name}: the previous token is only accepted beside a current one"
        )
    elif previous is not None and current is not None and previous.get_secret_value() == current.get_secret_value():
        problems.append(f"{name}_previous is the same as {name}: a rotation needs a different new token")
    return problems


class QueueSettings(BaseModel):
    """Dynamic batching, admission by estimated cost and back-pressure of the valuation
    queue, and the bounds on calibrations (which go through the same queue)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_contracts: int = Field(4096, ge=1)  # contracts per compute job (larger requests are split)
    max_job_seconds: float = Field(0.1, gt=0, le=10)  # estimated compute per job (and calibration slice)
    max_wait_seconds: float = Field(0.002, ge=0, le=1)  # how long a batch waits to fill
    max_pending_contracts: int = Field(100_000, ge=1)  # beyond this: 503 + Retry-After
    max_pending_requests: int = Field(2048, ge=1)  # ... or beyond this many requests
    retry_after_seconds: int = Field(1, ge=1)  # the Retry-After of a 503 at these bounds
    # admitted only if the estimated wait plus own compute is within this share of the deadline
    admission_fraction: float = Field(0.8, gt=0, le=1)
    max_calibrations: int = Field(1, ge=1)  # fits queued or running at once; more: 503 + Retry-After
    max_calibration_quotes: int = Field(2500, ge=8)  # surface nodes one fit takes; more: 422


class TrainSettings(BaseModel):
    """Online training in the compute worker's gaps (roles ``train`` and ``all``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True  # False: role all serves only (a laptop that should stay quiet)
    model: str = "gbm"  # the model trained (resumed from the version resume_from names)
    # the version whose training state training resumes from at start: "head" (the newest),
    # "served" (the pinned version, else the head), "pin" (the pinned version; none
    # pinned: no training) or a version number. Commits still go on top of the head.
    resume_from: Literal["head", "served", "pin"] | int = "head"
    validate_every: int = Field(500, ge=1)  # steps between validations
    idle_gap_seconds: float = Field(0.05, ge=0, le=60)  # train only after this long without a batch
    commit_every_seconds: float | None = Field(600.0, gt=0)  # auto-commit period (None: never)
    commit_if_improved: bool = True  # skip auto-commits that do not lower validation p95
    # at graceful shutdown: commit the steps trained since the last commit when their
    # validation p95 beats the served version's and they pass the quality gate
    commit_on_shutdown: bool = True
    shutdown_commit_seconds: float = Field(45.0, gt=0, le=600)  # time limit of that; past it the steps are discarded
    device: DeviceName = "cpu"
    kernels: KernelPolicy = "auto"  # path simulation: fused CUDA kernels where available, torch, or fused only

    @field_validator("resume_from", mode="before")
    @classmethod
    def _resume_from(cls, value: Any) -> Any:
        """One line for any bad value (the environment gives "3" for version 3)."""
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if value in ("head", "served", "pin") or (type(value) is int and value >= 1):
            return value
        raise ValueError("must be 'head', 'served', 'pin' or a version number (1 or more)")


class MarketDataSettings(BaseModel):
    """Snapshots: the cache of loaded snapshots, and who may write them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_entries: int = Field(64, ge=1)  # resolved snapshots kept in memory (content is immutable)
    poll_seconds: float = Field(1.0, gt=0)  # how often streams look for snapshots put through other replicas
    write_token: SecretStr | None = None  # set: PUT needs "Authorization: Bearer <token>"; unset: open
    # during a rotation: the old write token, accepted beside write_token (never alone)
    write_token_previous: SecretStr | None = None

    @model_validator(mode="after")
    def _check_tokens(self) -> MarketDataSettings:
        problems = _token_problems(
            "write_token", "SPECTRALMC_MARKETDATA__WRITE_TOKEN", self.write_token, self.write_token_previous
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class StreamSettings(BaseModel):
    """WebSocket /v1/stream limits (per connection unless said otherwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heartbeat_seconds: float = Field(20.0, gt=0)  # ping period; no pong within half of it closes
    max_connections: int = Field(10_000, ge=1)  # per server; past it the upgrade answers 503
    max_subscriptions: int = Field(100, ge=1)
    max_contracts: int = Field(2_000, ge=1)  # summed over a connection's subscriptions
    max_message_bytes: int = Field(1 << 20, ge=1024)  # a larger client message closes the socket (1009)
    min_interval_seconds: float = Field(0.1, gt=0)  # the fastest interval a subscription may ask for
    send_timeout_seconds: float = Field(30.0, gt=0)  # a send blocked this long closes a stalled client
    control_queue: int = Field(256, ge=1)  # queued acks and errors per connection (oldest dropped past it)
    # Requotes: every subscription due at once is priced in as few queue requests as possible
    merge_contracts: int = Field(MAX_CONTRACTS, ge=1, le=MAX_CONTRACTS)  # distinct contracts per merged request
    max_inflight_contracts: int = Field(40_000, ge=1)  # contracts the hub has in the queue at once
    max_inflight_requests: int = Field(2, ge=1)  # requests the hub has in the queue at once
    merge_seconds: float = Field(2.0, gt=0)  # after a missed deadline: merged requests sized to take this long
    overload_retry_seconds: float = Field(10.0, ge=0)  # retry a request the queue refuses (503) this long


def _measures(*names: Measure) -> list[Measure]:
    return list(names)


class MemorySettings(BaseModel):
    """Memory held for clients that do not read, and freed memory given back
    (service/memory.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # an HTTP answer over 64 KiB whose client takes none of it this long: the connection is cut
    send_timeout_seconds: float = Field(30.0, gt=0)
    # bytes of such answers being sent, all clients together; past it the stalest send is cut
    max_send_bytes: int = Field(128 * 2**20, ge=2**20)
    reclaim_idle_seconds: float = Field(5.0, ge=0)  # no request this long: full GC + malloc_trim, once (0: never)
    reclaim_growth_bytes: int = Field(64 * 2**20, ge=0)  # RSS grown this much since: the same at once (0: never)
    malloc_trim: bool = True  # reclaims give freed heap back to the OS (glibc only)


class StoreGCSettings(BaseModel):
    """Store garbage collection on a schedule (service/gc_schedule.py; docs/operations.md,
    "Garbage collection"): every ``interval_seconds`` each served model's GC runs under its
    lease in the store, so one replica runs it per round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 0: no schedule; else rounds at Unix times that are multiples of it (every replica at once)
    interval_seconds: float = Field(0.0, ge=0, allow_inf_nan=False)
    keep: int = Field(20, ge=1, le=1_000_000)  # the last N versions of each model keep their content
    # versions whose content is never collected, per model: {gbm = [7, 9]} (head, pin and served always are)
    protect: dict[str, list[Annotated[int, Field(ge=1)]]] = Field(default_factory=dict)
    grace_seconds: float = Field(3600.0, ge=0, allow_inf_nan=False)  # age before unreferenced content goes
    # a holder that crashes blocks GC this long at most; must be far above the machines' clock skew
    lease_ttl_seconds: float = Field(120.0, gt=0, allow_inf_nan=False)


class EngineSettings(BaseModel):
    """Where torch runs (docs/architecture.md, "The engine process").

    ``process``: in an engine process of its own, which the server starts, watches and
    restarts (``spectralmc serve``); the HTTP process then runs no torch computation.
    ``thread``: on a thread of the server's own process (tests, ``create_app`` callers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["thread", "process"] = "process"
    # engine processes behind the server (mode "process"): each loads every served model
    # (memory x processes) and takes jobs as they come; the first alone trains
    processes: int = Field(1, ge=1, le=64)
    # an engine that dies is started again after 0.5, 1, 2, ... s (at most max_backoff);
    # the server exits (status 1, for the orchestrator to restart it) once the engine has
    # died more than max_restarts times within restart_window_seconds
    max_restarts: int = Field(5, ge=0)
    restart_window_seconds: float = Field(300.0, gt=0)
    max_backoff_seconds: float = Field(30.0, gt=0)
    status_seconds: float = Field(1.0, gt=0)  # how often the engine reports its status
    # an engine that answers nothing (not even its status) this long is taken for hung: killed
    heartbeat_timeout_seconds: float = Field(10.0, gt=0)
    start_timeout_seconds: float = Field(300.0, gt=0)  # imports, seeding and model loads


class VersionCacheSettings(BaseModel):
    """A copy on local disk of the model versions a process loaded from an S3 store
    (engine_service/version_cache.py): what it serves when it starts while the store is
    unreachable (docs/operations.md, "The store is down at start"). A ``file://`` store
    is local disk already: no copy is kept of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: Path | None = None  # None: <data_dir>/version-cache
    # versions kept per model, the most recently served first (about 0.4 MB each for the
    # bundled models' sizes); 0: no cache (a start with the store down serves the bundled model)
    keep: int = Field(3, ge=0, le=100)


class UISettings(BaseModel):
    """What the live page at /ui subscribes to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str = "default"
    portfolio: str = "demo"  # a name in [portfolios]
    measures: list[Measure] = Field(default_factory=lambda: _measures("price", "delta", "vega"), min_length=1)


class GateLimitSettings(BaseModel):
    """Thresholds on one measure's normalised error over a certificate's sample."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p95: float | None = Field(None, gt=0)
    max: float | None = Field(None, gt=0)


def _default_tolerance() -> dict[Measure, float]:
    return {cast(Measure, m): v for m, v in DEFAULT_TOLERANCE.items()}


def _default_gate() -> dict[str, dict[Measure, GateLimitSettings]]:
    # Normalised as in engine/certify.py (a price's 1e-4 is 1 bp of spot). The bundled
    # models' certificates pass with room (price p95 at most 9 bp, the asian's, most of it
    # its simulated truth's 3 standard errors; max at most 60 bp, heston's; delta and
    # digital p95 at most 40e-4); a 50-step model (price p95 ~1,000 bp) fails.
    return {
        "default": {
            "price": GateLimitSettings(p95=20e-4, max=100e-4),
            "delta": GateLimitSettings(p95=100e-4),
            "digital": GateLimitSettings(p95=100e-4),
        }
    }


class CertificateSettings(BaseModel):
    """Certified answers: each model version's error map (engine/certify.py), the
    tolerances past which a learned measure is not served, and the quality gate a
    version must pass to be committed by training or served by a tracker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    points: int = Field(MIN_POINTS, ge=MIN_POINTS, le=1 << 16)  # held-out parameter points per certificate
    # per measure: absolute per unit of its scale (price: 25e-4 = 25 bp of D F), or
    # relative to the value for stdev and quantiles (0.02 = 2%)
    tolerance: dict[Measure, float] = Field(default_factory=_default_tolerance)
    # per model name ("default": any model not named), per measure: p95 and max of the
    # normalised error a version's certificate must not exceed
    gate: dict[str, dict[Measure, GateLimitSettings]] = Field(default_factory=_default_gate)

    @model_validator(mode="after")
    def _check(self) -> CertificateSettings:
        bad = {m: v for m, v in self.tolerance.items() if not v > 0}
        if bad:
            raise ValueError(f"certificate.tolerance must be positive: {bad}")
        return self

    def limits(self, model: str) -> dict[str, GateLimit]:
        """The gate of ``model``: its own entry, else ``default``."""
        table = self.gate.get(model, self.gate.get("default", {}))
        return {m: GateLimit(p95=v.p95, max=v.max) for m, v in table.items()}


class PriceJob(BaseModel):
    """Every ``every_seconds``: price ``portfolio`` at the namespace's latest snapshot and
    publish it to stream topic ``topic`` (default: the job's name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["price"]
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
    every_seconds: float = Field(gt=0)
    namespace: str = "default"
    portfolio: str
    topic: str | None = None
    measures: list[Measure] = Field(default_factory=lambda: _measures("price"), min_length=1)


class DeriveJob(BaseModel):
    """Every ``every_seconds``: build a new snapshot from the namespace's latest one (for
    ``implied_vol_surface``: a vol surface per ``underlyings`` from its option quotes; for
    ``calibrate``: ``process`` parameters per underlying fitted to its surface),
    stored with a later data_asof and its lineage. A latest snapshot this job made, or
    one that already holds what it derives, is left alone (nothing new)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["derive"]
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
    every_seconds: float = Field(gt=0)
    namespace: str = "default"
    # implied_vol_surface: a surface from option quotes; calibrate: fit ``process`` to
    # each underlying's surface (model_params[underlying][process], with the fit report)
    derive: Literal["implied_vol_surface", "calibrate"] = "implied_vol_surface"
    underlyings: list[str] = Field(min_length=1)
    strike_kind: Literal["strike", "moneyness"] = "strike"
    process: CalibratableProcess = "heston"  # calibrate only: the process fitted (heston, rbergomi)
    # calibrate only: reference corrections of each fit (POST /v1/calibrate ``corrections``),
    # the Monte Carlo's paths per expiry, and each fit's deadline (None: request_timeout_seconds)
    corrections: int = Field(0, ge=0, le=MAX_CORRECTIONS)
    correction_paths: int = Field(CORRECTION_PATHS, ge=MIN_CORRECTION_PATHS, le=MAX_CORRECTION_PATHS)
    timeout_seconds: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False)

    _paths_need_corrections = field_validator("correction_paths")(paths_need_corrections)


Job = Annotated[PriceJob | DeriveJob, Field(discriminator="kind")]


def _demo_portfolio() -> dict[str, list[Contract]]:
    return {
        "demo": [
            Contract(id="demo-call-1y", right="call", strike=100.0, underlying="DEMO", expiry=date(2027, 12, 17)),
            Contract(id="demo-put-1y", right="put", strike=90.0, underlying="DEMO", expiry=date(2027, 12, 17)),
            Contract(id="demo-call-2y", right="call", strike=110.0, underlying="DEMO", expiry=date(2028, 12, 15)),
        ]
    }


class S3Config(BaseModel):
    """S3 endpoint and credentials; unset fields fall back to the AWS_* variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    max_attempts: int = Field(5, ge=1)  # per S3 operation, the first try included (retried with backoff)
    timeout_seconds: float = Field(30.0, gt=0)  # connect and read timeout of one attempt

    def client_settings(self) -> S3Settings:
        """What the S3 object store is opened with (the server's and the engine's)."""
        from spectralmc_server.store.s3 import S3Settings

        return S3Settings(
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=None if self.secret_access_key is None else self.secret_access_key.get_secret_value(),
            max_attempts=self.max_attempts,
            timeout_seconds=self.timeout_seconds,
        )


class _TomlSource(PydanticBaseSettingsSource):
    """The table read from ``--config`` (set by :meth:`Settings.load`)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        data = _TOML.get() or {}
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_TOML.get() or {})


class Settings(BaseSettings):
    """Everything ``spectralmc serve`` can be told (config/server.toml lists it all)."""

    model_config = SettingsConfigDict(env_prefix="SPECTRALMC_", env_nested_delimiter="__", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)
    role: Literal["serve", "train", "all"] = "all"
    # HTTP worker processes on one port (SO_REUSEPORT; the kernel spreads connections).
    # Each is a replica of its own (an HTTP process and its engine processes); worker 0
    # alone trains and runs the jobs that write (derive, calibrate), and the others hand
    # it the routes that need them (docs/architecture.md, "HTTP workers")
    http_workers: int = Field(1, ge=1, le=64)
    data_dir: Path = Field(default_factory=default_data_dir)  # the local store lives here
    store: str | None = None  # file:///abs/path or s3://bucket/prefix; None: data_dir/store
    s3: S3Config = S3Config()
    # served model names
    models: list[str] = Field(default_factory=lambda: ["gbm", "heston", "merton", "asian", "rbergomi"], min_length=1)
    seed_bundled: bool = True  # an empty store gets the bundled model as version 1
    poll_seconds: float = Field(2.0, gt=0)  # how often trackers look for a new version
    # after failed polls a tracker waits poll_seconds x 2^failures, at most this long
    poll_max_backoff_seconds: float = Field(30.0, gt=0)
    admin_token: SecretStr | None = None  # None: admin routes answer 403
    # during a rotation: the old admin token, accepted beside admin_token (never alone)
    admin_token_previous: SecretStr | None = None
    max_body_bytes: int = Field(16 * 2**20, ge=1024)  # larger bodies (as sent or inflated): 413
    # a request head (request line and headers) not complete this long after its first
    # byte closes the connection (408); slow "slowloris" clients cannot hold connections
    header_read_timeout_seconds: float = Field(10.0, gt=0)
    keepalive_timeout_seconds: float = Field(75.0, gt=0)  # an idle connection is closed after this
    request_timeout_seconds: float = Field(10.0, gt=0)  # default per-request deadline (504)
    max_request_timeout_seconds: float = Field(60.0, gt=0)  # cap on a client's X-Request-Timeout
    shutdown_timeout_seconds: float = Field(30.0, gt=0)  # drain limit at graceful shutdown
    # intra-op threads of the engine's worker. None: with engine.mode "process", the cores
    # less one (for the HTTP process) shared by the engine processes, at least 1 each (1 on
    # 2 cores: service/engine_process.py); with "thread", torch's own default
    torch_threads: int | None = Field(None, ge=1)
    # Python's cyclic GC, in the HTTP process and each engine process: after start-up,
    # freeze what is loaded (models, modules) so full collections stop rescanning it, and
    # collect the young generation less often. Measured: p99 latency 167 ms -> 47 ms under
    # single-contract load; in an engine, the first seconds of load 42-103 ms -> ~14 ms
    # (docs/benchmarks.md).
    gc_freeze: bool = True
    gc_gen0_threshold: int = Field(50_000, ge=100)  # Python's default is 700
    queue: QueueSettings = QueueSettings()
    train: TrainSettings = TrainSettings()
    budgets: BudgetConfig = BudgetConfig()
    marketdata: MarketDataSettings = MarketDataSettings()
    stream: StreamSettings = StreamSettings()
    memory: MemorySettings = MemorySettings()
    store_gc: StoreGCSettings = StoreGCSettings()
    engine: EngineSettings = EngineSettings()
    ui: UISettings = UISettings()
    version_cache: VersionCacheSettings = VersionCacheSettings()
    certificate: CertificateSettings = CertificateSettings()
    portfolios: dict[str, list[Contract]] = Field(default_factory=_demo_portfolio)  # named books (jobs, /ui)
    jobs: list[Job] = Field(default_factory=list)  # declarative real-time work, see config/jobs.toml

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.role == "train" and self.train.model not in self.models:
            raise ValueError(f"train.model {self.train.model!r} must be one of models {self.models}")
        if self.role == "train" and self.http_workers > 1:
            raise ValueError("http_workers must be 1 for role 'train' (a trainer serves no prices)")
        names = [j.name for j in self.jobs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"job names must be unique; repeated: {', '.join(dupes)}")
        for job in self.jobs:
            if isinstance(job, PriceJob) and job.portfolio not in self.portfolios:
                raise ValueError(f"job {job.name!r} prices portfolio {job.portfolio!r}, which is not in [portfolios]")
        if self.ui.portfolio not in self.portfolios:
            raise ValueError(f"ui.portfolio {self.ui.portfolio!r} is not in [portfolios]")
        return self

    @model_validator(mode="after")
    def _check_tokens(self) -> Settings:
        problems = _token_problems("admin_token", "SPECTRALMC_ADMIN_TOKEN", self.admin_token, self.admin_token_previous)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_store_gc(self) -> Settings:
        unknown = sorted(set(self.store_gc.protect) - set(self.models))
        if unknown:
            raise ValueError(f"store_gc.protect names models not in models {self.models}: {', '.join(unknown)}")
        return self

    @property
    def serves(self) -> bool:
        return self.role in ("serve", "all")

    @property
    def trains(self) -> bool:
        return self.role == "train" or (self.role == "all" and self.train.enabled)

    @property
    def store_uri(self) -> str:
        return self.store or (self.data_dir.resolve() / "store").as_uri()

    @property
    def version_cache_dir(self) -> Path | None:
        """Where loaded versions are copied (None: no copy: a ``file://`` store, or
        ``version_cache.keep = 0``)."""
        if self.version_cache.keep == 0 or not self.store_uri.startswith("s3://"):
            return None
        return (self.version_cache.dir or self.data_dir / "version-cache").expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSource(settings_cls)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Settings:
        """Settings from ``path`` (TOML), the environment and ``overrides`` (command-line
        flags; None values are ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        token = _TOML.set(data)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _TOML.reset(token)
