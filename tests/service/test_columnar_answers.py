"""The Valuer's columnar answers (pricing/valuation.py ``value_many(..., columnar)``) are
the row answers turned into columns (pricing/columns.py ``answer_columns``), bit for bit:
as JSON bytes and as Arrow streams; with withheld measures (null, and the warning) and
every measure and quantile level; for requests mixing processes and split into slices
joined by the batcher (``merge_answers``)."""

from __future__ import annotations

import random

import pytest
from test_book import random_contract

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.arrow import answer_ipc
from spectralmc_server.pricing.book import sliced
from spectralmc_server.pricing.columns import answer_columns
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.pricing.valuation import Valuer, dumps
from spectralmc_server.service.batcher import merge_answers

MEASURES = [["price"], ["price", "delta", "gamma", "vega"], ["price", "stdev", "quantiles", "digital"]]


@pytest.fixture(scope="module")
def served() -> dict[str, ServedModel]:
    return {n: load_served_model(read_dir(p, need_training=False), name=n) for n, p in bundled_models().items()}


def book(seed: int, n: int, measures: list[str]) -> PriceRequest:
    rng = random.Random(seed)
    body = {"measures": measures, "contracts": [random_contract(rng, i) for i in range(n)]}
    if "quantiles" in measures:
        body["quantile_levels"] = [0.05, 0.5, 0.95]
    return PriceRequest.model_validate(body)


@pytest.mark.parametrize("seed", range(3))
def test_columnar_answers_are_the_rows_as_columns(seed: int, served: dict[str, ServedModel]) -> None:
    valuer = Valuer(served)
    requests = [book(100 * seed + k, 40, MEASURES[k]) for k in range(3)]
    rows = valuer.value_many(requests)
    # the same requests, columnar and rows mixed in one call
    mixed = valuer.value_many(requests, [True, False, True])
    assert dumps(mixed[1]) == dumps(rows[1])
    for k in (0, 2):
        want = answer_columns(rows[k], requests[k])
        assert dumps(mixed[k]) == dumps(want), k
        assert list(mixed[k]) == list(want)  # the keys, in order
        assert answer_ipc(mixed[k], requests[k]) == answer_ipc(rows[k], requests[k])
    withheld = [w for w in mixed[2]["columns"]["warnings"] if w]
    if seed == 0:
        assert withheld, "the book must withhold a measure somewhere (the asian stdev or quantiles)"


def test_split_columnar_answers_join_to_the_unsplit_one(served: dict[str, ServedModel]) -> None:
    valuer = Valuer(served)
    request = book(7, 50, MEASURES[2])
    whole = valuer.value_many([request], [True])[0]
    parts = [valuer.value_many([sliced(request, a, min(a + 16, 50))], [True])[0] for a in range(0, 50, 16)]
    assert dumps(merge_answers(parts, served)) == dumps(whole)
