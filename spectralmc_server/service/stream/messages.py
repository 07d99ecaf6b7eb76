"""What a stream client sends: subscribe and unsubscribe (strict types, as POST /v1/price)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spectralmc_server.pricing.schemas import (
    MAX_QUANTILE_LEVELS,
    NAMESPACE_PATTERN,
    Contract,
    Measure,
    PriceRequest,
)
from spectralmc_server.rfc3339 import DateTime


def _default_measures() -> list[Measure]:
    return ["price"]


class Subscribe(BaseModel):
    # strict like PriceRequest: a boolean or a string is never a number, times are RFC 3339
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    op: Literal["subscribe"]
    id: str = Field(min_length=1, max_length=128)
    namespace: str = Field("default", pattern=NAMESPACE_PATTERN)
    val_datetime: DateTime | None = None  # None: the namespace's latest snapshot
    contracts: list[Contract] | None = Field(None, min_length=1)
    topic: str | None = Field(None, min_length=1, max_length=64)
    measures: list[Measure] = Field(default_factory=_default_measures, min_length=1)
    quantile_levels: list[Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, max_length=MAX_QUANTILE_LEVELS
    )
    interval_seconds: float | None = Field(None, gt=0, le=86_400, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_source(self) -> Subscribe:
        if (self.contracts is None) == (self.topic is None):
            raise ValueError("give exactly one of 'contracts' (quote these) or 'topic' (a price job's stream)")
        if self.topic is not None and self.interval_seconds is not None:
            raise ValueError("a topic is pushed by its job; 'interval_seconds' applies to contracts only")
        return self

    def price_request(self, val_datetime: datetime | None, data_asof: datetime | None) -> PriceRequest:
        """The request this subscription prices (raises ValidationError like /v1/price)."""
        return PriceRequest.model_validate(
            {
                "namespace": self.namespace,
                "val_datetime": val_datetime,
                "data_asof": data_asof,
                "measures": self.measures,
                "quantile_levels": self.quantile_levels,
                "contracts": self.contracts,
            }
        )


class Unsubscribe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    op: Literal["unsubscribe"]
    id: str = Field(min_length=1, max_length=128)


class ClientMessage(BaseModel):
    message: Annotated[Subscribe | Unsubscribe, Field(discriminator="op")]
