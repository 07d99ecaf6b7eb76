"""The learned barrier law (engine/processes/gbm_barrier.py, engine/barrier_learned.py):
weighted CF targets against direct sums and the closed-form survival, COS on an exact
defective CF against Reiner-Rubinstein, the defective CFModel's outputs, training that
learns, and the bundled model's prices: in-out parity, bitwise batch invariance, the far
barrier and the barrier at spot, Greeks by autograd against finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from spectralmc_server.engine.barrier_analytic import barrier_price, survival_probability
from spectralmc_server.engine.barrier_learned import defective_puts, learned_barrier_prices
from spectralmc_server.engine.barrier_mc import BarrierBatch, BarrierType
from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.cvnn import CFModel, NetworkConfig
from spectralmc_server.engine.processes import PROCESSES, get_process
from spectralmc_server.engine.processes.barrier_paths import Monitoring
from spectralmc_server.engine.processes.gbm_barrier import (
    MAX_DISTANCE,
    GBMBarrierProcess,
    barrier_distance,
    barrier_params,
)
from spectralmc_server.engine.reference import black_scholes, simulated_cf_y
from spectralmc_server.engine.served import load_cf_model
from spectralmc_server.engine.spectrum import SpectrumConfig, estimate_cf
from spectralmc_server.engine.trainer import TrainConfig, Trainer
from spectralmc_server.models import bundled_barrier_models, bundled_models

F64 = torch.float64
PROCESS = GBMBarrierProcess()
SPECTRUM = SpectrumConfig()
TYPES: tuple[BarrierType, ...] = ("down-and-out", "up-and-out", "down-and-in", "up-and-in")


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def points() -> tuple[torch.Tensor, torch.Tensor]:
    """(vol, carry, distance) and T: down and up barriers, near and far."""
    signed = torch.tensor([[0.3, 0.05, -0.8], [0.3, -0.05, 0.6], [0.8, 0.02, -2.0], [0.1, 0.0, 1.5], [0.5, 0.08, -0.2]])
    theta = barrier_params(*signed.to(F64).unbind(1))
    return theta, torch.tensor([1.0, 0.5, 2.0, 0.25, 1.5], dtype=F64)


def signed_distance(theta: torch.Tensor) -> torch.Tensor:
    return theta[:, 2] * theta[:, 3]


def closed_survival(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    s = theta[:, 0] * torch.sqrt(expiry)
    one = torch.ones_like(s)
    level = torch.exp(signed_distance(theta) * s)
    return survival_probability(theta[:, 3] < 0, one, level, expiry, theta[:, 1], torch.zeros_like(s), theta[:, 0])


# -- the law and its targets --------------------------------------------------------------


def test_the_barrier_law_is_a_model_process_not_a_contract_process() -> None:
    assert "gbm_barrier" not in PROCESSES and isinstance(get_process("gbm_barrier"), GBMBarrierProcess)
    assert PROCESS.defective and not get_process("gbm").defective
    assert "gbm_barrier" not in bundled_models()  # not served: no contract names it


def test_weighted_fft_estimate_matches_the_direct_weighted_sum() -> None:
    gen = torch.Generator().manual_seed(3)
    spec = SpectrumConfig(n_freq=96, half_width=10.0, n_bins=8192)
    y = torch.randn(3, 4000, generator=gen, dtype=F64) * 1.3
    w = torch.rand(3, 4000, generator=gen, dtype=F64)
    fft = estimate_cf(y, spec, weights=w)
    freqs = spec.frequencies(dtype=F64)
    inside = (y.abs() <= spec.half_width).to(F64) * w
    direct = torch.complex(
        (torch.cos(y[:, :, None] * freqs) * inside[:, :, None]).mean(1),
        (torch.sin(y[:, :, None] * freqs) * inside[:, :, None]).mean(1),
    )
    assert float((fft - direct).abs().max()) < 2e-4  # the binning's error, as unweighted (test_spectrum.py)
    assert torch.allclose(fft[:, 0].real, w.mean(1), atol=1e-13)  # the mass: the weights' mean
    # linear in the weights, and weights of one are the unweighted estimate bit for bit
    w2 = torch.rand(3, 4000, generator=gen, dtype=F64)
    both = estimate_cf(y, spec, weights=w + w2)
    assert torch.allclose(both, fft + estimate_cf(y, spec, weights=w2), atol=1e-13)
    assert torch.equal(estimate_cf(y, spec, weights=torch.ones_like(y)), estimate_cf(y, spec))
    with pytest.raises(ValueError, match="weights"):
        estimate_cf(y, spec, weights=w[:, :10])


def test_survival_weights_average_to_the_closed_form_hitting_probability() -> None:
    theta, expiry = points()
    z = torch.randn(len(expiry), 200_000, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    x, w = PROCESS.simulate_weighted(theta, expiry, z)
    assert bool(((w >= 0) & (w <= 1)).all())
    survival = closed_survival(theta, expiry)
    se = w.std(1) / math.sqrt(w.shape[1])
    assert bool(((w.mean(1) - survival).abs() <= 4 * se + 1e-12).all()), (w.mean(1), survival)
    # X is the vanilla's log(S_T / F) whatever the barrier: E[e^X] = 1
    assert torch.allclose(torch.exp(x).mean(1), torch.ones(len(expiry), dtype=F64), atol=5e-3)


def test_weighted_payoffs_price_the_closed_form_knock_out_put() -> None:
    theta, expiry = points()
    log_kappa = torch.log(torch.tensor([0.85, 1.0, 1.15], dtype=F64)).expand(len(expiry), 3)
    z = torch.randn(len(expiry), 200_000, 1, generator=torch.Generator().manual_seed(7), dtype=F64)
    x, w = PROCESS.simulate_weighted(theta, expiry, z)
    payoff = (torch.exp(log_kappa)[:, None, :] - torch.exp(x)[:, :, None]).clamp(min=0) * w[:, :, None]
    mc, se = payoff.mean(1), payoff.std(1) / math.sqrt(x.shape[1])
    ref = PROCESS.reference_put(theta, expiry, log_kappa)
    assert bool(((mc - ref).abs() <= 4 * se + 1e-12).all()), (mc, ref)


def test_targets_carry_the_mass_and_the_share_mass() -> None:
    theta, expiry = points()
    z = torch.randn(len(expiry), 100_000, 1, generator=torch.Generator().manual_seed(9), dtype=F64)
    target = simulated_cf_y(PROCESS, SPECTRUM, theta, expiry, z)
    assert target.shape == (len(expiry), SPECTRUM.n_freq + 1)
    x, w = PROCESS.simulate_weighted(theta, expiry, z)
    assert torch.allclose(target[:, 0].real, w.mean(1), atol=1e-9)  # nothing beyond |Y| = L here
    # the share mass E[e^X w] = Q^S(survived): the survival with drift r - q + vol^2
    share = PROCESS.share_weights(theta, expiry, z)
    assert torch.equal(target[:, -1].real, share.mean(1))
    s = theta[:, 0] * torch.sqrt(expiry)
    closed = survival_probability(
        theta[:, 3] < 0,
        torch.ones_like(s),
        torch.exp(signed_distance(theta) * s),
        expiry,
        theta[:, 1] + theta[:, 0] ** 2,
        torch.zeros_like(s),
        theta[:, 0],
    )
    assert torch.allclose(share.mean(1), closed, atol=4 * float(share.std(1).max()) / math.sqrt(share.shape[1]))
    naive = torch.exp(x) * w  # the same mass, estimated with more noise
    assert torch.allclose(naive.mean(1), closed, atol=4 * float(naive.std(1).max()) / math.sqrt(naive.shape[1]))
    # weights in [0, 1] have a stdev of at most 1/2; e^X w has e^{s^2}'s tail below an up barrier
    assert float(share.std(1).max()) <= 0.5 < float(naive.std(1).max())
    with pytest.raises(ValueError, match="control variate"):
        simulated_cf_y(PROCESS, SPECTRUM, theta, expiry, z, control_variate=True)


# -- COS on a defective CF ------------------------------------------------------------------


def exact_defective(theta: torch.Tensor, expiry: torch.Tensor, spectrum: SpectrumConfig) -> torch.Tensor:
    """(B, K + 1): the defective CF of Y by quadrature of the bridge-weighted Gaussian
    density (exact for GBM), then the share mass E[e^X 1{survived}]."""
    y = torch.linspace(-spectrum.half_width, spectrum.half_width, 200_001, dtype=F64)
    dy = float(y[1] - y[0])
    z = y[None, :] + 0.5 * (theta[:, 0] * torch.sqrt(expiry))[:, None]  # Y = -s/2 + Z
    _, w = PROCESS.simulate_weighted(theta, expiry, z[..., None])
    s = (theta[:, 0] * torch.sqrt(expiry))[:, None]
    dens = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * w * dy
    freqs = spectrum.frequencies(dtype=F64)
    ang = y[:, None] * freqs[None, :]
    phi = torch.complex(dens @ torch.cos(ang), dens @ torch.sin(ang))
    share = (dens * torch.exp(s * y[None, :])).sum(1, keepdim=True)
    return torch.cat([phi, share.to(phi.dtype)], 1)


def test_cos_on_an_exact_defective_cf_prices_knock_outs_as_the_closed_form() -> None:
    theta, expiry = points()
    model = CFModel(PROCESS, PROCESS.default_domain(), SPECTRUM, NetworkConfig())
    kappa = torch.tensor([0.8, 0.9, 1.0, 1.1, 1.2], dtype=F64)
    log_kappa = torch.log(kappa).expand(len(expiry), 5)
    terms = defective_puts(exact_defective(theta, expiry, SPECTRUM), model, PROCESS.scale(theta, expiry), log_kappa)
    ref_put = PROCESS.reference_put(theta, expiry, log_kappa)
    # The surviving density has a kink at the barrier (it falls to 0 linearly there), so
    # COS converges algebraically: 64 frequencies on [-10, 10] leave ~0.1 bp (9e-6 measured).
    tol = 2e-5
    assert torch.allclose(terms["put"], ref_put, atol=tol), (terms["put"] - ref_put).abs().max()
    # calls by parity on the survivors, against the closed-form knock-out call
    n = len(expiry)
    s = PROCESS.scale(theta, expiry)
    fwd = torch.exp(theta[:, 1] * expiry)
    for j in range(5):
        call = barrier_price(
            ["down-and-out" if float(side) < 0 else "up-and-out" for side in theta[:, 3]],
            "call",
            torch.ones(n, dtype=F64),
            kappa[j] * fwd,
            torch.exp(signed_distance(theta) * s),
            expiry,
            theta[:, 1],
            torch.zeros(n, dtype=F64),
            theta[:, 0],
        )["price"]
        assert torch.allclose(terms["call"][:, j], call, atol=tol), (terms["call"][:, j] - call).abs().max()
    assert torch.allclose(terms["mass"], closed_survival(theta, expiry), atol=1e-9)


def test_defective_model_learns_the_mass_and_the_share_mass() -> None:
    model = CFModel(PROCESS, PROCESS.default_domain(), SPECTRUM, NetworkConfig(width=8, depth=1))
    theta, expiry = points()
    out = model(theta, expiry)
    assert out.shape == (len(expiry), SPECTRUM.n_freq + 1)
    assert not torch.allclose(out[:, 0], torch.ones(len(expiry), dtype=out.dtype))  # phi(0) is learned
    assert not model.supports_tangents()
    with pytest.raises(NotImplementedError):
        model.forward_with_tangents(theta, expiry, torch.zeros(1, *theta.shape, dtype=F64), torch.zeros(1, len(expiry)))


def test_training_a_small_barrier_model_learns() -> None:
    config = TrainConfig(
        process="gbm_barrier",
        batch_points=32,
        paths=256,
        network=NetworkConfig(width=32, depth=2, head="cf"),
        validation_points=64,
        validate_every=10_000,
        schedule_steps=400,
    )
    trainer = Trainer(config)
    try:
        first = trainer.validate().p95_bp
        trainer.run(400)
        last = trainer.validate().p95_bp
    finally:
        trainer.close()
    assert last < 0.5 * first, (first, last)  # 400 steps of a small net: a third measured


# -- the bundled model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> CFModel:
    with torch.no_grad():
        return load_cf_model(read_dir(bundled_barrier_models()["gbm_barrier"]))


def contracts(level_down: float = 0.8, level_up: float = 1.25, rebate: float = 0.0) -> BarrierBatch:
    rows = [(t, c, k) for t in TYPES for c in (True, False) for k in (0.9, 1.0, 1.1)]
    n = len(rows)

    def col(v: float) -> torch.Tensor:
        return torch.full((n,), v, dtype=F64)

    continuous: Monitoring = "continuous"
    monitoring = (continuous,) * n
    return BarrierBatch(
        spot=col(1.0),
        strike=torch.tensor([k for *_, k in rows], dtype=F64),
        level=torch.tensor([level_down if t.startswith("down") else level_up for t, *_ in rows], dtype=F64),
        expiry=col(0.75),
        rate=col(0.03),
        dividend=col(0.01),
        rebate=col(rebate),
        is_call=torch.tensor([c for _, c, _ in rows]),
        theta=col(0.25)[:, None],
        barrier_type=tuple(t for t, *_ in rows),
        monitoring=monitoring,
    )


def take(b: BarrierBatch, i: int) -> BarrierBatch:
    """Row i alone."""
    fields = {k: v[i : i + 1] for k, v in b.__dict__.items()}
    return BarrierBatch(**fields)


def vanilla(b: BarrierBatch) -> torch.Tensor:
    return black_scholes(b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)["price"]


def closed(b: BarrierBatch) -> dict[str, torch.Tensor]:
    kinds = list(b.barrier_type)
    return barrier_price(
        kinds, b.is_call, b.spot, b.strike, b.level, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.rebate
    )


def test_bundled_model_prices_near_the_closed_form_with_exact_in_out_parity(bundled: CFModel) -> None:
    b = contracts(rebate=0.02)
    with torch.no_grad():
        got = learned_barrier_prices(bundled, b, vanilla(b))
    truth = closed(b)
    err_bp = (got["price"] - truth["price"]).abs() * 1e4
    assert float(err_bp.max()) < 10.0, err_bp  # bench/accuracy_barrier.py measures the held-out figures
    n = len(b) // 2  # out rows then in rows, the same contracts
    rebate = b.rebate * b.discount
    # in + out = vanilla + R D up to the rounding of the two sums
    assert torch.allclose(got["price"][:n] + got["price"][n:], vanilla(b)[:n] + rebate[:n], rtol=0, atol=1e-15)


def test_bundled_model_is_bitwise_batch_invariant(bundled: CFModel) -> None:
    b = contracts()
    with torch.no_grad():
        whole = learned_barrier_prices(bundled, b, vanilla(b))["price"]
        for i in (0, 5, len(b) - 1):
            one = take(b, i)
            alone = learned_barrier_prices(bundled, one, vanilla(one))["price"]
            assert torch.equal(alone, whole[i : i + 1])


def test_far_barrier_gives_the_vanilla_and_the_barrier_at_spot_gives_nothing(bundled: CFModel) -> None:
    far = contracts(level_down=0.05, level_up=20.0)  # |distance| clamped to MAX_DISTANCE
    assert bool((barrier_distance(far.spot, far.level, far.theta[:, 0], far.expiry).abs() == MAX_DISTANCE).all())
    with torch.no_grad():
        got = learned_barrier_prices(bundled, far, vanilla(far))
    n = len(far) // 2
    assert float(((got["price"][:n] - vanilla(far)[:n]).abs() * 1e4).max()) < 10.0
    assert float((got["price"][n:].abs() * 1e4).max()) < 10.0  # knock-ins never knock in
    near = contracts(level_down=0.9999, level_up=1.0001)
    with torch.no_grad():
        got = learned_barrier_prices(bundled, near, vanilla(near))
    assert float((got["knock_out"].abs() * 1e4).max()) < 10.0
    assert float(got["survival"].abs().max()) < 2e-3


def test_learned_delta_with_the_barrier_fixed_matches_finite_differences(bundled: CFModel) -> None:
    b = contracts()
    spot = b.spot.clone().requires_grad_(True)
    moved = BarrierBatch(**{**b.__dict__, "spot": spot})
    price = learned_barrier_prices(bundled, moved, vanilla(moved))["price"]
    (delta,) = torch.autograd.grad(price.sum(), spot)

    def priced_at(bump: float) -> torch.Tensor:
        moved = BarrierBatch(**{**b.__dict__, "spot": b.spot + bump})  # the barrier stays where it is
        with torch.no_grad():
            return learned_barrier_prices(bundled, moved, vanilla(moved))["price"]

    # The network runs in float32 (~1e-7 relative), so central differences resolve ~1e-7 / h:
    # h = 1e-3 of spot measured 9e-5 from autograd, h = 1e-4 6e-4 (rounding), 1e-2 1e-3 (curvature).
    h = 1e-3
    fd = (priced_at(h) - priced_at(-h)) / (2 * h)
    assert torch.allclose(delta, fd, atol=2e-4), (delta - fd).abs().max()
    # and near the closed form's delta, which the barrier's distance drives
    spot_c = b.spot.clone().requires_grad_(True)
    closed_price = closed(BarrierBatch(**{**b.__dict__, "spot": spot_c}))["price"]
    (closed_delta,) = torch.autograd.grad(closed_price.sum(), spot_c)
    assert float((delta - closed_delta).abs().max()) < 0.02, (delta - closed_delta).abs().max()
