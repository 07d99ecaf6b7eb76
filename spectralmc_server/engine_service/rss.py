"""A process's resident set size: what the engine reports in its status and the HTTP
process in ``spectralmc_process_resident_bytes`` (service/memory.py)."""

from __future__ import annotations

import os
from pathlib import Path

STATM = Path("/proc/self/statm")


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        return int(STATM.read_bytes().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
