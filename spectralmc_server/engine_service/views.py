"""The served models as the HTTP side sees them: plain data pushed by the engine.

The engine owns the model host (engine_service/models.py: stores, trackers, loaded versions).
After every store poll (a swap, a refusal, a failure, a pin) it builds a
:class:`Directory`, a frozen picture of every served model, and pushes it to the
:class:`ModelDirectory` the routes, the batcher, the metrics and the streams read. A
reader takes ``directory.current`` once and reads that one picture, so a response never
mixes two states (``/v1/models``, ``/readyz``), and reading costs no lock and no engine
object: the picture holds :class:`~spectralmc_server.engine.view.ModelView` values only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spectralmc_server.engine.view import ModelView
from spectralmc_server.engine_service.metrics import ModelState


@dataclass(frozen=True, slots=True)
class TrackerView:
    """One served model name: the version it serves and its tracker's state."""

    name: str
    mode: str  # "head" or "pinned" (store/tracker.py)
    served: ModelView | None
    forced: tuple[str, ...] | None  # the gate's reasons when served by a pin with force past them
    swaps: int
    last_error: str | None
    consecutive_failures: int
    total_failures: int
    backoff_seconds: float
    last_good_poll: float | None
    rejected: dict[str, Any] | None  # the version wanted and refused by the gate (JSON), if any
    rejections: dict[str, int]  # refusals by kind, since start
    why_none: str | None  # why nothing is served, when nothing is
    # what is served instead of a store version while the store has not answered since
    # start (engine_service/models.py Fallback.describe: source "cache" or "bundled",
    # version, content_hash, path, store_error, refused); None once a store version serves
    fallback: dict[str, Any] | None = None

    @property
    def source(self) -> str | None:
        """Where the served version came from: "store", "cache", "bundled" (None: nothing served)."""
        if self.served is None:
            return None
        return "store" if self.fallback is None else str(self.fallback["source"])


class Directory:
    """Every served model at one moment (immutable once built)."""

    __slots__ = ("_snapshot", "models")

    def __init__(self, models: tuple[TrackerView, ...]) -> None:
        self.models = models
        snapshot: dict[str, ModelView] = {}
        for m in models:
            if m.served is not None:
                snapshot.setdefault(m.served.process, m.served)
        self._snapshot = snapshot

    def snapshot(self) -> dict[str, ModelView]:
        """Process name -> the version answering it (do not modify)."""
        return self._snapshot

    def not_ready(self) -> str | None:
        """Why the models cannot answer yet, or None."""
        missing = [f"{m.name} ({m.why_none})" for m in self.models if m.served is None]
        return f"no version loaded for {', '.join(missing)}" if missing else None

    def forced(self) -> dict[str, dict[str, Any]]:
        """Models served by a version an admin pinned with force past its gate, and why
        it fails (/readyz names them: answers come from a model that did not qualify)."""
        return {
            m.name: {"version": m.served.version, "gate": list(m.forced)}
            for m in self.models
            if m.served is not None and m.forced is not None
        }

    def rejected(self) -> dict[str, dict[str, Any]]:
        """Models whose wanted version (head or pin) is refused by the gate while another
        (or none) is served: the version, the kind and the reasons."""
        return {m.name: m.rejected for m in self.models if m.rejected is not None}

    def degraded(self) -> list[str]:
        """Models that serve a loaded version but whose last store poll failed, or that
        serve a fallback (a cached version or the bundled model) because the store was
        unreachable at start: answers go on from that version (still ready), and new
        versions wait for the store."""
        out = []
        for m in self.models:
            if m.served is None:
                continue
            if m.fallback is not None:
                out.append(f"{m.name}: {_fallback_text(m)}")
            elif m.consecutive_failures > 0:
                out.append(f"{m.name}: serving version {m.served.version}; {_failing(m)}")
        return out

    def fallbacks(self) -> dict[str, dict[str, Any]]:
        """Models served by a fallback since a start without the store: per model the
        source ("cache" or "bundled"), version, content hash, path, the store's error at
        start, and the cache entries refused (/readyz names them)."""
        return {m.name: dict(m.fallback) for m in self.models if m.served is not None and m.fallback is not None}

    def describe(self) -> list[dict[str, Any]]:
        """One row per model, as /v1/models and the admin answers show it."""
        return [
            {
                "name": m.name,
                "process": None if m.served is None else m.served.process,
                "version": None if m.served is None else m.served.version,
                "content_hash": None if m.served is None else m.served.content_hash,
                "source": m.source,
                "mode": m.mode,
                "domain": None if m.served is None else m.served.domain,
                "swaps": m.swaps,
                "last_error": m.last_error,
                "forced": None if m.forced is None else list(m.forced),
                "rejected": m.rejected,
            }
            for m in self.models
        ]

    def states(self) -> list[ModelState]:
        """What /metrics reports per model."""
        return [
            ModelState(
                name=m.name,
                mode=m.mode,
                version=None if m.served is None else m.served.version,
                content_hash=None if m.served is None else m.served.content_hash,
                swaps=m.swaps,
                poll_failures=m.total_failures,
                consecutive_poll_failures=m.consecutive_failures,
                last_good_poll=m.last_good_poll,
                rejected=dict(m.rejections),
                forced=m.forced is not None,
            )
            for m in self.models
        ]


EMPTY = Directory(())


def _failing(m: TrackerView) -> str:
    return (
        f"{m.consecutive_failures} failed store poll(s) in a row, next try in {m.backoff_seconds:g} s; "
        f"last error: {m.last_error}"
    )


def _fallback_text(m: TrackerView) -> str:
    """A model served by a fallback, in words: what it serves and why not the store."""
    fb = m.fallback or {}
    if fb.get("source") == "cache":
        what = f"serving cached version {fb.get('version')} ({fb.get('content_hash')}) from the local version cache"
    else:
        what = f"serving the bundled model ({fb.get('content_hash')}), version none"
    refused = fb.get("refused") or []
    if refused:
        what += f" ({len(refused)} cached version(s) refused: {'; '.join(refused)})"
    down = f"the store was unreachable at start ({fb.get('store_error')})"
    if m.consecutive_failures > 0:
        return f"{what}; {down}; {_failing(m)}"
    if m.last_good_poll is None:
        return f"{what}; {down}, next try in {m.backoff_seconds:g} s"
    if m.rejected is not None:
        return f"{what}; the store answers, but its version {m.rejected.get('version')} fails the quality gate"
    return f"{what}; the store answers but has no version of {m.name} to serve yet"


class ModelDirectory:
    """The latest :class:`Directory` the engine pushed, and who wants to hear of swaps.

    ``swap_listeners[name]`` are called with the new version when model ``name`` starts
    serving another version (the stream hub requotes then)."""

    def __init__(self) -> None:
        self.current: Directory = EMPTY
        self.swap_listeners: list[Callable[[str, int], None]] = []

    def update(self, directory: Directory, *, renewed: bool = False) -> None:
        """The engine's latest picture. ``renewed``: from an engine started anew (after one
        died), whose versions every reader must take again: each served model counts as
        swapped."""
        before = {m.name: m.served for m in self.current.models}
        self.current = directory
        for m in directory.models:
            old, new = before.get(m.name), m.served
            if new is None or new.version is None or m.name not in before:  # the first picture: no swap
                continue
            if renewed or old is None or (old.version, old.content_hash) != (new.version, new.content_hash):
                for listener in list(self.swap_listeners):
                    listener(m.name, new.version)
