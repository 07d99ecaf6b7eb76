"""Batched inference: Greeks by autograd vs finite differences and closed forms, domain
fallback, grouping of strikes, chunking, and memory caps."""

from __future__ import annotations

import pytest
import torch

from spectralmc_server.engine.cvnn import CFModel, NetworkConfig
from spectralmc_server.engine.device import BudgetExceededError, MemoryBudget
from spectralmc_server.engine.pricer import CF_CHUNK, MEASURES, OptionBatch, SpectralPricer
from spectralmc_server.engine.processes import GBMProcess
from spectralmc_server.engine.reference import analytic_cf_y, black_scholes, lognormal_moments
from spectralmc_server.engine.reference_pricers import reference_pricer
from spectralmc_server.engine.served import ModelPricer
from spectralmc_server.engine.spectrum import SpectrumConfig

GBM = GBMProcess()
SPEC = SpectrumConfig(n_freq=64, half_width=10.0, n_bins=1024)
F64 = torch.float64
ALL = frozenset(MEASURES)
NO_Q = ALL - {"quantiles"}
LEVELS = torch.tensor([0.01, 0.25, 0.5, 0.75, 0.99], dtype=F64)


def _batch(n: int, seed: int = 0, *, vol_range: tuple[float, float] = (0.06, 0.95)) -> OptionBatch:
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)

    spot = u(50, 150)
    return OptionBatch(
        spot=spot,
        strike=spot * u(0.7, 1.4),
        expiry=u(0.05, 2.9),
        rate=u(-0.02, 0.08),
        dividend=u(0.0, 0.05),
        is_call=torch.rand(n, generator=g) < 0.5,
        theta=u(*vol_range)[:, None],
    )


def _perturbed_model(seed: int = 1) -> CFModel:
    """A smooth, non-trivial learned CF: the normal law times exp(small random net)."""
    torch.manual_seed(seed)
    model = CFModel(
        GBM, GBM.default_domain(), SPEC, NetworkConfig(width=16, depth=2, head="log_cf", baseline="gaussian")
    )
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(0.1)
        for p in (model.net.head.weight_re, model.net.head.weight_im):  # zero-initialised
            p.copy_(0.05 * torch.randn_like(p))
    model.requires_grad_(False)
    return model


def _replace(b: OptionBatch, **kw: torch.Tensor) -> OptionBatch:
    fields = dict(
        spot=b.spot,
        strike=b.strike,
        expiry=b.expiry,
        rate=b.rate,
        dividend=b.dividend,
        is_call=b.is_call,
        theta=b.theta,
    )
    fields.update(kw)
    return OptionBatch(**fields)


def test_analytic_cf_pricer_matches_closed_form_greeks() -> None:
    """COS on the exact CF, with vega/theta by autograd through the CF, equals BSM."""
    b = _batch(400)
    cos = SpectralPricer(GBM, SPEC, lambda th, t: analytic_cf_y(GBM, SPEC, th, t)).evaluate(b, ALL, LEVELS)
    bs = black_scholes(b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)
    for k in ("price", "delta", "gamma", "vega", "theta", "rho", "digital"):
        scale = {"gamma": 1e-2, "delta": 1.0, "digital": 1.0}.get(k, 100.0)
        assert float((cos[k] - bs[k]).abs().max()) < 1e-9 * scale, k


def test_learned_greeks_match_finite_differences() -> None:
    """vega and theta by autograd through the network; delta, gamma, rho analytic through
    the forward: all against central differences of the same pricer's price."""
    pricer = SpectralPricer(GBM, SPEC, _perturbed_model())
    b = _batch(64, seed=3)
    got = pricer.evaluate(b, NO_Q)

    def price(batch: OptionBatch) -> torch.Tensor:
        return pricer.evaluate(batch, frozenset({"price"}))["price"]

    # Spot and rate do not pass through the float32 network: small steps are clean.
    h_spot = 1e-5 * b.spot
    up, dn = price(_replace(b, spot=b.spot + h_spot)), price(_replace(b, spot=b.spot - h_spot))
    h_gamma = 1e-4 * b.spot
    up2, dn2 = price(_replace(b, spot=b.spot + h_gamma)), price(_replace(b, spot=b.spot - h_gamma))
    fd = {
        "delta": (up - dn) / (2 * h_spot),
        "gamma": (up2 - 2 * got["price"] + dn2) / h_gamma**2,
    }
    h = 1e-6
    fd["rho"] = (price(_replace(b, rate=b.rate + h)) - price(_replace(b, rate=b.rate - h))) / (2 * h)
    h = 1e-4  # vol and T do: a step large enough to rise above float32 rounding
    fd["vega"] = (price(_replace(b, theta=b.theta + h)) - price(_replace(b, theta=b.theta - h))) / (2 * h)
    fd["theta"] = -(price(_replace(b, expiry=b.expiry + h)) - price(_replace(b, expiry=b.expiry - h))) / (2 * h)
    tol = {"delta": 1e-6, "gamma": 1e-4, "rho": 1e-4, "vega": 2e-3, "theta": 2e-3}
    for k, t in tol.items():
        err = (got[k] - fd[k]).abs() / (1.0 + fd[k].abs())
        assert float(err.max()) < t, (k, float(err.max()))
    # The learned model is not GBM, so its vega really differs from Black-Scholes vega.
    bs = black_scholes(b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)
    assert float((got["vega"] - bs["vega"]).abs().max()) > 1e-3


def test_put_call_parity_and_digital_parity() -> None:
    pricer = SpectralPricer(GBM, SPEC, _perturbed_model())
    b = _batch(200, seed=5)
    calls = pricer.evaluate(_replace(b, is_call=torch.ones(200, dtype=torch.bool)), NO_Q)
    puts = pricer.evaluate(_replace(b, is_call=torch.zeros(200, dtype=torch.bool)), NO_Q)
    disc = torch.exp(-b.rate * b.expiry)
    assert torch.allclose(calls["price"] - puts["price"], disc * (b.forward - b.strike), rtol=0, atol=1e-10)
    assert torch.allclose(calls["digital"] + puts["digital"], disc, rtol=0, atol=1e-12)
    assert torch.allclose(calls["delta"] - puts["delta"], torch.exp(-b.dividend * b.expiry), atol=1e-12)
    assert torch.equal(calls["gamma"], puts["gamma"])
    assert torch.allclose(calls["vega"], puts["vega"], atol=1e-9)


def test_strikes_sharing_a_point_reuse_one_cf_evaluation() -> None:
    calls: list[int] = []
    model = _perturbed_model()

    def counting(th: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(th.shape[0])
        out: torch.Tensor = model(th, t)
        return out

    b = _batch(300, seed=7)
    theta = b.theta[torch.arange(300) % 3]  # only three distinct (vol, T) points
    expiry = b.expiry[torch.arange(300) % 3]
    grouped = _replace(b, theta=theta, expiry=expiry)
    got = SpectralPricer(GBM, SPEC, counting).evaluate(grouped, frozenset({"price", "delta"}))
    assert calls == [CF_CHUNK]  # three distinct points, padded to the one fixed chunk shape
    one_by_one = SpectralPricer(GBM, SPEC, model)
    for i in (0, 1, 2, 150, 299):
        single = one_by_one.evaluate(grouped.select(torch.tensor([i])), frozenset({"price", "delta"}))
        # Fixed-shape CF chunks: a contract priced alone and in a batch agree bitwise.
        assert torch.equal(single["price"][0], got["price"][i])
        assert torch.equal(single["delta"][0], got["delta"][i])


def test_answers_do_not_depend_on_the_batch() -> None:
    """Every measure of a contract is bitwise the same alone, in a small batch and in a
    large one, at any position (the server batches requests from different clients)."""
    model = _perturbed_model()
    pricer = SpectralPricer(GBM, SPEC, model)
    measures = frozenset({"price", "delta", "gamma", "vega", "theta", "rho", "stdev", "skew", "quantiles"})
    levels = torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)
    target = _batch(1, seed=21)
    alone = pricer.evaluate(target, measures, levels)
    for n, pos in ((2, 1), (7, 0), (65, 64), (300, 150)):
        others = _batch(n, seed=100 + n)
        idx = torch.arange(n)
        mixed = _replace(
            others,
            **{
                f: torch.where(
                    (idx == pos).reshape(-1, *([1] * (getattr(others, f).dim() - 1))),
                    getattr(target, f)[0],
                    getattr(others, f),
                )
                for f in ("spot", "strike", "expiry", "rate", "dividend", "is_call", "theta")
            },
        )
        got = pricer.evaluate(mixed, measures, levels)
        for m in measures:
            assert torch.equal(got[m][pos], alone[m][0]), (n, pos, m)


def test_chunking_gives_the_same_answers() -> None:
    model = _perturbed_model()
    b = _batch(100, seed=9)
    whole = SpectralPricer(GBM, SPEC, model).evaluate(b, ALL, LEVELS)
    small = SpectralPricer(GBM, SPEC, model, max_rows=7)
    assert small.max_rows == 7
    parts = small.evaluate(b, ALL, LEVELS)
    for k in whole:
        # Equal up to the float32 network's batch-shape rounding (see the test above),
        # which the higher moments magnify (they weight the tails by e^{3X}, e^{4X}).
        rtol = 1e-3 if k in ("skew", "kurtosis") else 1e-6
        assert torch.allclose(whole[k], parts[k], rtol=rtol, atol=1e-6), k


def test_inference_budget_sets_the_chunk_and_refuses_too_little() -> None:
    budget = MemoryBudget("inference", 8 << 20)
    pricer = SpectralPricer(GBM, SPEC, _perturbed_model(), budget=budget, holder="test pricer")
    assert 1 <= pricer.max_rows < 16384
    assert budget.report().holders["test pricer"] <= 8 << 20
    with pytest.raises(BudgetExceededError, match="other pricer needs"):
        SpectralPricer(GBM, SPEC, _perturbed_model(), budget=MemoryBudget("inference", 1000), holder="other pricer")
    with pytest.raises(ValueError, match="at most 64 quantile levels"):
        pricer.evaluate(_batch(2), frozenset({"quantiles"}), torch.linspace(0.01, 0.99, 65, dtype=F64))


def test_outside_the_domain_the_reference_answers() -> None:
    model = _perturbed_model()
    domain = GBM.default_domain()
    pricer = ModelPricer(SpectralPricer(GBM, SPEC, model), domain, reference_pricer(GBM), require_certificate=False)
    b = _batch(6, seed=11)
    # vol 2.0 and 0.01 outside; vol 0.5 at T 3 is inside with a spread under MOMENT_MAX_SPREAD
    theta = torch.tensor([[0.2], [2.0], [0.2], [0.01], [0.3], [0.5]], dtype=F64)
    expiry = torch.tensor([1.0, 1.0, 5.0, 1.0, 0.001, 3.0], dtype=F64)  # T 5.0 and 0.001 outside
    b = _replace(b, theta=theta, expiry=expiry)
    ev = pricer.evaluate(b, ALL, LEVELS)
    assert ev.learned.tolist() == [True, False, False, False, False, True]
    bs = black_scholes(b.spot, b.strike, b.expiry, b.rate, b.dividend, b.theta[:, 0], b.is_call)
    out = ~ev.learned
    for k in ("price", "delta", "gamma", "vega", "theta", "rho", "digital"):
        assert torch.equal(ev.values[k][out], bs[k][out]), k
    assert ev.values["quantiles"].shape == (6, 5)


def test_limits_near_expiry_and_zero_vol_through_the_reference() -> None:
    domain = GBM.default_domain()
    pricer = ModelPricer(
        SpectralPricer(GBM, SPEC, _perturbed_model()), domain, reference_pricer(GBM), require_certificate=False
    )
    n = 4
    b = OptionBatch(
        spot=torch.full((n,), 100.0, dtype=F64),
        strike=torch.tensor([90.0, 110.0, 90.0, 110.0], dtype=F64),
        expiry=torch.tensor([1e-8, 1e-8, 1.0, 1.0], dtype=F64),
        rate=torch.tensor([0.05, 0.0, -0.01, 0.02], dtype=F64),
        dividend=torch.zeros(n, dtype=F64),
        is_call=torch.tensor([True, False, True, False]),
        theta=torch.tensor([[0.3], [0.3], [1e-6], [1e-6]], dtype=F64),
    )
    ev = pricer.evaluate(b, frozenset({"price", "delta"}))
    assert not ev.learned.any()
    fwd, disc = b.forward, torch.exp(-b.rate * b.expiry)
    intrinsic = torch.where(b.is_call, disc * (fwd - b.strike), disc * (b.strike - fwd)).clamp(min=0)
    assert torch.allclose(ev.values["price"], intrinsic, atol=1e-9)
    assert torch.allclose(ev.values["delta"].abs(), torch.ones(n, dtype=F64), atol=1e-9)


def test_deep_in_and_out_of_the_money_learned() -> None:
    """Strikes far outside the truncation range are exact: 0 or the discounted intrinsic."""
    pricer = SpectralPricer(GBM, SPEC, _perturbed_model())
    n = 4
    b = OptionBatch(
        spot=torch.full((n,), 100.0, dtype=F64),
        strike=torch.tensor([10.0, 10.0, 1000.0, 1000.0], dtype=F64),
        expiry=torch.full((n,), 0.1, dtype=F64),
        rate=torch.full((n,), 0.03, dtype=F64),
        dividend=torch.full((n,), 0.01, dtype=F64),
        is_call=torch.tensor([True, False, True, False]),
        theta=torch.full((n, 1), 0.1, dtype=F64),
    )
    got = pricer.evaluate(b, frozenset({"price", "delta", "gamma"}))
    disc, qdisc = torch.exp(-b.rate * b.expiry), torch.exp(-b.dividend * b.expiry)
    expected = torch.stack(
        [disc[0] * (b.forward[0] - 10.0), 0 * disc[0], 0 * disc[0], disc[3] * (1000.0 - b.forward[3])]
    )
    assert torch.allclose(got["price"], expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(got["gamma"], torch.zeros(n, dtype=F64))
    assert torch.allclose(got["delta"], torch.stack([qdisc[0], 0 * qdisc[0], 0 * qdisc[0], -qdisc[0]]), atol=1e-15)


@pytest.mark.parametrize("measure", [m for m in MEASURES if m != "quantiles"])
def test_each_measure_alone_equals_it_among_all(measure: str) -> None:
    """Asking for one measure gives what it is among all of them (vega alone once
    failed: autograd was asked about an input that did not require gradients)."""
    pricer = SpectralPricer(GBM, SPEC, _perturbed_model())
    b = _batch(40, seed=31)
    alone = pricer.evaluate(b, frozenset({measure}))
    together = pricer.evaluate(b, frozenset(MEASURES) - {"quantiles"})
    assert set(alone) == {measure}
    torch.testing.assert_close(alone[measure], together[measure], rtol=1e-12, atol=1e-12)


def test_chunk_size_follows_the_levels_asked_for() -> None:
    """A working set sized for 64 quantile levels holds ~17x more price-only rows, and
    the answers do not depend on how the rows were chunked."""
    from spectralmc_server.engine.pricer import bytes_per_row

    work = 10 * bytes_per_row(SPEC, 64)
    small = SpectralPricer(GBM, SPEC, _perturbed_model(), working_bytes=work)
    assert small.rows_per_chunk(64) == 10
    assert small.rows_per_chunk(0) == work // bytes_per_row(SPEC, 0) > 100
    b = _batch(250, seed=41)
    levels = torch.tensor([0.1, 0.9], dtype=torch.float64)
    whole = SpectralPricer(GBM, SPEC, _perturbed_model()).evaluate(b, frozenset({"price", "quantiles"}), levels)
    chunked = small.evaluate(b, frozenset({"price", "quantiles"}), levels)
    for m in ("price", "quantiles"):
        assert torch.equal(whole[m], chunked[m])


def test_higher_moments_past_the_quadrature_spread_come_from_the_closed_form() -> None:
    """vol 1, T 3 is inside the domain, but its spread 1.73 exceeds MOMENT_MAX_SPREAD:
    stdev, skew and kurtosis (and with them the contract) come from Black-Scholes."""
    pricer = ModelPricer(
        SpectralPricer(GBM, SPEC, _perturbed_model()),
        GBM.default_domain(),
        reference_pricer(GBM),
        require_certificate=False,
    )
    b = _replace(
        _batch(2, seed=3), theta=torch.tensor([[1.0], [1.0]], dtype=F64), expiry=torch.tensor([3.0, 3.0], dtype=F64)
    )
    b = _replace(b, strike=b.forward)
    assert pricer.evaluate(b, frozenset({"price"})).learned.tolist() == [True, True]
    ev = pricer.evaluate(b, frozenset({"price", "kurtosis"}))
    assert ev.learned.tolist() == [False, False]
    want = lognormal_moments(b.forward, torch.sqrt(b.expiry))["kurtosis"]
    assert torch.equal(ev.values["kurtosis"], want)
