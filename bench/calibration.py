"""Heston calibration speed and accuracy: through the learned model, through the analytic
CF, and QuantLib's calibration side by side, on synthetic surfaces with known truth.

Each surface: 6 expiries (0.25 .. 2 years) x 9 moneyness levels K/F in [0.8, 1.2] = 54
quotes, implied vols of COS prices on the analytic CF at known parameters. Every engine
starts from the same point (engine/fit.py heston_start) and is timed from quotes
to parameters (median of repeated runs after one warm-up). Errors: the fitted
parameters against the truth, and the root mean square of (model vol - market vol)
over the quotes, each engine's model vol from its own pricing.

    python bench/calibration.py --record
    python bench/calibration.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, record, save_figure, table

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.cvnn import CFModel
from spectralmc_server.engine.fit import CalibrationResult, Quotes, calibrate, heston_start
from spectralmc_server.engine.processes import get_process
from spectralmc_server.engine.reference import analytic_cf_y
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.calibration import synthetic_surface

F64 = torch.float64
DAYS = [91, 182, 274, 365, 548, 730]  # expiries in days (QuantLib periods), ~0.25 .. 2 years
MONEYNESS = [0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2]
NAMES = ("v0", "kappa", "theta", "xi", "rho")
TRUTHS = [
    {"v0": 0.03, "kappa": 2.0, "theta": 0.05, "xi": 0.6, "rho": -0.65},
    {"v0": 0.04, "kappa": 1.0, "theta": 0.04, "xi": 0.4, "rho": -0.8},
    {"v0": 0.09, "kappa": 3.0, "theta": 0.06, "xi": 0.8, "rho": -0.5},
    {"v0": 0.02, "kappa": 1.5, "theta": 0.09, "xi": 0.3, "rho": -0.3},
    {"v0": 0.06, "kappa": 4.0, "theta": 0.03, "xi": 0.9, "rho": -0.7},
]


def surface_quotes(truth: dict[str, float]) -> Quotes:
    expiries = [d / 365.0 for d in DAYS]
    surf = synthetic_surface("heston", truth, expiries, MONEYNESS)
    t = torch.tensor([x for x in expiries for _ in MONEYNESS], dtype=F64)
    lm = torch.log(torch.tensor(MONEYNESS * len(expiries), dtype=F64))
    vols = torch.tensor([v for row in surf.vols for v in row], dtype=F64)
    return Quotes.from_vols(t, lm, vols)


def rel_errors(fit: dict[str, float], truth: dict[str, float]) -> list[float]:
    return [abs(fit[n] - truth[n]) / abs(truth[n]) for n in NAMES]


def ql_calibrate(quotes: Quotes, start: dict[str, float]) -> tuple[dict[str, float], float, float]:
    """QuantLib: HestonModelHelpers (implied-vol error) + AnalyticHestonEngine +
    Levenberg-Marquardt, r = q = 0 and S = 100 so strikes are K/F * 100."""
    import QuantLib as ql  # noqa: N813 (the library's conventional alias)

    today = ql.Date(27, 11, 2026)
    ql.Settings.instance().evaluationDate = today
    dc = ql.Actual365Fixed()
    r = ql.YieldTermStructureHandle(ql.FlatForward(today, 0.0, dc))
    q = ql.YieldTermStructureHandle(ql.FlatForward(today, 0.0, dc))
    spot = ql.QuoteHandle(ql.SimpleQuote(100.0))
    process = ql.HestonProcess(r, q, spot, *(start[n] for n in NAMES))
    model = ql.HestonModel(process)
    engine = ql.AnalyticHestonEngine(model)
    helpers = []
    for i in range(len(quotes)):
        days = round(float(quotes.expiry[i]) * 365)
        strike = 100.0 * math.exp(float(quotes.log_moneyness[i]))
        h = ql.HestonModelHelper(
            ql.Period(days, ql.Days),
            ql.NullCalendar(),
            100.0,
            strike,
            ql.QuoteHandle(ql.SimpleQuote(float(quotes.vol[i]))),
            r,
            q,
            ql.BlackCalibrationHelper.ImpliedVolError,
        )
        h.setPricingEngine(engine)
        helpers.append(h)
    t0 = time.perf_counter()
    model.calibrate(helpers, ql.LevenbergMarquardt(1e-8, 1e-8, 1e-8), ql.EndCriteria(500, 50, 1e-8, 1e-8, 1e-8))
    seconds = time.perf_counter() - t0
    theta, kappa, xi, rho, v0 = model.params()
    fit = {"v0": v0, "kappa": kappa, "theta": theta, "xi": xi, "rho": rho}
    rmse = math.sqrt(
        sum(
            (h.impliedVolatility(h.modelValue(), 1e-10, 1000, 1e-4, 5.0) - float(quotes.vol[i])) ** 2
            for i, h in enumerate(helpers)
        )
        / len(helpers)
    )
    return fit, seconds, rmse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="heston checkpoint directory (default: the bundled model)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    output_args(ap)
    args = ap.parse_args(argv)
    truths = TRUTHS[:1] if args.quick else TRUTHS
    repeat = 1 if args.quick else args.repeat
    ckpt = read_dir(args.model or bundled_models()["heston"], need_training=False)
    served = load_served_model(ckpt, require_certificate=False)
    net = served.pricer.learned.raw_cf
    assert isinstance(net, CFModel)
    heston = get_process("heston")
    bounds = served.domain.ranges[:-1]
    analytic_spec = SpectrumConfig(n_freq=128, half_width=16.0, n_bins=1024)

    def analytic(th: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return analytic_cf_y(heston, analytic_spec, th, t)

    rows: list[list[Any]] = []
    per_engine: dict[str, list[float]] = {}
    for k, truth in enumerate(truths):
        quotes = surface_quotes(truth)
        start = heston_start(quotes, bounds)

        def learned(q: Quotes = quotes, s: dict[str, float] = start) -> CalibrationResult:
            return calibrate(
                net, heston, served.pricer.learned.spectrum, q, bounds, s, tangents=net.forward_with_tangents
            )

        def exact(q: Quotes = quotes, s: dict[str, float] = start) -> CalibrationResult:
            return calibrate(analytic, heston, analytic_spec, q, bounds, s)

        engines = {"learned model (LM, one-pass tangents)": learned, "analytic CF, COS K=128 (LM, jacfwd)": exact}
        for name, fn in engines.items():
            fn()  # warm-up (the first jacfwd call sets up torch.func)
            times, res = [], None
            for _ in range(repeat):
                res = fn()
                times.append(res.seconds)
            assert res is not None
            sec = sorted(times)[len(times) // 2]
            errs = rel_errors(res.params, truth)
            rows.append([k, name, len(quotes), sec * 1e3, res.iterations, res.rmse_vol * 1e4, *errs])
            per_engine.setdefault(name, []).append(sec * 1e3)
        fit, sec, rmse = ql_calibrate(quotes, start)
        errs = rel_errors(fit, truth)
        rows.append(
            [k, "QuantLib HestonModel.calibrate (analytic, LM)", len(quotes), sec * 1e3, "-", rmse * 1e4, *errs]
        )
        per_engine.setdefault("QuantLib", []).append(sec * 1e3)
    headers = ["surface", "engine", "quotes", "ms", "iterations", "rmse vol bp", *(f"rel err {n}" for n in NAMES)]
    cal_table = table(headers, rows)
    print(cal_table)
    truth_table = table(["surface", *NAMES], [[k, *(t[n] for n in NAMES)] for k, t in enumerate(truths)])
    print(truth_table)
    plot_path = plot_file(args, "calibration.png")
    plot(plot_path, per_engine)
    print(f"plot: {plot_path}")
    if args.record:
        state = ckpt.manifest["state"]
        body = f"""### Heston calibration (`bench/calibration.py`)

{len(truths)} synthetic surfaces with known parameters, 54 quotes each (expiries
{", ".join(str(d) for d in DAYS)} days x K/F {MONEYNESS[0]}..{MONEYNESS[-1]}), all engines from the
same start. Learned model: the bundled heston model (content hash `{ckpt.content_hash}`,
{state["step"]} steps). "rmse vol" is each engine's own fit error; "rel err" the fitted parameter
against the truth. Times are from quotes to parameters, median of {repeat} runs after a warm-up.

{cal_table}

True parameters:

{truth_table}

![calibration](img/calibration.png)
"""
        record("calibration", body)
    return 0


def plot(path: Path, per_engine: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(per_engine)
    ax.bar(range(len(names)), [sorted(v)[len(v) // 2] for v in per_engine.values()], color="tab:blue")
    ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], fontsize=8)
    ax.axhline(100.0, color="red", lw=1, label="target 100 ms")
    ax.set_yscale("log")
    ax.set_ylabel("calibration time, ms (median over surfaces)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
