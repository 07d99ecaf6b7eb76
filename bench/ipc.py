"""IPC round trip of a price job between this process and a child engine-stand-in
process, over an AF_UNIX socketpair with spectralmc_server.ipc.framing.

The job is a book of n contracts as columns (six float64 arrays: spot, strike,
expiry_years, rate, dividend, vol; a bool call array; a list of n string ids like
"c000123"); the child answers n float64 values, n float64 error bounds and n bool
learned flags (arrays it allocated once per n: the child does no work, so the figure is
the IPC alone: pickling, the socket, unpickling, both ways). For n in 1, 100, 1,000,
4,096 and 10,000:

- out of band: numpy arrays as pickle protocol 5 out-of-band buffers (zero-copy send),
  blocking send_frame / recv_frame on both sides;
- in-band: the same messages pickled with protocol 5 without buffer_callback (the
  arrays copied into the pickle on both sides), to show what out of band saves;
- asyncio: this side an asyncio FrameProtocol (as the HTTP process will run it), the
  child still blocking.

Reported as p50 / p99 microseconds per round trip, MB each way, and for n >= 1,000 the
round trip as a percentage of the engine's own compute time for n contracts at the
engine-alone rate measured in bench/server_load.py. Baselines in the same run, on the
same socketpair: a raw 1-byte round trip (no framing, no pickle) and a framed 4-byte
string. Every loop is bounded in count and in time.

    python bench/ipc.py --record        # ~30 s
    python bench/ipc.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMG, ROOT, output_args, publish, save_figure, table

from spectralmc_server.ipc.framing import FrameProtocol, connect, encode, recv_frame, send_frame
from spectralmc_server.ipc.unpickling import http_side_allow

# the engine alone in an earlier server_load recording (docs/benchmarks.md; the best of 5 calls)
ENGINE_OPTIONS_PER_S = 297_699.0
ROUNDS = 4  # the blocking cells are measured in this many interleaved rounds
FLOAT_COLUMNS = ("spot", "strike", "expiry_years", "rate", "dividend", "vol")

CHILD = """
import socket, sys
import numpy as np
from spectralmc_server.ipc.framing import recv_frame, send_frame
from spectralmc_server.ipc.unpickling import engine_side_allow

sock = socket.socket(fileno=int(sys.argv[1]))
answers = {}
while True:
    try:
        msg = recv_frame(sock, allow=engine_side_allow)
    except EOFError:
        break
    op = msg["op"]
    if op == "raw":  # 1-byte round trips until b"q"
        while sock.recv(1) == b"x":
            sock.sendall(b"y")
    elif op == "ping":
        send_frame(sock, "pong")
    else:
        n = len(msg["spot"])
        if n not in answers:
            answers[n] = {
                "op": "answer",
                "values": np.linspace(1.0, 2.0, n),
                "bounds": np.full(n, 1e-4),
                "learned": np.ones(n, dtype=bool),
            }
        answer = answers[n]
        answer["id"] = msg["id"]
        send_frame(sock, answer, out_of_band=msg["oob"])
"""


def job(n: int, oob: bool) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    msg: dict[str, Any] = {"op": "price", "id": 0, "oob": oob, "ids": [f"c{i:06d}" for i in range(n)]}
    for name in FLOAT_COLUMNS:
        msg[name] = rng.uniform(0.01, 1.0, n)
    msg["call"] = rng.random(n) < 0.5
    return msg


def answer_like(n: int) -> dict[str, Any]:
    """A message the size of the child's answer (for the MB column)."""
    return {"op": "answer", "id": 0, "values": np.ones(n), "bounds": np.ones(n), "learned": np.ones(n, dtype=bool)}


def frame_bytes(msg: object) -> int:
    return sum(len(p) for p in encode(msg))


def timed(step: Callable[[], object], count: int, seconds: float, warmup: int = 5) -> list[float]:
    """Round-trip times in microseconds: at most ``count`` of them, for at most ``seconds``."""
    for _ in range(warmup):
        step()
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while len(samples) < count and time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        step()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    return samples


def compute_us(n: int) -> float:
    """The engine's compute time for ``n`` contracts at the assumed rate, in microseconds."""
    return n / ENGINE_OPTIONS_PER_S * 1e6


def share(n: int, round_trip_us: float) -> float | str:
    """The round trip as a percentage of the compute time, for n >= 1,000."""
    return round_trip_us / compute_us(n) * 100 if n >= 1000 else "-"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Blocking:
    """This end of the socketpair, blocking, against the child."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def raw(self, count: int, seconds: float) -> list[float]:
        send_frame(self.sock, {"op": "raw"})

        def one() -> None:
            self.sock.sendall(b"x")
            if self.sock.recv(1) != b"y":
                raise RuntimeError("the child broke the 1-byte exchange")

        samples = timed(one, count, seconds)
        self.sock.sendall(b"q")
        return samples

    def round_trip(self, msg: dict[str, Any]) -> Callable[[], object]:
        def one() -> object:
            msg["id"] += 1
            send_frame(self.sock, msg, out_of_band=msg.get("oob", True))
            reply = recv_frame(self.sock, allow=http_side_allow)
            if isinstance(reply, dict) and reply["id"] != msg["id"]:
                raise RuntimeError("answer out of order")
            return reply

        return one


async def asyncio_round_trips(
    sock: socket.socket, jobs: dict[int, dict[str, Any]], count: int, seconds: float, warmup: int = 5
) -> dict[int, list[float]]:
    """The asyncio side (FrameProtocol) against the same child: n -> samples in microseconds."""
    inbox: asyncio.Queue[object] = asyncio.Queue()
    lost: list[Exception | None] = []
    proto: FrameProtocol = await connect(sock, inbox.put_nowait, lost.append, allow=http_side_allow)
    out: dict[int, list[float]] = {}
    for n, msg in jobs.items():
        samples: list[float] = []
        end = time.perf_counter() + seconds
        i = 0
        while i < warmup or (len(samples) < count and time.perf_counter() < end):
            msg["id"] += 1
            t0 = time.perf_counter_ns()
            await proto.send(msg)
            reply = await asyncio.wait_for(inbox.get(), 60)
            if i >= warmup:
                samples.append((time.perf_counter_ns() - t0) / 1e3)
            if not isinstance(reply, dict) or reply["id"] != msg["id"]:
                raise RuntimeError(f"unexpected answer {reply!r:.80}")
            i += 1
        out[n] = samples
    if lost:
        raise RuntimeError(f"the child connection was lost: {lost[0]!r}")
    assert proto.transport is not None
    proto.transport.close()
    return out


def run(sizes: list[int], count: int, seconds: float) -> tuple[list[list[object]], dict[str, Any]]:
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    here.settimeout(120)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(there.fileno())], pass_fds=[there.fileno()], cwd=ROOT)
    there.close()
    try:
        side = Blocking(here)
        raw: list[float] = []
        ping: list[float] = []
        oob: dict[int, list[float]] = {n: [] for n in sizes}
        inband: dict[int, list[float]] = {n: [] for n in sizes}
        jobs = {(n, b): job(n, b) for n in sizes for b in (True, False)}
        # the blocking cells interleaved over a few rounds, so that drift in the machine's
        # speed spreads over all of them rather than favouring one
        each, within = max(count // ROUNDS, 1), seconds / ROUNDS
        for _ in range(ROUNDS):
            raw += side.raw(each, within)
            ping += timed(side.round_trip({"op": "ping", "id": 0}), each, within)
            for n in sizes:
                oob[n] += timed(side.round_trip(jobs[n, True]), each, within)
                inband[n] += timed(side.round_trip(jobs[n, False]), each, within)
        aio = asyncio.run(asyncio_round_trips(here, {n: jobs[n, True] for n in sizes}, count, seconds))
    finally:
        here.close()  # the child sees EOF and exits
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    rows: list[list[object]] = [
        ["1 byte, raw (no framing)", "-", "-", len(raw), pct(raw, 0.5), pct(raw, 0.99), *["-"] * 6],
        ["framed tiny message", "-", "-", len(ping), pct(ping, 0.5), pct(ping, 0.99), *["-"] * 6],
    ]
    for n in sizes:
        rows.append(
            [
                f"{n:,}",
                frame_bytes(job(n, True)) / 1e6,
                frame_bytes(answer_like(n)) / 1e6,
                len(oob[n]),
                pct(oob[n], 0.5),
                pct(oob[n], 0.99),
                pct(inband[n], 0.5),
                pct(inband[n], 0.99),
                pct(aio[n], 0.5),
                pct(aio[n], 0.99),
                share(n, pct(oob[n], 0.5)),
                share(n, pct(aio[n], 0.5)),
            ]
        )
    series = {"sizes": sizes, "raw": pct(raw, 0.5), "ping": pct(ping, 0.5), "oob": oob, "inband": inband, "aio": aio}
    return rows, series


HEADERS = [
    "contracts",
    "job MB",
    "answer MB",
    "samples",
    "out-of-band p50 us",
    "p99 us",
    "in-band p50 us",
    "p99 us",
    "asyncio p50 us",
    "p99 us",
    "% of compute",
    "asyncio % of compute",
]


def caption(count: int, seconds: float) -> str:
    return (
        f"Round trip = send the job, the child receives it and sends its answer, this side receives "
        f"the answer (the child computes nothing). Each cell: up to {count:,} round trips or "
        f"{seconds:g} s (the blocking cells in {ROUNDS} interleaved rounds), each run after 5 warm-up "
        f'round trips. MB: the frame\'s bytes each way. "% of compute": the '
        f"p50 round trip over n / {ENGINE_OPTIONS_PER_S:,.0f} s, the engine's compute time for n "
        f"contracts, assuming the engine-alone rate of {ENGINE_OPTIONS_PER_S:,.0f} options/s measured "
        f"in the server_load section of this page (Arrow 10,000, in process); only for n >= 1,000."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=5000, help="most round trips per cell")
    ap.add_argument("--seconds", type=float, default=2.0, help="longest time per cell")
    output_args(ap, IMG / "ipc.png")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (1, 100 and 1,000 contracts)")
    args = ap.parse_args(argv)
    sizes = [1, 100, 1000] if args.quick else [1, 100, 1000, 4096, 10_000]
    count = 300 if args.quick else args.count
    seconds = 0.25 if args.quick else args.seconds
    rows, series = run(sizes, count, seconds)
    text = table(HEADERS, rows)
    print(text)
    print()
    print(caption(count, seconds))
    publish(args, "ipc", lambda path: _plot(series, path), f"{text}\n\n{caption(count, seconds)}", "ipc")
    return 0


def _plot(series: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes: list[int] = series["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for key, label, style in (
        ("oob", "out of band (blocking)", "o-"),
        ("inband", "in-band (blocking)", "s--"),
        ("aio", "out of band, asyncio side", "^-"),
    ):
        ax.plot(sizes, [pct(series[key][n], 0.5) for n in sizes], style, label=label)
    ax.plot(sizes, [compute_us(n) for n in sizes], ":", color="black", label="engine compute (assumed)")
    ax.axhline(series["raw"], color="grey", lw=0.8, label="1 byte, raw")
    ax.axhline(series["ping"], color="grey", lw=0.8, ls="--", label="framed tiny message")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("contracts per job")
    ax.set_ylabel("round trip p50 (us)")
    ax.legend(fontsize=8)
    ax = axes[1]
    big = [n for n in sizes if n >= 1000] or sizes
    for key, label, style in (("oob", "out of band (blocking)", "o-"), ("aio", "asyncio side", "^-")):
        ax.plot(big, [pct(series[key][n], 0.5) / compute_us(n) * 100 for n in big], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("contracts per job")
    ax.set_ylabel("round trip, % of engine compute")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
