"""ProcessEngine: the engine in a process of its own, started, watched and restarted here.

The HTTP process starts ``python -m spectralmc_server.engine_service`` with one end of a
Unix socket pair, sends it the settings, and waits for it to load its models. From then
on every :class:`~spectralmc_server.service.engine.EngineClient` call is a frame on that
socket (ipc/framing.py: pickle protocol 5, numpy arrays out of band), answered by a frame
with the same correlation id; the engine pushes the served models and its status
whenever they change, and its status every ``engine.status_seconds``.

When the engine dies (the socket closes: SIGKILL, the OOM killer, a crash) or hangs (no
status for ``engine.heartbeat_timeout_seconds``: it is killed), every pending call fails
at once with EngineDeadError and the batcher answers everything queued or in flight 503
``engine_unavailable``; /healthz and /readyz fail. A new engine is started after 0.5, 1,
2, ... s (at most ``engine.max_backoff_seconds``); once the engine has died more than
``engine.max_restarts`` times within ``engine.restart_window_seconds`` the server gives
up: it drains and exits with status 1, for the orchestrator to restart the pod.
What a death loses: the training state since the last commit, and the requests in
flight (answered 503, with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from spectralmc_server.engine_service.messages import (
    DOWN,
    SNAPSHOTS_KEPT,
    CommitRefused,
    Committed,
    EngineDeadError,
    EngineStatus,
    FitSpec,
    JobFailedError,
    PriceJob,
    PriceResult,
    SliceDone,
)
from spectralmc_server.engine_service.metrics import ProcessStats
from spectralmc_server.engine_service.protocol import Call, Ready, Reply, Shutdown, Start, StartFailed, Tell, http_allow
from spectralmc_server.engine_service.views import Directory, ModelDirectory
from spectralmc_server.ipc.framing import FrameProtocol, connect, send_frame, write_frame
from spectralmc_server.service.engine import EngineClient
from spectralmc_server.service.metrics import Metrics
from spectralmc_server.settings import Settings
from spectralmc_server.store.objects import StoreError, StoreUnavailableError

log = logging.getLogger(__name__)


def default_torch_threads(engines: int, http_workers: int = 1) -> int:
    """An engine process's intra-op threads when ``torch_threads`` is not set: the cores
    this process may use, less one per HTTP worker process, shared by every worker's
    engines (at least one each). On 2 cores: 1. An OpenMP team larger than its share spins on cores
    the others need (measured: 2 threads halve single-contract throughput on 2 cores;
    docs/benchmarks.md)."""
    cores = len(os.sched_getaffinity(0))
    return max(1, (cores - http_workers) // (engines * http_workers))


class EngineStartError(RuntimeError):
    """The engine process exited or went silent before it was ready."""


class _Link:
    """One engine process and its connection: events from an older link are ignored."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.conn: FrameProtocol | None = None
        self.ready = False  # Ready received: calls may go
        self.lost = False
        self.sent: dict[str, None] = {}  # market snapshots this engine holds, by hash (first in, first out)


class ProcessEngine(EngineClient):
    """See the module docstring."""

    def __init__(
        self, settings: Settings, models: ModelDirectory, metrics: Metrics, *, index: int | None = None
    ) -> None:
        super().__init__(models)
        if settings.torch_threads is None:
            threads = default_torch_threads(settings.engine.processes, settings.http_workers)
            settings = settings.model_copy(update={"torch_threads": threads})
        self.settings = settings
        self.index = index  # its place in an EnginePool (service/engine_pool.py), if in one
        self.metrics = metrics
        self._status: EngineStatus = DOWN
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._corr = itertools.count(1)
        self._link: _Link | None = None
        self._ready: asyncio.Future[Ready] | None = None
        self._heard = 0.0  # time.monotonic() of the last frame from the engine
        self._deaths: deque[float] = deque()
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._forgotten: list[int] = []  # sent as one Tell at the end of the loop's turn
        self.restarts = 0
        self.on_give_up: Callable[[], None] = lambda: None

    # -- state

    @property
    def status(self) -> EngineStatus:
        return self._status

    @property
    def alive(self) -> bool:
        link = self._link
        return link is not None and link.ready and not link.lost and self._status.alive

    @property
    def training_delay(self) -> float:
        return self._status.training_delay

    @property
    def pid(self) -> int | None:
        return None if self._link is None else self._link.proc.pid

    # -- lifecycle

    async def start(self) -> None:
        """Start the engine and wait until it has loaded its models (start-up errors raise)."""
        await self._spawn()
        self._watch = asyncio.create_task(self._watchdog(), name="engine-watchdog")

    async def _spawn(self) -> None:
        """One engine process, ready; EngineStartError (and nothing left running) if not."""
        s = self.settings
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        link: _Link | None = None
        try:
            level = logging.getLevelName(logging.getLogger("spectralmc_server").getEffectiveLevel()).lower()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spectralmc_server.engine_service",
                "--fd",
                str(theirs.fileno()),
                "--log-level",
                level if level in ("debug", "info", "warning", "error") else "info",
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C or a group kill reaches the server, which stops it
            )
            theirs.close()
            link = self._link = _Link(proc)
            self._ready = asyncio.get_running_loop().create_future()
            start = Start(s, index=self.index)  # the settings first, on the blocking socket
            await asyncio.to_thread(send_frame, ours, start)
            bound = link
            link.conn = await connect(
                ours,
                lambda msg: self._on_message(bound, msg),
                lambda exc: self._on_lost(bound, exc),
                allow=http_allow,
            )
            self._heard = time.monotonic()
            async with asyncio.timeout(s.engine.start_timeout_seconds):
                ready = await self._ready
        except BaseException as exc:
            theirs.close()
            if link is None or link.conn is None:
                ours.close()
            if link is not None:
                link.lost = True
                if link.conn is not None and link.conn.transport is not None:
                    link.conn.transport.close()
                code = await _kill(link.proc)
                if isinstance(exc, (TimeoutError, EngineDeadError, OSError)):
                    raise EngineStartError(
                        f"the engine process did not start (exit status {code}): {exc or 'no answer'}; "
                        "see its log above"
                    ) from None
            raise
        link.ready = True
        self._status = ready.status
        self.models.update(ready.directory, renewed=bool(self._deaths))  # streams requote after a restart
        log.info("engine process %d ready", link.proc.pid)

    async def stop(self) -> None:
        """Ask the engine to stop (it commits on shutdown if configured) and wait for it."""
        self._stopping = True
        for task in (self._watch, self._restart):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        link = self._link
        if link is None:
            return
        conn = link.conn
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            write_frame(conn.transport, Shutdown())
        if link.proc.returncode is None:
            try:
                # the worker's drain, and the training commit at shutdown, each bounded
                s = self.settings
                async with asyncio.timeout(s.shutdown_timeout_seconds + s.train.shutdown_commit_seconds + 30):
                    await link.proc.wait()
            except TimeoutError:
                log.error("engine process %d did not stop in time: killed", link.proc.pid)
                await _kill(link.proc)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    # -- frames

    def _on_message(self, link: _Link, msg: object) -> None:
        if link is not self._link or link.lost:
            return
        self._heard = time.monotonic()
        if isinstance(msg, Reply):
            self._on_reply(msg)
        elif isinstance(msg, EngineStatus):
            self._status = msg
            if link.ready and not msg.alive and msg.failure:  # failed, still connected: start anew
                self._lose(link, f"engine process {link.proc.pid} failed: {msg.failure}")
        elif isinstance(msg, Directory):
            try:
                self.models.update(msg)
            except Exception:  # a listener's bug is not the engine's death
                log.exception("a listener of model changes failed")
        elif isinstance(msg, Ready | StartFailed):
            self._on_start(msg)
        else:
            log.error("engine: unexpected message %s", type(msg).__name__)

    def _on_reply(self, msg: Reply) -> None:
        future = self._calls.pop(msg.corr, None)
        if future is None or future.done():
            return
        if msg.error is None:
            future.set_result(msg.value)
        elif msg.error == "job_failed":
            future.set_exception(JobFailedError(msg.message))
        elif msg.error == "dead":
            future.set_exception(EngineDeadError(msg.message))
        elif msg.error == "store_unavailable":  # the engine's store write failed (a commit)
            future.set_exception(StoreUnavailableError(msg.message))
        else:
            future.set_exception(RuntimeError(f"the engine failed: {msg.message}"))

    def _on_start(self, msg: Ready | StartFailed) -> None:
        if self._ready is None or self._ready.done():
            return
        if isinstance(msg, Ready):
            self._ready.set_result(msg)
        else:
            self._ready.set_exception(StoreError(msg.message) if msg.store else EngineStartError(msg.message))

    def _on_lost(self, link: _Link, exc: Exception | None) -> None:
        self._lose(link, f"engine process {link.proc.pid} lost" + (f": {exc}" if exc else ""))

    def _lose(self, link: _Link, reason: str) -> None:
        """``link``'s engine is gone: fail every pending call, tell the listeners, restart."""
        if link.lost:
            return
        link.lost = True
        if link.conn is not None and link.conn.transport is not None:
            link.conn.transport.close()
        self._status = EngineStatus(
            alive=False,
            failure=reason,
            training_model=None,
            training_note=None,
            training=None,
            training_delay=0.0,
        )
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        if not link.ready:  # still starting: _spawn reports it
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(EngineDeadError(reason))
            return
        if self._stopping:
            return
        log.error("%s; pending work answered 503 engine_unavailable", reason)
        self._lost(reason)
        self._restart = asyncio.create_task(self._restart_engine(link), name="engine-restart")

    def _died(self) -> bool:
        """Count a death; True (and the server told to exit) past engine.max_restarts."""
        e = self.settings.engine
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - e.restart_window_seconds:
            self._deaths.popleft()
        if len(self._deaths) <= e.max_restarts:
            return False
        log.error(
            "the engine died %d times within %g s (engine.max_restarts = %d): giving up, the server exits",
            len(self._deaths),
            e.restart_window_seconds,
            e.max_restarts,
        )
        self.on_give_up()
        return True

    async def _restart_engine(self, dead: _Link) -> None:
        code = await _kill(dead.proc)  # a hung or failed engine, or one whose socket broke
        log.error("engine process %d exited (%s)", dead.proc.pid, _exit(code))
        e = self.settings.engine
        while not self._stopping:
            if self._died():
                return
            await asyncio.sleep(min(0.5 * 2 ** (len(self._deaths) - 1), e.max_backoff_seconds))
            try:
                await self._spawn()
            except Exception as exc:  # counted as a death: a crash loop at start-up ends too
                log.error("engine restart failed: %s", exc)
                continue
            self.restarts += 1
            log.info("engine restarted (restart %d)", self.restarts)
            return

    async def _watchdog(self) -> None:
        """A hung engine (no frame for heartbeat_timeout_seconds once ready) is taken for dead."""
        e = self.settings.engine
        while True:
            await asyncio.sleep(min(e.status_seconds, 1.0))
            link = self._link
            if link is None or not link.ready or link.lost:
                continue
            if time.monotonic() - self._heard > e.heartbeat_timeout_seconds:
                self._lose(link, f"engine process {link.proc.pid} silent for {e.heartbeat_timeout_seconds:g} s")

    def _send(self, msg: object) -> None:
        link = self._link
        if link is None or not link.ready or link.lost or link.conn is None or link.conn.transport is None:
            raise EngineDeadError(self._status.failure or "the engine is not ready")
        write_frame(link.conn.transport, msg)

    def _call(self, op: str, *args: Any) -> asyncio.Future[Any]:
        corr = next(self._corr)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._send(Call(corr, op, args))
        self._calls[corr] = future
        return future

    # -- EngineClient

    def price(self, job: PriceJob) -> asyncio.Future[PriceResult]:
        link = self._link
        if link is not None and any(e.market is not None for e in job.entries):
            entries = []
            for entry in job.entries:  # a snapshot goes once to each engine (it keeps SNAPSHOTS_KEPT)
                if entry.market is not None:
                    record = entry.market[0]
                    if record.hash in link.sent:
                        entry = replace(entry, market=(record, None))  # noqa: PLW2901
                    else:
                        link.sent[record.hash] = None
                        if len(link.sent) > SNAPSHOTS_KEPT:
                            del link.sent[next(iter(link.sent))]
                entries.append(entry)
            job = replace(job, entries=tuple(entries))
        return self._call("price", job)

    def forget(self, reqs: Iterable[int]) -> None:
        """Tell the engine these requests are done, with the others forgotten in the same
        turn of the event loop (one frame for a job's many small requests)."""
        if not self._forgotten:
            asyncio.get_running_loop().call_soon(self._send_forgotten)
        self._forgotten.extend(reqs)

    def _send_forgotten(self) -> None:
        reqs, self._forgotten = self._forgotten, []
        if reqs:
            with contextlib.suppress(EngineDeadError):
                self._send(Tell("forget", (reqs,)))

    def fit_start(self, fit_id: int, spec: FitSpec) -> None:
        self._send(Tell("fit_start", (fit_id, spec)))  # before its first slice: frames keep their order

    def fit_slice(self, fit_id: int, seconds: float) -> asyncio.Future[SliceDone]:
        return self._call("fit_slice", fit_id, seconds)

    def fit_cancel(self, fit_id: int) -> None:
        with contextlib.suppress(EngineDeadError):
            self._send(Tell("fit_cancel", (fit_id,)))

    async def commit(self, model: str, message: str, allow_unqualified: bool) -> Committed | CommitRefused:
        got: Committed | CommitRefused = await self._call("commit", model, message, allow_unqualified)
        return got

    async def poll(self, model: str) -> None:
        await self._call("poll", model)

    def hold(self, seconds: float) -> asyncio.Future[None]:
        return self._call("hold", seconds)

    def processes_rss(self) -> list[tuple[str, int | None]]:
        name = "engine" if self.index is None else f"engine-{self.index}"
        return [(name, self._status.rss_bytes if self.alive else None)]

    def processes_stats(self) -> list[tuple[str, ProcessStats | None]]:
        name = "engine" if self.index is None else f"engine-{self.index}"
        return [(name, self._status.process if self.alive else None)]

    async def metrics_text(self) -> bytes:
        try:
            async with asyncio.timeout(2.0):
                text: bytes = await self._call("metrics")
                return text
        except (EngineDeadError, TimeoutError):
            return b""


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


async def _kill(proc: asyncio.subprocess.Process) -> int | None:
    """SIGKILL ``proc`` unless it has exited, and reap it. (Not ``proc.kill()``: on a
    child that has just exited it reaps the child behind asyncio's watcher's back.)"""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    return await proc.wait()
