"""The live page at /ui in a real headless Chromium (Debian's ``chromium``, driven by
Playwright without a browser download), against one ``spectralmc serve`` process for
the module (serving gbm, polling its store every 0.1 s). The tests move that server's
state forward in file order, one state of the page each:

1. no snapshot yet: a hint saying what to store, no error;
2. a snapshot without the portfolio's underlying: the error, styled as one;
3. a DEMO snapshot with option quotes: the implied-vol smile per expiry (the surface,
   the quotes and the gbm model's implied vols, each checked against the snapshot), the
   quote rows with their model, version and method, and a price that updates when the
   next snapshot is PUT;
4. the validation history: ``GET /v1/models/{name}/validation`` and its plot;
5. two more certified versions committed to the server's store: the certified error's
   heat maps of the served and previous version, and the history's new versions.

devtools/ui_screenshots.py takes the pictures of states 1 to 3 for the docs.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from certificate_util import bundled_checkpoint, fake_certificate
from marketdata_util import ASOF, VDT, snapshot
from playwright.async_api import Browser, ElementHandle, Page, async_playwright
from server_util import TOKEN, ServerProcess, start_server

from spectralmc_server.marketdata.black import black_forward
from spectralmc_server.marketdata.objects import MarketSnapshot, year_fraction
from spectralmc_server.models import bundled_models
from spectralmc_server.rfc3339 import parse_datetime
from spectralmc_server.store.objects import LocalObjectStore
from spectralmc_server.store.versions import VersionStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)"),
    pytest.mark.asyncio(loop_scope="module"),  # one browser for the module
]
PRICE_CELL = "#q-demo-call-1y td[data-measure='price']"
QUOTE_VOLS = {0.25: [0.31, 0.27, 0.25, 0.255], 1.0: [0.29, 0.26, 0.245, 0.25], 2.0: [0.28, 0.255, 0.245, 0.248]}
QUOTE_MONEYNESS = [0.85, 0.95, 1.05, 1.15]
ERROR_RED = "rgb(198, 40, 40)"  # the left border of .error


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "SPECTRALMC_TRAIN__ENABLED": "false",
        "SPECTRALMC_ADMIN_TOKEN": TOKEN,
        "SPECTRALMC_MODELS": '["gbm"]',  # the certified bundled model
        "SPECTRALMC_POLL_SECONDS": "0.1",
    }
    proc = start_server(tmp_path_factory.mktemp("ui"), env=env)
    yield proc
    proc.stop(signal.SIGKILL)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        await chromium.close()


@asynccontextmanager
async def browser_page(browser: Browser, url: str) -> AsyncIterator[tuple[Page, list[str]]]:
    """A fresh page (its own context) on ``url``, and the console errors, page errors
    and failed requests it has seen."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
        await page.goto(url)
        yield page, errors
    finally:
        await context.close()


async def put(session: aiohttp.ClientSession, url: str, asof: str, body: dict[str, Any]) -> None:
    async with session.put(f"{url}/v1/marketdata/default/{VDT}/{asof}", json=body) as r:
        assert r.status == 201, await r.text()


def with_quotes(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` (a DEMO snapshot) with out-of-the-money option quotes at the surface's
    expiries, priced by Black at QUOTE_VOLS with the snapshot's forward and discount."""
    snap = MarketSnapshot.model_validate(body)
    forward = snap.forward_fn("DEMO")
    assert forward is not None
    curve = snap.yield_curves["USD"]
    quotes = []
    for t, vols in QUOTE_VOLS.items():
        f = forward(t)
        for m, vol in zip(QUOTE_MONEYNESS, vols, strict=True):
            k = round(m * f, 2)
            price = curve.discount(t) * black_forward(f, k, vol * math.sqrt(t), k >= f)
            quotes.append({"expiry_years": t, "strike": k, "right": "call" if k >= f else "put", "price": price})
    return {**body, "option_quotes": {"DEMO": quotes}}


async def style(page: Page, selector: str, prop: str) -> str:
    value: str = await page.eval_on_selector(selector, f"e => getComputedStyle(e).{prop}")
    return value


async def series_points(panel: ElementHandle | None, name: str) -> list[tuple[float, float]]:
    """The (x, y) of each point of a chart's series, as the page plotted them: its
    markers, or the points of its line where it has none."""
    assert panel is not None
    points = await panel.query_selector_all(f"g.series[data-series='{name}'] .pt")
    if not points:
        line = await panel.query_selector(f"g.series[data-series='{name}'] path.line")
        return [] if line is None else [(x, y) for x, y in json.loads(await line.get_attribute("data-points") or "[]")]
    xs = [await p.get_attribute("data-x") for p in points]
    ys = [await p.get_attribute("data-y") for p in points]
    return [(float(x or ""), float(y or "")) for x, y in zip(xs, ys, strict=True)]


async def test_1_no_snapshot_shows_a_hint(server: ServerProcess, browser: Browser) -> None:
    async with browser_page(browser, f"{server.url}/ui") as (page, errors):
        await page.wait_for_selector("#hint:not([hidden])", timeout=20_000)
        hint = await page.inner_text("#hint")
        assert "No market data yet" in hint and "no snapshot" in hint, hint
        assert f"curl -X PUT {server.url}/v1/marketdata/default/" in hint, hint
        assert "DEMO" in hint and "config/examples/snapshot.json" in hint, hint
        assert await page.is_hidden("#error") and await page.is_hidden("#smile-error")
        assert await page.text_content("#smile-status") == "no snapshot yet"
        assert await page.text_content("#status") == "live"
        await page.wait_for_selector("#validation svg.chart", timeout=10_000)
        assert errors == []


async def test_2_a_snapshot_without_the_underlying_is_an_error(server: ServerProcess, browser: Browser) -> None:
    async with aiohttp.ClientSession() as session:
        await put(session, server.url, "2026-11-26T16:00:01Z", snapshot(underlying="SPX"))
    async with browser_page(browser, f"{server.url}/ui") as (page, errors):
        await page.wait_for_selector("#smile-error:not([hidden])", timeout=20_000)
        await page.wait_for_selector("#error:not([hidden])", timeout=20_000)
        text = await page.text_content("#error") or ""
        assert text.startswith("no_market_data: contracts[0]: no spot for DEMO"), text
        assert "DEMO: nothing to price" in (await page.text_content("#smile-error") or "")
        for box in ("#error", "#smile-error"):  # styled as an error: the class, a red border, "Error:"
            assert "error" in (await page.get_attribute(box, "class") or "").split(), box
            assert await style(page, box, "borderLeftColor") == ERROR_RED, box
            before = await page.eval_on_selector(box, "e => getComputedStyle(e, '::before').content")
            assert before == '"Error: "', before
        assert await page.is_hidden("#hint")
        assert await page.query_selector_all(".smile-panel") == []
        assert errors == []


async def test_3_smile_rows_and_a_quote_that_updates(server: ServerProcess, browser: Browser) -> None:
    body = with_quotes(snapshot(spot=100.0, underlying="DEMO"))
    snap = MarketSnapshot.model_validate(body)
    forward = snap.forward_fn("DEMO")
    assert forward is not None
    surface = snap.vol_surfaces["DEMO"]
    async with aiohttp.ClientSession() as session:
        await put(session, server.url, ASOF, body)
        async with browser_page(browser, f"{server.url}/ui") as (page, errors):
            await page.wait_for_selector(".smile-panel g[data-series='model-gbm'] .pt", timeout=20_000)
            await page.wait_for_function(
                "sel => (document.querySelector(sel)?.textContent ?? '') !== ''", arg=PRICE_CELL, timeout=20_000
            )
            assert await page.is_hidden("#hint") and await page.is_hidden("#error")

            # one panel per expiry of the surface (and the quotes), each with three series
            panels = await page.query_selector_all(".smile-panel")
            assert len(panels) == len(surface.expiries_years), len(panels)
            val_day = parse_datetime(VDT)
            for panel, t in zip(panels, surface.expiries_years, strict=True):
                assert float(await panel.get_attribute("data-expiry-years") or "nan") == t
                expiry = date.fromisoformat(await panel.get_attribute("data-expiry") or "")
                t_ref = year_fraction(val_day, expiry)  # the date a contract by reference names
                assert abs(t_ref - t) < 1 / 365
                names = [await g.get_attribute("data-series") for g in await panel.query_selector_all("g.series")]
                assert names == ["model-gbm", "surface", "quotes"], names
                # the quotes: each price inverted back to the vol it was made with
                shown = await series_points(panel, "quotes")
                made = [q for q in body["option_quotes"]["DEMO"] if q["expiry_years"] == t]
                assert [k for k, _ in shown] == [q["strike"] for q in made]
                assert [v for _, v in shown] == pytest.approx(QUOTE_VOLS[t], abs=1e-6)
                # the model: the gbm price of each strike by reference (at the surface's vol
                # there) inverted to its Black vol, within the learned model's error
                model = await series_points(panel, "model-gbm")
                assert len(model) >= 15, model
                for k, v in model:
                    assert abs(v - surface.vol(k, t_ref, forward(t_ref))) < 3e-3, (t, k, v)
            # the surface line as the server interpolates it (total variance in time, linear in strike)
            line = await panels[1].query_selector("g.series[data-series='surface'] path.line")
            assert line is not None
            legend = await page.inner_text("#smile-legend")
            assert "DEMO surface" in legend and "option quotes (snapshot, 12)" in legend and "gbm v1 (cvnn" in legend

            # each row: the model, version and method that answered it, as POST /v1/price says
            contracts = json.loads(await page.text_content("#config") or "{}")["contracts"]
            request = {"val_datetime": VDT, "measures": ["price"], "contracts": contracts}
            async with session.post(f"{server.url}/v1/price", json=request) as r:
                priced = await r.json()
            assert r.status == 200, priced
            for row in priced["results"]:
                cells = [await c.text_content() for c in await page.query_selector_all(f"#q-{row['id']} td")]
                version = priced["models"][row["model"]]["version"]
                assert cells[:4] == [row["id"], row["model"], str(version), row["method"]], cells
                assert cells[3] == "cvnn" and cells[2] == "1"
            first = float(await page.text_content(PRICE_CELL) or "nan")
            assert first == pytest.approx(priced["results"][0]["price"], abs=1e-4)

            # a new snapshot with a higher spot: the call's price cell and the smile follow
            await put(session, server.url, "2026-11-26T16:01:00Z", with_quotes(snapshot(spot=120.0, underlying="DEMO")))
            await page.wait_for_function(
                "([sel, old]) => { const t = document.querySelector(sel)?.textContent ?? '';"
                " return t !== '' && t !== old; }",
                arg=[PRICE_CELL, f"{first:.4f}"],
                timeout=20_000,
            )
            second = float(await page.text_content(PRICE_CELL) or "nan")
            assert second > first + 10  # a 1y call worth ~20 more spot is worth much more
            assert "16:01:00Z" in (await page.text_content("#market") or "")
            assert await page.text_content("#reason") == "snapshot"
            await page.wait_for_function(
                "() => (document.getElementById('smile-status').textContent || '').includes('16:01:00Z')",
                timeout=20_000,
            )
            strikes = [k for k, _ in await series_points((await page.query_selector_all(".smile-panel"))[0], "quotes")]
            assert min(strikes) > 100  # the quotes moved with the spot
            assert errors == []


async def test_4_validation_history_route_and_plot(server: ServerProcess, browser: Browser) -> None:
    manifest = json.loads((bundled_models()["gbm"] / "manifest.json").read_text())
    history = manifest["metrics"]["history"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/v1/models/gbm/validation") as r:
            got = await r.json()
        assert r.status == 200, got
        assert got["model"] == "gbm" and got["served"] == 1 and got["reason"] is None
        [v1] = got["versions"]
        last = manifest["metrics"]["validation"]
        assert v1["version"] == 1 and v1["served"] is True and v1["unqualified"] is False
        assert (v1["step"], v1["p95_bp"], v1["max_bp"]) == (last["step"], last["p95_bp"], last["max_bp"])
        assert [h["step"] for h in got["history"]] == [h["step"] for h in history]
        assert [h["p95_bp"] for h in got["history"]] == [h["p95_bp"] for h in history]
        assert all(isinstance(h["elapsed_seconds"], float) for h in got["history"])
        async with session.get(f"{server.url}/v1/models/nope/validation") as r:
            missing = await r.json()
        assert r.status == 404 and missing["error"]["code"] == "not_found", missing

    async with browser_page(browser, f"{server.url}/ui") as (page, errors):
        await page.wait_for_selector("#val-gbm svg.chart", timeout=20_000)
        caption = await page.text_content("#val-gbm figcaption")
        assert caption == "gbm: version 1 served, 1 committed", caption
        for name in ("p50", "p95", "max"):
            count = await page.get_attribute(f"#val-gbm g.series[data-series='{name}']", "data-count")
            assert count == str(len(history)), (name, count)
        p95 = await series_points(await page.query_selector("#val-gbm"), "p95")
        assert [x for x, _ in p95] == [h["step"] for h in history]
        assert [y for _, y in p95] == pytest.approx([h["p95_bp"] for h in history])
        diamond = "#val-gbm g.series[data-series='versions'] .pt"
        assert len(await page.query_selector_all(diamond)) == 1
        assert await page.get_attribute(diamond, "fill") == "#111"  # the served version: filled
        assert await style(page, diamond, "fill") == "rgb(17, 17, 17)"
        assert errors == []


async def test_5_certified_error_of_the_served_and_previous_version(server: ServerProcess, browser: Browser) -> None:
    """A heat map of the price error per cell of the model's two main dimensions, for
    the served version and the one before it, and the p95 and max per measure: the
    figures /v1/models gives, in bp, on axes named by the certificate's dims. The two
    versions are committed to the server's store from here, as another replica would."""
    store = VersionStore(LocalObjectStore(Path(server_data(server)) / "store"), "gbm")
    ckpt = bundled_checkpoint("gbm")
    for seed in (5, 6):  # versions 2 and 3
        await store.commit(replace(ckpt, certificate=fake_certificate(ckpt, seed)), "a test version")
    async with browser_page(browser, f"{server.url}/ui") as (page, errors):
        # the tracker swaps to version 3 within its poll; the stream's "model" quote redraws the page
        await page.wait_for_function(
            "() => document.querySelector('#val-gbm figcaption')?.textContent === 'gbm: version 3 served, 3 committed'",
            timeout=20_000,
        )
        async with aiohttp.ClientSession() as session, session.get(f"{server.url}/v1/models") as r:
            gbm = next(m for m in (await r.json())["models"] if m["name"] == "gbm")
        assert gbm["version"] == 3 and gbm["previous"]["version"] == 2, gbm
        await page.wait_for_selector("#cert-gbm table.heatmap.previous td.hm-cell", timeout=20_000)
        for which, view in (("served", gbm), ("previous", gbm["previous"])):
            heat = view["heatmap"]
            table = f"#cert-gbm table.heatmap.{which}"
            cells = await page.query_selector_all(f"{table} td.hm-cell")
            assert len(cells) == sum(len(row) for row in heat["p95"]), which
            head = await page.inner_text(f"{table} thead")
            assert heat["dims"][0] in head and heat["dims"][1] in head, head
            rows = await page.query_selector_all(f"{table} tbody th.row")
            cols = await page.query_selector_all(f"{table} thead th.col")
            assert (len(rows), len(cols)) == (len(heat["edges"][0]) - 1, len(heat["edges"][1]) - 1)
            for i, row in enumerate(heat["p95"]):
                for j, p95 in enumerate(row):
                    cell = f"{table} td[data-i='{i}'][data-j='{j}']"
                    text = await page.text_content(cell) or ""
                    if p95 is None:  # a cell with no held-out points
                        assert "hm-empty" in (await page.get_attribute(cell, "class") or ""), (which, i, j)
                        continue
                    assert float(text) == pytest.approx(p95 * 1e4, rel=5e-3), (which, i, j, text)
                    title = await page.get_attribute(cell, "title") or ""
                    worst = float(title.rpartition("max ")[2].split()[0])
                    assert worst == pytest.approx(heat["max"][i][j] * 1e4, rel=5e-3), (which, title)
        # p95 and max per measure, served beside previous
        for m, figures in gbm["certificate"]["measures"].items():
            row = f"#cert-gbm table.measures tr[data-measure='{m}']"
            before = gbm["previous"]["certificate"]["measures"][m]
            for cls, value in (
                ("served-p95", figures["p95"]),
                ("served-max", figures["max"]),
                ("previous-p95", before["p95"]),
                ("previous-max", before["max"]),
            ):
                shown = float(await page.text_content(f"{row} td.{cls}") or "nan")
                assert shown == pytest.approx(value * 1e4, rel=5e-3), (m, cls)
        # the validation history's three versions, the served one filled
        diamonds = await page.query_selector_all("#val-gbm [data-series='versions'] .pt")
        fills = [await d.get_attribute("fill") for d in diamonds]
        assert fills == ["#fff", "#fff", "#111"], fills
        assert errors == []


def server_data(server: ServerProcess) -> str:
    """The data directory the server process was started with (``--data-dir``)."""
    args = server.proc.args
    assert isinstance(args, list)
    return str(args[args.index("--data-dir") + 1])
