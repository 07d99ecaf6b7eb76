"""Batched inference: explicit contracts -> measures.

One characteristic-function evaluation per distinct (theta, T) serves every strike,
spot, rate and dividend that shares it. Delta, gamma and rho are analytic through the
forward F = S e^{(r-q)T}; vega and theta come from forward-mode autograd through the CF
(the network, or an analytic CF), then reverse mode through the COS sums. Contracts
outside the model's domain are answered by the reference pricer and flagged, never
extrapolated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import torch

from spectralmc_server.engine.cos import CosExpansion, cos_coefficients
from spectralmc_server.engine.device import MemoryBudget
from spectralmc_server.engine.moments import MomentFunction
from spectralmc_server.engine.processes.base import Process
from spectralmc_server.engine.processes.spec import MOMENT_MAX_SPREAD as MOMENT_MAX_SPREAD  # noqa: PLC0414
from spectralmc_server.engine.spectrum import SpectrumConfig

PRICE_MEASURES = ("price", "delta", "gamma", "vega", "theta", "rho", "digital")
DIST_MEASURES = ("mean", "stdev", "skew", "kurtosis")
MEASURES = (*PRICE_MEASURES, *DIST_MEASURES, "quantiles")  # what a CF pricer answers
# survival: the probability a barrier contract's barrier is not hit by expiry (1 for a
# contract without a barrier); priced by the barrier pricers, never by a CF pricer
BARRIER_MEASURES = ("survival",)
REQUEST_MEASURES = (*MEASURES, *BARRIER_MEASURES)  # what a request may ask for
# A learned model's stdev, skew and kurtosis come from quadrature against its COS
# density, whose tails it under-weights as the spread s grows (docs/method.md): it
# answers them up to MOMENT_MAX_SPREAD (engine/processes/spec.py, torch-free for
# admission); beyond, the reference does, from exact moments (engine/moments.py).
SPREAD_MEASURES = frozenset({"stdev", "skew", "kurtosis"})

CFFunction: TypeAlias = "Callable[[torch.Tensor, torch.Tensor], torch.Tensor]"  # a string: lazy_torch.py
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
# Rough Bergomi at high vol of vol (eta >= 2, T >= 0.25) has a left tail past 12 s and a
# peak far narrower than s: COS on its simulated CF on [-12, 12] x 128 terms is off the
# payoff estimator by p95 7.5 bp, max 12 bp there; on [-16, 16] x 256 terms p95 3.8, max
# 8.2 bp, the truth's own standard error p95 2.4 bp (docs/method.md, "Rough Bergomi").
MC_REFERENCE_SPECTRA = {"rbergomi": SpectrumConfig(n_freq=256, half_width=16.0, n_bins=4096)}


def mc_reference_spectrum(process_name: str) -> SpectrumConfig:
    """The spectrum of a simulated reference: the process's own, else MC_REFERENCE_SPECTRUM."""
    return MC_REFERENCE_SPECTRA.get(process_name, MC_REFERENCE_SPECTRUM)


MC_REFERENCE_PATHS = 1 << 16
MC_REFERENCE_SEED = 20261127
MC_REFERENCE_GROUPS = 8  # independent groups of paths: the reference's standard error
CF_MAX_BLOCK = 4096  # rows per CF evaluation at most (a multiple of CF_CHUNK)
"""(theta (B, P), T (B,)) float64 -> phi_Y complex128 (B, K) on the spectrum's grid."""


def invariant_cf(cf: CFFunction, theta: torch.Tensor, expiry: torch.Tensor, chunk: int = CF_CHUNK) -> torch.Tensor:
    """``cf`` at U points, evaluated in blocks of at most ``CF_MAX_BLOCK`` rows whose row
    count is always a multiple of ``chunk`` (the last block padded with copies of its
    first row).

    A float32 matrix product's rounding depends on the batch shape: BLAS takes other
    kernels for a handful of rows than for many (measured: one or two rows round
    differently from seven or more). With every block a multiple of 64 rows a point's
    answer depends on nothing but the point, so the same request gives the same bytes
    however the server batches it (tests/engine/test_pricer.py checks shapes from 1 to
    3,000 rows). Differentiable (the pad rows are dropped).
    """
    n = theta.shape[0]
    if n == 0:
        return cf(theta, expiry)
    parts = []
    for i in range(0, n, CF_MAX_BLOCK):
        th, t = theta[i : i + CF_MAX_BLOCK], expiry[i : i + CF_MAX_BLOCK]
        short = (-th.shape[0]) % chunk
        if short:
            th = torch.cat([th, th[:1].expand(short, -1)])  # (m, P), m a multiple of chunk
            t = torch.cat([t, t[:1].expand(short)])  # (m,)
        parts.append(cf(th, t)[: th.shape[0] - short])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
        """The CF at U points, batch-invariant (:func:`invariant_cf`)."""
        return invariant_cf(self.raw_cf, theta, expiry, self.cf_chunk)

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
