"""Declared jobs (service/jobs.py): the drift-free Schedule, implied_vol_surface, derive
and price jobs through the app, their settings and their metrics.

Timing tolerances of the Schedule tests (periods of 100 ms): a run starts at its grid
tick ``t0 + k * period`` or up to ``TOL`` = 30 ms after it, never early (2 ms of clock
slack); the median run is within TOL and at most one run in ten may be later (a loaded
2-core machine can deschedule the process for longer; that is the OS, not the
schedule). Drift is the change of that offset between the first and the last five runs,
also within TOL: a schedule that slept a period after each 20 ms run would be 300 ms
off by the end. The tick accounting (runs + overlap + late skips) matches the ticks
elapsed to within one (the tick at the cancel). Speed is never measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from marketdata_util import ASOF, VDT, snapshot
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from server_util import Client, MakeClient

from spectralmc_server.marketdata.black import black_forward
from spectralmc_server.marketdata.objects import MarketSnapshot, VolSurface, year_fraction
from spectralmc_server.marketdata.surfaces import implied_vol_surface
from spectralmc_server.service.errors import NoMarketData
from spectralmc_server.service.jobs import Schedule, UnchangedError
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import DeriveJob, PriceJob, Settings

TOL = 0.030  # seconds: how far from its grid tick a run may start
CONFIG = Path(__file__).resolve().parents[2] / "config" / "jobs.toml"
DEMO_IDS = {"demo-call-1y", "demo-put-1y", "demo-call-2y"}

# The known surface the option quotes are generated from (3 expiries x 4 strikes).
EXPIRIES = [0.25, 1.0, 2.0]
STRIKES = [80.0, 95.0, 105.0, 120.0]
MONEYNESS = [0.8, 0.95, 1.05, 1.2]
VOLS = [
    [0.31, 0.26, 0.24, 0.27],
    [0.29, 0.25, 0.23, 0.25],
    [0.27, 0.24, 0.225, 0.235],
]
VDT_DATETIME = datetime.fromisoformat(VDT)
# Expiries of the end-to-end tests: dates, so that contracts by reference can hit them.
EXPIRY_DATES = [date(2027, 2, 26), date(2027, 6, 18), date(2027, 11, 26)]


# -- helpers -----------------------------------------------------------------------------


async def run_schedule(schedule: Schedule, seconds: float) -> tuple[float, float, float]:
    """Run ``schedule`` for ``seconds`` then cancel it; (t0, wall0, t1): loop time and
    wall time just before its task was created, loop time at the cancel."""
    loop = asyncio.get_running_loop()
    t0, wall0 = loop.time(), time.time()
    task = asyncio.create_task(schedule.run())
    await asyncio.sleep(seconds)
    t1 = loop.time()
    await stop(task)
    return t0, wall0, t1


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)
    assert task.cancelled()


def ticks_of(schedule: Schedule, wall0: float) -> list[int]:
    """The grid tick k of each run, from its record (``scheduled`` = start + k * period)."""
    period = schedule.every_seconds
    ticks = [round((r.scheduled - wall0) / period) for r in schedule.runs]
    first = schedule.runs[0].scheduled
    for r, k in zip(schedule.runs, ticks, strict=True):  # the plan itself is an exact grid
        assert r.scheduled - first == pytest.approx((k - ticks[0]) * period, abs=1e-6)
    return ticks


def offsets(starts: list[float], ticks: list[int], t0: float, period: float) -> list[float]:
    """How long after its tick each run started (loop time)."""
    return [s - (t0 + k * period) for s, k in zip(starts, ticks, strict=False)]


def assert_on_grid(off: list[float]) -> None:
    """Never early; the median within TOL; at most one in ten beyond it."""
    assert off, "no runs"
    assert min(off) > -0.002, off
    assert statistics.median(off) < TOL, off
    assert sum(d >= TOL for d in off) <= len(off) // 10, off


def assert_ticks_accounted(schedule: Schedule, t0: float, t1: float) -> None:
    """Every tick that came due was run, skipped as overlap or skipped as late: once."""
    due = math.floor((t1 - t0) / schedule.every_seconds)
    seen = len(schedule.runs) + schedule.skipped["overlap"] + schedule.skipped["late"]
    assert abs(seen - due) <= 1, (seen, due, schedule.describe())


def skipped_metric(metrics: Metrics, job: str, reason: str) -> float | None:
    return metrics.registry.get_sample_value("spectralmc_job_skipped_total", {"job": job, "reason": reason})


def base_body(underlying: str = "SPX") -> dict[str, Any]:
    """Spot and curves for ``underlying``, no vol surface."""
    body = snapshot(underlying=underlying)
    del body["vol_surfaces"]
    return body


def quote(snap: MarketSnapshot, t: float, k: float, vol: float, right: Literal["call", "put"]) -> dict[str, Any]:
    """The discounted Black price of one option, with the snapshot's forward and discount."""
    forward = snap.forward_fn("SPX")
    assert forward is not None
    discount = snap.yield_curves[snap.discounting["SPX"]].discount(t)
    price = black_forward(forward(t), k, vol * math.sqrt(t), right == "call") * discount
    return {"expiry_years": t, "strike": k, "right": right, "price": price}


def mixed_right(i: int, j: int) -> Literal["call", "put"]:
    """Calls and puts in a checkerboard: in and out of the money both occur."""
    return "call" if (i + j) % 2 == 0 else "put"


def exact_moneyness_strike(m: float, f: float) -> float | None:
    """A strike near m * f whose K / f is exactly m in floats (the grid key), if any."""
    k = m * f
    for _ in range(8):
        if k / f == m:
            return k
        k = math.nextafter(k, math.inf if k / f < m else -math.inf)
    return None


def common_moneyness(m: float, forwards: list[float]) -> float:
    """The float nearest ``m`` that is exactly K / F for some float K at every forward
    (implied_vol_surface keys cells by the exact float K / F; see the xfail below)."""
    candidates = [m]
    up = down = m
    for _ in range(50):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, 0.0)
        candidates += [up, down]
    for c in candidates:
        if all(exact_moneyness_strike(c, f) is not None for f in forwards):
            return c
    raise AssertionError(f"no common float moneyness near {m!r}")


def grid_quotes(
    body: dict[str, Any], strike_kind: Literal["strike", "moneyness"], expiries: list[float] = EXPIRIES
) -> list[dict[str, Any]]:
    """Quotes priced off VOLS on expiries x STRIKES (or x MONEYNESS, at the nearest
    common float moneyness), calls and puts mixed."""
    snap = MarketSnapshot.model_validate(body)
    forward = snap.forward_fn("SPX")
    assert forward is not None
    forwards = [forward(t) for t in expiries]
    coords = STRIKES if strike_kind == "strike" else [common_moneyness(m, forwards) for m in MONEYNESS]
    out = []
    for i, t in enumerate(expiries):
        for j, coord in enumerate(coords):
            k = coord if strike_kind == "strike" else exact_moneyness_strike(coord, forwards[i])
            assert k is not None
            out.append(quote(snap, t, k, VOLS[i][j], mixed_right(i, j)))
    return out


def surface_of(body: dict[str, Any], quotes: list[dict[str, Any]], kind: Literal["strike", "moneyness"]) -> VolSurface:
    snap = MarketSnapshot.model_validate({**body, "option_quotes": {"SPX": quotes}})
    return implied_vol_surface(snap, "SPX", snap.option_quotes["SPX"], kind)


def assert_vols(surface: VolSurface, expected: list[list[float]], tol: float = 1e-8) -> None:
    assert len(surface.vols) == len(expected)
    for got_row, want_row in zip(surface.vols, expected, strict=True):
        assert got_row == pytest.approx(want_row, abs=tol, rel=0)


async def ok_json(client: Client, method: str, path: str, status: int = 200, **kwargs: Any) -> dict[str, Any]:
    r = await client.request(method, path, **kwargs)
    text = await r.text()
    assert r.status == status, text
    body: dict[str, Any] = orjson.loads(text)
    return body


async def put_snapshot(client: Client, body: dict[str, Any], asof: str = ASOF) -> dict[str, Any]:
    return await ok_json(client, "PUT", f"/v1/marketdata/default/{VDT}/{asof}", status=201, json=body)


async def job_state(client: Client, name: str) -> dict[str, Any]:
    jobs = (await ok_json(client, "GET", "/v1/jobs"))["jobs"]
    found = [j for j in jobs if j["name"] == name]
    assert len(found) == 1, jobs
    state: dict[str, Any] = found[0]
    return state


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 15.0) -> Any:
    """The first truthy value of ``check()``, polled every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


async def metrics_text(client: Client) -> str:
    r = await client.get("/metrics")
    assert r.status == 200
    return await r.text()


# -- Schedule ----------------------------------------------------------------------------


async def test_schedule_runs_on_a_fixed_grid_without_drift() -> None:
    """Each run takes 20 ms of a 100 ms period; for ~20 ticks the runs start at their
    ticks (TOL, see the module docstring) and the offset does not grow."""
    loop = asyncio.get_running_loop()
    period = 0.1
    starts: list[float] = []

    async def action() -> str | None:
        starts.append(loop.time())
        await asyncio.sleep(0.02)
        return None

    sch = Schedule("grid", period, action, Metrics())
    t0, wall0, t1 = await run_schedule(sch, 2.05)
    n = len(starts)
    assert n >= 15, starts
    ticks = ticks_of(sch, wall0)
    assert all(b > a for a, b in itertools.pairwise(ticks)), ticks  # one run per tick at most
    if sch.skipped["late"] == 0:
        assert ticks[:n] == list(range(1, n + 1))
    off = offsets(starts, ticks, t0, period)
    assert_on_grid(off)
    # last minus first: the spacing is (k_last - k_first) * period within TOL
    drift = statistics.median(off[-5:]) - statistics.median(off[:5])
    assert abs(drift) < TOL, off
    assert sch.skipped["overlap"] == 0
    assert_ticks_accounted(sch, t0, t1)
    assert sch.counts["success"] >= n - 1  # the last may be cancelled in flight


async def test_schedule_never_runs_two_at_once_and_counts_overlaps() -> None:
    loop = asyncio.get_running_loop()
    period = 0.1
    running = peak = 0
    starts: list[float] = []

    async def action() -> str | None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        starts.append(loop.time())
        try:
            await asyncio.sleep(0.25)
        finally:
            running -= 1
        return None

    metrics = Metrics()
    sch = Schedule("slow", period, action, metrics)
    t0, wall0, t1 = await run_schedule(sch, 1.25)
    assert peak == 1
    assert len(starts) >= 3, starts
    # a 0.25 s run spans the next two ticks; the third after it starts the next run
    assert sch.skipped["overlap"] >= 2 * (len(starts) - 1), sch.describe()
    assert skipped_metric(metrics, "slow", "overlap") == sch.skipped["overlap"]
    for a, b in itertools.pairwise(starts):
        assert b - a >= 0.25
    assert_on_grid(offsets(starts, ticks_of(sch, wall0), t0, period))  # runs still start on ticks
    assert_ticks_accounted(sch, t0, t1)


async def test_schedule_counts_ticks_missed_by_a_blocked_loop_as_late() -> None:
    """The loop is blocked from about 0.11 s to 0.45 s (ticks 2 to 4 pass): the overdue
    tick runs once when the loop is back, the others are counted late, not run in a
    burst, and later runs are back on the grid."""
    loop = asyncio.get_running_loop()
    period = 0.1
    starts: list[float] = []
    unblocked: list[float] = []

    async def action() -> str | None:
        starts.append(loop.time())
        return None

    def block() -> None:
        time.sleep(0.34)
        unblocked.append(loop.time())

    metrics = Metrics()
    sch = Schedule("late", period, action, metrics)
    t0, wall0 = loop.time(), time.time()
    task = asyncio.create_task(sch.run())
    loop.call_at(t0 + 0.11, block)
    await asyncio.sleep(1.45)
    t1 = loop.time()
    await stop(task)

    assert unblocked, "the blocking callback did not run"
    back = unblocked[0]
    assert sch.skipped["late"] >= 2, sch.describe()
    assert sch.skipped["overlap"] == 0
    assert skipped_metric(metrics, "late", "late") == sch.skipped["late"]
    ticks = ticks_of(sch, wall0)
    assert all(b > a for a, b in itertools.pairwise(ticks)), ticks
    overdue = [s for s, k in zip(starts, ticks, strict=False) if s >= back and t0 + k * period < back]
    assert len(overdue) == 1, ([s - t0 for s in starts], ticks, back - t0)
    later = [(s, k) for s, k in zip(starts, ticks, strict=False) if t0 + k * period >= back]
    assert len(later) >= 6
    assert_on_grid([s - (t0 + k * period) for s, k in later])
    assert_ticks_accounted(sch, t0, t1)


async def test_schedule_outcomes_and_run_records() -> None:
    calls = 0
    last_success_seen: list[float | None] = []

    async def action() -> str | None:
        nonlocal calls
        calls += 1
        last_success_seen.append(sch.last_success)
        if calls == 1:
            raise ValueError("bad quote 42")
        if calls == 2:
            raise UnchangedError("nothing new")
        if calls == 3:
            raise NoMarketData("no snapshot in namespace 'x' yet")
        return f"note {calls}"

    metrics = Metrics()
    sch = Schedule("outcomes", 0.05, action, metrics)
    wall0 = time.time()
    task = asyncio.create_task(sch.run())

    async def four_finished() -> bool:
        return sum(r.finished is not None for r in sch.runs) >= 4

    await eventually(four_finished, "four finished runs", timeout=10)
    await stop(task)

    runs = list(sch.runs)
    got = [(r.outcome, r.message) for r in runs[:4]]
    assert got == [
        ("error", "ValueError: bad quote 42"),
        ("unchanged", "nothing new"),
        ("error", "no snapshot in namespace 'x' yet"),  # a typed error: its message alone
        ("success", "note 4"),
    ]
    assert last_success_seen[:4] == [None, None, None, None]  # only a success sets it
    assert sch.last_success is not None
    success_runs = [r for r in runs if r.outcome == "success"]
    assert success_runs[0].started <= sch.last_success
    last_finished = success_runs[-1].finished
    assert last_finished is not None and sch.last_success <= last_finished
    for r in runs[:4]:  # on the grid, and started at or after its tick
        k = round((r.scheduled - wall0) / 0.05)
        assert k >= 1 and r.scheduled == pytest.approx(wall0 + k * 0.05, abs=0.002)
        assert r.finished is not None and r.scheduled - 0.002 <= r.started <= r.finished

    finished = [r for r in runs if r.finished is not None]
    assert sch.counts == {o: sum(r.outcome == o for r in finished) for o in ("success", "unchanged", "error")}
    for outcome, n in sch.counts.items():
        value = metrics.registry.get_sample_value("spectralmc_job_runs_total", {"job": "outcomes", "outcome": outcome})
        assert value == n, (outcome, value, n)
    timed = metrics.registry.get_sample_value("spectralmc_job_duration_seconds_count", {"job": "outcomes"})
    assert timed == len(finished)

    described = sch.describe()
    assert described["name"] == "outcomes" and described["every_seconds"] == 0.05
    assert described["runs"] == sch.counts and described["skipped"] == {"overlap": 0, "late": 0}
    assert described["last_success"] == sch.last_success and described["running"] is False
    assert described["recent"][0] == {
        "scheduled": runs[0].scheduled,
        "started": runs[0].started,
        "finished": runs[0].finished,
        "outcome": "error",
        "message": "ValueError: bad quote 42",
    }


async def test_cancelling_the_schedule_cancels_an_inflight_run() -> None:
    started = asyncio.Event()
    seen: list[str] = []

    async def action() -> str | None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")
        return "never"

    metrics = Metrics()
    sch = Schedule("inflight", 0.05, action, metrics)
    task = asyncio.create_task(sch.run())
    await asyncio.wait_for(started.wait(), 5)
    assert sch.describe()["running"] is True
    await stop(task)  # returns promptly: the 30 s action does not hold it up
    assert seen == ["cancelled", "finally"]
    assert len(sch.runs) == 1
    record = sch.runs[0]
    assert record.outcome == "error" and record.message == "cancelled at shutdown"
    assert record.finished is not None
    assert sch.describe()["running"] is False and sch.last_success is None
    await asyncio.sleep(0.15)  # no tick after the cancel
    assert len(sch.runs) == 1


# -- implied_vol_surface -----------------------------------------------------------------


def test_implied_surface_reproduces_known_vols_strike_grid() -> None:
    body = base_body()
    surface = surface_of(body, grid_quotes(body, "strike"), "strike")
    assert surface.strike_kind == "strike"
    assert surface.expiries_years == EXPIRIES
    assert surface.strikes == STRIKES
    assert_vols(surface, VOLS)


def test_implied_surface_reproduces_known_vols_moneyness_grid() -> None:
    body = base_body()
    surface = surface_of(body, grid_quotes(body, "moneyness"), "moneyness")
    assert surface.strike_kind == "moneyness"
    assert surface.expiries_years == EXPIRIES
    assert surface.strikes == pytest.approx(MONEYNESS, abs=1e-15, rel=0)
    assert_vols(surface, VOLS)


def test_implied_surface_moneyness_quotes_at_m_times_forward() -> None:
    body = base_body()
    snap = MarketSnapshot.model_validate(body)
    forward = snap.forward_fn("SPX")
    assert forward is not None
    quotes = [
        quote(snap, t, m * forward(t), VOLS[i][j], mixed_right(i, j))
        for i, t in enumerate(EXPIRIES)
        for j, m in enumerate(MONEYNESS)
    ]
    surface = surface_of(body, quotes, "moneyness")
    assert surface.strikes == pytest.approx(MONEYNESS, rel=1e-12)
    assert_vols(surface, VOLS)


@pytest.mark.parametrize("itm_first", [True, False])
def test_implied_surface_uses_the_out_of_the_money_quote(itm_first: bool) -> None:
    """Both rights quoted in every cell, the in-the-money one at a different vol: the
    surface is the out-of-the-money one's, whatever the order."""
    body = base_body()
    snap = MarketSnapshot.model_validate(body)
    forward = snap.forward_fn("SPX")
    assert forward is not None
    quotes = []
    for i, t in enumerate(EXPIRIES):
        for j, k in enumerate(STRIKES):
            otm: Literal["call", "put"] = "call" if k >= forward(t) else "put"
            itm: Literal["call", "put"] = "put" if otm == "call" else "call"
            pair = [quote(snap, t, k, VOLS[i][j] + 0.05, itm), quote(snap, t, k, VOLS[i][j], otm)]
            quotes += pair if itm_first else pair[::-1]
    assert_vols(surface_of(body, quotes, "strike"), VOLS)


def test_implied_surface_outcome_does_not_depend_on_quote_order() -> None:
    body = base_body()
    snap = MarketSnapshot.model_validate(body)
    forward = snap.forward_fn("SPX")
    assert forward is not None
    discount = snap.yield_curves["USD"].discount(1.0)
    quotes = grid_quotes(body, "strike")
    # cell (T=1, K=120) is quoted by an OTM call; add an ITM put below its intrinsic value
    assert [q["right"] for q in quotes if q["expiry_years"] == 1.0 and q["strike"] == 120.0] == ["call"]
    bad_put = {"expiry_years": 1.0, "strike": 120.0, "right": "put", "price": 0.5 * (120.0 - forward(1.0)) * discount}
    outcomes = []
    for ordered in ([bad_put, *quotes], [*quotes, bad_put]):
        try:
            surface_of(body, ordered, "strike")
            outcomes.append("surface")
        except ValueError as exc:
            outcomes.append(f"ValueError: {exc}")
    assert outcomes[0] == outcomes[1], outcomes


def test_implied_surface_names_a_missing_grid_cell() -> None:
    body = base_body()
    quotes = [q for q in grid_quotes(body, "strike") if not (q["expiry_years"] == 1.0 and q["strike"] == 105.0)]
    with pytest.raises(ValueError, match=r"missing 1: T=1 K=105$"):
        surface_of(body, quotes, "strike")


@pytest.mark.parametrize(("right", "t", "k"), [("put", 1.0, 120.0), ("call", 0.25, 80.0)])
def test_implied_surface_names_a_quote_below_intrinsic(right: Literal["call", "put"], t: float, k: float) -> None:
    body = base_body()
    snap = MarketSnapshot.model_validate(body)
    forward = snap.forward_fn("SPX")
    assert forward is not None
    f = forward(t)
    intrinsic = max(f - k, 0.0) if right == "call" else max(k - f, 0.0)
    assert intrinsic > 1.0
    bad = {
        "expiry_years": t,
        "strike": k,
        "right": right,
        "price": 0.5 * intrinsic * snap.yield_curves["USD"].discount(t),
    }
    quotes = [q for q in grid_quotes(body, "strike") if not (q["expiry_years"] == t and q["strike"] == k)]
    with pytest.raises(ValueError, match=rf"^quote {right} K={k:g} T={t:g}: price .* no-arbitrage bounds"):
        surface_of(body, [*quotes, bad], "strike")


def test_implied_surface_needs_spot_and_discounting() -> None:
    body = base_body()
    quotes = grid_quotes(body, "strike")
    del body["spots"]
    with pytest.raises(ValueError, match="SPX needs a spot and a discounting curve"):
        surface_of(body, quotes, "strike")


# -- derive job through the app ----------------------------------------------------------


def dated_quotes_body() -> dict[str, Any]:
    """SPX spot, curves and option quotes (no surface) on EXPIRY_DATES x STRIKES."""
    body = base_body()
    expiries = [year_fraction(VDT_DATETIME, d) for d in EXPIRY_DATES]
    return {**body, "option_quotes": {"SPX": grid_quotes(body, "strike", expiries)}}


async def test_derive_job_end_to_end(make_client: MakeClient) -> None:
    client = await make_client(jobs=[{"kind": "derive", "name": "surf", "every_seconds": 0.2, "underlyings": ["SPX"]}])
    body = dated_quotes_body()
    put = await put_snapshot(client, body)
    assert put["lineage"] is None
    put_key = {k: put[k] for k in ("namespace", "val_datetime", "data_asof", "hash")}

    async def derived() -> dict[str, Any] | None:
        latest = await ok_json(client, "GET", "/v1/marketdata/default/latest")
        return latest if latest["data_asof"] != put["data_asof"] else None

    out: dict[str, Any] = await eventually(derived, "a derived snapshot")
    assert out["val_datetime"] == put["val_datetime"]
    assert datetime.fromisoformat(out["data_asof"]) > datetime.fromisoformat(put["data_asof"])
    assert out["hash"] != put["hash"]
    lineage = out["lineage"]
    assert lineage["job"] == "surf" and lineage["kind"] == "derive"
    assert lineage["derive"] == "implied_vol_surface" and lineage["underlyings"] == ["SPX"]
    assert lineage["inputs"] == [put_key]
    assert datetime.fromisoformat(lineage["produced_at"]) <= datetime.fromisoformat(out["data_asof"])
    data = out["data"]
    assert data["option_quotes"] == MarketSnapshot.model_validate(body).model_dump(mode="json")["option_quotes"]
    surface = VolSurface.model_validate(data["vol_surfaces"]["SPX"])
    assert surface.expiries_years == [year_fraction(VDT_DATETIME, d) for d in EXPIRY_DATES]
    assert surface.strikes == STRIKES
    assert_vols(surface, VOLS)

    # later runs find their own output: unchanged, and no snapshots pile up
    async def unchanged_runs() -> bool:
        runs: int = (await job_state(client, "surf"))["runs"]["unchanged"]
        return runs >= 4

    await eventually(unchanged_runs, "four unchanged runs")
    listing = await ok_json(client, "GET", "/v1/marketdata/default")
    assert listing["snapshots"] == [
        {"val_datetime": put["val_datetime"], "data_asof": put["data_asof"]},
        {"val_datetime": out["val_datetime"], "data_asof": out["data_asof"]},
    ]
    state = await job_state(client, "surf")
    assert state["every_seconds"] == 0.2 and state["runs"]["success"] == 1
    assert state["last_success"] is not None
    finished = [r for r in state["recent"] if r["outcome"] is not None]
    assert finished[-1]["outcome"] == "unchanged"
    assert "this job's own output" in finished[-1]["message"]
    assert [r["message"] for r in finished if r["outcome"] == "success"] == [
        f"stored {out['data_asof']} ({out['hash']})"
    ]

    # pricing by reference at the derived snapshot uses the derived vols
    derived_snap = MarketSnapshot.model_validate(data)
    curve = derived_snap.yield_curves["USD"]
    div = derived_snap.dividend_curves["SPX"]
    spot = derived_snap.spots["SPX"]
    cases = [("on-grid", 105.0, EXPIRY_DATES[1]), ("off-grid", 100.0, date(2027, 9, 17))]
    by_ref = {
        "val_datetime": VDT,
        "data_asof": out["data_asof"],
        "contracts": [
            {"id": cid, "right": "call", "strike": k, "underlying": "SPX", "expiry": d.isoformat()}
            for cid, k, d in cases
        ],
    }
    explicit_contracts = []
    for cid, k, d in cases:
        t = year_fraction(VDT_DATETIME, d)
        rate, dividend = curve.zero_rate(t), div.zero_rate(t)
        vol = surface.vol(k, t, spot * math.exp((rate - dividend) * t))
        explicit_contracts.append(
            {
                "id": cid,
                "right": "call",
                "strike": k,
                "spot": spot,
                "expiry_years": t,
                "rate": rate,
                "dividend": dividend,
                "vol": vol,
            }
        )
    assert explicit_contracts[0]["vol"] == pytest.approx(VOLS[1][2], abs=1e-8)  # a grid point
    got = await ok_json(client, "POST", "/v1/price", json=by_ref)
    assert got["market_data"] == {k: out[k] for k in ("namespace", "val_datetime", "data_asof", "hash")}
    want = await ok_json(client, "POST", "/v1/price", json={"contracts": explicit_contracts})
    assert got["results"] == want["results"]
    assert all(r["price"] > 0 for r in got["results"])


async def test_two_derive_jobs_on_one_namespace_settle(make_client: MakeClient) -> None:
    """One surface job per underlying (SPX, NDX) on the default namespace: once both have
    derived, nothing is new, so the store stops growing. At most 3 derived snapshots: both
    jobs may derive from the PUT at the same tick, then the one whose output is not the
    latest derives once more from the other's, and that holds everything."""
    jobs = [
        {"kind": "derive", "name": "spx-surf", "every_seconds": 0.2, "underlyings": ["SPX"]},
        {"kind": "derive", "name": "ndx-surf", "every_seconds": 0.2, "underlyings": ["NDX"]},
    ]
    client = await make_client(jobs=jobs)
    body = dated_quotes_body()
    body["spots"]["NDX"] = body["spots"]["SPX"]
    body["discounting"]["NDX"] = "USD"
    body["option_quotes"]["NDX"] = body["option_quotes"]["SPX"]
    await put_snapshot(client, body)

    async def both_ran() -> bool:
        states = [await job_state(client, n) for n in ("spx-surf", "ndx-surf")]
        return all(s["runs"]["success"] + s["runs"]["unchanged"] >= 5 for s in states)

    await eventually(both_ran, "five runs of each job")
    listing = await ok_json(client, "GET", "/v1/marketdata/default")
    assert len(listing["snapshots"]) <= 4, listing["snapshots"]


# -- price job through the app -----------------------------------------------------------


PRICE_JOB = {"kind": "price", "name": "book", "every_seconds": 0.2, "portfolio": "demo", "topic": "book"}


async def test_price_job_streams_to_its_topic_and_recovers(make_client: MakeClient) -> None:
    client = await make_client(jobs=[PRICE_JOB])

    async def failing() -> bool:
        runs: int = (await job_state(client, "book"))["runs"]["error"]
        return runs >= 2

    await eventually(failing, "two failed runs before any snapshot")
    state = await job_state(client, "book")
    assert state["runs"]["success"] == 0 and state["last_success"] is None
    errors = [r for r in state["recent"] if r["outcome"] == "error"]
    assert errors and all(r["message"] == "no snapshot in namespace 'default' yet" for r in errors)

    ws = await client.ws_connect("/v1/stream")
    try:
        await ws.send_json({"op": "subscribe", "id": "b", "topic": "book"})
        ack = await ws.receive_json(timeout=10)
        assert ack == {"type": "subscribed", "id": "b", "contracts": 0, "topic": "book"}
        put = await put_snapshot(client, snapshot(underlying="DEMO"))
        put_key = {k: put[k] for k in ("namespace", "val_datetime", "data_asof", "hash")}
        quotes: list[dict[str, Any]] = []
        while len(quotes) < 3:
            msg = await ws.receive_json(timeout=10)
            assert msg["type"] == "quote", msg
            quotes.append(msg)
    finally:
        await ws.close()

    seqs = [q["seq"] for q in quotes]
    assert all(b > a for a, b in itertools.pairwise(seqs)), seqs
    for q in quotes:
        assert q["id"] == "b" and q["reason"] == "job" and q["topic"] == "book" and q["job"] == "book"
        assert {r["id"] for r in q["results"]} == DEMO_IDS
        assert all(isinstance(r["price"], float) and r["price"] > 0 for r in q["results"])
        assert q["market_data"] == put_key
        assert q["val_datetime"] == put["val_datetime"] and q["data_asof"] == put["data_asof"]
        assert datetime.fromisoformat(q["priced_at"])
    assert quotes[0]["priced_at"] < quotes[-1]["priced_at"]

    state = await job_state(client, "book")
    assert state["runs"]["success"] >= 3 and state["last_success"] is not None
    assert state["skipped"]["overlap"] + state["skipped"]["late"] <= state["runs"]["success"]  # mostly on time
    successes = [r for r in state["recent"] if r["outcome"] == "success"]
    assert successes and successes[0]["message"] == "published to topic 'book' (1 subscriptions)"
    # a late subscriber gets the topic's last body at once
    ws2 = await client.ws_connect("/v1/stream")
    try:
        await ws2.send_json({"op": "subscribe", "id": "late", "topic": "book"})
        assert (await ws2.receive_json(timeout=10))["type"] == "subscribed"
        first = await ws2.receive_json(timeout=10)
        assert first["type"] == "quote" and first["reason"] in {"subscribe", "job"} and first["seq"] == 1
        assert {r["id"] for r in first["results"]} == DEMO_IDS
    finally:
        await ws2.close()


# -- metrics -----------------------------------------------------------------------------


async def test_job_metrics(make_client: MakeClient) -> None:
    client = await make_client(jobs=[PRICE_JOB])

    async def failed_once() -> bool:
        runs: int = (await job_state(client, "book"))["runs"]["error"]
        return runs >= 1

    await eventually(failed_once, "a failed run")
    text = await metrics_text(client)
    error_runs = sample(text, "spectralmc_job_runs_total", job="book", outcome="error")
    assert error_runs is not None and error_runs >= 1
    never = sample(text, "spectralmc_job_last_success_timestamp_seconds", job="book")
    assert never is not None and math.isnan(never)

    before = time.time()
    await put_snapshot(client, snapshot(underlying="DEMO"))

    async def succeeded() -> bool:
        runs: int = (await job_state(client, "book"))["runs"]["success"]
        return runs >= 1

    await eventually(succeeded, "a successful run")
    text = await metrics_text(client)
    after = time.time()
    success_runs = sample(text, "spectralmc_job_runs_total", job="book", outcome="success")
    assert success_runs is not None and success_runs >= 1
    timed = sample(text, "spectralmc_job_duration_seconds_count", job="book")
    assert timed is not None and timed >= success_runs + error_runs
    total = sample(text, "spectralmc_job_duration_seconds_sum", job="book")
    assert total is not None and total > 0
    lag = sample(text, "spectralmc_job_start_lag_seconds_count", job="book")
    assert lag is not None and lag >= timed
    last = sample(text, "spectralmc_job_last_success_timestamp_seconds", job="book")
    assert last is not None and before <= last <= after


# -- settings ----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("SPECTRALMC_")]:
        monkeypatch.delenv(name)


DERIVE = {"kind": "derive", "name": "d", "every_seconds": 1.0, "underlyings": ["SPX"]}


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([PRICE_JOB, {**DERIVE, "name": "book"}], r"job names must be unique; repeated: book"),
        ([{**PRICE_JOB, "portfolio": "nope"}], r"job 'book' prices portfolio 'nope', which is not in \[portfolios\]"),
        ([{**DERIVE, "kind": "train"}], r"does not match any of the expected tags: 'price', 'derive'"),
        ([{**DERIVE, "every_seconds": 0}], r"jobs\.0\.derive\.every_seconds\n  Input should be greater than 0"),
        ([{**PRICE_JOB, "every_seconds": -1.5}], r"jobs\.0\.price\.every_seconds\n  Input should be greater than 0"),
        ([{**DERIVE, "underlyings": []}], r"jobs\.0\.derive\.underlyings\n  List should have at least 1 item"),
    ],
    ids=["duplicate-name", "unknown-portfolio", "unknown-kind", "zero-period", "negative-period", "no-underlyings"],
)
def test_settings_refuse_bad_jobs(jobs: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.load(None, jobs=jobs)
    with pytest.raises(ValidationError, match=message):
        Settings(jobs=jobs)


@pytest.mark.usefixtures("clean_env")
def test_settings_accept_good_jobs() -> None:
    s = Settings.load(None, jobs=[PRICE_JOB, DERIVE])
    price, derive = s.jobs
    assert isinstance(price, PriceJob) and price.topic == "book" and price.namespace == "default"
    assert price.measures == ["price"]
    assert isinstance(derive, DeriveJob) and derive.strike_kind == "strike"
    assert derive.derive == "implied_vol_surface"


@pytest.mark.usefixtures("clean_env")
def test_jobs_example_config_loads() -> None:
    s = Settings.load(CONFIG)
    assert [(type(j).__name__, j.name) for j in s.jobs] == [("DeriveJob", "spx-surface"), ("PriceJob", "spx-book")]
    derive, price = s.jobs
    assert isinstance(derive, DeriveJob) and isinstance(price, PriceJob)
    assert derive.underlyings == ["SPX"] and derive.every_seconds == 60.0
    assert price.portfolio == "spx" and price.topic == "spx-book"
    assert price.measures == ["price", "delta", "gamma", "vega"]
    assert set(s.portfolios) == {"spx", "demo"}
    assert [c.id for c in s.portfolios["spx"]] == ["spx-4100-jun27", "spx-3800-jun27"]
    assert all(c.underlying == "SPX" and not c.is_explicit for c in s.portfolios["spx"])
    assert s.ui.portfolio in s.portfolios
