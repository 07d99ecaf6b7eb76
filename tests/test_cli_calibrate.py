"""``spectralmc calibrate`` as users run it: a file:// market-data store holding a
synthetic Heston surface (true parameters known), fitted through the analytic CF
(``--reference``) and through the bundled learned model, ``--save`` storing the fit as
a derived snapshot, and the usage errors (one line on stderr, exit 2).

Tolerances as in tests/service/test_calibration_routes.py: the analytic CF recovers
every parameter within 1e-4; the learned model v0 within 0.003, theta within 0.005,
rho within 0.1, with an RMSE below 1 vol point.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_util import main_in_process

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord, SnapshotStore
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.calibration import synthetic_surface
from spectralmc_server.store.objects import LocalObjectStore

VDT = "2026-11-26T16:00:00Z"
ASOF = "2026-11-26T16:00:05Z"
TRUE = {"v0": 0.03, "kappa": 2.0, "theta": 0.05, "xi": 0.6, "rho": -0.65}
EXPIRIES = [0.25, 0.5, 1.0, 1.5, 2.0]
MONEYNESS = [0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2]
TOLERANCE = {"v0": 0.003, "theta": 0.005, "rho": 0.1}
REPORT_FIELDS = {
    "market_data",
    "underlying",
    "process",
    "method",
    "model",
    "params",
    "start",
    "fit",
    "quotes",
    "stored",
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SPECTRALMC_DEBUG", None)
    return env


def _start(*args: str | Path) -> subprocess.Popen[str]:
    """``spectralmc calibrate ARGS`` as its own process (several may run at once)."""
    return subprocess.Popen(
        [sys.executable, "-m", "spectralmc_server.cli", "calibrate", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return _finish(_start(*args))


def _run_in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``spectralmc calibrate ...`` without a fresh interpreter."""
    return main_in_process(capsys, "calibrate", *args)


def _usage_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The bad-input convention: exit 2, nothing on stdout, one line on stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stderr.endswith("\n") and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    out: dict[str, Any] = orjson.loads(proc.stdout)
    assert set(out) == REPORT_FIELDS, sorted(out)
    assert out["underlying"] == "SPX" and out["process"] == "heston"
    assert out["fit"]["quotes"] == len(EXPIRIES) * len(MONEYNESS) == len(out["quotes"])
    assert out["fit"]["converged"] is True
    return out


def heston_snapshot() -> MarketSnapshot:
    surface = synthetic_surface("heston", TRUE, EXPIRIES, MONEYNESS)
    return MarketSnapshot.model_validate(
        {
            "spots": {"SPX": 100.0},
            "yield_curves": {
                "USD": {"pillars": [{"years": 0.25, "zero_rate": 0.03}, {"years": 5.0, "zero_rate": 0.04}]}
            },
            "discounting": {"SPX": "USD"},
            "dividend_curves": {"SPX": {"pillars": [{"years": 1.0, "zero_rate": 0.01}]}},
            "vol_surfaces": {"SPX": surface.model_dump(mode="json")},
        }
    )


@dataclass(frozen=True)
class Market:
    root: Path
    record: SnapshotRecord

    @property
    def uri(self) -> str:
        return self.root.as_uri()


def populate(root: Path) -> Market:
    """A file:// store with the synthetic snapshot under default/VDT/ASOF."""
    vdt, asof = datetime.fromisoformat(VDT), datetime.fromisoformat(ASOF)
    record, created = asyncio.run(SnapshotStore(LocalObjectStore(root)).put("default", vdt, asof, heston_snapshot()))
    assert created
    return Market(root, record)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Market:
    """Read-only for the tests that use it (--save gets its own store)."""
    return populate(tmp_path_factory.mktemp("calibrate-md"))


@dataclass(frozen=True)
class Fits:
    reference: subprocess.CompletedProcess[str]  # --reference on ``market``
    learned: subprocess.CompletedProcess[str]  # the bundled model, --save, on ``saved``
    saved: Market
    both_sources: subprocess.CompletedProcess[str]  # --store and --checkpoint: a usage error


@pytest.fixture(scope="module")
def fits(market: Market, tmp_path_factory: pytest.TempPathFactory) -> Fits:
    """The two real fits and one usage error, run as processes side by side (each pays
    its own interpreter start-up)."""
    saved = populate(tmp_path_factory.mktemp("calibrate-save"))
    elsewhere = tmp_path_factory.mktemp("calibrate-elsewhere")
    both_sources = _start(
        "--marketdata", market.uri, "--val-datetime", VDT, "--underlying", "SPX",
        "--store", elsewhere.as_uri(), "--checkpoint", elsewhere,
    )  # fmt: skip
    reference = _start("--marketdata", market.uri, "--val-datetime", VDT, "--underlying", "SPX", "--reference")
    learned = _start(
        "--marketdata", saved.uri, "--val-datetime", "2026-11-26T11:00:00-05:00", "--asof", ASOF,
        "--underlying", "SPX", "--process", "heston", "--save",
    )  # fmt: skip
    return Fits(_finish(reference), _finish(learned), saved, _finish(both_sources))


def _latest(root: Path) -> tuple[SnapshotRecord, MarketSnapshot]:
    async def read() -> tuple[SnapshotRecord, MarketSnapshot]:
        store = SnapshotStore(LocalObjectStore(root))
        record = await store.latest("default")
        assert record is not None
        return record, await store.load(record)

    return asyncio.run(read())


# -- fits --------------------------------------------------------------------------------


def test_calibrate_reference(market: Market, fits: Fits) -> None:
    out = _report(fits.reference)
    assert fits.reference.stderr == ""
    assert out["method"] == "reference" and out["model"] is None
    assert out["market_data"] == market.record.describe()
    for name, value in TRUE.items():
        assert out["params"][name] == pytest.approx(value, abs=1e-4), (name, out["params"])
    assert out["fit"]["rmse_vol"] < 1e-5
    assert out["stored"] is None
    assert _latest(market.root)[0] == market.record  # nothing stored without --save


def test_calibrate_with_the_bundled_model_and_save(fits: Fits) -> None:
    market = fits.saved
    bundled = bundled_models()
    assert "heston" in bundled, f"no bundled heston model: {sorted(bundled)}"
    content_hash = read_dir(bundled["heston"], need_training=False).content_hash
    out = _report(fits.learned)
    assert out["method"] == "cvnn"
    assert out["model"] == {"name": "heston", "version": None, "content_hash": content_hash}
    assert out["market_data"] == market.record.describe()  # the same instant in another zone
    for name, tol in TOLERANCE.items():
        assert abs(out["params"][name] - TRUE[name]) <= tol, (name, out["params"])
    assert out["fit"]["rmse_vol"] < 0.01
    errors = [q["vol_error"] for q in out["quotes"]]
    assert out["fit"]["rmse_vol"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / len(errors)), rel=1e-9)

    # --save: the derived snapshot is the store's latest, with the fit and its lineage
    stored = out["stored"]
    assert stored["created"] is True
    record, snap = _latest(market.root)
    assert {**record.describe(), "created": True} == stored
    assert record.val_datetime == market.record.val_datetime and record.data_asof > market.record.data_asof
    assert record.hash != market.record.hash
    lineage = record.lineage
    assert lineage is not None
    assert (lineage["job"], lineage["kind"], lineage["process"]) == (None, "calibrate", "heston")
    assert lineage["underlyings"] == ["SPX"] and lineage["models"] == [out["model"]]
    assert lineage["inputs"] == [market.record.key()]
    fitted = snap.model_params["SPX"]["heston"]
    assert fitted.params == out["params"]
    assert fitted.fit is not None
    assert fitted.fit["method"] == "cvnn" and fitted.fit["quotes_detail"] == out["quotes"]
    assert fitted.fit["model"] == out["model"] and fitted.fit["fitted_to"]["underlying"] == "SPX"
    rest = snap.model_dump(mode="json")
    assert rest.pop("model_params") == {"SPX": {"heston": fitted.model_dump(mode="json")}}
    assert rest == {k: v for k, v in heston_snapshot().model_dump(mode="json").items() if k != "model_params"}
    assert datetime.fromisoformat(stored["data_asof"]) <= datetime.now(UTC)


# -- usage errors ------------------------------------------------------------------------
# One as a real process (the interpreter's exit code, run with the fits), the rest
# through main() in this process: the same code and output without a start-up each.


def test_store_and_checkpoint_together(fits: Fits) -> None:
    message = _usage_error(fits.both_sources)
    assert "--store" in message and "--checkpoint" in message


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2026-11-26T16:00:00",
        "2026-13-01T00:00:00Z",
        "1700000000",  # Unix seconds: RFC 3339 only
        "0",
        "-1",
        "2026-11-26 16:00:00Z",
        "2026-11-26T16:00Z",
    ],
)
def test_bad_val_datetime(market: Market, capsys: pytest.CaptureFixture[str], value: str) -> None:
    proc = _run_in_process(capsys, "--marketdata", market.uri, "--val-datetime", value, "--underlying", "SPX")
    message = _usage_error(proc)
    assert "--val-datetime" in message and "RFC 3339" in message and "zone" in message and repr(value) in message
    args = ("--marketdata", market.uri, "--val-datetime", VDT, "--asof", value, "--underlying", "SPX")
    message = _usage_error(_run_in_process(capsys, *args))
    assert message.startswith("error: --asof:") and "RFC 3339" in message and repr(value) in message


def test_missing_snapshot(market: Market, capsys: pytest.CaptureFixture[str]) -> None:
    proc = _run_in_process(
        capsys,
        "--marketdata",
        market.uri,
        "--val-datetime",
        "2026-11-27T16:00:00Z",
        "--underlying",
        "SPX",
        "--reference",
    )
    message = _usage_error(proc)
    assert f"no market-data snapshot for default/2026-11-27T16:00:00Z as of latest in {market.uri}" in message
    proc = _run_in_process(
        capsys, "--marketdata", market.uri, "--val-datetime", VDT, "--asof", "2026-11-26T16:00:00Z", "--underlying",
        "SPX", "--reference",
    )  # fmt: skip
    assert f"no market-data snapshot for default/{VDT} as of 2026-11-26T16:00:00Z" in _usage_error(proc)


def test_corrections_through_the_model_and_their_usage_errors(
    market: Market, capsys: pytest.CaptureFixture[str]
) -> None:
    """--corrections 1: the bundled heston model's fit corrected by the analytic CF (an
    exact reference: no paths, no standard error); out of range, with --reference, or
    --correction-paths alone: a usage error naming the option."""
    base = ("--marketdata", market.uri, "--val-datetime", VDT, "--underlying", "SPX")
    proc = _run_in_process(capsys, *base, "--corrections", "1")
    assert proc.returncode == 0, proc.stderr
    out = _report(proc)
    (c,) = out["fit"]["corrections"]
    assert out["method"] == "cvnn" and c["paths"] is None and c["max_stderr"] == 0.0
    for name, tol in TOLERANCE.items():
        assert abs(out["params"][name] - TRUE[name]) <= tol, (name, out["params"])
    for args, words in [
        (("--corrections", "4"), "--corrections: 0 to 3, got 4"),
        (("--corrections", "-1"), "--corrections: 0 to 3, got -1"),
        (("--corrections", "1", "--reference"), "--reference fits without one"),
        (("--correction-paths", "1000"), "only with --corrections"),
        (("--corrections", "1", "--correction-paths", "3"), "--correction-paths: 4 to 1048576, got 3"),
        (("--corrections", "1", "--correction-paths", "1048577"), "--correction-paths: 4 to 1048576, got 1048577"),
    ]:
        assert words in _usage_error(_run_in_process(capsys, *base, *args)), args


def test_no_surface_for_the_underlying(market: Market, capsys: pytest.CaptureFixture[str]) -> None:
    proc = _run_in_process(
        capsys, "--marketdata", market.uri, "--val-datetime", VDT, "--underlying", "NDX", "--reference"
    )
    message = _usage_error(proc)
    assert "cannot calibrate" in message and "no vol surface for NDX" in message


def test_store_checkpoint_reference_are_exclusive(market: Market, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in (["--store", "file:///nowhere", "--reference"], ["--checkpoint", "/nowhere", "--reference"]):
        proc = _run_in_process(capsys, "--marketdata", market.uri, "--val-datetime", VDT, "--underlying", "SPX", *extra)
        assert "at most one of --store, --checkpoint and --reference" in _usage_error(proc)


def test_model_sources_that_cannot_fit_heston(
    market: Market, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ("--marketdata", market.uri, "--val-datetime", VDT, "--underlying", "SPX")
    empty = tmp_path / "store"
    empty.mkdir()
    message = _usage_error(_run_in_process(capsys, *args, "--store", empty.as_uri()))
    assert "--store: model 'heston' has no versions" in message
    message = _usage_error(_run_in_process(capsys, *args, "--checkpoint", bundled_models()["gbm"]))
    assert "the model is a gbm model, not heston" in message
    message = _usage_error(_run_in_process(capsys, *args, "--checkpoint", tmp_path))
    assert str(tmp_path) in message


# -- rough Bergomi -------------------------------------------------------------------------
# Through the bundled rbergomi model (no analytic CF: --reference is refused), on the
# surface that model implies at RB_TRUE, so the fit must give RB_TRUE back within H 0.02,
# eta 10%, rho 0.05, xi0 2%.

RB_TRUE = {"H": 0.1, "eta": 1.5, "rho": -0.7, "xi0": 0.04}
RB_EXPIRIES = [0.25, 0.5, 1.0, 1.5, 2.0]
RB_MONEYNESS = [0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15]  # every price well above 1 bp of F


def rbergomi_snapshot() -> MarketSnapshot:
    from spectralmc_server.engine.served import load_served_model
    from spectralmc_server.pricing.calibration import model_surface

    served = load_served_model(read_dir(bundled_models()["rbergomi"], need_training=False), require_certificate=False)
    surface = model_surface(served, RB_TRUE, RB_EXPIRIES, RB_MONEYNESS)
    data = heston_snapshot().model_dump(mode="json")
    data["vol_surfaces"]["SPX"] = surface.model_dump(mode="json")
    return MarketSnapshot.model_validate(data)


@pytest.fixture(scope="module")
def rb_market(tmp_path_factory: pytest.TempPathFactory) -> Market:
    root = tmp_path_factory.mktemp("calibrate-rbergomi")
    vdt, asof = datetime.fromisoformat(VDT), datetime.fromisoformat(ASOF)
    record, created = asyncio.run(SnapshotStore(LocalObjectStore(root)).put("default", vdt, asof, rbergomi_snapshot()))
    assert created
    return Market(root, record)


def test_calibrate_rbergomi_with_the_bundled_model_and_save(
    rb_market: Market, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--marketdata", rb_market.uri, "--val-datetime", VDT, "--underlying", "SPX", "--process", "rbergomi")
    proc = _run_in_process(capsys, *args, "--save")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = orjson.loads(proc.stdout)
    assert set(out) == REPORT_FIELDS, sorted(out)
    content_hash = read_dir(bundled_models()["rbergomi"], need_training=False).content_hash
    assert (out["process"], out["method"]) == ("rbergomi", "cvnn")
    assert out["model"] == {"name": "rbergomi", "version": None, "content_hash": content_hash}
    assert out["fit"]["converged"] is True and out["fit"]["quotes"] == len(RB_EXPIRIES) * len(RB_MONEYNESS)
    params = out["params"]
    assert set(params) == set(RB_TRUE)
    assert abs(params["H"] - RB_TRUE["H"]) <= 0.02, params
    assert abs(params["eta"] / RB_TRUE["eta"] - 1.0) <= 0.10, params
    assert abs(params["rho"] - RB_TRUE["rho"]) <= 0.05, params
    assert abs(params["xi0"] / RB_TRUE["xi0"] - 1.0) <= 0.02, params
    record, snap = _latest(rb_market.root)
    assert {**record.describe(), "created": True} == out["stored"]
    assert record.lineage is not None and record.lineage["process"] == "rbergomi"
    assert snap.model_params["SPX"]["rbergomi"].params == params


def test_rbergomi_usage_errors(rb_market: Market, capsys: pytest.CaptureFixture[str]) -> None:
    """--reference has no analytic CF to fit through; a heston checkpoint is not an
    rbergomi model; an unknown process is refused by the parser, naming the choices."""
    args = ("--marketdata", rb_market.uri, "--val-datetime", VDT, "--underlying", "SPX")
    message = _usage_error(_run_in_process(capsys, *args, "--process", "rbergomi", "--reference"))
    assert "--reference" in message and "rbergomi has no analytic characteristic function" in message
    message = _usage_error(
        _run_in_process(capsys, *args, "--process", "rbergomi", "--checkpoint", bundled_models()["heston"])
    )
    assert "the model is a heston model, not rbergomi" in message
    message = _usage_error(_run_in_process(capsys, *args, "--process", "sabr"))
    assert "--process" in message and "invalid choice: 'sabr'" in message
    assert "'heston'" in message and "'rbergomi'" in message
