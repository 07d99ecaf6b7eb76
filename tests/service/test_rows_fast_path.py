"""pricing/door.py ``parse``: row requests take the columnar checks first
(pricing/columns.py) and fall back to the row schema for whatever those refuse or cannot
read as columns. The outcome must be exactly the row schema's: the same requests
accepted, with contracts and a Book equal to what the schema's objects give, and the
same error details (bit for bit) for every refused request."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from test_columns import random_book

from spectralmc_server.pricing import door
from spectralmc_server.pricing.book import Book, LazyContracts, book_of
from spectralmc_server.pricing.columns import rows_as_columns
from spectralmc_server.pricing.door import parse
from spectralmc_server.pricing.errors import RequestRefusedError
from spectralmc_server.pricing.schemas import PriceRequest, format_validation_error

FIELDS = ("spot", "strike", "expiry", "rate", "dividend", "is_call", "theta")
GOOD = {"id": "a", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0, "vol": 0.2}


def schema_outcome(body: dict[str, Any]) -> PriceRequest | list[dict[str, Any]]:
    try:
        return PriceRequest.model_validate(body)
    except ValidationError as exc:
        return format_validation_error(exc)


def parse_outcome(body: dict[str, Any]) -> PriceRequest | list[dict[str, Any]]:
    try:
        return parse(copy.deepcopy(body))
    except RequestRefusedError as exc:
        return exc.details


def same_books(got: Book, want: Book) -> None:
    assert got.id == want.id
    assert got.process == want.process
    for name, index in want.by_process().items():
        a, b = got.take(index).option_batch(name), want.take(index).option_batch(name)
        for f in FIELDS:
            x, y = getattr(a, f), getattr(b, f)
            same = torch.equal(x, y) if f == "is_call" else torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)
            assert same, (name, f)  # exactly equal (NaN: an input a contract by reference lacks)


@pytest.mark.parametrize("seed", range(6))
def test_parse_gives_the_row_schema_outcome(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(door, "COLUMNAR_MIN_CONTRACTS", 1)  # the random books are small
    rng = random.Random(1000 + seed)
    outcomes = {"fast": 0, "accepted": 0, "refused": 0}
    for _ in range(300):
        head, rows = random_book(rng)
        body = {**head, "contracts": rows}
        want, got = schema_outcome(body), parse_outcome(body)
        if isinstance(want, list):
            assert got == want, body
            outcomes["refused"] += 1
            continue
        assert isinstance(got, PriceRequest), (got, body)
        assert got == want
        same_books(book_of(got), Book.of(want.contracts))
        outcomes["accepted"] += 1
        outcomes["fast"] += isinstance(got.contracts, LazyContracts)
    assert min(outcomes.values()) > 20, outcomes  # the books exercise both paths and both outcomes


@pytest.mark.parametrize(
    "row",
    [
        {**GOOD, "dividend": None},  # a null: absent in a column, a value to the row schema
        {**GOOD, "colour": "red"},  # an unknown key
        {**GOOD, "params.vol": 0.2},  # a dotted key would read as a parameter column
        {k: v for k, v in GOOD.items() if k != "vol"} | {"params": {}},  # empty params
        {k: v for k, v in GOOD.items() if k != "vol"} | {"params": {"vol": None}},
        {k: v for k, v in GOOD.items() if k != "vol"} | {"params": [0.2]},
    ],
)
def test_rows_the_columns_could_read_differently_take_the_row_schema(row: dict[str, Any]) -> None:
    body = {"contracts": [GOOD | {"id": f"c{i}"} for i in range(door.COLUMNAR_MIN_CONTRACTS)] + [row]}
    assert rows_as_columns(body) is None
    assert parse_outcome(body) == schema_outcome(body)


def test_small_books_take_the_row_schema() -> None:
    """Under COLUMNAR_MIN_CONTRACTS the row schema is faster: no columnar checks."""
    rows = [GOOD | {"id": f"c{i}"} for i in range(door.COLUMNAR_MIN_CONTRACTS - 1)]
    assert isinstance(parse({"contracts": rows}).contracts, list)
    assert isinstance(parse({"contracts": [*rows, GOOD | {"id": "last"}]}).contracts, LazyContracts)


def test_a_valid_book_of_rows_builds_no_contract_objects() -> None:
    rows = [GOOD | {"id": f"c{i}", "strike": 90.0 + i / 4} for i in range(80)]
    request = parse({"measures": ["price", "delta"], "contracts": rows})
    assert isinstance(request.contracts, LazyContracts)
    assert request.contracts._built == {}
    book = book_of(request)
    assert book.strike.tolist() == [90.0 + i / 4 for i in range(80)]
    assert request == PriceRequest.model_validate({"measures": ["price", "delta"], "contracts": rows})


def test_admitting_a_small_request_without_barriers_builds_no_book() -> None:
    """Admission's barrier check reads the contracts of a small row request and builds no
    Book for it: the batcher joins small requests' contracts into one Book per job
    (book_of_requests), so a Book per request would be work spent twice. A barrier
    contract still gets its Book and its checks."""
    from spectralmc_server.pricing.book import cached_book
    from spectralmc_server.pricing.valuation import RequestError, check_barriers, check_request

    vanilla = parse({"contracts": [GOOD, {**GOOD, "id": "b", "strike": 90.0}]})
    assert cached_book(vanilla) is None
    check_request(vanilla, {})
    assert cached_book(vanilla) is None
    barrier = {**GOOD, "id": "x", "barrier": {"type": "down-and-out", "level": 80.0}}
    knocked = parse({"contracts": [GOOD, barrier], "measures": ["price", "mean"]})
    with pytest.raises(RequestError, match="mean are not defined for a barrier contract"):
        check_barriers(knocked)
    assert cached_book(knocked) is not None
