"""Batched inference: explicit contracts -> measures.

One characteristic-function evaluation per distinct (theta, T) serves every strike,
spot, rate and dividend that shares it. Delta, gamma and rho are analytic through the
forward F = S e^{(r-q)T}; vega and theta come from forward-mode autograd through the CF
(the network, or an analytic CF), then reverse mode through the COS sums. Contracts
outside the model's domain are answered by the reference pricer and flagged, never
extrapolated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import torch

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.engine.cos import CosExpansion, cos_coefficients
from spectralmc_server.engine.cvnn import CFModel, NetworkConfig
from spectralmc_server.engine.device import MemoryBudget
from spectralmc_server.engine.moments import MomentFunction, exact_moments
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.base import ModelDomain, Process
from spectralmc_server.engine.processes.spec import MOMENT_MAX_SPREAD as MOMENT_MAX_SPREAD  # noqa: PLC0414
from spectralmc_server.engine.reference import (
    MonteCarloCF,
    analytic_cf_y,
    black_scholes,
    lognormal_moments,
    lognormal_quantiles,
)
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.engine.view import ModelView

PRICE_MEASURES = ("price", "delta", "gamma", "vega", "theta", "rho", "digital")
DIST_MEASURES = ("mean", "stdev", "skew", "kurtosis")
MEASURES = (*PRICE_MEASURES, *DIST_MEASURES, "quantiles")
# A learned model's stdev, skew and kurtosis come from quadrature against its COS
# density, whose tails it under-weights as the spread s grows (docs/method.md): it
# answers them up to MOMENT_MAX_SPREAD (engine/processes/spec.py, torch-free for
# admission); beyond, the reference does, from exact moments (engine/moments.py).
SPREAD_MEASURES = frozenset({"stdev", "skew", "kurtosis"})

CFFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CF_CHUNK = 64  # CF evaluations take a multiple of this many rows: answers are batch-invariant
# Y = X / s on [-64, 64] with 2,048 terms. Heston's left tail can be very heavy (close
# to a power law in S_T when xi is large against a small variance level): at the domain's
# corner v0 = theta = 0.01, kappa = 0.5, xi = 1, rho = -0.9, T = 3, puts are 0.014 off
# QuantLib's AnalyticHestonEngine on [-24, 24] and 2.5e-4 off on [-64, 64] (spot 100,
# i.e. 0.025 bp); at ordinary points the two agree to 1e-12.
REFERENCE_SPECTRUM = SpectrumConfig(n_freq=2048, half_width=64.0, n_bins=4096)
REFERENCE_WORKING_BYTES = 256 * 2**20  # chunk the reference's large (rows, K) temporaries
# Processes with no analytic CF (the arithmetic Asian): the CF by simulation, 2^16
# antithetic paths shared by every point, with the companion as a control variate.
MC_REFERENCE_SPECTRUM = SpectrumConfig(n_freq=128, half_width=12.0, n_bins=4096)
MC_REFERENCE_PATHS = 1 << 16
MC_REFERENCE_SEED = 20261127
MC_REFERENCE_GROUPS = 8  # independent groups of paths: the reference's standard error
CF_MAX_BLOCK = 4096  # rows per CF evaluation at most (a multiple of CF_CHUNK)
"""(theta (B, P), T (B,)) float64 -> phi_Y complex128 (B, K) on the spectrum's grid."""


@dataclass(frozen=True)
class OptionBatch:
    """European options with explicit market inputs; every field (n,) float64 but
    ``is_call`` (bool) and ``theta`` (n, P), the process parameters."""

    spot: torch.Tensor
    strike: torch.Tensor
    expiry: torch.Tensor
    rate: torch.Tensor
    dividend: torch.Tensor
    is_call: torch.Tensor
    theta: torch.Tensor

    def __len__(self) -> int:
        return int(self.spot.shape[0])

    def select(self, index: torch.Tensor) -> OptionBatch:
        return OptionBatch(
            self.spot[index],
            self.strike[index],
            self.expiry[index],
            self.rate[index],
            self.dividend[index],
            self.is_call[index],
            self.theta[index],
        )

    @property
    def forward(self) -> torch.Tensor:
        return self.spot * torch.exp((self.rate - self.dividend) * self.expiry)


class Pricer(Protocol):
    def evaluate(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Each requested measure as (n,) float64; ``quantiles`` as (n, Q)."""
        ...


def bytes_per_row(spectrum: SpectrumConfig, n_levels: int) -> int:
    # Upper estimate of the float64 working set per contract: ~32 (n, K) temporaries in
    # the COS sums and tangents, plus ~8 (n, Q, K) ones in quantile refinement.
    return 8 * spectrum.n_freq * (32 + 8 * n_levels)


def group_rows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of ``keys`` (n, d) and each row's group, like
    ``torch.unique(keys, dim=0, return_inverse=True)`` but by d stable sorts (a
    lexicographic order), which is far faster than torch's row-wise unique."""
    n = keys.shape[0]
    order = torch.arange(n, device=keys.device)
    for col in range(keys.shape[1] - 1, -1, -1):
        order = order[torch.sort(keys[order, col], stable=True).indices]
    ordered = keys[order]
    first = torch.ones(n, dtype=torch.bool, device=keys.device)
    first[1:] = (ordered[1:] != ordered[:-1]).any(1)
    inverse = torch.empty(n, dtype=torch.long, device=keys.device)
    inverse[order] = torch.cumsum(first.long(), 0) - 1
    return ordered[first], inverse


class SpectralPricer:
    """Prices from a CF on the spectrum's grid with the COS method."""

    def __init__(
        self,
        process: Process,
        spectrum: SpectrumConfig,
        cf: CFFunction,
        *,
        budget: MemoryBudget | None = None,
        max_rows: int = 16384,
        max_levels: int = 64,
        holder: str = "spectral pricer",
        cf_chunk: int = CF_CHUNK,
        working_bytes: int | None = None,
        moments: MomentFunction | None = None,
    ) -> None:
        self.process = process
        self.spectrum = spectrum
        self.raw_cf = cf
        # The reference's exact stdev, skew and kurtosis of R (engine/moments.py), set only
        # by reference_pricer; None (a learned CF): quadrature against the COS density.
        self.moments = moments
        self.cf_chunk = cf_chunk
        self.row_cap = max_rows
        per_row = bytes_per_row(spectrum, max_levels)
        if budget is not None:
            max_rows = budget.reserve_rows(holder, per_row, max_rows)
            working_bytes = max_rows * per_row
        self.max_rows = max_rows
        self.max_levels = max_levels
        # The working set a chunk may use: a chunk holds as many rows as fit for the
        # quantile levels actually asked for (price-only chunks are ~17x larger).
        self.working_bytes = working_bytes

    def rows_per_chunk(self, n_levels: int) -> int:
        if self.working_bytes is None:
            return self.max_rows
        return max(1, min(self.row_cap, self.working_bytes // bytes_per_row(self.spectrum, n_levels)))

    def evaluate(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if levels is not None and levels.numel() > self.max_levels:
            raise ValueError(f"at most {self.max_levels} quantile levels, got {levels.numel()}")
        n = len(batch)
        rows = self.rows_per_chunk(levels.numel() if levels is not None and "quantiles" in measures else 0)
        if n <= rows:
            return self._evaluate(batch, measures, levels)
        parts = [
            self._evaluate(batch.select(torch.arange(i, min(i + rows, n))), measures, levels) for i in range(0, n, rows)
        ]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def cf(self, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        """The CF at U points, evaluated in blocks of at most ``CF_MAX_BLOCK`` rows whose
        row count is always a multiple of ``cf_chunk`` (the last block padded with copies
        of its first row).

        A float32 matrix product's rounding depends on the batch shape: BLAS takes other
        kernels for a handful of rows than for many (measured: one or two rows round
        differently from seven or more). With every block a multiple of 64 rows a point's
        answer depends on nothing but the point, so the same request gives the same
        bytes however the server batches it (tests/engine/test_pricer.py checks shapes
        from 1 to 3,000 rows).
        """
        n, c = theta.shape[0], self.cf_chunk
        if n == 0:
            return self.raw_cf(theta, expiry)
        parts = []
        for i in range(0, n, CF_MAX_BLOCK):
            th, t = theta[i : i + CF_MAX_BLOCK], expiry[i : i + CF_MAX_BLOCK]
            short = (-th.shape[0]) % c
            if short:
                th = torch.cat([th, th[:1].expand(short, -1)])  # (m, P), m a multiple of c
                t = torch.cat([t, t[:1].expand(short)])  # (m,)
            parts.append(self.raw_cf(th, t)[: th.shape[0] - short])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _coef_with_tangents(
        self, theta: torch.Tensor, expiry: torch.Tensor, directions: frozenset[int], want_expiry: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor | None]:
        """COS coefficients (U, K) and their derivatives along the parameters in
        ``directions`` (indices) and along T.

        Rows are independent, so one forward-mode pass per input direction gives every
        row's derivative; the coefficients are linear in the CF, so they map the same way.
        """
        with torch.inference_mode(not (directions or want_expiry)):
            coef = cos_coefficients(self.cf(theta, expiry), self.spectrum)
        d_theta: list[torch.Tensor | None] = []
        for j in range(theta.shape[1]):
            if j not in directions:  # vega needs the vol parameter's direction, rho the carry's
                d_theta.append(None)
                continue
            tangent = torch.zeros_like(theta)
            tangent[:, j] = 1.0
            d_phi = torch.func.jvp(lambda th: self.cf(th, expiry), (theta,), (tangent,))[1]
            d_theta.append(cos_coefficients(d_phi, self.spectrum))
        d_expiry = None
        if want_expiry:
            d_phi = torch.func.jvp(lambda t: self.cf(theta, t), (expiry,), (torch.ones_like(expiry),))[1]
            d_expiry = cos_coefficients(d_phi, self.spectrum)
        return coef.detach(), d_theta, d_expiry

    def _evaluate(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        uniq, inv = group_rows(torch.cat([batch.theta, batch.expiry[:, None]], 1))  # (U, P+1), (n,)
        th_u, t_u = uniq[:, :-1].contiguous(), uniq[:, -1].contiguous()
        want_vega, want_theta = "vega" in measures, "theta" in measures
        # A parameter that moves with the rate (an Asian's carry): rho by autograd.
        rate_index = self.process.rate_parameter()
        want_rate = "rho" in measures and rate_index is not None
        directions = {self.process.vol_parameter()[0]} if want_vega else set()
        if want_rate and rate_index is not None:
            directions.add(rate_index)
        coef_u, d_th, d_t = self._coef_with_tangents(th_u, t_u, frozenset(directions), want_theta)
        out: dict[str, torch.Tensor] = {}
        if measures & set(PRICE_MEASURES):
            out.update(self._price_measures(batch, measures, coef_u, d_th, d_t, th_u, t_u, inv))
        if measures & {*DIST_MEASURES, "quantiles"}:
            fwd = batch.spot * self.process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
            out.update(self._distribution(measures, levels, coef_u, th_u, t_u, inv, fwd.detach()))
        return {k: v for k, v in out.items() if k in measures}

    def _price_measures(
        self,
        batch: OptionBatch,
        measures: frozenset[str],
        coef_u: torch.Tensor,
        d_th: list[torch.Tensor | None],
        d_t: torch.Tensor | None,
        th_u: torch.Tensor,
        t_u: torch.Tensor,
        inv: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Price, the Greeks and the digital: COS puts, with vega, theta and (where a
        parameter moves with the rate) rho by autograd through per-contract coefficients."""
        want_vega, want_theta = "vega" in measures, "theta" in measures
        rate_index = self.process.rate_parameter()
        want_rate = "rho" in measures and rate_index is not None
        want_grad = want_vega or want_theta or want_rate
        params = batch.theta.clone().requires_grad_(want_vega) if want_grad else batch.theta
        theta = params
        expiry = batch.expiry.clone().requires_grad_(want_theta) if want_grad else batch.expiry
        rate = batch.rate.clone().requires_grad_(True) if want_rate else batch.rate
        if want_rate and rate_index is not None:
            moves = torch.zeros_like(batch.theta)
            moves[:, rate_index] = 1.0
            theta = theta + moves * (rate - rate.detach())[:, None]  # carry = r - q moves with r
        disc = torch.exp(-rate * expiry)
        fwd = batch.spot * self.process.forward_ratio(theta, expiry, rate, batch.dividend)
        need = {"put"}
        need |= {"share_below"} if "delta" in measures or ("rho" in measures and not want_rate) else set()
        need |= {"prob_below"} if "digital" in measures else set()
        need |= {"density"} if "gamma" in measures else set()
        log_kappa = torch.log(batch.strike / fwd)[:, None]
        if want_grad:
            # Per-contract coefficients, exact to first order in each contract's own
            # (theta, T): the gradient of a contract's price flows only to its inputs.
            coef = coef_u[inv]  # (n, K)
            for j, d in enumerate(d_th):
                if d is not None:
                    coef = coef + d[inv] * (theta[:, j] - theta[:, j].detach())[:, None]
            if d_t is not None:
                coef = coef + d_t[inv] * (expiry - expiry.detach())[:, None]
            exp = CosExpansion.from_coefficients(coef, self.spectrum)
            raw = exp.put_terms(self.process.scale(theta, expiry), log_kappa, frozenset(need))
        else:  # strikes index their distinct point's coefficients
            exp = CosExpansion.from_coefficients(coef_u, self.spectrum)
            raw = exp.put_terms(self.process.scale(th_u, t_u), log_kappa, frozenset(need), rows=inv)
        terms = {k: v[:, 0] for k, v in raw.items()}
        put = disc * fwd * terms["put"]
        price = torch.where(batch.is_call, put + disc * (fwd - batch.strike), put)
        out: dict[str, torch.Tensor] = {}
        if want_grad:
            # Only the inputs that require gradients may be differentiated (vega alone
            # leaves expiry a plain tensor, theta alone the parameters).
            wanted = (("vega", params, want_vega), ("theta", expiry, want_theta), ("rho", rate, want_rate))
            out.update(self._sensitivities(price, {k: x for k, x, want in wanted if want}, batch))
        out["price"] = price.detach()
        out.update(self._from_terms(batch, measures, terms, put.detach(), disc.detach(), fwd.detach(), want_rate))
        return out

    def _sensitivities(
        self, price: torch.Tensor, wrt: dict[str, torch.Tensor], batch: OptionBatch
    ) -> dict[str, torch.Tensor]:
        """vega, theta and rho by autograd, each with respect to its input in ``wrt`` (the
        parameters, the expiry, the rate: only those asked for, which require gradients)."""
        names = [k for k in ("vega", "theta", "rho") if k in wrt]
        grads = torch.autograd.grad(price.sum(), [wrt[k] for k in names], allow_unused=True)
        out: dict[str, torch.Tensor] = {}
        for name, g in zip(names, grads, strict=True):
            x = wrt[name]
            g = g if g is not None else torch.zeros_like(x)  # noqa: PLW2901
            if name == "vega":
                idx, kind = self.process.vol_parameter()
                # per 1.00 of vol: a variance parameter v has vol sqrt(v), dv/dvol = 2 sqrt(v)
                out["vega"] = g[:, idx] * 2.0 * torch.sqrt(batch.theta[:, idx]) if kind == "sqrt" else g[:, idx]
            else:
                out[name] = -g if name == "theta" else g
        return out

    def _from_terms(
        self,
        batch: OptionBatch,
        measures: frozenset[str],
        terms: dict[str, torch.Tensor],
        put: torch.Tensor,
        d: torch.Tensor,
        f: torch.Tensor,
        want_rate: bool,
    ) -> dict[str, torch.Tensor]:
        """Delta, gamma, the digital and (without a rate-moved parameter) rho, from the
        put's terms."""
        out: dict[str, torch.Tensor] = {}
        call, t = batch.is_call, batch.expiry
        # D F / S: the forward's sensitivity to spot (e^{-qT} for a European)
        q = d
        if measures & {"delta", "gamma"}:
            q = torch.exp(-batch.dividend * t) if self.process.rate_parameter() is None else d * f / batch.spot
        if "share_below" in terms:
            share = terms["share_below"].detach()
            out["delta"] = torch.where(call, q * (1.0 - share), -q * share)
            if not want_rate:
                put_rho = -t * put - t * d * f * share
                out["rho"] = torch.where(call, put_rho + t * batch.strike * d, put_rho)
        if "density" in terms:
            out["gamma"] = q * (batch.strike / f) * terms["density"].detach() / batch.spot
        if "prob_below" in terms:
            prob = terms["prob_below"].detach()
            out["digital"] = torch.where(call, d * (1.0 - prob), d * prob)
        return out

    def _distribution(
        self,
        measures: frozenset[str],
        levels: torch.Tensor | None,
        coef_u: torch.Tensor,
        th_u: torch.Tensor,
        t_u: torch.Tensor,
        inv: torch.Tensor,
        f: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Mean, stdev, skew, kurtosis and quantiles of S_T (``f`` its forward)."""
        out: dict[str, torch.Tensor] = {}
        exp_u = CosExpansion.from_coefficients(coef_u, self.spectrum)
        s_u = self.process.scale(th_u, t_u)
        if measures & set(DIST_MEASURES):
            exact = self.moments(th_u, t_u) if self.moments is not None else exp_u.terminal_moments(s_u)
            mom = {k: v[inv] for k, v in exact.items()}
            # Under the pricing measure E[S_T] = F for every model (E[e^X] = 1); the
            # COS density's own mean differs from 1 by the model's martingale defect.
            out["mean"] = f.clone()
            out["stdev"] = f * mom["stdev"]
            out["skew"], out["kurtosis"] = mom["skew"], mom["kurtosis"]
        if "quantiles" in measures:
            if levels is None:
                raise ValueError("quantiles requested without quantile levels")
            lv = levels.to(torch.float64)[None, :].expand(len(th_u), -1)
            y = exp_u.quantile(lv)[inv]  # (n, Q)
            out["quantiles"] = f[:, None] * torch.exp(s_u[inv][:, None] * y)
        return out


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
        spec = spectrum or MC_REFERENCE_SPECTRUM
        return MonteCarloReference(
            process, spec, paths=MC_REFERENCE_PATHS, seed=MC_REFERENCE_SEED, moments=exact_moments(process.name)
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
    from spectralmc_server.engine.refined import RefinedReference  # here: it imports this module

    return RefinedReference(base)


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
    desc = ckpt.manifest["model"]
    process = get_process(desc["process"])
    domain = ModelDomain.model_validate(desc["domain"])
    spectrum = SpectrumConfig.model_validate(desc["spectrum"])
    network = NetworkConfig.model_validate(desc["network"])
    model = CFModel(process, domain, spectrum, network)
    model.load_state_dict(ckpt.model)
    model.requires_grad_(False)
    model.eval()
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
    from spectralmc_server.engine.certify import MC_SE_MULTIPLE, measure_units

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


def price_bounds(batch: OptionBatch, process: Process) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model-free bounds on a European (or average-rate) option's price and the discount
    factor, each (n,): with F the forward of what the payoff is written on and D the
    discount factor, D (F - K)^+ <= call <= D F and D (K - F)^+ <= put <= D K."""
    disc = torch.exp(-batch.rate * batch.expiry)
    fwd = batch.spot * process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
    intrinsic = disc * torch.where(batch.is_call, fwd - batch.strike, batch.strike - fwd).clamp(min=0.0)
    upper = disc * torch.where(batch.is_call, fwd, batch.strike)
    return intrinsic, upper, disc


def clamp_to_bounds(values: dict[str, torch.Tensor], batch: OptionBatch, process: Process) -> None:
    """Prices and digitals inside their model-free bounds, whatever the method (a COS
    reference is accurate to ~1e-12 of the forward, so this only removes rounding that
    would show as a price a hair below intrinsic)."""
    if "price" in values or "digital" in values:
        low, high, disc = price_bounds(batch, process)
        if "price" in values:
            values["price"] = torch.minimum(torch.maximum(values["price"], low), high)
        if "digital" in values:
            values["digital"] = torch.minimum(values["digital"].clamp(min=0.0), disc)


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
        from spectralmc_server.engine.certify import DEFAULT_TOLERANCE, BoundMap

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
        from spectralmc_server.engine.certify import RELATIVE_MEASURES, measure_units

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
