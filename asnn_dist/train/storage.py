"""Ray Train storage on local disk or S3 (AWS or any S3-compatible endpoint).

Credentials come only from the standard AWS chain (environment, profile, instance role); the
endpoint comes from ``s3.endpoint_url`` or ``AWS_ENDPOINT_URL(_S3)``. Reachability is checked
before training so an unreachable store fails in one line instead of at the first checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Optional
from urllib.parse import urlparse

from asnn_dist.errors import ServiceError


def s3_endpoint(configured: Optional[str]) -> Optional[str]:
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def check_s3_bucket(url: str, endpoint: Optional[str], region: Optional[str] = None) -> None:
    """HEAD the bucket of ``url``; ServiceError naming the URL and the endpoint otherwise."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = urlparse(url).netloc
    where = f"{url} (endpoint {endpoint or 'AWS default'})"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                          config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise ServiceError(f"S3 storage {where}: bucket check failed ({code}); check that the bucket "
                           "exists and the AWS credentials in your environment may use it") from None
    except BotoCoreError as exc:
        raise ServiceError(f"cannot reach S3 storage {where}: {exc}; check s3.endpoint_url / "
                           "AWS_ENDPOINT_URL and the network") from None


def ray_storage(storage_path: str, endpoint: Optional[str], region: Optional[str] = None) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig``."""
    if not storage_path.startswith("s3://"):
        return storage_path, None
    import pyarrow.fs

    check_s3_bucket(storage_path, endpoint, region)
    kwargs: dict[str, Any] = {"region": region} if region else {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    fs = pyarrow.fs.S3FileSystem(**kwargs)
    return storage_path.removeprefix("s3://"), fs
