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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from spectralmc_server.engine.device import BudgetConfig, DeviceName

_TOML: ContextVar[dict[str, Any] | None] = ContextVar("spectralmc_settings_toml", default=None)


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/spectralmc`` (``~/.local/share/spectralmc`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "spectralmc"


class QueueSettings(BaseModel):
    """Dynamic batching and back-pressure of the valuation queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_contracts: int = Field(4096, ge=1)  # contracts per compute batch
    max_wait_seconds: float = Field(0.002, ge=0, le=1)  # how long a batch waits to fill
    max_pending_contracts: int = Field(100_000, ge=1)  # beyond this: 503 + Retry-After
    max_pending_requests: int = Field(2048, ge=1)  # ... or beyond this many requests
    retry_after_seconds: int = Field(1, ge=1)  # the Retry-After of a 503


class TrainSettings(BaseModel):
    """Online training in the compute worker's gaps (roles ``train`` and ``all``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True  # False: role all serves only (a laptop that should stay quiet)
    model: str = "gbm"  # the model trained (resumed from its served version's state)
    validate_every: int = Field(500, ge=1)  # steps between validations
    idle_gap_seconds: float = Field(0.05, ge=0, le=60)  # train only after this long without a batch
    commit_every_seconds: float | None = Field(600.0, gt=0)  # auto-commit period (None: never)
    commit_if_improved: bool = True  # skip auto-commits that do not lower validation p95
    commit_on_shutdown: bool = False  # commit the training state at graceful shutdown
    device: DeviceName = "cpu"


class S3Config(BaseModel):
    """S3 endpoint and credentials; unset fields fall back to the AWS_* variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None


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
    data_dir: Path = Field(default_factory=default_data_dir)  # the local store lives here
    store: str | None = None  # file:///abs/path or s3://bucket/prefix; None: data_dir/store
    s3: S3Config = S3Config()
    models: list[str] = Field(default_factory=lambda: ["gbm"], min_length=1)  # served model names
    seed_bundled: bool = True  # an empty store gets the bundled model as version 1
    poll_seconds: float = Field(2.0, gt=0)  # how often trackers look for a new version
    admin_token: SecretStr | None = None  # None: admin routes answer 403
    max_body_bytes: int = Field(16 * 2**20, ge=1024)  # larger bodies: 413
    request_timeout_seconds: float = Field(10.0, gt=0)  # default per-request deadline (504)
    max_request_timeout_seconds: float = Field(60.0, gt=0)  # cap on a client's X-Request-Timeout
    shutdown_timeout_seconds: float = Field(30.0, gt=0)  # drain limit at graceful shutdown
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads of the worker (None: torch's)
    # Python's cyclic GC: after start-up, freeze what is loaded (models, modules) so full
    # collections stop rescanning it, and collect the young generation less often.
    # Measured: p99 latency 167 ms -> 47 ms under single-contract load (docs/benchmarks.md).
    gc_freeze: bool = True
    gc_gen0_threshold: int = Field(50_000, ge=100)  # Python's default is 700
    queue: QueueSettings = QueueSettings()
    train: TrainSettings = TrainSettings()
    budgets: BudgetConfig = BudgetConfig()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.role == "train" and self.train.model not in self.models:
            raise ValueError(f"train.model {self.train.model!r} must be one of models {self.models}")
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
