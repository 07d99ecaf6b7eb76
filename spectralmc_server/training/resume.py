"""Which stored version a training run resumes from, and what its versions record of it.

``spectralmc train --store ... --resume WHERE`` and online training (``train.resume_from``)
name the version the same way: ``head`` (the newest version), ``pin`` (the pinned
version; an error when none is pinned), ``served`` (what servers serve: the pinned
version, else the head) or a version number. Resuming from a version other than the head
changes only the state training starts from: every commit is still claimed on top of the
current head (``VersionStore.commit`` with ``rebase``: a compare-and-swap on the head), so
the chain stays linear, and the manifest's run facts (``run.trained_from``, outside the
content hash: engine/checkpoint.py) name the version whose state the commit continued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from spectralmc_server.store.chain import VersionError, VersionNotFoundError

if TYPE_CHECKING:
    from spectralmc_server.engine.checkpoint import Checkpoint
    from spectralmc_server.store.versions import VersionStore

ResumeFrom = Literal["head", "served", "pin"] | int
NAMED = ("head", "served", "pin")


class ResumeError(VersionError):
    """The version to resume from does not exist (no versions, nothing pinned, no such
    number); the message is one line that says which and what to do."""


def parse_resume(text: str) -> ResumeFrom | None:
    """``head``, ``served``, ``pin`` or a version number (1 or more); None otherwise."""
    if text in NAMED:
        return cast("ResumeFrom", text)
    if text.isdigit() and int(text) >= 1:
        return int(text)
    return None


@dataclass(frozen=True)
class ResumePoint:
    """The version a run resumes from, how it was named, and its training state."""

    version: int
    how: str  # "the head", "the pinned version", "version N"
    checkpoint: Checkpoint

    @property
    def trained_from(self) -> dict[str, Any]:
        return trained_from(self.version, self.checkpoint.content_hash)

    def describe(self) -> str:
        return f"version {self.version}" if self.how.startswith("version") else f"version {self.version} ({self.how})"


def trained_from(version: int, content_hash: str) -> dict[str, Any]:
    """The run fact ``trained_from``: the version whose state a checkpoint continued."""
    return {"version": version, "content_hash": content_hash}


async def resume_version(store: VersionStore, where: ResumeFrom) -> tuple[int, str]:
    """The version ``where`` names in ``store`` now, and how it was named (for logs)."""
    if where in ("pin", "served"):
        pinned = await store.pinned()
        if pinned is not None:
            return pinned, "the pinned version"
        if where == "pin":
            raise ResumeError(f"model {store.name!r} is not pinned (servers track the head)")
    if where in ("head", "served"):
        head = await store.head()
        if head is None:
            raise ResumeError(f"model {store.name!r} has no versions in the store")
        return head.version, "the head"
    assert isinstance(where, int)
    try:
        await store.version(where)
    except VersionNotFoundError:
        head = await store.head()
        newest = "it has no versions" if head is None else f"the newest is {head.version}"
        raise ResumeError(f"model {store.name!r} has no version {where} ({newest})") from None
    return where, f"version {where}"


async def resume_point(store: VersionStore, where: ResumeFrom) -> ResumePoint:
    """The training state to resume from (every blob's hash checked). Raises
    :class:`ResumeError` when ``where`` names no version, and the store's errors
    (``ContentCollectedError``, a corrupt blob, an unreachable store) as they come."""
    version, how = await resume_version(store, where)
    ckpt = await store.load(version, need_training=True)
    return ResumePoint(version, how, ckpt)
