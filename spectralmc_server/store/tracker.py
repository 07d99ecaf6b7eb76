"""ModelTracker: keep a server's model on the right version, swapping without tearing.

Modes: ``pinned`` (serve version n, whatever happens to the store) and ``tracking``
(serve the store's pinned version if one is set there, else its head, polling every
``poll_seconds``). A new version is loaded into a fresh object (its hashes checked
before anything is deserialised), then one reference is replaced: work that started on
the old version finishes on it, and every answer comes from exactly one complete
version. Store outages are retried with exponential backoff forever; the tracker keeps
serving what it has and reports the failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.store.versions import VersionStore

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Served(Generic[T]):
    """One loaded version: what answers name, and the object that answers."""

    version: int
    content_hash: str
    model: T


class ModelTracker(Generic[T]):
    """Loads versions of one model from a :class:`VersionStore` with ``loader``."""

    def __init__(
        self,
        store: VersionStore,
        loader: Callable[[Checkpoint, int], T],
        *,
        version: int | None = None,
        poll_seconds: float = 5.0,
        max_backoff_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.loader = loader
        self.pinned_version = version
        self.poll_seconds = poll_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._current: Served[T] | None = None
        self.last_good_poll: float | None = None  # Unix time of the last successful poll
        self.consecutive_failures = 0
        self.total_failures = 0
        self.last_error: str | None = None
        self.swaps = 0
        self.listeners: list[Callable[[int], None]] = []  # called with the new version after each swap
        self.store_pinned: int | None = None  # the store's pin as last seen (admin rollback)
        self._task: asyncio.Task[None] | None = None

    @property
    def mode(self) -> str:
        """``pinned`` when this tracker or the store pins a version, else ``tracking``."""
        return "pinned" if self.pinned_version is not None or self.store_pinned is not None else "tracking"

    @property
    def current(self) -> Served[T] | None:
        """The version to answer with: read it once per batch and use that object."""
        return self._current

    async def start(self) -> None:
        """First load. A pinned version that does not exist is an error here, at start-up;
        in tracking mode an empty store is not (the tracker waits for a first version)."""
        if self.pinned_version is not None:
            await self.store.version(self.pinned_version)  # raises VersionNotFound, clearly
        await self.poll_once()

    async def target(self) -> int | None:
        if self.pinned_version is not None:
            return self.pinned_version
        pinned = self.store_pinned = await self.store.pinned()
        if pinned is not None:
            return pinned
        head = await self.store.head()
        return None if head is None else head.version

    async def poll_once(self) -> bool:
        """Look for a different version and swap to it; True when a swap happened."""
        try:
            want = await self.target()
            changed = False
            if want is not None and (self._current is None or self._current.version != want):
                ckpt = await self.store.load(want)
                model = await asyncio.to_thread(self.loader, ckpt, want)
                previous = None if self._current is None else self._current.version
                self._current = Served(want, ckpt.content_hash, model)  # the one swap
                self.swaps += 1
                log.info("model %s: now serving version %d (was %s)", self.store.name, want, previous)
                changed = True
                for listener in list(self.listeners):
                    listener(want)
        except Exception as exc:
            self.consecutive_failures += 1
            self.total_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.consecutive_failures == 1 or self.consecutive_failures % 10 == 0:  # not one line per poll
                log.warning(
                    "model %s: store poll failed (%d in a row; serving %s): %s",
                    self.store.name,
                    self.consecutive_failures,
                    "nothing" if self._current is None else f"version {self._current.version}",
                    self.last_error,
                )
            raise
        if self.consecutive_failures:
            log.warning("model %s: store polls succeed after %d failures", self.store.name, self.consecutive_failures)
        self.consecutive_failures = 0
        self.last_error = None
        self.last_good_poll = time.time()
        return changed

    def backoff_seconds(self) -> float:
        if self.consecutive_failures == 0:
            return self.poll_seconds
        return min(self.max_backoff_seconds, self.poll_seconds * float(2 ** min(self.consecutive_failures, 16)))

    async def run(self) -> None:
        """Poll forever; failures back off and never stop the loop."""
        while True:
            with contextlib.suppress(Exception):
                await self.poll_once()
            await asyncio.sleep(self.backoff_seconds())

    def start_polling(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"tracker:{self.store.name}")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def status(self) -> dict[str, Any]:
        cur = self._current
        return {
            "model": self.store.name,
            "mode": self.mode,
            "version": None if cur is None else cur.version,
            "content_hash": None if cur is None else cur.content_hash,
            "last_good_poll": self.last_good_poll,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "swaps": self.swaps,
        }
