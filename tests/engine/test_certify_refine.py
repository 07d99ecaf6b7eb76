"""A certificate's finer truth where a simulated truth's noise dominates its worst errors
(engine/certify.py: ``noisy_worst_rows``, ``refine_truth``).

- Selection: among the worst ``REFINE_SHARE`` of a measure's errors, only the rows whose
  3 SE is at least ``REFINE_SE_SHARE`` of the error are picked; quantile rows count by
  their worst level; rows with no learned answer (NaN) never are.
- Re-pricing: every row of the picked rows' parameter points gets the finer truth's
  value and standard error, bit for bit what that truth gives the point alone; every
  other row keeps the first truth; the count of re-priced points is returned.
- ``errors`` with a finer truth: the refined rows' errors shrink where the noise was
  the larger part, and an analytic truth is never refined.
"""

from __future__ import annotations

import math

import torch

from spectralmc_server.engine.certificate import measure_units
from spectralmc_server.engine.certify import (
    CERT_SEED,
    MC_SE_MULTIPLE,
    REFINE_SE_SHARE,
    REFINE_SHARE,
    STRIKES_PER_POINT,
    errors,
    noisy_worst_rows,
    refine_truth,
    sample,
    truth_pricer,
)
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.reference_pricers import reference_with_error
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.models import bundled_models

F64 = torch.float64
PRICE = frozenset({"price"})


def test_the_worst_rows_are_picked_only_where_the_truths_noise_is_a_large_part() -> None:
    n = 4000  # REFINE_SHARE of 4,000 rows: the worst 4
    assert math.ceil(n * REFINE_SHARE) == 4
    got = torch.zeros(n, dtype=F64)
    truth = 1e-4 * (1.0 + torch.arange(n, dtype=F64) / n)  # errors of 1-2 bp everywhere ...
    se = torch.full((n,), 1e-6, dtype=F64)
    truth[[10, 20, 30, 40]] = 50e-4  # ... but 50e-4 on four rows
    se[10] = 10e-4  # 3 SE = 30e-4: more than a quarter of its 80e-4
    se[20] = 3e-4  # 3 SE = 9e-4: a sixth of 59e-4: the model's own error dominates
    se[30] = 5e-4  # 15e-4 of 65e-4: just under a quarter
    se[40] = 6e-4  # 18e-4 of 68e-4: just over
    units = {"price": torch.ones(n, dtype=F64)}
    rows = noisy_worst_rows({"price": got}, {"price": truth}, {"price": se}, units)
    assert rows.tolist() == [10, 40]
    for r in (10, 40):
        e = float(truth[r] + MC_SE_MULTIPLE * se[r])
        assert MC_SE_MULTIPLE * float(se[r]) >= REFINE_SE_SHARE * e

    # a quantile row counts by its worst level; NaN (no learned answer) is never picked
    q_got = torch.zeros(n, 3, dtype=F64)
    q_truth = torch.full((n, 3), 1e-4, dtype=F64)
    q_se = torch.full((n, 3), 1e-6, dtype=F64)
    q_truth[7, 2], q_se[7, 2] = 40e-4, 20e-4
    q_got[8, :] = float("nan")
    q_truth[8, :], q_se[8, :] = 90e-4, 90e-4
    rows = noisy_worst_rows(
        {"quantiles": q_got}, {"quantiles": q_truth}, {"quantiles": q_se}, {"quantiles": torch.ones(n, dtype=F64)}
    )
    assert 7 in rows.tolist() and 8 not in rows.tolist()

    # measures are picked independently and united
    rows = noisy_worst_rows(
        {"price": got, "delta": got},
        {"price": truth, "delta": truth.flip(0)},
        {"price": se, "delta": se.flip(0)},
        {"price": units["price"], "delta": units["price"]},
    )
    assert rows.tolist() == sorted([10, 40, n - 1 - 10, n - 1 - 40])

    # ties never widen the pick, and a measure with no standard error (the mean) picks none
    flat = torch.full((n,), 1e-4, dtype=F64)
    rows = noisy_worst_rows({"price": got}, {"price": flat}, {"price": torch.full((n,), 1e-4, dtype=F64)}, units)
    assert len(rows) == 4
    zero = torch.zeros(n, dtype=F64)
    assert len(noisy_worst_rows({"mean": zero}, {"mean": zero}, {"mean": zero}, {"mean": units["price"]})) == 0


def test_refine_truth_reprices_whole_points_bit_for_bit() -> None:
    served = load_served_model(read_dir(bundled_models()["asian"], need_training=False))
    batch, levels, point = sample(served.process, served.domain, 6, CERT_SEED)
    coarse = truth_pricer(served, paths=1024)
    fine = truth_pricer(served, 777, paths=2048)
    truth, se = reference_with_error(coarse, batch, PRICE)
    picked = torch.tensor([STRIKES_PER_POINT * 2 + 5, STRIKES_PER_POINT * 4])  # points 2 and 4
    new_truth, new_se, points = refine_truth(fine, batch, picked, truth, se, PRICE, levels)
    assert points == 2
    again = (point == 2) | (point == 4)
    assert int(again.sum()) == 2 * STRIKES_PER_POINT
    alone, alone_se = reference_with_error(fine, batch.select(torch.nonzero(again).flatten()), PRICE)
    assert torch.equal(new_truth["price"][again], alone["price"])
    assert torch.equal(new_se["price"][again], alone_se["price"])
    assert torch.equal(new_truth["price"][~again], truth["price"][~again])
    assert torch.equal(new_se["price"][~again], se["price"][~again])
    assert not torch.equal(new_truth["price"][again], truth["price"][again])  # another truth
    # twice the paths: a smaller standard error on the re-priced rows, on the whole
    assert float(new_se["price"][again].mean()) < float(se["price"][again].mean())


def test_errors_with_a_finer_truth_and_an_analytic_truth_never_refined() -> None:
    served = load_served_model(read_dir(bundled_models()["asian"], need_training=False))
    batch, levels, _ = sample(served.process, served.domain, 8, CERT_SEED)
    coarse = truth_pricer(served, paths=256)  # noisy on purpose: its noise dominates
    fine = truth_pricer(served, 777, paths=4096)
    plain, _, none = errors(served.pricer.learned, coarse, served.process, batch, levels, PRICE)
    assert none == 0
    finer, _, refined = errors(served.pricer.learned, coarse, served.process, batch, levels, PRICE, refine=fine)
    assert refined >= 1
    changed = finer["price"] != plain["price"]
    assert int(changed.sum()) == refined * STRIKES_PER_POINT
    worst = int(torch.argmax(plain["price"]))
    assert bool(changed[worst])  # the worst row's point was priced again ...
    assert float(finer["price"][worst]) < float(plain["price"][worst])  # ... and its noise shrank
    units = measure_units(batch, served.process)
    assert torch.isfinite(units["price"]).all()

    gbm = load_served_model(read_dir(bundled_models()["gbm"], need_training=False))
    assert truth_pricer(gbm) is gbm.pricer.reference  # analytic: certify passes no finer truth
    gb, glv, _ = sample(gbm.process, gbm.domain, 4, CERT_SEED)
    _, _, zero = errors(gbm.pricer.learned, gbm.pricer.reference, gbm.process, gb, glv, PRICE, refine=fine)
    assert zero == 0  # a closed form has no standard error to refine
