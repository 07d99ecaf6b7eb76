"""The two ways anything in a store changes: content-addressed puts and CAS-moved refs.

Both the model version chain (``store/chain.py``, ``store/versions.py``) and the
market-data snapshots (``marketdata/store.py``) are built on these, over the two
conditional writes of the object-store protocol (``store/objects.py``):

- :func:`put_content` stores bytes under ``<prefix>/<sha256 hex>`` with put-if-absent.
  A key names its bytes, so a lost race means the same bytes are already there: every
  writer of the same content succeeds, and a second put is a no-op.
- :func:`create_once` creates a key that is written once (a snapshot record, a
  certificate link) and hands back what a faster writer put there instead.
- :func:`advance_ref` is compare-and-swap on a small pointer object: read it (bytes and
  etag), compute the new bytes, write with put-if-match on the etag read (put-if-absent
  when there is no ref yet). Losing the race (``PreconditionFailedError``: another writer
  moved or created the ref, or it vanished; S3 answers 404 for If-Match on a missing
  key where SeaweedFS answers 412, and both arrive as ``PreconditionFailedError``) reads
  again after a jittered exponential backoff, at most ``attempts`` times, then raises
  :class:`RefContentionError`.

:func:`sha256_hex` is the one content hash of the store: ``"sha256:<64 hex digits>"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

from spectralmc_server.engine.checkpoint import sha256_hex  # the one content hash (store and checkpoints)
from spectralmc_server.store.objects import Blob, ObjectStore, PreconditionFailedError

CAS_ATTEMPTS = 20  # reads-and-writes of a ref before advance_ref gives up
BACKOFF_BASE_SECONDS = 0.005  # the jitter window after the n-th lost race: [0, base * 2**min(n, 6)]
BACKOFF_MAX_DOUBLINGS = 6


class RefContentionError(PreconditionFailedError):
    """:func:`advance_ref` lost the compare-and-swap on every one of its attempts (the
    ref kept changing under it). A :class:`PreconditionFailedError`, so callers that caught
    that before still catch it."""

    def __init__(self, ref: str, attempts: int) -> None:
        super().__init__(f"{ref} kept changing; gave up after {attempts} tries")
        self.ref = ref
        self.attempts = attempts


def content_key(prefix: str, h: str) -> str:
    """Where content of hash ``h`` (with or without its ``sha256:`` tag) lives under ``prefix``."""
    return f"{prefix}/{h.removeprefix('sha256:')}"


async def put_content(objects: ObjectStore, prefix: str, data: bytes, digest: str | None = None) -> str:
    """Store ``data`` at ``<prefix>/<sha256 hex>`` unless it is already there; its hash.

    ``digest``: the hash already computed (large blobs are hashed off the event loop by
    the caller); it must be :func:`sha256_hex` of ``data``. Idempotent and race-free:
    put-if-absent losing means another writer stored these very bytes."""
    h = sha256_hex(data) if digest is None else digest
    with contextlib.suppress(PreconditionFailedError):  # content-addressed: the same bytes are already there
        await objects.put_if_absent(content_key(prefix, h), data)
    return h


async def create_once(objects: ObjectStore, key: str, data: bytes) -> Blob | None:
    """Create ``key`` holding ``data`` unless it exists (put-if-absent): None when this
    call created it, else the object another writer created first, so the caller can
    tell a repeat (same bytes or meaning) from a conflict. A key that vanished again
    before it could be read raises :class:`PreconditionFailedError` (nothing here deletes
    such keys, so that is the caller's to report)."""
    try:
        await objects.put_if_absent(key, data)
    except PreconditionFailedError:
        existing = await objects.get(key)
        if existing is None:
            raise PreconditionFailedError(f"{key} changed while it was written") from None
        return existing
    return None


async def backoff(attempt: int) -> None:
    """Sleep a random time in [0, base * 2**min(attempt, 6)] (full jitter)."""
    await asyncio.sleep(random.uniform(0, BACKOFF_BASE_SECONDS * 2 ** min(attempt, BACKOFF_MAX_DOUBLINGS)))


async def advance_ref(
    objects: ObjectStore,
    ref: str,
    update: Callable[[bytes | None], bytes | None],
    *,
    attempts: int = CAS_ATTEMPTS,
) -> bool:
    """Compare-and-swap ``ref`` forward; True when this call wrote it (a refused write
    after which the ref holds this call's bytes counts: the store client retried a write
    that had landed, whose answer was lost).

    ``update(current)`` gets the ref's bytes (None when it does not exist) and returns
    the bytes to write, or None to leave the ref as it is (it is already at or past
    where the caller wants it: the call returns False). The write is conditional on the
    ref being unchanged since it was read; when another writer got there first, the ref
    is read again and ``update`` asked again, after a jittered backoff. After
    ``attempts`` lost races, :class:`RefContentionError`. Errors from ``update`` (a ref that
    does not parse) and from the store propagate."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    tried: bytes | None = None  # what the last refused write offered
    for attempt in range(attempts):
        blob = await objects.get(ref)
        if tried is not None and blob is not None and blob.data == tried:
            return True  # that write landed, its answer was lost (the store client retried it)
        data = update(None if blob is None else blob.data)
        if data is None:
            return False
        try:
            if blob is None:
                await objects.put_if_absent(ref, data)
            else:
                await objects.put_if_match(ref, data, blob.etag)
            return True
        except PreconditionFailedError:
            tried = data
            if attempt + 1 < attempts:
                await backoff(attempt)
    last = await objects.get(ref)
    if last is not None and last.data == tried:
        return True
    raise RefContentionError(ref, attempts)


__all__ = [
    "BACKOFF_BASE_SECONDS",
    "BACKOFF_MAX_DOUBLINGS",
    "CAS_ATTEMPTS",
    "RefContentionError",
    "advance_ref",
    "content_key",
    "create_once",
    "put_content",
    "sha256_hex",
]
