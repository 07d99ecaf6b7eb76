"""Streaming quotes: ``spectralmc serve`` in its own process, WebSocket clients on loopback.

For 1, 100 and 1,000 subscribers (one connection each, all subscribed to the same
contract priced by reference to the namespace's latest snapshot):

- PUT -> receipt: the time from sending a snapshot PUT to each subscriber receiving
  the quote computed from that snapshot (p50 / p99 / max over subscribers and rounds),
  next to the PUT's own round trip (the store's writes: content, record, latest ref).
  The clients run in one asyncio loop in this process, so the figure includes the
  client side's own time to read N messages; both share the machine with the server.
- quotes/s delivered: snapshots PUT back to back for a few seconds; every quote
  received by any subscriber counts (slow consumers are coalesced to the latest quote
  by the server, so this is what clients actually get).
- server memory per idle connection: server RSS with N idle subscribed connections
  minus RSS before they connected, over N (target <= 100 KB).

    python bench/stream.py --record        # ~2 minutes
    python bench/stream.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMG, output_args, publish, save_figure, table
from server_load import rss_bytes, server

VDT = "2026-11-26T16:00:00Z"
CONTRACT = {"id": "q1", "right": "call", "strike": 100.0, "underlying": "BENCH", "expiry": "2027-06-18"}


def snapshot(spot: float) -> dict[str, Any]:
    return {
        "spots": {"BENCH": spot},
        "yield_curves": {"USD": {"pillars": [{"years": 1.0, "zero_rate": 0.03}]}},
        "discounting": {"BENCH": "USD"},
        "vol_surfaces": {
            "BENCH": {"strike_kind": "moneyness", "expiries_years": [1.0], "strikes": [1.0], "vols": [[0.25]]}
        },
    }


def asof(i: int) -> str:
    return f"2026-11-26T16:{i // 60:02d}:{i % 60:02d}Z"


@dataclass
class Subscriber:
    ws: aiohttp.ClientWebSocketResponse
    arrivals: dict[str, float] = field(default_factory=dict)  # data_asof -> perf_counter at receipt
    received: int = 0
    task: asyncio.Task[None] | None = None

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            body = json.loads(msg.data)
            if body.get("type") == "quote":
                self.received += 1
                self.arrivals.setdefault(body["market_data"]["data_asof"], time.perf_counter())


class Bench:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session
        self.counter = 1

    async def put(self, spot: float) -> str:
        key = asof(self.counter)
        self.counter += 1
        async with self.session.put(f"{self.url}/v1/marketdata/default/{VDT}/{key}", json=snapshot(spot)) as r:
            if r.status != 201:
                raise RuntimeError(f"PUT answered {r.status}: {await r.text()}")
        return key

    async def connect(self, n: int) -> list[Subscriber]:
        async def one(i: int) -> Subscriber:
            ws = await self.session.ws_connect(f"{self.url.replace('http', 'ws')}/v1/stream", heartbeat=None)
            await ws.send_json({"op": "subscribe", "id": f"s{i}", "contracts": [CONTRACT]})
            sub = Subscriber(ws)
            sub.task = asyncio.create_task(sub.read())
            return sub

        subs: list[Subscriber] = []
        for start in range(0, n, 100):  # connect in waves, as a fleet of clients would
            subs += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 100))))
        await self.until(lambda: all(s.received >= 1 for s in subs), 120.0)
        return subs

    @staticmethod
    async def until(check: Callable[[], bool], timeout: float) -> None:
        end = time.perf_counter() + timeout
        while not check():
            if time.perf_counter() > end:
                raise TimeoutError("subscribers did not all receive their quote in time")
            await asyncio.sleep(0.005)

    async def latency(self, subs: list[Subscriber], rounds: int) -> tuple[list[float], list[float]]:
        """PUT -> receipt per subscriber and round, and the PUT's own round trip."""
        samples: list[float] = []
        puts: list[float] = []
        for r in range(rounds):
            t0 = time.perf_counter()
            key = await self.put(100.0 + r + 1)
            puts.append(time.perf_counter() - t0)
            await self.until(partial(arrived, subs, key), 60.0)
            samples += [s.arrivals[key] - t0 for s in subs]
            await asyncio.sleep(0.2)
        return samples, puts

    async def throughput(self, subs: list[Subscriber], seconds: float) -> float:
        before = sum(s.received for s in subs)
        t0 = time.perf_counter()
        spot = 200.0
        while time.perf_counter() - t0 < seconds:
            await self.put(spot)
            spot += 0.5
        await asyncio.sleep(1.0)  # let the last quotes arrive
        return (sum(s.received for s in subs) - before) / (time.perf_counter() - t0)


def arrived(subs: list[Subscriber], key: str) -> bool:
    return all(key in s.arrivals for s in subs)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(url: str, pid: int, sizes: list[int], rounds: int, seconds: float) -> list[list[object]]:
    rows: list[list[object]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        bench = Bench(url, session)
        await bench.put(100.0)
        warm = await bench.connect(1)  # warm the server's paths before measuring memory
        await bench.latency(warm, 1)
        for sub in warm:
            await sub.ws.close()
        for n in sizes:
            await asyncio.sleep(1.0)
            rss0 = rss_bytes(pid)
            subs = await bench.connect(n)
            await asyncio.sleep(1.0)
            per_conn = (rss_bytes(pid) - rss0) / n
            lat, puts = await bench.latency(subs, rounds)
            qps = await bench.throughput(subs, seconds)
            rows.append(
                [
                    n,
                    len(lat),
                    pct(puts, 0.5) * 1e3,
                    pct(lat, 0.5) * 1e3,
                    pct(lat, 0.99) * 1e3,
                    max(lat) * 1e3,
                    qps,
                    f"{per_conn / 1024:.1f}",
                ]
            )
            print(f"  {n} subscribers done", flush=True)
            await asyncio.gather(*(s.ws.close() for s in subs))
            for s in subs:
                if s.task is not None:
                    s.task.cancel()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="snapshot PUTs timed per subscriber count")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the quotes/s run")
    output_args(ap, IMG / "stream.png")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (1 and 10 subscribers)")
    args = ap.parse_args(argv)
    sizes = [1, 10] if args.quick else [1, 100, 1000]
    rounds = 2 if args.quick else args.rounds
    seconds = 1.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory() as tmp, server("spectralmc", Path(tmp), False) as (url, pid):
        rows = asyncio.run(run(url, pid, sizes, rounds, seconds))
    headers = [
        "subscribers",
        "samples",
        "PUT alone p50 ms",
        "PUT->receipt p50 ms",
        "p99 ms",
        "max ms",
        "quotes/s delivered",
        "server KiB per idle connection",
    ]
    text = table(headers, rows)
    print(text)
    publish(args, "stream", lambda path: _plot(rows, path), text, "stream")
    return 0


def _plot(rows: list[list[object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [float(str(r[0])) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(n, [float(str(r[3])) for r in rows], "o-", label="p50")
    axes[0].plot(n, [float(str(r[4])) for r in rows], "s-", label="p99")
    axes[0].plot(n, [float(str(r[2])) for r in rows], ":", color="grey", label="the PUT alone (p50)")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("subscribers")
    axes[0].set_ylabel("snapshot PUT -> quote received (ms)")
    axes[0].legend()
    axes[1].plot(n, [float(str(r[6])) for r in rows], "o-")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("subscribers")
    axes[1].set_ylabel("quotes/s delivered")
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
