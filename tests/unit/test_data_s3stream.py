"""S3ReadStream: a dropped connection mid-body reconnects at the byte reached (Range request).

The opener below stands in for ``get_object(Range=...)``; the real S3 path (moto server) is
covered in tests/integration/test_data_s3.py.
"""

from __future__ import annotations

import io
import os

import pytest
from botocore.exceptions import ResponseStreamingError

from asnn_dist.data.errors import DataError
from asnn_dist.data.s3 import S3Settings, error_code, split_url
from asnn_dist.data.s3stream import S3ReadStream, S3UploadFile


class DroppingBody:
    """A body serving ``data[start:]`` that breaks after ``limit`` bytes."""

    def __init__(self, data: bytes, start: int, limit: int | None) -> None:
        self.stream = io.BytesIO(data[start:])
        self.left = limit

    def read(self, amount: int) -> bytes:
        if self.left is not None and self.left <= 0:
            raise ResponseStreamingError(error="Connection broken: IncompleteRead")
        if self.left is not None:
            amount = min(amount, self.left)
            self.left -= amount
        return self.stream.read(amount)

    def close(self) -> None:
        pass


def test_read_stream_resumes_after_drops() -> None:
    data = os.urandom(300_000)
    starts: list[int] = []

    def opener(start: int) -> DroppingBody:
        starts.append(start)
        return DroppingBody(data, start, 70_000 if len(starts) < 4 else None)

    raw = S3ReadStream("s3://b/k", len(data), opener, backoff_s=0.001)
    reader = io.BufferedReader(raw, buffer_size=32_768)
    assert reader.read() == data
    assert starts == [0, 70_000, 140_000, 210_000] and raw.reopens == 3


def test_read_stream_gives_up_with_clear_error() -> None:
    raw = S3ReadStream("s3://b/k", 10, lambda start: DroppingBody(b"x" * 10, start, 0),
                       max_reopens=2, backoff_s=0.001)
    with pytest.raises(DataError, match=r"s3://b/k: connection kept dropping at byte 0 of 10"):
        raw.read(5)


def test_upload_file_uploads_on_close_only() -> None:
    uploaded: list[bytes] = []
    ok = S3UploadFile("s3://b/k", lambda f: uploaded.append(f.read()))
    ok.write(b"abc")
    ok.close()
    dropped = S3UploadFile("s3://b/k", lambda f: uploaded.append(f.read()))
    dropped.write(b"half")
    dropped.discard()
    del dropped
    assert uploaded == [b"abc"]


def test_url_parts_and_codes() -> None:
    assert split_url("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    with pytest.raises(DataError, match="no bucket"):
        split_url("s3:///x")
    assert error_code(Exception("An error occurred (NoSuchBucket) when calling")) == "NoSuchBucket"
    assert S3Settings().unsigned is False
