"""When a training run commits versions, and what their messages say.

A due commit is certified and gated before it is stored (training/commit.py): the
policy only decides when one is due, and remembers what was committed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

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
