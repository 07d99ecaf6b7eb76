"""A served model: a checkpoint's network behind :class:`ModelPricer`, which answers
only where the model was validated and certified, within the model-free bounds and its
tolerances, and sends everything else to the reference."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.engine.cvnn import CFModel, NetworkConfig
from spectralmc_server.engine.device import MemoryBudget
from spectralmc_server.engine.pricer import (
    PRICE_MEASURES,
    SPREAD_MEASURES,
    OptionBatch,
    Pricer,
    SpectralPricer,
    clamp_to_bounds,
    price_bounds,
)
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.base import ModelDomain, Process
from spectralmc_server.engine.processes.spec import MOMENT_MAX_SPREAD
from spectralmc_server.engine.reference_pricers import (
    MonteCarloReference,
    reference_bounds,
    reference_pricer,
    reference_with_error,
)
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.engine.view import ModelView


@dataclass(frozen=True)
class ServedModel:
    """A loaded model version: its identity and its pricer."""

    name: str
    process: Process
    domain: ModelDomain
    content_hash: str
    version: int | None
    manifest: dict[str, Any]
    pricer: ModelPricer
    network: torch.nn.Module | None = None  # the learned network (for measuring its memory)
    certificate: dict[str, Any] | None = None  # engine/certify.py's measured error map of this version

    @cached_property
    def view(self) -> ModelView:
        """This version as plain data (engine/view.py): what the serving side reads."""
        return ModelView(
            name=self.name,
            process=self.process.name,
            version=self.version,
            content_hash=self.content_hash,
            ranges=tuple((r.name, float(r.low), float(r.high)) for r in self.domain.ranges),
            moneyness=self.domain.certified_moneyness,
            qualified=self.pricer.qualified,
            domain=self.domain.model_dump(mode="json"),
            certificate=self.certificate,
        )


def load_cf_model(ckpt: Checkpoint) -> CFModel:
    """The checkpoint's served (EMA) network, frozen, in eval mode, on the CPU."""
    desc = ckpt.manifest["model"]
    model = CFModel(
        get_process(desc["process"]),
        ModelDomain.model_validate(desc["domain"]),
        SpectrumConfig.model_validate(desc["spectrum"]),
        NetworkConfig.model_validate(desc["network"]),
    )
    model.load_state_dict(ckpt.model)
    model.requires_grad_(False)
    model.eval()
    return model


def load_served_model(
    ckpt: Checkpoint,
    *,
    name: str | None = None,
    version: int | None = None,
    budget: MemoryBudget | None = None,
    device: torch.device | None = None,
    max_rows: int = 16384,
    working_bytes: int | None = None,
    tolerance: Mapping[str, float] | None = None,
    require_certificate: bool = True,
) -> ServedModel:
    """Build the served (EMA) network of a checkpoint and wrap it in a pricer that
    bounds every learned answer by the checkpoint's certificate (none: no learned
    answer is served; see :class:`ModelPricer`)."""
    model = load_cf_model(ckpt)
    process, domain, spectrum = model.process, model.domain, model.spectrum
    if device is not None:
        model = model.to(device)
    label = name or process.name
    learned = SpectralPricer(
        process,
        spectrum,
        model,
        budget=budget,
        max_rows=max_rows,
        working_bytes=working_bytes,
        holder=f"inference ({label} {ckpt.content_hash[:19]})",
    )
    return ServedModel(
        name=label,
        process=process,
        domain=domain,
        content_hash=ckpt.content_hash,
        version=version,
        manifest=ckpt.manifest,
        pricer=ModelPricer(
            learned,
            domain,
            reference_pricer(process),
            certificate=ckpt.certificate,
            tolerance=tolerance,
            require_certificate=require_certificate,
        ),
        network=model,
        certificate=ckpt.certificate,
    )


@dataclass(frozen=True)
class Evaluation:
    """Measures per contract, which engine answered each (True: the learned model), each
    answer's error bound in the measure's units (same shapes as ``values``), and the
    learned answers withheld because their bound passed the measure's tolerance where no
    reference could answer instead (their value is NaN, served as null with a warning;
    ``bounds`` keeps the bound that was too wide)."""

    values: dict[str, torch.Tensor]
    learned: torch.Tensor  # (n,) bool
    bounds: dict[str, torch.Tensor] = field(default_factory=dict)
    withheld: dict[str, torch.Tensor] = field(default_factory=dict)  # measure -> (n,) bool


# A closed form's bound: float64 rounding. COS on an analytic CF with the reference's
# 2,048 terms on [-64 s, 64 s]: within 2.5e-8 of the forward at the domain's heaviest
# Heston tail and ~1e-12 elsewhere (REFERENCE_SPECTRUM): 1e-7 per unit of the measure.


class ModelPricer:
    """A learned model's pricer, answering only where the model was validated and
    certified, and never past a measure's tolerance.

    - Inside the domain's box of parameters and expiries and, for strike-dependent
      measures, inside its certified K/F range, the network answers; elsewhere, and
      wherever a learned price breaks a model-free bound (a call below its discounted
      intrinsic value or above the discounted forward, and the like for puts and
      digitals) or is not finite, the reference answers: never the network.
    - Every answer carries an error bound: a learned one from the model's certificate
      (engine/certify.py), a reference one from its method (:func:`reference_bounds`).
    - A learned measure whose bound passes its tolerance (``tolerance``: per measure,
      absolute per unit of the measure's scale, or relative to the value for
      ``RELATIVE_MEASURES``) is answered by the reference for the whole contract where
      the reference is analytic. Where the reference is a simulation, a price past its
      tolerance also sends the contract to it (a price is never withheld; the
      simulation's cost is bounded per request by :meth:`simulated_rows`, checked before
      pricing), and any other such measure is withheld: NaN here, null with a warning in
      a response.
    - Without a certificate nothing learned is served (``require_certificate=False``,
      for engine tests and benchmarks of raw networks only, serves it with NaN bounds).
    """

    def __init__(
        self,
        learned: SpectralPricer,
        domain: ModelDomain,
        reference: Pricer,
        *,
        certificate: Mapping[str, Any] | None = None,
        tolerance: Mapping[str, float] | None = None,
        require_certificate: bool = True,
    ) -> None:
        from spectralmc_server.engine.certificate import DEFAULT_TOLERANCE, BoundMap

        self.learned = learned
        self.domain = domain
        self.reference = reference
        self.certificate = certificate
        self.bound_map = None if certificate is None else BoundMap(certificate, learned.process, domain)
        self.tolerance = {**DEFAULT_TOLERANCE, **(tolerance or {})}
        self.require_certificate = require_certificate
        self.simulated_reference = isinstance(reference, MonteCarloReference)

    @property
    def qualified(self) -> bool:
        """May the network answer at all (it has a certificate, or none is required)?"""
        return self.bound_map is not None or not self.require_certificate

    def servable(self, batch: OptionBatch, measures: frozenset[str]) -> torch.Tensor:
        """(n,) bool: where the learned model may answer these measures."""
        if not self.qualified:
            return torch.zeros(len(batch), dtype=torch.bool)
        inside = self.domain.contains(batch.theta, batch.expiry)
        if measures & SPREAD_MEASURES:  # the quadrature's tails (docs/method.md)
            inside &= self.learned.process.scale(batch.theta, batch.expiry) <= MOMENT_MAX_SPREAD
        if measures & set(PRICE_MEASURES):
            low, high = self.domain.certified_moneyness
            fwd = batch.spot * self.learned.process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
            kappa = batch.strike / fwd
            slack = 1e-12  # K/F from a strike and a forward carries rounding: 0.7 + 12 * 0.05 > 1.3
            inside &= (kappa >= low * (1 - slack)) & (kappa <= high * (1 + slack))
        return inside

    def simulated_rows(self, batch: OptionBatch, measures: frozenset[str]) -> torch.Tensor:
        """(n,) bool: the rows :meth:`evaluate` would send to a simulated reference, known
        before pricing (a price's bound depends on the inputs only): outside
        :meth:`servable`, or a price past its tolerance. All False for an analytic
        reference."""
        if not self.simulated_reference:
            return torch.zeros(len(batch), dtype=torch.bool)
        inside = self.servable(batch, measures)
        if self.require_certificate and self.bound_map is not None and measures & set(PRICE_MEASURES):
            idx = torch.nonzero(inside).flatten()
            if len(idx):
                sub = batch.select(idx)
                bounds = self.bound_map.bounds(sub, frozenset({"price"}), None)
                zero = torch.zeros(len(sub), dtype=torch.float64)
                wide = self.too_wide(sub, {"price": zero}, {"price": bounds["price"]})["price"]
                inside[idx[wide]] = False
        return ~inside

    def too_wide(
        self, batch: OptionBatch, values: Mapping[str, torch.Tensor], bounds: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per measure, (n,) bool: the bound is unknown (NaN) or past the tolerance."""
        from spectralmc_server.engine.certificate import RELATIVE_MEASURES, measure_units

        units = measure_units(batch, self.learned.process)
        out = {}
        for m, b in bounds.items():
            tol = self.tolerance.get(m)
            if tol is None:
                continue
            v = values[m]
            limit = tol * v.abs() if m in RELATIVE_MEASURES else tol * (units[m][:, None] if v.dim() == 2 else units[m])
            bad = ~(b <= limit)  # NaN bounds are never within tolerance
            out[m] = bad.reshape(len(batch), -1).any(1)
        return out

    def evaluate(self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None) -> Evaluation:
        process = self.learned.process
        n = len(batch)
        inside = self.servable(batch, measures)
        idx_in = torch.nonzero(inside).flatten()
        parts: list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        withheld: dict[str, torch.Tensor] = {}
        if len(idx_in):
            sub = batch if len(idx_in) == n else batch.select(idx_in)
            ok, learned_values, learned_bounds, learned_withheld = self._learned(sub, measures, levels)
            if not bool(ok.all()):
                inside[idx_in[~ok]] = False
                learned_values = {k: v[ok] for k, v in learned_values.items()}
                learned_bounds = {k: v[ok] for k, v in learned_bounds.items()}
                learned_withheld = {k: v[ok] for k, v in learned_withheld.items()}
                idx_in = idx_in[ok]
            if len(idx_in):
                parts.append((idx_in, learned_values, learned_bounds))
            for k, bad in learned_withheld.items():
                mask = torch.zeros(n, dtype=torch.bool)
                mask[idx_in[bad]] = True
                withheld[k] = mask
        idx_out = torch.nonzero(~inside).flatten()
        if len(idx_out):
            out_batch = batch.select(idx_out)
            ref_values, stderr = reference_with_error(self.reference, out_batch, measures, levels)
            ref_bounds = reference_bounds(self.reference, process, out_batch, ref_values, stderr)
            parts.append((idx_out, ref_values, ref_bounds))
        values, bounds = _assemble(parts, n, measures)
        clamp_to_bounds(values, batch, process)
        return Evaluation(values, inside, bounds, withheld)

    def _learned(
        self, sub: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The network's answers on ``sub`` (all servable), with: which rows it may keep
        (finite, inside the model-free bounds, within tolerance or withheld), their
        bounds, and the measures withheld per row (NaN values)."""
        pricing = measures & set(PRICE_MEASURES)
        asked = measures | {"price"} if pricing else measures  # the price is checked against its bounds
        values = self.learned.evaluate(sub, frozenset(asked), levels)
        ok = torch.ones(len(sub), dtype=torch.bool)
        for v in values.values():  # a non-finite number is never served
            ok &= torch.isfinite(v).reshape(len(sub), -1).all(1)
        if pricing:
            ok &= self._within_price_bounds(sub, values)
        values = {k: v for k, v in values.items() if k in measures}
        if self.bound_map is not None:
            bounds = self.bound_map.bounds(sub, measures, levels)
        else:  # an uncertified network, served only where no certificate is required
            bounds = {k: torch.full_like(v, float("nan")) for k, v in values.items()}
        withheld: dict[str, torch.Tensor] = {}
        if not self.require_certificate:
            return ok, values, bounds, withheld
        wide = self.too_wide(sub, values, bounds)
        if not self.simulated_reference:
            for bad in wide.values():
                ok &= ~bad
            return ok, values, bounds, withheld
        if "price" in wide:  # a price is never withheld: the reference answers it
            ok &= ~wide.pop("price")
        for m, wide_m in wide.items():
            bad = wide_m & ok
            if bool(bad.any()):
                withheld[m] = bad
                values[m] = values[m].clone()
                values[m][bad] = float("nan")
        return ok, values, bounds, withheld

    def _within_price_bounds(self, sub: OptionBatch, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(n,) bool: the learned price (and digital) inside the model-free bounds."""
        low, high, disc = price_bounds(sub, self.learned.process)
        price = values["price"]
        slack = 1e-12 * high  # rounding, not arbitrage
        ok = (price >= low - slack) & (price <= high + slack)
        if "digital" in values:
            digital = values["digital"]
            ok &= (digital >= -slack) & (digital <= disc + slack)
        return ok


def _assemble(
    parts: list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]], n: int, measures: frozenset[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Values and bounds of ``n`` rows from parts (rows, values, bounds)."""
    if len(parts) == 1 and len(parts[0][0]) == n:
        return (
            {k: v for k, v in parts[0][1].items() if k in measures},
            {k: v for k, v in parts[0][2].items() if k in measures},
        )
    values: dict[str, torch.Tensor] = {}
    bounds: dict[str, torch.Tensor] = {}
    for idx, part, part_bounds in parts:
        for target, source in ((values, part), (bounds, part_bounds)):
            for k, v in source.items():
                if k not in measures:
                    continue
                if k not in target:
                    target[k] = torch.empty((n, *v.shape[1:]), dtype=torch.float64)
                target[k][idx] = v
    return values, bounds
