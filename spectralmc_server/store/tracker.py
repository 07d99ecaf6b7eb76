"""ModelTracker: keep a server's model on the right version, swapping without tearing.

Modes: ``pinned`` (serve version n, whatever happens to the store) and ``tracking``
(serve the store's pinned version if one is set there, else its head, polling every
``poll_seconds``). A new version is loaded into a fresh object (its hashes checked
before anything is deserialised), then one reference is replaced: work that started on
the old version finishes on it, and every answer comes from exactly one complete
version. Store outages are retried with exponential backoff forever; the tracker keeps
serving what it has and reports the failures.

A ``check`` hook decides which versions may be served at all (the server's quality
gate on a version's certificate, engine_service/models.py): the tracker never swaps to a
version the hook refuses. It keeps serving what it has (nothing, at start), records
the refusal (:attr:`ModelTracker.rejected`, counted by kind in
:attr:`ModelTracker.rejections`), logs it once, and looks again on every poll, since a
version can be certified in place later. A store pin recorded with ``force`` is the
admin's explicit choice and is served without the check; :class:`Served` says so.

A commit appends the version's record first and links its certificate just after
(store/versions.py): a reader in between sees the version without one. So a version
first seen without a certificate, and refused for it, is looked at again a few times
over :data:`CERTIFICATE_LINK_WAIT` before the refusal stands; without that, a replica
starting beside the one that seeds an empty store served nothing until its next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from spectralmc_server.engine.checkpoint import Checkpoint
from spectralmc_server.store.versions import VersionStore

log = logging.getLogger(__name__)

T = TypeVar("T")
# waits (s) before looking again for the certificate of a version first seen without one
CERTIFICATE_LINK_WAIT = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


@dataclass(frozen=True)
class Served(Generic[T]):
    """One loaded version: what answers name, and the object that answers."""

    version: int
    content_hash: str
    model: T
    forced: bool = False  # served by a store pin with force, past the check
    gate: tuple[str, ...] = ()  # why the check refuses it (forced versions only)


@dataclass(frozen=True)
class Rejection:
    """Why ``check`` refuses a version: ``kind`` is a short label (metrics), ``reasons``
    say what an operator must know (logs, /readyz, the admin answers)."""

    kind: str
    reasons: tuple[str, ...]
    version: int = 0  # set by the tracker
    certificate: str | None = None  # the certificate's hash, if any


# (version, its certificate or None) -> None to serve it, or why not
Check = Callable[[int, dict[str, Any] | None], Rejection | None]


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
        check: Check | None = None,
    ) -> None:
        self.store = store
        self.loader = loader
        self.check = check  # None: every version may be served
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
        self.polled: list[Callable[[], None]] = []  # called after every poll, whatever its outcome
        self.store_pinned: int | None = None  # the store's pin as last seen (admin rollback)
        self.store_pin_forced = False  # ... and whether it was forced past the check
        self.rejected: Rejection | None = None  # the version wanted now and refused, if any
        self.rejections: dict[str, int] = {}  # distinct refusals by kind, since start
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
            await self.store.version(self.pinned_version)  # raises VersionNotFoundError, clearly
        await self.poll_once()

    async def target(self) -> int | None:
        if self.pinned_version is not None:
            return self.pinned_version
        entry = await self.store.pin_entry()
        v = None if entry is None else entry.body.get("version")
        pinned = self.store_pinned = v if isinstance(v, int) else None
        self.store_pin_forced = pinned is not None and entry is not None and entry.body.get("force") is True
        if pinned is not None:
            return pinned
        head = await self.store.head()
        return None if head is None else head.version

    async def _refusal(self, want: int, *, link_wait: bool = False) -> Rejection | None:
        """Why ``want`` may not be served (None: it may). Reads the certificate only; with
        ``link_wait``, a refusal of a version without one is looked at again over
        :data:`CERTIFICATE_LINK_WAIT` (a commit links its certificate after the record)."""
        if self.check is None:
            return None
        waits = iter(CERTIFICATE_LINK_WAIT if link_wait else ())
        while True:
            found = await self.store.certificate_with_hash(want)
            cert_hash, cert = (None, None) if found is None else found
            verdict = self.check(want, cert)
            if verdict is None:
                return None
            delay = None if found is not None else next(waits, None)
            if delay is None:
                return replace(verdict, version=want, certificate=cert_hash)
            await asyncio.sleep(delay)

    def _reject(self, rejection: Rejection) -> None:
        """Record a refusal; log and count it once (every poll looks again)."""
        if self.rejected == rejection:  # the same version, certificate and reasons: seen
            return
        self.rejected = rejection
        self.rejections[rejection.kind] = self.rejections.get(rejection.kind, 0) + 1
        cur = self._current
        log.warning(
            "model %s: not serving version %d (%s: %s); serving %s",
            self.store.name,
            rejection.version,
            rejection.kind,
            "; ".join(rejection.reasons),
            "nothing" if cur is None else f"version {cur.version}",
        )

    async def poll_once(self) -> bool:
        """Look for a different version and swap to it; True when a swap happened."""
        try:
            return await self._poll()
        finally:
            for hook in list(self.polled):
                hook()

    async def _poll(self) -> bool:
        try:
            changed = await self._follow()
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

    async def _follow(self) -> bool:
        """One poll's decision: keep, swap to or drop a version. True when what is
        served changed."""
        want = await self.target()
        forced = want is not None and self.pinned_version is None and self.store_pin_forced
        changed = False
        cur = self._current
        if cur is not None and cur.forced and not (forced and cur.version == want):
            # The force that serves it was withdrawn: it is served only if it passes now.
            if await self._refusal(cur.version) is None:
                cur = self._current = replace(cur, forced=False, gate=())
            else:
                log.warning(
                    "model %s: version %d is no longer pinned with force and fails its check: not serving it",
                    self.store.name,
                    cur.version,
                )
                cur = self._current = None
                changed = True
        if want is None:
            self.rejected = None
        elif cur is not None and cur.version == want:
            if forced and not cur.forced:
                rejection = await self._refusal(want)
                if rejection is not None:  # served now because of the force: say so
                    self._current = replace(cur, forced=True, gate=rejection.reasons)
            self.rejected = None
        else:
            first_look = self.rejected is None or self.rejected.version != want
            rejection = await self._refusal(want, link_wait=first_look and not forced)
            if rejection is not None and not forced:
                self._reject(rejection)
            else:
                await self._swap(want, None if cur is None else cur.version, rejection)
                changed = True
        return changed

    async def _swap(self, want: int, previous: int | None, rejection: Rejection | None) -> None:
        """Load version ``want`` and serve it (the one swap), telling the listeners."""
        ckpt = await self.store.load(want)
        model = await asyncio.to_thread(self.loader, ckpt, want)
        gate = () if rejection is None else rejection.reasons
        served = Served(want, ckpt.content_hash, model, forced=rejection is not None, gate=gate)
        self._current = served  # the one swap
        self.rejected = None
        self.swaps += 1
        if rejection is None:
            log.info("model %s: now serving version %d (was %s)", self.store.name, want, previous)
        else:
            log.warning(
                "model %s: now serving version %d (was %s), pinned with force past its check: %s",
                self.store.name,
                want,
                previous,
                "; ".join(gate),
            )
        for listener in list(self.listeners):
            listener(want)

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
            "forced": None if cur is None or not cur.forced else list(cur.gate),
            "rejected": None if self.rejected is None else self.describe_rejection(),
            "rejections": dict(self.rejections),
        }

    def describe_rejection(self) -> dict[str, Any] | None:
        """The version wanted now and refused (JSON), or None."""
        r = self.rejected
        if r is None:
            return None
        return {"version": r.version, "kind": r.kind, "reasons": list(r.reasons), "certificate": r.certificate}
