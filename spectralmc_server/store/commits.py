"""When a training run commits versions, what their messages say, and whether a
version may be committed at all (the quality gate).

Every committer (``spectralmc train --store``, online training, the admin commit
route) certifies a checkpoint with :func:`certify_checkpoint` before committing it,
and commits it only when its certificate passes the gate of ``[certificate.gate]``
(or, from the command line, with ``--allow-unqualified``, recorded in the version).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from spectralmc_server.engine.checkpoint import Checkpoint

if TYPE_CHECKING:
    from spectralmc_server.engine.certify import GateLimit

DEFAULT_MESSAGE = "step {step}: loss {loss:.3g}, validation p95 {val_bp:.3f} bp"


@dataclass
class CommitPolicy:
    """Commit every ``every_steps`` steps and/or every ``every_seconds`` seconds (and at
    the end when ``final``); with ``only_if_improved`` a due commit is skipped unless the
    validation p95 error is below the best committed so far."""

    every_steps: int | None = None
    every_seconds: float | None = None
    only_if_improved: bool = False
    final: bool = True
    message: str = DEFAULT_MESSAGE
    _last_time: float = field(default_factory=time.monotonic, init=False)
    # validation p95 of each committed version: the best is their minimum, so a commit the
    # gate refuses after the fact can be taken back (:meth:`withdraw`)
    _committed_bp: list[float] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def _best_bp(self) -> float:
        with self._lock:
            return min(self._committed_bp, default=float("inf"))

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ValueError(f"commit every N steps needs N >= 1, got {self.every_steps}")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ValueError(f"commit every T seconds needs T > 0, got {self.every_seconds}")
        self.render(step=0, loss=0.0, val_bp=0.0)  # a bad template fails now, not mid-run

    def render(self, *, step: int, loss: float, val_bp: float) -> str:
        try:
            return self.message.format(step=step, loss=loss, val_bp=val_bp)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"commit message template {self.message!r} is invalid ({exc}); use {{step}}, {{loss}}, {{val_bp}}"
            ) from None

    def due(self, step: int, val_bp: float | None, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_time = self.every_seconds is not None and now - self._last_time >= self.every_seconds
        if not (by_steps or by_time):
            return False
        return not self.only_if_improved or self.improves(val_bp)

    def improves(self, val_bp: float | None) -> bool:
        return val_bp is not None and val_bp < self._best_bp

    def committed(self, val_bp: float | None, now: float | None = None) -> None:
        self._last_time = time.monotonic() if now is None else now
        if val_bp is not None:
            with self._lock:
                self._committed_bp.append(val_bp)

    def refused(self, now: float | None = None) -> None:
        """A due commit the gate refused: the clock restarts (the next try is a full
        interval later, not at the next step), and the best stays what it was."""
        self._last_time = time.monotonic() if now is None else now

    def withdraw(self, val_bp: float | None) -> None:
        """Take back a :meth:`committed` the gate then refused (online training marks a
        commit before it is certified): ``only_if_improved`` compares with what was
        committed, not with what was refused."""
        if val_bp is None:
            return
        with self._lock:
            if val_bp in self._committed_bp:
                self._committed_bp.remove(val_bp)

    def summary(self) -> dict[str, Any]:
        return {
            "every_steps": self.every_steps,
            "every_seconds": self.every_seconds,
            "only_if_improved": self.only_if_improved,
            "final": self.final,
        }


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
    from spectralmc_server.engine.certify import certify, gate_failures
    from spectralmc_server.engine.pricer import load_served_model

    served = load_served_model(ckpt, name=model, require_certificate=False)
    cert = certify(served, points=points)
    return GateResult(replace(ckpt, certificate=cert), gate_failures(cert, limits))
