"""Clients that never read: rounds of raw loopback sockets that send ``POST /v1/price``
for a large book (default 5,000 contracts with 64 quantile levels: a 9.6 MB answer) and
never read a byte, optionally with WebSocket subscribers that never read either,
against ``spectralmc serve --role serve`` in its own process. Prints the server's RSS
(``/proc/PID/status`` VmRSS) after a warm-up request that is read (the baseline), the
peak while each round's clients are connected, when they close, and ``--settle``
seconds after; and the server's send and reclaim counters (docs/operations.md, Memory).

    python bench/slow_readers.py                                  # 3 rounds of 24 clients, ~2 minutes
    python bench/slow_readers.py --server-env SPECTRALMC_MEMORY__RECLAIM_IDLE_SECONDS=0
    python bench/slow_readers.py --quick

``--server-env K=V`` (repeatable) passes settings to the server. The module's functions
are also what tests/service/test_memory_bound.py drives.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_load import rss_bytes, serve_only

MIB = 2**20
LEVELS = [round(0.01 + i * 0.98 / 63, 6) for i in range(64)]  # the most quantile levels a request may ask


def book(contracts: int, levels: int = 64) -> bytes:
    """A request whose answer is large and cheap to compute: every contract on one
    (vol, expiry) point, so the network runs once, with ``levels`` quantiles each."""
    rows = [
        {
            "id": f"c{i}",
            "right": "call" if i % 2 else "put",
            "strike": 80.0 + (i % 400) * 0.1,
            "spot": 100.0,
            "expiry_years": 1.0,
            "rate": 0.03,
            "dividend": 0.01,
            "vol": 0.25,
        }
        for i in range(contracts)
    ]
    measures = ["price", "quantiles"] if levels else ["price"]
    body: dict[str, object] = {"measures": measures, "contracts": rows}
    if levels:
        body["quantile_levels"] = LEVELS[:: max(1, len(LEVELS) // levels)][:levels]
    return json.dumps(body).encode()


def post(port: int, body: bytes, timeout_header: float = 60.0) -> bytes:
    head = (
        f"POST /v1/price HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"X-Request-Timeout: {timeout_header:g}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def non_reader(port: int, request: bytes, pipeline: int = 1) -> socket.socket:
    """A connection that sends ``request`` ``pipeline`` times and will never read (its
    receive buffer is as small as the kernel allows, so the server's writes block)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    for _ in range(pipeline):
        s.sendall(request)
    return s


def ws_non_reader(port: int, contracts: int, interval: float = 0.5) -> socket.socket:
    """A WebSocket that subscribes to ``contracts`` contracts (quoted every ``interval``
    s) and never reads a frame."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    rows = json.loads(book(contracts, 0))["contracts"]
    msg = json.dumps({"op": "subscribe", "id": "s", "contracts": rows, "interval_seconds": interval}).encode()
    mask = os.urandom(4)
    n = len(msg)
    length = bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536 else bytes([0x80 | 127]) + n.to_bytes(8, "big")
    s.sendall(bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
    return s


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def total(m: dict[str, float], name: str) -> float:
    """A metric summed over its labels (0 when absent)."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def wait_for(check: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(every)
    return check()


def mib(pid: int) -> float:
    return rss_bytes(pid) / MIB


def settle(url: str, pid: int, seconds: float) -> float:
    """RSS once the server has reclaimed after going idle (its idle reclaim counter moved),
    or after ``seconds`` at most."""
    name = 'spectralmc_memory_reclaims_total{trigger="idle"}'
    start = metrics(url).get(name, 0.0)
    wait_for(lambda: metrics(url).get(name, 0.0) > start, seconds, every=0.5)
    return mib(pid)


@dataclass
class Round:
    before: float  # server RSS, MiB
    peak: float  # while the clients were connected
    at_close: float  # when they closed
    after: float  # after the server went idle (or --settle s)
    answered: int  # price answers the handlers returned this round
    cut: int  # sends the server cut (stalled, evicted)
    client_gone: int  # sends that ended with the client closing


def rounds(
    url: str,
    pid: int,
    n_rounds: int,
    clients: int,
    request: bytes,
    *,
    hold: float,
    settle_seconds: float,
    ws: int = 0,
    ws_contracts: int = 500,
    pipeline: int = 1,
    until_cut: bool = False,
    report: Callable[[int, Round], None] | None = None,
) -> list[Round]:
    """``n_rounds`` rounds: ``clients`` non-reading price connections (and ``ws``
    WebSocket ones) held open ``hold`` s (with ``until_cut``: until the server has cut or
    lost every price send, ``hold`` s at most), then closed; RSS around each."""
    port = int(url.rsplit(":", 1)[1])
    out: list[Round] = []
    for r in range(n_rounds):
        m0 = metrics(url)
        before = mib(pid)
        socks = [non_reader(port, request, pipeline) for _ in range(clients)]
        socks += [ws_non_reader(port, ws_contracts) for _ in range(ws)]
        peak = before
        end = time.monotonic() + hold
        done = 0.0
        while time.monotonic() < end:
            peak = max(peak, mib(pid))
            m = metrics(url)
            done = sum(
                total(m, k) - total(m0, k) for k in ("spectralmc_sends_cut_total", "spectralmc_sends_client_gone_total")
            )
            if until_cut and done >= clients * pipeline:
                break
            time.sleep(0.25)
        at_close = max(peak, mib(pid))
        for s in socks:
            s.close()
        after = settle(url, pid, settle_seconds)
        m1 = metrics(url)
        answered = 'spectralmc_http_requests_total{method="POST",route="/v1/price",status="200"}'
        rec = Round(
            before,
            peak,
            at_close,
            after,
            int(m1.get(answered, 0.0) - m0.get(answered, 0.0)),
            int(total(m1, "spectralmc_sends_cut_total") - total(m0, "spectralmc_sends_cut_total")),
            int(total(m1, "spectralmc_sends_client_gone_total") - total(m0, "spectralmc_sends_client_gone_total")),
        )
        out.append(rec)
        if report is not None:
            report(r + 1, rec)
    return out


@contextmanager
def serve(workdir: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """``spectralmc serve --role serve`` on a free loopback port: (url, pid)."""
    with serve_only(workdir, env, "info", "serve-{port}.log") as answer:
        yield answer


def read_answer(port: int, request: bytes, timeout: float = 120.0) -> int:
    """Send ``request`` and read the whole answer (the warm-up): its status."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("no answer")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(rest) < length:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            rest += chunk
        return int(head.split()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=24, help="non-reading price connections per round")
    ap.add_argument("--contracts", type=int, default=5000, help="contracts per request")
    ap.add_argument("--levels", type=int, default=64, help="quantile levels per contract (0: price only)")
    ap.add_argument("--pipeline", type=int, default=1, help="requests each connection sends back to back")
    ap.add_argument("--ws", type=int, default=0, help="non-reading WebSocket subscribers per round")
    ap.add_argument("--ws-contracts", type=int, default=500)
    ap.add_argument("--hold", type=float, default=40.0, help="seconds the clients stay connected")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds to wait for the idle reclaim afterwards")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the rounds as JSON too")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.clients, args.contracts, args.hold, args.settle = 2, 3, 2000, 8.0, 8.0
    env = dict(kv.split("=", 1) for kv in args.server_env)
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp), env) as (url, pid):
        port = int(url.rsplit(":", 1)[1])
        request = post(port, book(args.contracts, args.levels))
        print(f"server {url} pid {pid}; request {len(request) / MIB:.1f} MiB; env {env or '{}'}")
        print(f"start: RSS {mib(pid):.0f} MiB")
        status = read_answer(port, request)
        base = settle(url, pid, args.settle)
        print(f"after one answer read in full (status {status}): RSS {base:.0f} MiB (the baseline)")
        print("| round | before | peak | at close | after | answered | cut | client gone |")
        print("|---|---|---|---|---|---|---|---|")

        def show(i: int, r: Round) -> None:
            print(
                f"| {i} | {r.before:.0f} | {r.peak:.0f} | {r.at_close:.0f} | {r.after:.0f} | {r.answered} "
                f"| {r.cut} | {r.client_gone} |",
                flush=True,
            )

        result = rounds(
            url,
            pid,
            args.rounds,
            args.clients,
            request,
            hold=args.hold,
            settle_seconds=args.settle,
            ws=args.ws,
            ws_contracts=args.ws_contracts,
            pipeline=args.pipeline,
            report=show,
        )
        m = metrics(url)
        print(
            "RSS in MiB. reclaims: "
            + ", ".join(f"{k.split('=')[1][1:-2]} {v:.0f}" for k, v in m.items() if "memory_reclaims_total{" in k)
            + f"; returned {total(m, 'spectralmc_memory_reclaimed_bytes_total') / MIB:.0f} MiB"
        )
        if args.json:
            print(json.dumps({"baseline": base, "rounds": [asdict(r) for r in result]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
