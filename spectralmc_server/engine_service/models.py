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

A store that cannot be reached at start (``StoreUnavailableError``) does not stop a
replica: each model then serves a fallback, outside its tracker, until the tracker
loads a version from the store: the most recently served version in the local
version cache whose hashes verify (engine_service/version_cache.py; each version
loaded from the store is copied there), else the bundled model (version None). A
fallback must pass the gate like any version; a cache entry that fails its hashes or
the gate is refused with a log line and the next one tried. The tracker keeps polling
with its backoff (an empty store is seeded once it answers); its first version from
the store replaces the fallback. /readyz reports the replica degraded meanwhile,
naming what each model serves (engine_service/views.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spectralmc_server.engine.certificate import gate_failures
from spectralmc_server.engine.checkpoint import Checkpoint, read_dir
from spectralmc_server.engine.device import Budgets, live_tensor_bytes, module_tensors
from spectralmc_server.engine.pricer import bytes_per_row
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.engine.spectrum import SpectrumConfig
from spectralmc_server.engine_service.version_cache import CacheRefusedError, VersionCache
from spectralmc_server.engine_service.views import Directory, TrackerView
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.schemas import MAX_QUANTILE_LEVELS
from spectralmc_server.settings import CertificateSettings
from spectralmc_server.store.objects import ObjectStore, StoreUnavailableError
from spectralmc_server.store.tracker import Check, ModelTracker, Rejection
from spectralmc_server.store.versions import CommitConflictError, VersionStore
from spectralmc_server.training.commit import GateResult, certify_checkpoint

log = logging.getLogger(__name__)
SEED_MESSAGE = "seeded from the bundled model"


SERVED_BYTES_PER_WEIGHT_BYTE = 3  # weights + the block matrices serving caches (2x)


@dataclass(frozen=True)
class Fallback:
    """What a model serves, outside its tracker, because the store could not be reached
    at start: a cached version, the bundled model, or nothing (``model`` None)."""

    store_error: str  # why the store was not used: the error at start
    model: ServedModel | None
    source: str | None  # "cache" or "bundled"; None when nothing could be served
    path: str | None  # the cache entry or bundled checkpoint directory it was read from
    refused: tuple[str, ...]  # cache entries (and the bundled model) refused, and why

    def describe(self) -> dict[str, Any]:
        """As /readyz's ``fallback`` shows it (JSON)."""
        m = self.model
        return {
            "source": self.source,
            "version": None if m is None else m.version,
            "content_hash": None if m is None else m.content_hash,
            "path": self.path,
            "store_error": self.store_error,
            "refused": list(self.refused),
        }


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
        cache: VersionCache | None = None,
        start_without_store: bool = True,
    ) -> None:
        self.objects = objects
        self.cache = cache  # None: versions are not copied to local disk
        # False (a trainer): a store unreachable at start fails the start, no fallback
        self.start_without_store = start_without_store
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
        # name -> what it serves while the store has not answered since start (see the module docstring)
        self.fallback: dict[str, Fallback] = {}
        self._recovering: dict[str, asyncio.Task[None]] = {}  # fallback models waiting for the store
        self._saving: set[asyncio.Task[None]] = set()  # copies to the version cache under way
        for name, tracker in self.trackers.items():
            tracker.polled.append(self._publish)
            tracker.listeners.append(self._on_swap(name))

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
        for name in self.stores:
            await self._seed(name)

    async def _seed(self, name: str) -> bool:
        """Commit the bundled model as version 1 of model ``name`` if its store is empty
        and there is one; True when this call committed it."""
        bundled = bundled_models()
        store = self.stores[name]
        if name not in bundled or await store.head() is not None:
            return False
        ckpt = await asyncio.to_thread(read_dir, bundled[name])
        with contextlib.suppress(CommitConflictError):  # another replica seeded it first
            # Version 1 or nothing: replicas starting together on an empty store all
            # see it empty, and only one of them may seed.
            stored = await store.commit(ckpt, SEED_MESSAGE, only_version=1)
            log.info("seeded model %s version %d from %s", name, stored.version, bundled[name])
            return True
        return False

    async def start(self) -> None:
        """Seed, load and start polling every model; with the store unreachable, serve
        each model's fallback and poll until the store answers (module docstring). Once
        one model finds the store unreachable, the others do not wait on it again."""
        down: StoreUnavailableError | None = None
        for name, tracker in self.trackers.items():
            if down is None:
                try:
                    if self.seed_bundled:
                        await self._seed(name)
                    await tracker.start()
                except StoreUnavailableError as exc:
                    if not self.start_without_store:
                        raise
                    down = exc
                else:
                    tracker.start_polling()
                    continue
            await self._fall_back(name, f"{type(down).__name__}: {down}")
            self._recovering[name] = asyncio.create_task(self._recover(name), name=f"recover:{name}")

    async def stop(self) -> None:
        tasks = [*self._recovering.values(), *self._saving]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._recovering.clear()
        for tracker in self.trackers.values():
            await tracker.stop()

    # -- the version cache and the fallback at start -------------------------------------

    def _on_swap(self, name: str) -> Callable[[int], None]:
        """The tracker's swap listener of model ``name``: the fallback is done with, and
        the version just loaded is copied to the version cache (in the background)."""

        def swapped(version: int) -> None:
            fallback = self.fallback.pop(name, None)
            if fallback is not None:
                log.warning(
                    "model %s: the store answers again: now serving version %d from the store (was %s)",
                    name,
                    version,
                    _source_text(fallback),
                )
            if self.cache is not None:
                task = asyncio.create_task(self._save(name, version), name=f"cache:{name}:{version}")
                self._saving.add(task)
                task.add_done_callback(self._saving.discard)

        return swapped

    async def _save(self, name: str, version: int) -> None:
        cache = self.cache
        if cache is None:
            return
        try:
            path = await cache.save(self.stores[name], version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the copy is a convenience: serving goes on without it
            log.warning(
                "model %s: version %d not copied to the version cache: %s: %s", name, version, type(exc).__name__, exc
            )
        else:
            log.debug("model %s: version %d in the version cache at %s", name, version, path)

    async def _fall_back(self, name: str, store_error: str) -> None:
        """Serve model ``name`` without the store: its most recently served cached version
        that verifies and passes the gate, else the bundled model, else nothing."""
        refused: list[str] = []
        load = self._loader(name)
        check = self.gate(name)
        if self.cache is not None:
            cache = self.cache
            for path in await asyncio.to_thread(cache.candidates, name):
                try:
                    cached = await asyncio.to_thread(cache.read, name, path)
                    rejection = check(cached.version, cached.checkpoint.certificate)
                    if rejection is not None:
                        raise CacheRefusedError(f"{path}: fails the quality gate: {'; '.join(rejection.reasons)}")
                    model = await asyncio.to_thread(load, cached.checkpoint, cached.version)
                except Exception as exc:  # CacheRefusedError, or a load that fails (budget)
                    log.warning("model %s: cached version refused: %s", name, exc)
                    refused.append(str(exc))
                    continue
                self._serve_fallback(name, Fallback(store_error, model, "cache", str(path), tuple(refused)))
                return
        bundled = bundled_models().get(name)
        if bundled is not None:
            try:
                ckpt = await asyncio.to_thread(read_dir, bundled, need_training=False)
                rejection = check(0, ckpt.certificate)
                if rejection is not None:
                    raise CacheRefusedError(f"{bundled}: fails the quality gate: {'; '.join(rejection.reasons)}")
                model = await asyncio.to_thread(load, ckpt, None)
            except Exception as exc:
                log.warning("model %s: the bundled model refused: %s", name, exc)
                refused.append(f"bundled model: {exc}")
            else:
                self._serve_fallback(name, Fallback(store_error, model, "bundled", str(bundled), tuple(refused)))
                return
        self.fallback[name] = Fallback(store_error, None, None, None, tuple(refused))
        log.error(
            "model %s: the store is unreachable (%s) and there is no cached or bundled version to serve: "
            "not ready until the store answers",
            name,
            store_error,
        )

    def _serve_fallback(self, name: str, fallback: Fallback) -> None:
        self.fallback[name] = fallback
        log.warning(
            "model %s: the store is unreachable at start (%s): serving %s until it answers",
            name,
            fallback.store_error,
            _source_text(fallback),
        )

    async def _recover(self, name: str) -> None:
        """Poll the store for model ``name`` with the tracker's backoff until it answers
        (seeding an empty store, as a start would), then poll as usual."""
        tracker = self.trackers[name]
        while True:
            await asyncio.sleep(tracker.backoff_seconds())
            try:
                await tracker.poll_once()  # a swap here ends the fallback (_on_swap)
                if tracker.current is None and self.seed_bundled and await self._seed(name):
                    await tracker.poll_once()
            except Exception:  # counted, logged and reported by the tracker
                continue
            break
        fallback = self.fallback.get(name)
        if fallback is not None:
            log.warning(
                "model %s: the store answers again, with no version to serve yet: still serving %s",
                name,
                _source_text(fallback),
            )
        tracker.start_polling()
        self._recovering.pop(name, None)

    def snapshot(self) -> dict[str, ServedModel]:
        """Process name -> the version to answer with (read once per batch)."""
        out: dict[str, ServedModel] = {}
        for name, tracker in self.trackers.items():
            model = self._served(name, tracker)
            if model is not None:
                out.setdefault(model.process.name, model)
        return out

    def _served(self, name: str, tracker: ModelTracker[ServedModel]) -> ServedModel | None:
        """The tracker's version, else the fallback of a start without the store."""
        cur = tracker.current
        if cur is not None:
            return cur.model
        fallback = self.fallback.get(name)
        return None if fallback is None else fallback.model

    def directory(self) -> Directory:
        """Every served model and its tracker's state, as plain data (engine_service/views.py)."""
        return Directory(tuple(self._view(name, t) for name, t in self.trackers.items()))

    def _view(self, name: str, t: ModelTracker[ServedModel]) -> TrackerView:
        cur = t.current
        served = self._served(name, t)
        fallback = None if cur is not None else self.fallback.get(name)
        return TrackerView(
            name=name,
            mode=t.mode,
            served=None if served is None else served.view,
            forced=tuple(cur.gate) if cur is not None and cur.forced else None,
            swaps=t.swaps,
            last_error=t.last_error,
            consecutive_failures=t.consecutive_failures,
            total_failures=t.total_failures,
            backoff_seconds=t.backoff_seconds(),
            last_good_poll=t.last_good_poll,
            rejected=t.describe_rejection(),
            rejections=dict(t.rejections),
            why_none=None if served is not None else ModelHost._why_none(t, fallback),
            fallback=None if fallback is None else fallback.describe(),
        )

    def _publish(self) -> None:
        """A tracker polled: push the new picture to whoever reads it."""
        directory = self.directory()
        for listener in list(self.on_change):
            listener(directory)

    @staticmethod
    def _why_none(t: ModelTracker[ServedModel], fallback: Fallback | None = None) -> str:
        if t.last_error:
            return t.last_error
        if fallback is not None and t.last_good_poll is None:
            return f"the store is unreachable ({fallback.store_error}) and no cached or bundled version could be served"
        r = t.rejected
        if r is not None:
            return (
                f"version {r.version} fails its quality gate: {'; '.join(r.reasons)}; "
                "serve it anyway only by pinning it with force"
            )
        return "no version in the store yet"


def _source_text(fallback: Fallback) -> str:
    """What a fallback serves, in words (logs)."""
    m = fallback.model
    if m is None:
        return "nothing"
    if fallback.source == "cache":
        return f"cached version {m.version} ({m.content_hash}) from {fallback.path}"
    return f"the bundled model ({m.content_hash}) from {fallback.path}"
