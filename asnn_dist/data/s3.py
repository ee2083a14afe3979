"""``s3://`` storage through boto3: streaming reads, atomic uploads, clear errors.

Why boto3 and not a filesystem layer: one well-known dependency, the standard AWS credential
chain (environment, ``AWS_PROFILE``, instance/pod role; never arguments, never logged), botocore's
retry modes for throttling and flaky connections, and any S3-compatible store through an
endpoint URL (``configure(endpoint_url=...)``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).
One client per process (DataLoader and build workers each make their own after fork/spawn).
Every failure becomes one DataError line naming the URL, the endpoint and what to check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import threading
from typing import Any, BinaryIO, Iterator

from asnn_dist.data.errors import DataError, UnreachableError
from asnn_dist.data.s3stream import S3ReadStream, S3UploadFile

READ_BUFFER = 1 << 20  # bytes per read from the HTTP body; fewer, larger reads for tarfile

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled", "AccountProblem"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503"}
_CODE_RE = re.compile(r"\(([A-Za-z0-9]+)\)")


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """How this process talks to S3 (picklable, so DataLoader/build workers can apply it)."""

    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS default
    max_attempts: int | None = None  # None: AWS_MAX_ATTEMPTS or 10
    retry_mode: str | None = None  # None: AWS_RETRY_MODE or "adaptive" (backs off on throttling)
    unsigned: bool = False  # anonymous requests (public buckets); no credentials used at all
    part_size: int = 64 << 20  # multipart threshold and part size for uploads


_settings = S3Settings()
_clients: dict[tuple[int, S3Settings], Any] = {}
_buckets_checked: set[tuple[int, str]] = set()
_lock = threading.Lock()


def configure(settings: S3Settings | None = None, **changes: Any) -> S3Settings:
    """Set this process's S3 settings (a whole ``S3Settings`` and/or single fields); returns them."""
    global _settings
    with _lock:
        _settings = dataclasses.replace(settings or _settings, **changes)
        return _settings


def settings() -> S3Settings:
    """The S3 settings in force in this process."""
    return _settings


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); DataError for a URL without a bucket."""
    rest = url.split("://", 1)[1] if "://" in url else url
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataError(f"{url}: no bucket in the S3 URL; use s3://bucket/path/file")
    return bucket, key


def client() -> Any:
    """This process's boto3 S3 client for the current settings (created on first use)."""
    key = (os.getpid(), _settings)
    found = _clients.get(key)
    if found is not None:
        return found
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    s = _settings
    config = Config(
        retries={
            "max_attempts": s.max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "10")),
            "mode": s.retry_mode or os.environ.get("AWS_RETRY_MODE", "adaptive"),
        },
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
        signature_version=UNSIGNED if s.unsigned else None,
    )
    made = boto3.session.Session().client("s3", endpoint_url=s.endpoint_url, config=config)
    with _lock:
        _clients[key] = made
    return made


def endpoint() -> str:
    """The endpoint URL requests go to (for messages)."""
    try:
        return str(client().meta.endpoint_url)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return _settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS default"


def error_code(exn: BaseException) -> str:
    """The S3 error code of a botocore/boto3 exception ('' when it has none)."""
    response = getattr(exn, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    found = _CODE_RE.search(str(exn))  # boto3's S3UploadFailedError only has text
    return found.group(1) if found else ""


def translate(url: str, exn: BaseException) -> DataError:
    """One-line DataError for a failed S3 call on ``url`` (credentials are never included)."""
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    ep = endpoint()
    bucket, _ = split_url(url)
    if isinstance(exn, (NoCredentialsError, PartialCredentialsError)):
        return DataError(
            f"{url}: no usable AWS credentials; provide them through the standard chain "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance/pod role)"
        )
    if isinstance(exn, BotoConnectionError):
        detail = type(exn).__name__
        return UnreachableError(
            f"{url}: cannot reach S3 endpoint {ep} ({detail}); check the endpoint URL "
            "(AWS_ENDPOINT_URL_S3 or --endpoint-url) and the network"
        )
    if isinstance(exn, ParamValidationError):
        return DataError(f"{url}: invalid S3 request ({_one_line(exn)}); check the bucket and key")
    code = error_code(exn)
    if code == "NoSuchBucket":
        return DataError(
            f"{url}: bucket {bucket!r} does not exist at S3 endpoint {ep}; check the bucket name "
            "and the endpoint (AWS_ENDPOINT_URL_S3 or --endpoint-url), or create the bucket"
        )
    if code in _NOT_FOUND:
        return DataError(
            f"{url}: not found at S3 endpoint {ep}; check the bucket and key, or rebuild the shards"
        )
    if code in _DENIED:
        return DataError(
            f"{url}: access denied by S3 endpoint {ep} ({code}); check the AWS credentials "
            "(environment, AWS_PROFILE or instance role) and the bucket policy"
        )
    if code in _THROTTLED:
        return DataError(
            f"{url}: S3 endpoint {ep} kept throttling ({code}) after all retries; lower the "
            "request rate (fewer loader workers) or raise AWS_MAX_ATTEMPTS"
        )
    return DataError(f"{url}: S3 request failed at {ep} ({code or type(exn).__name__}: "
                     f"{_one_line(exn)}); check the endpoint, credentials and bucket")


def _one_line(exn: BaseException) -> str:
    return " ".join(str(exn).split())[:300]


def _s3_failures() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError, Boto3Error)


class S3Backend:
    """The storage backend for ``s3://`` URLs (see storage.StorageBackend)."""

    def _head(self, url: str) -> dict[str, Any] | None:
        """HEAD of the object, or None when it does not exist (DataError when its bucket doesn't)."""
        bucket, key = split_url(url)
        try:
            return client().head_object(Bucket=bucket, Key=key)
        except _s3_failures() as exn:
            if error_code(exn) not in _NOT_FOUND:
                raise translate(url, exn) from None
        self._check_bucket(url, bucket)
        return None

    def _check_bucket(self, url: str, bucket: str) -> None:
        """DataError when ``bucket`` is missing, so 'not found' is not blamed on the key."""
        if (os.getpid(), bucket) in _buckets_checked:
            return
        try:
            client().head_bucket(Bucket=bucket)
        except _s3_failures() as exn:
            code = error_code(exn)
            raise translate(url, _BucketMissing() if code in _NOT_FOUND else exn) from None
        _buckets_checked.add((os.getpid(), bucket))

    def open_read(self, url: str) -> BinaryIO:
        """A buffered streaming reader of the object (reconnects at the same byte on drops)."""
        bucket, key = split_url(url)
        s3 = client()
        try:
            first = s3.get_object(Bucket=bucket, Key=key)
        except _s3_failures() as exn:
            if error_code(exn) in _NOT_FOUND:
                self._check_bucket(url, bucket)
            raise translate(url, exn) from None
        etag = first.get("ETag")

        def reopen(start: int) -> Any:
            try:
                extra = {"IfMatch": etag} if etag else {}
                return s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-", **extra)["Body"]
            except _s3_failures() as exn:
                if error_code(exn) == "PreconditionFailed":
                    raise DataError(f"{url}: the object changed while it was being read; retry, "
                                    "and do not overwrite shards during training") from None
                raise translate(url, exn) from None

        raw = S3ReadStream(url, int(first["ContentLength"]), reopen, first_body=first["Body"])
        return io.BufferedReader(raw, buffer_size=READ_BUFFER)  # type: ignore[return-value]

    def upload_file(self, url: str) -> S3UploadFile:
        """A write-only file that becomes the object ``url`` on close() (atomic on S3)."""
        bucket, key = split_url(url)

        def upload(fileobj: Any) -> None:
            from boto3.s3.transfer import TransferConfig

            size = _settings.part_size
            transfer = TransferConfig(multipart_threshold=size, multipart_chunksize=size,
                                      max_concurrency=4)
            try:
                client().upload_fileobj(fileobj, bucket, key, Config=transfer)
            except _s3_failures() as exn:
                raise translate(url, exn) from None

        return S3UploadFile(url, upload)

    @contextlib.contextmanager
    def open_write(self, url: str) -> Iterator[BinaryIO]:
        """Context manager: the object appears only if the block succeeds."""
        out = self.upload_file(url)
        try:
            yield out  # type: ignore[misc]
        except BaseException:
            out.discard()
            raise
        out.close()

    def exists(self, url: str) -> bool:
        return self._head(url) is not None

    def size(self, url: str) -> int:
        head = self._head(url)
        if head is None:
            raise DataError(f"{url}: not found at S3 endpoint {endpoint()}; check the bucket and "
                            "key, or rebuild the shards")
        return int(head["ContentLength"])

    def remove(self, url: str) -> None:
        bucket, key = split_url(url)
        try:
            client().delete_object(Bucket=bucket, Key=key)
        except _s3_failures() as exn:
            if error_code(exn) not in _NOT_FOUND:
                raise translate(url, exn) from None


class _BucketMissing(Exception):
    """Stands in for a HEAD 404 on a bucket (HEAD responses carry no error code)."""

    response = {"Error": {"Code": "NoSuchBucket"}}


BACKEND = S3Backend()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
    """WebDataset ``gopen`` handler: ``wds.WebDataset("s3://...")`` streams through this module."""
    if mode == "rb":
        return BACKEND.open_read(url)
    if mode == "wb":
        return BACKEND.upload_file(url)  # type: ignore[return-value]
    raise DataError(f"{url}: mode {mode!r} is not supported for s3:// (use 'rb' or 'wb')")


def register_webdataset_scheme() -> None:
    """Make WebDataset open ``s3://`` URLs with ``gopen_s3`` (idempotent)."""
    import importlib

    # webdataset's package namespace exports the gopen *function*; the table is in the module.
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = gopen_s3
