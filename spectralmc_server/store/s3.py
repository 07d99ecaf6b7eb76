"""The S3 backend of the object-store protocol, through aioboto3.

Conditional writes use the S3 headers ``If-None-Match: *`` (create if absent) and
``If-Match: <etag>`` (replace if unchanged). A failed precondition is 412 on AWS and
SeaweedFS, and 404 on AWS for If-Match on a missing key: both raise
:class:`PreconditionFailedError`. Throttling, 5xx answers and dropped connections are
retried a bounded number of times with exponential backoff and jitter; anything else
(access denied, no such bucket) fails at once with the server's reason.

What the environment causes (credentials or permissions refused, a missing bucket,
throttling or 5xx answers past the retries, an endpoint that cannot be reached) raises
:class:`StoreUnavailableError` whose message names S3's error code or the connection
error ("store refused access (AccessDenied)", "store throttled (SlowDown)", "store
unreachable (EndpointConnectionError)"): the server answers it 503
``store_unavailable`` on every route, never 500.
"""

from __future__ import annotations

import asyncio
import os
import random
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from spectralmc_server.store.objects import (
    MAX_PAGE,
    Blob,
    Page,
    PreconditionFailedError,
    StoreError,
    StoreUnavailableError,
    check_key,
    check_prefix,
)

THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
# the credentials or permissions refused (not retried: the keys must be fixed)
REFUSED = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidSecurity",
    "InvalidToken",
    "RequestTimeTooSkewed",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
}
RETRYABLE = THROTTLING | {"RequestTimeout", "InternalError", "ServiceUnavailable", "ConditionalRequestConflict"}
TRANSIENT_EXC = (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError, OSError)


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach S3; unset fields fall back to the standard AWS variables
    (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_attempts: int = 5  # per operation, the first try included
    base_delay_seconds: float = 0.1  # backoff doubles from here ...
    max_delay_seconds: float = 2.0  # ... up to this, with full jitter
    timeout_seconds: float = 30.0  # connect and read timeout of one attempt

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


def _status(exc: ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    return str(err.get("Code", "")), int(meta.get("HTTPStatusCode", 0))


class S3ObjectStore:
    """Objects under ``s3://bucket/prefix``. Use ``async with`` or call :meth:`open`."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.settings = settings or S3Settings()
        self.description = f"s3://{bucket}/{self.prefix}"
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self.retries = 0  # retried attempts, for metrics and tests

    async def open(self) -> S3ObjectStore:
        s = self.settings
        session = aioboto3.Session(
            aws_access_key_id=s.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=s.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region_name=s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # one HTTP try: we retry, selectively
            connect_timeout=s.timeout_seconds,
            read_timeout=s.timeout_seconds,
            s3={"addressing_style": "path"},
        )
        self._stack = AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            session.client("s3", endpoint_url=s.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), config=config)
        )
        return self

    async def __aenter__(self) -> S3ObjectStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def _call(self, op: str, **kwargs: Any) -> Any:
        if self._client is None:
            raise StoreError(f"{self.description}: store is not open")
        s = self.settings
        for attempt in range(s.max_attempts):
            try:
                return await getattr(self._client, op)(Bucket=self.bucket, **kwargs)
            except ClientError as exc:
                code, status = _status(exc)
                if code in ("PreconditionFailed", "NoSuchKey", "NoSuchBucket", "AccessDenied") or not (
                    code in RETRYABLE or status >= 500 or status == 429
                ):
                    raise
                last: BaseException = exc
            except NoCredentialsError:
                raise StoreUnavailableError(
                    f"{self.description}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                ) from None
            except CredentialRetrievalError as exc:
                raise StoreUnavailableError(f"{self.description}: store credentials unavailable: {exc}") from exc
            except TRANSIENT_EXC as exc:
                last = exc
            except BotoCoreError as exc:
                raise StoreError(f"{self.description}: {exc}") from exc
            if attempt + 1 < s.max_attempts:
                self.retries += 1
                delay = min(s.max_delay_seconds, s.base_delay_seconds * 2**attempt)
                await asyncio.sleep(random.uniform(0, delay))
        raise self._gave_up(op, last)

    def _gave_up(self, op: str, last: BaseException) -> StoreUnavailableError:
        """The error once every attempt of ``op`` failed with a retryable ``last``: its
        message names S3's error code (throttled, failing) or the connection error."""
        tries = f"{op} failed after {self.settings.max_attempts} attempts"
        if isinstance(last, ClientError):
            code, status = _status(last)
            what = "store throttled" if code in THROTTLING or status == 429 else "store failing"
            return StoreUnavailableError(f"{self.description}: {what} ({code or status}): {tries}: {last}")
        name = type(last).__name__
        return StoreUnavailableError(f"{self.description}: store unreachable ({name}): {tries}: {last}")

    async def get(self, key: str) -> Blob | None:
        try:
            resp = await self._call("get_object", Key=self._key(key))
            async with resp["Body"] as body:
                data = await body.read()
        except ClientError as exc:
            code, _ = _status(exc)
            if code in ("NoSuchKey", "404"):  # not NoSuchBucket: a wrong bucket is an error
                return None
            raise self._error(exc) from exc
        except (*TRANSIENT_EXC, BotoCoreError, aiohttp.ClientError) as exc:  # the body cut off midway
            name = type(exc).__name__
            raise StoreUnavailableError(
                f"{self.description}: store unreachable ({name}): reading {key} failed: {exc}"
            ) from exc
        return Blob(bytes(data), str(resp["ETag"]))

    async def put_if_absent(self, key: str, data: bytes) -> str:
        return await self._put(key, data, IfNoneMatch="*")

    async def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return await self._put(key, data, IfMatch=etag)

    async def _put(self, key: str, data: bytes, **condition: str) -> str:
        try:
            resp = await self._call("put_object", Key=self._key(key), Body=data, **condition)
        except ClientError as exc:
            code, status = _status(exc)
            if code in ("PreconditionFailed", "NoSuchKey") or (status in (404, 412) and code != "NoSuchBucket"):
                raise PreconditionFailedError(f"{key}: {code or status}") from None
            raise self._error(exc) from exc
        return str(resp["ETag"])

    async def list(self, prefix: str, start_after: str | None = None, limit: int = MAX_PAGE) -> Page:
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"page size must be in 1..{MAX_PAGE}, got {limit}")
        kwargs: dict[str, Any] = {"Prefix": self.prefix + check_prefix(prefix), "MaxKeys": limit}
        if start_after is not None:
            kwargs["StartAfter"] = self.prefix + start_after
        try:
            resp = await self._call("list_objects_v2", **kwargs)
        except ClientError as exc:
            raise self._error(exc) from exc
        contents = resp.get("Contents", [])
        keys = [str(o["Key"])[len(self.prefix) :] for o in contents]
        modified = [o["LastModified"].timestamp() for o in contents]
        more = bool(resp.get("IsTruncated")) and bool(keys)
        return Page(keys, modified, keys[-1] if more else None)

    async def delete(self, key: str) -> None:
        try:
            await self._call("delete_object", Key=self._key(key))
        except ClientError as exc:
            if _status(exc)[0] == "NoSuchKey":
                return
            raise self._error(exc) from exc

    def _error(self, exc: ClientError) -> StoreError:
        """A ClientError that was not retried as a StoreError: StoreUnavailableError,
        naming S3's error code, when the environment is the cause (credentials,
        permissions, a missing bucket)."""
        code, status = _status(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        if code in REFUSED or status in (401, 403):
            text = f"{self.description}: store refused access ({code or status}) on {exc.operation_name}: {message}"
            return StoreUnavailableError(text.strip())
        if code == "NoSuchBucket":
            return StoreUnavailableError(f"{self.description}: store bucket missing (NoSuchBucket): {message}")
        return StoreError(f"{self.description}: {code or status} {message}".strip())
