"""Certificates (engine/certify.py) and the bounds they give every learned answer.

- Coverage on a fresh sample that is not the certification sample: the bundled GBM
  model is certified once (4,096 Sobol points x 13 strikes), then priced on 1,024 other
  points (``FRESH_SEED``) with rates, dividends and spots that the certification book
  (spot 1, no rates) never had; at least 99% of the learned prices and deltas must lie
  within their bound of the closed form (issue 17's target), with a median price bound
  of at most 5 bp of spot (so the coverage is not bought with vacuous bounds).
- Determinism: certifying the same model twice gives the same certificate.
- ``BoundMap`` on hand-made certificates: a contract in a known cell gets that cell's
  figure times its own unit; quantile levels between certified ones take the wider
  neighbour, levels outside the certified range and cells or measures with no figure
  give NaN.
- ``gate_failures`` and ``decode`` on hand-made certificates.
- ``ModelPricer`` routing: a measure whose bound passes its tolerance is answered by the
  reference (an analytic one: GBM), or withheld, NaN and flagged (a Monte-Carlo one: the
  Asian), never served as a learned number; the Valuer's row for a withheld measure is
  null with a null bound and a warning naming the measure.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import orjson
import pytest
import torch

from spectralmc_server.engine.certificate import (
    BANDS,
    CERT_FORMAT,
    CERT_LEVELS,
    GRID,
    STRIKE_MEASURES,
    UNITS,
    BoundMap,
    CertificateError,
    GateLimit,
    certificate_hash,
    decode,
    encode,
    gate_failures,
)
from spectralmc_server.engine.certify import CERT_SEED, FRESH_SEED, MIN_POINTS, STRIKES_PER_POINT, certify, sample
from spectralmc_server.engine.checkpoint import Checkpoint, read_dir
from spectralmc_server.engine.pricer import MEASURES, OptionBatch
from spectralmc_server.engine.processes import GBMProcess
from spectralmc_server.engine.processes.base import ModelDomain, ParameterRange
from spectralmc_server.engine.reference_pricers import CLOSED_FORM_BOUND, ClosedFormGBMPricer, reference_with_error
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.door import check_simulated
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.pricing.valuation import MAX_SIMULATED_REFERENCE_POINTS, RequestError, Valuer

F64 = torch.float64
GBM = GBMProcess()
# The GBM domain as bundled (vol and expiry on log scales, K/F in [0.7, 1.3]).
DOMAIN = ModelDomain(
    ranges=(
        ParameterRange(name="vol", low=0.05, high=1.0, scale="log"),
        ParameterRange(name="expiry_years", low=0.02, high=3.0, scale="log"),
    )
)
FRESH_POINTS = 1024
COVERAGE_TARGET = 0.99
PRICE_BOUND_TARGET = 5e-4  # 5 bp of spot (issue 17, GBM)


# -- hand-made certificates ----------------------------------------------------------------


def figure(m: str, i: int, j: int, k: int) -> float:
    """A distinct, recognisable figure for each (measure, cell, band or level)."""
    return (MEASURES.index(m) + 1) * 1e-3 + i * 1e-4 + j * 1e-5 + k * 1e-6


def handmade(
    fill: Any = figure, *, measures: tuple[str, ...] = MEASURES, model_hash: str = "sha256:test"
) -> dict[str, Any]:
    """A certificate in engine/certify.py's format whose cell figures are ``fill(m, i, j, k)``."""
    out: dict[str, Any] = {}
    for m in measures:
        if m in STRIKE_MEASURES:
            cells: list[Any] = [[[fill(m, i, j, b) for b in range(BANDS)] for j in range(GRID)] for i in range(GRID)]
        elif m == "quantiles":
            cells = [[[fill(m, i, j, q) for q in range(len(CERT_LEVELS))] for j in range(GRID)] for i in range(GRID)]
        else:
            cells = [[fill(m, i, j, 0) for j in range(GRID)] for i in range(GRID)]
        out[m] = {"unit": UNITS[m], "p50": 1e-5, "p95": 1e-4, "max": 1e-3, "count": 100, "cells": cells}
    return {
        "format": CERT_FORMAT,
        "model_hash": model_hash,
        "process": "gbm",
        "sample": {"seed": CERT_SEED, "points": MIN_POINTS, "levels": list(CERT_LEVELS)},
        "measures": out,
    }


def cell_centre(domain: ModelDomain, i: int, j: int) -> tuple[float, float]:
    """(vol, expiry) at the centre of cell (i, j) in the domain's sampling coordinates."""
    u_i = torch.tensor([(i + 0.5) / GRID], dtype=F64)
    u_j = torch.tensor([(j + 0.5) / GRID], dtype=F64)
    return float(domain.ranges[0].from_unit(u_i)), float(domain.ranges[1].from_unit(u_j))


def band_kappa(b: int) -> float:
    """K/F at the middle of strike band b of [0.7, 1.3] (log-spaced)."""
    lo, hi = math.log(0.7), math.log(1.3)
    return math.exp(lo + (b + 0.5) * (hi - lo) / BANDS)


def contract(vol: float, expiry: float, kappa: float, *, spot: float, rate: float, dividend: float) -> OptionBatch:
    fwd = spot * math.exp((rate - dividend) * expiry)

    def t(x: float) -> torch.Tensor:
        return torch.tensor([x], dtype=F64)

    return OptionBatch(
        spot=t(spot),
        strike=t(kappa * fwd),
        expiry=t(expiry),
        rate=t(rate),
        dividend=t(dividend),
        is_call=torch.tensor([kappa >= 1.0]),
        theta=t(vol)[:, None],
    )


# -- the bundled GBM model, certified once ---------------------------------------------------


@pytest.fixture(scope="module")
def gbm_ckpt() -> Checkpoint:
    return read_dir(bundled_models()["gbm"], need_training=False)


@pytest.fixture(scope="module")
def gbm_raw(gbm_ckpt: Checkpoint) -> ServedModel:
    """The bundled GBM network with no certificate (certify() needs the raw network)."""
    return load_served_model(replace(gbm_ckpt, certificate=None), require_certificate=False)


@pytest.fixture(scope="module")
def gbm_cert(gbm_raw: ServedModel) -> dict[str, Any]:
    return certify(gbm_raw, points=MIN_POINTS)


def test_coverage_on_a_fresh_sample_that_is_not_the_certification_sample(
    gbm_raw: ServedModel, gbm_cert: dict[str, Any]
) -> None:
    process, domain = gbm_raw.process, gbm_raw.domain
    batch, levels, _ = sample(process, domain, FRESH_POINTS, FRESH_SEED, carry_rates=True)
    cert_batch, _, _ = sample(process, domain, MIN_POINTS, CERT_SEED)
    # other points, and market inputs the certification book (spot 1, no rates) lacks
    fresh_points = set(zip(batch.theta[:, 0].tolist(), batch.expiry.tolist(), strict=True))
    cert_points = set(zip(cert_batch.theta[:, 0].tolist(), cert_batch.expiry.tolist(), strict=True))
    assert not fresh_points & cert_points
    assert bool((batch.rate != 0).all()) and bool((batch.spot != 1).all())
    assert bool(gbm_raw.pricer.servable(batch, frozenset(STRIKE_MEASURES)).all())

    measures = frozenset(MEASURES)
    learned = gbm_raw.pricer.learned.evaluate(batch, measures, levels)
    truth, stderr = reference_with_error(gbm_raw.pricer.reference, batch, measures, levels)
    assert stderr == {}  # closed forms: the truth is exact
    bounds = BoundMap(gbm_cert, process, domain).bounds(batch, measures, levels)
    one_per_point = torch.arange(len(batch)) % STRIKES_PER_POINT == 0
    coverage: dict[str, float] = {}
    for m in MEASURES:
        rows = gbm_raw.pricer.servable(batch, frozenset({m}))
        if m not in STRIKE_MEASURES:
            rows &= one_per_point
        covered = (learned[m] - truth[m]).abs()[rows] <= bounds[m][rows]  # a NaN bound is a miss
        coverage[m] = float(covered.double().mean())
    report = ", ".join(f"{m} {100 * c:.2f}%" for m, c in coverage.items())
    for m in ("price", "delta"):
        assert coverage[m] >= COVERAGE_TARGET, f"{m} coverage {100 * coverage[m]:.2f}% < 99% ({report})"
    # the bounds are not vacuous: the median price bound is at most 5 bp of spot
    median_price_bound = float((bounds["price"] / batch.spot).median())
    assert median_price_bound <= PRICE_BOUND_TARGET, f"median price bound {median_price_bound * 1e4:.2f} bp"


def test_certify_is_deterministic_and_names_its_model(gbm_raw: ServedModel, gbm_cert: dict[str, Any]) -> None:
    again = certify(gbm_raw, points=MIN_POINTS)
    assert {k: v for k, v in again.items() if k != "elapsed_seconds"} == {
        k: v for k, v in gbm_cert.items() if k != "elapsed_seconds"
    }
    assert certificate_hash({**again, "elapsed_seconds": 0}) == certificate_hash({**gbm_cert, "elapsed_seconds": 0})
    assert gbm_cert["model_hash"] == gbm_raw.content_hash
    assert gbm_cert["sample"]["seed"] == CERT_SEED and gbm_cert["sample"]["points"] == MIN_POINTS
    assert set(gbm_cert["measures"]) == set(MEASURES)
    # every cell of the domain has a figure for the strike measures (GBM's domain is full);
    # a figure may be 0 where every error was 0 (deep out of the money at the lowest vol
    # and expiry): the bound there is the floor, FLOOR x unit (BoundMap)
    for m in STRIKE_MEASURES:
        cells = torch.tensor(gbm_cert["measures"][m]["cells"], dtype=F64)
        assert cells.shape == (GRID, GRID, BANDS) and bool(torch.isfinite(cells).all()) and bool((cells >= 0).all()), m
        assert len(gbm_cert["measures"][m]["scale"]) > 1, m  # the error-scale model's coefficients
    # and it parses back as the certificate of this model
    assert decode(encode(gbm_cert), gbm_raw.content_hash)["measures"] == gbm_cert["measures"]


def test_certify_refuses_too_few_points(gbm_raw: ServedModel) -> None:
    with pytest.raises(ValueError, match="at least 4096 points"):
        certify(gbm_raw, points=MIN_POINTS - 1)


# -- BoundMap ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("i", "j", "b"), [(0, 0, 0), (2, 4, 1), (5, 3, 2), (4, 5, 0)])
def test_bound_map_gives_the_cell_figure_times_the_contract_unit(i: int, j: int, b: int) -> None:
    vol, expiry = cell_centre(DOMAIN, i, j)
    spot, rate, dividend = 80.0, 0.03, 0.01
    batch = contract(vol, expiry, band_kappa(b), spot=spot, rate=rate, dividend=dividend)
    levels = torch.tensor([0.5], dtype=F64)
    got = BoundMap(handmade(), GBM, DOMAIN).bounds(batch, frozenset(MEASURES), levels)
    disc = math.exp(-rate * expiry)
    fwd = spot * math.exp((rate - dividend) * expiry)
    units = {
        "price": disc * fwd,
        "delta": disc * fwd / spot,
        "gamma": disc * fwd / spot**2,
        "vega": disc * fwd,
        "rho": disc * fwd,
        "digital": disc,
        "mean": fwd,
        "stdev": fwd,
        "skew": 1.0,
        "kurtosis": 1.0,
    }
    for m, unit in units.items():
        k = b if m in STRIKE_MEASURES else 0
        assert float(got[m][0]) == pytest.approx(figure(m, i, j, k) * unit, rel=1e-12), m
    assert float(got["quantiles"][0, 0]) == pytest.approx(figure("quantiles", i, j, 4) * fwd, rel=1e-12)
    # theta moves with the carry: the price's and the digital's figures scaled by q and r - q
    extra = abs(dividend) * figure("price", i, j, b) + abs(rate - dividend) * band_kappa(b) * figure("digital", i, j, b)
    assert float(got["theta"][0]) == pytest.approx((figure("theta", i, j, b) + extra) * disc * fwd, rel=1e-12)


def test_bound_map_clamps_the_domain_edges_into_the_outer_cells() -> None:
    for vol, expiry, kappa, want in [
        (0.05, 0.02, 0.7, (0, 0, 0)),
        (1.0, 3.0, 1.3, (GRID - 1, GRID - 1, BANDS - 1)),
    ]:
        batch = contract(vol, expiry, kappa, spot=1.0, rate=0.0, dividend=0.0)
        got = BoundMap(handmade(), GBM, DOMAIN).bounds(batch, frozenset({"price"}))
        assert float(got["price"][0]) == pytest.approx(figure("price", *want), rel=1e-12)


def test_bound_map_quantile_levels() -> None:
    """A certified level takes its own figure, one between two certified levels the
    wider of the two, one outside the certified range none (NaN)."""
    vol, expiry = cell_centre(DOMAIN, 1, 2)
    batch = contract(vol, expiry, 1.0, spot=1.0, rate=0.0, dividend=0.0)

    def fill(m: str, i: int, j: int, k: int) -> float:  # figures not monotone in the level
        return [5.0, 1.0, 2.0, 7.0, 3.0, 4.0, 6.0, 9.0, 8.0][k] * 1e-3 if m == "quantiles" else 1e-3

    asked = [0.5, 0.3, 0.96, 0.001, 0.999, 0.0005, 0.9995]
    want = [3.0, 7.0, 9.0, 5.0, 8.0, math.nan, math.nan]
    got = BoundMap(handmade(fill), GBM, DOMAIN).bounds(batch, frozenset({"quantiles"}), torch.tensor(asked, dtype=F64))
    assert got["quantiles"].shape == (1, len(asked))
    for lv, w, g in zip(asked, want, got["quantiles"][0].tolist(), strict=True):
        if math.isnan(w):
            assert math.isnan(g), lv
        else:
            assert g == pytest.approx(w * 1e-3, rel=1e-12), lv


def test_bound_map_gives_nan_where_the_certificate_has_no_figure() -> None:
    def fill(m: str, i: int, j: int, k: int) -> float | None:
        return None if (i, j) == (3, 3) else 1e-3

    cert = handmade(fill, measures=("price", "stdev"))
    inside, empty = cell_centre(DOMAIN, 3, 2), cell_centre(DOMAIN, 3, 3)
    batch = OptionBatch(
        spot=torch.ones(2, dtype=F64),
        strike=torch.ones(2, dtype=F64),
        expiry=torch.tensor([inside[1], empty[1]], dtype=F64),
        rate=torch.zeros(2, dtype=F64),
        dividend=torch.zeros(2, dtype=F64),
        is_call=torch.ones(2, dtype=torch.bool),
        theta=torch.tensor([[inside[0]], [empty[0]]], dtype=F64),
    )
    got = BoundMap(cert, GBM, DOMAIN).bounds(batch, frozenset({"price", "stdev", "delta"}))
    assert float(got["price"][0]) == pytest.approx(1e-3) and math.isnan(float(got["price"][1]))
    assert float(got["stdev"][0]) == pytest.approx(1e-3) and math.isnan(float(got["stdev"][1]))
    assert bool(torch.isnan(got["delta"]).all())  # a measure the certificate lacks


# -- the gate and the file format -------------------------------------------------------------


def test_gate_failures() -> None:
    cert = {"measures": {"price": {"p95": 1e-4, "max": 5e-4}, "delta": {"p95": None, "max": 1e-3}}}
    assert gate_failures(None, {"price": GateLimit(p95=1.0)}) == ["no certificate"]
    assert gate_failures(cert, {"price": GateLimit(p95=2e-4, max=1e-3)}) == []
    assert gate_failures(cert, {"price": GateLimit(p95=1e-4, max=5e-4)}) == []  # at the limit passes
    assert gate_failures(cert, {"price": GateLimit()}) == []  # no thresholds
    assert gate_failures(cert, {"price": GateLimit(p95=5e-5, max=1e-3)}) == ["price p95 0.0001 > 5e-05"]
    assert gate_failures(cert, {"price": GateLimit(p95=5e-5, max=1e-4)}) == [
        "price p95 0.0001 > 5e-05",
        "price max 0.0005 > 0.0001",
    ]
    assert gate_failures(cert, {"gamma": GateLimit(p95=1.0)}) == ["gamma: not certified"]
    assert gate_failures(cert, {"delta": GateLimit(p95=1.0)}) == ["delta p95 n/a > 1"]  # no figure fails


def test_decode_checks_format_and_model() -> None:
    cert = handmade(model_hash="sha256:aaaa")
    data = encode(cert)
    assert decode(data) == cert
    assert decode(data, "sha256:aaaa") == cert
    with pytest.raises(CertificateError, match="is for model 'sha256:aaaa', not 'sha256:bbbb'"):
        decode(data, "sha256:bbbb")
    with pytest.raises(CertificateError, match="not valid JSON"):
        decode(b"{not json")
    with pytest.raises(CertificateError, match="unsupported format"):
        decode(orjson.dumps({**cert, "format": "spectralmc-certificate/0"}))
    with pytest.raises(CertificateError, match="unsupported format"):
        decode(b"[1, 2]")
    with pytest.raises(CertificateError, match="no measures"):
        decode(orjson.dumps({k: v for k, v in cert.items() if k != "measures"}))
    # the hash is of the canonical bytes: key order does not matter, a figure does
    assert certificate_hash(dict(reversed(list(cert.items())))) == certificate_hash(cert)
    changed = orjson.loads(data)
    changed["measures"]["price"]["cells"][0][0][0] *= 2
    assert certificate_hash(changed) != certificate_hash(cert)


# -- ModelPricer: a measure past its tolerance is never served as learned ----------------------


def served_with(ckpt: Checkpoint, cert: dict[str, Any], tolerance: dict[str, float] | None = None) -> ServedModel:
    return load_served_model(replace(ckpt, certificate=cert), tolerance=tolerance)


def test_gbm_measure_past_tolerance_is_answered_by_the_reference(gbm_ckpt: Checkpoint) -> None:
    vol, expiry = cell_centre(DOMAIN, 2, 3)
    batch = contract(vol, expiry, 1.1, spot=100.0, rate=0.02, dividend=0.01)
    unit = 100.0 * math.exp(-0.01 * expiry)  # D F
    cert = handmade(lambda m, i, j, k: 1e-3)  # 10 bp of D F for every measure
    truth = ClosedFormGBMPricer().evaluate(batch, frozenset({"price", "delta"}))

    loose = served_with(gbm_ckpt, cert).pricer.evaluate(batch, frozenset({"price", "delta"}))
    assert bool(loose.learned.all())  # within the default tolerance: the network answers
    assert float(loose.bounds["price"][0]) == pytest.approx(1e-3 * unit, rel=1e-12)
    assert abs(float(loose.values["price"][0] - truth["price"][0])) <= float(loose.bounds["price"][0])

    tight = served_with(gbm_ckpt, cert, {"price": 1e-4}).pricer.evaluate(batch, frozenset({"price", "delta"}))
    assert not bool(tight.learned.any())  # the price's bound is past its tolerance
    for m in ("price", "delta"):  # the whole contract is the reference's
        assert float(tight.values[m][0]) == pytest.approx(float(truth[m][0]), rel=1e-12, abs=1e-12)
    assert float(tight.bounds["price"][0]) == pytest.approx(CLOSED_FORM_BOUND * unit, rel=1e-12)
    assert tight.withheld == {}

    # a measure the certificate has no figure for is not served as learned either
    partial = served_with(gbm_ckpt, handmade(lambda m, i, j, k: 1e-3, measures=("price",)))
    assert not bool(partial.pricer.evaluate(batch, frozenset({"price", "delta"})).learned.any())
    assert bool(partial.pricer.evaluate(batch, frozenset({"price"})).learned.all())


def test_no_certificate_means_no_learned_answer(gbm_ckpt: Checkpoint) -> None:
    vol, expiry = cell_centre(DOMAIN, 2, 3)
    batch = contract(vol, expiry, 1.0, spot=100.0, rate=0.0, dividend=0.0)
    served = load_served_model(replace(gbm_ckpt, certificate=None))
    assert not served.pricer.qualified
    assert not bool(served.pricer.evaluate(batch, frozenset({"price"})).learned.any())


ASIAN_CONTRACT = {
    "id": "a1",
    "process": "asian",
    "right": "call",
    "spot": 100.0,
    "strike": 100.0,
    "expiry_years": 1.0,
    "rate": 0.03,
    "dividend": 0.01,
    "vol": 0.25,
    "fixings": 12,
}


def _asian_batch(served: ServedModel) -> OptionBatch:
    theta = torch.tensor([[0.25, 0.02, 12.0]], dtype=F64)  # vol, carry r - q, fixings
    fwd_ratio = float(
        served.process.forward_ratio(
            theta, torch.tensor([1.0], dtype=F64), torch.tensor([0.03], dtype=F64), torch.tensor([0.01], dtype=F64)
        )[0]
    )
    return OptionBatch(
        spot=torch.tensor([100.0], dtype=F64),
        strike=torch.tensor([100.0 * fwd_ratio], dtype=F64),
        expiry=torch.tensor([1.0], dtype=F64),
        rate=torch.tensor([0.03], dtype=F64),
        dividend=torch.tensor([0.01], dtype=F64),
        is_call=torch.tensor([True]),
        theta=theta,
    )


def test_asian_measure_past_tolerance_is_withheld_never_served() -> None:
    """The Asian's reference is a simulation: a measure other than the price past its
    tolerance comes back NaN and flagged (null with a warning in a response), the others
    as learned numbers."""
    ckpt = read_dir(bundled_models()["asian"], need_training=False)

    def fill(m: str, i: int, j: int, k: int) -> float:
        return 1.0 if m == "delta" else 1e-4  # the delta's bound: 100% of D F / S

    served = served_with(ckpt, {**handmade(fill, model_hash=ckpt.content_hash), "process": "asian"})
    request = PriceRequest.model_validate({"measures": ["price", "delta"], "contracts": [ASIAN_CONTRACT]})
    row = Valuer({"asian": served}).value(request)["results"][0]
    assert row["method"] == "cvnn"
    assert row["delta"] is None and row["error_bound"]["delta"] is None
    assert isinstance(row["price"], float) and math.isfinite(row["price"])
    assert isinstance(row["error_bound"]["price"], float) and row["error_bound"]["price"] > 0
    warnings = row["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("delta: not answered") and "tolerance" in warnings[0]

    # the engine's view: NaN, flagged withheld, while the network answered the contract
    ev = served.pricer.evaluate(_asian_batch(served), frozenset({"price", "delta"}))
    assert bool(ev.learned.all())
    assert math.isnan(float(ev.values["delta"][0])) and bool(ev.withheld["delta"].all())
    assert "price" not in ev.withheld and math.isfinite(float(ev.values["price"][0]))


def test_asian_price_past_tolerance_is_answered_by_the_simulation_never_null() -> None:
    """A 200 never holds a null price: an Asian price past its tolerance sends the
    contract to the Monte-Carlo reference (its value, its 3-SE bound), counted against the
    request's simulated-reference budget before any pricing."""
    ckpt = read_dir(bundled_models()["asian"], need_training=False)

    def fill(m: str, i: int, j: int, k: int) -> float:
        return 1.0 if m == "price" else 1e-4  # the price's bound: 100% of D F

    served = served_with(ckpt, {**handmade(fill, model_hash=ckpt.content_hash), "process": "asian"})
    batch = _asian_batch(served)
    assert bool(served.pricer.servable(batch, frozenset({"price"})).all())  # the network could answer it
    assert bool(served.pricer.simulated_rows(batch, frozenset({"price", "delta"})).all())
    assert not bool(served.pricer.simulated_rows(batch, frozenset({"mean"})).any())  # no price asked
    ev = served.pricer.evaluate(batch, frozenset({"price", "delta"}))
    assert not bool(ev.learned.any()) and not ev.withheld
    truth, _ = reference_with_error(served.pricer.reference, batch, frozenset({"price", "delta"}), None)
    assert float(ev.values["price"][0]) == float(truth["price"][0])
    assert float(ev.bounds["price"][0]) > 0 and math.isfinite(float(ev.bounds["price"][0]))

    request = PriceRequest.model_validate({"measures": ["price", "delta"], "contracts": [ASIAN_CONTRACT]})
    row = Valuer({"asian": served}).value(request)["results"][0]
    assert row["method"] == "reference" and "warnings" not in row
    assert isinstance(row["price"], float) and math.isfinite(row["price"])

    # more such points than a request may simulate: refused before pricing, naming why
    many = [
        {**ASIAN_CONTRACT, "id": f"a{i}", "vol": 0.25 + 0.001 * i} for i in range(MAX_SIMULATED_REFERENCE_POINTS + 1)
    ]
    refused = PriceRequest.model_validate({"measures": ["price"], "contracts": many})
    with pytest.raises(RequestError, match="priced by simulation"):
        check_simulated(refused, {"asian": served})
    fine = PriceRequest.model_validate({"measures": ["price"], "contracts": many[:MAX_SIMULATED_REFERENCE_POINTS]})
    check_simulated(fine, {"asian": served})
