"""Screenshots of the live page at /ui, one per state, for the README and docs:

- ``docs/img/ui.png``: a snapshot with a DEMO vol surface and option quotes, and a Heston
  fit to it stored by ``POST /v1/calibrate``: the smile plot (surface, quotes, the gbm
  and heston models' implied vols), the quote rows with model, version and method, and
  the served models' validation history;
- ``docs/img/ui_no_snapshot.png``: a fresh server with no snapshot: the hint saying what
  to store;
- ``docs/img/ui_error.png``: a snapshot without the portfolio's underlying: the error.

``python -m devtools.ui_screenshots [OUT_DIR]`` (from the repository root, in the
project's virtual environment; needs Debian's ``chromium``) starts ``spectralmc serve``
on a free loopback port with a fresh data directory, drives the page in headless
Chromium through Playwright, and stops the server. Everything is made here: the market
data is synthetic (a smooth smile with a skew, and quotes scattered around it), so the
pictures are the same from run to run up to the learned models' versions.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image
from playwright.async_api import FloatRect, Page, async_playwright

from spectralmc_server.marketdata.black import black_forward
from spectralmc_server.marketdata.objects import MarketSnapshot

ROOT = Path(__file__).resolve().parent.parent
VDT = "2026-11-26T16:00:00Z"
NS = "default"
WIDTH = 1180
MONEYNESS = [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
EXPIRIES = [0.25, 0.5, 1.0, 2.0]
QUOTE_MONEYNESS = [0.75, 0.8125, 0.875, 0.9375, 1.0, 1.0625, 1.125, 1.1875, 1.25]
RATE, DIVIDEND, SPOT = 0.035, 0.01, 100.0


def smile_vol(m: float, t: float) -> float:
    """The synthetic market's Black vol at moneyness m = K / F(t): a skew that flattens
    with the expiry and a little curvature (free of calendar and butterfly arbitrage
    on the grid, which the snapshot's own check confirms)."""
    k = math.log(m)
    return 0.2 + 0.01 * math.sqrt(t) - 0.12 * k / math.sqrt(math.sqrt(t)) + 0.25 * k * k / math.sqrt(t)


def demo_snapshot() -> dict[str, Any]:
    """DEMO: spot, flat curves, the smile on a moneyness grid and quotes around it."""
    quotes = []
    for i, t in enumerate(EXPIRIES):
        forward, discount = SPOT * math.exp((RATE - DIVIDEND) * t), math.exp(-RATE * t)
        for j, m in enumerate(QUOTE_MONEYNESS):
            noise = 0.004 * math.sin(7.0 * i + 3.1 * j)  # a quoted market is never smooth
            strike = round(m * forward, 2)
            vol = smile_vol(strike / forward, t) + noise
            call = strike >= forward
            price = discount * black_forward(forward, strike, vol * math.sqrt(t), call)
            quotes.append({"expiry_years": t, "strike": strike, "right": "call" if call else "put", "price": price})
    curve = {"pillars": [{"years": 1.0, "zero_rate": RATE}]}
    body = {
        "spots": {"DEMO": SPOT},
        "yield_curves": {"USD": curve},
        "discounting": {"DEMO": "USD"},
        "dividend_curves": {"DEMO": {"pillars": [{"years": 1.0, "zero_rate": DIVIDEND}]}},
        "vol_surfaces": {
            "DEMO": {
                "strike_kind": "moneyness",
                "expiries_years": EXPIRIES,
                "strikes": MONEYNESS,
                "vols": [[round(smile_vol(m, t), 6) for m in MONEYNESS] for t in EXPIRIES],
            }
        },
        "option_quotes": {"DEMO": quotes},
    }
    found = MarketSnapshot.model_validate(body).arbitrage()
    if found:
        raise AssertionError(f"the synthetic surface has arbitrage: {found}")
    return body


def other_snapshot() -> dict[str, Any]:
    """A snapshot of another underlying only: the portfolio (on DEMO) cannot be priced."""
    return {
        "spots": {"SPX": 4000.0},
        "yield_curves": {"USD": {"pillars": [{"years": 1.0, "zero_rate": RATE}]}},
        "discounting": {"SPX": "USD"},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``spectralmc serve`` serving gbm and heston, returned once /readyz answers 200."""
    port = free_port()
    env = {
        **os.environ,
        "SPECTRALMC_MODELS": '["gbm", "heston"]',
        "SPECTRALMC_TRAIN__ENABLED": "false",
        "SPECTRALMC_MARKETDATA__POLL_SECONDS": "0.2",
    }
    cmd = [sys.executable, "-m", "spectralmc_server.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready within 120 s:\n{log.read_text()}")


async def call(session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.request(method, url, json=body) as r:
        answer: dict[str, Any] = await r.json()
        if r.status >= 300:
            raise RuntimeError(f"{method} {url}: {r.status} {answer}")
        return answer


async def shoot(page: Page, path: Path, down_to: str) -> None:
    """The page from its top down to the bottom of ``down_to``, as a PNG."""
    box = await page.locator(down_to).bounding_box()
    assert box is not None, down_to
    clip = FloatRect(x=0, y=0, width=WIDTH, height=box["y"] + box["height"] + 16)
    png = await page.screenshot(clip=clip, full_page=True)
    # a 128-colour palette keeps the text sharp at a third of the size (docs ship these)
    Image.open(io.BytesIO(png)).quantize(colors=128).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KiB")


async def capture(url: str, out: Path, chromium: str) -> None:
    async with aiohttp.ClientSession() as session, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": WIDTH, "height": 900})
            await page.goto(f"{url}/ui")
            await page.wait_for_selector("#hint:not([hidden])", timeout=30_000)
            await page.wait_for_selector("#validation svg.chart", timeout=30_000)
            await shoot(page, out / "ui_no_snapshot.png", "#smile-status")

            await call(session, "PUT", f"{url}/v1/marketdata/{NS}/{VDT}/2026-11-26T16:00:01Z", other_snapshot())
            await page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            await page.wait_for_selector("#smile-error:not([hidden])", timeout=30_000)
            await shoot(page, out / "ui_error.png", "#smile-error")

            await call(session, "PUT", f"{url}/v1/marketdata/{NS}/{VDT}/2026-11-26T16:00:05Z", demo_snapshot())
            fit = {"namespace": NS, "val_datetime": VDT, "underlying": "DEMO", "process": "heston", "store": True}
            await call(session, "POST", f"{url}/v1/calibrate", fit)
            await page.wait_for_selector(".smile-panel g[data-series='model-heston'] .pt", timeout=60_000)
            await page.wait_for_selector("#q-demo-call-1y td[data-measure='price']:not(:empty)", timeout=30_000)
            await page.wait_for_timeout(1000)  # the price cells' flash fades
            await shoot(page, out / "ui.png", "#validation")
        finally:
            await browser.close()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="spectralmc-ui-") as tmp:
        proc, url = start_server(Path(tmp) / "data", Path(tmp) / "serve.log")
        try:
            asyncio.run(capture(url, out, chromium))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
