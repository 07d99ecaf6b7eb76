"""The live page at /ui in a real headless Chromium (Debian's ``chromium``, driven by
Playwright without a browser download): it shows the served models, a quote table
that updates when a new snapshot is PUT, and each model's certified error (a heat map
of the price error and the figures per measure, served and previous version)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from certificate_util import bundled_checkpoint, commit_certified, fake_certificate, serving
from marketdata_util import ASOF, VDT, snapshot
from playwright.async_api import async_playwright
from server_util import MakeClient, ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
PRICE_CELL = "#q-demo-call-1y td[data-measure='price']"


async def put(session: aiohttp.ClientSession, url: str, asof: str, body: dict[str, Any]) -> None:
    async with session.put(f"{url}/v1/marketdata/default/{VDT}/{asof}", json=body) as r:
        assert r.status == 201, await r.text()


async def test_page_shows_models_and_a_quote_that_updates(serve: Callable[..., ServerProcess]) -> None:
    server = serve(env={"SPECTRALMC_MODELS": '["gbm"]'})  # the certified bundled model
    assert CHROMIUM is not None
    async with aiohttp.ClientSession() as session:
        await put(session, server.url, ASOF, snapshot(spot=100.0, underlying="DEMO"))
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                await page.goto(f"{server.url}/ui")
                await page.wait_for_function(
                    "sel => (document.querySelector(sel)?.textContent ?? '') !== ''", arg=PRICE_CELL, timeout=20_000
                )
                first = float(await page.text_content(PRICE_CELL) or "nan")
                assert first > 0
                assert await page.text_content("#status") == "live"
                assert "16:00:05Z" in (await page.text_content("#market") or "")
                await page.wait_for_selector("#models tbody tr", timeout=10_000)
                models = await page.inner_text("#models tbody")
                assert "gbm" in models and "tracking" in models

                # a new snapshot with a higher spot: the call's price cell changes by itself
                await put(session, server.url, "2026-11-26T16:01:00Z", snapshot(spot=120.0, underlying="DEMO"))
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
                assert errors == []
            finally:
                await browser.close()


async def test_page_shows_the_certified_error_of_the_served_and_previous_version(make_client: MakeClient) -> None:
    """A heat map of the price error per cell of the model's two main dimensions, for
    the served version and the one before it, and the p95 and max per measure: the
    figures /v1/models gives, in bp, on axes named by the certificate's dims."""
    assert CHROMIUM is not None
    client = await make_client()
    ckpt = bundled_checkpoint("gbm")
    await commit_certified(client, "gbm", [fake_certificate(ckpt, 5), fake_certificate(ckpt, 6)])  # v2, v3
    await serving(client, "gbm", 3)
    r = await client.get("/v1/models")
    assert r.status == 200, await r.text()
    gbm = next(m for m in (await r.json())["models"] if m["name"] == "gbm")
    assert gbm["version"] == 3 and gbm["previous"]["version"] == 2, gbm
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            await page.goto(str(client.make_url("/ui")))
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
            assert errors == []
        finally:
            await browser.close()
