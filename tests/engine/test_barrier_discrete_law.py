"""The learned discrete-monitoring barrier law (engine/processes/gbm_barrier_discrete.py):
its paths and their survival against closed forms, the control-variate reference Monte
Carlo against the served reference (engine/barrier_pricer.py) and against the n = 1
closed form, bitwise batch invariance, and the bundled model: accuracy on a sample
against the reference, in-out parity, batch invariance, delta with the barrier fixed
against finite differences, and the monitoring it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from spectralmc_server.engine.barrier_analytic import barrier_out_price, bgk_shifted_level, survival_probability
from spectralmc_server.engine.barrier_learned import learned_barrier_prices
from spectralmc_server.engine.barrier_mc import BarrierBatch, BarrierType
from spectralmc_server.engine.barrier_pricer import price_barriers
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.cvnn import CFModel
from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.processes import PROCESSES, get_process
from spectralmc_server.engine.processes.barrier_paths import Monitoring
from spectralmc_server.engine.processes.gbm_barrier import GBMBarrierProcess
from spectralmc_server.engine.processes.gbm_barrier_discrete import (
    MAX_DATES,
    GBMBarrierDiscreteProcess,
    date_count,
    discrete_out_mc,
    discrete_paths,
    terminal_out,
)
from spectralmc_server.engine.reference import black_scholes
from spectralmc_server.engine.served import load_cf_model
from spectralmc_server.models import bundled_barrier_models, bundled_models

F64 = torch.float64
PROCESS = GBMBarrierDiscreteProcess()


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def points() -> tuple[torch.Tensor, torch.Tensor]:
    """theta (vol, carry, distance, side, n) and T: down and up, near and far, 1 to 64 dates."""
    theta = torch.tensor(
        [
            [0.3, 0.02, 1.0, -1.0, 1.0],
            [0.3, 0.02, 0.8, -1.0, 5.0],
            [0.3, -0.04, 0.5, 1.0, 12.0],
            [0.7, 0.0, 0.3, 1.0, 23.0],
            [0.15, 0.05, 1.2, -1.0, 64.0],
        ],
        dtype=F64,
    )
    return theta, torch.tensor([1.0, 0.75, 0.5, 2.5, 2.0], dtype=F64)


def normals(paths: int, seed: int = 5) -> torch.Tensor:
    cfg = NormalsConfig(seed=seed, mode="pseudo", antithetic=True, rows=paths, dims=MAX_DATES, dtype="float64")
    return generate_block(cfg, 0, torch.device("cpu"))


def level_of(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.where(theta[:, 3] > 0, 1.0, -1.0) * theta[:, 2] * theta[:, 0] * torch.sqrt(expiry))


# -- the law ----------------------------------------------------------------------------------


def test_the_discrete_law_is_a_model_process_with_integer_dates() -> None:
    assert "gbm_barrier_discrete" not in PROCESSES
    assert isinstance(get_process("gbm_barrier_discrete"), GBMBarrierDiscreteProcess)
    assert "gbm_barrier_discrete" not in bundled_models()  # a barrier law: no contract names it
    assert PROCESS.defective and PROCESS.normals_per_path == MAX_DATES
    raw = torch.tensor([[0.2, 0.0, 1.0, 0.3, 0.6], [0.2, 0.0, 1.0, -0.3, 7.4], [0.2, 0.0, 1.0, 0.0, 99.0]], dtype=F64)
    canon = PROCESS.canonical_params(raw)
    assert canon[:, 3].tolist() == [1.0, -1.0, -1.0]
    assert canon[:, 4].tolist() == [1.0, 7.0, 64.0]
    assert date_count(canon).tolist() == [1.0, 7.0, 64.0]


def test_paths_are_gbm_at_the_dates_and_the_bridge_gives_the_continuous_survival() -> None:
    theta, expiry = points()
    z = normals(1 << 15)[None].expand(len(expiry), -1, -1)
    x, alive, cont = discrete_paths(theta, expiry, z, shifts=(0.0, 0.5826))
    assert cont is not None and cont.shape == (*x.shape, 2)
    s = theta[:, 0] * torch.sqrt(expiry)
    n = x.shape[1]
    # X_T ~ N(-s^2/2, s^2): E[e^X] = 1, sd(X) = s
    assert torch.allclose(torch.exp(x).mean(1), torch.ones(5, dtype=F64), atol=4 * float(s.max()) * 1.5 / n**0.5)
    assert torch.allclose(x.std(1), s, rtol=0.02)
    # the bridge weights' mean is the continuous survival, the shifted one the survival at
    # the BGK-shifted barrier; the discrete survival lies above the continuous one
    down = theta[:, 3] < 0
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    level = level_of(theta, expiry)
    exact = survival_probability(down, one, level, expiry, theta[:, 1], zero, theta[:, 0])
    shifted = survival_probability(
        down,
        one,
        bgk_shifted_level(level, theta[:, 0], expiry, theta[:, 4], down),
        expiry,
        theta[:, 1],
        zero,
        theta[:, 0],
    )
    se = cont.std(1) / n**0.5
    assert ((cont[..., 0].mean(1) - exact).abs() < 4 * se[:, 0] + 1e-12).all()
    assert ((cont[..., 1].mean(1) - shifted).abs() < 4 * se[:, 1] + 1e-12).all()
    assert (alive.mean(1) >= cont[..., 0].mean(1)).all()
    assert bool(((alive == 0) | (alive == 1)).all())


def test_share_weights_give_the_share_mass() -> None:
    theta, expiry = points()
    z = normals(1 << 15, seed=9)[None].expand(len(expiry), -1, -1)
    x, alive = PROCESS.simulate_weighted(theta, expiry, z)
    direct = (torch.exp(x) * alive).mean(1)
    share = PROCESS.share_weights(theta, expiry, z).mean(1)
    se = (torch.exp(x) * alive).std(1) / z.shape[1] ** 0.5
    assert ((direct - share).abs() < 4 * se + 0.01).all(), (direct, share)


# -- the reference Monte Carlo -----------------------------------------------------------------


def test_terminal_out_is_the_one_date_closed_form_with_parity() -> None:
    theta, expiry = points()
    log_kappa = torch.log(torch.tensor([[0.8, 1.0, 1.25]], dtype=F64)).expand(5, 3)
    puts, surv = terminal_out(theta, expiry, log_kappa, torch.zeros(5, 3, dtype=torch.bool))
    calls, surv2 = terminal_out(theta, expiry, log_kappa, torch.ones(5, 3, dtype=torch.bool))
    assert torch.equal(surv, surv2)
    # call - put = E[(e^X - kappa) 1{survive at T}] = share mass - kappa P
    s = theta[:, 0] * torch.sqrt(expiry)
    edge = torch.where(theta[:, 3] > 0, 1.0, -1.0) * theta[:, 2] * s - theta[:, 1] * expiry
    up = theta[:, 3] > 0
    ndtr = torch.special.ndtr
    share = torch.where(up, ndtr((edge - 0.5 * s * s) / s), ndtr(-(edge - 0.5 * s * s) / s))
    prob = torch.where(up, ndtr((edge + 0.5 * s * s) / s), ndtr(-(edge + 0.5 * s * s) / s))
    assert torch.allclose(surv, prob, rtol=0, atol=1e-15)
    assert torch.allclose(calls - puts, share[:, None] - torch.exp(log_kappa) * prob[:, None], rtol=0, atol=1e-14)
    # and the simulation watched on 1 date agrees (no control variate)
    one_date = theta.clone()
    one_date[:, 4] = 1.0
    mc = discrete_out_mc(one_date, expiry, log_kappa, 1 << 15, seed=3, control_variate=False)
    terminal_puts, _ = terminal_out(one_date, expiry, log_kappa, torch.zeros(5, 3, dtype=torch.bool))
    assert ((mc["price"] - terminal_puts).abs() <= 4 * mc["se"] + 1e-12).all()


def test_control_variates_cut_the_error_and_agree_with_the_plain_estimate() -> None:
    theta, expiry = points()
    log_kappa = torch.log(torch.tensor([[0.9, 1.1]], dtype=F64)).expand(5, 2)
    calls = torch.tensor([[False, True]]).expand(5, 2)
    cv = discrete_out_mc(theta, expiry, log_kappa, 1 << 14, is_call=calls, seed=7)
    plain = discrete_out_mc(theta, expiry, log_kappa, 1 << 14, is_call=calls, seed=7, control_variate=False)
    assert ((cv["price"] - plain["price"]).abs() <= 4 * plain["se"] + 1e-12).all()
    assert (cv["se"] <= plain["se"] + 1e-15).all()
    assert float(cv["se"].sum()) < 0.5 * float(plain["se"].sum())  # measured: about a quarter


def test_reference_agrees_with_the_served_monte_carlo() -> None:
    """discrete_out_mc against engine/barrier_pricer.py's reference (a different path
    construction: the Brownian bridge order, groups of paths, no control variate) on the
    same contracts: within 4 combined standard errors, prices and survival."""
    theta, expiry = points()
    rows = [(i, call, k) for i in range(1, 5) for call in (False, True) for k in (0.9, 1.1)]
    idx = torch.tensor([i for i, *_ in rows])
    rate, dividend = 0.03, 0.03 - theta[idx, 1]
    t = expiry[idx]
    forward = torch.exp(theta[idx, 1] * t)
    kinds: tuple[BarrierType, ...] = tuple("up-and-out" if theta[i, 3] > 0 else "down-and-out" for i, *_ in rows)
    monitoring: tuple[Monitoring, ...] = tuple(int(theta[i, 4]) for i, *_ in rows)
    batch = BarrierBatch(
        spot=torch.ones(len(rows), dtype=F64),
        strike=torch.tensor([k for *_, k in rows], dtype=F64) * forward,
        level=level_of(theta, expiry)[idx],
        expiry=t,
        rate=torch.full((len(rows),), rate, dtype=F64),
        dividend=dividend,
        rebate=torch.zeros(len(rows), dtype=F64),
        is_call=torch.tensor([c for _, c, _ in rows]),
        theta=theta[idx, :1],
        barrier_type=kinds,
        monitoring=monitoring,
    )
    served = price_barriers(get_process("gbm"), batch, ("price", "survival"))
    assert set(served.method) == {"reference"}
    log_kappa = torch.log(torch.tensor([[k for *_, k in rows]], dtype=F64)).T  # (R, 1)
    ours = discrete_out_mc(theta[idx], t, log_kappa, 1 << 15, is_call=batch.is_call[:, None], seed=11)
    money = torch.exp(-rate * t) * forward
    price = ours["price"][:, 0] * money
    se = torch.sqrt((ours["se"][:, 0] * money) ** 2 + (served.bounds["price"] / 3) ** 2)
    assert ((price - served.values["price"]).abs() <= 4 * se).all(), (price, served.values["price"], se)
    surv_se = torch.sqrt(ours["survival_se"] ** 2 + (served.bounds["survival"] / 3) ** 2)
    assert ((ours["survival"] - served.values["survival"]).abs() <= 4 * surv_se + 1e-9).all()


def test_reference_rows_do_not_depend_on_the_batch() -> None:
    theta, expiry = points()
    log_kappa = torch.log(torch.tensor([[0.95, 1.05]], dtype=F64)).expand(5, 2)
    whole = discrete_out_mc(theta, expiry, log_kappa, 1 << 13, seed=2)
    for i in (0, 3):
        alone = discrete_out_mc(theta[i : i + 1], expiry[i : i + 1], log_kappa[i : i + 1], 1 << 13, seed=2)
        assert torch.equal(alone["price"], whole["price"][i : i + 1])
        assert torch.equal(alone["survival"], whole["survival"][i : i + 1])


def test_the_continuous_control_mean_is_the_closed_form() -> None:
    """The control's exact mean the reference subtracts: Reiner-Rubinstein at the barrier
    (a check that the normalisation D F = 1 holds: S = 1, r = carry, q = 0)."""
    theta, expiry = points()
    level = level_of(theta, expiry)
    one = torch.ones_like(expiry)
    kappa = torch.tensor(1.05, dtype=F64)
    put = barrier_out_price(
        theta[:, 3] < 0,
        "put",
        one,
        kappa * torch.exp(theta[:, 1] * expiry),
        level,
        expiry,
        theta[:, 1],
        0 * one,
        theta[:, 0],
    )
    cont = GBMBarrierProcess().reference_put(theta[:, :4], expiry, torch.log(kappa).expand(5, 1))
    assert torch.allclose(put, cont[:, 0], rtol=0, atol=1e-15)


# -- the bundled model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> CFModel:
    with torch.no_grad():
        return load_cf_model(read_dir(bundled_barrier_models()["gbm_barrier_discrete"]))


TYPES: tuple[BarrierType, ...] = ("down-and-out", "up-and-out", "down-and-in", "up-and-in")


def contracts(dates: int = 12, spot: float = 1.0) -> BarrierBatch:
    rows = [(t, c, k) for t in TYPES for c in (True, False) for k in (0.9, 1.0, 1.1)]
    n = len(rows)

    def col(v: float) -> torch.Tensor:
        return torch.full((n,), v, dtype=F64)

    monitoring: tuple[Monitoring, ...] = (dates,) * n
    return BarrierBatch(
        spot=col(spot),
        strike=torch.tensor([k for *_, k in rows], dtype=F64),
        level=torch.tensor([0.8 if t.startswith("down") else 1.25 for t, *_ in rows], dtype=F64),
        expiry=col(0.75),
        rate=col(0.03),
        dividend=col(0.01),
        rebate=col(0.0),
        is_call=torch.tensor([c for _, c, _ in rows]),
        theta=col(0.25)[:, None],
        barrier_type=tuple(t for t, *_ in rows),
        monitoring=monitoring,
    )


def vanilla(b: BarrierBatch) -> torch.Tensor:
    return black_scholes(b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)["price"]


def reference(b: BarrierBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(price, standard error) of :func:`contracts` by discrete_out_mc, knock-ins by
    parity: its rows are the down knock-outs, the up knock-outs, then the same as
    knock-ins, so two parameter points (down, up) with six strikes each price them all."""
    n = len(b) // 4
    out_rows = torch.arange(2 * n).view(2, n)  # (down, up) x their calls and puts
    first = out_rows[:, 0]
    s = b.theta[first, 0] * torch.sqrt(b.expiry[first])
    theta = torch.stack(
        [
            b.theta[first, 0],
            (b.rate - b.dividend)[first],
            torch.log(b.level[first] / b.spot[first]).abs() / s,
            torch.tensor([-1.0, 1.0], dtype=F64),
            torch.tensor([b.monitoring[int(i)] for i in first], dtype=F64),
        ],
        1,
    )
    log_kappa = torch.log(b.strike / b.forward)[out_rows]
    got = discrete_out_mc(theta, b.expiry[first], log_kappa, 1 << 15, is_call=b.is_call[out_rows], seed=21)
    money = b.discount * b.forward
    out = got["price"].flatten().repeat(2) * money  # knock-ins: the same knock-outs
    return torch.where(b.is_in, vanilla(b) - out, out), got["se"].flatten().repeat(2) * money


@pytest.mark.parametrize("dates", [1, 4, 12, 52])
def test_bundled_model_prices_near_the_reference_with_exact_in_out_parity(bundled: CFModel, dates: int) -> None:
    b = contracts(dates)
    with torch.no_grad():
        got = learned_barrier_prices(bundled, b, vanilla(b))
    truth, se = reference(b)
    err_bp = (got["price"] - truth).abs() * 1e4
    # bench/accuracy_barrier_discrete.py measures the held-out figures (max 25 bp is the bar)
    assert float(err_bp.max()) < 25.0 + 4 * float(se.max()) * 1e4, err_bp
    n = len(b) // 2  # out rows then in rows, the same contracts
    assert torch.allclose(got["price"][:n] + got["price"][n:], vanilla(b)[:n], rtol=0, atol=1e-15)


def test_bundled_model_is_bitwise_batch_invariant(bundled: CFModel) -> None:
    b = contracts(9)
    fields = ("spot", "strike", "level", "expiry", "rate", "dividend", "rebate", "is_call", "theta")
    with torch.no_grad():
        whole = learned_barrier_prices(bundled, b, vanilla(b))["price"]
        for i in (0, 7, len(b) - 1):
            one = BarrierBatch(
                **{f: getattr(b, f)[i : i + 1] for f in fields},
                barrier_type=b.barrier_type[i : i + 1],
                monitoring=b.monitoring[i : i + 1],
            )
            assert torch.equal(learned_barrier_prices(bundled, one, vanilla(one))["price"], whole[i : i + 1])


def test_bundled_delta_with_the_barrier_fixed_matches_finite_differences(bundled: CFModel) -> None:
    """Delta by autograd through the spot (the barrier distance moves with it) against a
    central difference of the learned prices."""
    base = contracts(12)
    spot = base.spot.clone().requires_grad_(True)
    b = BarrierBatch(**{**base.__dict__, "spot": spot})
    price = learned_barrier_prices(bundled, b, vanilla(b))["price"]
    (delta,) = torch.autograd.grad(price.sum(), spot)
    # The network runs in float32, so central differences resolve ~1e-7 / h: h = 1e-3 of
    # spot, as tests/engine/test_barrier_learned.py measured for the continuous law.
    h = 1e-3
    with torch.no_grad():
        up = BarrierBatch(**{**base.__dict__, "spot": base.spot + h})
        dn = BarrierBatch(**{**base.__dict__, "spot": base.spot - h})
        fd = (
            learned_barrier_prices(bundled, up, vanilla(up))["price"]
            - learned_barrier_prices(bundled, dn, vanilla(dn))["price"]
        ) / (2 * h)
    assert torch.allclose(delta, fd, atol=2e-4), (delta - fd).abs().max()


@pytest.mark.parametrize("monitoring", ["continuous", 0, MAX_DATES + 1])
def test_bundled_model_refuses_monitoring_outside_its_law(bundled: CFModel, monitoring: Monitoring) -> None:
    b = contracts(12)
    if monitoring == 0:  # BarrierBatch itself refuses 0 dates
        with pytest.raises(ValueError, match="monitoring"):
            BarrierBatch(**{**b.__dict__, "monitoring": (0,) * len(b)})
        return
    bad = BarrierBatch(**{**b.__dict__, "monitoring": (monitoring,) * len(b)})
    with pytest.raises(ValueError, match="monitoring dates only"):
        learned_barrier_prices(bundled, bad, vanilla(bad))


def test_bundled_far_barrier_gives_the_vanilla(bundled: CFModel) -> None:
    b = contracts(12)
    far = BarrierBatch(**{**b.__dict__, "level": torch.where(b.is_up, 1e3, 1e-3).to(F64)})
    with torch.no_grad():
        got = learned_barrier_prices(bundled, far, vanilla(far))
    n = len(far) // 2  # knock-outs, then knock-ins
    assert float(((got["price"][:n] - vanilla(far)[:n]).abs() * 1e4).max()) < 10.0
    assert float((got["price"][n:].abs() * 1e4).max()) < 10.0  # knock-ins never knock in
    assert float(((got["survival"] - 1.0).abs() * 1e4).max()) < 10.0
    assert math.isfinite(float(got["price"].sum()))
