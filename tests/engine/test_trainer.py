"""Online training: the loss falls, validation is right, resume is bit-exact, caps hold."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from spectralmc_server.engine.checkpoint import decode, read_dir, write_dir
from spectralmc_server.engine.device import BudgetConfig, BudgetExceededError, Budgets
from spectralmc_server.engine.reference import analytic_cf_y
from spectralmc_server.engine.trainer import TrainConfig, Trainer


def _config(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        batch_points=32,
        paths=128,
        network=dict(width=16, depth=2, head="cf", baseline="none"),
        spectrum=dict(n_freq=32, half_width=10.0, n_bins=256),
        warmup_steps=10,
        schedule_steps=200,
        validate_every=50,
        validation_grid=4,
        lr=3e-3,
    )
    base.update(overrides)
    return TrainConfig.model_validate(base)


def _state(t: Trainer) -> dict[str, torch.Tensor]:
    ck = t.checkpoint()
    return {**{f"ema/{k}": v for k, v in ck.model.items()}, **ck.training}


def test_loss_falls_and_validation_improves() -> None:
    t = Trainer(_config())
    try:
        first = t.train_step()
        t.run(199)
        assert t.step == 200
        assert t.loss_ema < first / 20
        hist = t.history
        assert [v.step for v in hist] == [50, 100, 150, 200]
        assert hist[-1].p95_bp < hist[0].p95_bp
        assert hist[-1].cf_rmse < hist[0].cf_rmse
        assert t.paths_simulated == 200 * 32 * 128
    finally:
        t.close()


def test_validation_of_an_exact_model_reports_zero_error() -> None:
    """An untrained gaussian-baseline model is exactly GBM: the validation pipeline
    (COS on both sides, same strikes) must then report errors at rounding level."""
    t = Trainer(_config(network=dict(width=8, depth=1, head="log_cf", baseline="gaussian")))
    try:
        v = t.validate()
        assert v.max_bp < 1e-6 and v.cf_rmse < 1e-12
    finally:
        t.close()


def test_targets_match_the_analytic_cf() -> None:
    t = Trainer(_config(paths=4096, batch_points=8))
    try:
        theta, expiry = t._draw_points()
        _, z = t.normals.next()
        target = t.targets(theta, expiry, z).to(torch.complex128)
        exact = analytic_cf_y(t.process, t.config.spectrum, theta, expiry)
        # Sobol + antithetic normals: errors far below the i.i.d. 1/sqrt(N) ~ 1.6e-2.
        assert float((target - exact).abs().max()) < 3e-3
    finally:
        t.close()


def test_learning_rate_schedule() -> None:
    c = _config(lr=1e-2, lr_final_ratio=0.1, warmup_steps=10, schedule_steps=110)
    assert c.lr_at(0) == pytest.approx(1e-3)
    assert c.lr_at(9) == pytest.approx(1e-2)
    assert c.lr_at(10) == pytest.approx(1e-2)
    assert c.lr_at(60) == pytest.approx(0.5 * (1e-2 + 1e-3))
    assert c.lr_at(110) == pytest.approx(1e-3)
    assert c.lr_at(10_000) == pytest.approx(1e-3)
    assert c.ema_decay_at(0) == pytest.approx(0.1)
    assert c.ema_decay_at(10**6) == c.ema_decay


@pytest.mark.parametrize("mode", ["sobol", "pseudo"])
def test_resume_is_bit_exact(mode: str, tmp_path: Path) -> None:
    """N steps + checkpoint + resume + N steps == 2N steps, to the last bit."""
    cfg = _config(normals_mode=mode, schedule_steps=60, validate_every=25)
    straight = Trainer(cfg)
    straight.run(60)
    first = Trainer(cfg)
    first.run(30)
    path = tmp_path / "ck"
    write_dir(first.checkpoint(), path)
    first.close()
    resumed = Trainer.from_checkpoint(read_dir(path))
    assert (resumed.step, resumed.sobol_index, resumed.normals.position) == (30, 30 * 32, 30)
    resumed.run(30)
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (straight.step, straight.sobol_index, straight.normals.position) == (
        resumed.step,
        resumed.sobol_index,
        resumed.normals.position,
    )
    assert [v.p95_bp for v in straight.history] == [v.p95_bp for v in resumed.history]
    straight.close()
    resumed.close()


def test_checkpoint_round_trips_through_bytes() -> None:
    t = Trainer(_config())
    t.run(5)
    ck = t.checkpoint()
    back = decode(ck.encode())
    assert back.content_hash == ck.content_hash
    assert back.manifest["state"]["step"] == 5
    assert back.manifest["model"]["process"] == "gbm"
    t2 = Trainer.from_checkpoint(back)
    assert t2.step == 5 and not math.isnan(t2.loss_ema)
    t.close()
    t2.close()


def test_trainer_refuses_a_batch_over_the_simulator_cap() -> None:
    budgets = Budgets(BudgetConfig(simulator_bytes=1 << 20))
    with pytest.raises(BudgetExceededError, match="trainer: simulator workspace needs"):
        Trainer(_config(batch_points=512, paths=1024), budgets)
    assert budgets.simulator.reserved_bytes == 0


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown process 'levy'"):
        TrainConfig(process="levy")
    bad_domain = {
        "ranges": [
            {"name": "sigma", "low": 0.1, "high": 1.0},
            {"name": "expiry_years", "low": 0.1, "high": 1.0},
        ]
    }
    with pytest.raises(ValueError, match="do not match process 'gbm' parameters"):
        TrainConfig.model_validate({"domain": bad_domain})
    with pytest.raises(ValueError, match="finite low < high"):
        TrainConfig.model_validate(
            {
                "domain": {
                    "ranges": [{"name": "vol", "low": 1, "high": 0.5}, {"name": "expiry_years", "low": 0.1, "high": 1}]
                }
            }
        )


def test_exact_targets_train_without_simulating() -> None:
    """The noise-free diagnostic: analytic targets, no paths, and the loss still falls."""
    t = Trainer(_config(targets="exact"))
    try:
        first = t.train_step()
        t.run(198)
        last = t.train_step()
        assert t.paths_simulated == 0 and t.normals.position == 0
        assert last < first / 20
    finally:
        t.close()


def test_a_refused_trainer_holds_no_memory_and_leaves_global_rng_alone() -> None:
    budgets = Budgets(BudgetConfig(normals_bytes=1 << 10))  # too small for the normals pool
    with pytest.raises(BudgetExceededError, match="normals pool"):
        Trainer(_config(), budgets)
    assert budgets.training.reserved_bytes == 0 and budgets.simulator.reserved_bytes == 0
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Trainer(_config()).close()
    assert torch.equal(torch.rand(3), expected)


def test_a_restarted_schedule_counts_from_its_start() -> None:
    c = _config(lr=1e-2, lr_final_ratio=0.1, warmup_steps=10, schedule_steps=110, schedule_start=1000)
    assert c.lr_at(1000) == pytest.approx(1e-3)  # the warmup again, from the phase's first step
    assert c.lr_at(1010) == pytest.approx(1e-2)
    assert c.lr_at(1060) == pytest.approx(0.5 * (1e-2 + 1e-3))
    assert c.lr_at(1110) == pytest.approx(1e-3)
    assert c.lr_at(500) == c.lr_at(1000)  # before its start: the start's rate, never a negative step


def test_focus_puts_its_share_of_every_draw_in_its_box() -> None:
    focus = {"share": 0.25, "ranges": {"vol": [0.5, 0.6], "expiry_years": [1.0, 1.5]}}
    plain, focused = Trainer(_config()), Trainer(_config(focus=focus))
    try:
        for _ in range(3):
            (theta0, t0), (theta1, t1) = plain._draw_points(), focused._draw_points()
            assert torch.equal(theta0[:24], theta1[:24]) and torch.equal(t0[:24], t1[:24])  # the rest: as before
            sigma, t = theta1[24:, 0], t1[24:]
            assert bool(((sigma >= 0.5 - 1e-12) & (sigma <= 0.6 + 1e-12)).all()), sigma
            assert bool(((t >= 1.0 - 1e-12) & (t <= 1.5 + 1e-12)).all()), t
            assert len(set(sigma.tolist())) == 8  # spread over the box, not one point
            # the box's share of the plain draw: the focus changes where points fall
            assert bool(((theta0[24:, 0] < 0.5) | (theta0[24:, 0] > 0.6) | (t0[24:] < 1.0) | (t0[24:] > 1.5)).any())
        assert focused.sobol_index == plain.sobol_index == 3 * 32
    finally:
        plain.close()
        focused.close()


@pytest.mark.parametrize(
    ("focus", "message"),
    [
        ({"share": 0.25, "ranges": {"kappa": [0.1, 0.2]}}, "focus.ranges.kappa: not a domain axis"),
        ({"share": 0.25, "ranges": {"vol": [0.6, 0.5]}}, r"focus.ranges.vol: need .* low < high"),
        ({"share": 0.25, "ranges": {"vol": [0.01, 0.5]}}, r"focus.ranges.vol: need .*<= low"),
        ({"share": 0.25, "ranges": {}}, "focus.ranges: name at least one"),
        ({"share": 0.01, "ranges": {"vol": [0.2, 0.3]}}, "focus.share: 0.01 of 32 points rounds to none"),
        ({"share": 1.0, "ranges": {"vol": [0.2, 0.3]}}, "less than 1"),
    ],
)
def test_focus_errors_name_the_field(focus: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(focus=focus)
