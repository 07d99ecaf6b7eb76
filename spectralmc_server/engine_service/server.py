"""The engine process: ``python -m spectralmc_server.engine_service --fd N``.

The HTTP process starts it with one end of a Unix socket pair as fd N, and sends
:class:`~spectralmc_server.engine_service.protocol.Start` (the settings) first. The engine
opens the store, loads the models (seeding an empty store), resumes online training,
starts its compute worker, answers :class:`~spectralmc_server.engine_service.protocol.Ready`,
then serves calls until :class:`~spectralmc_server.engine_service.protocol.Shutdown` or
until the socket closes (the HTTP process has gone: the engine stops too).

Everything that runs torch runs here, on the compute worker's one thread: pricing jobs,
calibration slices and training steps (so one OpenMP thread team serves them all). The
asyncio loop of this process only reads and writes frames, polls the store and commits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from spectralmc_server.engine.device import Budgets
from spectralmc_server.engine_service.core import EngineCore
from spectralmc_server.engine_service.messages import SNAPSHOTS_KEPT, EngineDeadError, JobFailedError, PriceJob
from spectralmc_server.engine_service.metrics import DEVICE_FAMILIES, EngineMetrics, device_memory_metrics
from spectralmc_server.engine_service.protocol import (
    CALLS,
    PROTOCOL,
    TELLS,
    Call,
    Ready,
    Reply,
    Shutdown,
    Start,
    StartFailed,
    Tell,
)
from spectralmc_server.engine_service.rss import freeze_loaded, malloc_trim_fn, reclaim
from spectralmc_server.engine_service.views import Directory
from spectralmc_server.ipc.framing import FrameProtocol, connect, recv_frame, write_frame
from spectralmc_server.ipc.unpickling import engine_side_allow
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.settings import Settings
from spectralmc_server.store.objects import StoreError, StoreUnavailableError
from spectralmc_server.store.uri import open_store

log = logging.getLogger("spectralmc_server.engine")
RECLAIM_TICK_SECONDS = 1.0  # how often the engine looks whether it has gone idle

# The families the engine owns (counted here, where the events happen); the HTTP process
# renders every other family, and asks the engine for these at each scrape.
ENGINE_FAMILIES = (
    "spectralmc_engine_failures",
    "spectralmc_training_step_duration_seconds",
    "spectralmc_training_rejected",
    "spectralmc_engine_memory_reclaims",
    "spectralmc_engine_memory_reclaimed_bytes",
    *DEVICE_FAMILIES,
)


class _DeviceMemory(Collector):
    """The device's memory where the engine computes (metrics.py device_memory_metrics)."""

    def collect(self) -> Iterator[Metric]:
        yield from device_memory_metrics()


class _EngineFamilies(Collector):
    """The :data:`ENGINE_FAMILIES` of an engine's registry, as they are."""

    def __init__(self, metrics: EngineMetrics, index: int | None) -> None:
        self.metrics = metrics
        self.index = index

    def collect(self) -> Iterator[Metric]:
        for family in self.metrics.registry.collect():
            if family.name not in ENGINE_FAMILIES:
                continue
            if self.index is None:
                yield family
                continue
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(sample.name, {**sample.labels, "engine": str(self.index)}, sample.value)
            yield labelled


def engine_metrics_text(metrics: EngineMetrics, index: int | None = None) -> bytes:
    """The engine's own families in the exposition format; with ``index`` (one engine
    among several) each sample is labelled ``engine="index"``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineFamilies(metrics, index))
    return generate_latest(registry)


class EngineServer:
    """Serves one HTTP process's calls on ``sock`` with an :class:`EngineCore`."""

    def __init__(self, settings: Settings, sock: socket.socket, index: int | None = None) -> None:
        self.settings = settings
        self.index = index
        self.sock = sock
        self.metrics = EngineMetrics()
        self.core: EngineCore | None = None
        self.conn: FrameProtocol | None = None
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.snapshots: dict[str, MarketSnapshot] = {}  # by hash, first in first out (as the HTTP side counts)
        self.calls = 0  # calls being answered (not counting metrics scrapes)
        self.last_call = time.monotonic()
        self.idle_done = True  # nothing has happened since the last idle reclaim
        self._trim = malloc_trim_fn() if settings.memory.malloc_trim else None
        self.metrics.registry.register(_DeviceMemory())

    async def run(self) -> int:
        s = self.settings
        self.conn = await connect(self.sock, self.on_message, self.on_lost, allow=engine_side_allow)
        if s.store is None:
            (s.data_dir / "store").mkdir(parents=True, exist_ok=True)
        try:
            objects = await open_store(s.store_uri, s.s3.client_settings())
        except StoreError as exc:
            self.send(StartFailed(str(exc), store=True))
            await asyncio.sleep(0.1)  # let the frame go out
            return 1
        try:
            core = EngineCore(s, objects, self.metrics, Budgets(s.budgets))
            starting = asyncio.create_task(core.start())
            gone = asyncio.create_task(self.done.wait())
            await asyncio.wait({starting, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # the HTTP process went while the models loaded
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return 0
            gone.cancel()
            error = starting.exception()
            if error is not None:  # said to the HTTP process, which reports it (one line)
                if not isinstance(error, StoreError):
                    log.error("engine %d failed to start", os.getpid(), exc_info=error)
                self.send(StartFailed(f"{error}", store=isinstance(error, StoreError)))
                await asyncio.sleep(0.1)  # let the frame go out
                return 1
            self.core = core
            core.host.on_change.append(self.push_directory)
            # As the HTTP process does (service/app.py gc_ctx): otherwise the first full
            # collection, a few seconds into load, stalled pricing for ~50-100 ms (measured).
            freeze_loaded(s.gc_freeze, s.gc_gen0_threshold)
            self.send(Ready(core.directory(), core.status()))
            log.info("engine %d ready: serving %s", os.getpid(), ", ".join(s.models))
            # until stopped: a commit at shutdown takes ~30 s
            background = [asyncio.create_task(self.tick()), asyncio.create_task(self.reclaim_when_idle())]
            await self.done.wait()
            log.info("engine %d stopping", os.getpid())
            try:
                await core.stop()
            finally:
                for task in background:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            log.info("engine %d stopped", os.getpid())
        finally:
            await objects.close()
        return 0

    # -- sending

    def send(self, msg: object) -> None:
        conn = self.conn
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return
        write_frame(conn.transport, msg)

    def push_directory(self, directory: Directory) -> None:
        self.send(directory)

    async def tick(self) -> None:
        """The status, every ``engine.status_seconds`` (and the HTTP side's heartbeat)."""
        assert self.core is not None
        while True:
            self.send(self.core.status())
            await asyncio.sleep(self.settings.engine.status_seconds)

    async def reclaim_when_idle(self) -> None:
        """Once per idle period (no call for ``memory.reclaim_idle_seconds``), as the HTTP
        process does (service/memory.py): a full collection, and ``malloc_trim`` gives the
        heap pages that pricing large books freed back to the OS. Without it the engine's
        RSS crept up a few MiB per large book (the glibc heap), never given back."""
        idle_seconds = self.settings.memory.reclaim_idle_seconds
        if idle_seconds <= 0:
            return
        while True:
            await asyncio.sleep(RECLAIM_TICK_SECONDS)
            if self.idle_done or self.calls or time.monotonic() - self.last_call < idle_seconds:
                continue
            self.idle_done = True
            done = await reclaim(self._trim)
            self.metrics.memory_reclaims.inc()
            self.metrics.memory_reclaimed.inc(done.returned)
            log.debug(
                "engine memory reclaim: %d objects collected, RSS %s -> %s", done.collected, done.before, done.after
            )

    # -- receiving

    def on_lost(self, exc: Exception | None) -> None:
        if not self.done.is_set():
            log.info("engine %d: the HTTP process has gone (%s): stopping", os.getpid(), exc or "EOF")
            self.done.set()

    def on_message(self, msg: object) -> None:
        core = self.core
        if isinstance(msg, Shutdown):
            self.done.set()
        elif isinstance(msg, Tell) and core is not None and msg.op in TELLS:
            try:
                getattr(core, msg.op)(*msg.args)
            except EngineDeadError as exc:  # a fit that cannot start: its first slice says so
                log.warning("engine: %s refused: %s", msg.op, exc)
            except Exception:  # a bug in one message is not the engine's death
                log.exception("engine: %s failed", msg.op)
        elif isinstance(msg, Call):
            task = asyncio.ensure_future(self.answer(msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            log.error("engine: unexpected message %s", type(msg).__name__)

    async def answer(self, call: Call) -> None:
        if call.op == "metrics":  # a scrape does not end an idle period
            await self._answer(call)
            return
        self.calls += 1
        self.idle_done = False
        try:
            await self._answer(call)
        finally:
            self.calls -= 1
            self.last_call = time.monotonic()

    async def _answer(self, call: Call) -> None:
        core = self.core
        try:
            if core is None:
                raise EngineDeadError("the engine has not started")
            if call.op not in CALLS:
                raise ValueError(f"no such call {call.op!r}")
            if call.op == "metrics":
                value: Any = engine_metrics_text(self.metrics, self.index)
            else:
                args = (self.filled(call.args[0]),) if call.op == "price" else call.args
                got = getattr(core, call.op)(*args)
                value = await got if asyncio.isfuture(got) or asyncio.iscoroutine(got) else got
                if call.op == "poll":  # the directory after the poll goes before the reply
                    self.send(core.directory())
        except EngineDeadError as exc:
            self.send(Reply(call.corr, error="dead", message=str(exc)))
            if core is not None:
                self.send(core.status())
            return
        except JobFailedError as exc:
            if core is not None:  # the failure first: health fails before the answer is out
                self.send(core.status())
            self.send(Reply(call.corr, error="job_failed", message=str(exc)))
            return
        except StoreUnavailableError as exc:  # a commit the store refused: 503 over there, not a bug
            self.send(Reply(call.corr, error="store_unavailable", message=str(exc)))
            return
        except Exception as exc:
            log.exception("engine: %s failed", call.op)
            self.send(Reply(call.corr, error="internal", message=f"{type(exc).__name__}: {exc}"))
            return
        try:
            self.send(Reply(call.corr, value))
        except Exception as exc:  # an answer that cannot be sent (a bug): the call fails, not the link
            log.exception("engine: the answer to %s cannot be sent", call.op)
            self.send(Reply(call.corr, error="internal", message=f"{type(exc).__name__}: {exc}"))

    def filled(self, job: PriceJob) -> PriceJob:
        """The job with each market snapshot in place: the HTTP side sends one once."""
        if all(e.market is None for e in job.entries):
            return job
        entries = []
        for entry in job.entries:
            if entry.market is not None:
                record, snapshot = entry.market
                if snapshot is None:
                    snapshot = self.snapshots[record.hash]
                elif record.hash not in self.snapshots:
                    self.snapshots[record.hash] = snapshot
                    if len(self.snapshots) > SNAPSHOTS_KEPT:
                        del self.snapshots[next(iter(self.snapshots))]
                entry = replace(entry, market=(record, snapshot))  # noqa: PLW2901
            entries.append(entry)
        return replace(job, entries=tuple(entries))


def _start_allow(module: str, name: str) -> bool:
    """The settings also hold paths and secrets."""
    return (
        engine_side_allow(module, name)
        or (module == "pathlib" and name in ("PosixPath", "Path"))
        or (module == "pydantic.types" and name in ("SecretStr", "SecretBytes"))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spectralmc_server.engine_service")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair to the HTTP process")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[engine %(process)d]: %(message)s"
    )
    # Ctrl-C in a terminal goes to the whole process group: the HTTP process drains first,
    # then tells the engine to stop; SIGTERM alone (an operator's) stops it the same way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    try:
        start = recv_frame(sock, allow=_start_allow)
    except (EOFError, OSError) as exc:
        print(f"engine: no start message: {exc}", file=sys.stderr)
        return 1
    if not isinstance(start, Start) or start.protocol != PROTOCOL:
        print(f"engine: expected Start (protocol {PROTOCOL}), got {start!r:.200}", file=sys.stderr)
        return 1

    async def run() -> int:
        server = EngineServer(start.settings, sock, start.index)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.done.set)
        return await server.run()

    try:
        return asyncio.run(run())
    except Exception:
        log.exception("engine %d failed to start or stop", os.getpid())
        return 1
