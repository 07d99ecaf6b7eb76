"""The reference pricers: closed forms for GBM, COS on the analytic CF (refined per row
where its series has not converged), COS on a Monte-Carlo CF where there is no closed
form; each with the accuracy it answers with (reference_bounds)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from spectralmc_server.engine.moments import MomentFunction, exact_moments, exact_moments_or_none
from spectralmc_server.engine.pricer import (
    DIST_MEASURES,
    MC_REFERENCE_GROUPS,
    MC_REFERENCE_PATHS,
    MC_REFERENCE_SEED,
    PRICE_MEASURES,
    REFERENCE_SPECTRUM,
    REFERENCE_WORKING_BYTES,
    SPREAD_MEASURES,
    OptionBatch,
    Pricer,
    SpectralPricer,
    mc_reference_spectrum,
)
from spectralmc_server.engine.processes.base import Process
from spectralmc_server.engine.reference import (
    MonteCarloCF,
    analytic_cf_y,
    black_scholes,
    lognormal_moments,
    lognormal_quantiles,
)
from spectralmc_server.engine.refined import RefinedReference
from spectralmc_server.engine.spectrum import SpectrumConfig


class ClosedFormGBMPricer:
    """Black-Scholes closed forms for every measure (the GBM reference)."""

    def evaluate(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        vol = batch.theta[:, 0]
        out: dict[str, torch.Tensor] = {}
        if measures & set(PRICE_MEASURES):
            out.update(
                black_scholes(batch.spot, batch.strike, batch.expiry, batch.rate, batch.dividend, vol, batch.is_call)
            )
        s = vol * torch.sqrt(batch.expiry)
        if measures & set(DIST_MEASURES):
            out.update(lognormal_moments(batch.forward, s))
        if "quantiles" in measures:
            if levels is None:
                raise ValueError("quantiles requested without quantile levels")
            out["quantiles"] = lognormal_quantiles(batch.forward, s, levels)
        return {k: v for k, v in out.items() if k in measures}


class MonteCarloReference:
    """COS on a Monte-Carlo CF in ``groups`` independent groups of paths (seeds
    ``seed + g``): the answer is the groups' mean (for the measures linear in the CF,
    price, Greeks and digital, exactly the estimate from all the paths) and its standard
    error the groups' spread over sqrt(groups)."""

    def __init__(
        self,
        process: Process,
        spectrum: SpectrumConfig,
        *,
        paths: int,
        groups: int = MC_REFERENCE_GROUPS,
        seed: int,
        moments: MomentFunction | None = None,
    ) -> None:
        if groups < 2 or paths % groups:
            raise ValueError(f"need at least 2 groups dividing the paths, got {groups} for {paths}")
        # Exact stdev, skew and kurtosis (engine/moments.py) and the mean F: answered
        # directly, not by the groups; the moments with no standard error (their bound is
        # the method's, reference_bounds), the mean with a zero one (as the groups gave it).
        self.moments = moments
        self.groups = [
            # cf_chunk=1: every point shares its group's paths, so no padding is needed
            # for batch invariance (and padding would simulate the pad rows)
            SpectralPricer(
                process,
                spectrum,
                MonteCarloCF(process, spectrum, paths=paths // groups, seed=seed + g),
                cf_chunk=1,
                working_bytes=REFERENCE_WORKING_BYTES,
            )
            for g in range(groups)
        ]

    def evaluate_with_error(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # With exact moments the mean (F) and the moments need no simulation: a request for
        # the distribution measures alone simulates nothing.
        exact = measures & (SPREAD_MEASURES | {"mean"}) if self.moments is not None else frozenset()
        rest = measures - exact
        parts = [g.evaluate(batch, rest, levels) for g in self.groups] if rest else []
        values: dict[str, torch.Tensor] = {}
        stderr: dict[str, torch.Tensor] = {}
        if exact and self.moments is not None:
            process = self.groups[0].process
            fwd = batch.spot * process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
            if "mean" in exact:  # E[S_T] = F under the pricing measure: no standard error
                values["mean"], stderr["mean"] = fwd.clone(), torch.zeros_like(fwd)
            if exact & SPREAD_MEASURES:
                mom = self.moments(batch.theta, batch.expiry)
                values["stdev"] = fwd * mom["stdev"]
                values["skew"], values["kurtosis"] = mom["skew"], mom["kurtosis"]
            values = {k: v for k, v in values.items() if k in exact}
        for k in parts[0] if parts else ():
            stack = torch.stack([p[k] for p in parts])
            values[k] = stack.mean(0)
            stderr[k] = stack.std(0) / len(parts) ** 0.5
        return values, stderr

    def evaluate(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return self.evaluate_with_error(batch, measures, levels)[0]


def reference_with_error(
    reference: Pricer, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A reference's values and, for a Monte-Carlo reference, their standard errors (a
    closed form or COS on an analytic CF has none: an empty dict)."""
    if isinstance(reference, MonteCarloReference):
        return reference.evaluate_with_error(batch, measures, levels)
    return reference.evaluate(batch, measures, levels), {}


def reference_pricer(process: Process, spectrum: SpectrumConfig | None = None) -> Pricer:
    """The reference for a process: closed forms for GBM, COS on the analytic CF where
    there is one, else COS on a Monte-Carlo CF (:class:`MonteCarloReference`)."""
    if process.name == "gbm":
        return ClosedFormGBMPricer()
    if not process.has_analytic_cf:
        spec = spectrum or mc_reference_spectrum(process.name)
        return MonteCarloReference(
            process, spec, paths=MC_REFERENCE_PATHS, seed=MC_REFERENCE_SEED, moments=exact_moments_or_none(process.name)
        )
    spec = spectrum or REFERENCE_SPECTRUM
    base = SpectralPricer(
        process,
        spec,
        lambda th, t: analytic_cf_y(process, spec, th, t),
        working_bytes=REFERENCE_WORKING_BYTES,
        moments=exact_moments(process.name),
    )
    if spectrum is not None:
        return base
    # Rows whose series has not converged at 2,048 terms get prices with 4, 16 or 64
    # times the terms (engine/refined.py; docs/method.md).
    return RefinedReference(base)


CLOSED_FORM_BOUND = 1e-12
COS_REFERENCE_BOUND = 1e-7


def reference_bounds(
    reference: Pricer,
    process: Process,
    batch: OptionBatch,
    values: Mapping[str, torch.Tensor],
    stderr: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The bound of a reference answer: three standard errors for Monte Carlo, else the
    method's accuracy per unit of the measure (``CLOSED_FORM_BOUND``, ``COS_REFERENCE_BOUND``)."""
    from spectralmc_server.engine.certificate import measure_units
    from spectralmc_server.engine.certify import MC_SE_MULTIPLE

    units = measure_units(batch, process)
    rel = CLOSED_FORM_BOUND if isinstance(reference, ClosedFormGBMPricer) else COS_REFERENCE_BOUND
    out = {}
    for m, v in values.items():
        if m in stderr:
            out[m] = MC_SE_MULTIPLE * stderr[m]
        else:
            unit = units[m] if m != "quantiles" else units[m][:, None]
            out[m] = (rel * unit).expand_as(v).clone()
    return out
