"""Columnar books (pricing/columns.py, docs/api.md "Columnar books and Arrow"): the
vectorised validator accepts exactly what ``PriceRequest.model_validate`` accepts on the
rows a book stands for, builds equal contracts, and names the same first failing row;
its errors name the row and the field; POST /v1/price answers a columnar book in columns
with the row answer's numbers."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import date
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import ValidationError
from server_util import CONTRACT, MakeClient, assert_error

from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.engine.processes.base import EXPIRY_BOUNDS, MONEYNESS_BOUNDS, PRICE_BOUNDS, VOL_BOUNDS
from spectralmc_server.pricing.cells import PARAMS_PREFIX, RULES
from spectralmc_server.pricing.columns import answer_column_names, answer_columns, request_from_columns
from spectralmc_server.pricing.contract_rules import row_verdicts
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import MAX_CONTRACTS, Contract, PriceRequest, format_validation_error

Row = dict[str, Any]
Columns = dict[str, list[Any]]
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.05, "xi": 0.5, "rho": -0.7}
MERTON = {"sigma": 0.2, "lambda": 0.5, "mu_j": -0.1, "sigma_j": 0.15}


# -- books as rows and as columns --------------------------------------------------------


def columns_of(rows: list[Row]) -> Columns:
    """Rows as columns: every key any row has, params flattened, None where absent."""
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            keys = [PARAMS_PREFIX + k for k in value] if key == "params" else [key]
            names += [k for k in keys if k not in names]
    cols: Columns = {}
    for name in names:
        if name.startswith(PARAMS_PREFIX):
            p = name[len(PARAMS_PREFIX) :]
            cols[name] = [(row.get("params") or {}).get(p) for row in rows]
        else:
            cols[name] = [row.get(name) for row in rows]
    return cols


def rows_of(cols: Columns) -> list[Row]:
    """The rows a book stands for: absent (null) cells left out, params gathered."""
    n = len(next(iter(cols.values()))) if cols else 0
    rows = []
    for i in range(n):
        row: Row = {}
        params: Row = {}
        for name, cells in cols.items():
            if cells[i] is None:
                continue
            if name.startswith(PARAMS_PREFIX):
                params[name[len(PARAMS_PREFIX) :]] = cells[i]
            else:
                row[name] = cells[i]
        if params:
            row["params"] = params
        rows.append(row)
    return rows


# -- random books ------------------------------------------------------------------------


def _explicit(rng: random.Random) -> Row:
    row: Row = {"spot": rng.uniform(50, 150), "expiry_years": rng.choice([0.25, 0.5, 1.0, rng.uniform(0.01, 5)])}
    if rng.random() < 0.5:
        row["rate"] = rng.uniform(-0.05, 0.08)
    if rng.random() < 0.4:
        row["dividend"] = rng.uniform(0, 0.05)
    return row


def valid_row(rng: random.Random, i: int) -> Row:
    row: Row = {"id": f"c{i}", "right": rng.choice(["call", "put"]), "strike": rng.uniform(60, 140)}
    kind = rng.choice(["gbm", "gbm", "gbm-params", "heston", "merton", "asian", "ref", "ref-asian"])
    if kind == "gbm":
        row.update(_explicit(rng), vol=rng.uniform(0.05, 0.8))
        if rng.random() < 0.3:
            row["process"] = "gbm"
    elif kind == "gbm-params":
        row.update(_explicit(rng), params={"vol": rng.uniform(0.05, 0.8)})
    elif kind == "heston":
        row.update(_explicit(rng), process="heston", params={k: v * rng.uniform(0.8, 1.2) for k, v in HESTON.items()})
    elif kind == "merton":
        row.update(_explicit(rng), process="merton", params={k: v * rng.uniform(0.8, 1.2) for k, v in MERTON.items()})
    elif kind == "asian":
        row.update(_explicit(rng), process="asian", vol=rng.uniform(0.05, 0.8), fixings=rng.randint(1, 64))
    else:
        row.update(underlying="SPX", expiry=rng.choice(["2027-06-18", "2026-12-31", date(2027, 3, 19)]))
        if kind == "ref-asian":
            row.update(process="asian", fixings=rng.randint(1, 64))
    return row


NUMBER_FIELDS = {
    "strike": PRICE_BOUNDS,
    "spot": PRICE_BOUNDS,
    "expiry_years": EXPIRY_BOUNDS,
    "rate": (-1.0, 1.0),
    "dividend": (-1.0, 1.0),
    "vol": VOL_BOUNDS,
}
NOT_NUMBERS: list[Any] = ["1.0", True, False, [1.0], {"x": 1.0}, math.nan, math.inf, -math.inf, 2**1100]
NOT_STRINGS: list[Any] = [5, 1.5, True, [], {}, ""]


def _number_cases(low: float, high: float) -> list[Any]:
    return [
        low,
        high,
        math.nextafter(low, -math.inf),
        math.nextafter(high, math.inf),
        0.0,
        -1.0,
        1e300,
        int(max(low, 1.0)),
        *NOT_NUMBERS,
        None,
    ]


def _mutate_field(rng: random.Random, row: Row) -> None:
    name = rng.choice([*NUMBER_FIELDS, "id", "right", "process", "fixings", "underlying", "expiry", "params"])
    if name in NUMBER_FIELDS:
        row[name] = rng.choice(_number_cases(*NUMBER_FIELDS[name]))
    elif name == "id":
        row[name] = rng.choice([*NOT_STRINGS, "x" * 128, "x" * 129, None, "é" * 128])
    elif name == "right":
        row[name] = rng.choice([*NOT_STRINGS, "straddle", "Call", None, "put"])
    elif name == "process":
        row[name] = rng.choice([*NOT_STRINGS, "levy", "GBM", None, "gbm", "heston", "merton", "asian"])
    elif name == "fixings":
        row[name] = rng.choice([0, 1, 64, 65, 3.0, True, "3", -2, 2**70, None, 12])
    elif name == "underlying":
        row[name] = rng.choice([*NOT_STRINGS, "S" * 64, "S" * 65, "SPX", None])
    elif name == "expiry":
        row[name] = rng.choice(["2027-13-01", "2027-06-18", "20270618", "2027-06-18T00:00:00Z", 5, date(2027, 6, 18)])
    else:
        params = dict(row.get("params") or {})
        key = rng.choice(["vol", "kappa", "v0", "rho", "sigma", "lambda", "sigma_j", "mu_j", "other"])
        params[key] = rng.choice([0.3, 1e-7, 10.0, -0.995, 0.0, 2.0, 1, *NOT_NUMBERS, None])
        row["params"] = params


def _param_bound(rng: random.Random, row: Row) -> None:
    """One of the process's own parameters at, just past or far past a bound (as vol or in params)."""
    process = PROCESSES.get(str(row.get("process", "gbm")), PROCESSES["gbm"])
    key = rng.choice([k for k in process.param_bounds if k in process.market_param_names])
    value = rng.choice(_number_cases(*process.param_bounds[key])[:8])
    if key == "vol" and "params" not in row:
        row["vol"] = value
    else:
        row["params"] = {**(row.get("params") or {}), key: value}


def _tight(rng: random.Random, row: Row) -> None:
    """A contract at a cross-field bound: spread, K/F, merton's spike."""
    t = rng.choice([0.64, 1.0, 16.0, 29.0])
    case = rng.choice(["spread", "wide", "kf-high", "kf-low", "spike", "heston-wide"])
    if case in ("spread", "wide"):
        vol = 4.0 / math.sqrt(t) * (1.0 if case == "spread" else 1.01)
        row.update(spot=100.0, expiry_years=t, vol=min(vol, 5.0), process=rng.choice(["gbm", "asian"]))
        row.pop("params", None)
        row.pop("underlying", None)
        row.pop("expiry", None)
        if row["process"] == "asian":
            row["fixings"] = rng.randint(1, 64)
        else:
            row.pop("fixings", None)
    elif case.startswith("kf"):
        rate, dividend = rng.choice([(0.0, 0.0), (0.05, 0.01), (-0.02, 0.03)])
        bound = MONEYNESS_BOUNDS[1] if case == "kf-high" else MONEYNESS_BOUNDS[0]
        spot = 1.0 if case == "kf-high" else 1000.0
        strike = bound * spot * math.exp((rate - dividend) * t) * rng.choice([1.0, 1.0 + 1e-15, 1.0 - 1e-15, 1.001])
        row.update(spot=spot, strike=strike, expiry_years=t, rate=rate, dividend=dividend, vol=0.2, process="gbm")
        for k in ("params", "fixings", "underlying", "expiry"):
            row.pop(k, None)
    elif case == "spike":
        row.update(spot=100.0, expiry_years=1.0, process="merton")
        row["params"] = {"sigma": rng.choice([0.01, 0.05, 0.2]), "lambda": rng.choice([0.1, 15.0]), "mu_j": 0.0}
        row["params"]["sigma_j"] = rng.choice([0.0, 1.0, 2.0])
        for k in ("vol", "fixings", "underlying", "expiry"):
            row.pop(k, None)
    else:
        row.update(spot=100.0, expiry_years=t, process="heston", params={**HESTON, "v0": 1.0, "theta": 1.0})
        for k in ("vol", "fixings", "underlying", "expiry"):
            row.pop(k, None)


MUTATIONS: list[Callable[[random.Random, Row], None]] = [
    _mutate_field,
    _mutate_field,
    _param_bound,
    _param_bound,
    _tight,
    _tight,
    lambda rng, row: row.pop(rng.choice(list(row)), None),  # a field left out
    lambda rng, row: row.update(vol=0.3),  # vol beside params (heston, merton) or beside params.vol
    lambda rng, row: row.update(fixings=4),  # fixings on a european
    lambda rng, row: row.update(spot=100.0),  # explicit input on a contract by reference
    lambda rng, row: row.update(underlying="SPX"),  # by reference without expiry, or beside explicit inputs
    lambda rng, row: row.update(process=rng.choice(["gbm", "heston", "merton", "asian"])),  # the wrong inputs
]


def random_book(rng: random.Random) -> tuple[Row, list[Row]]:
    n = rng.randint(1, 8)
    rows = [valid_row(rng, i) for i in range(n)]
    bad_rate = rng.choice([0.0, 0.1, 0.3, 0.6])
    for row in rows:
        while rng.random() < bad_rate:
            rng.choice(MUTATIONS)(rng, row)
    if n > 1 and rng.random() < 0.15:
        j = rng.randrange(1, n)
        rows[j]["id"] = rows[rng.randrange(j)].get("id")
    head: Row = {}
    if rng.random() < 0.2:
        head["measures"] = rng.choice([["price", "delta"], ["quantiles"], ["price", "delta"], ["price", "price"]])
    if rng.random() < 0.05:
        head["quantile_levels"] = rng.choice([[0.5], [0.5, 1.5]])
    if rng.random() < 0.05:
        head[rng.choice(["namespace", "val_datetime", "colour"])] = "not valid!"
    return head, rows


# -- the equivalence ---------------------------------------------------------------------


def _row_index(field: str) -> int | None:
    if not field.startswith("contracts["):
        return None
    return int(field[len("contracts[") : field.index("]")])


def _same_types(got: Contract, want: Contract) -> None:
    for name in Contract.model_fields:
        a, b = getattr(got, name), getattr(want, name)
        assert type(a) is type(b), (name, a, b)
    for k, v in (want.params or {}).items():
        assert type((got.params or {})[k]) is type(v), (k, got.params, want.params)


def as_arrays(cols: Columns) -> dict[str, Any]:
    """The columns as an Arrow book gives them (pricing/arrow.py): each number column
    whose cells are all floats (no null) as one float64 array, the others as lists."""
    out: dict[str, Any] = {}
    for name, cells in cols.items():
        number = name.startswith(PARAMS_PREFIX) or (name in RULES and RULES[name].kind == "number")
        floats = all(type(c) is float for c in cells)
        out[name] = np.array(cells, dtype=np.float64) if number and floats else cells
    return out


def _same_from_arrays(head: Row, cols: Columns, got: PriceRequest | None, details: list[dict[str, Any]] | None) -> None:
    """The book read from float64 arrays gives the same request, or the same errors, as
    from lists of Python floats."""
    arrays = as_arrays(cols)
    if all(isinstance(c, list) for c in arrays.values()):
        return
    try:
        from_arrays = request_from_columns(head, arrays)
    except RequestRefusedError as exc:
        assert exc.details == details, (exc.details, details)
        return
    assert got is not None and from_arrays == got, details
    for a, b in zip(from_arrays.contracts, got.contracts, strict=True):
        _same_types(a, b)


def check_equivalent(head: Row, cols: Columns) -> str:
    """The columnar validator against PriceRequest.model_validate on the rows; the outcome."""
    rows = rows_of(cols)
    try:
        want: PriceRequest | None = PriceRequest.model_validate({**head, "contracts": rows})
        want_first = None
    except ValidationError as exc:
        want = None
        want_first = format_validation_error(exc)[0]["field"]
    try:
        got: PriceRequest | None = request_from_columns(head, cols)
        got_first, got_details = None, None
    except RequestRefusedError as exc:
        got = None
        got_first, got_details = exc.details[0]["field"], exc.details
    _same_from_arrays(head, cols, got, got_details)
    if want is not None:
        assert got is not None, (got_first, rows)
        assert got == want
        for a, b in zip(got.contracts, want.contracts, strict=True):
            _same_types(a, b)
        return "accepted"
    assert got is None, (want_first, rows)
    assert want_first is not None and got_first is not None
    want_row, got_row = _row_index(want_first), _row_index(got_first)
    if want_first == "contracts" and got_row is not None:  # duplicate ids: the row path names none
        assert rows[got_row]["id"] in [r["id"] for r in rows[:got_row]], (got_first, rows)
    elif want_row is None:
        assert got_first == want_first, (got_first, want_first, head, rows)
    else:
        assert got_row == want_row, (got_first, want_first, rows)
    return "refused"


def check_verdicts(cols: Columns) -> int:
    """The vectorised verdict of each row (without the row validator's second look)
    equals Contract.model_validate's, except on rows it flags as within rounding of a
    bound; the number of those."""
    rows = rows_of(cols)
    bad, border = row_verdicts(cols, len(rows))
    for i, row in enumerate(rows):
        try:
            Contract.model_validate(row)
            ok = True
        except ValidationError:
            ok = False
        if not border[i]:
            assert bool(bad[i]) == (not ok), (i, row, ok)
    return int(border.sum())


@pytest.mark.parametrize("seed", range(8))
def test_columnar_validation_accepts_exactly_what_the_row_schema_accepts(seed: int) -> None:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {"accepted": 0, "refused": 0}
    border = 0
    for _ in range(250):
        head, rows = random_book(rng)
        cols = columns_of(rows)
        outcomes[check_equivalent(head, cols)] += 1
        border += check_verdicts(cols)
    # both outcomes well represented: the generator is not all-valid or all-invalid
    assert outcomes["accepted"] >= 40 and outcomes["refused"] >= 40, outcomes
    assert border < 250  # rounding ties are rare: the vectorised checks decide nearly every row


def test_borderline_contracts_are_decided_as_the_row_schema_does() -> None:
    """K/F and vol sqrt(T) a rounding away from their bounds: the row validator decides."""
    rng = random.Random(7)
    for _ in range(200):
        row = valid_row(rng, 0)
        _tight(rng, row)
        check_equivalent({}, columns_of([row]))


def test_every_contract_shape_round_trips() -> None:
    """Valid books of each kind (gbm with vol or params.vol, heston, merton, asian, by
    reference with a date string or a date) give equal requests, field types included."""
    rng = random.Random(11)
    rows = [valid_row(rng, i) for i in range(200)]
    cols = columns_of(rows)
    assert check_equivalent({"measures": ["price", "quantiles"], "quantile_levels": [0.1, 0.9]}, cols) == "accepted"


# -- errors name the row and the field -------------------------------------------------------

GOOD = {**CONTRACT}
BOOK_20 = [{**GOOD, "id": f"k{i}", "strike": 80.0 + i} for i in range(20)]


def refusal(cols: Columns, head: Row | None = None) -> list[dict[str, Any]]:
    with pytest.raises(RequestRefusedError) as info:
        request_from_columns(head or {}, cols)
    return info.value.details


def with_cell(name: str, i: int, value: Any, rows: list[Row] = BOOK_20) -> Columns:
    cols = columns_of(rows)
    cols.setdefault(name, [None] * len(rows))
    cols[name][i] = value
    return cols


@pytest.mark.parametrize(
    ("name", "value", "field", "words"),
    [
        ("strike", -5.0, "contracts[17].strike", "greater than or equal"),
        ("strike", None, "contracts[17].strike", "required"),
        ("strike", "105", "contracts[17].strike", "valid number"),
        ("strike", True, "contracts[17].strike", "valid number"),
        ("spot", math.nan, "contracts[17].spot", "finite"),
        ("expiry_years", 31.0, "contracts[17].expiry_years", "less than or equal"),
        ("vol", 0.0, "contracts[17].vol", "greater than or equal"),
        ("right", "straddle", "contracts[17].right", "'call' or 'put'"),
        ("id", "", "contracts[17].id", "at least 1 character"),
        ("process", "levy", "contracts[17].process", "unknown process"),
        ("fixings", 12, "contracts[17]", "averaging processes"),
        ("params.v0", 0.04, "contracts[17]", "only 'vol' in params"),
        ("expiry", "2027-06-18", "contracts[17]", "both 'underlying' and 'expiry'"),
    ],
)
def test_errors_name_the_row_and_the_field(name: str, value: Any, field: str, words: str) -> None:
    details = refusal(with_cell(name, 17, value))
    assert details[0]["field"] == field, details
    assert words in details[0]["reason"], details
    assert all(d["field"].startswith("contracts[17]") for d in details), details


def test_process_rules_name_the_parameter() -> None:
    heston = [{**GOOD, "id": f"h{i}", "vol": None, "process": "heston", "params": HESTON} for i in range(5)]
    rows = [*BOOK_20[:3], *heston]
    details = refusal(with_cell("params.rho", 6, 1.5, rows))
    assert details == [{"field": "contracts[6].params.rho", "reason": "must be in [-0.99, 0.99], got 1.5"}]
    details = refusal(with_cell("vol", 4, 0.2, rows))
    assert details[0]["field"] == "contracts[4]" and "not 'vol'" in details[0]["reason"], details
    cols = columns_of(rows)
    cols["params.kappa"][5] = None
    details = refusal(cols)
    assert details[0]["field"] == "contracts[5]" and "params.kappa" in details[0]["reason"], details
    wide = with_cell("expiry_years", 2, 30.0, rows)
    wide["vol"][2] = 1.0
    assert refusal(wide)[0]["field"] == "contracts[2]"  # vol sqrt(T) = 5.5 > 4
    far = with_cell("strike", 1, 1e9, rows)
    details = refusal(far)
    assert details[0]["field"] == "contracts[1]" and "K/F" in details[0]["reason"], details


def test_every_invalid_row_is_named_in_order() -> None:
    cols = with_cell("strike", 3, -1.0)
    cols["vol"][11] = 9.0
    cols["right"][15] = None
    details = refusal(cols)
    assert [d["field"] for d in details] == ["contracts[3].strike", "contracts[11].vol", "contracts[15].right"]


def test_many_invalid_rows_are_named_up_to_a_limit() -> None:
    rows = [{**GOOD, "id": f"k{i}", "strike": -1.0} for i in range(500)]
    details = refusal(columns_of(rows))
    assert len(details) == 101
    assert details[0]["field"] == "contracts[0].strike" and details[99]["field"] == "contracts[99].strike"
    assert details[100]["field"] == "contracts" and "first 100" in details[100]["reason"]


def test_duplicate_ids_name_the_repeat() -> None:
    details = refusal(with_cell("id", 12, "k4"))
    assert details == [{"field": "contracts[12].id", "reason": "duplicate contract id 'k4' (also contracts[4])"}]


def test_structure_errors_name_the_column() -> None:
    cols = columns_of(BOOK_20)
    assert refusal({**cols, "colour": ["red"] * 20})[0]["field"] == "columns.colour"
    assert "params.<name>" in refusal({**cols, "params": [{}] * 20})[0]["reason"]
    short = refusal({**cols, "spot": cols["spot"][:19]})
    assert short[0]["field"] == "columns.spot" and "19 values" in short[0]["reason"], short
    assert refusal({})[0]["field"] == "contracts"
    assert refusal({k: [] for k in cols})[0]["field"] == "contracts"
    big = {"id": [f"k{i}" for i in range(MAX_CONTRACTS + 1)]}
    assert refusal(big)[0]["field"] == "contracts"
    # request-level fields are checked as in a row request, and named before the rows
    details = refusal(with_cell("strike", 2, -1.0), {"namespace": "no spaces", "measures": ["price", "charm"]})
    assert [d["field"] for d in details] == ["namespace", "measures[1]", "contracts[2].strike"]
    assert refusal(cols, {"contracts": []})[0]["field"] == "contracts"


def test_a_valid_book_builds_the_rows_contracts() -> None:
    rows = [*BOOK_20, {"id": "r", "right": "put", "strike": 100.0, "underlying": "SPX", "expiry": "2027-06-18"}]
    cols = columns_of(rows)
    cols["strike"][0] = 80  # an integer-valued number, as in a row
    got = request_from_columns({"measures": ["price", "delta"], "val_datetime": "2026-11-26T16:00:00Z"}, cols)
    want = PriceRequest.model_validate(
        {"measures": ["price", "delta"], "val_datetime": "2026-11-26T16:00:00Z", "contracts": rows_of(cols)}
    )
    assert got == want
    assert type(got.contracts[0].strike) is float
    assert got.contracts[-1].expiry == date(2027, 6, 18)


# -- answers as columns ----------------------------------------------------------------------


def test_answer_columns_carry_every_value_bound_and_warning() -> None:
    request = request_from_columns(
        {"measures": ["delta", "quantiles", "price"], "quantile_levels": [0.25, 0.5]}, columns_of(BOOK_20[:2])
    )
    rows = [
        {
            "id": "k0",
            "model": "gbm",
            "method": "cvnn",
            "delta": 0.5,
            "quantiles": {"0.25": 90.0, "0.5": 100.0},
            "price": 7.0,
            "error_bound": {"delta": 1e-4, "quantiles": {"0.25": 0.1, "0.5": None}, "price": 2e-3},
        },
        {
            "id": "k1",
            "model": "asian",
            "method": "cvnn",
            "delta": None,
            "quantiles": None,
            "price": 6.0,
            "error_bound": {"delta": None, "quantiles": None, "price": 1e-3},
            "warnings": ["delta: not answered", "quantiles: not answered"],
        },
    ]
    answer: dict[str, Any] = {"namespace": "n", "val_datetime": None, "data_asof": None, "results": rows, "models": {}}
    out = answer_columns({**answer, "market_data": None}, request)
    assert list(out) == ["namespace", "val_datetime", "data_asof", "columns", "models", "market_data"]
    cols = out["columns"]
    assert list(cols) == answer_column_names(request)
    assert list(cols) == [
        "id",
        "model",
        "method",
        "delta",
        "quantiles.0.25",
        "quantiles.0.5",
        "price",
        "error_bound.delta",
        "error_bound.quantiles.0.25",
        "error_bound.quantiles.0.5",
        "error_bound.price",
        "warnings",
    ]
    assert cols["quantiles.0.5"] == [100.0, None]
    assert cols["error_bound.quantiles.0.5"] == [None, None]
    assert cols["error_bound.quantiles.0.25"] == [0.1, None]
    assert cols["delta"] == [0.5, None]
    assert cols["warnings"] == [None, ["delta: not answered", "quantiles: not answered"]]


# -- POST /v1/price with columns ---------------------------------------------------------------


def rows_of_answer(columnar: dict[str, Any], request: Row) -> list[Row]:
    """A columnar answer back as the row answer's results (for comparison)."""
    cols = columnar["columns"]
    levels = [repr(q) for q in request.get("quantile_levels") or (0.01, 0.05, 0.5, 0.95, 0.99)]
    out = []
    for i in range(len(cols["id"])):
        row: Row = {k: cols[k][i] for k in ("id", "model", "method")}
        bounds: Row = {}
        for m in request.get("measures", ["price"]):
            if m == "quantiles":
                values = {q: cols[f"quantiles.{q}"][i] for q in levels}
                row[m] = None if all(v is None for v in values.values()) else values
                eb = {q: cols[f"error_bound.quantiles.{q}"][i] for q in levels}
                bounds[m] = None if row[m] is None else eb
            else:
                row[m], bounds[m] = cols[m][i], cols[f"error_bound.{m}"][i]
        row["error_bound"] = bounds
        if cols["warnings"][i] is not None:
            row["warnings"] = cols["warnings"][i]
        out.append(row)
    return out


async def test_a_columnar_book_is_answered_in_columns_with_the_row_numbers(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm", "heston"])
    heston = [{**GOOD, "id": f"h{i}", "vol": None, "process": "heston", "params": HESTON} for i in range(3)]
    rows = [*BOOK_20[:5], *heston, {**GOOD, "id": "far", "vol": 2.5, "expiry_years": 0.1}]
    request = {"namespace": "desk", "measures": ["price", "delta", "quantiles"], "quantile_levels": [0.05, 0.5]}
    r = await client.post("/v1/price", json={**request, "contracts": rows})
    assert r.status == 200, await r.text()
    by_rows_raw = await r.read()
    by_rows = orjson.loads(by_rows_raw)
    r = await client.post("/v1/price", json={**request, "columns": columns_of(rows)})
    assert r.status == 200, await r.text()
    assert r.content_type == "application/json"
    by_cols = orjson.loads(await r.read())
    assert list(by_cols) == ["namespace", "val_datetime", "data_asof", "columns", "models", "market_data"]
    assert {k: v for k, v in by_cols.items() if k != "columns"} == {k: v for k, v in by_rows.items() if k != "results"}
    assert rows_of_answer(by_cols, request) == by_rows["results"]  # the same floats, bit for bit
    assert {row["method"] for row in by_rows["results"]} == {"cvnn", "reference"}
    # the row form is unchanged: the same request as rows answers with the same bytes
    r = await client.post("/v1/price", json={**request, "contracts": rows})
    assert await r.read() == by_rows_raw


async def test_columnar_errors_over_http(make_client: MakeClient) -> None:
    client = await make_client(models=["gbm"])
    cols = columns_of(BOOK_20)
    r = await client.post("/v1/price", json={"columns": with_cell("strike", 17, -1.0)})
    await assert_error(r, 422, "invalid", ("contracts[17].strike",))
    r = await client.post("/v1/price", json={"columns": {**cols, "spot": cols["spot"][:3]}})
    await assert_error(r, 422, "invalid", ("columns.spot",))
    r = await client.post("/v1/price", json={"columns": cols, "contracts": BOOK_20})
    await assert_error(r, 422, "invalid", ("columns",))
    for bad in ([1, 2], "id", None):
        await assert_error(await client.post("/v1/price", json={"columns": bad}), 422, "invalid", ("columns",))
    r = await client.post("/v1/price", json={"columns": {"id": "k0"}})
    await assert_error(r, 422, "invalid", ("columns.id",))
    r = await client.post("/v1/price", json={"columns": {"id": [f"k{i}" for i in range(MAX_CONTRACTS + 1)]}})
    await assert_error(r, 413, "too_large", ("contracts",))
    r = await client.post("/v1/price", json={"columns": with_cell("id", 3, "k1")})
    await assert_error(r, 422, "invalid", ("contracts[3].id",))
    # neither contracts nor columns: the row request's error, unchanged
    await assert_error(await client.post("/v1/price", json={"measures": ["price"]}), 422, "invalid", ("contracts",))
