"""Object-store fixtures: a real S3 server (SeaweedFS) for the session, and ``backend``,
which runs a test once per storage backend (the lakeFS habit: one conformance suite,
every backend)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from devtools.seaweed import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, boto3_client
from spectralmc_server.store.objects import LocalObjectStore, ObjectStore
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings

__all__ = ["Backend", "SeaweedFS", "boto3_client"]  # imported by the test modules


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real S3 server for the whole session, stopped by PID at the end."""
    root = tmp_path_factory.mktemp("seaweedfs")
    data_dir = root / "data"
    data_dir.mkdir()
    server = SeaweedFS(data_dir, root / "weed.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_settings(seaweedfs: SeaweedFS) -> S3Settings:
    """Settings for the session's SeaweedFS, with short backoff so failures are fast."""
    return S3Settings(
        endpoint_url=seaweedfs.endpoint_url,
        region=REGION,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        base_delay_seconds=0.01,
        max_delay_seconds=0.1,
    )


def unique_bucket_name() -> str:
    """3-63 characters of lowercase letters, digits and '-'."""
    return f"spectralmc-{uuid.uuid4().hex[:20]}"


@pytest.fixture(scope="session")
def make_bucket(seaweedfs: SeaweedFS) -> Callable[[], str]:
    """Create a fresh, uniquely named bucket and return its name."""
    client = boto3_client(seaweedfs.endpoint_url)

    def make() -> str:
        name = unique_bucket_name()
        client.create_bucket(Bucket=name)
        return name

    return make


class Backend:
    """Opens stores of one backend: ``async with backend.open() as store`` gives a fresh,
    empty store; opening the same ``name`` again within a test gives another client of
    that same store (as two servers sharing one bucket or directory would)."""

    def __init__(
        self,
        name: str,
        tmp_path: Path,
        s3_settings: S3Settings | None = None,
        make_bucket: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.s3_settings = s3_settings
        self._make_bucket = make_bucket
        self._locations: dict[str, tuple[str, str]] = {}

    def location(self, name: str | None) -> tuple[str, str]:
        """Where store ``name`` lives, (directory, "") or (bucket, prefix); None: a fresh place."""
        if name is not None and name in self._locations:
            return self._locations[name]
        if self._make_bucket is None:
            where = (str(self.tmp_path / f"store-{uuid.uuid4().hex[:8]}"), "")
        else:
            where = (self._make_bucket(), f"t/{uuid.uuid4().hex}")
        if name is not None:
            self._locations[name] = where
        return where

    @asynccontextmanager
    async def open(self, name: str | None = None) -> AsyncIterator[ObjectStore]:
        location, prefix = self.location(name)
        if self._make_bucket is None:
            store: ObjectStore = LocalObjectStore(Path(location))
            try:
                yield store
            finally:
                await store.close()
        else:
            async with S3ObjectStore(location, prefix, self.s3_settings) as s3_store:
                yield s3_store


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Runs the test once per backend; SeaweedFS starts only when an S3 test runs."""
    if request.param == "local":
        return Backend("local", tmp_path)
    return Backend("s3", tmp_path, request.getfixturevalue("s3_settings"), request.getfixturevalue("make_bucket"))


@pytest.fixture
def object_store(backend: Backend) -> Backend:
    """Another name for ``backend``."""
    return backend
