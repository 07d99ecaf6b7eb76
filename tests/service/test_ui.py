"""The live page at /ui in a real headless Chromium (Debian's ``chromium``, driven by
Playwright without a browser download): it shows the served models and a quote table
that updates when a new snapshot is PUT."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from marketdata_util import ASOF, VDT, snapshot
from playwright.async_api import async_playwright
from server_util import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
PRICE_CELL = "#q-demo-call-1y td[data-measure='price']"


async def put(session: aiohttp.ClientSession, url: str, asof: str, body: dict[str, Any]) -> None:
    async with session.put(f"{url}/v1/marketdata/default/{VDT}/{asof}", json=body) as r:
        assert r.status == 201, await r.text()


async def test_page_shows_models_and_a_quote_that_updates(serve: Callable[..., ServerProcess]) -> None:
    server = serve()
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
