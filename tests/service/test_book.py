"""pricing/book.py: a book of contracts as columns gives the engine exactly the batch
the contract objects give (``_batch`` below: the Valuer's one pass over the objects
before books, kept as the oracle),
for every process and every way of giving its inputs, and the Valuer built on it answers
the same bytes whatever the mix and order of processes in a request."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

from spectralmc_server.engine.pricer import OptionBatch
from spectralmc_server.engine.processes import PROCESSES
from spectralmc_server.pricing.book import Book
from spectralmc_server.pricing.schemas import Contract, PriceRequest
from spectralmc_server.pricing.valuation import Valuer, dumps

HESTON = {"v0": 0.04, "kappa": 2.0, "theta": 0.05, "xi": 0.5, "rho": -0.6}
MERTON = {"sigma": 0.2, "lambda": 0.3, "mu_j": -0.1, "sigma_j": 0.15}


def _params(c: Contract, names: tuple[str, ...]) -> tuple[float, ...]:
    if names == ("vol",):
        return (c.vol if c.vol is not None else (c.params or {})["vol"],)
    given = c.process_params()
    return tuple(given[n] for n in names)


def _batch(contracts: list[Contract], names: tuple[str, ...]) -> OptionBatch:
    """The oracle: the batch as the Valuer built it before books, one contract object at
    a time (rate and dividend default to 0)."""
    rows = [
        (c.spot, c.strike, c.expiry_years, c.rate or 0.0, c.dividend or 0.0, c.right == "call", *_params(c, names))
        for c in contracts
    ]
    table = torch.tensor(rows, dtype=torch.float64).reshape(len(contracts), 6 + len(names))
    return OptionBatch(table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4], table[:, 5] > 0.5, table[:, 6:])


def random_contract(rng: random.Random, i: int) -> dict[str, Any]:
    kind = rng.choice(["gbm", "gbm_params", "heston", "merton", "asian", "asian_params"])
    c: dict[str, Any] = {
        "id": f"c{i}",
        "right": rng.choice(["call", "put"]),
        "spot": rng.uniform(50, 150),
        "expiry_years": rng.uniform(0.1, 2.0),
    }
    c["strike"] = c["spot"] * rng.uniform(0.85, 1.15)
    if rng.random() < 0.6:
        c["rate"] = rng.uniform(-0.01, 0.05)
    if rng.random() < 0.4:
        c["dividend"] = rng.uniform(0.0, 0.03)
    vol = rng.uniform(0.1, 0.5)
    if kind == "gbm":
        c["vol"] = vol
    elif kind == "gbm_params":
        c["params"] = {"vol": vol}
    elif kind == "heston":
        c.update(process="heston", params=dict(HESTON))
    elif kind == "merton":
        c.update(process="merton", params=dict(MERTON))
    else:
        c.update(process="asian", fixings=rng.randint(1, 52))
        if kind == "asian":
            c["vol"] = vol
        else:
            c["params"] = {"vol": vol}
    return c


@pytest.mark.parametrize("seed", range(5))
def test_the_book_gives_the_batch_the_contracts_give(seed: int) -> None:
    rng = random.Random(seed)
    contracts = [Contract.model_validate(random_contract(rng, i)) for i in range(200)]
    book = Book.of(contracts)
    assert len(book) == len(contracts) and book.id == [c.id for c in contracts]
    groups = book.by_process()
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(len(contracts)))
    for name, index in groups.items():
        names = PROCESSES[name].param_names
        want = _batch([contracts[i] for i in index.tolist()], names)
        got = book.take(index).option_batch(name)
        for f in ("spot", "strike", "expiry", "rate", "dividend", "is_call", "theta"):
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and a.shape == b.shape, (name, f)
            assert torch.equal(a, b), (name, f)


def test_a_valuer_answer_does_not_depend_on_the_mix_of_processes() -> None:
    """A request's bytes are the same alone and with others, and each contract's row is
    the same as when it is priced alone (reference pricers: no model needed)."""
    rng = random.Random(7)
    bodies = [random_contract(rng, i) for i in range(24)]
    bodies = [b for b in bodies if b.get("process") != "asian"]  # the Asian MC reference is slow here
    whole = PriceRequest.model_validate({"measures": ["price", "delta"], "contracts": bodies})
    valuer = Valuer({})
    answer = valuer.value(whole)
    alone = [
        valuer.value(PriceRequest.model_validate({"measures": ["price", "delta"], "contracts": [b]})) for b in bodies
    ]
    assert [a["results"][0] for a in alone] == answer["results"]
    other = PriceRequest.model_validate({"measures": ["price", "delta"], "contracts": list(reversed(bodies))})
    both = valuer.value_many([whole, other])
    assert dumps(both[0]) == dumps(answer)
    assert both[1]["results"] == list(reversed(answer["results"]))
