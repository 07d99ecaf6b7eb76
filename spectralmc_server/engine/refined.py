"""COS on an analytic CF with as many terms as each row needs (the reference's prices).

The reference prices Y = X / s on [-64, 64] with 2,048 cosine terms
(``REFERENCE_SPECTRUM``). Where the law of X has a feature narrower than that grid
resolves (Heston with the vol of vol large against the variance level: most paths' variance
is absorbed near zero, a spike of width ~1e-3 s, plus rare large excursions) the series is
cut off before it converges: 2.1e-5 of the price scale off QuantLib at v0 = theta = 0.01,
kappa = 1.5, xi = 2, rho = -0.99, T = 1.

The check is the row's own CF at the series' last frequencies: the COS truncation error
of a price is about |phi_Y(w_{K-1})| s / K times a constant near 5e-5 x 2,048 (measured),
so a row whose max |phi_Y| over the last ``CHECK_POINTS`` frequencies passes
``CONVERGED_CF`` is priced with 4, 16 or 64 times the terms, the first that passes (on
the same window; the largest if none does: validation refuses those, see
processes/heston_limits.py). The term count is a function of the row alone, so answers
stay batch-invariant. Only price measures (price and the Greeks, digital) are refined:
moments and quantiles come from the base series (their tolerances are 1e-4 and wider).
"""

from __future__ import annotations

import torch

from spectralmc_server.engine.pricer import PRICE_MEASURES as PRICE_MEASURE_NAMES
from spectralmc_server.engine.pricer import CFFunction, OptionBatch, SpectralPricer, clamp_to_bounds
from spectralmc_server.engine.processes.base import Process
from spectralmc_server.engine.reference import analytic_cf_y
from spectralmc_server.engine.spectrum import SpectrumConfig

REFINE_FACTORS = (4, 16, 64)  # term multiples tried after the base series, in order
CONVERGED_CF = 1e-4  # max |phi_Y| over the last frequencies that counts as converged
CHECK_POINTS = 8  # how many of the series' last frequencies the check reads
PRICE_MEASURES = frozenset(PRICE_MEASURE_NAMES)


def refined_spectrum(base: SpectrumConfig, factor: int) -> SpectrumConfig:
    """The base window with ``factor`` times the terms. Built without validation: the
    learned spectra's cap of 8,192 terms is about training and FFT bins, neither used
    here (only the price sums, which never form a (rows, K, K) table)."""
    n = base.n_freq * factor
    return SpectrumConfig.model_construct(n_freq=n, half_width=base.half_width, n_bins=2 * n)


def top_cf(process: Process, spectrum: SpectrumConfig, theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    """max |phi_Y| over the spectrum's last ``CHECK_POINTS`` frequencies, (B,)."""
    s = process.scale(theta, expiry)[:, None]
    w = spectrum.frequencies(device=theta.device)[-CHECK_POINTS:][None, :]
    phi = process.analytic_cf_x(w / s, theta, expiry)
    if phi is None:
        raise ValueError(f"process {process.name!r} has no analytic characteristic function")
    return phi.abs().amax(1)


def refine_level(
    process: Process, base: SpectrumConfig, theta: torch.Tensor, expiry: torch.Tensor, tol: float = CONVERGED_CF
) -> torch.Tensor:
    """(B,) long: 0 where the base series has converged, i where ``REFINE_FACTORS[i - 1]``
    times the terms is the first that has (the last where none has)."""
    level = torch.zeros(theta.shape[0], dtype=torch.long, device=theta.device)
    pending = ~(top_cf(process, base, theta, expiry) <= tol)
    for i, factor in enumerate(REFINE_FACTORS, start=1):
        if not bool(pending.any()):
            break
        idx = torch.nonzero(pending).flatten()
        level[idx] = i
        ok = top_cf(process, refined_spectrum(base, factor), theta[idx], expiry[idx]) <= tol
        pending[idx[ok]] = False
    return level


class RefinedReference:
    """The reference: ``base`` (COS on the analytic CF with ``REFERENCE_SPECTRUM``) for
    every measure, its price measures recomputed with more terms on the rows whose series
    has not converged (:func:`refine_level`)."""

    def __init__(self, base: SpectralPricer) -> None:
        self.base = base
        self.process = base.process
        self.spectrum = base.spectrum
        process = base.process
        self.finer = []
        for factor in REFINE_FACTORS:
            spec = refined_spectrum(base.spectrum, factor)
            # One CF row per point (cf_chunk 1): the analytic CF is elementwise float64 on
            # rows of K >= 8,192 (a multiple of every vector width), so its values do not
            # depend on the batch, and padding to 64 rows would cost 64x at one point.
            self.finer.append(
                SpectralPricer(
                    process,
                    spec,
                    _cf_on(process, spec),
                    cf_chunk=1,
                    working_bytes=base.working_bytes,
                )
            )

    def evaluate(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        pricing = measures & PRICE_MEASURES
        if not pricing or len(batch) == 0:
            return self.base.evaluate(batch, measures, levels)
        level = refine_level(self.process, self.spectrum, batch.theta, batch.expiry)
        if not bool((level > 0).any()):
            return self.base.evaluate(batch, measures, levels)
        out = self._refined(batch, measures, levels, level)
        # A converged series can still sit a hair outside the model-free bounds (the
        # window's tails: 2.8e-6 below intrinsic for a put struck at 3 F at the bundled
        # domain's corner, 9e-9 of its price scale); the truth is inside, so clamping only
        # moves the answer towards it (the served pricer clamps the same way).
        clamp_to_bounds(out, batch, self.process)
        return out

    def _refined(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None, level: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        pricing = measures & PRICE_MEASURES
        n = len(batch)
        out: dict[str, torch.Tensor] = {}
        rest = measures - pricing
        if rest:
            out.update(self.base.evaluate(batch, frozenset(rest), levels))
        for i, pricer in enumerate([self.base, *self.finer]):
            idx = torch.nonzero(level == i).flatten()
            if not len(idx):
                continue
            part = pricer.evaluate(batch.select(idx), frozenset(pricing))
            for k, v in part.items():
                if k not in out:
                    out[k] = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
                out[k][idx] = v
        return out


def _cf_on(process: Process, spectrum: SpectrumConfig) -> CFFunction:
    def cf(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
        return analytic_cf_y(process, spectrum, theta, expiry)

    return cf
