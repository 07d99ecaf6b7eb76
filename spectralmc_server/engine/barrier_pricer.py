"""Barrier contracts priced by their reference: the closed form where there is one, else
Monte Carlo with its standard error.

- GBM with continuous monitoring: the Reiner-Rubinstein closed form
  (engine/barrier_analytic.py), its Greeks by automatic differentiation of that formula
  (exact to rounding), the survival probability by the reflection principle.
- GBM with n monitoring dates, and Heston: Monte Carlo (engine/barrier_mc.py; Heston
  with the variance frozen over each of its 128 steps under continuous monitoring, a bias
  bench/barrier_bias.py measures) in ``MC_GROUPS`` independent groups of paths. Each
  group prices the contract and, for the Greeks, the contract with one input bumped on
  the same normals (common random numbers; central differences); a measure's answer is
  the groups' mean and its standard error their spread over sqrt(groups), so the Greeks
  carry a standard error as the price does.

Measures: price, delta and gamma by spot (the barrier stays where it is, so a spot move
moves the barrier distance too), vega (per 1.00 of vol: GBM's vol, Heston's sqrt(v0)),
theta (-dV/dT per year), rho (per 1.00 of rate), digital (a cash-or-nothing paying 1 on
the same side of the strike, on the same barrier: -phi dV/dK) and survival (the
probability the barrier is not touched by expiry, the defective law's total mass).
Knock-ins come from in-out parity against the same vanilla, so in + out = vanilla
(+ the rebate's discounted value) exactly, in every group.

Every row's answer depends on that row only (the Monte Carlo's normals are the same
stream for every row of a batch), so batching never changes a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from spectralmc_server.engine.barrier_analytic import barrier_price, survival_probability
from spectralmc_server.engine.barrier_mc import BarrierBatch, BarrierType, mc_barrier, vanilla_price
from spectralmc_server.engine.processes.barrier_paths import Monitoring
from spectralmc_server.engine.processes.base import Process

BARRIER_MEASURES = ("price", "delta", "gamma", "vega", "theta", "rho", "digital", "survival")
MC_GROUPS = 8  # independent groups of paths: the standard error of every measure
MC_PATHS = 1 << 16  # paths in all, MC_PATHS // MC_GROUPS a group
MC_SEED = 20_260_501
MC_SE_MULTIPLE = 3.0  # a Monte-Carlo answer's bound: this many standard errors
CLOSED_FORM_BOUND = 1e-10  # a closed-form answer's bound, per unit of the measure
# Central-difference steps of the Monte-Carlo Greeks (relative for spot and strike).
SPOT_STEP = 0.01
VOL_STEP = 0.01
EXPIRY_STEP = 1.0 / 365.0
RATE_STEP = 1e-3
STRIKE_STEP = 0.01


@dataclass(frozen=True)
class BarrierAnswer:
    """Values and bounds per measure, (B,) each; ``method`` per row: ``analytic`` (the
    closed form) or ``reference`` (Monte Carlo)."""

    values: dict[str, torch.Tensor]
    bounds: dict[str, torch.Tensor]
    method: list[str]


def price_barriers(process: Process, batch: BarrierBatch, measures: Sequence[str]) -> BarrierAnswer:
    """``measures`` (a subset of BARRIER_MEASURES) of every row of ``batch``."""
    unknown = sorted(set(measures) - set(BARRIER_MEASURES))
    if unknown:
        raise ValueError(f"barrier contracts are not priced for {', '.join(unknown)}")
    n = len(batch)
    closed = torch.tensor(
        [process.name == "gbm" and m == "continuous" for m in batch.monitoring], dtype=torch.bool
    ).reshape(n)
    values = {m: torch.zeros(n, dtype=torch.float64) for m in measures}
    bounds = {m: torch.zeros(n, dtype=torch.float64) for m in measures}
    for rows, pricer in ((closed, _closed_form), (~closed, _monte_carlo)):
        index = torch.nonzero(rows).flatten()
        if not len(index):
            continue
        part = batch.take(index)
        got, err = pricer(process, part, measures)
        for m in measures:
            values[m][index] = got[m]
            bounds[m][index] = err[m]
    method = ["analytic" if bool(c) else "reference" for c in closed]
    return BarrierAnswer(values, bounds, method)


def _units(batch: BarrierBatch, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The size of each measure for a contract (what a relative bound is a share of)."""
    s, k = batch.spot, batch.strike
    t = batch.expiry
    big = torch.maximum(s, k)
    one = torch.ones_like(s)
    return {
        "price": big,
        "delta": one,
        "gamma": one / (s * scale.clamp(min=1e-6)),
        "vega": big * torch.sqrt(t),
        "theta": big / t,
        "rho": big * t,
        "digital": one,
        "survival": one,
    }


# -- the closed form (GBM, continuous monitoring) ---------------------------------------------


def _closed_form(
    process: Process, batch: BarrierBatch, measures: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    wanted = set(measures)
    greeks = wanted & {"delta", "gamma", "vega", "theta", "rho", "digital"}
    with torch.enable_grad():
        spot = batch.spot.clone().requires_grad_(bool(greeks))
        strike = batch.strike.clone().requires_grad_("digital" in greeks)
        expiry = batch.expiry.clone().requires_grad_("theta" in greeks)
        rate = batch.rate.clone().requires_grad_("rho" in greeks)
        vol = batch.theta[:, 0].clone().requires_grad_("vega" in greeks)
        price = barrier_price(
            list(batch.barrier_type),
            batch.is_call,
            spot,
            strike,
            batch.level,
            expiry,
            rate,
            batch.dividend,
            vol,
            batch.rebate,
        )["price"]
        out: dict[str, torch.Tensor] = {"price": price.detach()}
        if greeks:
            inputs = [x for x in (spot, strike, expiry, rate, vol) if x.requires_grad]
            grads = torch.autograd.grad(price.sum(), inputs, create_graph="gamma" in greeks)
            by = dict(zip([id(x) for x in inputs], grads, strict=True))
            delta = by[id(spot)]
            out["delta"] = delta.detach()
            if "gamma" in greeks:
                (gamma,) = torch.autograd.grad(delta.sum(), [spot])
                out["gamma"] = gamma.detach()
            if "vega" in greeks:
                out["vega"] = by[id(vol)].detach()
            if "theta" in greeks:
                out["theta"] = -by[id(expiry)].detach()
            if "rho" in greeks:
                out["rho"] = by[id(rate)].detach()
            if "digital" in greeks:
                phi = torch.where(batch.is_call, 1.0, -1.0).to(price)
                out["digital"] = -phi * by[id(strike)].detach()
    if "survival" in wanted:
        down = ~batch.is_up
        out["survival"] = survival_probability(
            down, batch.spot, batch.level, batch.expiry, batch.rate, batch.dividend, batch.theta[:, 0]
        )
    scale = batch.theta[:, 0] * torch.sqrt(batch.expiry)
    units = _units(batch, scale)
    values = {m: out[m] for m in measures}
    return values, {m: CLOSED_FORM_BOUND * units[m] for m in measures}


# -- Monte Carlo (GBM with monitoring dates, Heston) ------------------------------------------


def _vol_of(process: Process, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the vol that vega is per unit of, (B,); the parameter table with it replaced):
    GBM's vol, Heston's sqrt(v0)."""
    if process.name == "gbm":
        return theta[:, 0], theta
    return torch.sqrt(theta[:, 0]), theta


def _with_vol(process: Process, theta: torch.Tensor, vol: torch.Tensor) -> torch.Tensor:
    out = theta.clone()
    out[:, 0] = vol if process.name == "gbm" else vol * vol
    return out


def _bumps(process: Process, batch: BarrierBatch, wanted: set[str]) -> dict[str, BarrierBatch]:
    """The bumped contracts each Greek needs (central differences)."""
    b: dict[str, BarrierBatch] = {}
    if wanted & {"delta", "gamma"}:
        h = SPOT_STEP * batch.spot
        b["spot+"] = replace(batch, spot=batch.spot + h)
        b["spot-"] = replace(batch, spot=batch.spot - h)
    if "vega" in wanted:
        vol, theta = _vol_of(process, batch.theta)
        b["vol+"] = replace(batch, theta=_with_vol(process, theta, vol + VOL_STEP))
        b["vol-"] = replace(batch, theta=_with_vol(process, theta, (vol - VOL_STEP).clamp(min=0.5 * vol)))
    if "theta" in wanted:
        dt = torch.minimum(torch.full_like(batch.expiry, EXPIRY_STEP), 0.5 * batch.expiry)
        b["T+"] = replace(batch, expiry=batch.expiry + dt)
        b["T-"] = replace(batch, expiry=batch.expiry - dt)
    if "rho" in wanted:
        b["r+"] = replace(batch, rate=batch.rate + RATE_STEP)
        b["r-"] = replace(batch, rate=batch.rate - RATE_STEP)
    if "digital" in wanted:
        h = STRIKE_STEP * batch.strike
        b["K+"] = replace(batch, strike=batch.strike + h)
        b["K-"] = replace(batch, strike=batch.strike - h)
    return b


def _concat(batches: Sequence[BarrierBatch]) -> BarrierBatch:
    """The batches' rows one after the other."""

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(b, name) for b in batches])

    return BarrierBatch(
        spot=cat("spot"),
        strike=cat("strike"),
        level=cat("level"),
        expiry=cat("expiry"),
        rate=cat("rate"),
        dividend=cat("dividend"),
        rebate=cat("rebate"),
        is_call=cat("is_call"),
        theta=cat("theta"),
        barrier_type=tuple(t for b in batches for t in b.barrier_type),
        monitoring=tuple(m for b in batches for m in b.monitoring),
    )


def _measures(
    process: Process,
    batch: BarrierBatch,
    price: Mapping[str, torch.Tensor],
    survival: torch.Tensor,
    measures: Sequence[str],
) -> dict[str, torch.Tensor]:
    """One group's estimate of every measure from its prices of the contracts and of
    their bumps (``price["base"]``, ``price["spot+"]``, ...: the same normals for all)."""
    base = price["base"]
    out: dict[str, torch.Tensor] = {"price": base, "survival": survival}
    if "spot+" in price:
        h = SPOT_STEP * batch.spot
        out["delta"] = (price["spot+"] - price["spot-"]) / (2.0 * h)
        out["gamma"] = (price["spot+"] - 2.0 * base + price["spot-"]) / (h * h)
    if "vol+" in price:
        vol, _ = _vol_of(process, batch.theta)
        lo = (vol - VOL_STEP).clamp(min=0.5 * vol)
        out["vega"] = (price["vol+"] - price["vol-"]) / (vol + VOL_STEP - lo)
    if "T+" in price:
        dt = torch.minimum(torch.full_like(batch.expiry, EXPIRY_STEP), 0.5 * batch.expiry)
        out["theta"] = -(price["T+"] - price["T-"]) / (2.0 * dt)
    if "r+" in price:
        out["rho"] = (price["r+"] - price["r-"]) / (2.0 * RATE_STEP)
    if "K+" in price:
        phi = torch.where(batch.is_call, 1.0, -1.0).to(base)
        out["digital"] = -phi * (price["K+"] - price["K-"]) / (2.0 * STRIKE_STEP * batch.strike)
    return {m: out[m] for m in measures}


def _monte_carlo(
    process: Process, batch: BarrierBatch, measures: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each group prices the contracts and all their bumps in one call (one set of
    normals, one vanilla for the control variate, computed once for every group)."""
    variants = {"base": batch, **_bumps(process, batch, set(measures))}
    stacked = _concat(list(variants.values()))
    vanilla = vanilla_price(process, stacked)
    n = len(batch)
    groups = []
    for g in range(MC_GROUPS):
        got = mc_barrier(process, stacked, MC_PATHS // MC_GROUPS, seed=MC_SEED + g, vanilla=vanilla)
        price = {k: got.price[i * n : (i + 1) * n] for i, k in enumerate(variants)}
        groups.append(_measures(process, batch, price, got.survival[:n], measures))
    values: dict[str, torch.Tensor] = {}
    bounds: dict[str, torch.Tensor] = {}
    for m in measures:
        # sums over the groups one by one, elementwise: a reduction over a (groups, B)
        # stack may round by B, and a row's answer must not depend on its batch
        mean = groups[0][m].clone()
        for est in groups[1:]:
            mean += est[m]
        mean /= MC_GROUPS
        var = torch.zeros_like(mean)
        for est in groups:
            var += (est[m] - mean) ** 2
        values[m] = mean
        bounds[m] = MC_SE_MULTIPLE * torch.sqrt(var / (MC_GROUPS - 1)) / math.sqrt(MC_GROUPS)
    return values, bounds


def barrier_batch(
    *,
    spot: torch.Tensor,
    strike: torch.Tensor,
    expiry: torch.Tensor,
    rate: torch.Tensor,
    dividend: torch.Tensor,
    is_call: torch.Tensor,
    theta: torch.Tensor,
    level: Sequence[float],
    rebate: Sequence[float],
    barrier_type: Sequence[BarrierType],
    monitoring: Sequence[Monitoring],
) -> BarrierBatch:
    """A BarrierBatch from the columns of a book."""
    return BarrierBatch(
        spot=spot,
        strike=strike,
        level=torch.tensor(list(level), dtype=torch.float64).reshape(len(spot)),
        expiry=expiry,
        rate=rate,
        dividend=dividend,
        rebate=torch.tensor(list(rebate), dtype=torch.float64).reshape(len(spot)),
        is_call=is_call,
        theta=theta,
        barrier_type=tuple(barrier_type),
        monitoring=tuple(monitoring),
    )
