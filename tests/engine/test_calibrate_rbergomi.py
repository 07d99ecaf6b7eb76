"""Rough Bergomi calibration (engine/fit.py, pricing/calibration.py): the start heuristic
on surfaces whose answer is known in closed form (a flat smile's variance swap, a
power-law skew's H), the fit through the bundled learned model recovering the
parameters of a surface that model itself implies, several starts screened, the fit
through a pricer that gives prices only (forward-difference Jacobian), and the refusal
of a process without an analytic CF when no model is given.

Tolerances for the recovery (a surface made by the same learned pricer the fit uses,
so only the optimiser is tested): H within 0.02, eta within 10%, rho within 0.05 and
xi0 within 2% (the bench's targets on Monte Carlo surfaces; here it does far better).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.cvnn import CFModel
from spectralmc_server.engine.fit import (
    Quotes,
    calibrate,
    calibrate_prices,
    heston_start,
    model_prices,
    rbergomi_start,
    rbergomi_starts,
    smiles,
    variance_swap,
)
from spectralmc_server.engine.pricer import REFERENCE_SPECTRUM
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.reference import analytic_cf_y
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.calibratable import CALIBRATABLE
from spectralmc_server.pricing.calibration import (
    STARTS,
    VEGA_FLOOR,
    SurfaceError,
    calibrate_snapshot,
    model_surface,
    synthetic_surface,
)

F64 = torch.float64
RBERGOMI = get_process("rbergomi")
BOUNDS = RBERGOMI.default_domain().ranges[:-1]
NAMES = ("H", "eta", "rho", "xi0")
EXPIRIES = [0.25, 0.5, 1.0, 1.5, 2.0]
MONEYNESS = [0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2]
# The model-made surfaces' grid: every node's out-of-the-money price well above the
# learned model's price error of about 1 bp of the forward (at 0.1 years or K/F 1.2 a
# rough, strongly skewed smile's call wing is worth less than that: its model "vol"
# would be noise, or no vol at all where the model's price is below zero).
RB_MONEYNESS = [0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15]
TRUTHS = [
    {"H": 0.1, "eta": 1.5, "rho": -0.7, "xi0": 0.04},
    {"H": 0.3, "eta": 1.0, "rho": -0.5, "xi0": 0.09},
]
TOLERANCE = {"H": 0.02, "rho": 0.05}  # absolute
RELATIVE = {"eta": 0.10, "xi0": 0.02}


def rbergomi_model_dir() -> Path:
    bundled = bundled_models()
    assert "rbergomi" in bundled, f"no bundled rbergomi model: {sorted(bundled)}"
    return bundled["rbergomi"]


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return load_served_model(read_dir(rbergomi_model_dir(), need_training=False), require_certificate=False)


def grid_quotes(vol: list[list[float]], expiries: list[float], moneyness: list[float]) -> Quotes:
    t = torch.tensor([x for x in expiries for _ in moneyness], dtype=F64)
    lm = torch.log(torch.tensor(moneyness * len(expiries), dtype=F64))
    return Quotes.from_vols(t, lm, torch.tensor([v for row in vol for v in row], dtype=F64))


def spx_snapshot(surface: dict[str, Any]) -> MarketSnapshot:
    """A snapshot with SPX at 100, a flat 3% USD curve discounting it, and ``surface``
    (a VolSurface as JSON) as its vol surface."""
    return MarketSnapshot.model_validate(
        {
            "spots": {"SPX": 100.0},
            "yield_curves": {"USD": {"pillars": [{"years": 1.0, "zero_rate": 0.03}]}},
            "discounting": {"SPX": "USD"},
            "vol_surfaces": {"SPX": surface},
        }
    )


def assert_recovered(params: dict[str, float], truth: dict[str, float]) -> None:
    for name, tol in TOLERANCE.items():
        assert abs(params[name] - truth[name]) <= tol, (name, params, truth)
    for name, tol in RELATIVE.items():
        assert abs(params[name] / truth[name] - 1.0) <= tol, (name, params, truth)


# -- the start heuristic --------------------------------------------------------------------


def test_variance_swap_of_a_flat_smile_is_its_variance() -> None:
    """A flat 25% smile quoted from K/F 0.7 to 1.3 (flat beyond): the variance swap's
    variance is 0.0625 at every expiry (the integral's truncation at 6 sd and its
    trapezoid error are below 1e-4 relative)."""
    quotes = grid_quotes([[0.25] * 7 for _ in EXPIRIES], EXPIRIES, [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    for t in EXPIRIES:
        assert variance_swap(quotes, t) == pytest.approx(0.0625, rel=1e-4), t


def test_smiles_read_a_linear_skew_exactly() -> None:
    """vol = 0.2 - 0.3 T^-0.3 log(K/F): each expiry's ATM vol and skew come back."""
    lm = [math.log(m) for m in MONEYNESS]
    vols = [[0.2 - 0.3 * t**-0.3 * k for k in lm] for t in EXPIRIES]
    found = smiles(grid_quotes(vols, EXPIRIES, MONEYNESS))
    assert [s.expiry for s in found] == EXPIRIES
    for s in found:
        assert s.atm_vol == pytest.approx(0.2, abs=1e-12)
        assert s.skew == pytest.approx(-0.3 * s.expiry**-0.3, rel=1e-9)


def test_rbergomi_starts_read_h_from_the_skew_term_structure() -> None:
    """An ATM skew psi(T) = c T^(H - 1/2) with H = 0.2 gives the heuristic start H = 0.2
    and rho eta from c by the short-time formula; xi0 is the variance swap's at the
    shortest expiry. The other starts split the same skew at other rho and H, and all
    lie inside the bounds."""
    lm = [math.log(m) for m in MONEYNESS]
    c = -0.15
    vols = [[0.2 + c * t ** (0.2 - 0.5) * k for k in lm] for t in EXPIRIES]
    quotes = grid_quotes(vols, EXPIRIES, MONEYNESS)
    starts = rbergomi_starts(quotes, BOUNDS)
    first = starts[0]
    assert all(rbergomi_start(quotes, BOUNDS) == first for _ in range(20))  # the same bits every time
    assert first["H"] == pytest.approx(0.2, abs=1e-9)
    assert first["rho"] == -0.7
    rho_eta = abs(c) * 2.0 * 0.7 * 1.7 / math.sqrt(0.4)
    assert first["eta"] == pytest.approx(rho_eta / 0.7, rel=1e-9)
    assert first["xi0"] == pytest.approx(variance_swap(quotes, EXPIRIES[0]), rel=1e-12)
    assert 4 <= len(starts) <= 12 and len({tuple(s.values()) for s in starts}) == len(starts)
    assert {s["rho"] for s in starts} == {-0.9, -0.7, -0.5, -0.3}
    for s in starts:
        assert list(s) == list(NAMES)
        for b in BOUNDS:
            assert b.low < s[b.name] < b.high, (b.name, s)


def test_rbergomi_starts_stay_inside_the_bounds_on_odd_surfaces() -> None:
    """A skew that grows with T (H above 1/2), a positive skew and a flat smile: every
    start is still inside the bounds (H, rho clamped), from the same surface code path."""
    lm = [math.log(m) for m in MONEYNESS]
    cases = [
        [[0.2 - 0.1 * t * k for k in lm] for t in EXPIRIES],
        [[0.2 + 0.1 * k for k in lm] for _ in EXPIRIES],
        [[0.2 for _ in lm] for _ in EXPIRIES],
    ]
    for vols in cases:
        for s in rbergomi_starts(grid_quotes(vols, EXPIRIES, MONEYNESS), BOUNDS):
            for b in BOUNDS:
                assert b.low < s[b.name] < b.high, (b.name, s)


def test_every_calibratable_process_has_starts() -> None:
    assert set(STARTS) == set(VEGA_FLOOR) == set(CALIBRATABLE) == {"heston", "rbergomi"}
    assert VEGA_FLOOR["heston"] == 0.0 and 0.0 < VEGA_FLOOR["rbergomi"] < 1.0


def test_vega_floor_raises_only_the_wings() -> None:
    """A 20% smile at 0.25 years from K/F 0.7 to 1.3: a floor of 10% of the at-the-money
    vega leaves the quotes near the money as they are and lifts the far wings' (whose
    vega is below it) to exactly the floor; prices, vols and strikes are untouched, and
    a floor of 0 is the same object."""
    moneyness = [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    quotes = grid_quotes([[0.2] * len(moneyness)], [0.25], moneyness)
    floored = quotes.with_vega_floor(0.1)
    atm = math.sqrt(0.25) / math.sqrt(2.0 * math.pi) * math.exp(-0.125 * 0.2**2 * 0.25)
    below = quotes.vega < 0.1 * atm
    assert 0 < int(below.sum()) < len(moneyness) - 2  # the wings only
    torch.testing.assert_close(floored.vega[below], torch.full_like(floored.vega[below], 0.1 * atm))
    assert torch.equal(floored.vega[~below], quotes.vega[~below])
    for name in ("expiry", "log_moneyness", "price", "vol"):
        assert torch.equal(getattr(floored, name), getattr(quotes, name))
    assert quotes.with_vega_floor(0.0) is quotes


# -- the fit through the learned model --------------------------------------------------------


@pytest.mark.parametrize("truth", TRUTHS, ids=["rough", "smooth"])
def test_recovers_rbergomi_parameters_from_the_learned_models_own_surface(
    served: ServedModel, truth: dict[str, float]
) -> None:
    """The surface the bundled model implies at ``truth`` (45 quotes, 0.25 to 2 years, K/F
    0.75 to 1.15), fitted through the same model from the heuristic's starts: every
    parameter within the tolerances, a vol RMSE below 1 bp, in well under a second."""
    net = served.pricer.learned.raw_cf
    assert isinstance(net, CFModel)
    surface = model_surface(served, truth, EXPIRIES, RB_MONEYNESS)
    quotes = grid_quotes(surface.vols, EXPIRIES, RB_MONEYNESS)
    bounds = served.domain.ranges[:-1]
    starts = rbergomi_starts(quotes, bounds)
    weighted = quotes.with_vega_floor(VEGA_FLOOR["rbergomi"])
    t0 = time.perf_counter()
    res = calibrate(
        net, RBERGOMI, served.pricer.learned.spectrum, weighted, bounds, starts, tangents=net.forward_with_tangents
    )
    assert time.perf_counter() - t0 < 5.0
    assert res.converged and res.rmse_vol < 1e-4, res
    assert res.start in starts and res.evaluations > len(starts)
    assert_recovered(res.params, truth)


def test_calibrate_snapshot_fits_rbergomi_through_the_model(served: ServedModel) -> None:
    """The use case end to end on a snapshot (moneyness surface, spot and curves): method
    cvnn, the model named, the fitted set recovered; without a model rbergomi is refused
    (no analytic CF to fall back on)."""
    truth = TRUTHS[0]
    surface = model_surface(served, truth, EXPIRIES, RB_MONEYNESS)
    snapshot = spx_snapshot(surface.model_dump(mode="json"))
    report = calibrate_snapshot(snapshot, "SPX", "rbergomi", served)
    out = report.describe()
    assert (out["process"], out["method"]) == ("rbergomi", "cvnn")
    assert out["model"] == {"name": served.name, "version": served.version, "content_hash": served.content_hash}
    assert out["fit"]["quotes"] == len(EXPIRIES) * len(RB_MONEYNESS) and out["fit"]["rmse_vol"] < 1e-4
    assert_recovered(out["params"], truth)
    assert set(report.model_params().params) == set(NAMES)
    with pytest.raises(SurfaceError, match="rbergomi has no analytic characteristic function"):
        calibrate_snapshot(snapshot, "SPX", "rbergomi", None)


# -- reference corrections ------------------------------------------------------------------

CORRECTED_EXPIRIES = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0]


def _mc_snapshot(truth: dict[str, float], paths: int) -> MarketSnapshot:
    """A snapshot whose SPX surface (K/F 0.75 to 1.15 x 0.1 to 2 years) is rough Bergomi
    at ``truth`` priced by the reference Monte Carlo, not by the learned model."""
    from spectralmc_server.engine.rbergomi_reference import rbergomi_european_mc
    from spectralmc_server.marketdata.black import implied_vol

    t = torch.tensor(CORRECTED_EXPIRIES, dtype=F64)
    theta = torch.tensor([[truth[n] for n in NAMES]] * len(t), dtype=F64)
    lm = torch.log(torch.tensor([RB_MONEYNESS] * len(t), dtype=F64))
    price = rbergomi_european_mc(theta, t, lm, paths, is_call=lm > 0, seed=99).price
    vols = [
        [implied_vol(float(price[i, j]), 1.0, m, float(t[i]), 1.0, m > 1.0) for j, m in enumerate(RB_MONEYNESS)]
        for i in range(len(t))
    ]
    surface = {"strike_kind": "moneyness", "expiries_years": CORRECTED_EXPIRIES, "strikes": RB_MONEYNESS, "vols": vols}
    return spx_snapshot(surface)


def _target_errors(params: dict[str, float], truth: dict[str, float]) -> float:
    """The parameters' errors, each over its tolerance, summed."""
    out = sum(abs(params[n] - truth[n]) / tol for n, tol in TOLERANCE.items())
    return out + sum(abs(params[n] / truth[n] - 1.0) / tol for n, tol in RELATIVE.items())


def test_a_reference_correction_moves_the_fit_to_the_monte_carlos_parameters(served: ServedModel) -> None:
    """A surface the reference Monte Carlo made (the bench's hardest, H 0.1, eta 1.9, rho
    -0.9): one correction by the Monte Carlo at the learned fit brings every parameter
    within its tolerance and closer to the truth in sum; the report says where the
    reference priced, by how much it shifted the quotes, with how many paths."""
    truth = {"H": 0.10, "eta": 1.9, "rho": -0.9, "xi0": 0.04}
    snapshot = _mc_snapshot(truth, 1 << 15)
    learned = calibrate_snapshot(snapshot, "SPX", "rbergomi", served)
    corrected = calibrate_snapshot(snapshot, "SPX", "rbergomi", served, corrections=1, correction_paths=1 << 15)
    assert_recovered(corrected.result.params, truth)
    assert _target_errors(corrected.result.params, truth) < _target_errors(learned.result.params, truth)
    (c,) = corrected.describe()["fit"]["corrections"]
    assert c["at"] == learned.result.params and c["paths"] == 1 << 15
    assert 0 < c["max_stderr"] < c["max_abs_shift"] < 0.005  # a few bp of the forward: the model's error
    assert corrected.shift is not None
    assert torch.equal(corrected.model_price(), corrected.result.model_price + corrected.shift)
    fitted = corrected.model_params().fit
    assert fitted is not None
    stored = fitted["corrections"]
    assert stored == [{k: v for k, v in c.items() if k != "seconds"}]  # no timing in what is stored
    with pytest.raises(SurfaceError, match="corrections: 0 to 3"):
        calibrate_snapshot(snapshot, "SPX", "rbergomi", served, corrections=4)
    for paths in (3, (1 << 20) + 1):  # the Monte Carlo's standard error needs two antithetic pairs
        with pytest.raises(SurfaceError, match=f"correction paths: 4 to 1048576, got {paths}"):
            calibrate_snapshot(snapshot, "SPX", "rbergomi", served, corrections=1, correction_paths=paths)


def test_a_heston_fit_corrected_by_the_analytic_cf_fits_the_analytic_fit() -> None:
    """Through the bundled heston model, corrected twice by COS on the analytic CF (an
    exact reference: no paths, no standard error), on a surface that CF made: the fit's
    residuals shrink to the analytic fit's; a fit already through the reference refuses
    corrections."""
    bundled = bundled_models()
    heston = load_served_model(read_dir(bundled["heston"], need_training=False), name="heston")
    surface = synthetic_surface("heston", HESTON_TRUTH, [0.25, 0.5, 1.0, 2.0], [0.8, 0.9, 1.0, 1.1, 1.2])
    snapshot = spx_snapshot(surface.model_dump(mode="json"))
    learned = calibrate_snapshot(snapshot, "SPX", "heston", heston)
    corrected = calibrate_snapshot(snapshot, "SPX", "heston", heston, corrections=2)
    fit = corrected.describe()["fit"]
    assert [c["paths"] for c in fit["corrections"]] == [None, None]
    assert all(c["max_stderr"] == 0.0 for c in fit["corrections"])
    assert fit["rmse_vol"] < 0.2 * learned.describe()["fit"]["rmse_vol"], (fit, learned.describe()["fit"])
    with pytest.raises(SurfaceError, match="through the reference"):
        calibrate_snapshot(snapshot, "SPX", "heston", None, corrections=1)


# -- several starts, and a pricer without a CF --------------------------------------------------


HESTON = get_process("heston")
HESTON_BOUNDS = HESTON.default_domain().ranges[:-1]
HESTON_TRUTH = {"v0": 0.04, "kappa": 2.0, "theta": 0.06, "xi": 0.6, "rho": -0.6}


def _heston_cf(theta: torch.Tensor, expiry: torch.Tensor) -> torch.Tensor:
    return analytic_cf_y(HESTON, REFERENCE_SPECTRUM, theta, expiry)


@pytest.fixture(scope="module")
def heston_quotes() -> Quotes:
    """Heston's own normalised prices at HESTON_TRUTH (COS on the analytic CF), as quotes."""
    from spectralmc_server.pricing.calibration import synthetic_surface

    surface = synthetic_surface("heston", HESTON_TRUTH, [0.25, 0.5, 1.0, 2.0], MONEYNESS)
    return grid_quotes(surface.vols, surface.expiries_years, MONEYNESS)


def test_several_starts_are_screened_and_the_best_is_fitted_from(heston_quotes: Quotes) -> None:
    """A far start and the heuristic's: the screen (one pricing each) picks the one with
    the smaller error, the result names it, and the fit is the one-start fit from it."""
    good = heston_start(heston_quotes, HESTON_BOUNDS)
    far = {"v0": 0.3, "kappa": 0.3, "theta": 0.01, "xi": 1.5, "rho": 0.3}
    both = calibrate(_heston_cf, HESTON, REFERENCE_SPECTRUM, heston_quotes, HESTON_BOUNDS, [far, good])
    alone = calibrate(_heston_cf, HESTON, REFERENCE_SPECTRUM, heston_quotes, HESTON_BOUNDS, good)
    assert both.start == good
    assert both.params == alone.params and both.iterations == alone.iterations
    assert both.evaluations == alone.evaluations + 2  # the screen's two pricings


def test_calibrate_prices_recovers_heston_through_prices_alone(heston_quotes: Quotes) -> None:
    """The same quotes through a price function (COS on the analytic CF, no derivatives):
    the forward-difference Levenberg-Marquardt recovers the parameters closely, pricing
    P + 1 = 6 times per Jacobian."""
    expiries, rows = torch.unique(heston_quotes.expiry, return_inverse=True)
    calls = []

    def price(theta: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return model_prices(_heston_cf, HESTON, REFERENCE_SPECTRUM, theta, expiries, rows, heston_quotes.log_moneyness)

    start = heston_start(heston_quotes, HESTON_BOUNDS)
    res = calibrate_prices(price, HESTON.param_names, heston_quotes, HESTON_BOUNDS, start, step=1e-6)
    assert res.converged and res.rmse_vol < 1e-5, res.rmse_vol
    for name, want in HESTON_TRUTH.items():
        assert res.params[name] == pytest.approx(want, rel=2e-3), (name, res.params)
    assert res.evaluations == len(calls) - 1  # all but the final pricing of the answer
    assert res.iterations >= 1 and res.evaluations >= 6 * len(res.history)
