"""HTTP bodies beyond pricing: model listings, errors, admin bodies and calibration
(documented in the OpenAPI description). The pricing schemas live in
:mod:`spectralmc_server.pricing.schemas`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spectralmc_server.pricing.calibratable import (
    CORRECTION_PATHS,
    MAX_CORRECTION_PATHS,
    MAX_CORRECTIONS,
    MIN_CORRECTION_PATHS,
    CalibratableProcess,
    paths_need_corrections,
)
from spectralmc_server.pricing.schemas import NAMESPACE_PATTERN, in_utc
from spectralmc_server.rfc3339 import DateTime


class MeasureFigures(BaseModel):
    """One measure's normalised error over a certificate's held-out sample (x 1e4: bp
    of the unit)."""

    unit: str = Field(description="What the errors are normalised by (D F, D F / S, D, F, 1, ...)")
    p50: float | None
    p95: float | None
    max: float | None


class CertificateSummary(BaseModel):
    """A version's certificate in brief (engine/certificate.py ``summary``)."""

    model_config = ConfigDict(extra="allow")

    model_hash: str | None = Field(description="The content hash of the model the certificate measures")
    points: int | None = Field(description="Held-out parameter points (each with 13 strikes)")
    seed: int | None = Field(description="The scrambled Sobol sequence's seed (no training draw uses it)")
    truth: str | None = Field(description="What the learned answers were compared with")
    measures: dict[str, MeasureFigures]


class Heatmap(BaseModel):
    """The price error by cell of the model's two main dimensions (its vol parameter and
    expiry): ``p95[i][j]`` and ``max[i][j]`` for the cell between ``edges[0][i..i+1]``
    and ``edges[1][j..j+1]``; null for a cell with no sample."""

    measure: str
    unit: str
    dims: list[str]
    edges: list[list[float]]
    p95: list[list[float | None]]
    max: list[list[float | None]]


class PreviousVersion(BaseModel):
    """The version before the served one, with its certificate when it can be read."""

    version: int
    certificate: CertificateSummary | None
    heatmap: Heatmap | None
    reason: str | None = Field(description="Why certificate is null (no certificate, or the store failed)")


class ModelInfo(BaseModel):
    """One served model (GET /v1/models)."""

    model_config = ConfigDict(extra="allow")

    name: str
    process: str | None
    version: int | None
    content_hash: str | None
    mode: str
    certificate: CertificateSummary | None = Field(
        description="The served version's certificate; null: none, and every answer is method reference"
    )
    heatmap: Heatmap | None
    previous: PreviousVersion | None = Field(description="The version before the served one; null for version 1")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    field: str | None = None
    reason: str | None = None


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail]


class ErrorResponse(BaseModel):
    error: ErrorInfo


class CommitBody(BaseModel):
    """POST /v1/admin/models/{name}/commit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    message: str = Field("committed through the admin API", max_length=1000)
    # commit a state whose certificate fails its quality gate anyway; the version records it
    allow_unqualified: bool = False


class PinBody(BaseModel):
    """POST /v1/admin/models/{name}/pin."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: int = Field(ge=1)
    by: str = Field("admin api", max_length=200)
    # pin (and serve) a version whose certificate fails its quality gate, or that has none;
    # the pin log records it and /readyz names the version as forced
    force: bool = False


class UnpinBody(BaseModel):
    """POST /v1/admin/models/{name}/unpin (the body is optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    by: str = Field("admin api", max_length=200)


class GCBody(BaseModel):
    """POST /v1/admin/models/{name}/gc; a dry run unless ``dry_run`` is false."""

    model_config = ConfigDict(extra="forbid", strict=True)

    keep: int = Field(ge=0, le=1_000_000)
    protect: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=10_000)
    dry_run: bool = True
    min_keep: int = Field(1, ge=1, le=1_000_000)
    grace_seconds: float = Field(3600.0, ge=0, allow_inf_nan=False)


class CalibrateRequest(BaseModel):
    """POST /v1/calibrate: fit a process to an underlying's vol surface in a snapshot."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    namespace: str = Field("default", pattern=NAMESPACE_PATTERN)
    val_datetime: DateTime
    data_asof: DateTime | None = None  # None: the latest snapshot for val_datetime
    underlying: str = Field(min_length=1, max_length=64)
    process: CalibratableProcess = "heston"  # pricing/calibratable.py
    store: bool = False  # store the fitted set as a derived snapshot (a later data_asof)
    allow_arbitrage: bool = False  # calibrate to a surface that has arbitrage violations
    max_iterations: int = Field(100, ge=1, le=1000)
    # correct the learned model's fit this many times by the process's reference (its
    # analytic CF, or rough Bergomi's Monte Carlo with correction_paths paths per expiry)
    corrections: int = Field(0, ge=0, le=MAX_CORRECTIONS)
    correction_paths: int = Field(CORRECTION_PATHS, ge=MIN_CORRECTION_PATHS, le=MAX_CORRECTION_PATHS)

    _in_utc = field_validator("val_datetime", "data_asof")(in_utc)
    _paths_need_corrections = field_validator("correction_paths")(paths_need_corrections)
