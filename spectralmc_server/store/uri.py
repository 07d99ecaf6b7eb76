"""Store URIs: ``file:///absolute/path`` and ``s3://bucket/prefix`` (docs/api.md)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from spectralmc_server.store.objects import LocalObjectStore, ObjectStore
from spectralmc_server.store.s3 import S3ObjectStore, S3Settings

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class InvalidStoreURIError(ValueError):
    """A store URI that names no usable store."""


def parse_store_uri(uri: str) -> tuple[str, str, str]:
    """(scheme, location, prefix): ("file", "/abs/path", "") or ("s3", bucket, prefix)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidStoreURIError(f"{uri!r}: a file URI names a local path, file:///absolute/path")
        path = unquote(parsed.path)
        if not path.startswith("/"):
            raise InvalidStoreURIError(f"{uri!r}: the path must be absolute, file:///absolute/path")
        return "file", path, ""
    if parsed.scheme == "s3":
        if not BUCKET_RE.match(parsed.netloc):
            raise InvalidStoreURIError(f"{uri!r}: {parsed.netloc!r} is not a valid S3 bucket name")
        return "s3", parsed.netloc, parsed.path.strip("/")
    raise InvalidStoreURIError(f"{uri!r}: use file:///absolute/path or s3://bucket/prefix")


async def open_store(uri: str, s3: S3Settings | None = None) -> ObjectStore:
    """Open the object store a URI names (close it with ``await store.close()``)."""
    scheme, location, prefix = parse_store_uri(uri)
    if scheme == "file":
        return LocalObjectStore(Path(location))
    return await S3ObjectStore(location, prefix, s3).open()
