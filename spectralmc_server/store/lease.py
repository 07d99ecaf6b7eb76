"""A lease in the store: at most one holder at a time, taken over once it expires.

One small JSON object per lease (``models/NAME/leases/gc.json`` for a model's garbage
collection, store/versions.py)::

    {"format": "spectralmc-lease/1", "holder": "schedule on api-1 pid 7",
     "acquired": 1767225600.0, "renewed": 1767225640.0, "expires": 1767225720.0,
     "released": false, "last_round": 1767225600.0}

Every change is a conditional write (store/objects.py), so two writers never both win:

- **acquire**: create the object with put-if-absent (``If-None-Match: *``); or, when it
  exists and has expired or been released, replace it with put-if-match on the etag just
  read (``If-Match``). A lost race raises :class:`LeaseHeldError` naming the winner;
  a refused write whose body is found in the store on the re-read was ours (it landed
  while its answer was lost) and is the acquisition.
- **renew**: put-if-match on the etag of the holder's own last write; a holder whose
  lease was taken over (it expired) gets :class:`LeaseLostError`. A refused write
  re-reads the lease first: when it is still this acquisition (a write of ours landed
  but its answer was lost, e.g. a renewal cancelled in flight), it writes on that etag.
- **release**: put-if-match writing ``"released": true`` and ``expires`` = now. The
  object is not deleted: S3 has no conditional delete everywhere, and an unconditional
  one could remove a lease a later holder took over. The next acquirer takes it over.
  A refused release re-reads the lease as a renewal does (a release that landed is done).

Times are the holders' Unix clocks: ``expires`` is written by the holder and compared
with the reader's own clock. That is sound while the clocks of the machines sharing the
store differ by much less than ``ttl_seconds`` (NTP keeps them within milliseconds;
the default GC lease is 120 s). A holder that crashes leaves its lease until
``expires``; nobody waits longer than that.

``last_round`` is the caller's note carried from holder to holder (the GC schedule writes
the last round it completed there, so that replicas run each round once):
``release(last_round=...)`` sets it, an acquire keeps the previous value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from spectralmc_server.store.objects import ObjectStore, PreconditionFailedError, StoreError

LEASE_FORMAT = "spectralmc-lease/1"
ACQUIRE_ATTEMPTS = 3  # re-reads after a lost conditional write whose winner had already released

log = logging.getLogger(__name__)
Clock = Callable[[], float]


def holder_name(purpose: str) -> str:
    """Who holds a lease, for people: ``"<purpose> on <host> pid <pid>"``."""
    return f"{purpose} on {socket.gethostname()} pid {os.getpid()}"


def iso(t: float) -> str:
    """Unix seconds as RFC 3339 UTC, to the second."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LeaseHeldError(StoreError):
    """Another holder has the lease and it has not expired."""

    def __init__(self, what: str, holder: str, expires: float, now: float) -> None:
        self.what = what
        self.holder = holder
        self.expires = expires
        wait = max(0.0, expires - now)
        super().__init__(
            f"{what} is running elsewhere: its lease is held by {holder!r} until {iso(expires)} "
            f"(expires in {wait:.0f} s unless renewed)"
        )


class LeaseLostError(StoreError):
    """The holder's lease was taken over (it expired) or changed under it."""


@dataclass(frozen=True)
class LeaseState:
    """A lease object as read: its body's fields and the etag a conditional write quotes."""

    holder: str
    acquired: float
    renewed: float
    expires: float
    released: bool
    last_round: float | None
    etag: str

    def live(self, now: float) -> bool:
        return not self.released and now < self.expires


def _decode(data: bytes, etag: str, key: str) -> LeaseState | None:
    """The lease in ``data``; None when it is not a lease (damaged: anyone may replace it)."""
    try:
        body = orjson.loads(data)
        if not isinstance(body, dict) or body.get("format") != LEASE_FORMAT:
            raise ValueError("not a lease")
        rnd = body.get("last_round")
        return LeaseState(
            holder=str(body["holder"]),
            acquired=float(body["acquired"]),
            renewed=float(body["renewed"]),
            expires=float(body["expires"]),
            released=bool(body["released"]),
            last_round=None if rnd is None else float(rnd),
            etag=etag,
        )
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("lease %s is damaged (%s): it is treated as free", key, exc)
        return None


class Lease:
    """The lease at ``key`` as seen by one would-be ``holder`` (see the module docstring).

    One Lease object holds at most one acquisition at a time; ``what`` names the work the
    lease guards, for messages (``"store GC of model 'gbm'"``)."""

    def __init__(
        self,
        objects: ObjectStore,
        key: str,
        holder: str,
        ttl_seconds: float,
        *,
        what: str = "the work",
        clock: Clock = time.time,
    ) -> None:
        if not ttl_seconds > 0:
            raise ValueError(f"a lease's ttl_seconds must be > 0, got {ttl_seconds}")
        self.objects = objects
        self.key = key
        self.holder = holder
        self.ttl = float(ttl_seconds)
        self.what = what
        self.clock = clock
        self.state: LeaseState | None = None  # ours, while we hold it

    async def read(self) -> LeaseState | None:
        """The lease as stored now (None: there is none, or it is damaged)."""
        blob = await self.objects.get(self.key)
        return None if blob is None else _decode(blob.data, blob.etag, self.key)

    def _body(self, acquired: float, now: float, *, released: bool, rnd: float | None) -> bytes:
        return orjson.dumps(
            {
                "format": LEASE_FORMAT,
                "holder": self.holder,
                "acquired": acquired,
                "renewed": now,
                "expires": now if released else now + self.ttl,
                "released": released,
                "last_round": rnd,
            }
        )

    async def acquire(self) -> LeaseState:
        """Take the lease: create it, or take over an expired or released one. Raises
        LeaseHeldError when another holder has it (including another acquisition under
        the same holder name: a lease is not re-entrant)."""
        if self.state is not None:
            raise RuntimeError(f"{self.key}: this Lease already holds it")
        offered: bytes | None = None  # the body of our last refused write
        for _ in range(ACQUIRE_ATTEMPTS):
            blob = await self.objects.get(self.key)
            if offered is not None and blob is not None and blob.data == offered:
                return self._adopt(blob.data, blob.etag)  # it landed; its answer was lost
            current = None if blob is None else _decode(blob.data, blob.etag, self.key)
            now = self.clock()
            if current is not None and current.live(now):
                raise LeaseHeldError(self.what, current.holder, current.expires, now)
            rnd = None if current is None else current.last_round
            data = self._body(now, now, released=False, rnd=rnd)
            try:
                if blob is None:
                    etag = await self.objects.put_if_absent(self.key, data)
                else:
                    etag = await self.objects.put_if_match(self.key, data, blob.etag)
            except PreconditionFailedError:
                offered = data
                continue  # another writer got there first (or ours landed unanswered): read what is there
            if current is not None and not current.released:
                log.warning(
                    "%s: took over the lease of %r, which expired at %s (it did not release it)",
                    self.what,
                    current.holder,
                    iso(current.expires),
                )
            self.state = LeaseState(self.holder, now, now, now + self.ttl, False, rnd, etag)
            return self.state
        blob = await self.objects.get(self.key)
        if offered is not None and blob is not None and blob.data == offered:
            return self._adopt(blob.data, blob.etag)
        current = None if blob is None else _decode(blob.data, blob.etag, self.key)
        now = self.clock()
        if current is not None and current.live(now):
            raise LeaseHeldError(self.what, current.holder, current.expires, now)
        raise LeaseHeldError(self.what, "another holder (it took and released the lease meanwhile)", now, now)

    def _adopt(self, data: bytes, etag: str) -> LeaseState:
        """Our acquiring write, found in the store after the store refused its retry."""
        state = _decode(data, etag, self.key)
        assert state is not None  # the body we wrote
        self.state = state
        return state

    async def renew(self) -> LeaseState:
        """Move our expiry to now + ttl; LeaseLostError when someone else has it now."""
        held = self._held()
        now = self.clock()
        data = self._body(held.acquired, now, released=False, rnd=held.last_round)
        try:
            etag = await self._write_ours(held, data, releasing=False)
        except PreconditionFailedError:
            self.state = None
            raise LeaseLostError(f"{self.what}: the lease was lost (taken over after it expired)") from None
        self.state = LeaseState(self.holder, held.acquired, now, now + self.ttl, False, held.last_round, etag)
        return self.state

    async def release(self, *, last_round: float | None = None) -> None:
        """Give the lease up (``last_round``: the note to leave, else the one carried);
        LeaseLostError when someone else has it now."""
        held = self._held()
        self.state = None
        now = self.clock()
        rnd = held.last_round if last_round is None else last_round
        data = self._body(held.acquired, now, released=True, rnd=rnd)
        try:
            await self._write_ours(held, data, releasing=True)
        except PreconditionFailedError:
            raise LeaseLostError(f"{self.what}: the lease was lost before it was released") from None

    async def _write_ours(self, held: LeaseState, data: bytes, *, releasing: bool) -> str:
        """Replace our lease with ``data``, conditional on its etag; the new etag.

        The etag we know can be stale while the lease is still ours: a write of ours
        landed but its answer did not reach us (a timeout, or a renewal cancelled in
        flight when ``hold`` ends). So a refused write re-reads the lease, and when the
        stored one is still this acquisition (same holder, same ``acquired``, not
        released) writes again on its etag. A release that already landed counts as
        done. Anything else is another holder's: PreconditionFailedError."""
        try:
            return await self.objects.put_if_match(self.key, data, held.etag)
        except PreconditionFailedError:
            current = await self.read()
            if current is None or (current.holder, current.acquired) != (held.holder, held.acquired):
                raise
            if current.released:
                if releasing:
                    return current.etag  # our release landed before
                raise
            return await self.objects.put_if_match(self.key, data, current.etag)

    def _held(self) -> LeaseState:
        if self.state is None:
            raise LeaseLostError(f"{self.what}: the lease is not held")
        return self.state

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[Holding]:
        """Acquire, renew every ttl/3 while the body runs, release at the end (also when
        it fails or is cancelled). A failed renewal sets ``Holding.lost``: a body that
        does its work in steps should stop at the next one."""
        await self.acquire()
        holding = Holding(self)
        renewer = asyncio.create_task(self._renew_loop(holding), name=f"lease:{self.key}")
        try:
            yield holding
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            if self.state is not None:
                try:  # shielded: a cancelled body still gives the lease back
                    await asyncio.shield(self.release(last_round=holding.last_round))
                except (StoreError, OSError) as exc:
                    log.warning("%s: the lease was not released (%s); it expires on its own", self.what, exc)

    async def _renew_loop(self, holding: Holding) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew()
            except LeaseLostError as exc:
                holding.lost = True
                log.error("%s", exc)
                return
            except (StoreError, OSError) as exc:  # the store is down: try again; the lease may still expire
                log.warning("%s: lease renewal failed (%s); retrying", self.what, exc)


@dataclass
class Holding:
    """A lease being held by :meth:`Lease.hold`: ``lost`` once a renewal found it taken
    over; ``last_round``, the note its release leaves (None: keep the previous one)."""

    lease: Lease
    lost: bool = False
    last_round: float | None = None

    @property
    def state(self) -> LeaseState | None:
        return self.lease.state
