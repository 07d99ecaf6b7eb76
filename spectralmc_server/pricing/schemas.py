"""Request and response schemas of the pricing use case (docs/api.md), shared by HTTP and CLI.

Validation is strict: unknown fields, non-finite numbers, values outside each input's
bounds (spot, strike, K/F, vol, expiry, vol sqrt(T), every process parameter), duplicate
ids and unknown measures are rejected with the field's path and the reason. Types are
not coerced: a boolean or a string is not a number, and times are RFC 3339 strings
(spectralmc_server/rfc3339.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from spectralmc_server.engine.pricer import REQUEST_MEASURES as ENGINE_MEASURES
from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.engine.processes.base import (
    EXPIRY_BOUNDS,
    MAX_SCALE,
    MONEYNESS_BOUNDS,
    PRICE_BOUNDS,
    VOL_BOUNDS,
)
from spectralmc_server.engine.processes.spec import MAX_FIXINGS
from spectralmc_server.rfc3339 import Date, DateTime

NAMESPACE_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$"
MAX_CONTRACTS = 20_000  # per request; larger books go in several requests
MAX_QUANTILE_LEVELS = 64
DEFAULT_QUANTILE_LEVELS = (0.01, 0.05, 0.5, 0.95, 0.99)

Finite = Annotated[float, Field(allow_inf_nan=False, strict=True)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
Price = Annotated[float, Field(ge=PRICE_BOUNDS[0], le=PRICE_BOUNDS[1], allow_inf_nan=False, strict=True)]
# The measures a request may ask for. The engine's list (engine/pricer.py REQUEST_MEASURES) is
# the one source of truth; this Literal spells it for the type checker and for the
# schema, and the import below fails loudly if the two ever differ.
Measure = Literal[
    "price",
    "delta",
    "gamma",
    "vega",
    "theta",
    "rho",
    "digital",
    "mean",
    "stdev",
    "skew",
    "kurtosis",
    "quantiles",
    "survival",
]
if get_args(Measure) != ENGINE_MEASURES:
    raise RuntimeError(f"pricing.schemas.Measure {get_args(Measure)} differs from the engine's {ENGINE_MEASURES}")


def in_utc(v: datetime | None) -> datetime | None:
    """A key time in UTC (the store's keys are UTC); an instant that overflows there is
    invalid input, not a crash."""
    if v is None:
        return None
    try:
        return v.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


BarrierType = Literal["down-and-out", "up-and-out", "down-and-in", "up-and-in"]
BARRIER_PROCESSES = ("gbm", "heston")  # the processes a barrier contract may have
# a discretely monitored barrier: at most this many dates (about a year of business days;
# Monte Carlo's cost grows with them, ~1 s a contract at 260 dates)
MAX_MONITORING_DATES = 260
# what a barrier contract is priced for: the distribution measures of a killed law are
# not defined cleanly (the surviving mass is not a distribution), so they are refused
BARRIER_MEASURE_NAMES = ("price", "delta", "gamma", "vega", "theta", "rho", "digital", "survival")


def _monitoring(v: Any) -> str | int:
    if v == "continuous" and isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_MONITORING_DATES:
        return v
    raise ValueError(f'must be "continuous" or a whole number of dates from 1 to {MAX_MONITORING_DATES}')


# "continuous", or n equally spaced monitoring dates (one error, at the field, either way)
Monitoring = Annotated[
    str | int,
    PlainValidator(_monitoring),
    WithJsonSchema(
        {
            "anyOf": [
                {"const": "continuous", "type": "string"},
                {"type": "integer", "minimum": 1, "maximum": MAX_MONITORING_DATES},
            ]
        }
    ),
]


class Barrier(BaseModel):
    """A knock-out or knock-in barrier on the spot: checked continuously or on
    ``monitoring`` equally spaced dates up to the expiry (the last one at it). A
    knock-out pays ``rebate`` at expiry once knocked out; a knock-in pays it at expiry
    if never knocked in. Knock-ins are priced by in-out parity, so in + out = vanilla
    (+ the rebate's discounted value)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: BarrierType
    level: Price
    monitoring: Monitoring = "continuous"
    rebate: Annotated[float, Field(ge=0, le=PRICE_BOUNDS[1], allow_inf_nan=False, strict=True)] = 0.0

    @property
    def down(self) -> bool:
        return self.type.startswith("down")

    @property
    def knock_in(self) -> bool:
        return self.type.endswith("-in")

    @property
    def dates(self) -> int:
        """Monitoring dates; 0 for continuous monitoring."""
        return 0 if self.monitoring == "continuous" else int(self.monitoring)


def _default_measures() -> list[Measure]:
    return ["price"]


class Contract(BaseModel):
    """One option: explicit market inputs, or an underlying and an expiry date resolved
    from the request's market-data snapshot. European, or (process ``asian``) on the
    arithmetic average of ``fixings`` equally spaced fixings up to the expiry."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str = Field(min_length=1, max_length=128)
    right: Literal["call", "put"]
    strike: Price
    spot: Price | None = None
    expiry_years: Annotated[float, Field(ge=EXPIRY_BOUNDS[0], le=EXPIRY_BOUNDS[1], allow_inf_nan=False)] | None = None
    rate: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] | None = None  # continuous, per year
    dividend: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] | None = None  # continuous yield
    process: str = "gbm"
    vol: Annotated[float, Field(ge=VOL_BOUNDS[0], le=VOL_BOUNDS[1], allow_inf_nan=False)] | None = None
    params: dict[str, Finite] | None = None
    fixings: Annotated[int, Field(ge=1, le=MAX_FIXINGS, strict=True)] | None = None  # asian: t_i = i T / n
    underlying: str | None = Field(None, min_length=1, max_length=64)
    expiry: Date | None = None
    barrier: Barrier | None = None  # a barrier option (gbm, heston): see Barrier

    @field_validator("process")
    @classmethod
    def _known_process(cls, v: str) -> str:
        if v not in PROCESSES:
            raise ValueError(f"unknown process {v!r}; known: {', '.join(sorted(PROCESSES))}")
        return v

    @property
    def vol_driven(self) -> bool:
        """The process takes one vol (gbm, asian) rather than a parameter set."""
        return PROCESSES[self.process].market_param_names == ("vol",)

    @model_validator(mode="after")
    def _inputs(self) -> Contract:
        self._check_fixings()
        if self.barrier is not None and self.process not in BARRIER_PROCESSES:
            raise ValueError(
                f"barrier must be on a {' or '.join(BARRIER_PROCESSES)} contract, not {self.process} "
                "(no barrier pricer for it)"
            )
        if self.underlying is not None or self.expiry is not None:
            self._check_by_reference()
            return self
        self._check_explicit_inputs()
        try:
            PROCESSES[self.process].check_params(self.process_params())
        except ValueError as exc:
            where = "params." if not self.vol_driven or self.vol is None else ""
            raise ValueError(where + str(exc)) from None
        self._check_spread_and_moneyness()
        self._check_barrier()
        return self

    def _check_barrier(self) -> None:
        """A barrier not already breached at the spot (such a contract is knocked out,
        or in, now: not an option on the barrier any more)."""
        b = self.barrier
        if b is None or self.spot is None:
            return
        if (b.level >= self.spot) if b.down else (b.level <= self.spot):
            side = "below" if b.down else "above"
            raise ValueError(
                f"barrier.level must be {side} the spot for a {b.type} barrier: {b.level:g} against "
                f"spot {self.spot:g} is breached already"
            )

    def _check_fixings(self) -> None:
        averaged = PROCESSES[self.process].averages
        if averaged and self.fixings is None:
            raise ValueError(
                f"{self.process} needs 'fixings': the number of equally spaced fixings (1 to {MAX_FIXINGS})"
            )
        if not averaged and self.fixings is not None:
            raise ValueError(f"'fixings' applies to averaging processes (asian) only, not {self.process}")

    def _check_by_reference(self) -> None:
        if self.underlying is None or self.expiry is None:
            raise ValueError("a market-data contract needs both 'underlying' and 'expiry'")
        explicit = [
            f for f in ("spot", "expiry_years", "rate", "dividend", "vol", "params") if getattr(self, f) is not None
        ]
        if explicit:
            raise ValueError(
                f"give either underlying/expiry or explicit inputs, not both ({', '.join(explicit)}): "
                "a contract by reference takes all its inputs from the market-data snapshot"
            )

    def _check_explicit_inputs(self) -> None:
        """Every input given, in the form the process takes (a vol, or its params)."""
        missing = [f for f in ("spot", "expiry_years") if getattr(self, f) is None]
        if self.vol_driven:
            if self.vol is None and not (self.params and "vol" in self.params):
                missing.append("vol")
        else:
            if self.vol is not None:
                raise ValueError(f"{self.process} takes its parameters in 'params', not 'vol'")
            names = PROCESSES[self.process].param_names
            given = self.params or {}
            missing += [f"params.{n}" for n in names if n not in given]
            extra = sorted(set(given) - set(names))
            if extra:
                raise ValueError(f"{self.process} takes params {', '.join(names)}; unknown: {', '.join(extra)}")
        if missing:
            raise ValueError(f"missing explicit input(s): {', '.join(missing)} (or give underlying and expiry)")
        if self.vol_driven and self.params:
            extra = sorted(set(self.params) - {"vol"})
            if extra:
                raise ValueError(f"{self.process} takes only 'vol' in params, got {', '.join(extra)}")
            if self.vol is not None and "vol" in self.params:
                raise ValueError("give vol either as 'vol' or in 'params', not both")

    def _check_spread_and_moneyness(self) -> None:
        """Bounds that tie inputs together: the spread s(theta, T) of log(S_T / F), what
        the process needs of it, and the strike over the forward of what the payoff is
        written on (the average's for an asian). No torch: the processes' ``math`` twins
        of the engine's formulas (engine/processes/spec.py)."""
        spot, t, rate, dividend = self.market_inputs()
        s = self.spread()
        if not s <= MAX_SCALE:
            raise ValueError(
                f"the spread of log(S_T/F) up to expiry_years, {s:.4g} (vol sqrt(T) for a vol), "
                f"must be at most {MAX_SCALE:g}"
            )
        process = PROCESSES[self.process]
        given = self.process_params()
        try:
            process.check_spread(given, t, s)
        except ValueError as exc:
            raise ValueError(("" if self.vol_driven else "params.") + str(exc)) from None
        ratio = process.forward_ratio_math([given[n] for n in process.param_names], t, rate, dividend)
        kappa = self.strike / (spot * ratio)
        low, high = MONEYNESS_BOUNDS
        if not low <= kappa <= high:
            raise ValueError(
                f"strike over the forward (K/F = {kappa:.4g}) must be in [{low:g}, {high:g}]: "
                "such an option is worth its intrinsic value or nothing"
            )

    def spread(self) -> float:
        """s(theta, T), about the stdev of log(S_T / F), of an explicit contract."""
        _, t, _, _ = self.market_inputs()
        process = PROCESSES[self.process]
        given = self.process_params()
        if self.vol_driven:  # vol sqrt(T), an asian's too (not its geometric average's scale)
            return given["vol"] * math.sqrt(t)
        # the engine's formula, as its torch-free twin (engine/processes/spec.py)
        return process.scale_math([given[n] for n in process.param_names], t)

    @property
    def is_explicit(self) -> bool:
        return self.underlying is None

    def market_inputs(self) -> tuple[float, float, float, float]:
        """spot, expiry_years, rate, dividend of an explicit contract (rate and dividend
        default to 0)."""
        if self.spot is None or self.expiry_years is None:
            raise ValueError(f"contract {self.id!r} has no explicit market inputs")
        return self.spot, self.expiry_years, self.rate or 0.0, self.dividend or 0.0

    def process_params(self) -> dict[str, float]:
        """Every parameter of the process: an Asian's carry is rate - dividend and its
        fixings the contract's."""
        if not self.vol_driven:
            return dict(self.params or {})
        vol = self.vol if self.vol is not None else (self.params or {})["vol"]
        if self.fixings is None:
            return {"vol": vol}
        return {"vol": vol, "carry": (self.rate or 0.0) - (self.dividend or 0.0), "fixings": float(self.fixings)}


class PriceRequest(BaseModel):
    """Body of POST /v1/price and stdin of ``spectralmc price``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    namespace: str = Field("default", pattern=NAMESPACE_PATTERN)
    val_datetime: DateTime | None = None  # RFC 3339 with a time zone: 2026-11-26T16:00:00Z
    data_asof: DateTime | None = None  # None: the latest snapshot for val_datetime
    measures: list[Measure] = Field(default_factory=_default_measures, min_length=1)
    quantile_levels: list[Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, max_length=MAX_QUANTILE_LEVELS
    )
    contracts: list[Contract] = Field(min_length=1, max_length=MAX_CONTRACTS)
    # (the contracts list, its Book): see pricing/book.py book_of; not part of the schema
    _book: Any = PrivateAttr(default=None)

    _in_utc = field_validator("val_datetime", "data_asof")(in_utc)

    @field_validator("measures")
    @classmethod
    def _unique_measures(cls, v: list[Measure]) -> list[Measure]:
        dupes = sorted(k for k, n in Counter(v).items() if n > 1)
        if dupes:
            raise ValueError(f"each measure at most once; repeated: {', '.join(dupes)}")
        return v

    @field_validator("quantile_levels")
    @classmethod
    def _levels_need_quantiles(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        measures = info.data.get("measures")
        if v is not None and measures is not None and "quantiles" not in measures:
            raise ValueError("quantile_levels given but 'quantiles' is not among the measures")
        return v

    @field_validator("contracts")
    @classmethod
    def _unique_ids(cls, v: list[Contract]) -> list[Contract]:
        dupes = sorted(k for k, n in Counter(c.id for c in v).items() if n > 1)
        if dupes:
            raise ValueError(f"duplicate contract id(s): {', '.join(dupes[:5])}")
        return v

    def __eq__(self, other: object) -> bool:
        """Equal fields; the contracts compared one by one, whatever sequence holds them
        (a list, or a book's LazyContracts); the cached Book is not part of a request."""
        if not isinstance(other, PriceRequest):
            return NotImplemented
        head = ("namespace", "val_datetime", "data_asof", "measures", "quantile_levels")
        return all(getattr(self, k) == getattr(other, k) for k in head) and list(self.contracts) == list(
            other.contracts
        )

    # a request holds lists (contracts, measures): not hashable, as pydantic's hash of a
    # frozen model's fields would fail on them anyway
    __hash__ = None  # type: ignore[assignment]

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(self.quantile_levels) if self.quantile_levels is not None else DEFAULT_QUANTILE_LEVELS


def format_validation_error(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as ``[{"field": "contracts[0].strike", "reason": ...}]``."""
    details = []
    for err in exc.errors(include_url=False):
        parts: list[str] = []
        for loc in err["loc"]:
            if isinstance(loc, int):
                parts[-1:] = [f"{parts[-1]}[{loc}]" if parts else f"[{loc}]"]
            else:
                parts.append(str(loc))
        reason = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] not in ("missing", "model_type") and not isinstance(value, dict | list):
            reason += f" (got {value!r})"
        field = ".".join(parts) or "(body)"
        named = _NAMED_BOUND.match(reason)  # a contract-level check that names one input
        if named is not None and isinstance(value, dict):
            field, reason = f"{field}.{named[1]}", reason[len(named[1]) + 1 :]
        details.append({"field": field, "reason": reason})
    return details


# "params.v0 must be in [...]": the reason of a cross-field check about one input
_NAMED_BOUND = re.compile(r"^((?:params\.|barrier\.)?[A-Za-z_0-9]+) must be ")


def one_line(details: list[dict[str, Any]]) -> str:
    """Validation details as one line for a terminal."""
    return "; ".join(f"{d['field']}: {d['reason']}" for d in details)


# -- responses (documented in the OpenAPI description) ----------------------------------


class ModelIdentity(BaseModel):
    version: int | None
    content_hash: str


# A measure's bound: a number in the measure's own units, a map level -> number for
# quantiles, or null where the value is withheld (see ContractResult.warnings).
ErrorBound = float | None | dict[str, float | None]

ERROR_BOUND_DESCRIPTION = (
    "Per requested measure, a bound on the error of the value given, in the measure's own units (a price in "
    "the currency of spot, delta per unit of spot, vega per 1.00 of vol, quantiles as levels of S_T, ...); for "
    "quantiles an object level -> bound like the values. A learned answer (method cvnn) takes its bound from "
    "the model version's certificate: the error scale fitted there times the 99.5% quantile of the held-out "
    "errors / scale in the contract's cell of the error map, times a 1.1 margin, times the measure's unit for "
    "this contract (D F for a price, D F / S for "
    "delta, D for the digital, F for the mean, stdev and quantiles, 1 for skew and kurtosis). A reference "
    "answer's bound is the method's own accuracy, about 0: 1e-12 of the unit for the Black-Scholes closed "
    "forms, 1e-7 for COS on an analytic characteristic function (Heston, Merton); three standard errors for "
    "the Monte-Carlo reference (asian, and barriers under Heston or with monitoring dates, whose Greeks are "
    "central differences on common random numbers, their standard errors from independent groups of paths); "
    "1e-10 of the unit for a barrier's closed form. Null only where the value is withheld (then warnings says why). "
    "Units and the method: docs/api.md, docs/method.md."
)
WARNINGS_DESCRIPTION = (
    "Present only when a learned measure of this contract is withheld: its certified error bound passes the "
    "server's tolerance for that measure and no reference can answer in its place. The measure's value and "
    "its error_bound are then null; each warning names the measure, its bound and the tolerance."
)


class ContractResult(BaseModel):
    """One contract's answer: the measures asked for, in the request's order, each with
    its error bound (``error_bound``)."""

    model_config = ConfigDict(extra="allow")

    id: str
    model: str = Field(description="The process that priced it (the model's name)")
    method: Literal["cvnn", "reference", "analytic"] = Field(
        description=(
            "cvnn: the learned model answered; reference: the process's reference pricer did; analytic: a "
            "closed form did (a GBM barrier under continuous monitoring, or survival 1 of a contract without "
            "a barrier)"
        )
    )
    error_bound: dict[str, ErrorBound] = Field(
        description=ERROR_BOUND_DESCRIPTION,
        examples=[{"price": 0.0021, "delta": 0.00013, "quantiles": {"0.05": 0.04, "0.95": 0.06}}],
    )
    warnings: list[str] | None = Field(None, description=WARNINGS_DESCRIPTION)


class PriceResponse(BaseModel):
    namespace: str
    val_datetime: datetime | None
    data_asof: datetime | None
    results: list[ContractResult]
    models: dict[str, ModelIdentity]
    market_data: dict[str, Any] | None
