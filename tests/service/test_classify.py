"""service/batcher/items.py ``classify`` reads the request's Book with numpy; it must give the
runs the per-contract reading gives (kept here as the oracle: the box of the served
model's domain, its certified K/F for strike measures, by-reference contracts as cvnn,
a process without a model as reference), on random books mixing every process, inputs
on both sides of every bound, and contracts by reference."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import pytest

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.pricer import PRICE_MEASURES
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.service.batcher import (
    VECTOR_MIN_CONTRACTS,
    ClassKey,
    _classify_each,
    classify,
    tier_of,
)


def oracle(request: PriceRequest, models: Mapping[str, ServedModel]) -> list[tuple[int, ClassKey]]:
    tier = tier_of(request)
    strike_measures = bool(set(request.measures) & set(PRICE_MEASURES))
    runs: list[tuple[int, ClassKey]] = []
    current: ClassKey | None = None
    for i, c in enumerate(request.contracts):
        served = models.get(c.process)
        if served is None:
            method = "reference"
        elif c.expiry_years is None or c.spot is None:
            method = "cvnn"
        else:
            ranges = served.domain.ranges
            lo, hi = ranges[-1].low, ranges[-1].high
            t = c.expiry_years
            params = c.process_params()
            inside = lo <= t <= hi and all(r.low <= params.get(r.name, math.nan) <= r.high for r in ranges[:-1])
            kf = served.domain.certified_moneyness
            if inside and strike_measures:
                carry = (c.rate or 0.0) - (c.dividend or 0.0)
                if c.fixings is None:
                    ratio = math.exp(carry * t)
                else:
                    step = carry * t / c.fixings
                    ratio = (
                        1.0
                        if abs(step) < 1e-12
                        else math.exp(step) * math.expm1(carry * t) / (c.fixings * math.expm1(step))
                    )
                inside = kf[0] <= c.strike / (c.spot * ratio) <= kf[1]
            method = "cvnn" if inside else "reference"
        key = (c.process, method, tier)
        if key != current:
            if current is not None:
                runs.append((i, current))
            current = key
    assert current is not None
    runs.append((len(request.contracts), current))
    return runs


@pytest.fixture(scope="module")
def served() -> dict[str, ServedModel]:
    return {n: load_served_model(read_dir(p, need_training=False), name=n) for n, p in bundled_models().items()}


def contract(rng: random.Random, i: int) -> dict[str, Any]:
    kind = rng.choice(["gbm", "gbm", "gbm_params", "heston", "merton", "asian", "by_ref"])
    if kind == "by_ref":
        return {"id": f"c{i}", "right": "call", "strike": 100.0, "underlying": "SPX", "expiry": "2027-06-18"}
    spot = 100.0
    c: dict[str, Any] = {
        "id": f"c{i}",
        "right": rng.choice(["call", "put"]),
        "spot": spot,
        "strike": spot * rng.choice([rng.uniform(0.5, 1.6), rng.uniform(0.9, 1.1)]),
        "expiry_years": rng.choice([rng.uniform(0.01, 6.0), rng.uniform(0.2, 2.0)]),
        "rate": rng.choice([0.0, 0.03, -0.01]),
    }
    if rng.random() < 0.5:
        c["dividend"] = rng.uniform(0, 0.04)
    vol = rng.choice([rng.uniform(0.02, 1.5), rng.uniform(0.15, 0.4)])
    if kind == "gbm":
        c["vol"] = vol
    elif kind == "gbm_params":
        c["params"] = {"vol": vol}
    elif kind == "heston":
        c.update(
            process="heston",
            params={
                "v0": rng.uniform(0.005, 0.3),
                "kappa": rng.uniform(0.3, 6),
                "theta": rng.uniform(0.01, 0.2),
                "xi": rng.uniform(0.1, 1.2),
                "rho": rng.uniform(-0.95, 0.3),
            },
        )
    elif kind == "merton":
        c.update(
            process="merton",
            params={
                "sigma": rng.uniform(0.05, 0.6),
                "lambda": rng.uniform(0, 2),
                "mu_j": rng.uniform(-0.4, 0.2),
                "sigma_j": rng.uniform(0.01, 0.5),
            },
        )
    else:
        c.update(process="asian", vol=vol, fixings=rng.randint(1, 260))
    return c


def valid_request(rng: random.Random, n: int, measures: list[str]) -> PriceRequest:
    bodies: list[dict[str, Any]] = []
    while len(bodies) < n:
        body = contract(rng, len(bodies))
        try:
            PriceRequest.model_validate({"contracts": [body], "val_datetime": "2026-11-26T16:00:00Z"})
        except ValueError:
            continue
        bodies.append(body)
    return PriceRequest.model_validate(
        {"contracts": bodies, "measures": measures, "val_datetime": "2026-11-26T16:00:00Z"}
    )


@pytest.mark.parametrize("seed", range(6))
def test_classify_reads_the_book_as_the_contracts_read(seed: int, served: dict[str, ServedModel]) -> None:
    rng = random.Random(seed)
    measures = [["price"], ["stdev"], ["price", "vega"], ["quantiles"]][seed % 4]
    request = valid_request(rng, 150, measures)
    assert len(request.contracts) >= VECTOR_MIN_CONTRACTS  # classify reads the Book
    tier = tier_of(request)
    strike = bool(set(measures) & set(PRICE_MEASURES))
    for models in (served, {k: v for k, v in served.items() if k != "heston"}, {}):
        want = oracle(request, models)
        views = {k: v.view for k, v in models.items()}  # classify reads the models' views (engine/view.py)
        assert classify(request, views) == want
        assert _classify_each(request, views, tier, strike) == want  # the small-request reading
    methods = {key[1] for _, key in classify(request, {k: v.view for k, v in served.items()})}
    assert methods == {"cvnn", "reference"}, "the random books must cross the domains' bounds"
