"""A certificate as the server reads it: its format, the units its errors are in, its
cells and fitted error scale, the bound per contract (:class:`BoundMap`) and the quality
gate. Made by :mod:`.certify`."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import torch

from spectralmc_server.engine.checkpoint import canonical_json, sha256_hex
from spectralmc_server.engine.pricer import (
    PRICE_MEASURES,
    OptionBatch,
)
from spectralmc_server.engine.processes.base import ModelDomain, Process

if TYPE_CHECKING:
    pass

CERT_FORMAT = "spectralmc-certificate/1"
CERT_LEVELS = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
GRID = 6
BANDS = 3
COVERAGE = 0.995
MARGIN = 1.1
SCALE_DEGREE = 3  # the error-scale model: a cubic in the domain coordinates (and log K/F)
MAX_LOG_SCALE = math.log(1e6)
# The least bound a cell gets, per unit of the measure's scale: where the learned and
# the true value agree to rounding (a deep out-of-the-money price of 0), a bound of
# exactly 0 would fail on the next point's rounding. 1e-6 of spot is 0.01 bp.
FLOOR = 1e-6
# Measures whose tolerance is relative to the value (their bound is still in the
# measure's own units). Skew and (excess) kurtosis are near 0 for small spreads: their
# tolerances are absolute.
RELATIVE_MEASURES = frozenset({"stdev", "quantiles"})
UNITS = {
    "price": "D F",
    "delta": "D F / S",
    "gamma": "D F / S^2",
    "vega": "D F per 1.00 of vol",
    "theta": "D F per year",
    "rho": "D F per 1.00 of rate",
    "digital": "D",
    "mean": "F",
    "stdev": "F",
    "skew": "1",
    "kurtosis": "1",
    "quantiles": "F",
}
STRIKE_MEASURES = frozenset(PRICE_MEASURES)
# A learned measure whose bound passes its tolerance is not served as learned (the
# reference answers, or it is withheld: engine/served.py ModelPricer). Absolute per unit
# of the measure's scale (UNITS: 25e-4 of a price is 25 bp of D F, spot for a European
# without dividends), relative to the value for RELATIVE_MEASURES. Settings
# ``[certificate.tolerance]`` override them.
DEFAULT_TOLERANCE: dict[str, float] = {
    "price": 25e-4,
    "delta": 50e-4,
    "gamma": 100e-4,
    "vega": 100e-4,
    "theta": 100e-4,
    "rho": 100e-4,
    "digital": 50e-4,
    "mean": 1e-6,
    "stdev": 0.02,
    "skew": 0.05,
    "kurtosis": 0.05,
    "quantiles": 0.01,
}


class CertificateError(ValueError):
    """A certificate that does not parse, has the wrong format, or names another model."""


def measure_units(batch: OptionBatch, process: Process) -> dict[str, torch.Tensor]:
    """Each measure's scale per contract (n,): a bound is a cell figure times this."""
    disc = torch.exp(-batch.rate * batch.expiry)
    fwd = batch.spot * process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
    df = disc * fwd
    one = torch.ones_like(df)
    return {
        "price": df,
        "delta": df / batch.spot,
        "gamma": df / (batch.spot * batch.spot),
        "vega": df,
        "theta": df,
        "rho": df,
        "digital": disc,
        "mean": fwd,
        "stdev": fwd,
        "skew": one,
        "kurtosis": one,
        "quantiles": fwd,
    }


def main_dims(process: Process, domain: ModelDomain) -> tuple[int, int]:
    """The two dimensions the error map is drawn over: the vol parameter and expiry."""
    return process.vol_parameter()[0], domain.dims - 1


def _band_edges(domain: ModelDomain) -> torch.Tensor:
    low, high = domain.certified_moneyness
    return torch.linspace(math.log(low), math.log(high), BANDS + 1, dtype=torch.float64)


def cell_index(
    process: Process, domain: ModelDomain, theta: torch.Tensor, expiry: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each contract's cell (i, j) over the main dimensions, each (n,) long in [0, GRID)."""
    a, b = main_dims(process, domain)
    ua = domain.ranges[a].to_unit(theta[:, a])
    ub = domain.ranges[b].to_unit(expiry)
    i = (ua * GRID).floor().clamp(0, GRID - 1).long()
    j = (ub * GRID).floor().clamp(0, GRID - 1).long()
    return i, j


def band_index(domain: ModelDomain, log_kappa: torch.Tensor) -> torch.Tensor:
    edges = _band_edges(domain)
    width = float(edges[1] - edges[0])
    return ((log_kappa - float(edges[0])) / width).floor().clamp(0, BANDS - 1).long()


def features(process: Process, domain: ModelDomain, batch: OptionBatch, *, strike: bool) -> torch.Tensor:
    """(n, F): the monomials up to degree SCALE_DEGREE of every domain coordinate (in
    [-1, 1], as the network sees it) and, for strike-dependent measures, the log K/F
    position in the certified range: the inputs of the error-scale model."""
    x = domain.network_input(batch.theta, batch.expiry)
    if strike:
        low, high = domain.certified_moneyness
        fwd = batch.spot * process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
        pos = (torch.log(batch.strike / fwd) - math.log(low)) / (math.log(high) - math.log(low))
        x = torch.cat([x, (2.0 * pos - 1.0)[:, None]], 1)
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    x1 = torch.cat([ones, x.to(torch.float64)], 1)  # (n, 1 + D): column 0 pads a short monomial
    index = _monomials(x.shape[1])  # (F, SCALE_DEGREE)
    cols = x1[:, index[:, 0]]
    for k in range(1, SCALE_DEGREE):  # elementwise, left to right: the same product in any batch
        cols = cols * x1[:, index[:, k]]
    return cols  # (n, F)


@functools.lru_cache(maxsize=8)
def _monomials(dims: int) -> torch.Tensor:
    """(F, SCALE_DEGREE) column indices into [1, x_1 .. x_dims] of each monomial up to
    degree SCALE_DEGREE (the constant first, then by degree), padded with the 1 column."""
    rows = [[0] * SCALE_DEGREE]
    for k in range(1, SCALE_DEGREE + 1):
        for combo in itertools.combinations_with_replacement(range(1, dims + 1), k):
            rows.append([*combo, *[0] * (SCALE_DEGREE - k)])
    return torch.tensor(rows, dtype=torch.long)


def scale_of(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """exp(features . coef), the fitted error scale (exponent capped: a bound is never
    infinite)."""
    # Elementwise products summed per row, not a matrix product: BLAS rounds a product by
    # its shapes, and a contract's bound must not depend on the batch it is priced in.
    # coef (F,), or (F, L) with one scale per quantile level
    log_scale = (x * coef).sum(-1) if coef.dim() == 1 else (x[:, :, None] * coef[None, :, :]).sum(1)
    return torch.exp(log_scale.clamp(max=MAX_LOG_SCALE))


def encode(cert: Mapping[str, Any]) -> bytes:
    return canonical_json(dict(cert))


def decode(data: bytes, model_hash: str | None = None) -> dict[str, Any]:
    """Parse a certificate; with ``model_hash``, check it certifies that model."""
    try:
        cert = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CertificateError(f"certificate is not valid JSON: {exc}") from None
    if not isinstance(cert, dict) or cert.get("format") != CERT_FORMAT:
        raise CertificateError(f"certificate: unsupported format (expected {CERT_FORMAT!r})")
    if not isinstance(cert.get("measures"), dict):
        raise CertificateError("certificate has no measures")
    if model_hash is not None and cert.get("model_hash") != model_hash:
        raise CertificateError(f"certificate is for model {cert.get('model_hash')!r}, not {model_hash!r}")
    return cert


def certificate_hash(cert: Mapping[str, Any]) -> str:
    return sha256_hex(encode(cert))


def summary(cert: Mapping[str, Any]) -> dict[str, Any]:
    """Per measure: unit, p50, p95 and max of the normalised error (a price's x 1e4 is
    bp of spot); plus the sample's size and seed. What /v1/models and store inspect show."""
    return {
        "model_hash": cert.get("model_hash"),
        "points": cert.get("sample", {}).get("points"),
        "seed": cert.get("sample", {}).get("seed"),
        "truth": cert.get("sample", {}).get("truth"),
        "measures": {
            m: {k: v.get(k) for k in ("unit", "p50", "p95", "max")} for m, v in cert.get("measures", {}).items()
        },
    }


# -- the quality gate ---------------------------------------------------------------------
@dataclass(frozen=True)
class GateLimit:
    """Thresholds on a measure's normalised error over the certificate's sample."""

    p95: float | None = None
    max: float | None = None


def gate_failures(cert: Mapping[str, Any] | None, limits: Mapping[str, GateLimit]) -> list[str]:
    """Why a certificate fails its gate (empty: it passes). No certificate fails."""
    if cert is None:
        return ["no certificate"]
    out = []
    measures = cert.get("measures", {})
    for m, limit in limits.items():
        figures = measures.get(m)
        if figures is None:
            out.append(f"{m}: not certified")
            continue
        for stat in ("p95", "max"):
            threshold = getattr(limit, stat)
            value = figures.get(stat)
            if threshold is None:
                continue
            if value is None or not value <= threshold:
                out.append(f"{m} {stat} {_fmt(value)} > {threshold:g}")
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


# -- bounds per contract ------------------------------------------------------------------
class BoundMap:
    """Looks up each contract's bound from a certificate: the fitted error scale at the
    contract times its cell's figure times the contract's unit, at least FLOOR times the
    unit. (A certificate without a scale model, as older or hand-made ones, has scale 1.)"""

    def __init__(self, cert: Mapping[str, Any], process: Process, domain: ModelDomain) -> None:
        self.process = process
        self.domain = domain
        self.levels = torch.tensor(cert.get("sample", {}).get("levels", CERT_LEVELS), dtype=torch.float64)
        self.tables: dict[str, torch.Tensor] = {}
        self.coefs: dict[str, torch.Tensor] = {}
        for m, entry in cert.get("measures", {}).items():
            cells = entry.get("cells")
            if cells is None:
                continue
            self.tables[m] = torch.tensor(_none_to_nan(cells), dtype=torch.float64)
            if entry.get("scale") is not None:
                self.coefs[m] = torch.tensor(entry["scale"], dtype=torch.float64)

    def normalised(self, m: str, batch: OptionBatch, levels: torch.Tensor | None = None) -> torch.Tensor:
        """Measure m's bound per unit of its scale ((n,), quantiles (n, Q)); NaN where the
        certificate has no figure."""
        n = len(batch)
        table = self.tables.get(m)
        if table is None:
            shape = (n, len(levels)) if m == "quantiles" and levels is not None else (n,)
            return torch.full(shape, float("nan"), dtype=torch.float64)
        i, j = cell_index(self.process, self.domain, batch.theta, batch.expiry)
        coef = self.coefs.get(m)
        if m == "quantiles":
            if levels is None:
                raise ValueError("quantile bounds need the quantile levels")
            per_level = table[i, j]  # (n, L)
            if coef is not None:
                x = features(self.process, self.domain, batch, strike=False)
                per_level = per_level * scale_of(x, coef.T)  # (n, F) @ (F, L)
                per_level = per_level.clamp(min=FLOOR)
            return self._level_bounds(per_level, levels)
        if table.dim() == 3:
            fwd = batch.spot * self.process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
            figure = table[i, j, band_index(self.domain, torch.log(batch.strike / fwd))]
        else:
            figure = table[i, j]
        if coef is None:
            return figure
        x = features(self.process, self.domain, batch, strike=table.dim() == 3)
        return (figure * scale_of(x, coef)).clamp(min=FLOOR)

    def bounds(
        self, batch: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per measure, each contract's bound in the measure's units ((n,), quantiles
        (n, Q)); NaN where the certificate has no figure (not certified there)."""
        units = measure_units(batch, self.process)
        out: dict[str, torch.Tensor] = {}
        for m in measures:
            if m == "quantiles" and levels is None:
                continue
            b = self.normalised(m, batch, levels)
            out[m] = b * (units[m][:, None] if b.dim() == 2 else units[m])
        # theta moves with the carry through the forward: with rates, the price and the
        # log-strike error add (docs/method.md, "Certified error bounds")
        if "theta" in out:
            fwd = batch.spot * self.process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
            extra = batch.dividend.abs() * self.normalised("price", batch)
            extra = extra + (batch.rate - batch.dividend).abs() * (batch.strike / fwd) * self.normalised(
                "digital", batch
            )
            out["theta"] = out["theta"] + torch.nan_to_num(extra, nan=0.0) * units["theta"]
        return out

    def _level_bounds(self, per_level: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """(n, L) certified-level bounds -> (n, Q) for the asked levels: the larger of
        the two certified levels around each; NaN outside the certified levels."""
        cert = self.levels
        lv = levels.to(torch.float64)
        hi = torch.searchsorted(cert, lv).clamp(max=len(cert) - 1)
        lo = (hi - 1).clamp(min=0)
        exact = cert[hi] == lv
        lo = torch.where(exact, hi, lo)
        b = torch.maximum(per_level[:, lo], per_level[:, hi])
        outside = (lv < cert[0]) | (lv > cert[-1])
        b[:, outside] = float("nan")
        return b


def _none_to_nan(x: Any) -> Any:
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return float("nan") if x is None else float(x)
