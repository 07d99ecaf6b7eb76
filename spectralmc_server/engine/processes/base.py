"""What every process provides, and the parameter domain a model is trained over.

A process is described by its parameters theta (GBM: sigma), the maturity T and the
law of X = log(S_T / F), which under the pricing measure depends on (theta, T) only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from spectralmc_server.engine.processes import spec
from spectralmc_server.engine.processes.spec import Floats

EXPIRY = "expiry_years"

# What every contract's market inputs must satisfy, whatever its process: the range the
# reference pricers are checked on (tests/engine/test_bounds_sweep.py). Outside it an
# answer would be noise in float64 (a spread vol sqrt(T) below rounding) or overflow.
VOL_BOUNDS = (1e-3, 5.0)  # a vol (gbm, asian), per year
EXPIRY_BOUNDS = (1e-5, 30.0)  # years: five minutes to thirty years
PRICE_BOUNDS = (1e-6, 1e9)  # spot and strike, in any currency unit
MONEYNESS_BOUNDS = (1e-4, 1e4)  # K / F, the strike over the contract's forward
MAX_SCALE = 4.0  # s(theta, T), about the stdev of log(S_T / F): vol sqrt(T) <= 4
VALIDATED_MONEYNESS = (0.7, 1.3)  # K/F of the trainer's validation strikes


class ParameterRange(BaseModel):
    """One input dimension of a model: its bounds and the coordinate it is sampled in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    low: float
    high: float
    scale: Literal["linear", "log"] = "linear"  # log: sampled and fed uniform in log(x)

    @model_validator(mode="after")
    def _check(self) -> ParameterRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"{self.name}: need finite low < high, got [{self.low}, {self.high}]")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(f"{self.name}: log scale needs low > 0, got {self.low}")
        return self

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        """Map u in [0, 1] to the parameter's value."""
        if self.scale == "log":
            lo, hi = math.log(self.low), math.log(self.high)
            return torch.exp(lo + (hi - lo) * u)
        return self.low + (self.high - self.low) * u

    def unit_derivative(self, x: torch.Tensor) -> torch.Tensor:
        """d to_unit(x) / dx."""
        if self.scale == "log":
            return 1.0 / (x * (math.log(self.high) - math.log(self.low)))
        return torch.full_like(x, 1.0 / (self.high - self.low))

    def from_unit_derivative(self, u: torch.Tensor) -> torch.Tensor:
        """d from_unit(u) / du."""
        if self.scale == "log":
            return self.from_unit(u) * (math.log(self.high) - math.log(self.low))
        return torch.full_like(u, self.high - self.low)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`from_unit` (differentiable in x)."""
        if self.scale == "log":
            lo, hi = math.log(self.low), math.log(self.high)
            return (torch.log(x) - lo) / (hi - lo)
        return (x - self.low) / (self.high - self.low)


class ModelDomain(BaseModel):
    """The box a model is trained over: the process parameters, then expiry_years."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ranges: tuple[ParameterRange, ...]
    # The strikes, as K/F, where the model's prices were validated: outside them the
    # reference answers. None (manifests written before it was recorded): the trainer's
    # validation strikes, VALIDATED_MONEYNESS.
    moneyness: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelDomain:
        if not self.ranges or self.ranges[-1].name != EXPIRY:
            raise ValueError(f"the last domain range must be {EXPIRY!r}")
        if self.moneyness is not None and not 0 < self.moneyness[0] < self.moneyness[1]:
            raise ValueError(f"moneyness: need 0 < low < high, got {self.moneyness}")
        names = [r.name for r in self.ranges]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate domain ranges: {names}")
        return self

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.ranges[:-1])

    @property
    def dims(self) -> int:
        return len(self.ranges)

    def from_unit(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, dims) in [0, 1] -> theta (B, P), T (B,)."""
        cols = [r.from_unit(u[:, i]) for i, r in enumerate(self.ranges)]
        return torch.stack(cols[:-1], dim=1), cols[-1]

    def network_input(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        """theta (B, P), T (B,) -> (B, dims) in [-1, 1], the network's coordinates."""
        cols = [r.to_unit(theta[:, i]) for i, r in enumerate(self.ranges[:-1])]
        cols.append(self.ranges[-1].to_unit(expiry))
        return 2.0 * torch.stack(cols, dim=1) - 1.0

    @property
    def certified_moneyness(self) -> tuple[float, float]:
        """K/F bounds inside which the learned prices may be served."""
        return self.moneyness if self.moneyness is not None else VALIDATED_MONEYNESS

    def contains(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        """Boolean mask (B,): inside the closed box."""
        inside = (expiry >= self.ranges[-1].low) & (expiry <= self.ranges[-1].high)
        for i, r in enumerate(self.ranges[:-1]):
            inside &= (theta[:, i] >= r.low) & (theta[:, i] <= r.high)
        return inside


class Process(ABC):
    """A stochastic model of the underlying, simulated in X = log(S_T / F)."""

    name: str
    param_names: tuple[str, ...]
    normals_per_path: int  # standard normals one path consumes
    has_analytic_cf: bool = False  # True where analytic_cf_x returns a closed form
    has_companion: bool = False  # True where companion_x returns a control variate
    # True where conditional_x gives X's Gaussian law given the variance driver's path
    # (a stochastic-volatility model): the mixed CF estimator of TrainConfig.targets.
    has_conditional: bool = False
    averages: bool = False  # True where the payoff is on an average over the contract's fixings
    # True where the law learned is defective: E[exp(i u X) w] for a path weight w in
    # [0, 1] (a barrier's survival), whose mass phi(0) = E[w] is below 1. Such a process
    # provides simulate_weighted and share_weights, and its model learns phi(0) and the
    # share mass E[e^X w] as well (engine/cvnn.py CFModel).
    defective: bool = False
    # Every parameter's closed bounds: what the reference pricer is checked to handle
    # (tests/engine/test_bounds_sweep.py); a contract outside them is refused (422).
    param_bounds: ClassVar[Mapping[str, tuple[float, float]]] = {}

    @property
    def market_param_names(self) -> tuple[str, ...]:
        """The parameters a contract or a market-data snapshot supplies (the rest follow
        from the contract's terms and market inputs, as an Asian's carry and fixings do)."""
        return self.param_names

    def forward_ratio(
        self, theta: torch.Tensor, expiry: torch.Tensor, rate: torch.Tensor, dividend: torch.Tensor
    ) -> torch.Tensor:
        """F / S (n,): the forward of the quantity the payoff is written on, over spot.
        Europeans: e^{(r - q) T}. Differentiable in every argument."""
        return torch.exp((rate - dividend) * expiry)

    def forward_ratio_math(self, theta: Sequence[float], expiry: float, rate: float, dividend: float) -> float:
        """:meth:`forward_ratio` of one contract without torch (engine/processes/spec.py):
        ``theta`` its parameters in :attr:`param_names` order."""
        return spec.forward_ratio(rate, dividend, expiry)

    def forward_ratio_np(self, theta: Floats, expiry: Floats, rate: Floats, dividend: Floats) -> Floats:
        """:meth:`forward_ratio` of a book without torch: theta (B, P), the rest (B,)."""
        return spec.forward_ratio_np(rate, dividend, expiry)

    def rate_parameter(self) -> int | None:
        """The index of a parameter that moves one-for-one with the rate (an Asian's
        carry r - q), or None. Where there is one, rho is taken by autograd through the
        CF as well as through the discount factor and the forward."""
        return None

    @abstractmethod
    def default_domain(self) -> ModelDomain:
        """The domain the bundled model covers."""

    @abstractmethod
    def scale(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        """Closed-form scale s(theta, T) (B,): roughly the standard deviation of X."""

    @abstractmethod
    def scale_math(self, theta: Sequence[float], expiry: float) -> float:
        """:meth:`scale` of one point without torch (engine/processes/spec.py): ``theta``
        the parameters in :attr:`param_names` order."""

    @abstractmethod
    def scale_np(self, theta: Floats, expiry: Floats) -> Floats:
        """:meth:`scale` without torch: theta (B, P), T (B,) -> (B,) float64."""

    @abstractmethod
    def simulate_x(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """theta (B, P), T (B,), normals z (B, N, normals_per_path) -> X (B, N)."""

    def simulate_weighted(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X (B, N) and each path's weight (B, N) in [0, 1], for a :attr:`defective` process."""
        raise NotImplementedError(f"process {self.name!r} is not defective: it has no path weights")

    def share_weights(self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """A :attr:`defective` process's path weights (B, N) under the share measure
        (the stock as numeraire), from the same normals: their mean is E[e^X w]."""
        raise NotImplementedError(f"process {self.name!r} is not defective: it has no path weights")

    def weighted_with_share(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A :attr:`defective` process's X, path weights and share-measure weights, each
        (B, N), from the same normals: by default :meth:`simulate_weighted` then
        :meth:`share_weights`; a process that gets all three from one simulation
        overrides it."""
        x, weight = self.simulate_weighted(theta, expiry, z)
        return x, weight, self.share_weights(theta, expiry, z)

    def canonical_params(self, theta: torch.Tensor) -> torch.Tensor:
        """Sampled parameter points as the process uses them (say, integers rounded)."""
        return theta

    def reference_put(self, theta: torch.Tensor, expiry: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor | None:
        """E[(kappa - e^X)^+] (B, J) by the process's own reference where it has no analytic
        CF (None: use COS on the analytic CF)."""
        return None

    def check_params(self, params: dict[str, float]) -> None:
        """Raise ValueError naming the parameter and its range when a value is outside
        :attr:`param_bounds` (``params`` holds every name of :attr:`param_names`)."""
        for name, (low, high) in self.param_bounds.items():
            value = params[name]
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")

    def check_spread(self, params: dict[str, float], expiry: float, spread: float) -> None:
        """Raise ValueError where the reference cannot resolve the law at this expiry
        (``spread`` is :meth:`scale`); the default accepts all."""
        return None

    def vol_parameter(self) -> tuple[int, Literal["identity", "sqrt"]]:
        """Which parameter vega differentiates by: (index, how it maps to a vol). With
        "sqrt" the parameter is a variance and vega is per 1.00 of its square root."""
        return 0, "identity"

    def companion_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A control variate: (X_c (B, N), s_c (B,)) with X_c = -s_c^2/2 + s_c Zc, where Zc
        is a standard normal built from the same normals ``z`` that drive
        :meth:`simulate_x`, so X_c is Gaussian with a known CF and correlated with X.
        None where the process has no companion."""
        return None

    def simulate_with_companion(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """X and the companion from one pass over the normals where a process can do both
        at once (a fused kernel); by default the two methods in turn."""
        return self.simulate_x(theta, expiry, z), self.companion_x(theta, expiry, z)

    def conditional_x(
        self, theta: torch.Tensor, expiry: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X's law given the path of the variance driver, where it is Gaussian: (mean,
        variance), each (B, N), from the normals ``z`` (B, N, normals_per_path) that drive
        :meth:`simulate_x`. Only where :attr:`has_conditional`."""
        raise NotImplementedError(f"process {self.name!r} has no conditional Gaussian law")

    def analytic_cf_x(self, u: torch.Tensor, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor | None:
        """E[exp(i u X)] for real u (B, K) -> complex (B, K); None where no closed form."""
        return None
