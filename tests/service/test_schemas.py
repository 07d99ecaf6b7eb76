"""Validation of the POST /v1/price body (docs/api.md): what is accepted, the defaults,
and that every rejection names the field and the reason."""

from __future__ import annotations

import math
from datetime import date
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.pricing.schemas import (
    DEFAULT_QUANTILE_LEVELS,
    MAX_CONTRACTS,
    Contract,
    PriceRequest,
    format_validation_error,
    one_line,
)

C1: dict[str, Any] = {
    "id": "c1",
    "right": "call",
    "strike": 105.0,
    "spot": 100.0,
    "expiry_years": 0.5,
    "rate": 0.03,
    "dividend": 0.01,
    "process": "gbm",
    "vol": 0.25,
}
C2: dict[str, Any] = {
    "id": "c2",
    "right": "put",
    "strike": 95.0,
    "spot": 100.0,
    "expiry_years": 1.0,
    "rate": 0.03,
    "dividend": 0.0,
    "process": "heston",
    "params": {"v0": 0.04, "kappa": 1.5, "theta": 0.04, "xi": 0.5, "rho": -0.7},
}
C3: dict[str, Any] = {"id": "c3", "right": "call", "strike": 4100.0, "underlying": "SPX", "expiry": "2027-06-18"}
EXAMPLE_HEAD: dict[str, Any] = {
    "namespace": "default",
    "val_datetime": "2026-11-26T16:00:00Z",
    "data_asof": "2026-11-26T16:00:05Z",
    "measures": [
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
    ],
    "quantile_levels": [0.01, 0.05, 0.5, 0.95, 0.99],
}


def _contract(**changes: Any) -> dict[str, Any]:
    """C1 with fields changed; a value of None removes the field."""
    out = dict(C1)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _errors(body: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        PriceRequest.model_validate(body)
    details = format_validation_error(info.value)
    assert details, "a rejection must carry at least one detail"
    for d in details:
        assert set(d) == {"field", "reason"}
        assert isinstance(d["field"], str)
        assert d["field"]
        assert isinstance(d["reason"], str)
        assert d["reason"]
    return details


def _one(body: Any) -> dict[str, Any]:
    details = _errors(body)
    assert len(details) == 1, details
    return details[0]


def _contract_error(**changes: Any) -> dict[str, Any]:
    return _one({"contracts": [_contract(**changes)]})


# -- what is accepted -----------------------------------------------------------------


def test_contract_example_c1_validates() -> None:
    request = PriceRequest.model_validate({**EXAMPLE_HEAD, "contracts": [C1]})
    c = request.contracts[0]
    assert c.id == "c1"
    assert c.right == "call"
    assert c.is_explicit
    assert c.market_inputs() == (100.0, 0.5, 0.03, 0.01)
    assert c.process_params() == {"vol": 0.25}
    assert request.measures == EXAMPLE_HEAD["measures"]
    assert request.levels == (0.01, 0.05, 0.5, 0.95, 0.99)
    assert request.val_datetime is not None
    assert request.val_datetime.year == 2026
    assert request.data_asof is not None
    assert request.data_asof > request.val_datetime


def test_contract_example_c3_validates_as_market_data_contract() -> None:
    request = PriceRequest.model_validate({**EXAMPLE_HEAD, "contracts": [C1, C3]})
    c3 = request.contracts[1]
    assert not c3.is_explicit
    assert c3.underlying == "SPX"
    assert c3.expiry == date(2027, 6, 18)
    assert c3.spot is None
    assert c3.expiry_years is None
    with pytest.raises(ValueError, match="c3"):
        c3.market_inputs()


def test_contract_example_validates_heston_included() -> None:
    request = PriceRequest.model_validate({**EXAMPLE_HEAD, "contracts": [C1, C2, C3]})
    assert [c.process for c in request.contracts] == ["gbm", "heston", "gbm"]
    assert request.contracts[1].process_params() == C2["params"]


def test_unknown_process_is_named_with_known_ones() -> None:
    details = _errors({**EXAMPLE_HEAD, "contracts": [C1, {**C2, "process": "sabr"}, C3]})
    assert [d["field"] for d in details] == ["contracts[1].process"]
    reason = details[0]["reason"]
    assert "sabr" in reason
    assert "known" in reason
    for name in PROCESSES:
        assert name in reason


def test_example_body_as_json_text_validates_without_heston() -> None:
    text = orjson.dumps({**EXAMPLE_HEAD, "contracts": [C1, C3]})
    request = PriceRequest.model_validate_json(text)
    assert [c.id for c in request.contracts] == ["c1", "c3"]


def test_defaults() -> None:
    request = PriceRequest.model_validate(
        {"contracts": [{"id": "a", "right": "put", "strike": 90.0, "spot": 100.0, "expiry_years": 1.0, "vol": 0.2}]}
    )
    assert request.measures == ["price"]
    assert request.namespace == "default"
    assert request.val_datetime is None
    assert request.data_asof is None
    assert request.quantile_levels is None
    assert request.levels == DEFAULT_QUANTILE_LEVELS
    c = request.contracts[0]
    assert c.process == "gbm"
    assert c.rate is None
    assert c.dividend is None
    assert c.market_inputs() == (100.0, 1.0, 0.0, 0.0)
    assert c.process_params() == {"vol": 0.2}


def test_vol_in_params_is_accepted() -> None:
    c = Contract.model_validate(_contract(vol=None, params={"vol": 0.3}))
    assert c.process_params() == {"vol": 0.3}


def test_max_contracts_is_accepted() -> None:
    contracts = [_contract(id=f"c{i}") for i in range(MAX_CONTRACTS)]
    request = PriceRequest.model_validate({"contracts": contracts})
    assert len(request.contracts) == MAX_CONTRACTS


# -- rejections: field path and reason -------------------------------------------------


@pytest.mark.parametrize("field", ["spot", "strike", "vol", "expiry_years"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_non_positive_inputs_are_rejected(field: str, value: float) -> None:
    d = _contract_error(**{field: value})
    assert d["field"] == f"contracts[0].{field}"
    assert "greater than or equal to" in d["reason"]


@pytest.mark.parametrize("field", ["spot", "strike", "vol", "expiry_years", "rate", "dividend"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_rejected(field: str, value: float) -> None:
    d = _contract_error(**{field: value})
    assert d["field"] == f"contracts[0].{field}"
    assert "finite" in d["reason"]


def test_non_finite_param_is_rejected() -> None:
    d = _contract_error(vol=None, params={"vol": math.nan})
    assert d["field"] == "contracts[0].params.vol"
    assert "finite" in d["reason"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_json_text_is_refused(token: str) -> None:
    text = orjson.dumps({"contracts": [_contract(strike="TOKEN")]}).decode().replace('"TOKEN"', token)
    assert token in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)  # what the CLI and the service parse with
    with pytest.raises(ValidationError) as info:
        PriceRequest.model_validate_json(text)  # pydantic's own parser reads the token; the schema refuses it
    details = format_validation_error(info.value)
    assert [d["field"] for d in details] == ["contracts[0].strike"]
    assert "finite" in details[0]["reason"]


@pytest.mark.parametrize("field", ["strike", "right", "id"])
def test_missing_required_contract_field(field: str) -> None:
    d = _contract_error(**{field: None})
    assert d["field"] == f"contracts[0].{field}"
    assert "required" in d["reason"].lower()


@pytest.mark.parametrize("field", ["vol", "spot", "expiry_years"])
def test_missing_explicit_input(field: str) -> None:
    d = _contract_error(**{field: None})
    assert d["field"].startswith("contracts[0]")
    assert "missing" in d["reason"]
    assert field in d["reason"]


def test_unknown_contract_field() -> None:
    body = {"contracts": [{**_contract(strike=None), "strik": 105.0}]}
    fields = {d["field"]: d["reason"] for d in _errors(body)}
    assert "contracts[0].strik" in fields
    assert "Extra inputs are not permitted" in fields["contracts[0].strik"]
    assert "contracts[0].strike" in fields  # the intended field is reported missing as well


def test_unknown_top_level_field() -> None:
    d = _one({"contracts": [C1], "measure": ["price"]})
    assert d["field"] == "measure"
    assert "not permitted" in d["reason"]


def test_unknown_measure() -> None:
    d = _one({"contracts": [C1], "measures": ["price", "vanna"]})
    assert d["field"] == "measures[1]"
    assert "vanna" in d["reason"]
    assert "'price'" in d["reason"]


def test_empty_measures() -> None:
    d = _one({"contracts": [C1], "measures": []})
    assert d["field"] == "measures"


def test_duplicate_contract_ids() -> None:
    d = _one({"contracts": [C1, _contract(strike=110.0), _contract(id="c2")]})
    assert d["field"].startswith("contracts"), d
    assert "duplicate" in d["reason"]
    assert "c1" in d["reason"]


def test_duplicate_measures() -> None:
    d = _one({"contracts": [C1], "measures": ["price", "delta", "price"]})
    assert d["field"].startswith("measures"), d
    assert "at most once" in d["reason"]


@pytest.mark.parametrize(("level", "why"), [(0.0, "greater than 0"), (1.0, "less than 1"), (1.5, "less than 1")])
def test_quantile_levels_outside_unit_interval(level: float, why: str) -> None:
    d = _one({"contracts": [C1], "measures": ["quantiles"], "quantile_levels": [0.5, level]})
    assert d["field"] == "quantile_levels[1]"
    assert why in d["reason"]


def test_quantile_levels_without_quantiles_measure() -> None:
    d = _one({"contracts": [C1], "measures": ["price"], "quantile_levels": [0.5]})
    assert d["field"] in ("quantile_levels", "measures"), d
    assert "quantile_levels" in d["reason"]
    assert "quantiles" in d["reason"]


def test_empty_contracts() -> None:
    d = _one({"contracts": []})
    assert d["field"] == "contracts"
    assert "at least 1" in d["reason"]


def test_missing_contracts() -> None:
    d = _one({"measures": ["price"]})
    assert d["field"] == "contracts"
    assert "required" in d["reason"].lower()


def test_too_many_contracts() -> None:
    contracts = [_contract(id=f"c{i}") for i in range(MAX_CONTRACTS + 1)]
    d = _one({"contracts": contracts})
    assert d["field"] == "contracts"
    assert str(MAX_CONTRACTS) in d["reason"].replace(",", "").replace("_", "")


def test_vol_both_top_level_and_in_params() -> None:
    d = _contract_error(params={"vol": 0.25})
    assert d["field"].startswith("contracts[0]")
    assert "either" in d["reason"]
    assert "params" in d["reason"]


def test_gbm_params_with_extra_keys() -> None:
    d = _contract_error(vol=None, params={"vol": 0.2, "kappa": 1.0})
    assert d["field"].startswith("contracts[0]")
    assert "kappa" in d["reason"]


def test_gbm_params_vol_out_of_range() -> None:
    d = _contract_error(vol=None, params={"vol": -0.2})
    assert d["field"] == "contracts[0].params.vol"
    assert d["reason"] == "must be in [0.001, 5], got -0.2"


def test_underlying_without_expiry() -> None:
    d = _one({"contracts": [{"id": "c3", "right": "call", "strike": 4100.0, "underlying": "SPX"}]})
    assert d["field"].startswith("contracts[0]")
    assert "underlying" in d["reason"]
    assert "expiry" in d["reason"]


def test_expiry_without_underlying() -> None:
    d = _one({"contracts": [{"id": "c3", "right": "call", "strike": 4100.0, "expiry": "2027-06-18"}]})
    assert d["field"].startswith("contracts[0]")
    assert "underlying" in d["reason"]


def test_underlying_mixed_with_spot() -> None:
    d = _one({"contracts": [C1, {**C3, "spot": 4000.0}]})
    assert d["field"].startswith("contracts[1]")
    assert "spot" in d["reason"]
    assert "not both" in d["reason"]


def test_bad_right_and_bad_expiry_date() -> None:
    details = _errors({"contracts": [{**C3, "right": "straddle", "expiry": "2027-13-45"}]})
    fields = {d["field"] for d in details}
    assert fields == {"contracts[0].right", "contracts[0].expiry"}


def test_body_must_be_an_object() -> None:
    d = _one([C1])
    assert d["field"] == "(body)"
    assert "got" not in d["reason"]  # no echo of a whole list


def test_several_errors_are_all_reported_with_paths() -> None:
    body = {"contracts": [_contract(strike=-1.0), _contract(id="c2", spot=math.nan, vol=0.0)]}
    fields = sorted(d["field"] for d in _errors(body))
    assert fields == ["contracts[0].strike", "contracts[1].spot", "contracts[1].vol"]


def test_reason_echoes_the_offending_value() -> None:
    d = _contract_error(strike=-3.5)
    assert "-3.5" in d["reason"]
    assert not d["reason"].startswith("Value error")


def test_one_line() -> None:
    body = {"contracts": [_contract(strike=-1.0), _contract(id="c2", vol=None)]}
    with pytest.raises(ValidationError) as info:
        PriceRequest.model_validate(body)
    line = one_line(format_validation_error(info.value))
    assert "\n" not in line
    assert line.startswith("contracts[0].strike: ")
    assert "greater than or equal to 0.000001" in line
    assert "; contracts[1]" in line
    assert "vol" in line.split("; ")[1]


def test_one_line_of_explicit_details() -> None:
    details = [{"field": "a[0].b", "reason": "bad"}, {"field": "c", "reason": "worse"}]
    assert one_line(details) == "a[0].b: bad; c: worse"
