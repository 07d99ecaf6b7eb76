"""Certificates in the version store, on both backends: committed with a version or
attached later in place, read back with every load, linked once, checked by verify
(one flipped byte anywhere in a link or a blob is named), and collected with their
version's content by GC.

The certificates here are small hand-built ones (format, model hash, measures: what
``certify.decode`` checks); the real 4,096-point certification runs in
tests/store/test_certify_cli.py."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import orjson
import pytest
from conftest import Backend
from store_util import tiny_files

from spectralmc_server.engine.certificate import CERT_FORMAT, certificate_hash, encode, summary
from spectralmc_server.engine.checkpoint import MANIFEST, Checkpoint, decode, sha256_hex
from spectralmc_server.store.objects import CorruptObjectError, ObjectStore, list_all
from spectralmc_server.store.versions import (
    LINK_FORMAT,
    CertificateExistsError,
    ContentCollectedError,
    VersionError,
    VersionNotFoundError,
    VersionStore,
)
from spectralmc_server.training import history as admin


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def cert_for(model_hash: str, p95: float = 2e-5) -> dict[str, Any]:
    """A small certificate of ``model_hash``; ``p95`` makes different ones."""
    return {
        "format": CERT_FORMAT,
        "model_hash": model_hash,
        "process": "test",
        "sample": {"points": 4096, "seed": 7, "truth": "a test's own"},
        "measures": {
            "price": {"unit": "D F", "p50": 1e-5, "p95": p95, "max": 9e-5, "count": 53248, "cells": [[1e-4]]},
            "delta": {"unit": "D F / S", "p50": 2e-4, "p95": 4e-4, "max": 1e-3, "count": 53248, "cells": [[1e-3]]},
        },
    }


def certified_checkpoint(tag: int) -> tuple[Checkpoint, dict[str, Any]]:
    files = tiny_files(tag)
    cert = cert_for(sha256_hex(files[MANIFEST]))
    return replace(decode(files), certificate=cert), cert


async def flip(objects: ObjectStore, key: str, i: int) -> bytes:
    """Flip the lowest bit of byte ``i`` of ``key``; returns the original bytes."""
    blob = await objects.get(key)
    assert blob is not None, key
    data = bytearray(blob.data)
    data[i] ^= 0x01
    await objects.put_if_match(key, bytes(data), blob.etag)
    return blob.data


async def restore(objects: ObjectStore, key: str, original: bytes) -> None:
    blob = await objects.get(key)
    assert blob is not None
    await objects.put_if_match(key, original, blob.etag)


def test_commit_with_a_certificate_then_load_returns_it(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            ckpt, cert = certified_checkpoint(1)
            stored = await vs.commit(ckpt, "certified")
            h = certificate_hash(cert)
            link_blob = await objects.get(vs.cert_key(1))
            assert link_blob is not None
            link = orjson.loads(link_blob.data)
            assert link == {
                "format": LINK_FORMAT,
                "model": "m",
                "version": 1,
                "record": stored.record_hash,
                "model_hash": stored.content_hash,
                "certificate": h,
            }
            blob = await objects.get(vs.content_key(h))
            assert blob is not None and sha256_hex(blob.data) == h
            assert "certificate" not in stored.record  # the record is as without one
            loaded = await vs.load(1)
            assert loaded.certificate == cert and loaded.content_hash == stored.content_hash
            assert await vs.certificate(1) == cert
            assert await vs.certified() == {1}
            report = await vs.verify()
            assert report.ok and not report.notes, report.problems
            uncertified = await vs.commit_files(tiny_files(2), "not certified")
            assert (await vs.load(uncertified.version)).certificate is None
            assert await vs.certificate(2) is None
            rows = await admin.list_versions(vs)
            assert [(r["certified"], r["unqualified"]) for r in rows] == [(True, False), (False, False)]
            one = await admin.inspect_version(vs, 1)
            assert one["certificate"]["hash"] == h
            assert one["certificate"]["measures"] == summary(cert)["measures"]
            assert one["certificate"]["points"] == 4096 and one["certificate"]["seed"] == 7
            assert (await admin.inspect_version(vs, 2))["certificate"] is None

    run(go())


def test_a_certificate_of_another_model_is_refused_before_anything_is_written(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            files = tiny_files(1)
            with pytest.raises(VersionError, match="certificate is for model"):
                await vs.commit_files(files, "wrong", certificate=cert_for(sha256_hex(tiny_files(2)[MANIFEST])))
            bad = cert_for(sha256_hex(files[MANIFEST]))
            del bad["measures"]
            with pytest.raises(VersionError, match="no measures"):
                await vs.commit_files(files, "malformed", certificate=bad)
            assert await list_all(objects, "models/m/") == []

    run(go())


def test_attach_later_in_place_idempotent_and_never_replaced(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            one = await vs.commit_files(tiny_files(1), "one")
            two = await vs.commit_files(tiny_files(2), "two")
            assert await vs.certificate(1) is None
            cert = cert_for(one.content_hash)
            h = await vs.attach_certificate(1, cert)
            assert h == certificate_hash(cert)
            assert (await vs.load(1)).certificate == cert
            assert [v.version for v in await vs.versions()] == [1, 2]  # no new version: in place
            assert await vs.attach_certificate(1, cert) == h  # the same again: a no-op
            other = cert_for(one.content_hash, p95=3e-5)
            with pytest.raises(CertificateExistsError) as exists:
                await vs.attach_certificate(1, other)
            assert h in str(exists.value) and certificate_hash(other) in str(exists.value)
            assert exists.value.existing == h and exists.value.offered == certificate_hash(other)
            assert await vs.certificate(1) == cert
            # A certificate names the model it certifies: version 2 is another model.
            with pytest.raises(VersionError, match="certificate is for model"):
                await vs.attach_certificate(2, cert)
            assert await vs.certificate(2) is None
            with pytest.raises(VersionNotFoundError):
                await vs.attach_certificate(9, cert_for(two.content_hash))
            # Re-attaching the same certificate restores its blob if it was lost.
            await objects.delete(vs.content_key(h))
            assert not (await vs.verify()).ok
            assert await vs.attach_certificate(1, cert) == h
            report = await vs.verify()
            assert report.ok, report.problems

    run(go())


def test_racing_attaches_link_exactly_one(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open("shared") as a, backend.open("shared") as b:
            one = await VersionStore(a, "m").commit_files(tiny_files(1), "one")
            first, second = cert_for(one.content_hash, 1e-5), cert_for(one.content_hash, 2e-5)
            results = await asyncio.gather(
                VersionStore(a, "m").attach_certificate(1, first),
                VersionStore(b, "m").attach_certificate(1, second),
                return_exceptions=True,
            )
            won = [r for r in results if isinstance(r, str)]
            lost = [r for r in results if isinstance(r, CertificateExistsError)]
            assert len(won) == 1 and len(lost) == 1, results
            assert lost[0].existing == won[0]
            assert certificate_hash(await VersionStore(b, "m").certificate(1) or {}) == won[0]

    run(go())


def test_a_flipped_byte_in_a_certificate_blob_is_caught(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            ckpt, cert = certified_checkpoint(1)
            await vs.commit(ckpt, "certified")
            key = vs.content_key(certificate_hash(cert))
            size = len(orjson.dumps(cert))
            for i in (0, size // 3, size // 2):
                original = await flip(objects, key, i)
                report = await vs.verify()
                assert not report.ok and report.first_bad == 1
                assert [p["object"] for p in report.problems] == [key], report.problems
                assert "SHA-256" in report.problems[0]["reason"]
                with pytest.raises(CorruptObjectError, match="fails its SHA-256"):
                    await vs.load(1)
                with pytest.raises(CorruptObjectError):
                    await vs.certificate(1)
                with pytest.raises(CorruptObjectError):
                    await admin.inspect_version(vs, 1)
                await restore(objects, key, original)
            assert (await vs.verify()).ok
            await objects.delete(key)
            report = await vs.verify()
            assert [(p["object"], "missing" in p["reason"]) for p in report.problems] == [(vs.cert_key(1), True)]
            with pytest.raises(CorruptObjectError, match="missing"):
                await vs.load(1)

    run(go())


def test_a_flipped_byte_anywhere_in_a_link_is_caught(backend: Backend) -> None:
    """Each byte of the link, one at a time: verify names the link, loading refuses."""

    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            ckpt, _ = certified_checkpoint(1)
            await vs.commit(ckpt, "certified")
            await vs.commit_files(tiny_files(2), "next")  # a later version: the damage is still named
            key = vs.cert_key(1)
            blob = await objects.get(key)
            assert blob is not None
            step = 1 if backend.name == "local" else 5  # every byte locally; S3 round trips cost more
            for i in range(0, len(blob.data), step):
                original = await flip(objects, key, i)
                report = await vs.verify()
                assert not report.ok, (i, blob.data[i : i + 1])
                assert [(p["version"], p["object"]) for p in report.problems] == [(1, key)], (i, report.problems)
                with pytest.raises(CorruptObjectError):
                    await vs.certificate(1)
                await restore(objects, key, original)
            assert (await vs.verify()).ok

    run(go())


def test_links_must_match_their_key_and_record(backend: Backend) -> None:
    """A valid link copied to another version's key is not that version's."""

    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            files = tiny_files(1)
            cert = cert_for(sha256_hex(files[MANIFEST]))
            await vs.commit_files(files, "one", certificate=cert)
            await vs.commit_files(files, "same content again")  # same model hash, another record
            blob = await objects.get(vs.cert_key(1))
            assert blob is not None
            await objects.put_if_absent(vs.cert_key(2), blob.data)
            report = await vs.verify()
            assert [(p["version"], p["object"]) for p in report.problems] == [(2, vs.cert_key(2))]
            with pytest.raises(CorruptObjectError, match="another model or version"):
                await vs.load(2)
            await objects.put_if_absent("models/m/certs/stray.json", b"{}")
            assert any(p["object"] == "models/m/certs/stray.json" for p in (await vs.verify()).problems)

    run(go())


def test_gc_collects_certificates_with_their_versions(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            certs = {}
            for i in range(1, 4):
                ckpt, certs[i] = certified_checkpoint(i)
                await vs.commit(ckpt, f"v{i}")
            # Versions 4 and 5: the same content, so one shared certificate blob.
            shared = tiny_files(9)
            shared_cert = cert_for(sha256_hex(shared[MANIFEST]))
            await vs.commit_files(shared, "v4", certificate=shared_cert)
            await vs.commit_files(shared, "v5", certificate=shared_cert)
            orphan = cert_for(sha256_hex(tiny_files(8)[MANIFEST]))  # a blob whose link was never made
            orphan_key = vs.content_key(certificate_hash(orphan))
            await objects.put_if_absent(orphan_key, encode(orphan))
            old_link = await objects.get(vs.cert_key(1))
            assert old_link is not None
            preview = await vs.gc(1, protect=[2], dry_run=True, grace_seconds=3600)
            assert vs.cert_key(1) in preview.deleted_objects and vs.cert_key(3) in preview.deleted_objects
            assert await vs.certified() == {1, 2, 3, 4, 5}  # a dry run deletes nothing
            report = await vs.gc(1, protect=[2], dry_run=False, grace_seconds=3600)
            assert report.collected_versions == [1, 3, 4]
            gone = {vs.cert_key(v) for v in (1, 3, 4)} | {vs.content_key(certificate_hash(certs[v])) for v in (1, 3)}
            assert gone <= set(report.deleted_objects)
            assert await vs.certified() == {2, 5}
            assert await objects.get(vs.content_key(certificate_hash(shared_cert))) is not None  # 5 still uses it
            assert await objects.get(orphan_key) is not None  # young: could be an attach in flight
            assert (await vs.load(5)).certificate == shared_cert
            assert (await vs.load(2)).certificate == certs[2]
            check = await vs.verify()
            assert check.ok and check.collected == [1, 3, 4] and not check.notes, check.problems
            assert (await admin.inspect_version(vs, 1))["certificate"] is None
            assert [r["certified"] for r in await admin.list_versions(vs)] == [False, True, False, False, True]
            with pytest.raises(ContentCollectedError):
                await vs.attach_certificate(1, certs[1])
            # A GC stopped after its markers leaves a collected version's link: a note,
            # and the next GC removes it.
            await objects.put_if_absent(vs.cert_key(1), old_link.data)
            noted = await vs.verify()
            assert noted.ok and any("version 1" in n and "certificate link" in n for n in noted.notes)
            again = await vs.gc(1, protect=[2], dry_run=False, grace_seconds=0)
            assert vs.cert_key(1) in again.deleted_objects and orphan_key in again.deleted_objects
            final = await vs.verify()
            assert final.ok and not final.notes and await vs.certified() == {2, 5}
            assert (await vs.gc(1, protect=[2], dry_run=False, grace_seconds=0)).deleted_objects == []

    run(go())


def test_gc_refuses_to_guess_when_a_kept_versions_link_is_damaged(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            ckpt, _ = certified_checkpoint(1)
            await vs.commit(ckpt, "certified")
            await flip(objects, vs.cert_key(1), 5)
            with pytest.raises(CorruptObjectError, match="run verify"):
                await vs.gc(1, dry_run=True, grace_seconds=0)

    run(go())


def test_unqualified_and_gate_failures_are_recorded(backend: Backend) -> None:
    async def go() -> None:
        async with backend.open() as objects:
            vs = VersionStore(objects, "m")
            qualified = await vs.commit_files(tiny_files(1), "passed", gate=[])
            ckpt, _ = certified_checkpoint(2)
            failing = ["price p95 0.003 > 0.0025"]
            forced = await vs.commit(ckpt, "forced", unqualified=True, gate=failing)
            assert "unqualified" not in qualified.record and qualified.record["metrics"]["gate_failures"] == []
            assert forced.record["unqualified"] is True and forced.record["metrics"]["gate_failures"] == failing
            plain = await vs.commit_files(tiny_files(3), "no gate given")
            assert "gate_failures" not in plain.record["metrics"]
            rows = await admin.list_versions(vs)
            assert [(r["unqualified"], r["certified"]) for r in rows] == [(False, False), (True, True), (False, False)]
            assert (await vs.version(2)).record["unqualified"] is True
            assert (await vs.verify()).ok

    run(go())
