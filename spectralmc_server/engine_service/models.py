"""ModelHost: the served models, each a VersionStore plus a ModelTracker.

At start an empty store is seeded with the bundled model of the same name (version 1),
so a fresh machine serves at once (the bundled models ship their certificates).

No version is served unless its certificate passes the quality gate of
``[certificate.gate]`` (or an admin pinned it with force): each tracker is given the
gate as its check, so a failing or uncertified version is never swapped in, the
current one keeps answering, and the refusal is logged, counted
(``spectralmc_model_rejected_total``) and reported by /readyz. Served versions bound
their answers with ``[certificate.tolerance]``.

Loads are budgeted: each loaded version reserves
its weights in ``model_cache`` (at most the current and the incoming one), and one
inference working set, sized from the ``inference`` cap, bounds the rows the worker
prices at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from spectralmc_server.engine.certificate import gate_failures
from spectralmc_server.engine.checkpoint import Checkpoint, read_dir
from spectralmc_server.engine.device import Budgets, live_tensor_bytes, module_tensors
from spectralmc_server.engine.pricer import bytes_per_row
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.engine_service.views import Directory, TrackerView
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.schemas import MAX_QUANTILE_LEVELS
from spectralmc_server.settings import CertificateSettings
from spectralmc_server.store.objects import ObjectStore
from spectralmc_server.store.tracker import Check, ModelTracker, Rejection
from spectralmc_server.store.versions import CommitConflictError, VersionStore
from spectralmc_server.training.commit import GateResult, certify_checkpoint

log = logging.getLogger(__name__)
SEED_MESSAGE = "seeded from the bundled model"


SERVED_BYTES_PER_WEIGHT_BYTE = 3  # weights + the block matrices serving caches (2x)


class ModelHost:
    """Every served model by name; :meth:`snapshot` is what one batch prices with, and
    :meth:`directory` what the serving side reads (pushed to ``on_change`` after each poll)."""

    def __init__(
        self,
        objects: ObjectStore,
        names: list[str],
        budgets: Budgets,
        *,
        poll_seconds: float,
        seed_bundled: bool,
        max_backoff_seconds: float = 60.0,
        certificate: CertificateSettings | None = None,
    ) -> None:
        self.objects = objects
        self.budgets = budgets
        self.seed_bundled = seed_bundled
        self.certificate = certificate or CertificateSettings()
        # One certification at a time (training commits, admin commits): each takes the
        # CPU for ~30 s, and commits due close together must not pile up beside serving.
        self.certify_lock = asyncio.Lock()
        self.stores = {n: VersionStore(objects, n) for n in names}
        self.trackers: dict[str, ModelTracker[ServedModel]] = {
            n: ModelTracker(
                self.stores[n],
                self._loader(n),
                poll_seconds=poll_seconds,
                max_backoff_seconds=max_backoff_seconds,
                check=self.gate(n),
            )
            for n in names
        }
        # called with a new Directory after every poll of any tracker (engine_service/views.py)
        self.on_change: list[Callable[[Directory], None]] = []
        for tracker in self.trackers.values():
            tracker.polled.append(self._publish)

    def gate(self, name: str) -> Check:
        """The tracker's check for model ``name``: its certificate against its gate."""
        limits = self.certificate.limits(name)

        def check(version: int, cert: dict[str, Any] | None) -> Rejection | None:
            failures = gate_failures(cert, limits)
            if not failures:
                return None
            return Rejection("no_certificate" if cert is None else "gate", tuple(failures))

        return check

    async def certify(self, name: str, ckpt: Checkpoint) -> GateResult:
        """Certify a checkpoint of model ``name`` in a thread (about 30 s: never on the
        event loop), one at a time, and check it against the model's gate."""
        async with self.certify_lock:
            return await asyncio.to_thread(
                certify_checkpoint,
                ckpt,
                model=name,
                points=self.certificate.points,
                limits=self.certificate.limits(name),
            )

    def _loader(self, name: str) -> Any:
        def load(ckpt: Checkpoint, version: int) -> ServedModel:
            spectrum = SpectrumConfig.model_validate(ckpt.manifest["model"]["spectrum"])
            per_row = bytes_per_row(spectrum, MAX_QUANTILE_LEVELS)
            max_rows = self.budgets.inference.reserve_rows("inference working set", per_row)  # raises below one row
            # The weights, plus the packed real block matrices that frozen complex layers
            # cache for serving (twice the weights; the packed biases equal the biases).
            nbytes = SERVED_BYTES_PER_WEIGHT_BYTE * sum(t.numel() * t.element_size() for t in ckpt.model.values())
            cur = self.trackers[name].current
            keep = {f"{name} v{cur.version}"} if cur is not None else set()
            for holder in self.budgets.model_cache.report().holders:
                if holder.startswith(f"{name} v") and holder not in keep:
                    self.budgets.model_cache.release(holder)
            holder = f"{name} v{version}"
            self.budgets.model_cache.reserve(holder, nbytes)
            served = load_served_model(
                ckpt,
                name=name,
                version=version,
                working_bytes=max_rows * per_row,
                tolerance={str(m): v for m, v in self.certificate.tolerance.items()},
            )
            network = served.network
            if network is not None:
                self.budgets.model_cache.track(holder, lambda: live_tensor_bytes(module_tensors(network)))
            return served

        return load

    async def seed(self) -> None:
        """Commit the bundled model as version 1 of every empty store that has one."""
        bundled = bundled_models()
        for name, store in self.stores.items():
            if name not in bundled or await store.head() is not None:
                continue
            ckpt = await asyncio.to_thread(read_dir, bundled[name])
            with contextlib.suppress(CommitConflictError):  # another replica seeded it first
                # Version 1 or nothing: replicas starting together on an empty store all
                # see it empty, and only one of them may seed.
                stored = await store.commit(ckpt, SEED_MESSAGE, only_version=1)
                log.info("seeded model %s version %d from %s", name, stored.version, bundled[name])

    async def start(self) -> None:
        if self.seed_bundled:
            await self.seed()
        for tracker in self.trackers.values():
            await tracker.start()
            tracker.start_polling()

    async def stop(self) -> None:
        for tracker in self.trackers.values():
            await tracker.stop()

    def snapshot(self) -> dict[str, ServedModel]:
        """Process name -> the version to answer with (read once per batch)."""
        out: dict[str, ServedModel] = {}
        for tracker in self.trackers.values():
            cur = tracker.current
            if cur is not None:
                out.setdefault(cur.model.process.name, cur.model)
        return out

    def directory(self) -> Directory:
        """Every served model and its tracker's state, as plain data (engine_service/views.py)."""
        return Directory(tuple(self._view(name, t) for name, t in self.trackers.items()))

    @staticmethod
    def _view(name: str, t: ModelTracker[ServedModel]) -> TrackerView:
        cur = t.current
        return TrackerView(
            name=name,
            mode=t.mode,
            served=None if cur is None else cur.model.view,
            forced=tuple(cur.gate) if cur is not None and cur.forced else None,
            swaps=t.swaps,
            last_error=t.last_error,
            consecutive_failures=t.consecutive_failures,
            total_failures=t.total_failures,
            backoff_seconds=t.backoff_seconds(),
            last_good_poll=t.last_good_poll,
            rejected=t.describe_rejection(),
            rejections=dict(t.rejections),
            why_none=None if cur is not None else ModelHost._why_none(t),
        )

    def _publish(self) -> None:
        """A tracker polled: push the new picture to whoever reads it."""
        directory = self.directory()
        for listener in list(self.on_change):
            listener(directory)

    @staticmethod
    def _why_none(t: ModelTracker[ServedModel]) -> str:
        if t.last_error:
            return t.last_error
        r = t.rejected
        if r is not None:
            return (
                f"version {r.version} fails its quality gate: {'; '.join(r.reasons)}; "
                "serve it anyway only by pinning it with force"
            )
        return "no version in the store yet"
