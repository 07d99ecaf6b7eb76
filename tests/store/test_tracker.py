"""ModelTracker: swaps without torn reads, follows pins, rides out store outages."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
import torch
from conftest import Backend, SeaweedFS
from store_util import tiny_files
from test_certificates import cert_for

from spectralmc_server.engine.checkpoint import Checkpoint, read_dir
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.models import bundled_models
from spectralmc_server.pricing.schemas import PriceRequest
from spectralmc_server.pricing.valuation import Valuer
from spectralmc_server.store.objects import StoreUnavailableError
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings
from spectralmc_server.store.tracker import CERTIFICATE_LINK_WAIT, ModelTracker, Rejection
from spectralmc_server.store.versions import VersionNotFoundError, VersionStore


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def weights_of(ckpt: Checkpoint, version: int) -> dict[str, torch.Tensor]:
    """A 'model' whose every output value is the tag its checkpoint was made with."""
    return {k: v.clone() for k, v in ckpt.model.items()}


def answer(model: dict[str, torch.Tensor]) -> set[float]:
    return {float(x) for t in model.values() for x in t.flatten()}


def test_inference_never_sees_a_torn_version(backend: Backend) -> None:
    """Continuous inference while 20 versions are committed: every answer comes from
    exactly one complete version, and versions only move forward."""

    async def go() -> None:
        async with backend.open("s") as writer_objects, backend.open("s") as reader_objects:
            writer = VersionStore(writer_objects, "m")
            await writer.commit_files(tiny_files(1), "v1")
            tracker = ModelTracker(VersionStore(reader_objects, "m"), weights_of, poll_seconds=0.005)
            await tracker.start()
            tracker.start_polling()
            seen: list[int] = []
            stop = asyncio.Event()

            async def infer() -> None:
                while not stop.is_set():
                    cur = tracker.current
                    assert cur is not None
                    await asyncio.sleep(0)  # in-flight work spans swaps
                    values = answer(cur.model)
                    assert values == {float(cur.version)}, (cur.version, values)
                    seen.append(cur.version)

            inference = asyncio.create_task(infer())
            for v in range(2, 21):
                await writer.commit_files(tiny_files(v), f"v{v}")
                await asyncio.sleep(0.02)
            for _ in range(500):
                if tracker.current is not None and tracker.current.version == 20:
                    break
                await asyncio.sleep(0.01)
            stop.set()
            await inference
            await tracker.stop()
            assert tracker.current is not None and tracker.current.version == 20
            assert seen == sorted(seen) and len(set(seen)) >= 5, set(seen)
            assert tracker.status()["consecutive_failures"] == 0 and tracker.swaps >= 5

    run(go())


def needs_certificate(version: int, cert: dict[str, Any] | None) -> Rejection | None:
    return Rejection("no_certificate", ("no certificate",)) if cert is None else None


def test_a_certificate_linked_just_after_the_record_is_waited_for(backend: Backend) -> None:
    """A commit appends the record, then links the certificate: a tracker that reads in
    between (a replica starting while another seeds the store) serves the version once
    the link lands, instead of serving nothing until its next poll. A version that never
    gets one is refused after the wait, and later polls of it do not wait again."""

    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            stored = await vs.commit_files(tiny_files(1), "v1")  # the record, no link yet
            tracker = ModelTracker(vs, weights_of, poll_seconds=3600.0, check=needs_certificate)

            async def link_later() -> None:
                await asyncio.sleep(0.3)
                await vs.attach_certificate(1, cert_for(stored.content_hash))

            linking = asyncio.create_task(link_later())
            await tracker.start()
            await linking
            assert tracker.current is not None and tracker.current.version == 1
            assert tracker.rejected is None and not tracker.rejections

            await vs.commit_files(tiny_files(2), "v2")  # never certified
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await tracker.poll_once() is False
            waited = loop.time() - t0
            assert sum(CERTIFICATE_LINK_WAIT) <= waited < sum(CERTIFICATE_LINK_WAIT) + 5
            assert tracker.rejected is not None and tracker.rejected.version == 2
            assert tracker.current.version == 1 and tracker.rejections == {"no_certificate": 1}
            t0 = loop.time()
            assert await tracker.poll_once() is False
            assert loop.time() - t0 < sum(CERTIFICATE_LINK_WAIT) / 2  # seen: refused at once
            assert tracker.rejections == {"no_certificate": 1}

    run(go())


def test_tracking_follows_the_store_pin_and_pinned_mode_stays(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            for v in range(1, 4):
                await vs.commit_files(tiny_files(v), f"v{v}")
            tracking = ModelTracker(vs, weights_of, poll_seconds=0.01)
            pinned = ModelTracker(vs, weights_of, version=2)
            await tracking.start()
            await pinned.start()
            assert tracking.current is not None and tracking.current.version == 3
            await vs.pin(1, "ops")  # rollback
            assert await tracking.poll_once() is True
            assert tracking.current.version == 1 and answer(tracking.current.model) == {1.0}
            await vs.unpin("ops")
            await vs.commit_files(tiny_files(4), "v4")
            await tracking.poll_once()
            assert tracking.current.version == 4
            await pinned.poll_once()
            assert pinned.current is not None and pinned.current.version == 2
            assert pinned.status()["mode"] == "pinned" and tracking.status()["mode"] == "tracking"

    run(go())


def test_a_missing_pinned_version_is_a_startup_error(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            await vs.commit_files(tiny_files(1), "v1")
            with pytest.raises(VersionNotFoundError, match="no version 5"):
                await ModelTracker(vs, weights_of, version=5).start()
            empty = ModelTracker(VersionStore(objects, "other"), weights_of)
            await empty.start()  # tracking an empty store is not an error: it waits
            assert empty.current is None

    run(go())


def test_serving_continues_through_a_store_outage(
    seaweedfs: SeaweedFS, s3_settings: S3Settings, make_bucket: Any
) -> None:
    """Stop the S3 server: the tracker keeps its version, counts failures and backs off;
    start it again: tracking resumes and picks up a version committed afterwards."""
    bucket = make_bucket()
    fast = S3Settings(**{**s3_settings.__dict__, "max_attempts": 2, "timeout_seconds": 2.0})

    async def go() -> None:
        async with S3ObjectStore(bucket, "t", fast) as objects:
            vs = VersionStore(objects, "m")
            await vs.commit_files(tiny_files(1), "v1")
            tracker = ModelTracker(vs, weights_of, poll_seconds=0.05, max_backoff_seconds=0.5)
            await tracker.start()
            seaweedfs.stop()
            try:
                for expected in (1, 2, 3):
                    with pytest.raises(StoreUnavailableError):
                        await tracker.poll_once()
                    assert tracker.consecutive_failures == expected
                    assert tracker.current is not None and answer(tracker.current.model) == {1.0}
                assert tracker.status()["last_error"].startswith("StoreUnavailableError")
                assert tracker.backoff_seconds() == 0.4  # 0.05 * 2^3, under the 0.5 cap
            finally:
                seaweedfs.start()
            await vs.commit_files(tiny_files(2), "v2")
            assert await tracker.poll_once() is True
            assert tracker.current is not None and tracker.current.version == 2
            assert tracker.consecutive_failures == 0 and tracker.backoff_seconds() == 0.05

    run(go())


def test_tracker_serves_a_pricing_model(backend: Backend) -> None:
    """End to end: the bundled model committed, tracked, and pricing names its version."""

    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "gbm")
            stored = await vs.commit(read_dir(bundled_models()["gbm"]), "bundled")

            def loader(ckpt: Checkpoint, version: int) -> ServedModel:
                return load_served_model(ckpt, name="gbm", version=version)

            tracker = ModelTracker(vs, loader)
            await tracker.start()
            assert tracker.current is not None
            valuer = Valuer({"gbm": tracker.current.model})
            request = PriceRequest.model_validate(
                {"contracts": [{"id": "a", "right": "call", "strike": 100, "spot": 100, "expiry_years": 1, "vol": 0.2}]}
            )
            response = valuer.value(request)
            assert response["models"]["gbm"] == {"version": 1, "content_hash": stored.content_hash}
            assert abs(response["results"][0]["price"] - 7.9656) < 2e-3  # Black-Scholes 7.9656

    run(go())
