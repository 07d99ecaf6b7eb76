"""The learned Heston barrier law (engine/processes/heston_barrier.py): its paths and
weights, the law's Monte Carlo against the served reference and with and without its
control variate, bitwise batch invariance, and the bundled model: accuracy on a few
contracts against QuantLib's FdHestonBarrierEngine, in-out parity, batch invariance,
delta with the barrier fixed against finite differences, the monitoring it refuses."""

from __future__ import annotations

import pytest
import QuantLib as ql  # noqa: N813 (the library's conventional alias)
import torch

from spectralmc_server.engine.barrier_learned import learned_barrier_prices
from spectralmc_server.engine.barrier_mc import BarrierBatch, BarrierType, vanilla_price
from spectralmc_server.engine.barrier_pricer import price_barriers
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.cvnn import CFModel
from spectralmc_server.engine.normals import NormalsConfig, generate_block
from spectralmc_server.engine.processes import PROCESSES, get_process
from spectralmc_server.engine.processes.barrier_paths import BARRIER_STEPS, Monitoring, heston_barrier_paths
from spectralmc_server.engine.processes.heston import HestonProcess
from spectralmc_server.engine.processes.heston_barrier import (
    STEPS,
    HestonBarrierProcess,
    heston_barrier_theta,
    heston_out_mc,
    vanilla_over_forward,
)
from spectralmc_server.engine.reference import simulated_cf_y
from spectralmc_server.engine.served import load_cf_model
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.models import bundled_barrier_models, bundled_models

F64 = torch.float64
PROCESS = HestonBarrierProcess()
HESTON = get_process("heston")
CONTINUOUS: Monitoring = "continuous"


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def points() -> tuple[torch.Tensor, torch.Tensor]:
    """theta (v0, kappa, theta, xi, rho, carry, distance, side) and T."""
    theta = torch.tensor(
        [
            [0.04, 1.5, 0.04, 0.5, -0.7, 0.02, 1.0, -1.0],
            [0.09, 3.0, 0.05, 0.9, -0.3, 0.0, 0.6, 1.0],
            [0.0175, 1.5768, 0.0398, 0.5751, -0.5711, 0.02, 2.0, 1.0],
        ],
        dtype=F64,
    )
    return theta, torch.tensor([1.0, 0.5, 2.0], dtype=F64)


def normals(paths: int, seed: int = 4) -> torch.Tensor:
    cfg = NormalsConfig(seed=seed, mode="pseudo", antithetic=True, rows=paths, dims=2 * STEPS, dtype="float64")
    return generate_block(cfg, 0, torch.device("cpu"))


def test_the_heston_law_is_a_model_process() -> None:
    assert "heston_barrier" not in PROCESSES and isinstance(get_process("heston_barrier"), HestonBarrierProcess)
    assert "heston_barrier" not in bundled_models()
    assert PROCESS.defective and PROCESS.normals_per_path == 2 * STEPS
    raw = torch.tensor([[0.04, 1.5, 0.04, 0.5, -0.7, 0.0, 1.0, 0.2], [0.04, 1.5, 0.04, 0.5, -0.7, 0.0, 1.0, -0.2]])
    assert PROCESS.canonical_params(raw.to(F64))[:, 7].tolist() == [1.0, -1.0]
    theta, expiry = points()
    assert torch.equal(PROCESS.scale(theta, expiry), HESTON.scale(theta[:, :5], expiry))


def test_one_simulation_gives_the_weights_and_the_share_weights() -> None:
    theta, expiry = points()
    z = normals(1 << 10)[None].expand(3, -1, -1)
    x, w, share = PROCESS.weighted_with_share(theta, expiry, z)
    x2, w2 = PROCESS.simulate_weighted(theta, expiry, z)
    assert torch.equal(x, x2) and torch.equal(w, w2)
    assert torch.equal(share, PROCESS.share_weights(theta, expiry, z))
    assert torch.equal(share, torch.exp(x) * w)
    assert bool(((w >= 0) & (w <= 1)).all())
    spectrum = SpectrumConfig()
    phi = simulated_cf_y(PROCESS, spectrum, theta, expiry, z.to(torch.float32))
    assert phi.shape == (3, spectrum.n_freq + 1)
    assert torch.allclose(phi[:, 0].real.double(), w.mean(1), atol=1e-3)  # phi(0): the survival
    assert torch.allclose(phi[:, -1].real.double(), share.mean(1), atol=1e-3)


def test_the_laws_monte_carlo_control_variate_cuts_the_error_without_moving_the_answer() -> None:
    theta, expiry = points()
    log_kappa = torch.log(torch.tensor([[0.9, 1.1]], dtype=F64)).expand(3, 2)
    calls = torch.tensor([[True, False]]).expand(3, 2)
    van = vanilla_over_forward(theta, expiry, log_kappa, calls)
    plain = heston_out_mc(theta, expiry, log_kappa, 1 << 13, is_call=calls, seed=5)
    cv = heston_out_mc(theta, expiry, log_kappa, 1 << 13, is_call=calls, vanilla=van, seed=5)
    assert ((cv["price"] - plain["price"]).abs() <= 4 * plain["se"] + 1e-12).all()
    assert (cv["se"] <= plain["se"] + 1e-15).all()
    assert torch.equal(cv["survival"], plain["survival"])
    # rows do not depend on the batch
    alone = heston_out_mc(
        theta[1:2], expiry[1:2], log_kappa[1:2], 1 << 13, is_call=calls[1:2], vanilla=van[1:2], seed=5
    )
    assert torch.equal(alone["price"], cv["price"][1:2])


def test_the_laws_monte_carlo_agrees_with_the_served_reference() -> None:
    """heston_out_mc on the served reference's 128 steps against engine/barrier_pricer.py
    (another path order, groups, its own control variate): within 4 combined SE."""
    theta, expiry = points()
    idx = torch.tensor([0, 1])
    rate = torch.tensor([0.03, 0.03], dtype=F64)
    spot = torch.ones(2, dtype=F64)
    s = HESTON.scale(theta[idx, :5], expiry[idx])
    level = torch.exp(torch.where(theta[idx, 7] > 0, 1.0, -1.0) * theta[idx, 6] * s)
    kinds: tuple[BarrierType, ...] = ("down-and-out", "up-and-out")
    batch = BarrierBatch(
        spot=spot,
        strike=torch.exp(theta[idx, 5] * expiry[idx]),
        level=level,
        expiry=expiry[idx],
        rate=rate,
        dividend=rate - theta[idx, 5],
        rebate=torch.zeros(2, dtype=F64),
        is_call=torch.tensor([True, False]),
        theta=theta[idx, :5],
        barrier_type=kinds,
        monitoring=(CONTINUOUS, CONTINUOUS),
    )
    served = price_barriers(HESTON, batch, ("price",))
    calls = batch.is_call[:, None]
    log_kappa = torch.zeros(2, 1, dtype=F64)
    van = vanilla_over_forward(theta[idx], expiry[idx], log_kappa, calls)
    ours = heston_out_mc(
        theta[idx], expiry[idx], log_kappa, 1 << 14, is_call=calls, vanilla=van, steps=BARRIER_STEPS, seed=9
    )
    money = batch.discount * batch.forward
    price = ours["price"][:, 0] * money
    se = torch.sqrt((ours["se"][:, 0] * money) ** 2 + (served.bounds["price"] / 3) ** 2)
    assert ((price - served.values["price"]).abs() <= 4 * se).all(), (price, served.values["price"], se)


# -- the bundled model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> CFModel:
    with torch.no_grad():
        return load_cf_model(read_dir(bundled_barrier_models()["heston_barrier"]))


TYPES: tuple[BarrierType, ...] = ("down-and-out", "up-and-out", "down-and-in", "up-and-in")
PARAMS = (0.04, 1.5, 0.04, 0.5, -0.7)
EVAL = ql.Date(15, 1, 2024)
DAYS = 182


def contracts(spot: float = 100.0) -> BarrierBatch:
    rows = [(t, c, k) for t in TYPES for c in (True, False) for k in (90.0, 100.0, 110.0)]
    n = len(rows)

    def col(v: float) -> torch.Tensor:
        return torch.full((n,), v, dtype=F64)

    return BarrierBatch(
        spot=col(spot),
        strike=torch.tensor([k for *_, k in rows], dtype=F64),
        level=torch.tensor([80.0 if t.startswith("down") else 125.0 for t, *_ in rows], dtype=F64),
        expiry=col(DAYS / 365.0),
        rate=col(0.03),
        dividend=col(0.01),
        rebate=col(0.0),
        is_call=torch.tensor([c for _, c, _ in rows]),
        theta=torch.tensor([PARAMS] * n, dtype=F64),
        barrier_type=tuple(t for t, *_ in rows),
        monitoring=(CONTINUOUS,) * n,
    )


def fd_knock_out(kind: str, is_call: bool, strike: float, level: float) -> float:
    ql.Settings.instance().evaluationDate = EVAL
    dc = ql.Actual365Fixed()
    rts = ql.YieldTermStructureHandle(ql.FlatForward(EVAL, 0.03, dc))
    qts = ql.YieldTermStructureHandle(ql.FlatForward(EVAL, 0.01, dc))
    process = ql.HestonProcess(rts, qts, ql.QuoteHandle(ql.SimpleQuote(100.0)), *PARAMS)
    payoff = ql.PlainVanillaPayoff(ql.Option.Call if is_call else ql.Option.Put, strike)
    barrier = ql.Barrier.DownOut if kind.startswith("down") else ql.Barrier.UpOut
    option = ql.BarrierOption(barrier, level, 0.0, payoff, ql.EuropeanExercise(EVAL + DAYS))
    option.setPricingEngine(ql.FdHestonBarrierEngine(ql.HestonModel(process), 100, 200, 50, 0))
    return float(option.NPV())


def test_bundled_model_prices_near_fd_with_exact_in_out_parity(bundled: CFModel) -> None:
    b = contracts()
    van = vanilla_price(HESTON, b)
    with torch.no_grad():
        got = learned_barrier_prices(bundled, b, van)
    n = len(b) // 2  # out rows then in rows, the same contracts
    fd = torch.tensor(
        [fd_knock_out(b.barrier_type[i], bool(b.is_call[i]), float(b.strike[i]), float(b.level[i])) for i in range(n)],
        dtype=F64,
    )
    err_bp = (got["price"][:n] - fd).abs() / 100.0 * 1e4
    # bench/accuracy_barrier_heston.py measures the held-out figures (the target max is 50 bp)
    assert float(err_bp.max()) < 50.0, err_bp
    assert torch.allclose(got["price"][:n] + got["price"][n:], van[:n], rtol=0, atol=1e-12)


def test_bundled_model_is_bitwise_batch_invariant(bundled: CFModel) -> None:
    b = contracts()
    fields = ("spot", "strike", "level", "expiry", "rate", "dividend", "rebate", "is_call", "theta")
    van = vanilla_price(HESTON, b)
    with torch.no_grad():
        whole = learned_barrier_prices(bundled, b, van)["price"]
        for i in (0, 7, len(b) - 1):
            one = BarrierBatch(
                **{f: getattr(b, f)[i : i + 1] for f in fields},
                barrier_type=b.barrier_type[i : i + 1],
                monitoring=b.monitoring[i : i + 1],
            )
            assert torch.equal(learned_barrier_prices(bundled, one, van[i : i + 1])["price"], whole[i : i + 1])


def test_bundled_delta_with_the_barrier_fixed_matches_finite_differences(bundled: CFModel) -> None:
    base = contracts()
    spot = base.spot.clone().requires_grad_(True)
    b = BarrierBatch(**{**base.__dict__, "spot": spot})
    price = learned_barrier_prices(bundled, b, vanilla_price(HESTON, b))["price"]
    (delta,) = torch.autograd.grad(price.sum(), spot)
    h = 0.1  # 1e-3 of spot: the float32 network's rounding over 2h, as for the GBM laws
    with torch.no_grad():
        up = BarrierBatch(**{**base.__dict__, "spot": base.spot + h})
        dn = BarrierBatch(**{**base.__dict__, "spot": base.spot - h})
        p_up = learned_barrier_prices(bundled, up, vanilla_price(HESTON, up))["price"]
        p_dn = learned_barrier_prices(bundled, dn, vanilla_price(HESTON, dn))["price"]
    fd = (p_up - p_dn) / (2 * h)
    # the knock-outs: the law's own delta (the knock-ins add the vanilla's, which the COS
    # reference computes outside autograd's graph)
    n = len(base) // 2
    assert torch.allclose(delta[:n], fd[:n], atol=2e-4), (delta[:n] - fd[:n]).abs().max()


def test_bundled_model_refuses_discrete_monitoring_and_other_processes(bundled: CFModel) -> None:
    b = contracts()
    dated = BarrierBatch(**{**b.__dict__, "monitoring": (12,) * len(b)})
    with pytest.raises(ValueError, match="continuous monitoring only"):
        learned_barrier_prices(bundled, dated, vanilla_price(HESTON, b))
    gbm_rows = BarrierBatch(**{**b.__dict__, "theta": b.theta[:, :1]})
    with pytest.raises(ValueError, match="Heston's 5 parameters"):
        learned_barrier_prices(bundled, gbm_rows, vanilla_price(HESTON, b))


def test_heston_barrier_theta_measures_the_distance_in_the_vanillas_spread() -> None:
    b = contracts()
    theta = heston_barrier_theta(b.theta, b.drift, b.spot, b.level, b.expiry)
    s = HESTON.scale(b.theta, b.expiry)
    assert torch.allclose(theta[:, 6], (torch.log(b.level / b.spot) / s).abs())
    assert theta[:, 7].tolist() == [-1.0 if t.startswith("down") else 1.0 for t in b.barrier_type]


@pytest.mark.parametrize("zv", [5.2, 5.83, 7.0])
def test_barrier_paths_in_float32_stay_finite_far_in_the_variance_tail(zv: float) -> None:
    """The barrier paths' QE step (barrier_paths._qe_step) in float32 against the vanilla
    loop in float64 one step from a state in QE's exponential branch
    (tests/engine/test_heston.py has the vanilla's own check)."""
    heston = torch.tensor([[0.01, 1.28, 0.026, 0.916, -0.89]], dtype=F64)
    expiry = torch.tensor([0.05], dtype=F64)
    z = torch.tensor([[[zv, 0.3]]], dtype=F64)
    x64 = HestonProcess(steps=1, bridge=False).simulate_x(heston, expiry, z)
    b = torch.tensor([-3.0 * float(HESTON.scale(heston, expiry))], dtype=F64)
    carry = torch.zeros(1, dtype=F64)
    x, w = heston_barrier_paths(heston, expiry, carry, b, torch.tensor([False]), z.float(), "continuous", steps=1)
    assert torch.isfinite(x).all() and torch.isfinite(w).all()
    assert torch.allclose(x.double(), x64, rtol=0, atol=1e-5)
