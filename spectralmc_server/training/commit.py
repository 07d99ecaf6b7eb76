"""Whether a version may be committed (the quality gate), and the one commit step.

Every committer (``spectralmc train --store``, online training and its commit at
shutdown, the admin commit route) runs :func:`commit_certified`: it certifies the
checkpoint (:func:`certify_checkpoint`), checks the certificate against the gate of
``[certificate.gate]``, and commits it when it passes, or, when the committer allows
it (``--allow-unqualified``, the admin route's ``allow_unqualified``), as unqualified
(the version records the gate's failures).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from spectralmc_server.engine.checkpoint import Checkpoint

if TYPE_CHECKING:
    from spectralmc_server.engine.certificate import GateLimit
    from spectralmc_server.store.versions import StoredVersion, VersionStore


@dataclass(frozen=True)
class GateResult:
    """A checkpoint with its certificate attached, and why it fails its gate (empty: it
    passes)."""

    checkpoint: Checkpoint
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        return "passes its quality gate" if self.passed else "fails its quality gate: " + "; ".join(self.failures)


def certify_checkpoint(ckpt: Checkpoint, *, model: str, points: int, limits: Mapping[str, GateLimit]) -> GateResult:
    """Certify ``ckpt`` (engine/certify.py) and check the certificate against ``limits``.

    Blocking, and slow (about 30 s for a GBM model on two CPU cores: the held-out sample
    dominates, not the network): servers call it in a thread, never on the event loop."""
    from spectralmc_server.engine.certificate import gate_failures
    from spectralmc_server.engine.certify import certify
    from spectralmc_server.engine.served import load_served_model

    served = load_served_model(ckpt, name=model, require_certificate=False)
    cert = certify(served, points=points)
    return GateResult(replace(ckpt, certificate=cert), gate_failures(cert, limits))


@dataclass(frozen=True)
class CommitOutcome:
    """What :func:`commit_certified` did: the gate's verdict, and the version it stored
    (None: the gate refused the checkpoint and nothing was committed)."""

    gate: GateResult
    stored: StoredVersion | None

    @property
    def unqualified(self) -> bool:
        """Committed past a failing gate."""
        return self.stored is not None and not self.gate.passed


async def commit_certified(
    store: VersionStore,
    ckpt: Checkpoint,
    message: str,
    *,
    certify: Callable[[Checkpoint], Awaitable[GateResult]],
    allow_unqualified: bool = False,
    on_failure: Callable[[GateResult], None] | None = None,
) -> CommitOutcome:
    """Certify ``ckpt`` with ``certify`` and commit the certified checkpoint (rebased on
    the head) when it passes its gate. A failing one is reported to ``on_failure`` (the
    committer's log line, metric or message), then refused, or with
    ``allow_unqualified`` committed as unqualified with the gate's failures."""
    result = await certify(ckpt)
    if not result.passed:
        if on_failure is not None:
            on_failure(result)
        if not allow_unqualified:
            return CommitOutcome(result, None)
    stored = await store.commit(
        result.checkpoint,
        message,
        rebase=True,
        unqualified=not result.passed,
        gate=None if result.passed else result.failures,
    )
    return CommitOutcome(result, stored)
