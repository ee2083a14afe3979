"""File-like objects over S3 objects: a resumable streaming reader and an upload-on-close writer.

Why a reader of our own: botocore's StreamingBody is a one-shot HTTP response. A 1 GB shard read
over minutes sees dropped connections and read timeouts that botocore's request retries never
cover (the request already succeeded). ``S3ReadStream`` reopens the object at the byte it had
reached (an HTTP Range request pinned to the same ETag) with backoff, so a shard is streamed
once, never downloaded whole, and a dropped connection costs a reconnect instead of the epoch.
Why the writer spools to a temporary file: S3 objects appear atomically only when the upload
completes, so a crash never leaves half a shard, and large files go up as a multipart upload.
"""

from __future__ import annotations

import io
import logging
import random
import tempfile
import time
from typing import Any, Callable

from asnn_dist.data.errors import DataError

log = logging.getLogger(__name__)

Opener = Callable[[int], Any]  # start byte -> a body with read(amt) and close()


def transient_read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the connection broke mid-body; reopen and continue'."""
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (
        ResponseStreamingError, ReadTimeoutError, IncompleteReadError, ConnectionClosedError,
        Urllib3Error, ConnectionError, TimeoutError,
    )


class S3ReadStream(io.RawIOBase):
    """Sequential reader of one object of ``size`` bytes that survives dropped connections.

    ``opener(start)`` returns a body positioned at byte ``start`` (a fresh GET with a Range
    header); it is called once up front and again after each broken read, at most
    ``max_reopens`` times in a row without progress, sleeping with jittered exponential backoff.
    """

    def __init__(
        self, url: str, size: int, opener: Opener, first_body: Any = None, max_reopens: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        super().__init__()
        self.url = url
        self.size = size
        self._opener = opener
        self._body = first_body
        self._pos = 0
        self._max_reopens = max_reopens
        self._backoff_s = backoff_s
        self._failures = 0
        self._transient = transient_read_errors()
        self.reopens = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _reopen(self, reason: str) -> None:
        self._failures += 1
        if self._failures > self._max_reopens:
            raise DataError(
                f"{self.url}: connection kept dropping at byte {self._pos} of {self.size} "
                f"({reason}); check the network and the S3 endpoint, then retry"
            )
        delay = min(5.0, self._backoff_s * 2 ** (self._failures - 1)) * (0.5 + random.random())
        log.warning("%s: reconnecting at byte %d after %s (attempt %d)", self.url, self._pos,
                    reason, self._failures)
        self._close_body()
        time.sleep(delay)
        self.reopens += 1
        self._body = self._opener(self._pos)

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; irrelevant
                pass
            self._body = None

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self._pos)
        if want <= 0:
            return 0
        while True:
            try:
                if self._body is None:
                    self._body = self._opener(self._pos)
                chunk = self._body.read(want)
            except self._transient as exn:
                self._reopen(type(exn).__name__)
                continue
            if not chunk:  # the server closed the body early
                self._reopen("early end of body")
                continue
            n = len(chunk)
            buffer[:n] = chunk
            self._pos += n
            self._failures = 0
            return n

    def close(self) -> None:
        self._close_body()
        super().close()


class S3UploadFile(io.RawIOBase):
    """Write-only file spooled to a temporary file; ``close()`` uploads it, ``discard()`` drops it.

    ``upload(fileobj)`` does the transfer (boto3 ``upload_fileobj``: one PUT for small files, a
    multipart upload for large ones). Nothing appears in the bucket unless close() succeeds.
    """

    def __init__(self, url: str, upload: Callable[[Any], None]) -> None:
        super().__init__()
        self.url = url
        self._upload = upload
        self._tmp = tempfile.TemporaryFile(prefix="asnn-s3-upload-")
        self._done = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._tmp.write(data)

    def __del__(self) -> None:
        # IOBase.__del__ would close() and so upload a file nobody finished writing.
        if not self._done:
            self.discard()

    def discard(self) -> None:
        """Drop the spooled data without uploading (the writer failed)."""
        self._done = True
        self._tmp.close()
        super().close()

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._tmp.flush()
            self._tmp.seek(0)
            self._upload(self._tmp)
        finally:
            self._tmp.close()
            super().close()
