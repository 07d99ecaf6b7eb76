"""``spectralmc serve`` with ``http_workers`` above 1: the supervisor of the HTTP workers.

The supervisor binds the address once (SO_REUSEPORT) to check it and to resolve port 0,
keeps that socket (bound, never listening: it takes no connections) so that no other
program takes the port, and starts ``spectralmc serve ... --worker K`` for K = 0..N-1:
worker 0 first (it seeds an empty store), the others once it answers. Each worker binds
the same port with SO_REUSEPORT and a Unix socket in a private run directory
(service/http_workers.py); a worker is ready when that socket answers ``/healthz``.

- SIGTERM or SIGINT to the supervisor: SIGTERM to every worker, each drains as one
  server does; the supervisor exits with the worst of their exit statuses.
- A worker that exits on its own (a crash, its engine given up on, the OOM killer):
  the supervisor stops the others and exits 1, for the orchestrator to restart the
  whole server, as it does when one server process exits.
- The workers run in sessions of their own (a terminal's Ctrl-C reaches the supervisor
  alone, which stops them once) and die with the supervisor (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from spectralmc_server.cli.common import EXIT_FAILURE, EXIT_OK, UsageError
from spectralmc_server.settings import Settings

log = logging.getLogger("spectralmc_server.workers")

POLL = 0.1  # how often the supervisor looks at its workers
STOP_MARGIN = 60.0  # past a worker's own drain and shutdown-commit limits: SIGKILL


def reserve(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, not listening: proof the address
    can be served and, for port 0, the port the workers share. UsageError if not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


def answers(path: Path) -> bool:
    """True when the worker on Unix socket ``path`` answers /healthz with 200."""
    if not path.exists():
        return False
    conn = _UnixHTTP(path, timeout=2.0)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class Supervisor:
    def __init__(self, argv: Sequence[str], settings: Settings) -> None:
        self.argv = list(argv)
        self.settings = settings
        self.count = settings.http_workers
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.run_dir = Path(tempfile.mkdtemp(prefix="spectralmc-http-"))

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s: stopping the %d HTTP workers", signal.Signals(signum).name, len(self.procs))
        self.stopping = True

    def spawn(self, index: int, port: int) -> None:
        cmd = [sys.executable, "-m", "spectralmc_server.cli", *self.argv, "--port", str(port)]
        cmd += ["--worker", str(index), "--worker-dir", str(self.run_dir)]
        self.procs[index] = subprocess.Popen(cmd, start_new_session=True)

    def exited(self) -> tuple[int, int] | None:
        """(index, status) of a worker that has exited, if one has."""
        for k, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return k, code
        return None

    def wait_ready(self, indexes: list[int]) -> bool:
        """Until each worker answers (True), or one exits, or a signal, or the start limit."""
        deadline = time.monotonic() + self.settings.engine.start_timeout_seconds + STOP_MARGIN
        waiting = set(indexes)
        while waiting:
            if self.stopping:
                return False
            gone = self.exited()
            if gone is not None:
                log.error("HTTP worker %d exited while starting (%s)", gone[0], _status(gone[1]))
                return False
            if time.monotonic() > deadline:
                log.error("HTTP workers %s did not start in time", sorted(waiting))
                return False
            waiting = {k for k in waiting if not answers(self.run_dir / f"http-{k}.sock")}
            if waiting:
                time.sleep(POLL)
        return True

    def stop(self) -> int:
        """SIGTERM to every worker still running, then wait (SIGKILL past the limit)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        s = self.settings
        deadline = time.monotonic() + s.shutdown_timeout_seconds + s.train.shutdown_commit_seconds + STOP_MARGIN
        worst = EXIT_OK
        for k, proc in self.procs.items():
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("HTTP worker %d did not stop in time: killed", k)
                proc.kill()
                code = proc.wait()
            if code != 0:
                worst = max(worst, EXIT_FAILURE if code < 0 else code)
        return worst

    def run(self) -> int:
        s = self.settings
        sock = reserve(s.host, s.port)
        port = sock.getsockname()[1]
        previous = {sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.spawn(0, port)
            ready = self.wait_ready([0])
            if ready:
                for k in range(1, self.count):
                    self.spawn(k, port)
                ready = self.wait_ready(list(range(1, self.count)))
            if not ready:
                code = self.stop()
                return code if self.stopping else EXIT_FAILURE
            log.info("listening on http://%s:%d with %d HTTP workers", s.host, port, self.count)
            while not self.stopping:
                gone = self.exited()
                if gone is not None:
                    log.error(
                        "HTTP worker %d exited (%s): stopping the others; the server exits 1", gone[0], _status(gone[1])
                    )
                    self.stop()
                    return EXIT_FAILURE
                time.sleep(POLL)
            return self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"


def die_with_parent() -> None:
    """A worker gets SIGTERM when its supervisor dies (Linux), so no worker outlives it."""
    import ctypes
    import os

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before prctl: stop now
        raise SystemExit(EXIT_FAILURE)
