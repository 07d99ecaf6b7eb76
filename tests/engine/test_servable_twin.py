"""The torch-free twin of ModelPricer.servable (engine/processes/spec.py servable_np and
servable_one) against the engine's, on every bundled model.

Books straddle the domain's box (rows exactly on its edges and an ulp past them, where
the two must agree bit for bit: the box is compared, not computed), the certified K/F
bounds and the spread bound MOMENT_MAX_SPREAD, for each choice of spread and price
measures, with the model qualified and not. The spread and K/F come from the numpy and
``math`` twins, a few ulp from torch's (tests/engine/test_process_twins.py): on random
books a row within NEAR (1e-9 relative) of one of those bounds is left out of the
comparison (they are counted, and a tiny fraction); on ladders of rows put at set
distances from the bounds (the K/F bounds' 1e-12 slack included) only rows within TIGHT
of the very value compared are.
"""

from __future__ import annotations

import functools
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.pricer import MOMENT_MAX_SPREAD, OptionBatch
from spectralmc_server.engine.processes import PROCESSES, spec
from spectralmc_server.engine.served import ModelPricer, ServedModel, load_served_model
from spectralmc_server.models import bundled_models

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
SERVED = ("asian", "gbm", "heston", "merton", "rbergomi")
NEAR = 1e-9  # random books: rows this close (relative) to a K/F or spread bound are left out
# Ladders: rows this close to the value compared are left out. The twins' K/F is ~6 ulp
# from torch's, their spread 2 ulp (Heston's 1.8e-13, but a Heston spread stays under
# 0.87 in its box: it never reaches the bound).
TIGHT = 1e-14
SLACK = spec.MONEYNESS_SLACK
COMBOS = tuple(itertools.product((False, True), repeat=2))  # (spread_measures, price_measures)
# s^2 proportional to T: a row's T puts s anywhere (rough Bergomi's s^2 = xi0 T is too, but
# stays under 0.32 in its box: it never reaches the spread bound)
LINEAR_IN_T = ("gbm", "merton", "asian")


@functools.cache
def served(name: str) -> ServedModel:
    return load_served_model(read_dir(bundled_models()[name], need_training=False))


def unqualified(model: ServedModel) -> ModelPricer:
    """The same pricer without its certificate, where one is required: nothing servable."""
    p = model.pricer
    return ModelPricer(p.learned, p.domain, p.reference, certificate=None, require_certificate=True)


def box(model: ServedModel) -> tuple[Floats, Floats]:
    ranges = model.domain.ranges
    return np.array([r.low for r in ranges]), np.array([r.high for r in ranges])


def measures(spread: bool, price: bool) -> frozenset[str]:
    out = ({"stdev"} if spread else set()) | ({"price"} if price else set())
    return frozenset(out or {"mean"})


def straddle(rng: np.random.Generator, low: float, high: float, log: bool, n: int) -> Floats:
    """n points around [low, high]: a sixth exactly on each edge, a twentieth an ulp past
    each, the rest drawn over the range widened by 15% each side (in log where ``log``)."""
    if log:
        w = (high / low) ** 0.15
        drawn = np.exp(rng.uniform(math.log(low / w), math.log(high * w), n))
    else:
        w = 0.15 * (high - low)
        drawn = rng.uniform(low - w, high + w, n)
    u = rng.random(n)
    out = np.where(u < 1 / 6, low, np.where(u < 2 / 6, high, drawn))
    out = np.where((u >= 2 / 6) & (u < 2 / 6 + 1 / 20), np.nextafter(low, -np.inf), out)
    return np.where((u >= 2 / 6 + 1 / 20) & (u < 2 / 6 + 2 / 20), np.nextafter(high, np.inf), out)


def inside_draw(rng: np.random.Generator, low: float, high: float, n: int) -> Floats:
    """n points in [low, high]: a third on each edge (corners are where spreads peak)."""
    u = rng.random(n)
    return np.where(u < 1 / 3, low, np.where(u < 2 / 3, high, rng.uniform(low, high, n)))


def market(rng: np.random.Generator, n: int) -> tuple[Floats, Floats, Floats]:
    """spot, rate, dividend."""
    return np.exp(rng.uniform(math.log(20.0), math.log(500.0), n)), rng.uniform(-0.02, 0.1, n), rng.uniform(0, 0.08, n)


def whole_fixings(name: str, theta: Floats, rng: np.random.Generator) -> None:
    """Most of an Asian's fixings whole (as contracts give them), some not (the rounding)."""
    if name == "asian":
        j = PROCESSES[name].param_names.index("fixings")
        whole = rng.random(len(theta)) < 0.8
        theta[whole, j] = np.clip(np.round(theta[whole, j]), 1.0, float(spec.MAX_FIXINGS))


def strikes(
    name: str, theta: Floats, expiry: Floats, spot: Floats, rate: Floats, dividend: Floats, kappa: Floats
) -> Floats:
    """Strikes at these K/F (through the twins' forward: torch's K/F is a few ulp off)."""
    return kappa * (spot * spec.FORWARD_RATIO_NP[name](theta, expiry, rate, dividend))


def random_book(name: str, n: int, seed: int) -> dict[str, Floats]:
    model = served(name)
    rng = np.random.default_rng(seed)
    ranges = model.domain.ranges
    cols = [straddle(rng, r.low, r.high, r.scale == "log", n) for r in ranges]
    theta, expiry = np.stack(cols[:-1], axis=1), cols[-1]
    whole_fixings(name, theta, rng)
    spot, rate, dividend = market(rng, n)
    if name in LINEAR_IN_T:  # a quarter of the rows: T moved to put s within 5% of the bound
        move = rng.random(n) < 0.25
        s = spec.SCALE_NP[name](theta, expiry)
        target = MOMENT_MAX_SPREAD * rng.uniform(0.95, 1.05, n)
        expiry = np.where(move, expiry * (target / s) ** 2, expiry)
    low, high = model.domain.certified_moneyness
    kappa = np.exp(rng.uniform(math.log(low * 0.8), math.log(high * 1.2), n))
    strike = strikes(name, theta, expiry, spot, rate, dividend, kappa)
    return {"theta": theta, "expiry": expiry, "spot": spot, "strike": strike, "rate": rate, "dividend": dividend}


KAPPA_STEPS = (-1e-9, -1e-11, -2e-12, -1.1e-12, -1e-12, -9e-13, -1e-13, 0.0, 1e-13, 9e-13, 1e-12, 1.1e-12, 2e-12, 1e-11)
SPREAD_STEPS = (-1e-9, -1e-11, -1e-12, -1e-13, 0.0, 1e-13, 1e-12, 1e-11, 1e-9)


def ladder_book(name: str, seed: int) -> dict[str, Floats]:
    """Rows inside the box at K/F = bound (1 + step) for each bound and step, and (where s^2
    is linear in T) at s = MOMENT_MAX_SPREAD (1 + step) with T still in the box."""
    model = served(name)
    rng = np.random.default_rng(seed)
    ranges = model.domain.ranges
    low, high = model.domain.certified_moneyness
    steps = np.array(KAPPA_STEPS)
    m = 200
    kappa = np.concatenate([np.repeat(b * (1 + steps), m) for b in (low, high)])
    n = len(kappa)
    theta = np.stack([inside_draw(rng, r.low, r.high, n) for r in ranges[:-1]], axis=1)
    expiry = inside_draw(rng, ranges[-1].low, ranges[-1].high, n)
    whole_fixings(name, theta, rng)
    if name in LINEAR_IN_T:  # candidates whose spread can reach the bound inside the box
        k = 200_000
        cand = np.stack([inside_draw(rng, r.low, r.high, k) for r in ranges[:-1]], axis=1)
        whole_fixings(name, cand, rng)
        rate_of_s2 = spec.SCALE_NP[name](cand, np.ones(k)) ** 2  # s^2 / T
        t_low, t_high = ranges[-1].low, ranges[-1].high
        fits = (MOMENT_MAX_SPREAD**2 / rate_of_s2 >= t_low * 1.01) & (
            MOMENT_MAX_SPREAD**2 / rate_of_s2 <= t_high * 0.99
        )
        cand, rate_of_s2 = cand[fits][: 100 * len(SPREAD_STEPS)], rate_of_s2[fits][: 100 * len(SPREAD_STEPS)]
        assert len(cand) == 100 * len(SPREAD_STEPS), f"{name}: only {len(cand)} rows reach the spread bound"
        target = MOMENT_MAX_SPREAD * (1 + np.repeat(np.array(SPREAD_STEPS), 100))
        theta = np.concatenate([theta, cand])
        expiry = np.concatenate([expiry, target**2 / rate_of_s2])
        # their K/F inside, on and outside the bounds
        kappa = np.concatenate([kappa, rng.choice([low, 1.0, high, low * 0.9, high * 1.1], len(cand))])
        n = len(kappa)
    spot, rate, dividend = market(rng, n)
    strike = strikes(name, theta, expiry, spot, rate, dividend, kappa)
    return {"theta": theta, "expiry": expiry, "spot": spot, "strike": strike, "rate": rate, "dividend": dividend}


def option_batch(book: dict[str, Floats]) -> OptionBatch:
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in book.items()}
    is_call = torch.arange(len(t["spot"])) % 2 == 0
    return OptionBatch(t["spot"], t["strike"], t["expiry"], t["rate"], t["dividend"], is_call, t["theta"])


def engine_values(name: str, batch: OptionBatch) -> tuple[Floats, Floats]:
    """The engine's own spread and K/F of each row."""
    process = served(name).pricer.learned.process
    s = process.scale(batch.theta, batch.expiry)
    kappa = batch.strike / (batch.spot * process.forward_ratio(batch.theta, batch.expiry, batch.rate, batch.dividend))
    return s.numpy(), kappa.numpy()


def near(x: Floats, bound: float, tol: float) -> Bools:
    out: Bools = np.abs(x - bound) <= tol * abs(bound)
    return out


def twin(name: str, book: dict[str, Floats], *, qualified: bool, spread: bool, price: bool) -> Bools:
    model = served(name)
    lows, highs = box(model)
    return spec.servable_np(
        name,
        book["theta"],
        book["expiry"],
        book["spot"],
        book["strike"],
        book["rate"],
        book["dividend"],
        lows=lows,
        highs=highs,
        certified_moneyness=model.domain.certified_moneyness,
        qualified=qualified,
        spread_measures=spread,
        price_measures=price,
    )


def twin_one(name: str, book: dict[str, Floats], i: int, *, qualified: bool, spread: bool, price: bool) -> bool:
    model = served(name)
    lows, highs = box(model)
    return spec.servable_one(
        name,
        [float(x) for x in book["theta"][i]],
        float(book["expiry"][i]),
        float(book["spot"][i]),
        float(book["strike"][i]),
        float(book["rate"][i]),
        float(book["dividend"][i]),
        lows=[float(x) for x in lows],
        highs=[float(x) for x in highs],
        certified_moneyness=model.domain.certified_moneyness,
        qualified=qualified,
        spread_measures=spread,
        price_measures=price,
    )


def compare(name: str, book: dict[str, Floats], ambiguous: dict[tuple[bool, bool], Bools], one_rows: int) -> int:
    """Assert the twins give the engine's verdicts on every row but the ambiguous ones (per
    (spread, price)), for each combination and the model qualified or not; the number of
    rows left out, all combinations together."""
    model = served(name)
    batch = option_batch(book)
    pricers = {True: model.pricer, False: unqualified(model)}
    assert model.pricer.qualified and not pricers[False].qualified
    left_out = 0
    for (spread, price), qualified in itertools.product(COMBOS, (True, False)):
        expected = pricers[qualified].servable(batch, measures(spread, price)).numpy()
        got = twin(name, book, qualified=qualified, spread=spread, price=price)
        skip = ambiguous[spread, price] if qualified else np.zeros(len(got), dtype=np.bool_)
        left_out += int(skip.sum())
        bad = np.flatnonzero((got != expected) & ~skip)
        assert len(bad) == 0, (
            f"{name} spread={spread} price={price} qualified={qualified}: {len(bad)} rows differ, "
            f"first {bad[:5]}: theta {book['theta'][bad[:1]]} T {book['expiry'][bad[:1]]}"
        )
        for i in range(0, len(got), max(1, len(got) // one_rows)):
            if not skip[i]:
                one = twin_one(name, book, i, qualified=qualified, spread=spread, price=price)
                assert one == expected[i], f"{name} row {i} spread={spread} price={price} qualified={qualified}"
        if qualified and not spread and not price:  # the box alone: no rows left out
            assert not skip.any()
    return left_out


def ambiguous_rows(
    name: str, book: dict[str, Floats], bounds: dict[str, tuple[float, ...]], tol: float
) -> dict[tuple[bool, bool], Bools]:
    """Per (spread, price): rows whose engine spread or K/F is within ``tol`` (relative) of
    one of ``bounds["spread"]`` or ``bounds["kappa"]``, where the measures look at it."""
    s, kappa = engine_values(name, option_batch(book))
    near_s = np.zeros(len(s), dtype=np.bool_)
    for b in bounds["spread"]:
        near_s |= near(s, b, tol)
    near_k = np.zeros(len(s), dtype=np.bool_)
    for b in bounds["kappa"]:
        near_k |= near(kappa, b, tol)
    return {(sp, pr): (near_s & sp) | (near_k & pr) for sp, pr in COMBOS}


def test_the_dispatch_tables_are_the_processes_formulas() -> None:
    """SCALE_NP, FORWARD_RATIO_NP, SCALE and FORWARD_RATIO name every process, and each
    entry is that process's own torch-free scale and forward ratio."""
    assert set(spec.SCALE_NP) == set(spec.FORWARD_RATIO_NP) == set(spec.SCALE) == set(spec.FORWARD_RATIO)
    assert set(spec.SCALE_NP) == set(PROCESSES) >= set(bundled_models()) == set(SERVED)
    rng = np.random.default_rng(1)
    for name, process in PROCESSES.items():
        lo = np.array([process.param_bounds[p][0] for p in process.param_names])
        hi = np.array([process.param_bounds[p][1] for p in process.param_names])
        theta = lo + (hi - lo) * rng.random((50, len(lo)))
        if name == "asian":
            theta[:, 2] = np.round(theta[:, 2])
        t, r, q = rng.uniform(0.01, 5, 50), rng.uniform(-0.05, 0.1, 50), rng.uniform(0, 0.1, 50)
        np.testing.assert_array_equal(spec.SCALE_NP[name](theta, t), process.scale_np(theta, t))
        np.testing.assert_array_equal(
            spec.FORWARD_RATIO_NP[name](theta, t, r, q), process.forward_ratio_np(theta, t, r, q)
        )
        for i in range(len(t)):
            th = [float(x) for x in theta[i]]
            assert spec.SCALE[name](th, float(t[i])) == process.scale_math(th, float(t[i]))
            ratio = spec.FORWARD_RATIO[name](th, float(t[i]), float(r[i]), float(q[i]))
            assert ratio == process.forward_ratio_math(th, float(t[i]), float(r[i]), float(q[i]))


@pytest.mark.parametrize("name", SERVED)
def test_servable_np_is_the_engines_on_random_books(name: str) -> None:
    """20,000 rows straddling the box, the K/F bounds and (gbm, merton, asian) the spread
    bound: the engine's verdicts but within NEAR of a K/F or spread bound."""
    book = random_book(name, 20_000, seed=sum(map(ord, name)))
    low, high = served(name).domain.certified_moneyness
    ambiguous = ambiguous_rows(name, book, {"spread": (MOMENT_MAX_SPREAD,), "kappa": (low, high)}, NEAR)
    left_out = compare(name, book, ambiguous, one_rows=500)
    compared = 2 * len(COMBOS) * len(book["expiry"])
    print(f"{name}: {left_out} of {compared} (row, measures, qualified) verdicts left out within {NEAR:g} of a bound")
    assert left_out <= 1e-3 * compared


@pytest.mark.parametrize("name", SERVED)
def test_servable_np_is_the_engines_on_the_bounds(name: str) -> None:
    """Rows at K/F = bound (1 + step), steps from 1e-9 down to 1e-13 either side (across
    the 1e-12 slack) and at s = MOMENT_MAX_SPREAD (1 + step): the engine's verdicts but
    within TIGHT of the very value compared (only the steps that land on it)."""
    book = ladder_book(name, seed=7 + sum(map(ord, name)))
    low, high = served(name).domain.certified_moneyness
    compared_values = {"spread": (MOMENT_MAX_SPREAD,), "kappa": (low * (1 - SLACK), high * (1 + SLACK))}
    ambiguous = ambiguous_rows(name, book, compared_values, TIGHT)
    left_out = compare(name, book, ambiguous, one_rows=10**9)
    compared = 2 * len(COMBOS) * len(book["expiry"])
    print(f"{name}: {left_out} of {compared} (row, measures, qualified) verdicts left out within {TIGHT:g} of a bound")
    # Left out: the steps -1e-12 at the low K/F bound and +1e-12 at the high one, which land
    # on the slackened bounds (200 rows each, where price measures are asked: with spread
    # measures and without), and step 0 on the spread bound (100 rows, where spread
    # measures are asked); no other row.
    assert left_out == 2 * 200 * 2 + 100 * 2 * (name in LINEAR_IN_T)


def test_servable_twins_check_their_inputs() -> None:
    def gbm_np(theta: Floats, expiry: Floats, strike: Floats, process: str = "gbm") -> Bools:
        n = len(expiry)
        return spec.servable_np(
            process,
            theta,
            expiry,
            np.full(n, 100.0),
            strike,
            np.zeros(n),
            np.zeros(n),
            lows=np.array([0.05, 0.02]),
            highs=np.array([1.0, 3.0]),
            certified_moneyness=(0.7, 1.3),
            qualified=True,
            spread_measures=True,
            price_measures=True,
        )

    def gbm_one(theta: list[float], strike: float) -> bool:
        return spec.servable_one(
            "gbm",
            theta,
            1.0,
            100.0,
            strike,
            0.0,
            0.0,
            lows=[0.05, 0.02],
            highs=[1.0, 3.0],
            certified_moneyness=(0.7, 1.3),
            qualified=True,
            spread_measures=True,
            price_measures=True,
        )

    ones = np.ones(3)
    with pytest.raises(ValueError, match="unknown process 'sabr'"):
        gbm_np(np.full((3, 1), 0.2), ones, ones, process="sabr")
    with pytest.raises(ValueError, match="lows, highs"):
        gbm_np(np.full((3, 2), 0.2), ones, ones)
    with pytest.raises(ValueError, match="len"):
        gbm_one([0.2, 0.1], 100.0)
    # NaN fails every verdict that reads it, as in torch
    theta = np.array([[0.2], [np.nan], [0.2], [0.2]])
    got = gbm_np(theta, np.array([1.0, 1.0, np.nan, 1.0]), np.array([100.0, 100.0, 100.0, np.nan]))
    assert got.tolist() == [True, False, False, False]
    assert gbm_one([0.2], 100.0)
    assert not gbm_one([0.2], math.nan)
    assert not gbm_one([math.nan], 100.0)


def test_spec_imports_neither_torch_nor_the_engine() -> None:
    """spec.py loaded on its own in a fresh interpreter (the package's __init__ imports the
    torch processes; a process without torch loads this file alone)."""
    path = Path(spec.__file__)
    code = (
        "import importlib.util, sys\n"
        f"s = importlib.util.spec_from_file_location('spec_alone', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(s)\n"
        "sys.modules['spec_alone'] = m\n"
        "s.loader.exec_module(m)\n"
        "import numpy as np\n"
        "ok = m.servable_np('gbm', np.array([[0.2]]), np.ones(1), np.ones(1), np.ones(1), np.zeros(1), np.zeros(1),"
        " lows=np.array([0.05, 0.02]), highs=np.array([1.0, 3.0]), certified_moneyness=(0.7, 1.3),"
        " qualified=True, spread_measures=True, price_measures=True)\n"
        "assert ok.tolist() == [True], ok\n"
        "assert m.MOMENT_MAX_SPREAD == 1.0\n"
        "bad = sorted(k for k in sys.modules if k == 'torch' or k.startswith(('torch.', 'spectralmc_server')))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
