"""store/cas.py on both backends (the local directory and a real SeaweedFS S3 server):
content-addressed puts (idempotent, every racing writer of the same bytes succeeds) and
compare-and-swap refs (success, a lost race retried, bounded attempts ending in
RefContentionError, and the precondition answers for If-Match on a missing key: 412 on
SeaweedFS, 404 on AWS, both a failed precondition)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import Backend

from spectralmc_server.store import cas
from spectralmc_server.store.cas import (
    CAS_ATTEMPTS,
    RefContentionError,
    advance_ref,
    content_key,
    create_once,
    put_content,
    sha256_hex,
)
from spectralmc_server.store.objects import ObjectStore, PreconditionFailedError, list_all
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings

WRITERS = 8


@pytest.fixture(autouse=True)
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jitter is still drawn; the tests just do not wait for it."""
    monkeypatch.setattr(cas, "BACKOFF_BASE_SECONDS", 0.0)


def set_to(value: bytes) -> Callable[[bytes | None], bytes | None]:
    """An update that writes ``value`` unless the ref already holds it."""
    return lambda current: None if current == value else value


def test_the_one_hash_helper() -> None:
    data = b"some bytes"
    assert sha256_hex(data) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert content_key("p/content", sha256_hex(data)) == "p/content/" + hashlib.sha256(data).hexdigest()
    assert content_key("p/content", hashlib.sha256(data).hexdigest()) == content_key("p/content", sha256_hex(data))


def test_put_content_is_content_addressed_and_idempotent(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            h = await put_content(store, "m/content", b"weights")
            assert h == sha256_hex(b"weights")
            assert await put_content(store, "m/content", b"weights") == h  # again: a no-op, same answer
            assert await put_content(store, "m/content", b"weights", digest=h) == h
            blob = await store.get(content_key("m/content", h))
            assert blob is not None and blob.data == b"weights"
            assert [k for k, _ in await list_all(store, "m/")] == [content_key("m/content", h)]

    asyncio.run(run())


def test_racing_writers_of_the_same_content_all_succeed(backend: Backend) -> None:
    """Each writer has its own client of the same store (as separate servers would)."""

    async def run() -> None:
        data = b"x" * 100_000

        async def writer() -> str:
            async with backend.open("shared") as store:
                return await put_content(store, "m/content", data)

        hashes = await asyncio.gather(*(writer() for _ in range(WRITERS)))
        assert set(hashes) == {sha256_hex(data)}
        async with backend.open("shared") as store:
            assert [k for k, _ in await list_all(store, "")] == [content_key("m/content", sha256_hex(data))]
            blob = await store.get(content_key("m/content", sha256_hex(data)))
            assert blob is not None and blob.data == data

    asyncio.run(run())


def test_create_once_hands_back_the_first_writers_object(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            assert await create_once(store, "records/a.json", b"first") is None
            existing = await create_once(store, "records/a.json", b"second")
            assert existing is not None and existing.data == b"first"
            blob = await store.get("records/a.json")
            assert blob is not None and blob.data == b"first"

    asyncio.run(run())


def test_advance_ref_creates_moves_and_leaves_alone(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            assert await advance_ref(store, "refs/head", set_to(b"1")) is True  # created
            assert await advance_ref(store, "refs/head", set_to(b"2")) is True  # moved
            assert await advance_ref(store, "refs/head", set_to(b"2")) is False  # already there
            seen: list[bytes | None] = []

            def look(current: bytes | None) -> bytes | None:
                seen.append(current)
                return None

            assert await advance_ref(store, "refs/head", look) is False
            assert seen == [b"2"]
            blob = await store.get("refs/head")
            assert blob is not None and blob.data == b"2"

    asyncio.run(run())


class Meddler:
    """An object store that lets another client change (or delete) ``ref`` after each
    read of it through this one, so the compare-and-swap that follows loses."""

    def __init__(
        self, store: ObjectStore, other: ObjectStore, ref: str, *, delete: bool = False, times: int | None = None
    ) -> None:
        self.store, self.other, self.ref, self.delete_it = store, other, ref, delete
        self.description = store.description
        self.reads = 0
        self.times = times  # how many reads to meddle after (None: every one)

    async def get(self, key: str) -> Any:
        blob = await self.store.get(key)
        if key == self.ref:
            self.reads += 1
            if self.times is None or self.reads <= self.times:
                if self.delete_it:
                    await self.other.delete(key)
                else:
                    current = await self.other.get(key)
                    assert current is not None
                    await self.other.put_if_match(key, current.data + b"+", current.etag)
        return blob

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_lost_race_is_retried_then_succeeds(backend: Backend) -> None:
    """Another writer moves the ref between this writer's read and its write: the etag
    it read is stale, its write fails, and the retry sees the new value and wins."""

    async def run() -> None:
        async with backend.open("shared") as store, backend.open("shared") as other:
            await store.put_if_absent("refs/head", b"1")
            meddler = Meddler(store, other, "refs/head", times=1)
            seen: list[bytes | None] = []

            def update(current: bytes | None) -> bytes | None:
                seen.append(current)
                return b"3"

            assert await advance_ref(meddler, "refs/head", update) is True
            assert seen == [b"1", b"1+"]  # the first write lost to "1+"; the retry read it
            blob = await other.get("refs/head")
            assert blob is not None and blob.data == b"3"

    asyncio.run(run())


def test_advance_ref_gives_up_after_the_bounded_attempts(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open("shared") as store, backend.open("shared") as other:
            await store.put_if_absent("refs/head", b"v")
            meddler = Meddler(store, other, "refs/head")
            with pytest.raises(RefContentionError) as caught:
                await advance_ref(meddler, "refs/head", lambda current: b"mine", attempts=5)
            assert meddler.reads == 6  # 5 tries, and a last look whether the last write landed
            assert isinstance(caught.value, PreconditionFailedError)  # callers catching that still do
            assert caught.value.attempts == 5 and caught.value.ref == "refs/head"
            assert str(caught.value) == "refs/head kept changing; gave up after 5 tries"
            blob = await store.get("refs/head")
            assert blob is not None and blob.data == b"v" + b"+" * 6  # never ours

            with pytest.raises(RefContentionError, match=f"after {CAS_ATTEMPTS} tries"):
                await advance_ref(meddler, "refs/head", lambda current: b"mine")
            assert meddler.reads == 6 + CAS_ATTEMPTS + 1
            with pytest.raises(ValueError, match="at least 1"):
                await advance_ref(store, "refs/head", lambda current: b"mine", attempts=0)

    asyncio.run(run())


def test_a_ref_deleted_under_if_match_is_a_failed_precondition_then_created(backend: Backend) -> None:
    """If-Match on a key that no longer exists: SeaweedFS answers 412, the local store
    its own PreconditionFailedError; advance_ref reads again (nothing there) and creates it."""

    async def run() -> None:
        async with backend.open("shared") as store, backend.open("shared") as other:
            await store.put_if_absent("refs/head", b"old")
            meddler = Meddler(store, other, "refs/head", delete=True, times=1)
            seen: list[bytes | None] = []

            def update(current: bytes | None) -> bytes | None:
                seen.append(current)
                return b"new"

            assert await advance_ref(meddler, "refs/head", update) is True
            assert seen == [b"old", None]
            blob = await store.get("refs/head")
            assert blob is not None and blob.data == b"new"

    asyncio.run(run())


class FakeS3Client:
    """The three calls advance_ref makes through S3ObjectStore, in memory, answering
    If-Match on a missing key the way ``missing_answer`` says: AWS (404 NoSuchKey) or
    SeaweedFS (412 PreconditionFailedError)."""

    def __init__(self, missing_answer: tuple[str, int]) -> None:
        self.objects: dict[str, bytes] = {}
        self.missing_answer = missing_answer
        self.delete_before_next_if_match = False

    @staticmethod
    def error(code: str, status: int, op: str) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, op
        )

    @staticmethod
    def etag(data: bytes) -> str:
        return '"' + hashlib.md5(data).hexdigest() + '"'

    async def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        if Key not in self.objects:
            raise self.error("NoSuchKey", 404, "GetObject")
        data = self.objects[Key]

        class Body:
            async def __aenter__(self) -> Body:
                return self

            async def __aexit__(self, *exc: object) -> None:
                return None

            async def read(self) -> bytes:
                return data

        return {"Body": Body(), "ETag": self.etag(data)}

    async def put_object(self, Bucket: str, Key: str, Body: bytes, **condition: str) -> dict[str, Any]:
        if condition.get("IfNoneMatch") == "*" and Key in self.objects:
            raise self.error("PreconditionFailed", 412, "PutObject")
        if "IfMatch" in condition:
            if self.delete_before_next_if_match:
                self.delete_before_next_if_match = False
                self.objects.pop(Key, None)
            if Key not in self.objects:
                raise self.error(*self.missing_answer, "PutObject")
            if self.etag(self.objects[Key]) != condition["IfMatch"]:
                raise self.error("PreconditionFailed", 412, "PutObject")
        self.objects[Key] = Body
        return {"ETag": self.etag(Body)}


@pytest.mark.parametrize("missing_answer", [("NoSuchKey", 404), ("PreconditionFailed", 412)], ids=["aws", "seaweedfs"])
def test_if_match_on_a_missing_key_is_a_failed_precondition_whatever_the_status(
    missing_answer: tuple[str, int],
) -> None:
    """AWS answers 404 where SeaweedFS answers 412: the S3 store raises
    PreconditionFailedError for both, so advance_ref retries (and creates the ref) for both."""

    async def run() -> None:
        store = S3ObjectStore("bucket", "p", S3Settings(max_attempts=1))
        client = FakeS3Client(missing_answer)
        store._client = client
        with pytest.raises(PreconditionFailedError):
            await store.put_if_match("refs/head", b"x", '"etag"')
        await store.put_if_absent("refs/head", b"old")
        client.delete_before_next_if_match = True  # another writer deletes it under our If-Match
        assert await advance_ref(store, "refs/head", set_to(b"new")) is True
        assert client.objects == {"p/refs/head": b"new"}

    asyncio.run(run())


def test_errors_from_update_propagate(backend: Backend) -> None:
    async def run() -> None:
        async with backend.open() as store:
            await store.put_if_absent("refs/head", b"garbage")

            def update(current: bytes | None) -> bytes | None:
                raise ValueError(f"cannot parse {current!r}")

            with pytest.raises(ValueError, match="cannot parse b'garbage'"):
                await advance_ref(store, "refs/head", update)

    asyncio.run(run())


class RefusedAfterLanding:
    """A store whose conditional replacements land and then answer a failed precondition
    (what the S3 client's retry of a write whose answer was lost meets)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.description = store.description

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        await self.store.put_if_match(key, data, etag)
        raise PreconditionFailedError(f"{key}: 412")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_move_refused_after_it_landed_is_this_calls_even_on_the_last_attempt(backend: Backend) -> None:
    """With one attempt the refused write has no next read to be recognised in: the look
    taken before giving up finds the ref holding its bytes, so the move is reported done
    rather than as contention."""

    async def run() -> None:
        async with backend.open() as store:
            await store.put_if_absent("refs/head", b"1")
            refusing = RefusedAfterLanding(store)
            assert await advance_ref(refusing, "refs/head", set_to(b"2"), attempts=1) is True
            assert await advance_ref(refusing, "refs/head", set_to(b"3"), attempts=3) is True
            blob = await store.get("refs/head")
            assert blob is not None and blob.data == b"3"

    asyncio.run(run())
