"""Abuse probe: the scenarios of the security and robustness probe ("no request can hurt
the others, and no valid input gets a wrong number"), rerun against a real
``spectralmc serve --role serve`` process on a free loopback port with a temporary data
directory, admin and market-data tokens set, and a 2 s header read timeout.

Scenarios (docs/api.md has the behaviour each one checks):

 1. distribution measures out of the models' domains (Heston and Merton, 5 years,
    ``stdev``) next to a client sending small /v1/price requests;
 2. far strikes: Black-Scholes far out of the money, and a K/F sweep 0.01..100 per
    process (no negative price, ``method`` reference outside K/F [0.7, 1.3], prices
    against Black-Scholes, Lewis's integral for Heston and Merton's Poisson series)
    while small requests are timed;
 3. extreme inputs (422 naming the field) and valid calls at the bounds (finite, no
    null; gamma and vega not negative; prices against the closed forms);
 4. gzip bombs to /v1/price while /healthz latency is measured;
 5. a flood of concurrent ``POST /v1/calibrate`` (store false) on a large surface while
    /v1/price latency is measured;
 6. many WebSocket subscriptions: a first quote each, and a quote each again after a
    model pin through the admin API (the store holds gbm versions 1 and 2; the pin
    rolls back to 1);
 7. overload: 1,000-contract requests at high concurrency (200, or 503 with Retry-After);
 8. market data after a crashed writer: refs/latest rewound on disk, then the PUT retried;
 9. coercion: booleans and strings as numbers, Unix times in market-data paths, no
    Content-Type;
10. edges: bearer scheme case, realms, unknown topic, a too-long URL, trickled headers,
    and the server's RSS around a round of clients that never read (reported).

Prints a table (scenario, check, expected, measured, HELD / FAILED / INFO) and exits 1
when a check failed. Every scenario runs (``--fail-fast`` stops at the first failure).

    python bench/abuse.py --record      # full sizes, ~4 minutes on 2 cores
    python bench/abuse.py --quick       # small sizes, under a minute
    python bench/abuse.py --only 4,10   # some scenarios
"""

from __future__ import annotations

import argparse
import asyncio
import cmath
import json
import math
import os
import secrets
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMG, output_args, publish, save_figure, table
from server_load import body as book_body
from server_load import rss_bytes, serve_only

MIB = 2**20
VDT = "2026-11-26T16:00:00Z"
SMALL = {"id": "s", "right": "call", "strike": 101.0, "spot": 100.0, "expiry_years": 0.5, "vol": 0.22}
HESTON = {"v0": 0.04, "kappa": 1.5, "theta": 0.04, "xi": 0.5, "rho": -0.7}
MERTON = {"sigma": 0.2, "lambda": 0.5, "mu_j": -0.1, "sigma_j": 0.1}


@dataclass(frozen=True)
class Sizes:
    """What each scenario does, full or --quick."""

    distribution_requests: int  # per process (scenario 1)
    sweep_points: int  # K/F points per right and process (2)
    bomb_kib: tuple[int, ...]  # compressed sizes of the gzip bombs (4)
    bomb_repeats: int
    surface: tuple[int, int]  # expiries x strikes of the calibration surface (5)
    calibrations: int
    subscriptions: int  # WebSocket subscriptions (6) ...
    connections: int  # ... over this many connections
    overload_requests: int  # 1,000-contract requests (7) ...
    overload_concurrency: int  # ... this many at once
    tricklers: int  # connections trickling headers (10)
    slow_clients: int  # non-reading connections in the RSS round (10)
    slow_contracts: int
    slow_hold: float
    budget: float  # seconds per scenario at most
    edge_measures: tuple[str, ...] = ("price", "delta", "gamma", "vega")  # valid inputs at the bounds (3)


ALL_MEASURES = ("price", "delta", "gamma", "vega", "theta", "rho", "digital", "mean", "stdev")
FULL = Sizes(10, 81, (1024, 4096), 3, (40, 60), 12, 5000, 50, 768, 256, 32, 8, 5000, 10.0, 300.0, ALL_MEASURES)
QUICK = Sizes(2, 9, (64, 256), 1, (16, 24), 12, 200, 4, 32, 16, 4, 2, 1000, 1.0, 30.0)


@dataclass
class Check:
    scenario: str
    check: str
    expected: str
    measured: str
    ok: bool | None  # None: a figure reported, not judged

    @property
    def verdict(self) -> str:
        return "INFO" if self.ok is None else "HELD" if self.ok else "FAILED"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    seconds: float
    raw: bytes = b""


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(x: float) -> str:
    return f"{x * 1e3:.0f} ms"


def norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def black_scholes(
    right: str, spot: float, strike: float, t: float, vol: float, r: float = 0.0, q: float = 0.0
) -> float:
    s = vol * math.sqrt(t)
    fwd = spot * math.exp((r - q) * t)
    d1 = (math.log(fwd / strike) + 0.5 * s * s) / s
    d2 = d1 - s
    df = math.exp(-r * t)
    if right == "call":
        return df * (fwd * norm_cdf(d1) - strike * norm_cdf(d2))
    return df * (strike * norm_cdf(-d2) - fwd * norm_cdf(-d1))


def heston_moment(w: float, t: float, p: dict[str, float], steps: int = 4000) -> float:
    """E[(S_T / F)^w] under Heston: exp(A + B v0) with the Riccati equations
    B' = (w^2 - w) / 2 - (kappa - rho xi w) B + xi^2 B^2 / 2, A' = kappa theta B (RK4)."""
    k, th, xi, rho = p["kappa"], p["theta"], p["xi"], p["rho"]

    def f(b: float) -> tuple[float, float]:
        return k * th * b, 0.5 * (w * w - w) - (k - rho * xi * w) * b + 0.5 * xi * xi * b * b

    h = t / steps
    a = b = 0.0
    for _ in range(steps):
        a1, b1 = f(b)
        a2, b2 = f(b + h / 2 * b1)
        a3, b3 = f(b + h / 2 * b2)
        a4, b4 = f(b + h * b3)
        a += h / 6 * (a1 + 2 * a2 + 2 * a3 + a4)
        b += h / 6 * (b1 + 2 * b2 + 2 * b3 + b4)
    return math.exp(a + b * p["v0"])


def heston_stdev(spot: float, t: float, p: dict[str, float]) -> float:
    return spot * math.sqrt(heston_moment(2.0, t, p) - 1.0)


def black(right: str, fwd: float, strike: float, total_vol: float, df: float) -> float:
    """Black's formula on a forward, total vol sigma sqrt(T), discount factor df."""
    d1 = (math.log(fwd / strike) + 0.5 * total_vol * total_vol) / total_vol
    d2 = d1 - total_vol
    if right == "call":
        return df * (fwd * norm_cdf(d1) - strike * norm_cdf(d2))
    return df * (strike * norm_cdf(-d2) - fwd * norm_cdf(-d1))


def merton_price(right: str, spot: float, strike: float, t: float, p: dict[str, float], r: float, q: float) -> float:
    """Merton (1976) as a Poisson mixture of Black prices: given n jumps, ln S_T is normal
    with variance sigma^2 T + n sigma_j^2 around the forward F_n = F e^{-lambda k T} E[e^J]^n
    (summed in logs: F_n and the weights over- and underflow apart); the put by parity."""
    lam_t, mu, sj = p["lambda"] * t, p["mu_j"], p["sigma_j"]
    k = math.exp(mu + 0.5 * sj * sj) - 1.0
    fwd = spot * math.exp((r - q) * t)
    df = math.exp(-r * t)
    call = 0.0
    if lam_t == 0:
        call = black("call", fwd, strike, p["sigma"] * math.sqrt(t), df)
    else:
        heavy = lam_t * max(1.0, 1.0 + k)  # the Poisson rate under the share measure
        for n in range(int(heavy + 12 * math.sqrt(heavy) + 40)):
            log_w = -lam_t + n * math.log(lam_t) - math.lgamma(n + 1)
            log_f = math.log(fwd) - lam_t * k + n * (mu + 0.5 * sj * sj)
            v = math.sqrt(p["sigma"] ** 2 * t + n * sj * sj)
            d1 = (log_f - math.log(strike) + 0.5 * v * v) / v
            call += math.exp(log_w + log_f) * norm_cdf(d1) - math.exp(log_w) * strike * norm_cdf(d1 - v)
        call *= df
    return call if right == "call" else call - df * (fwd - strike)


def heston_price(right: str, spot: float, strike: float, t: float, p: dict[str, float], r: float, q: float) -> float:
    """Heston by Lewis's formula, C = D (F - sqrt(F K) / pi int_0^inf Re[e^{iuk} phi(u - i/2)]
    / (u^2 + 1/4) du), k = ln(F/K), phi the CF of ln(S_T/F) (the "little trap" form),
    composite Simpson on [0, 400]; the put by parity."""
    v0, kappa, theta, xi, rho = p["v0"], p["kappa"], p["theta"], p["xi"], p["rho"]
    fwd = spot * math.exp((r - q) * t)
    df = math.exp(-r * t)
    x = math.log(fwd / strike)

    def phi(u: complex) -> complex:
        b = kappa - rho * xi * 1j * u
        d = cmath.sqrt(b * b + xi * xi * (1j * u + u * u))
        g = (b - d) / (b + d)
        e = cmath.exp(-d * t)
        c = kappa * theta / xi**2 * ((b - d) * t - 2 * cmath.log((1 - g * e) / (1 - g)))
        return cmath.exp(c + (b - d) / xi**2 * (1 - e) / (1 - g * e) * v0)

    def f(u: float) -> float:
        return (cmath.exp(1j * u * x) * phi(u - 0.5j)).real / (u * u + 0.25)

    n, top = 8000, 400.0
    h = top / n
    integral = f(0.0) + f(top) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    call = df * (fwd - math.sqrt(fwd * strike) / math.pi * integral * h / 3)
    return call if right == "call" else call - df * (fwd - strike)


def merton_stdev(spot: float, t: float, p: dict[str, float]) -> float:
    """S_T = F exp(sigma W - sigma^2 T / 2 + sum J - lambda k T): E[(S_T/F)^2] =
    exp(sigma^2 T + lambda T E[(e^J - 1)^2])."""
    mu, sj = p["mu_j"], p["sigma_j"]
    jump2 = math.exp(2 * mu + 2 * sj * sj) - 2 * math.exp(mu + sj * sj / 2) + 1
    return spot * math.sqrt(math.exp(p["sigma"] ** 2 * t + p["lambda"] * t * jump2) - 1.0)


# Learned prices against an independent price, as a share of P = D max(F, K): the
# margins tests/engine/test_bounds_sweep.py allows the bundled models.
LEARNED_RTOL = {"gbm": 1e-3, "heston": 1.5e-2, "merton": 3e-3}


def bounds(process: str) -> dict[str, tuple[float, float]]:
    """The parameter bounds the server enforces (each process's ``param_bounds``)."""
    from spectralmc_server.engine.processes import get_process

    return dict(get_process(process).param_bounds)


def edge_contracts(base: dict[str, Any]) -> list[dict[str, Any]]:
    """Valid calls at the bounds: each process's parameters at their extremes together,
    expiries chosen so the spread stays within 4; spot, strike, rate and dividend at theirs."""
    h, m, g = bounds("heston"), bounds("merton"), bounds("gbm")
    lo = {k: v[0] for k, v in h.items()}
    hi = {k: v[1] for k, v in h.items()}
    return [
        base | {"vol": g["vol"][0], "expiry_years": 1e-5},
        base | {"vol": g["vol"][1], "expiry_years": 0.6},
        base | {"vol": 0.3, "spot": 1e9, "strike": 1e9},
        base | {"vol": 0.3, "spot": 1e-6, "strike": 1e-6},
        base | {"vol": 0.3, "rate": -1.0, "dividend": 1.0, "strike": 100.0 * math.exp(-2.0)},
        base | {"vol": 0.3, "rate": 1.0, "dividend": -1.0, "strike": 100.0 * math.exp(2.0)},
        base | {"process": "heston", "params": hi | {"kappa": lo["kappa"], "rho": lo["rho"]}},
        base | {"process": "heston", "params": lo | {"kappa": hi["kappa"], "rho": hi["rho"]}},
        # sigma at its minimum with the most jumps (lambda T = 20: no jump-free spike)
        base
        | {
            "process": "merton",
            "expiry_years": 1.0,
            "params": {"sigma": m["sigma"][0], "lambda": m["lambda"][1], "mu_j": -0.1, "sigma_j": 0.1},
        },
        base | {"process": "merton", "expiry_years": 0.05, "params": {k: v[1] for k, v in m.items()}},
        base | {"process": "asian", "fixings": 64, "vol": g["vol"][1], "expiry_years": 0.5},
        base | {"process": "asian", "fixings": 1, "vol": g["vol"][0], "expiry_years": 1e-5},
    ]


def spread(c: dict[str, Any]) -> float:
    """s, about the stdev of log(S_T / F): vol sqrt(T); Heston sqrt(int_0^T E[v_t] dt);
    Merton sqrt((sigma^2 + lambda (mu_j^2 + sigma_j^2)) T)."""
    t, p = c["expiry_years"], c.get("params", {})
    if c.get("process") == "heston":
        k = p["kappa"]
        return math.sqrt(p["theta"] * t + (p["v0"] - p["theta"]) * (1 - math.exp(-k * t)) / k)
    if c.get("process") == "merton":
        return math.sqrt((p["sigma"] ** 2 + p["lambda"] * (p["mu_j"] ** 2 + p["sigma_j"] ** 2)) * t)
    return float(c["vol"]) * math.sqrt(t)


def bad_numbers(results: Any) -> int:
    """Nulls and non-finite numbers in the rows of a /v1/price answer."""

    def count(x: Any) -> int:
        if x is None:
            return 1
        if isinstance(x, float):
            return 0 if math.isfinite(x) else 1
        if isinstance(x, dict):
            return sum(count(v) for v in x.values())
        if isinstance(x, list):
            return sum(count(v) for v in x)
        return 0

    return sum(count(row) for row in results) if isinstance(results, list) else 1


def gzip_bomb(kib: int) -> tuple[bytes, int]:
    """A gzip body of about ``kib`` KiB that inflates to zeros ~1,000 times its size:
    full-flushed deflate blocks of 16 MiB of zeros, each compressing to the same bytes,
    repeated; the trailer holds the true CRC and length. Returns (body, inflated bytes)."""
    chunk = bytes(16 * MIB)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    n = max(1, kib * 1024 // len(block))
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    size = n * len(chunk)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    tail = comp.flush() + crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
    return head + block * n + tail, size


def calibration_surface(n_exp: int, n_k: int) -> dict[str, Any]:
    expiries = [round(0.1 + i * 2.4 / (n_exp - 1), 5) for i in range(n_exp)]
    strikes = [round(0.7 + j * 0.6 / (n_k - 1), 5) for j in range(n_k)]
    vols = [[round(0.2 - 0.1 * (k - 1) + 0.15 * (k - 1) ** 2 / math.sqrt(t), 6) for k in strikes] for t in expiries]
    return {
        "spots": {"BIG": 100.0},
        "yield_curves": {"USD": {"pillars": [{"years": 1.0, "zero_rate": 0.03}]}},
        "discounting": {"BIG": "USD"},
        "vol_surfaces": {
            "BIG": {"strike_kind": "moneyness", "expiries_years": expiries, "strikes": strikes, "vols": vols}
        },
    }


def small_snapshot(spot: float) -> dict[str, Any]:
    return {
        "spots": {"X": spot},
        "yield_curves": {"USD": {"pillars": [{"years": 1.0, "zero_rate": 0.03}]}},
        "discounting": {"X": "USD"},
    }


async def seed_gbm_twice(data_dir: Path) -> None:
    """Put the bundled gbm model in the server's store as versions 1 and 2 (the same
    content), so that a pin to 1 is a real swap."""
    from spectralmc_server.engine.checkpoint import read_dir
    from spectralmc_server.models import bundled_models
    from spectralmc_server.store.uri import open_store
    from spectralmc_server.store.versions import VersionStore

    objects = await open_store((data_dir / "store").resolve().as_uri())
    try:
        store = VersionStore(objects, "gbm")
        ckpt = await asyncio.to_thread(read_dir, bundled_models()["gbm"])
        await store.commit(ckpt, "seeded from the bundled model", only_version=1)
        await store.commit(ckpt, "abuse probe: a second version to pin back from", only_version=2)
    finally:
        await objects.close()


@contextmanager
def serve(workdir: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """``spectralmc serve --role serve`` (no training) on a free loopback port, its data
    directory ``workdir/data``: (url, pid); stopped with SIGTERM (then killed) on exit."""
    with serve_only(workdir, env, "warning", "serve.log") as answer:
        yield answer


class Probe:
    def __init__(self, url: str, pid: int, data_dir: Path, sizes: Sizes, tokens: dict[str, str]) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.pid = pid
        self.data_dir = data_dir
        self.sizes = sizes
        self.admin = tokens["admin"]
        self.md = tokens["marketdata"]
        self.checks: list[Check] = []
        self.scanned = 0  # /v1/price 200 answers whose rows were scanned for null / non-finite
        self.bad = 0
        self.figures: dict[str, tuple[float, float]] = {}  # plot: name -> (measured, limit)
        self.rss: dict[str, float] = {}
        self.refusal = ""  # the first answer other than 200 the background clients got
        self.session: aiohttp.ClientSession

    # -- plumbing --------------------------------------------------------------------------
    def add(self, scenario: str, check: str, expected: str, measured: str, ok: bool | None) -> None:
        self.checks.append(Check(scenario, check, expected, measured, ok))

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> Answer:
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        t0 = time.perf_counter()
        async with self.session.request(
            method, self.url + path, data=data, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            raw = await r.read()
            seconds = time.perf_counter() - t0
            parsed: Any = None
            if r.content_type == "application/json":
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
            answer = Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, parsed, seconds, raw)
        if path == "/v1/price" and answer.status == 200 and isinstance(parsed, dict):
            self.scanned += 1
            self.bad += bad_numbers(parsed.get("results"))
        return answer

    async def price(
        self, contracts: list[dict[str, Any]], measures: list[str] | None = None, deadline: float | None = None
    ) -> Answer:
        """POST /v1/price; ``deadline``: its X-Request-Timeout (default: the server's)."""
        body: dict[str, Any] = {"contracts": contracts}
        if measures is not None:
            body["measures"] = measures
        headers = {} if deadline is None else {"X-Request-Timeout": f"{deadline:g}"}
        return await self.request("POST", "/v1/price", body, headers=headers, timeout=(deadline or 10.0) + 30.0)

    async def raw(
        self, data: bytes, timeout: float = 10.0, trickle: bytes = b"", every: float = 0.0
    ) -> tuple[bytes, float]:
        """Send ``data`` on a fresh connection (then ``trickle`` one byte every ``every`` s
        until the server answers or closes); the bytes read until it closes, and when."""
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        out = b""
        try:
            writer.write(data)
            await writer.drain()
            end = t0 + timeout
            i = 0
            while time.perf_counter() < end:
                wait = every if trickle else end - time.perf_counter()
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), max(0.01, wait))
                except TimeoutError:
                    if trickle:
                        try:
                            writer.write(trickle[i % len(trickle) : i % len(trickle) + 1])
                            await writer.drain()
                        except ConnectionError:
                            break
                        i += 1
                    continue
                except ConnectionError:
                    break
                if not chunk:
                    break
                out += chunk
                if not trickle and _complete(out):
                    break
        finally:
            writer.close()
        return out, time.perf_counter() - t0

    async def background(
        self, make: Callable[[], Awaitable[Answer]], stop: asyncio.Event, concurrency: int, limit: int = 100_000
    ) -> tuple[list[float], dict[int, int]]:
        """``concurrency`` clients calling ``make`` until ``stop`` (``limit`` calls at most):
        the latencies of the calls and a count per status."""
        lat: list[float] = []
        statuses: dict[int, int] = {}

        async def client() -> None:
            while not stop.is_set() and len(lat) < limit:
                pause = 0.005
                try:
                    a = await make()
                    lat.append(a.seconds)
                    statuses[a.status] = statuses.get(a.status, 0) + 1
                    if a.status != 200 and not self.refusal:
                        err = a.body.get("error", {}) if isinstance(a.body, dict) else {}
                        self.refusal = f"{a.status} {str(err.get('message', ''))[:110]}"
                    if a.status == 503:  # as a client would: wait as told (1 s at most here)
                        pause = min(1.0, float(a.headers.get("retry-after", "1") or 1))
                except (aiohttp.ClientError, TimeoutError):
                    statuses[-1] = statuses.get(-1, 0) + 1
                    lat.append(math.inf)
                await asyncio.sleep(pause)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return lat, statuses

    async def while_measuring(
        self, make: Callable[[], Awaitable[Answer]], work: Awaitable[Any], concurrency: int
    ) -> tuple[Any, list[float], dict[int, int]]:
        stop = asyncio.Event()
        self.refusal = ""
        bg = asyncio.create_task(self.background(make, stop, concurrency))
        await asyncio.sleep(0.2)
        try:
            result = await work
        finally:
            await asyncio.sleep(0.2)
            stop.set()
        lat, statuses = await bg
        return result, lat, statuses

    def small_price(self) -> Awaitable[Answer]:
        return self.price([SMALL])

    def healthz(self) -> Awaitable[Answer]:
        return self.request("GET", "/healthz", timeout=10.0)

    def md_put(self, ns: str, asof: str, snap: dict[str, Any], auth: str | None = "Bearer") -> Awaitable[Answer]:
        headers = {} if auth is None else {"Authorization": f"{auth} {self.md}"}
        return self.request("PUT", f"/v1/marketdata/{ns}/{VDT}/{asof}", snap, headers=headers)

    # -- 1 ---------------------------------------------------------------------------------
    async def distribution(self) -> None:
        sc = "1 distribution measures"
        n = self.sizes.distribution_requests
        cases: list[tuple[str, dict[str, float], Callable[[float, float, dict[str, float]], float]]] = []
        for i in range(n):
            h = dict(HESTON, v0=round(0.03 + 0.002 * i, 6), xi=round(0.4 + 0.02 * i, 6))
            m = dict(MERTON)
            m["sigma"], m["lambda"] = round(0.18 + 0.005 * i, 6), round(0.4 + 0.05 * i, 6)
            cases += [("heston", h, heston_stdev), ("merton", m, merton_stdev)]

        async def work() -> list[tuple[str, Answer, float]]:
            out = []
            for process, params, truth in cases:
                c = {"id": "d", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 5.0}
                c |= {"process": process, "params": params}
                out.append((process, await self.price([c], ["stdev"]), truth(100.0, 5.0, params)))
            return out

        answers, lat, statuses = await self.while_measuring(self.small_price, work(), 4)
        for process in ("heston", "merton"):
            mine = [(a, t) for p, a, t in answers if p == process]
            ok200 = sum(a.status == 200 for a, _ in mine)
            errs = []
            for a, t in mine:
                if a.status == 200:
                    v = a.body["results"][0].get("stdev")
                    errs.append(abs(v - t) / t if isinstance(v, float) and math.isfinite(v) else math.inf)
            worst = max(a.seconds for a, _ in mine)
            self.add(
                sc,
                f"{process} T=5 stdev: 200, finite, answered quickly",
                "200, finite, <= 2 s each",
                f"{ok200}/{len(mine)} 200, slowest {ms(worst)}",
                ok200 == len(mine) and worst <= 2.0 and all(math.isfinite(e) for e in errs),
            )
            self.add(
                sc,
                f"{process} T=5 stdev against its closed-form moment",
                "rel. error <= 1e-3",
                f"max {max(errs, default=math.inf):.1e}",
                bool(errs) and max(errs) <= 1e-3,
            )
        p99 = pct(lat, 0.99)
        self.figures["1: concurrent /v1/price p99"] = (p99, 1.0)
        self.add(
            sc,
            "concurrent small /v1/price p99",
            "< 1 s, all 200",
            f"{ms(p99)} over {len(lat)} requests, statuses {statuses}" + (f"; {self.refusal}" if self.refusal else ""),
            p99 < 1.0 and set(statuses) == {200},
        )

    # -- 2 ---------------------------------------------------------------------------------
    async def far_strikes(self) -> None:
        sc = "2 far strikes"
        a = await self.price(
            [{"id": "a", "right": "call", "strike": 300.0, "spot": 100.0, "expiry_years": 1.0, "vol": 0.2}]
        )
        bs = black_scholes("call", 100.0, 300.0, 1.0, 0.2)
        v = a.body["results"][0]["price"] if a.status == 200 else math.nan
        self.add(
            sc,
            "GBM vol 0.2, T 1, K/S 3 call: >= 0 and = Black-Scholes",
            f">= 0, BS {bs:.4e} (rel 1e-6)",
            f"{a.status}: {v:.4e}",
            a.status == 200 and v >= 0 and abs(v - bs) <= 1e-6 * bs + 1e-12,
        )
        b = await self.price(
            [{"id": "b", "right": "call", "strike": 1000.0, "spot": 100.0, "expiry_years": 3.0, "vol": 1.0}]
        )
        bs = black_scholes("call", 100.0, 1000.0, 3.0, 1.0)
        row = b.body["results"][0] if b.status == 200 else {}
        v = float(row.get("price", math.nan))
        self.add(
            sc,
            "GBM vol 1, T 3, K/S 10 call on spot 100 = Black-Scholes",
            f"BS {bs:.4f} (rel 1e-6), reference",
            f"{b.status}: {v:.4f}, {row.get('method')}",
            b.status == 200 and abs(v - bs) <= 1e-6 * bs and row.get("method") == "reference",
        )
        n = self.sizes.sweep_points
        kfs = [10 ** (-2 + 4 * i / (n - 1)) for i in range(n)]
        kfs = [k for k in kfs if abs(k - 0.7) > 1e-6 and abs(k - 1.3) > 1e-6]
        r, q, t, s0 = 0.02, 0.01, 1.0, 100.0
        fixings = 12
        heston = {"v0": 0.04, "kappa": 2.0, "theta": 0.04, "xi": 0.5, "rho": -0.6}
        merton = {"sigma": 0.2, "lambda": 0.3, "mu_j": -0.1, "sigma_j": 0.1}
        # process: its contract terms and an independent price (none for the asian)
        processes: dict[str, tuple[dict[str, Any], Callable[[str, float], float] | None]] = {
            "gbm": ({"vol": 0.25}, lambda right, k: black_scholes(right, s0, k, t, 0.25, r, q)),
            "heston": (
                {"process": "heston", "params": heston},
                lambda right, k: heston_price(right, s0, k, t, heston, r, q),
            ),
            "merton": (
                {"process": "merton", "params": merton},
                lambda right, k: merton_price(right, s0, k, t, merton, r, q),
            ),
            "asian": ({"process": "asian", "vol": 0.25, "fixings": fixings}, None),
        }

        async def sweep(process: str, terms: dict[str, Any]) -> tuple[str, list[dict[str, Any]], float, Answer]:
            fwd = s0 * math.exp((r - q) * t)
            if process == "asian":
                fwd = s0 * sum(math.exp((r - q) * i * t / fixings) for i in range(1, fixings + 1)) / fixings
            contracts = [
                {"id": f"{right}{i}", "right": right, "strike": kf * fwd, "spot": s0, "expiry_years": t}
                | {"rate": r, "dividend": q}
                | terms
                for right in ("call", "put")
                for i, kf in enumerate(kfs)
            ]
            return process, contracts, fwd, await self.price(contracts, deadline=60.0)

        during: dict[str, tuple[float, int, dict[int, int]]] = {}  # process -> concurrent p99, count, statuses
        refusals: list[str] = []
        for process, (terms, truth) in processes.items():
            answer, lat, statuses = await self.while_measuring(self.small_price, sweep(process, terms), 2)
            during[process] = (pct(lat, 0.99), len(lat), statuses)
            refusals += [f"{process}: {self.refusal}"] if self.refusal else []
            self.check_sweep(sc, *answer, truth=truth)
        worst = max(p for p, _, _ in during.values())
        self.figures["2: /v1/price p99 during sweeps"] = (worst, 1.0)
        self.add(
            sc,
            "concurrent small /v1/price p99 during each sweep",
            "< 1 s, all 200",
            ", ".join(f"{k} {ms(p)} ({n}, {st})" for k, (p, n, st) in during.items())
            + "".join(f"; first refusal {r}" for r in refusals[:1]),
            worst < 1.0 and all(set(st) == {200} for _, _, st in during.values()),
        )

    def check_sweep(
        self,
        sc: str,
        process: str,
        contracts: list[dict[str, Any]],
        fwd: float,
        ans: Answer,
        *,
        truth: Callable[[str, float], float] | None,
    ) -> None:
        """The checks on one process's K/F sweep."""
        if ans.status != 200:
            self.add(sc, f"K/F sweep {process}: answered", "200", f"{ans.status} {ans.raw[:200]!r}", False)
            return
        rows = ans.body["results"]
        kf_of = {c["id"]: c["strike"] / fwd for c in contracts}
        prices = [float(x.get("price", math.nan)) for x in rows]
        negative = sum(not (p >= 0) for p in prices)
        outside = [x for x in rows if not 0.7 <= kf_of[x["id"]] <= 1.3]
        learned_outside = sum(x.get("method") != "reference" for x in outside)
        inside_cvnn = sum(x.get("method") == "cvnn" for x in rows if 0.7 <= kf_of[x["id"]] <= 1.3)
        self.add(
            sc,
            f"K/F 0.01..100 sweep, {process} ({len(rows)} contracts): no negative price",
            "0 negative",
            f"{negative} (min {min(prices):.2e}); answered in {ans.seconds:.1f} s",
            negative == 0,
        )
        self.add(
            sc,
            f"K/F sweep, {process}: method outside K/F [0.7, 1.3]",
            "reference",
            f"{learned_outside} of {len(outside)} not reference; {inside_cvnn} cvnn inside",
            learned_outside == 0,
        )
        if truth is None:
            return
        errs: dict[str, list[float]] = {"reference": [0.0], "cvnn": [0.0]}
        for x, c in zip(rows, contracts, strict=True):
            scale = math.exp(-c["rate"] * c["expiry_years"]) * max(fwd, c["strike"])  # P = D max(F, K)
            errs.setdefault(x["method"], [0.0]).append(abs(float(x["price"]) - truth(c["right"], c["strike"])) / scale)
        ref, net = max(errs["reference"]), max(errs["cvnn"])
        name = {"gbm": "Black-Scholes", "heston": "Lewis integral"}.get(process, "Poisson series")
        self.add(
            sc,
            f"K/F sweep, {process}: against {name}",
            f"reference <= 1e-6 P, cvnn <= {LEARNED_RTOL[process]:g} P (P = D max(F, K))",
            f"reference {ref:.1e} P, cvnn {net:.1e} P",
            ref <= 1e-6 and net <= LEARNED_RTOL[process],
        )

    # -- 3 ---------------------------------------------------------------------------------
    async def extreme(self) -> None:
        sc = "3 extreme inputs"
        base: dict[str, Any] = {"id": "x", "right": "call", "strike": 100.0, "spot": 100.0, "expiry_years": 1.0}
        cases: list[tuple[str, dict[str, Any], str]] = [
            (
                "heston v0 = 1e300",
                base | {"process": "heston", "params": dict(HESTON, v0=1e300)},
                "contracts[0].params.v0",
            ),
            (
                "asian vol 1e-12, T 1e-9",
                base | {"process": "asian", "fixings": 4, "vol": 1e-12, "expiry_years": 1e-9},
                "",
            ),
            ("gbm spot 1e-300, strike 1e300", base | {"vol": 0.2, "spot": 1e-300, "strike": 1e300}, ""),
            (
                # a jump-free spike (sigma sqrt(T) = 0.003 against a spread of 2.8) the
                # reference cannot resolve: it answered 62.84 against the series' 62.75
                "merton sigma 0.01, lambda 20, mu_j -2, sigma_j 0, T 0.1",
                base
                | {
                    "process": "merton",
                    "expiry_years": 0.1,
                    "params": {"sigma": 0.01, "lambda": 20.0, "mu_j": -2.0, "sigma_j": 0.0},
                },
                "contracts[0].params.sigma",
            ),
        ]
        for name, c, must in cases:
            a = await self.price([c])
            fields = [d.get("field") for d in (a.body or {}).get("error", {}).get("details", [])] if a.body else []
            ok = a.status == 422 and (not must or must in fields)
            self.add(
                sc, name, "422" + (f" naming {must}" if must else ""), f"{a.status} {', '.join(map(str, fields))}", ok
            )
        for literal in ("NaN", "Infinity", "-Infinity"):
            data = json.dumps({"contracts": [base | {"vol": 0.2}]}).replace("0.2}", literal + "}").encode()
            a = await self.request("POST", "/v1/price", data=data, headers={"Content-Type": "application/json"})
            code = (a.body or {}).get("error", {}).get("code") if isinstance(a.body, dict) else None
            self.add(
                sc,
                f"vol: {literal} (a JSON extension)",
                "400 or 422 JSON",
                f"{a.status} {code}",
                a.status in (400, 422) and code is not None,
            )
        edges = [dict(c, id=f"e{i}") for i, c in enumerate(edge_contracts(base))]
        # stdev, skew and kurtosis are served up to a spread of 1 (gbm beyond it by closed
        # forms, others refused: docs/api.md): asked separately, of the contracts they fit
        moments = [m for m in self.sizes.edge_measures if m in ("stdev", "skew", "kurtosis")]
        measures = [m for m in self.sizes.edge_measures if m not in moments]
        if moments:
            fits = [c for c in edges if c.get("process", "gbm") == "gbm" or spread(c) <= 1.0]
            wide = [c for c in edges if c not in fits]
            before = self.bad
            m = await self.price(fits, moments, deadline=60.0)
            self.add(
                sc,
                f"{len(fits)} of them with a spread <= 1 (or gbm): {', '.join(moments)}",
                "200, no null, finite",
                f"{m.status} in {m.seconds:.1f} s, {self.bad - before} null/non-finite"
                + ("" if m.status == 200 else f" {m.raw[:160]!r}"),
                m.status == 200 and self.bad == before,
            )
            refused = [await self.price([c], moments) for c in wide]
            self.add(
                sc,
                f"the other {len(wide)} (spread > 1): {', '.join(moments)}",
                "422 naming contracts[0] each",
                ", ".join(str(x.status) for x in refused) or "none",
                all(x.status == 422 for x in refused),
            )
        before = self.bad
        a = await self.price(edges, list(measures), deadline=60.0)
        self.add(
            sc,
            f"{len(edges)} valid contracts at the bounds, {len(measures)} measures",
            "200, no null, finite",
            f"{a.status} in {a.seconds:.1f} s, {self.bad - before} null/non-finite"
            + ("" if a.status == 200 else f" {a.raw[:160]!r}"),
            a.status == 200 and self.bad == before,
        )
        if a.status != 200:
            return
        # Tolerances on the scales tests/engine/test_bounds_sweep.py uses: a price against
        # P = D max(F, K), gamma against e^{-qT} / (S s), vega against S e^{-qT} sqrt(T).
        concave, falling, delta_out, off = [], [], [], []
        for c, row in zip(edges, a.body["results"], strict=True):
            process, s0, t = c.get("process", "gbm"), c["spot"], c["expiry_years"]
            r, q = c.get("rate", 0.0), c.get("dividend", 0.0)
            growth = math.exp(-q * t)
            label = f"{c['id']} {process}"
            if row["gamma"] < -5e-3 * growth / (s0 * spread(c)):  # a call is convex in the spot
                concave.append(f"{label} gamma {row['gamma']:.3g}")
            if process != "heston" and row["vega"] < -1e-4 * s0 * growth * math.sqrt(t):  # and rises with the vol
                falling.append(f"{label} vega {row['vega']:.3g}")
            if process != "asian" and not -1e-4 * growth <= row["delta"] <= growth * (1 + 1e-4):
                delta_out.append(f"{label} delta {row['delta']:.3g}")
            truth = (
                black_scholes("call", s0, c["strike"], t, c["vol"], r, q)
                if process == "gbm"
                else merton_price("call", s0, c["strike"], t, c["params"], r, q)
                if process == "merton"
                else None
            )
            if truth is not None:
                scale = math.exp(-r * t) * max(s0 * math.exp((r - q) * t), c["strike"])
                err = abs(row["price"] - truth) / scale
                if err > (1e-6 if row["method"] == "reference" else LEARNED_RTOL[process]):
                    off.append(f"{label} ({row['method']}) {row['price']:.6g} vs {truth:.6g}: {err:.1e} P")
        self.add(
            sc,
            "calls at the bounds: gamma >= 0 (convex in spot)",
            "none below -5e-3 e^-qT / (S s)",
            "; ".join(concave) or "none",
            not concave,
        )
        self.add(
            sc,
            "calls at the bounds: vega >= 0 (gbm, merton, asian)",
            "none below -1e-4 S e^-qT sqrt(T)",
            "; ".join(falling) or "none",
            not falling,
        )
        self.add(
            sc, "calls at the bounds: 0 <= delta <= e^-qT", "all (1e-4)", "; ".join(delta_out) or "all", not delta_out
        )
        self.add(
            sc,
            "gbm and merton at the bounds: price against Black-Scholes / Poisson series",
            "reference <= 1e-6 P, cvnn <= 1e-3 (gbm) / 3e-3 (merton) P",
            "; ".join(off) or "all within",
            not off,
        )

    # -- 4 ---------------------------------------------------------------------------------
    async def gzip_bombs(self) -> None:
        sc = "4 gzip bomb"
        rss0 = rss_bytes(self.pid)

        async def send() -> list[tuple[int, int, Answer]]:
            out = []
            for kib in self.sizes.bomb_kib:
                data, inflated = await asyncio.to_thread(gzip_bomb, kib)
                for _ in range(self.sizes.bomb_repeats):
                    a = await self.request(
                        "POST",
                        "/v1/price",
                        data=data,
                        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                    )
                    out.append((len(data), inflated, a))
            return out

        answers, lat, statuses = await self.while_measuring(self.healthz, send(), 1)
        for sent, inflated, _ in answers[:: self.sizes.bomb_repeats]:
            mine = [x for s, _, x in answers if s == sent]
            codes = {
                (x.status, (x.body or {}).get("error", {}).get("code") if isinstance(x.body, dict) else None)
                for x in mine
            }
            self.add(
                sc,
                f"{sent / MIB:.2f} MiB gzip of zeros ({inflated / 2**30:.2f} GiB inflated) x{len(mine)}",
                "413 too_large JSON",
                f"{sorted(codes)}, slowest {ms(max(x.seconds for x in mine))}",
                codes == {(413, "too_large")},
            )
        worst = max(lat, default=math.inf)
        self.figures["4: /healthz max"] = (worst, 0.5)
        self.add(
            sc,
            "/healthz latency during the bombs",
            "max < 0.5 s, all 200",
            f"max {ms(worst)} over {len(lat)} probes, statuses {statuses}"
            + (f"; {self.refusal}" if self.refusal else ""),
            worst < 0.5 and set(statuses) == {200},
        )
        self.add(
            sc, "server RSS growth over the bombs", "reported", f"{(rss_bytes(self.pid) - rss0) / MIB:+.0f} MiB", None
        )

    # -- 5 ---------------------------------------------------------------------------------
    async def calibration_flood(self) -> None:
        sc = "5 calibration flood"
        n_exp, n_k = self.sizes.surface
        put = await self.md_put("abuse-cal", "2026-11-26T16:00:05Z", calibration_surface(n_exp, n_k))
        if put.status not in (200, 201):
            self.add(sc, "PUT the surface snapshot", "201", f"{put.status} {put.raw[:200]!r}", False)
            return
        body = {
            "namespace": "abuse-cal",
            "val_datetime": VDT,
            "underlying": "BIG",
            "process": "heston",
            "store": False,
            "allow_arbitrage": True,
        }

        async def flood() -> list[Answer]:
            return list(
                await asyncio.gather(
                    *(
                        self.request("POST", "/v1/calibrate", body, timeout=120.0)
                        for _ in range(self.sizes.calibrations)
                    )
                )
            )

        answers, lat, statuses = await self.while_measuring(self.small_price, flood(), 4)
        fitted = [a for a in answers if a.status == 200]
        refused = [a for a in answers if a.status == 503 and "retry-after" in a.headers]
        other = [a.status for a in answers if a not in fitted and a not in refused]
        quotes = fitted[0].body["fit"]["quotes"] if fitted else 0
        why = sorted({str((a.body or {}).get("error", {}).get("message", ""))[:90] for a in refused})
        self.add(
            sc,
            f"{len(answers)} concurrent fits (store false) of {n_exp * n_k} nodes",
            "each 200 or 503 + Retry-After, >= 1 fitted",
            f"{len(fitted)} fitted ({quotes} quotes, slowest {ms(max((a.seconds for a in fitted), default=0))}), "
            f"{len(refused)} 503 + Retry-After ({'; '.join(why)}), other {other}",
            not other and len(fitted) >= 1,
        )
        p99 = pct(lat, 0.99)
        self.figures["5: /v1/price p99 during fits"] = (p99, 1.0)
        self.add(
            sc,
            "/v1/price p99 during the flood",
            "< 1 s, all 200",
            f"{ms(p99)} over {len(lat)} requests, statuses {statuses}" + (f"; {self.refusal}" if self.refusal else ""),
            p99 < 1.0 and set(statuses) == {200},
        )

    # -- 6 ---------------------------------------------------------------------------------
    async def subscriptions(self) -> None:
        sc = "6 stream subscriptions"
        n, conns = self.sizes.subscriptions, self.sizes.connections
        per = math.ceil(n / conns)
        quotes: dict[str, list[str]] = {}  # subscription id -> reasons of its quotes, in order
        errors: dict[str, int] = {}
        bad_rows = 0
        sockets: list[aiohttp.ClientWebSocketResponse] = []

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            nonlocal bad_rows
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                if m.get("type") == "quote":
                    quotes.setdefault(m["id"], []).append(m["reason"])
                    bad_rows += bad_numbers(m.get("results"))
                elif m.get("type") == "error":
                    code = str(m.get("code"))
                    errors[code] = errors.get(code, 0) + 1

        readers = []
        t0 = time.perf_counter()
        try:
            for c in range(conns):
                ws = await self.session.ws_connect(self.url.replace("http", "ws") + "/v1/stream", heartbeat=None)
                sockets.append(ws)
                readers.append(asyncio.create_task(read(ws)))
                for j in range(per):
                    i = c * per + j
                    if i >= n:
                        break
                    contract = {
                        "id": f"k{i}",
                        "right": "call" if i % 2 else "put",
                        "strike": 80.0 + (i % 401) * 0.1,
                        "spot": 100.0,
                        "expiry_years": 0.1 + (i % 97) / 40.0,
                        "rate": 0.02,
                        "vol": 0.1 + (i % 89) / 120.0,
                    }
                    await ws.send_json({"op": "subscribe", "id": f"s{i}", "contracts": [contract]})
            budget = self.sizes.budget / 3

            async def until(check: Callable[[], bool]) -> bool:
                end = time.perf_counter() + budget
                while time.perf_counter() < end:
                    if check():
                        return True
                    await asyncio.sleep(0.05)
                return check()

            await until(lambda: len(quotes) >= n)
            first = time.perf_counter() - t0
            got = len(quotes)
            errs0 = dict(errors)
            self.figures["6: all first quotes"] = (first, budget)
            self.add(
                sc,
                f"{n} subscriptions over {conns} connections: a first quote each",
                "all, no error",
                f"{got}/{n} in {first:.1f} s, errors {errs0 or 'none'}",
                got == n and not errs0,
            )
            pin = await self.request(
                "POST",
                "/v1/admin/models/gbm/pin",
                {"version": 1, "by": "abuse probe"},
                headers={"Authorization": f"Bearer {self.admin}"},
            )
            serving = (pin.body or {}).get("serving", {}).get("version") if isinstance(pin.body, dict) else None
            self.add(
                sc,
                "POST /v1/admin/models/gbm/pin version 1 (head is 2)",
                "200, serving version 1",
                f"{pin.status}, serving {serving}",
                pin.status == 200 and serving == 1,
            )
            t1 = time.perf_counter()
            await until(lambda: sum("model" in r for r in quotes.values()) >= n)
            again = sum("model" in r for r in quotes.values())
            more = {k: v - errs0.get(k, 0) for k, v in errors.items() if v != errs0.get(k, 0)}
            self.add(
                sc,
                "after the pin: a quote each again (reason model)",
                "all, no error",
                f"{again}/{n} in {time.perf_counter() - t1:.1f} s, errors {more or 'none'}",
                again == n and not more,
            )
            self.add(sc, "quote rows: null or non-finite numbers", "0", str(bad_rows), bad_rows == 0)
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
            for task in readers:
                task.cancel()

    # -- 7 ---------------------------------------------------------------------------------
    async def overload(self) -> None:
        sc = "7 overload mix"
        data = book_body(1000)
        total, conc = self.sizes.overload_requests, self.sizes.overload_concurrency
        sem = asyncio.Semaphore(conc)
        answers: list[Answer] = []
        failures: list[str] = []

        async def one() -> None:
            async with sem:
                try:
                    answers.append(
                        await self.request(
                            "POST", "/v1/price", data=data, headers={"Content-Type": "application/json"}, timeout=90.0
                        )
                    )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failures.append(type(exc).__name__)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        wall = time.perf_counter() - t0
        by: dict[str, int] = {}
        for a in answers:
            key = f"{a.status}" + ("+RA" if a.status != 200 and "retry-after" in a.headers else "")
            by[key] = by.get(key, 0) + 1
        good = sum(a.status == 200 or (a.status == 503 and "retry-after" in a.headers) for a in answers)
        bare504 = sum(a.status == 504 and "retry-after" not in a.headers for a in answers)
        lat = [a.seconds for a in answers if a.status == 200]
        self.add(
            sc,
            f"{total} requests of 1,000 contracts at concurrency {conc}",
            "each 200 or 503 + Retry-After; no 504 without Retry-After",
            f"{by} in {wall:.1f} s; 200 p99 {ms(pct(lat, 0.99))}; client errors {failures or 'none'}",
            good == total and bare504 == 0 and not failures,
        )

    # -- 8 ---------------------------------------------------------------------------------
    async def latest_after_crash(self) -> None:
        sc = "8 market-data latest"
        ns = "abuse-md"
        a, b = "2026-11-26T16:00:05Z", "2026-11-26T16:00:10Z"
        p1 = await self.md_put(ns, a, small_snapshot(100.0))
        ref = self.data_dir / "store" / "marketdata" / ns / "refs" / "latest"
        behind = ref.read_bytes()
        p2 = await self.md_put(ns, b, small_snapshot(101.0))
        # A writer killed between its record and the ref: the ref still names A.
        tmp = ref.with_name("latest.abuse")
        tmp.write_bytes(behind)
        tmp.replace(ref)
        staged = await self.request("GET", f"/v1/marketdata/{ns}/latest")
        again = await self.md_put(ns, b, small_snapshot(101.0))
        latest = await self.request("GET", f"/v1/marketdata/{ns}/latest")
        named = (latest.body or {}).get("data_asof") if isinstance(latest.body, dict) else None
        staged_asof = (staged.body or {}).get("data_asof") if isinstance(staged.body, dict) else None
        created = (again.body or {}).get("created") if isinstance(again.body, dict) else None
        self.add(
            sc,
            "PUT A, PUT B, refs/latest rewound to A (a crashed writer)",
            "201, 201; latest names A",
            f"{p1.status}, {p2.status}; latest {staged_asof}",
            p1.status == 201 and p2.status == 201 and staged_asof == a,
        )
        self.add(
            sc,
            "the same PUT of B again",
            "200 created:false",
            f"{again.status} created:{created}",
            again.status == 200 and created is False,
        )
        self.add(
            sc,
            f"GET /v1/marketdata/{ns}/latest after the retry",
            f"names B ({b})",
            f"{latest.status} {named}",
            latest.status == 200 and named == b,
        )
        other = await self.md_put(ns, b, small_snapshot(102.0))
        self.add(sc, "PUT of other content at B", "409", str(other.status), other.status == 409)

    # -- 9 ---------------------------------------------------------------------------------
    async def coercion(self) -> None:
        sc = "9 coercion"
        for value in (True, "105"):
            a = await self.price([dict(SMALL, strike=value)])
            fields = [d.get("field") for d in a.body["error"]["details"]] if a.status == 422 else []
            self.add(
                sc,
                f'"strike": {json.dumps(value)}',
                "422 naming contracts[0].strike",
                f"{a.status} {fields}",
                a.status == 422 and "contracts[0].strike" in fields,
            )
        for t in ("1700000000", "0", "-1"):
            paths = [
                ("GET", f"/v1/marketdata/default/{t}", "path.val_datetime"),
                ("PUT", f"/v1/marketdata/default/{VDT}/{t}", "path.data_asof"),
                ("GET", f"/v1/marketdata/default/{VDT}?asof={t}", "query.asof"),
            ]
            seen = []
            for method, path, must in paths:
                a = await self.request(
                    method,
                    path,
                    small_snapshot(100.0) if method == "PUT" else None,
                    headers={"Authorization": f"Bearer {self.md}"},
                )
                fields = [d.get("field") for d in a.body["error"]["details"]] if isinstance(a.body, dict) else []
                seen.append(a.status == 422 and must in fields)
            self.add(
                sc,
                f"market-data paths and asof with Unix time {t}",
                "422 naming the path / query field",
                f"{sum(seen)}/{len(seen)} refused so",
                all(seen),
            )
        body = json.dumps({"contracts": [SMALL]}).encode()
        head = f"POST /v1/price HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        out, _ = await self.raw(head.encode() + body)
        status, js = _parse(out)
        field_ = (js or {}).get("error", {}).get("details", [{}])[0].get("field") if js else None
        self.add(
            sc,
            "a /v1/price body without Content-Type",
            "415 naming header:Content-Type",
            f"{status} {field_}",
            status == 415 and field_ == "header:Content-Type",
        )

    # -- 10 --------------------------------------------------------------------------------
    async def edges(self) -> None:
        sc = "10 edges"
        results = []
        for i, scheme in enumerate(("Bearer", "bearer", "BEARER")):
            a = await self.md_put("abuse-auth", f"2026-11-26T16:00:0{i}Z", small_snapshot(100.0), auth=scheme)
            results.append(f"{scheme} {a.status}")
        self.add(
            sc,
            "market-data token as 'Bearer', 'bearer', 'BEARER'",
            "201 each",
            ", ".join(results),
            all(r.endswith("201") for r in results),
        )
        a = await self.md_put("abuse-auth", "2026-11-26T16:00:09Z", small_snapshot(100.0), auth=None)
        www = a.headers.get("www-authenticate", "")
        self.add(
            sc,
            "market-data PUT without a token",
            '401, realm="spectralmc-marketdata"',
            f"{a.status} {www}",
            a.status == 401 and 'realm="spectralmc-marketdata"' in www,
        )
        a = await self.request(
            "PUT",
            f"/v1/marketdata/abuse-auth/{VDT}/2026-11-26T16:00:09Z",
            small_snapshot(1.0),
            headers={"Authorization": "Bearer wrong"},
        )
        self.add(sc, "market-data PUT with a wrong token", "403", str(a.status), a.status == 403)
        a = await self.request(
            "GET", "/v1/admin/models/gbm/versions", headers={"Authorization": f"bearer {self.admin}"}
        )
        self.add(sc, "admin route with scheme 'bearer'", "200", str(a.status), a.status == 200)
        ws = await self.session.ws_connect(self.url.replace("http", "ws") + "/v1/stream", heartbeat=None)
        try:
            await ws.send_json({"op": "subscribe", "id": "t", "topic": "no-such-topic"})
            m = await ws.receive_json(timeout=10)
        finally:
            await ws.close()
        self.add(
            sc,
            "subscribe to an unknown topic",
            "error not_found",
            f"{m.get('type')} {m.get('code')}",
            m.get("type") == "error" and m.get("code") == "not_found",
        )
        long_url = "/v1/models?x=" + "a" * 8000
        out, _ = await self.raw(f"GET {long_url} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        status, js = _parse(out)
        code = (js or {}).get("error", {}).get("code") if js else None
        self.add(
            sc, "an 8 KB URL", "414 JSON uri_too_long", f"{status} {code}", status == 414 and code == "uri_too_long"
        )
        out, _ = await self.raw(
            f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {'b' * 9000}\r\nConnection: close\r\n\r\n".encode()
        )
        status, js = _parse(out)
        code = (js or {}).get("error", {}).get("code") if js else None
        self.add(
            sc,
            "a 9 KB header",
            "431 JSON headers_too_large",
            f"{status} {code}",
            status == 431 and code == "headers_too_large",
        )

        async def trickle() -> tuple[bytes, float]:
            return await self.raw(b"GET /healthz HTTP/1.1\r\n", timeout=8.0, trickle=b"X-Slow: 1\r\n", every=0.25)

        async def tricklers() -> list[tuple[bytes, float]]:
            return list(await asyncio.gather(*(trickle() for _ in range(self.sizes.tricklers))))

        trickled, lat, statuses = await self.while_measuring(self.healthz, tricklers(), 1)
        statuses_t = sorted({_parse(out)[0] for out, _ in trickled})
        slowest = max(s for _, s in trickled)
        self.add(
            sc,
            f"{len(trickled)} connections trickling headers (timeout 2 s)",
            "408, closed within 3 s",
            f"{statuses_t}, closed after {slowest:.1f} s at most",
            statuses_t == [408] and slowest <= 3.0,
        )
        worst = max(lat, default=math.inf)
        self.add(
            sc,
            "/healthz while they trickle",
            "max < 0.5 s, all 200",
            f"max {ms(worst)}, {statuses}",
            worst < 0.5 and set(statuses) == {200},
        )
        s = self.sizes
        from slow_readers import book, post, rounds  # its rounds of clients that never read

        request = post(self.port, book(s.slow_contracts, 64))
        got = await asyncio.to_thread(
            rounds,
            self.url,
            self.pid,
            1,
            s.slow_clients,
            request,
            hold=s.slow_hold,
            settle_seconds=s.slow_hold + (2.0 if s.slow_hold < 5 else 6.0),
        )
        r = got[0]
        self.rss = {"before": r.before, "peak": r.peak, "after": r.after}
        self.add(
            sc,
            f"RSS around {s.slow_clients} clients that never read ({s.slow_contracts} contracts x 64 quantiles each)",
            "reported",
            f"{r.before:.0f} -> peak {r.peak:.0f} -> {r.after:.0f} MiB after settling",
            None,
        )


def _complete(data: bytes) -> bool:
    if b"\r\n\r\n" not in data:
        return False
    head, rest = data.split(b"\r\n\r\n", 1)
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":", 1)[1])
    return False


def _parse(data: bytes) -> tuple[int, Any]:
    """Status and JSON body of a raw HTTP answer (0 and None when there is none)."""
    if not data.startswith(b"HTTP/"):
        return 0, None
    head, _, rest = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split()[1])
    except (IndexError, ValueError):
        return 0, None
    try:
        return status, json.loads(rest)
    except ValueError:
        return status, None


SCENARIOS: dict[int, tuple[str, Callable[[Probe], Awaitable[None]]]] = {
    1: ("1 distribution measures", Probe.distribution),
    2: ("2 far strikes", Probe.far_strikes),
    3: ("3 extreme inputs", Probe.extreme),
    4: ("4 gzip bomb", Probe.gzip_bombs),
    5: ("5 calibration flood", Probe.calibration_flood),
    6: ("6 stream subscriptions", Probe.subscriptions),
    7: ("7 overload mix", Probe.overload),
    8: ("8 market-data latest", Probe.latest_after_crash),
    9: ("9 coercion", Probe.coercion),
    10: ("10 edges", Probe.edges),
}


async def run(probe: Probe, only: list[int], fail_fast: bool) -> list[tuple[str, float]]:
    timings = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        probe.session = session
        await probe.price([SMALL])
        # Each process's reference once, far from the money: its first use builds tables,
        # which the scenarios should not measure as their own cost.
        far = {"right": "call", "strike": 300.0, "spot": 100.0, "expiry_years": 1.0}
        warm = [
            far | {"id": "w1", "process": "heston", "params": HESTON},
            far | {"id": "w2", "process": "merton", "params": MERTON},
            far | {"id": "w3", "process": "asian", "fixings": 12, "vol": 0.25},
        ]
        a = await probe.price(warm, deadline=60.0)
        probe.add(
            "0 warm-up",
            "one far-strike heston, merton and asian contract (the references' first use)",
            "reported",
            f"{a.status} in {a.seconds:.1f} s",
            None,
        )
        for i in only:
            name, fn = SCENARIOS[i]
            before = len(probe.checks)
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(fn(probe), probe.sizes.budget)
            except Exception as exc:  # the scenario itself broke: that is a failure too
                probe.add(
                    name,
                    "ran to completion",
                    f"within {probe.sizes.budget:.0f} s",
                    f"{type(exc).__name__}: {str(exc)[:120]}",
                    False,
                )
            timings.append((name, time.perf_counter() - t0))
            failed = [c for c in probe.checks[before:] if c.ok is False]
            print(f"  {name}: {time.perf_counter() - t0:.1f} s, {len(failed)} failed", flush=True)
            if failed and fail_fast:
                break
        if 3 in only:
            probe.add(
                "3 extreme inputs",
                "every /v1/price 200 of the whole run",
                "no null, finite",
                f"{probe.bad} bad of {probe.scanned} answers scanned",
                probe.bad == 0,
            )
    return timings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every scenario at small sizes (under a minute)")
    ap.add_argument("--only", default="", help="comma-separated scenario numbers (default: all)")
    ap.add_argument("--fail-fast", action="store_true", help="stop after the first scenario with a failed check")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V", help="more server settings")
    output_args(ap, IMG / "abuse.png")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    only = [int(x) for x in args.only.split(",") if x.strip()] or list(SCENARIOS)
    unknown = [i for i in only if i not in SCENARIOS]
    if unknown:
        ap.error(f"no scenario {unknown}; scenarios are 1..{len(SCENARIOS)}")
    tokens = {"admin": secrets.token_urlsafe(16), "marketdata": secrets.token_urlsafe(16)}
    env = {
        "SPECTRALMC_ADMIN_TOKEN": tokens["admin"],
        "SPECTRALMC_MARKETDATA__WRITE_TOKEN": tokens["marketdata"],
        "SPECTRALMC_HEADER_READ_TIMEOUT_SECONDS": "2",
        **dict(kv.split("=", 1) for kv in args.server_env),
    }
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        asyncio.run(seed_gbm_twice(work / "data"))
        with serve(work, env) as (url, pid):
            print(
                f"server {url} pid {pid} (role serve, header timeout 2 s); started in {time.perf_counter() - t0:.1f} s"
            )
            probe = Probe(url, pid, work / "data", sizes, tokens)
            timings = asyncio.run(run(probe, only, args.fail_fast))
    rows = [[c.scenario, c.check, c.expected, c.measured, c.verdict] for c in probe.checks]
    text = table(["scenario", "check", "expected", "measured", "result"], rows)
    failed = [c for c in probe.checks if c.ok is False]
    held = sum(c.ok is True for c in probe.checks)
    summary = (
        f"{held} held, {len(failed)} failed, {sum(c.ok is None for c in probe.checks)} reported; "
        f"{len(only)} scenarios in {time.perf_counter() - t0:.0f} s (server start included); "
        f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores: "
        "the latency checks share them with whatever else runs)"
    )
    if failed:
        summary += "\n\nDid not hold: " + "; ".join(f"{c.scenario}: {c.check}" for c in failed) + "."
    print(text)
    print(summary)
    publish(
        args,
        "abuse",
        lambda path: _plot(probe, timings, path),
        f"### Abuse probe (`bench/abuse.py`)\n\n{text}\n\n{summary}",
    )
    return 1 if failed else 0


def _plot(probe: Probe, timings: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(probe.figures)
    ratios = [probe.figures[k][0] / probe.figures[k][1] for k in names]
    axes[0].barh(names, ratios, color=["tab:green" if r < 1 else "tab:red" for r in ratios])
    axes[0].axvline(1.0, color="black", linestyle=":")
    axes[0].set_xlabel("measured / limit")
    scen = sorted({c.scenario for c in probe.checks}, key=lambda s: int(s.split()[0]))
    held = [sum(c.scenario == s and c.ok is True for c in probe.checks) for s in scen]
    failed = [sum(c.scenario == s and c.ok is False for c in probe.checks) for s in scen]
    axes[1].barh(scen, held, color="tab:green", label="held")
    axes[1].barh(scen, failed, left=held, color="tab:red", label="failed")
    axes[1].set_xlabel("checks")
    axes[1].legend()
    axes[1].invert_yaxis()
    axes[2].barh([n for n, _ in timings], [t for _, t in timings])
    axes[2].set_xlabel("seconds per scenario")
    axes[2].invert_yaxis()
    if probe.rss:
        axes[2].set_title(
            f"server RSS {probe.rss['before']:.0f} / {probe.rss['peak']:.0f} / {probe.rss['after']:.0f} MiB "
            "(before / peak / after non-readers)",
            fontsize=9,
        )
    save_figure(fig, path)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
