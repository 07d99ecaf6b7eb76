"""Valuer: request -> response through a served (tiny, freshly trained) model, the
reference fallback outside the model's domain, and the response shape of docs/api.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch

from spectralmc_server.engine.checkpoint import read_dir, write_dir
from spectralmc_server.engine.cvnn import NetworkConfig
from spectralmc_server.engine.reference import black_scholes
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.pricing.valuation import RequestError, Valuer, dumps

ALL_MEASURES = [
    "price",
    "delta",
    "gamma",
    "vega",
    "theta",
    "rho",
    "mean",
    "stdev",
    "skew",
    "kurtosis",
    "quantiles",
]
BS_MEASURES = ("price", "delta", "gamma", "vega", "theta", "rho")
LEVELS = [0.01, 0.05, 0.5, 0.95, 0.99]
VERSION = 3


def _c(cid: str, right: str, strike: float, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": cid,
        "right": right,
        "strike": strike,
        "spot": 100.0,
        "expiry_years": 0.5,
        "rate": 0.03,
        "dividend": 0.01,
        "vol": 0.25,
    }
    base.update(kw)
    return base


# In-domain contracts (default GBM domain: vol in [0.05, 1], expiry in [0.02, 3]) as
# call/put pairs for parity, and two outside it; ids deliberately not sorted.
INSIDE = [
    _c("z-call", "call", 105.0),
    _c("z-put", "put", 105.0),
    _c("b-call", "call", 80.0, spot=90.0, expiry_years=2.0, rate=0.05, dividend=0.0, vol=0.6),
    _c("b-put", "put", 80.0, spot=90.0, expiry_years=2.0, rate=0.05, dividend=0.0, vol=0.6),
    _c("k-call", "call", 120.0, expiry_years=0.1, rate=-0.01, dividend=0.02, vol=None, params={"vol": 0.1}),
    _c("k-put", "put", 120.0, expiry_years=0.1, rate=-0.01, dividend=0.02, vol=None, params={"vol": 0.1}),
]
OUTSIDE = [
    _c("hi-vol", "call", 100.0, vol=3.0),
    _c("long", "put", 95.0, expiry_years=10.0),
]
PARITY = [("z-call", "z-put"), ("b-call", "b-put"), ("k-call", "k-put")]


def _request(contracts: list[dict[str, Any]], measures: list[str] | None = None, **extra: Any) -> PriceRequest:
    body: dict[str, Any] = {"contracts": contracts, **extra}
    if measures is not None:
        body["measures"] = measures
        if "quantiles" in measures:
            body["quantile_levels"] = LEVELS
    return PriceRequest.model_validate(body)


def _bs(contracts: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Black-Scholes on exactly the batch the valuer builds for these contracts."""
    request = _request(contracts)
    market = torch.tensor([c.market_inputs() for c in request.contracts], dtype=torch.float64)
    out = black_scholes(
        market[:, 0],
        torch.tensor([c.strike for c in request.contracts], dtype=torch.float64),
        market[:, 1],
        market[:, 2],
        market[:, 3],
        torch.tensor([c.process_params()["vol"] for c in request.contracts], dtype=torch.float64),
        torch.tensor([c.right == "call" for c in request.contracts], dtype=torch.bool),
    )
    return {k: v.tolist() for k, v in out.items()}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TrainConfig(
        process="gbm",
        batch_points=16,
        paths=64,
        validate_every=10,
        validation_grid=3,
        schedule_steps=20,
        warmup_steps=5,
        # A residual over the normal law keeps a 20-step model's density sane, so every
        # measure is defined; an untrained plain network's density can be all noise.
        network=NetworkConfig(width=8, depth=1, head="log_cf", baseline="gaussian"),
    )
    trainer = Trainer(config)
    try:
        trainer.run(20)
        ckpt = trainer.checkpoint()
    finally:
        trainer.close()
    path = tmp_path_factory.mktemp("valuation") / "gbm"
    write_dir(ckpt, path)
    return path


@pytest.fixture(scope="session")
def served(checkpoint_dir: Path) -> ServedModel:
    # A 20-step network with no certificate: these tests are about how rows are built, so
    # the raw network answers (require_certificate=False; the server never does this).
    return load_served_model(read_dir(checkpoint_dir, need_training=False), version=VERSION, require_certificate=False)


@pytest.fixture(scope="session")
def valuer(served: ServedModel) -> Valuer:
    return Valuer({"gbm": served})


def test_response_shape(valuer: Valuer, served: ServedModel) -> None:
    contracts = [INSIDE[0], OUTSIDE[0], INSIDE[1], OUTSIDE[1], *INSIDE[2:]]
    response = valuer.value(_request(contracts, ALL_MEASURES))
    assert set(response) == {"namespace", "val_datetime", "data_asof", "results", "models", "market_data"}
    assert response["market_data"] is None
    assert [r["id"] for r in response["results"]] == [c["id"] for c in contracts]
    for row in response["results"]:
        assert list(row) == ["id", "model", "method", *ALL_MEASURES, "error_bound"]
        assert row["model"] == "gbm"
        assert row["method"] in ("cvnn", "reference")
        # every measure has a bound: a reference answer's method's own; this fixture's
        # network has no certificate, so its learned answers' bounds are null
        assert list(row["error_bound"]) == ALL_MEASURES
        learned = row["method"] == "cvnn"
        for m in ALL_MEASURES[:-1]:
            assert (row["error_bound"][m] is None) if learned else isinstance(row["error_bound"][m], float), m
        for m in ALL_MEASURES[:-1]:
            assert isinstance(row[m], float), (row["id"], m)
        assert list(row["quantiles"]) == ["0.01", "0.05", "0.5", "0.95", "0.99"]
        assert all(isinstance(v, float) for v in row["quantiles"].values())
    assert response["models"] == {"gbm": {"version": VERSION, "content_hash": served.content_hash}}
    assert response["models"]["gbm"]["content_hash"].startswith("sha256:")


def test_every_measure_is_a_finite_number(valuer: Valuer) -> None:
    """A requested measure is a number in the response, never NaN (which JSON writes as null)."""
    response = valuer.value(_request([*INSIDE, *OUTSIDE], ALL_MEASURES))
    for row in response["results"]:
        for m in ALL_MEASURES[:-1]:
            assert math.isfinite(row[m]), (row["id"], row["method"], m, row[m])
        values = list(row["quantiles"].values())
        assert all(math.isfinite(v) and v > 0 for v in values), (row["id"], values)
        assert values == sorted(values), row["id"]
    values = [{k: v for k, v in row.items() if k != "error_bound"} for row in response["results"]]
    assert b"null" not in dumps({"results": values})  # market_data is null by contract
    assert orjson.loads(dumps(response)) == response


def test_default_measures_and_levels(valuer: Valuer) -> None:
    response = valuer.value(_request([INSIDE[0]]))
    assert list(response["results"][0]) == ["id", "model", "method", "price", "error_bound"]
    response = valuer.value(PriceRequest.model_validate({"contracts": [INSIDE[0]], "measures": ["quantiles"]}))
    assert list(response["results"][0]["quantiles"]) == ["0.01", "0.05", "0.5", "0.95", "0.99"]


def test_quantile_keys_use_the_levels_repr(valuer: Valuer) -> None:
    levels = [0.1, 0.25, 0.3333, 0.9]
    request = PriceRequest.model_validate(
        {"contracts": [INSIDE[0], OUTSIDE[0]], "measures": ["quantiles"], "quantile_levels": levels}
    )
    for row in valuer.value(request)["results"]:
        assert list(row["quantiles"]) == ["0.1", "0.25", "0.3333", "0.9"]


def test_domain_decides_the_method(valuer: Valuer) -> None:
    contracts = [*OUTSIDE, *INSIDE]
    response = valuer.value(_request(contracts, ALL_MEASURES))
    method = {r["id"]: r["method"] for r in response["results"]}
    assert method == {**{c["id"]: "reference" for c in OUTSIDE}, **{c["id"]: "cvnn" for c in INSIDE}}


def test_outside_domain_equals_black_scholes_exactly(valuer: Valuer) -> None:
    response = valuer.value(_request([INSIDE[0], OUTSIDE[0], INSIDE[1], OUTSIDE[1]], ALL_MEASURES))
    rows = [r for r in response["results"] if r["method"] == "reference"]
    assert [r["id"] for r in rows] == [c["id"] for c in OUTSIDE]
    expected = _bs(OUTSIDE)
    for j, row in enumerate(rows):
        for m in BS_MEASURES:
            assert row[m] == expected[m][j], (row["id"], m)


def test_outside_domain_alone(valuer: Valuer) -> None:
    response = valuer.value(_request(OUTSIDE, ["price"]))
    assert [r["price"] for r in response["results"]] == _bs(OUTSIDE)["price"]
    assert all(r["method"] == "reference" for r in response["results"])
    assert response["models"] == {}  # no learned answer, so no model version to report
    assert response["market_data"] is None


def test_same_request_same_bytes(valuer: Valuer, checkpoint_dir: Path) -> None:
    request = _request([*INSIDE, *OUTSIDE], ALL_MEASURES)
    first = dumps(valuer.value(request))
    assert dumps(valuer.value(request)) == first
    # A fresh load of the same checkpoint, and a request re-parsed from its JSON, answer the same bytes.
    again = Valuer({"gbm": load_served_model(read_dir(checkpoint_dir), version=VERSION, require_certificate=False)})
    reparsed = PriceRequest.model_validate_json(request.model_dump_json())
    assert dumps(again.value(reparsed)) == first


def test_batch_composition_does_not_change_a_row(valuer: Valuer) -> None:
    # Not bit-identical: the float32 network's GEMMs depend on the batch size.
    alone = valuer.value(_request([INSIDE[0]], ALL_MEASURES))["results"][0]
    together = valuer.value(_request([*OUTSIDE, *INSIDE], ALL_MEASURES))["results"][len(OUTSIDE)]
    assert together["id"] == alone["id"]
    for m in BS_MEASURES:
        assert together[m] == pytest.approx(alone[m], rel=1e-6, abs=1e-9), m
    assert together["quantiles"] == pytest.approx(alone["quantiles"], rel=1e-6)


def test_put_call_parity_for_learned_rows(valuer: Valuer) -> None:
    response = valuer.value(_request(INSIDE, ["price", "delta", "rho"]))
    rows = {r["id"]: r for r in response["results"]}
    inputs = {c.id: c for c in _request(INSIDE).contracts}
    for call_id, put_id in PARITY:
        assert rows[call_id]["method"] == rows[put_id]["method"] == "cvnn"
        spot, expiry, rate, dividend = inputs[call_id].market_inputs()
        strike = inputs[call_id].strike
        disc = math.exp(-rate * expiry)
        fwd = spot * math.exp((rate - dividend) * expiry)
        lhs = rows[call_id]["price"] - rows[put_id]["price"]
        rhs = disc * (fwd - strike)
        assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-9 * spot), (call_id, lhs, rhs)
        # Parity differentiated in spot: delta_C - delta_P = e^{-qT}.
        d_lhs = rows[call_id]["delta"] - rows[put_id]["delta"]
        assert d_lhs == pytest.approx(math.exp(-dividend * expiry), rel=1e-9)


def test_no_model_answers_reference_everywhere() -> None:
    contracts = [*INSIDE, *OUTSIDE]
    response = Valuer({}).value(_request(contracts, ALL_MEASURES))
    assert [r["id"] for r in response["results"]] == [c["id"] for c in contracts]
    assert all(r["method"] == "reference" for r in response["results"])
    assert all(r["model"] == "gbm" for r in response["results"])
    assert response["models"] == {}
    assert response["market_data"] is None
    expected = _bs(contracts)
    for j, row in enumerate(response["results"]):
        for m in BS_MEASURES:
            assert row[m] == expected[m][j], (row["id"], m)


def test_no_model_is_deterministic() -> None:
    request = _request([*INSIDE, *OUTSIDE], ALL_MEASURES)
    assert dumps(Valuer({}).value(request)) == dumps(Valuer({}).value(request))


@pytest.mark.parametrize("use_model", [True, False])
def test_market_data_contract_is_a_request_error(valuer: Valuer, use_model: bool) -> None:
    market = {"id": "c3", "right": "call", "strike": 4100.0, "underlying": "SPX", "expiry": "2027-06-18"}
    request = _request([INSIDE[0], OUTSIDE[0], market])
    with pytest.raises(RequestError) as info:
        (valuer if use_model else Valuer({})).value(request)
    assert info.value.field == "contracts[2]"
    assert str(info.value).startswith("contracts[2]: ")
    assert "spot" in info.value.reason
    assert isinstance(info.value, ValueError)
