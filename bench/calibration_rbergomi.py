"""Rough Bergomi calibration speed and accuracy: through the learned model, and through
the reference Monte Carlo as the pricer, side by side, on surfaces with known truth.

Each surface: rough Bergomi at known (H, eta, rho, xi0), priced by the reference Monte
Carlo (engine/rbergomi_reference.py: the hybrid scheme in 256 steps, the law the model
learned; mixed estimator, antithetic, control variates) at 6 expiries (0.1 .. 2 years)
x 11 strikes = 66 quotes, the strikes evenly spaced in log(K/F) from 3 standard
deviations (sqrt(xi0 T)) below the money to 2 above, inside K/F in [0.7, 1.3]; each
price inverted to its Black vol. The fit (engine/fit.py, Levenberg-Marquardt on the
price errors over the vega, floored at 10% of the at-the-money vega as the service
fits rbergomi: pricing/calibration.py VEGA_FLOOR; parameters inside the process's
bounds) starts from the rbergomi heuristic's starts (engine/fit.py rbergomi_starts,
screened by their errors):

- learned model: COS on the served network's CF, its derivatives in one pass;
- learned + 1 MC correction: the learned fit, corrected once by the reference MC at the
  fitted parameters (``--correction-paths`` per expiry, 131,072 by default;
  pricing/calibration.py ``corrected_fit``, what ``spectralmc calibrate --corrections 1``
  runs): the model fits the quotes less its own error there;
- reference MC: ``rbergomi_european_mc`` as the pricer, with few paths (``--mc-paths``,
  2,048 by default) and the same random numbers at every call, the Jacobian by forward
  differences: a timing comparison, not an accurate fit (its noise is in its errors).

Times are from quotes to parameters (learned: the median of ``--repeat`` runs after a
warm-up). Errors: the fitted parameters against the truth (targets: H within 0.02,
eta within 10%, rho within 0.05, xi0 within 2%), and "rmse bp" the root mean square of
the fit's residuals (the vol error where the vega is above the floor), each engine's
from its own pricing.

    python bench/calibration_rbergomi.py --record
    python bench/calibration_rbergomi.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import output_args, plot_file, record, save_figure, table

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.cvnn import CFModel
from spectralmc_server.engine.fit import CalibrationResult, Quotes, calibrate, calibrate_prices, rbergomi_starts
from spectralmc_server.engine.rbergomi_reference import rbergomi_european_mc
from spectralmc_server.engine.served import load_served_model
from spectralmc_server.marketdata.black import implied_vol
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.calibratable import CORRECTION_PATHS
from spectralmc_server.pricing.calibration import VEGA_FLOOR, corrected_fit

F64 = torch.float64
NAMES = ("H", "eta", "rho", "xi0")
EXPIRIES = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0]
STRIKES = 11  # per expiry
TRUTHS = [
    {"H": 0.10, "eta": 1.9, "rho": -0.9, "xi0": 0.04},
    {"H": 0.07, "eta": 1.5, "rho": -0.7, "xi0": 0.055},
    {"H": 0.20, "eta": 1.2, "rho": -0.6, "xi0": 0.03},
    {"H": 0.30, "eta": 1.0, "rho": -0.5, "xi0": 0.09},
    {"H": 0.15, "eta": 2.5, "rho": -0.8, "xi0": 0.02},
]
# targets: H and rho absolute, eta and xi0 relative
TARGETS = {"H": 0.02, "eta": 0.10, "rho": 0.05, "xi0": 0.02}
RELATIVE = {"eta", "xi0"}
SURFACE_SEED = 20261206
MC_FIT_SEED = 7


def log_strikes(truth: dict[str, float]) -> torch.Tensor:
    """(E, STRIKES) log(K/F): 3 sd below the money to 2 above, inside K/F [0.7, 1.3]."""
    rows = []
    for t in EXPIRIES:
        sd = math.sqrt(truth["xi0"] * t)
        lo, hi = max(math.log(0.7), -3.0 * sd), min(math.log(1.3), 2.0 * sd)
        rows.append(torch.linspace(lo, hi, STRIKES, dtype=F64))
    return torch.stack(rows)


def mc_prices(theta: torch.Tensor, lm: torch.Tensor, paths: int, seed: int) -> torch.Tensor:
    """Out-of-the-money prices over the forward (E, J) by the reference Monte Carlo, with
    their standard errors."""
    th = theta[None, :].expand(len(EXPIRIES), -1)
    res = rbergomi_european_mc(th, torch.tensor(EXPIRIES, dtype=F64), lm, paths, is_call=lm > 0, seed=seed)
    return torch.stack([res.price, res.stderr])


def surface(truth: dict[str, float], paths: int) -> tuple[Quotes, float]:
    """The truth's quotes (every node's Black vol of its MC price) and the largest MC
    standard error as a vol (stderr / vega)."""
    lm = log_strikes(truth)
    theta = torch.tensor([truth[n] for n in NAMES], dtype=F64)
    price, stderr = mc_prices(theta, lm, paths, SURFACE_SEED)
    t = torch.tensor(EXPIRIES, dtype=F64)[:, None].expand_as(lm).flatten()
    k = lm.flatten()
    vols = [
        implied_vol(float(p), 1.0, math.exp(float(x)), float(tt), 1.0, float(x) > 0)
        for p, x, tt in zip(price.flatten(), k, t, strict=True)
    ]
    quotes = Quotes.from_vols(t.clone(), k.clone(), torch.tensor(vols, dtype=F64))
    return quotes, float((stderr.flatten() / quotes.vega).max())


def errors(fit: dict[str, float], truth: dict[str, float]) -> dict[str, float]:
    """Each parameter's error in its target's terms (relative for eta and xi0)."""
    return {n: abs(fit[n] - truth[n]) / (abs(truth[n]) if n in RELATIVE else 1.0) for n in NAMES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="rbergomi checkpoint directory (default: the bundled model)")
    ap.add_argument("--repeat", type=int, default=5, help="learned fits timed per surface (the median)")
    ap.add_argument("--surface-paths", type=int, default=1 << 17, help="MC paths per expiry of each true surface")
    ap.add_argument("--mc-paths", type=int, default=1 << 11, help="MC paths per expiry of the MC pricer's fit")
    ap.add_argument("--no-mc-fit", action="store_true", help="skip the fit through the reference MC")
    ap.add_argument(
        "--correction-paths", type=int, default=CORRECTION_PATHS, help="MC paths per expiry of the correction"
    )
    ap.add_argument("--quick", action="store_true", help="one surface, fewer paths, one timed run")
    output_args(ap)
    args = ap.parse_args(argv)
    truths = TRUTHS[:1] if args.quick else TRUTHS
    repeat = 1 if args.quick else args.repeat
    surface_paths = 1 << 13 if args.quick else args.surface_paths
    mc_paths = 1 << 9 if args.quick else args.mc_paths
    correction_paths = 1 << 12 if args.quick else args.correction_paths
    if args.model is None and "rbergomi" not in bundled_models():
        ap.error("no bundled rbergomi model: give --model")
    ckpt = read_dir(args.model or bundled_models()["rbergomi"], need_training=False)
    served = load_served_model(ckpt, require_certificate=False)
    net = served.pricer.learned.raw_cf
    assert isinstance(net, CFModel)
    process, spectrum = served.process, served.pricer.learned.spectrum
    bounds = served.domain.ranges[:-1]
    assert tuple(b.name for b in bounds) == NAMES

    rows: list[list[Any]] = []
    surfaces: list[list[Any]] = []
    per_engine: dict[str, list[float]] = {}
    worst: dict[str, list[float]] = {}
    for k, truth in enumerate(truths):
        t0 = time.perf_counter()
        quotes, noise = surface(truth, surface_paths)
        surfaces.append([k, *(truth[n] for n in NAMES), len(quotes), noise * 1e4, time.perf_counter() - t0])
        starts = rbergomi_starts(quotes, bounds)
        weighted = quotes.with_vega_floor(VEGA_FLOOR["rbergomi"])

        def learned(q: Quotes = weighted, s: list[dict[str, float]] = starts) -> CalibrationResult:
            return calibrate(net, process, spectrum, q, bounds, s, tangents=net.forward_with_tangents)

        lm = quotes.log_moneyness.view(len(EXPIRIES), STRIKES)

        def reference(
            q: Quotes = weighted, s: list[dict[str, float]] = starts, x: torch.Tensor = lm
        ) -> CalibrationResult:
            return calibrate_prices(
                lambda th: mc_prices(th, x, mc_paths, MC_FIT_SEED)[0].flatten(), NAMES, q, bounds, s
            )

        def corrected(q: Quotes = weighted, qs: Quotes = quotes) -> CalibrationResult:
            first = learned(q)

            def fit(shifted: Quotes, s: list[dict[str, float]]) -> CalibrationResult:
                return calibrate(net, process, spectrum, shifted, bounds, s, tangents=net.forward_with_tangents)

            res, done, _ = corrected_fit(fit, "rbergomi", first, qs, q, 1, correction_paths)
            return replace(res, seconds=first.seconds + sum(c.seconds for c in done))

        engines: dict[str, tuple[Callable[[], CalibrationResult], int]] = {"learned model": (learned, repeat)}
        engines[f"learned + 1 MC correction ({correction_paths:,} paths)"] = (corrected, 1)
        if not args.no_mc_fit:
            engines[f"reference MC ({mc_paths:,} paths)"] = (reference, 1)
        for name, (fn, runs) in engines.items():
            if runs > 1:
                fn()  # warm-up
            times, res = [], None
            for _ in range(runs):
                res = fn()
                times.append(res.seconds)
            assert res is not None
            sec = sorted(times)[len(times) // 2]
            err = errors(res.params, truth)
            ok = all(err[n] <= TARGETS[n] for n in NAMES)
            rows.append(
                [
                    k,
                    name,
                    len(quotes),
                    sec * 1e3,
                    res.iterations,
                    res.evaluations,
                    res.rmse_vol * 1e4,
                    *(res.params[n] for n in NAMES),
                    err["H"],
                    f"{err['eta'] * 100:.1f}%",
                    err["rho"],
                    f"{err['xi0'] * 100:.2f}%",
                    "yes" if ok else "no",
                ]
            )
            per_engine.setdefault(name, []).append(sec * 1e3)
            for n in NAMES:
                worst.setdefault(f"{name}|{n}", []).append(err[n] / TARGETS[n])
    headers = [
        "surface",
        "pricer",
        "quotes",
        "ms",
        "iterations",
        "evaluations",
        "rmse bp",
        *(f"fit {n}" for n in NAMES),
        "err H",
        "err eta",
        "err rho",
        "err xi0",
        "within targets",
    ]
    cal_table = table(headers, rows)
    print(cal_table)
    truth_table = table(
        ["surface", *NAMES, "quotes", "max MC stderr, bp vol", "surface s"],
        surfaces,
    )
    print(truth_table)
    learned_ms = sorted(per_engine["learned model"])
    print(f"learned model: median {learned_ms[len(learned_ms) // 2]:.0f} ms, max {learned_ms[-1]:.0f} ms per fit")
    plot_path = plot_file(args, "calibration_rbergomi.png")
    plot(plot_path, per_engine, worst)
    print(f"plot: {plot_path}")
    if args.record and not args.quick:
        state = ckpt.manifest["state"]
        body = f"""### Rough Bergomi calibration (`bench/calibration_rbergomi.py`)

{len(truths)} surfaces with known parameters, each priced by the reference Monte Carlo
({surface_paths:,} paths per expiry; the largest standard error as a vol in the second table) at
{len(EXPIRIES)} expiries ({", ".join(f"{t:g}" for t in EXPIRIES)} years) x {STRIKES} strikes from 3
standard deviations below the money to 2 above (K/F within [0.7, 1.3]), and fitted from the same
starts (engine/fit.py `rbergomi_starts`) through the learned model (the bundled rbergomi model,
content hash `{ckpt.content_hash}`, {state["step"]} steps; median of {repeat} runs after a warm-up)
and through the reference MC as the pricer with {mc_paths:,} paths per expiry (one run; few paths,
so its own noise is in its errors: a timing comparison). "learned + 1 MC correction": the
learned fit, then the reference MC ({correction_paths:,} paths per expiry, its own seed) prices
the quotes at the fitted parameters, the quotes are shifted by its difference from the model's
prices there, and the model fits again from there (pricing/calibration.py `corrected_fit`,
`spectralmc calibrate --corrections 1`); its time includes the MC. Residuals: price error over the vega
floored at {VEGA_FLOOR["rbergomi"]:.0%} of the at-the-money vega ("rmse bp": vol bp where the vega is above
it). Errors: H and rho absolute, eta and xi0 relative; targets H 0.02, eta 10%, rho 0.05, xi0 2%,
and 200 ms per fit.

{cal_table}

True parameters and surfaces:

{truth_table}

![calibration_rbergomi](img/calibration_rbergomi.png)
"""
        record("calibration_rbergomi", body)
    return 0


def plot(path: Path, per_engine: dict[str, list[float]], worst: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(per_engine)
    for i, name in enumerate(names):
        ms = per_engine[name]
        ax.scatter([i] * len(ms), ms, color=f"C{i}", label=name)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.axhline(200.0, color="red", lw=1, label="target 200 ms")
    ax.set_yscale("log")
    ax.set_ylabel("time per fit, ms (one point per surface)")
    ax.legend(fontsize=8)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [max(worst[f"{name}|{n}"]) for n in NAMES]
        bx.bar([j + i * width for j in range(len(NAMES))], values, width=width, color=f"C{i}", label=name)
    bx.set_xticks([j + 0.4 - width / 2 for j in range(len(NAMES))], list(NAMES))
    bx.axhline(1.0, color="red", lw=1, label="target")
    bx.set_yscale("log")
    bx.set_ylabel("worst error over surfaces / target")
    bx.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
