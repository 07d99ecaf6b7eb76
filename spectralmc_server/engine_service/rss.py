"""What a process reads about itself: its resident set size, CPU time, open file
descriptors and Python garbage collections.

The engine reports them in its status (engine_service/metrics.py ``process_stats``); the
HTTP process reads its own at each scrape (``spectralmc_process_*`` and
``spectralmc_python_gc_*``, service/metrics.py; RSS in service/memory.py). Each process
reads only itself, so no process needs access to another's ``/proc``. Where a figure
cannot be read it is None (and not exported): RSS needs Linux's ``/proc/self/statm``;
open descriptors ``/proc/self/fd`` (Linux) or ``/dev/fd`` (macOS, the BSDs); CPU time
and the GC counts work everywhere.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STATM = Path("/proc/self/statm")
FD_DIRS = (Path("/proc/self/fd"), Path("/dev/fd"))


def freeze_loaded(freeze: bool, gen0_threshold: int) -> tuple[int, int, int]:
    """Once start-up has loaded everything (torch, the models, the modules): with
    ``freeze``, collect and freeze it out of the cyclic GC's reach, and make young
    collections rarer (settings ``gc_freeze``, ``gc_gen0_threshold``). Full collections
    over those objects otherwise stall the process for 50-100+ ms under load (measured in
    both the HTTP and engine processes). The thresholds before, to undo it."""
    previous: tuple[int, int, int] = gc.get_threshold()
    if freeze:
        gc.collect()
        gc.freeze()
    gc.set_threshold(gen0_threshold, *previous[1:])
    return previous


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        return int(STATM.read_bytes().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds() -> float:
    """CPU time this process has used, user and system, all its threads together."""
    t = os.times()
    return t.user + t.system


def open_fds() -> int | None:
    """File descriptors this process has open (not counting the one that lists them);
    None where there is no descriptor directory to list."""
    for d in FD_DIRS:
        try:
            return max(0, sum(1 for _ in d.iterdir()) - 1)
        except OSError:
            continue
    return None


def max_fds() -> int | None:
    """The soft limit on open descriptors (RLIMIT_NOFILE); None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def gc_generations() -> tuple[tuple[int, int, int], ...]:
    """Python's cyclic GC per generation (0, 1, 2): collections run, objects collected,
    objects found uncollectable, since the process started."""
    return tuple((int(s["collections"]), int(s["collected"]), int(s["uncollectable"])) for s in gc.get_stats())


def malloc_trim_fn() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (gives freed heap pages back to the OS), where there is one.
    Both processes reclaim with it once idle (service/memory.py, engine_service/server.py)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


@dataclass(frozen=True)
class Reclaimed:
    """What one :func:`reclaim` did."""

    collected: int  # objects the full collection freed
    pause_seconds: float  # the collection's time on the calling thread (the event loop's pause)
    before: int | None  # RSS, bytes (None where it cannot be read)
    after: int | None

    @property
    def returned(self) -> int:
        """RSS given back (0 where unknown or where it grew meanwhile)."""
        return 0 if self.before is None or self.after is None else max(0, self.before - self.after)


async def reclaim(trim: Callable[[int], int] | None) -> Reclaimed:
    """A full collection on this thread, then ``trim`` (:func:`malloc_trim_fn`'s) in a
    worker thread: freed heap pages go back to the OS. How both processes reclaim."""
    before = rss_bytes()
    t0 = time.perf_counter()
    collected = gc.collect()
    pause = time.perf_counter() - t0
    if trim is not None:
        await asyncio.to_thread(trim, 0)
    return Reclaimed(collected, pause, before, rss_bytes())
