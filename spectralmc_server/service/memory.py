"""Memory held for clients that do not read, and freed memory given back.

What a probe of clients that send ``POST /v1/price`` for 20,000 contracts (10 MB
answers) and never read found (docs/operations.md, "Memory", has the figures):

- aiohttp sends an answer with one ``transport.write`` and then awaits the drain with no
  time limit: each such connection held its whole answer (the body, plus the unsent part
  copied into the transport's buffer) for as long as the client stayed connected.
- When those clients went, the request and response objects were left in reference
  cycles (an exception stored in the drain future, whose traceback holds the frames that
  await it; a cancelled queue future and its handler). Only a full collection frees them,
  and the start-up ``gc.freeze()`` with the young-generation threshold at 50,000 makes
  full collections rare: RSS rose round after round.
- What the collector frees stays in glibc's heap (the high-water mark) until
  ``malloc_trim`` hands it back.

So, with the settings of ``[memory]``:

- :func:`bounded_send` (the outermost middleware) sends every answer over
  :data:`TRACKED_BYTES` itself, in :data:`CHUNK_BYTES` writes, each awaiting the drain:
  the transport never buffers more than one chunk over its high-water mark. A write
  that waits ``send_timeout_seconds`` without the client taking it cuts the connection
  (``stalled``); and while answers being sent hold more than ``max_send_bytes`` all
  together, the one whose client has taken nothing for longest is cut (``evicted``).
  Smaller answers never block a handler (they are under the transport's high-water
  mark) and go through aiohttp as before.
- :class:`Reclaimer` runs a full collection and ``malloc_trim(0)`` (glibc only, with
  ``malloc_trim``) once per idle period (no HTTP request for ``reclaim_idle_seconds``)
  and whenever RSS has grown ``reclaim_growth_bytes`` since the last reclaim (at most
  every :data:`MIN_RECLAIM_INTERVAL` s), so what dropped clients leave is freed and
  returned instead of waiting for a full collection that may not come.
- ``/metrics`` has the process's RSS, the bytes held by unfinished sends, the cut
  sends and the reclaims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import hdrs, web
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from spectralmc_server.engine_service.rss import malloc_trim_fn, reclaim, rss_bytes
from spectralmc_server.service import keys
from spectralmc_server.settings import MemorySettings

log = logging.getLogger(__name__)

TRACKED_BYTES = 1 << 16  # answers over this (asyncio's default write high-water mark) are sent by bounded_send
CHUNK_BYTES = 1 << 18  # one write of a tracked answer: at most this much waits in the transport's buffer
TICK_SECONDS = 1.0  # how often the reclaimer looks at RSS and idleness
MIN_RECLAIM_INTERVAL = 5.0  # growth-triggered reclaims at most this often (seconds)
PROBES = frozenset({"/metrics", "/healthz", "/readyz"})  # small answers; they do not end an idle period
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- sends --------------------------------------------------------------------------------


@dataclass(eq=False)
class Send:
    """One tracked answer being sent."""

    size: int
    transport: asyncio.Transport
    progressed: float = field(default_factory=time.monotonic)  # last time the client took a chunk
    cut: str | None = None  # why the server cut it (stalled, evicted)


class Sends:
    """The tracked answers whose send has not finished, and their bytes all together:
    past ``max_send_bytes`` the send whose client has taken nothing for longest is cut
    (one answer larger than the cap alone is still sent)."""

    def __init__(self, settings: MemorySettings, cut: Counter) -> None:
        self.settings = settings
        self._cut = cut
        self.active: set[Send] = set()
        self.held = 0  # bytes of the active sends not cut yet

    def open(self, size: int, transport: asyncio.Transport) -> Send:
        send = Send(size, transport)
        self.active.add(send)
        self.held += size
        while self.held > self.settings.max_send_bytes:
            victims = [s for s in self.active if s.cut is None and s is not send]
            if not victims:
                break
            self.cut(min(victims, key=lambda s: s.progressed), "evicted")
        return send

    def cut(self, send: Send, reason: str) -> None:
        """Drop the connection at once (its buffered bytes go with it)."""
        if send.cut is not None:
            return
        send.cut = reason
        self.held -= send.size
        self._cut.labels(reason).inc()
        log.info("cut a client's %d byte answer: %s", send.size, reason)
        send.transport.abort()

    def close(self, send: Send) -> None:
        self.active.discard(send)
        if send.cut is None:
            self.held -= send.size
            send.cut = "done"


def _sendable(request: web.Request, response: web.StreamResponse) -> bytes | None:
    """The body of an answer bounded_send takes over: a plain, unprepared
    ``web.Response`` whose bytes body is over TRACKED_BYTES."""
    if type(response) is not web.Response or response.prepared or request.method == hdrs.METH_HEAD:
        return None
    body = response.body
    if not isinstance(body, bytes) or len(body) <= TRACKED_BYTES or response.chunked or response.compression:
        return None
    if response.cookies:  # not used by this app; aiohttp's own path sets them
        return None
    return body


async def _send(request: web.Request, response: web.Response, body: bytes, guard: MemoryGuard) -> web.StreamResponse:
    transport = request.transport
    if transport is None or transport.is_closing():
        return response  # the client has gone: aiohttp drops it
    headers = response.headers.copy()
    headers.popall(hdrs.CONTENT_LENGTH, None)
    out = web.StreamResponse(status=response.status, reason=response.reason, headers=headers)
    out.content_length = len(body)
    if response.keep_alive is False:
        out.force_close()
    timeout = guard.settings.send_timeout_seconds
    send = guard.sends.open(len(body), transport)
    try:
        await out.prepare(request)
        view = memoryview(body)
        for start in range(0, len(body), CHUNK_BYTES):
            async with asyncio.timeout(timeout):
                await out.write(view[start : start + CHUNK_BYTES])
            send.progressed = time.monotonic()
        async with asyncio.timeout(timeout):
            await out.write_eof()
    except TimeoutError:
        log.info("the client took none of its answer for %g s", timeout)
        guard.sends.cut(send, "stalled")
        out.force_close()
    except ConnectionError as exc:  # the client went, or the connection was cut
        # The drain future holds this exception and its traceback the frames awaiting
        # that future: a cycle only a full collection frees, with the answer in it.
        exc.__traceback__ = None
        if send.cut is None:
            guard.client_gone.inc()
        out.force_close()
    finally:
        guard.sends.close(send)
    return out


@web.middleware
async def bounded_send(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: marks activity for the reclaimer and sends large
    answers in bounded chunks under the send timeout and the memory cap."""
    guard = request.app.get(MEMORY)
    # scrapes and probes come every few seconds, and a stream lasts: neither is activity
    if guard is None or request.path in PROBES or request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await handler(request)
    with guard.active():
        response = await handler(request)
        body = _sendable(request, response)
        if body is None:
            return response
        assert isinstance(response, web.Response)
        return await _send(request, response, body, guard)


# -- reclaiming ---------------------------------------------------------------------------


class Reclaimer:
    """Full collections and ``malloc_trim`` when idle or when RSS has grown."""

    def __init__(self, settings: MemorySettings, guard: MemoryGuard, runs: Counter, returned: Counter) -> None:
        self.settings = settings
        self.guard = guard
        self._runs = runs
        self._returned = returned
        self._trim = malloc_trim_fn() if settings.malloc_trim else None
        self.base_rss = rss_bytes()  # RSS after the last reclaim
        self.last = time.monotonic()
        self.idle_done = True  # nothing has happened since the last idle reclaim

    def due(self, now: float) -> str | None:
        s = self.settings
        g = self.guard
        idle = g.in_flight == 0 and now - g.last_activity >= s.reclaim_idle_seconds
        if s.reclaim_idle_seconds > 0 and not self.idle_done and idle:
            return "idle"
        if s.reclaim_growth_bytes > 0 and now - self.last >= MIN_RECLAIM_INTERVAL:
            rss, base = rss_bytes(), self.base_rss
            if rss is not None and base is not None and rss - base >= s.reclaim_growth_bytes:
                return "growth"
        return None

    async def reclaim(self, trigger: str) -> None:
        done = await reclaim(self._trim)
        self.last = time.monotonic()
        self.base_rss = done.after
        if trigger == "idle":
            self.idle_done = True
        self._runs.labels(trigger).inc()
        self._returned.inc(done.returned)
        log.log(
            logging.INFO if trigger == "growth" else logging.DEBUG,
            "memory reclaim (%s): %d objects collected in %.0f ms, RSS %s -> %s MiB",
            trigger,
            done.collected,
            done.pause_seconds * 1e3,
            "?" if done.before is None else f"{done.before / 2**20:.0f}",
            "?" if done.after is None else f"{done.after / 2**20:.0f}",
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            trigger = self.due(time.monotonic())
            if trigger is not None:
                await self.reclaim(trigger)


# -- the app's part -----------------------------------------------------------------------


class MemoryGuard:
    """The app's send tracking, activity clock and reclaimer (``app[MEMORY]``)."""

    def __init__(
        self,
        settings: MemorySettings,
        registry_add: Callable[[Collector], None],
        counters: _Counters,
        others: Callable[[], list[tuple[str, int | None]]] = list,
    ):
        self.settings = settings
        self.in_flight = 0
        self.last_activity = time.monotonic()
        self.sends = Sends(settings, counters.cut)
        self.client_gone = counters.client_gone
        self.reclaimer = Reclaimer(settings, self, counters.reclaims, counters.returned)
        registry_add(MemoryCollector(self, others))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.in_flight += 1
        self.reclaimer.idle_done = False
        try:
            yield
        finally:
            self.in_flight -= 1
            self.last_activity = time.monotonic()


@dataclass
class _Counters:
    cut: Counter
    client_gone: Counter
    reclaims: Counter
    returned: Counter


class MemoryCollector(Collector):
    """RSS and the send tracking, read at scrape time."""

    def __init__(self, guard: MemoryGuard, others: Callable[[], list[tuple[str, int | None]]] = list) -> None:
        self.guard = guard
        self.others = others  # (process, RSS) of this server's other processes (an engine process)

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "spectralmc_process_resident_bytes",
            "Resident set size of each of the server's processes: http (the event loop; also the engine when it "
            "runs on a thread there), engine (an engine process)",
            labels=["process"],
        )
        for process, rss in [("http", rss_bytes()), *self.others()]:
            if rss is not None:
                g.add_metric([process], rss)
        yield g
        held = GaugeMetricFamily(
            "spectralmc_send_held_bytes", "Bytes of large answers whose send to the client has not finished"
        )
        held.add_metric([], self.guard.sends.held)
        yield held
        active = GaugeMetricFamily("spectralmc_sends_active", "Large answers being sent now")
        active.add_metric([], len(self.guard.sends.active))
        yield active


MEMORY = web.AppKey("memory", MemoryGuard)


async def memory_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the guard and its reclaimer task."""
    s = app[keys.SETTINGS].memory
    r = app[keys.METRICS].registry
    counters = _Counters(
        cut=Counter(
            "spectralmc_sends_cut",
            "Large answers whose connection the server cut: stalled (send_timeout), evicted (max_send_bytes)",
            ["reason"],
            registry=r,
        ),
        client_gone=Counter(
            "spectralmc_sends_client_gone", "Large answers whose client closed the connection mid-send", registry=r
        ),
        reclaims=Counter(
            "spectralmc_memory_reclaims",
            "Full collections with malloc_trim, by trigger: idle, growth",
            ["trigger"],
            registry=r,
        ),
        returned=Counter(
            "spectralmc_memory_reclaimed_bytes", "RSS given back by reclaims (drop measured around each)", registry=r
        ),
    )
    for reason in ("stalled", "evicted"):
        counters.cut.labels(reason)
    for trigger in ("idle", "growth"):
        counters.reclaims.labels(trigger)
    engine = app.get(keys.ENGINE)

    def others() -> list[tuple[str, int | None]]:
        return [] if engine is None else engine.processes_rss()

    guard = MemoryGuard(s, r.register, counters, others)
    app[MEMORY] = guard
    task = asyncio.create_task(guard.reclaimer.run(), name="memory-reclaimer")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
