"""Memory held for clients that never read is bounded and given back (service/memory.py).

The server process test drives bench/slow_readers.py's clients: three rounds of raw
sockets that ask for a 7.7 MB answer and never read it. Before the fix each round left
its answers behind (reference cycles the frozen GC did not collect soon, and glibc's
heap), and RSS compounded: 324 -> 720 -> 863 -> 989 MiB over three rounds of 24 clients
(docs/operations.md, Memory)."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import Counter
from server_util import AppServer, ServerProcess, settings_for

from spectralmc_server.engine_service.rss import rss_bytes
from spectralmc_server.service.app import create_app
from spectralmc_server.service.memory import MEMORY, Send, Sends
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import MemorySettings

BENCH = Path(__file__).resolve().parents[2] / "bench"
MIB = 2**20
BOUND_MIB = 64  # RSS after each round, once idle, within this of the baseline
COMPOUND_MIB = 24  # ... and round 3 within this of round 1
BIG = bytes(range(256)) * (10 * MIB // 256)  # a 10 MiB answer for the in-process tests


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_slow_readers", BENCH / "slow_readers.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


# -- the accounting ---------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_sends_past_the_cap_cut_the_stalest_first() -> None:
    metrics = Metrics()
    cut = Counter("t_cut", "cut", ["reason"], registry=metrics.registry)
    sends = Sends(MemorySettings(max_send_bytes=25 * MIB), cut)
    transports = [FakeTransport() for _ in range(4)]
    opened: list[Send] = []
    for i, t in enumerate(transports[:3]):
        opened.append(sends.open(10 * MIB, t))  # type: ignore[arg-type]
        opened[-1].progressed = 100.0 - i * 10  # the later, the longer without progress
    # the third pushed the total to 30 MiB: the stalest of the others (the second) is cut
    assert [t.aborted for t in transports[:3]] == [False, True, False]
    assert sends.held == 20 * MIB and len(sends.active) == 3
    sends.close(opened[1])  # its writer ends: nothing counted twice
    assert sends.held == 20 * MIB and len(sends.active) == 2
    big = sends.open(30 * MIB, transports[3])  # type: ignore[arg-type]
    assert transports[0].aborted and transports[2].aborted and not transports[3].aborted  # one answer alone is sent
    assert sends.held == 30 * MIB
    for s in (opened[0], opened[2], big):
        sends.close(s)
    assert sends.held == 0 and not sends.active
    assert metrics.registry.get_sample_value("t_cut_total", {"reason": "evicted"}) == 3


def test_rss_is_read() -> None:
    rss = rss_bytes()
    assert rss is not None and 10 * MIB < rss < 64 * 2**30


# -- the send path, in process -------------------------------------------------------------


async def _client(tmp_path: Path, aiohttp_client: Callable[..., Any], **memory: Any) -> TestClient[Any, Any]:
    app = create_app(settings_for(tmp_path, role="serve", memory=memory), Metrics())

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BIG, content_type="application/octet-stream")

    app.router.add_get("/test/big", big)
    client: TestClient[Any, Any] = await aiohttp_client(AppServer(app))
    return client


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_large_answer_arrives_whole_on_a_kept_alive_connection(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    client = await _client(tmp_path, aiohttp_client)
    port = client.server.port
    assert port is not None

    def two_on_one_connection() -> list[tuple[bytes, bytes]]:
        answers = []
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            buf = b""
            for _ in range(2):  # the second request goes over the connection the first answer used
                s.sendall(f"GET /test/big HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                while b"\r\n\r\n" not in buf:
                    buf += s.recv(1 << 16)
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))[15:])
                while len(buf) < length:
                    chunk = s.recv(1 << 20)
                    assert chunk, "the server closed the connection mid-answer"
                    buf += chunk
                answers.append((head, buf[:length]))
                buf = buf[length:]
        return answers

    for head, body in await asyncio.to_thread(two_on_one_connection):
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: application/octet-stream" in head, head
        assert body == BIG
    text = await (await client.get("/metrics")).text()
    assert _metric(text, "spectralmc_send_held_bytes") == 0
    assert _metric(text, "spectralmc_sends_active") == 0
    assert _metric(text, 'spectralmc_process_resident_bytes{process="http"}') > 10 * MIB
    assert _metric(text, 'spectralmc_sends_cut_total{reason="stalled"}') == 0


async def test_a_client_that_does_not_read_is_cut_after_the_send_timeout(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    client = await _client(tmp_path, aiohttp_client, send_timeout_seconds=0.5)
    app = client.app
    assert isinstance(app, web.Application)
    port = client.server.port
    assert port is not None

    def connect() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET /test/big HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return s

    sock = await asyncio.to_thread(connect)
    try:
        guard = app[MEMORY]
        t0 = time.monotonic()
        while not guard.sends.active and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.02)
        assert guard.sends.held == len(BIG)
        while guard.sends.active and time.monotonic() - t0 < 15:
            await asyncio.sleep(0.05)
        assert not guard.sends.active and guard.sends.held == 0
        assert 0.5 <= time.monotonic() - t0 < 10
        text = await (await client.get("/metrics")).text()
        assert _metric(text, 'spectralmc_sends_cut_total{reason="stalled"}') == 1
        # the connection is gone: what the kernel had taken, then the end
        got, end = b"", time.monotonic() + 10
        while time.monotonic() < end:
            try:
                chunk = await asyncio.to_thread(sock.recv, 1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        assert len(got) < len(BIG) + 1024  # cut short (headers and part of the body at most)
    finally:
        sock.close()


# -- three rounds against a server process --------------------------------------------------


def test_three_rounds_of_non_readers_stay_bounded(serve: Callable[..., ServerProcess]) -> None:
    sr = _bench()
    clients = 2
    server = serve(
        "--role",
        "serve",
        env={
            "SPECTRALMC_MEMORY__SEND_TIMEOUT_SECONDS": "1",
            "SPECTRALMC_MEMORY__RECLAIM_IDLE_SECONDS": "1",
        },
    )
    pid, url = server.proc.pid, server.url
    request = sr.post(server.port, sr.book(4000, 64))  # a 7.7 MB answer: more than the kernel's socket buffers take
    assert sr.read_answer(server.port, request) == 200  # the pricing working set is in the baseline
    baseline = sr.settle(url, pid, 15.0)
    result = sr.rounds(url, pid, 3, clients, request, hold=30.0, settle_seconds=15.0, until_cut=True)
    report = f"baseline {baseline:.0f} MiB; " + "; ".join(
        f"round {i + 1}: peak {r.peak:.0f}, after {r.after:.0f} (answered {r.answered}, cut {r.cut})"
        for i, r in enumerate(result)
    )
    print(report)
    for r in result:
        assert r.answered == clients and r.cut == clients, report  # every non-reader was cut by the server
        assert r.after <= baseline + BOUND_MIB, report
    assert result[2].after - result[0].after <= COMPOUND_MIB, report
    m = sr.metrics(url)
    assert m["spectralmc_send_held_bytes"] == 0 and m["spectralmc_sends_active"] == 0
    assert m['spectralmc_memory_reclaims_total{trigger="idle"}'] >= 4, report
    # the engine process gives back what pricing the books freed, once idle, as the HTTP one does
    assert m["spectralmc_engine_memory_reclaims_total"] >= 4, report
    assert m["spectralmc_engine_memory_reclaimed_bytes_total"] > 0, report
    # the server's two processes (sr.mib counts the process and its children)
    both = (
        m['spectralmc_process_resident_bytes{process="http"}']
        + m['spectralmc_process_resident_bytes{process="engine"}']
    )
    assert abs(both / MIB - sr.mib(pid)) < 32
