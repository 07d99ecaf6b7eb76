"""A learned number that breaks a model-free bound, or is not finite, is never served.

``ModelPricer.evaluate`` (engine/pricer.py) sends each row whose learned price is below
its discounted intrinsic value or above its upper bound (D F for a call, D K for a put),
whose learned digital is outside [0, D], or whose learned measures hold a NaN or an
infinity, to the reference. Here the bundled models' networks are sabotaged on chosen
rows, inside the domain and the certified K/F range (where the network would answer):
those rows must come back answered by the reference (``learned`` False: ``method``
"reference" in a response) with exactly the reference's values and bounds, and every
other row stays learned with the very numbers the intact network gave.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.pricer import OptionBatch, clamp_to_bounds, price_bounds
from spectralmc_server.engine.served import Evaluation, ServedModel, load_served_model
from spectralmc_server.models import bundled_models

F64 = torch.float64
SPOT, RATE, DIVIDEND, EXPIRY = 100.0, 0.03, 0.01, 1.0
MEASURES = frozenset({"price", "delta", "digital"})
PARAMS: dict[str, tuple[float, ...]] = {
    "gbm": (0.25,),
    "heston": (0.04, 1.5, 0.05, 0.5, -0.7),
    "merton": (0.2, 0.5, -0.1, 0.1),
    "rbergomi": (0.1, 1.5, -0.7, 0.04),  # its reference: COS on the simulated mixed CF
}
# Sabotage per row: (K/F, call?, what is done to the network's answer on that row).
# The other rows (the odd ones out below) are left alone and must stay learned.
Values = dict[str, torch.Tensor]
Bounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # price_bounds: intrinsic, upper, discount
Sabotage = Callable[[Values, int, Bounds], None]


def _negative_price(v: Values, i: int, b: Bounds) -> None:
    v["price"][i] = -1.0


def _above_upper(v: Values, i: int, b: Bounds) -> None:
    v["price"][i] = b[1][i] * 1.01  # a call above D F, a put above D K


def _below_intrinsic(v: Values, i: int, b: Bounds) -> None:
    v["price"][i] = b[0][i] * 0.99  # in the money: below D (F - K)^+ or D (K - F)^+


def _nan_price(v: Values, i: int, b: Bounds) -> None:
    v["price"][i] = math.nan


def _inf_delta(v: Values, i: int, b: Bounds) -> None:
    v["delta"][i] = math.inf  # the price itself is fine


def _digital_above_discount(v: Values, i: int, b: Bounds) -> None:
    v["digital"][i] = b[2][i] * 1.05


ROWS: list[tuple[float, bool, Sabotage | None]] = [
    (1.0, True, None),
    (0.8, True, _negative_price),
    (0.9, False, None),
    (1.1, True, _above_upper),
    (1.15, False, _above_upper),
    (0.85, True, _below_intrinsic),
    (1.2, False, _below_intrinsic),
    (1.05, True, _nan_price),
    (0.95, False, None),
    (1.0, False, _inf_delta),
    (0.9, True, _digital_above_discount),
    (1.1, False, None),
]
SABOTAGED = [i for i, (_, _, s) in enumerate(ROWS) if s is not None]
INTACT = [i for i, (_, _, s) in enumerate(ROWS) if s is None]


def served(name: str) -> ServedModel:
    """The bundled model as served. Rough Bergomi's reference is a simulation, so a learned
    measure past its tolerance is withheld (NaN) rather than answered by it (the routing
    tests/engine/test_certify.py covers): the tolerances are lifted for it here, where
    only the fallback on a broken bound is at stake."""
    tolerance = dict.fromkeys(MEASURES, 1e9) if name == "rbergomi" else None
    return load_served_model(read_dir(bundled_models()[name], need_training=False), tolerance=tolerance)


def batch_for(model: ServedModel) -> OptionBatch:
    n = len(ROWS)
    theta = torch.tensor([PARAMS[model.name]] * n, dtype=F64)
    expiry = torch.full((n,), EXPIRY, dtype=F64)
    rate, dividend = torch.full((n,), RATE, dtype=F64), torch.full((n,), DIVIDEND, dtype=F64)
    fwd = SPOT * model.process.forward_ratio(theta, expiry, rate, dividend)
    low, high = model.domain.certified_moneyness
    kappa = torch.tensor([k for k, _, _ in ROWS], dtype=F64)
    assert bool(((kappa > low) & (kappa < high)).all()), (low, high)  # inside the certified K/F range
    return OptionBatch(
        spot=torch.full((n,), SPOT, dtype=F64),
        strike=fwd * kappa,
        expiry=expiry,
        rate=rate,
        dividend=dividend,
        is_call=torch.tensor([c for _, c, _ in ROWS]),
        theta=theta,
    )


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_a_learned_number_that_breaks_a_bound_is_answered_by_the_reference(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = served(name)
    pricer = model.pricer
    batch = batch_for(model)
    intact = pricer.evaluate(batch, MEASURES)
    assert bool(intact.learned.all()), f"{name}: the intact network should answer every row here"

    original = pricer.learned.evaluate
    # a row of the sub-batch the network sees is known by its strike and right
    sabotaged_rows = {(float(batch.strike[i]), bool(batch.is_call[i])): ROWS[i][2] for i in SABOTAGED}
    seen: set[tuple[float, bool]] = set()

    def sabotaged(sub: OptionBatch, measures: frozenset[str], levels: torch.Tensor | None = None) -> Any:
        values = {k: v.clone() for k, v in original(sub, measures, levels).items()}
        bounds = price_bounds(sub, model.process)
        for j in range(len(sub)):
            key = (float(sub.strike[j]), bool(sub.is_call[j]))
            sabotage = sabotaged_rows.get(key)
            if sabotage is not None:
                sabotage(values, j, bounds)
                seen.add(key)
        return values

    monkeypatch.setattr(pricer.learned, "evaluate", sabotaged)
    got: Evaluation = pricer.evaluate(batch, MEASURES)
    assert seen == set(sabotaged_rows), "the sabotage must reach the network's answer"

    bad = torch.tensor(SABOTAGED)
    good = torch.tensor(INTACT)
    assert not bool(got.learned[bad].any()), got.learned
    assert bool(got.learned[good].all()), got.learned

    # the sabotaged rows: the reference's answer and bound, as it gives them alone
    sub = batch.select(bad)
    ref = {k: v for k, v in pricer.reference.evaluate(sub, MEASURES).items() if k in MEASURES}
    clamp_to_bounds(ref, sub, model.process)
    for m in MEASURES:
        assert torch.isfinite(got.values[m]).all(), (m, got.values[m])
        torch.testing.assert_close(got.values[m][bad], ref[m], rtol=1e-12, atol=0.0, msg=f"{name} {m}")
        assert torch.equal(got.values[m][good], intact.values[m][good]), (name, m)
        assert torch.equal(got.bounds[m][good], intact.bounds[m][good]), (name, m)
    low, high, disc = price_bounds(batch, model.process)
    slack = 1e-12 * high
    assert bool(((got.values["price"] >= low - slack) & (got.values["price"] <= high + slack)).all())
    assert bool(((got.values["digital"] >= 0) & (got.values["digital"] <= disc + slack)).all())
