"""The reference's exact moments (engine/moments.py and each process's log-moments):
the identities against high precision, the lognormal reduction, Heston's log-MGF and
moment-explosion time against its Riccati equations solved numerically, Merton against
its closed form in high precision, the Asian's recursion against brute force, and an
infinite moment refused as a 422 naming the measure.

Measured (the figures are asserted below with a margin): Heston's log-MGF within 1e-13
relative of a 20,000-step float64 RK4 (asserted 1e-10: RK4's own error) and within 1e-7
of a 200,000-step RK4 at 0.995 T*(n); skew and kurtosis from Heston's differences of
log-MGFs (b3, b4) against 50-digit arithmetic: 3.5e-15 and 2.6e-14 at s = 0.2, 5.2e-14
and 2.9e-12 at s = 0.05, 9.4e-13 and 1.0e-9 at s = 0.01, 1.2e-11 and 1.2e-5 at s = 0.001
(kurtosis, of order s^2, inherits ~1e-16 of log E[R^4] ~ 6 s^2 over s^4); Merton within
1e-12 (stdev ~1e-16); the Asian within 1e-15 (stdev), 1e-11 (skew) and, for kurtosis,
4e-15 at s = 0.2, 4.4e-12 at s = 0.065, 4.7e-8 at s = 0.0065 of brute-force sums in 50
digits; stdev of every process to ~1e-16.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import mpmath as mp
import numpy as np
import pytest
import torch

from spectralmc_server.engine.moments import exact_moments, moment_refusal, stats_from_log_moments
from spectralmc_server.engine.pricer import OptionBatch
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.processes.asian import asian_log_moments
from spectralmc_server.engine.processes.heston import heston_explosion_time, heston_log_mgf, heston_log_moments
from spectralmc_server.engine.processes.merton import merton_log_moments
from spectralmc_server.engine.reference import lognormal_moments
from spectralmc_server.engine.reference_pricers import reference_pricer
from spectralmc_server.pricing.door import Entry, admit, value_batch
from spectralmc_server.pricing.errors import RequestRefusedError

F64 = torch.float64
mp.mp.dps = 50


def _t(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    return torch.tensor([list(r) for r in rows], dtype=F64)


def mp_stats(l2: Any, l3: Any, l4: Any) -> tuple[float, float, float]:
    """stdev, skew, excess kurtosis of R from log E[R^n] in 50-digit arithmetic (raw
    moments; the precision absorbs the cancellation)."""
    e2, e3, e4 = mp.exp(l2), mp.exp(l3), mp.exp(l4)
    var = e2 - 1
    m3 = e3 - 3 * e2 + 2
    m4 = e4 - 4 * e3 + 6 * e2 - 3
    return float(mp.sqrt(var)), float(m3 / var**1.5), float(m4 / var**2 - 3)


def _rel(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


# -- the identities ---------------------------------------------------------------------------
@pytest.mark.parametrize("a", [1e-10, 1e-6, 1e-3, 0.05, 0.5, 2.0, 8.0])
@pytest.mark.parametrize(("k3", "k4"), [(0.0, 0.0), (0.3, 0.2), (-0.2, 0.9), (2.0, 5.0)])
def test_identities_match_high_precision(a: float, k3: float, k4: float) -> None:
    """(a, b3, b4) with b3 = k3 a^2 and b4 = k4 a^2 (so the non-lognormal part is of the
    order a process gives it): the float64 identities against the raw-moment formulas in
    50 digits, fed the same float64 inputs."""
    b3, b4 = k3 * a * a, k4 * a * a
    got = stats_from_log_moments(*(torch.tensor([x], dtype=F64) for x in (a, b3, b4)))
    ma, m3, m4 = mp.mpf(a), mp.mpf(b3), mp.mpf(b4)
    want = mp_stats(ma, 3 * ma + m3, 6 * ma + m4)
    # the problem's own conditioning: the terms the identities add over their sum (a
    # negative b3 with a large a makes skew a difference of numbers ~e^{1.5 a} apart)
    var = mp.expm1(ma)
    t3 = abs(mp.exp(3 * ma) * mp.expm1(m3)) + var**2 * (mp.exp(ma) + 2)
    t4 = abs(mp.exp(6 * ma) * mp.expm1(m4)) + 4 * abs(mp.exp(3 * ma) * mp.expm1(m3)) + var**2 * mp.exp(4 * ma) * 7
    cond = (1.0, float(t3 / var**1.5 / abs(want[1])), float(t4 / var**2 / abs(want[2])))
    for m, w, c in zip(("stdev", "skew", "kurtosis"), want, cond, strict=True):
        assert _rel(float(got[m][0]), w) <= 1e-14 * max(10.0, c), (m, float(got[m][0]), w, c)


@pytest.mark.parametrize("s", [1e-8, 1e-4, 0.01, 0.3, 1.0, 2.0, 4.0])
def test_lognormal_reduces_to_the_closed_forms(s: float) -> None:
    st = torch.tensor([s], dtype=F64)
    got = stats_from_log_moments(st * st, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64))
    want = lognormal_moments(torch.ones(1, dtype=F64), st)
    for m in ("stdev", "skew", "kurtosis"):
        assert _rel(float(got[m][0]), float(want[m][0])) <= 4e-16, m


def test_infinite_and_huge_moments_are_inf_never_nan() -> None:
    inf = math.inf
    a = torch.tensor([0.1, 0.1, 0.1, inf, 500.0], dtype=F64)
    b3 = torch.tensor([0.0, inf, 0.0, inf, 0.0], dtype=F64)
    b4 = torch.tensor([0.0, inf, inf, inf, 0.0], dtype=F64)
    got = stats_from_log_moments(a, b3, b4)
    assert got["stdev"].isfinite().tolist() == [True, True, True, False, True]  # e^250
    assert got["skew"].isfinite().tolist() == [True, False, True, False, False]
    assert got["kurtosis"].isfinite().tolist() == [True, False, False, False, False]
    for v in got.values():
        assert not bool(v.isnan().any())


# -- Heston -------------------------------------------------------------------------------------
def rk4_log_mgf(n: float, p: Sequence[float], t: float, steps: int = 20000) -> tuple[float, float]:
    """(A + B v0, B) at T from the Riccati equations B' = n (n - 1) / 2 + (rho xi n - kappa) B
    + xi^2 B^2 / 2, A' = kappa theta B, by classical RK4 in float64; inf once B blows up."""
    v0, kappa, theta, xi, rho = p
    h = t / steps
    a = b = 0.0

    def db(b: float) -> float:
        return 0.5 * n * (n - 1) + (rho * xi * n - kappa) * b + 0.5 * xi * xi * b * b

    for _ in range(steps):
        k1 = db(b)
        k2 = db(b + 0.5 * h * k1)
        k3 = db(b + 0.5 * h * k2)
        k4 = db(b + h * k3)
        a += kappa * theta * h * (6.0 * b + h * (k1 + k2 + k3)) / 6.0
        b += h * (k1 + 2.0 * k2 + 2.0 * k3 + k4) / 6.0
        if not b < 1e12:
            return math.inf, math.inf
    return a + b * v0, b


HESTON_POINTS = [
    ((0.04, 1.5, 0.05, 0.5, -0.7), 1.0),  # ordinary
    ((0.04, 1.5, 0.05, 3.0, -0.7), 1.0),  # xi at its bound (E[R^4] explodes at 1.79)
    ((0.04, 1.5, 0.05, 3.0, 0.99), 0.2),  # rho at its bound, just short of n = 4's explosion
    ((0.04, 1.5, 0.05, 3.0, -0.99), 0.2),
    ((4.0, 1.5, 4.0, 0.5, -0.7), 3.99),  # the largest spread
    ((0.01, 0.5, 0.01, 1.0, 0.3), 0.5),  # in the bundled domain, D < 0 for n = 3, 4
    ((1e-6, 50.0, 4.0, 1e-3, 0.0), 30.0),  # fast reversion, tiny xi: d T ~ 1500
    ((0.04, 1e-3, 0.05, 1e-3, 0.0), 30.0),  # slow reversion, tiny xi: D < 0
    ((0.04, 1.5, 0.05, 0.5, -0.7), 1e-5),  # the shortest expiry
]


@pytest.mark.parametrize(("p", "t"), HESTON_POINTS)
def test_heston_log_mgf_matches_the_riccati_equations(p: tuple[float, ...], t: float) -> None:
    th, tt = _t([p]), torch.tensor([t], dtype=F64)
    for n in (2.0, 3.0, 4.0):
        got = float(heston_log_mgf(n, th, tt)[0])
        want, _ = rk4_log_mgf(n, p, t)
        if math.isinf(want):
            assert math.isinf(got), (n, got)
        else:
            assert _rel(got, want) <= 1e-10, (n, got, want)


@pytest.mark.parametrize(
    "p",
    [
        (0.04, 1.5, 0.05, 3.0, -0.7),  # D < 0, beta > 0
        (0.04, 0.5, 0.05, 1.0, 0.3),  # D < 0, beta < 0
        (0.04, 0.1, 0.05, 0.5, 0.9),  # D > 0, beta < 0
        (0.04, 1e-3, 0.05, 0.2, 0.99),  # D > 0, beta < 0, kappa tiny
    ],
)
def test_heston_explosion_time_matches_the_riccati_equations(p: tuple[float, ...]) -> None:
    """Just before T*(n) the closed form agrees with RK4 (and is large); just after it,
    RK4 blows up and the log-moment is +inf."""
    th = _t([p])
    assert math.isfinite(float(heston_explosion_time(4.0, th)[0]))
    for n in (2.0, 3.0, 4.0):
        t_star = float(heston_explosion_time(n, th)[0])
        if math.isinf(t_star):
            assert math.isfinite(rk4_log_mgf(n, p, 30.0)[0]), n
            continue
        assert 0.0 < t_star < 200.0, (n, t_star)
        before, after = 0.995 * t_star, 1.005 * t_star
        got = float(heston_log_mgf(n, th, torch.tensor([before], dtype=F64))[0])
        want, b = rk4_log_mgf(n, p, before, steps=200000)
        assert b > 10.0, (n, b)  # close to the blow-up (B ~ 2 / (xi^2 (T* - T)))
        assert _rel(got, want) <= 1e-7, (n, got, want)
        assert math.isinf(rk4_log_mgf(n, p, after, steps=200000)[0]), n
        assert math.isinf(float(heston_log_mgf(n, th, torch.tensor([after], dtype=F64))[0])), n


def test_heston_moments_never_explode_with_mean_reversion_and_small_xi() -> None:
    assert math.isinf(float(heston_explosion_time(4.0, _t([(0.04, 1.5, 0.05, 0.1, -0.7)]))[0]))


def mp_heston_log_mgf(n: int, p: Sequence[float], t: float) -> Any:
    """log E[e^{nX}] in 50 digits from y(t) = e^{-beta t/2} (cosh(d t/2) + beta sinh(d t/2) / d)
    (complex d where D < 0): A = -2 kappa theta log y / xi^2, B = -2 y' / (xi^2 y)."""
    v0, kappa, theta, xi, rho = (mp.mpf(x) for x in p)
    tt = mp.mpf(t)
    beta = kappa - rho * xi * n
    d = mp.sqrt(mp.mpc(beta * beta - xi * xi * n * (n - 1)))

    def y(s: Any) -> Any:
        return mp.exp(-beta * s / 2) * (mp.cosh(d * s / 2) + beta * mp.sinh(d * s / 2) / d)

    dy = mp.diff(y, tt)
    return mp.re(-2 * kappa * theta * mp.log(y(tt)) / xi**2 - 2 * dy / (xi**2 * y(tt)) * v0)


@pytest.mark.parametrize(
    ("p", "t", "skew_tol", "kurt_tol"),
    [
        ((0.04, 1.5, 0.05, 0.5, -0.7), 1.0, 1e-14, 1e-13),  # s = 0.2 (measured 3.5e-15, 2.6e-14)
        ((0.04, 1.5, 0.05, 0.5, -0.7), 0.0625, 2e-13, 1e-11),  # s = 0.05 (5.2e-14, 2.9e-12)
        ((0.04, 1.5, 0.05, 0.5, -0.7), 2.5e-3, 4e-12, 4e-9),  # s = 0.01 (9.4e-13, 1.0e-9)
        ((0.04, 1.5, 0.05, 0.5, -0.7), 2.5e-5, 5e-11, 5e-5),  # s = 0.001 (1.2e-11, 1.2e-5)
        ((0.01, 0.5, 0.01, 1.0, 0.3), 0.5, 1e-13, 1e-12),
        ((4.0, 1.5, 4.0, 0.5, -0.7), 0.2, 1e-13, 1e-12),  # s = 0.89
    ],
)
def test_heston_skew_and_kurtosis_against_high_precision(
    p: tuple[float, ...], t: float, skew_tol: float, kurt_tol: float
) -> None:
    """b3 and b4 are differences of log-MGFs: their float64 error (~1e-16 of log E[R^4],
    ~6 s^2) does not cancel, so kurtosis, of order s^2, loses digits as s shrinks
    (measured in brackets; at s < 0.01, where its absolute error is ~1e-9, the bounds
    sweep does not check skew and kurtosis)."""
    got = exact_moments("heston")(_t([p]), torch.tensor([t], dtype=F64))
    want = mp_stats(*(mp_heston_log_mgf(n, p, t) for n in (2, 3, 4)))
    assert _rel(float(got["stdev"][0]), want[0]) <= 1e-15
    assert _rel(float(got["skew"][0]), want[1]) <= skew_tol
    assert _rel(float(got["kurtosis"][0]), want[2]) <= kurt_tol


def test_heston_log_moments_are_inf_past_explosion() -> None:
    a, b3, b4 = heston_log_moments(_t([(0.01, 0.5, 0.01, 1.0, 0.3)]), torch.tensor([1.0], dtype=F64))
    assert math.isfinite(float(a[0])) and math.isfinite(float(b3[0])) and math.isinf(float(b4[0]))


# -- Merton -------------------------------------------------------------------------------------
def mp_merton_log_moment(n: int, p: Sequence[float], t: float) -> Any:
    sigma, lam, mu_j, sigma_j = (mp.mpf(x) for x in p)
    k = mp.exp(mu_j + sigma_j**2 / 2) - 1
    jump = mp.exp(n * mu_j + n * n * sigma_j**2 / 2) - 1
    return mp.mpf(t) * (n * (n - 1) * sigma**2 / 2 + lam * (jump - n * k))


@pytest.mark.parametrize(
    ("p", "t"),
    [
        ((0.2, 0.5, -0.1, 0.1), 1.0),
        ((0.2, 0.5, -0.1, 0.1), 1e-5),  # the shortest expiry: the jumps dominate skew and kurtosis
        ((0.01, 20.0, 2.0, 2.0), 1e-5),
        ((5.0, 0.0, 0.0, 0.0), 0.5),  # lognormal
        ((0.2, 20.0, -2.0, 0.0), 0.01),
        ((0.2, 1.0, 1e-4, 1e-4), 2.0),  # tiny jumps
    ],
)
def test_merton_moments_match_the_closed_form_in_high_precision(p: tuple[float, ...], t: float) -> None:
    got = exact_moments("merton")(_t([p]), torch.tensor([t], dtype=F64))
    want = mp_stats(*(mp_merton_log_moment(n, p, t) for n in (2, 3, 4)))
    for m, w in zip(("stdev", "skew", "kurtosis"), want, strict=True):
        if math.isinf(w):  # beyond float64 (skew ~ e^{5e6} here): inf, refused when asked
            assert math.isinf(float(got[m][0])), m
        else:
            assert _rel(float(got[m][0]), w) <= 1e-12, (m, float(got[m][0]), w)


def test_merton_b3_b4_carry_only_the_jumps() -> None:
    a, b3, b4 = merton_log_moments(_t([(0.7, 0.0, 0.5, 0.5), (0.7, 2.0, 0.0, 0.0)]), torch.tensor([2.0, 2.0]))
    assert b3.tolist() == [0.0, 0.0] and b4.tolist() == [0.0, 0.0]
    assert a.tolist() == [0.7 * 0.7 * 2.0] * 2


# -- Asian ----------------------------------------------------------------------------------------
def mp_asian_log_moments(vol: float, carry: float, n: int, t: float) -> list[Any]:
    """log E[R^m], m = 2, 3, 4, by brute force over every index tuple in 50 digits:
    E[prod_a R_{i_a}] = prod_a w_{i_a} exp(vol^2 sum_{a<b} min(t_{i_a}, t_{i_b}))."""
    ti = [mp.mpf(i) * mp.mpf(t) / n for i in range(1, n + 1)]
    g = [mp.exp(mp.mpf(carry) * x) for x in ti]
    w = [x / mp.fsum(g) for x in g]
    v = mp.mpf(vol) ** 2
    out = []
    for m in (2, 3, 4):
        total = mp.mpf(0)
        for idx in itertools.product(range(n), repeat=m):
            pair = mp.fsum(min(ti[i], ti[j]) for i, j in itertools.combinations(idx, 2))
            total += mp.fprod(w[i] for i in idx) * mp.exp(v * pair)
        out.append(mp.log(total))
    return out


@pytest.mark.parametrize(
    ("vol", "carry", "n", "t", "kurt_tol"),
    [
        (0.25, 0.02, 12, 1.0, 1e-13),
        (0.1, 0.02, 6, 1.0, 2e-11),  # s = 0.065 (measured 4.4e-12)
        (0.01, 0.02, 6, 1.0, 2e-7),  # s = 0.0065: b4 = log E[R^4] - 6a loses digits (4.7e-8)
        (1.0, 0.0, 1, 2.0, 1e-13),
        (0.5, -2.0, 7, 5.0, 1e-13),
        (2.0, 2.0, 3, 3.0, 1e-13),
    ],
)
def test_asian_recursion_matches_brute_force_in_high_precision(
    vol: float, carry: float, n: int, t: float, kurt_tol: float
) -> None:
    th, tt = _t([(vol, carry, float(n))]), torch.tensor([t], dtype=F64)
    got = exact_moments("asian")(th, tt)
    want = mp_stats(*mp_asian_log_moments(vol, carry, n, t))
    for m, w, tol in zip(("stdev", "skew", "kurtosis"), want, (1e-15, 1e-11, kurt_tol), strict=True):
        assert _rel(float(got[m][0]), w) <= tol, (m, float(got[m][0]), w)


def test_asian_one_fixing_is_the_lognormal() -> None:
    a, b3, b4 = asian_log_moments(_t([(0.8, 0.3, 1.0)]), torch.tensor([2.0], dtype=F64))
    assert _rel(float(a[0]), 0.8 * 0.8 * 2.0) <= 1e-15
    assert abs(float(b3[0])) <= 1e-14 and abs(float(b4[0])) <= 1e-14


def test_exact_moments_are_batch_invariant() -> None:
    rng = np.random.default_rng(3)
    rows = [
        (rng.uniform(0.01, 1), rng.uniform(0.5, 5), rng.uniform(0.01, 1), rng.uniform(0.1, 2), -0.5) for _ in range(50)
    ]
    th, t = _t(rows), torch.tensor(rng.uniform(0.1, 3, 50), dtype=F64)
    whole = exact_moments("heston")(th, t)
    for i in (0, 17, 49):
        one = exact_moments("heston")(th[i : i + 1], t[i : i + 1])
        for m in whole:
            assert torch.equal(one[m], whole[m][i : i + 1]) or (one[m].isinf().all() and whole[m][i].isinf())


# -- the reference pricers use them ---------------------------------------------------------------
def _batch(theta: Sequence[Sequence[float]], expiry: Sequence[float]) -> OptionBatch:
    n = len(expiry)
    ones = torch.ones(n, dtype=F64)
    return OptionBatch(
        spot=100.0 * ones,
        strike=100.0 * ones,
        expiry=torch.tensor(expiry, dtype=F64),
        rate=0.03 * ones,
        dividend=0.01 * ones,
        is_call=torch.ones(n, dtype=torch.bool),
        theta=_t(theta),
    )


@pytest.mark.parametrize(
    ("name", "theta", "t"),
    [
        ("heston", (0.04, 1.5, 0.05, 3.0, -0.7), 1.0),
        ("merton", (0.2, 0.5, -0.1, 0.1), 1e-5),
        ("asian", (0.25, 0.02, 64.0), 1.0),
    ],
)
def test_reference_pricers_answer_the_exact_moments(name: str, theta: tuple[float, ...], t: float) -> None:
    batch = _batch([theta], [t])
    got = reference_pricer(get_process(name)).evaluate(batch, frozenset({"mean", "stdev", "skew", "kurtosis"}))
    want = exact_moments(name)(batch.theta, batch.expiry)
    fwd = batch.spot * get_process(name).forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend)
    assert torch.equal(got["stdev"], fwd * want["stdev"])
    assert torch.equal(got["skew"], want["skew"]) and torch.equal(got["kurtosis"], want["kurtosis"])
    assert torch.equal(got["mean"], fwd)


# -- an infinite moment is refused (422) -----------------------------------------------------------
EXPLODING = {"v0": 0.01, "kappa": 0.5, "theta": 0.01, "xi": 1.0, "rho": 0.3}  # T*(4) 0.81, T*(3) 1.16, T*(2) 2.13


def _contract(i: int, params: dict[str, float], expiry: float) -> dict[str, Any]:
    return {
        "id": f"c{i}",
        "right": "call",
        "strike": 100.0,
        "spot": 100.0,
        "expiry_years": expiry,
        "process": "heston",
        "params": params,
    }


@pytest.mark.parametrize(("measure", "power"), [("kurtosis", 4), ("skew", 3)])
def test_an_exploding_moment_is_refused_naming_the_measure(measure: str, power: int) -> None:
    ok = _contract(0, {**EXPLODING, "rho": -0.7}, 2.0)
    body = {"measures": ["price", measure], "contracts": [ok, _contract(1, EXPLODING, 2.0)]}
    # admitted by the checks without torch (the server's HTTP process: lazy_torch.py),
    # refused by the front door's engine-side checks, before any pricing
    [refusal] = value_batch([Entry(admit(body, dict), {})])
    assert isinstance(refusal, RequestRefusedError)
    [detail] = refusal.details
    assert detail["field"] == "contracts[1]"
    assert detail["reason"].startswith(f"{measure} is infinite for these parameters: E[S_T^{power}] explodes")
    assert "moment explosion" in detail["reason"]
    assert not refusal.market


def test_a_finite_moment_of_an_exploding_contract_is_answered() -> None:
    """E[S_T^2] is finite up to T*(2) = 2.13: stdev is answered though kurtosis is not."""
    body = {"measures": ["stdev"], "contracts": [_contract(0, EXPLODING, 2.0)]}
    request = admit(body, dict)
    theta = _t([[EXPLODING[k] for k in ("v0", "kappa", "theta", "xi", "rho")]])
    assert moment_refusal("heston", theta, torch.tensor([2.0], dtype=F64), ["stdev"]) is None
    assert moment_refusal("heston", theta, torch.tensor([2.0], dtype=F64), ["kurtosis"]) is not None
    assert list(request.measures) == ["stdev"]


def test_a_moment_beyond_float64_is_refused() -> None:
    """Merton with large jumps over a short expiry (spread 1): E[R^2] = e^{2e4}, finite but
    not a float64; refused as too large, not as exploding."""
    theta = _t([(1.0, 20.0, 2.0, 2.0)])
    got = moment_refusal("merton", theta, torch.tensor([1.0 / 161.0], dtype=F64), ["stdev", "kurtosis"])
    assert got is not None
    row, measure, reason = got
    assert (row, measure) == (0, "stdev")  # E[R^2] = e^{2e4} already
    assert "too large to represent" in reason
