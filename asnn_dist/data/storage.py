"""A tiny storage layer: read, write and probe shards and manifests by URL.

Why: the loader and the writer never touch ``open()`` or ``os.path`` directly, so a place to keep
shards is one backend object in ``BACKENDS`` -- no caller changes. Plain paths and ``file://``
URLs are served by the local backend, ``s3://`` by boto3 (``s3.py``, imported on first use so
local-only runs never load boto3). Writes are atomic (temporary file + rename locally, upload on
success for S3), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol
from urllib.parse import unquote, urlparse

from asnn_dist.data.errors import DataError


class StorageBackend(Protocol):
    """What a storage backend provides; every method takes a full URL of its scheme."""

    def open_read(self, url: str) -> BinaryIO: ...

    def open_write(self, url: str) -> contextlib.AbstractContextManager[BinaryIO]: ...

    def exists(self, url: str) -> bool: ...

    def size(self, url: str) -> int: ...

    def remove(self, url: str) -> None: ...


def scheme_of(url: str) -> str:
    """URL scheme in lower case; ``""`` for plain local paths (including Windows drives)."""
    if "://" not in url:
        return ""
    return url.split("://", 1)[0].lower()


def local_path(url: str) -> Path:
    """Filesystem path for a plain path or a ``file://`` URL."""
    if scheme_of(url) == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise DataError(
                f"file URL {url!r} names host {parsed.netloc!r}; use file:///absolute/path "
                "(three slashes) or a plain path"
            )
        return Path(unquote(parsed.path))
    return Path(url).expanduser()


class LocalBackend:
    """Local disk, for plain paths and ``file://`` URLs."""

    def open_read(self, url: str) -> BinaryIO:
        path = local_path(url)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise DataError(
                f"{url}: file not found; check the path, or rebuild the shards "
                "(the manifest lists every shard it expects next to it)"
            ) from None
        except IsADirectoryError:
            raise DataError(f"{url}: is a directory, expected a file") from None
        except PermissionError:
            raise DataError(f"{url}: permission denied; check the file's read permissions") from None
        except OSError as exn:
            raise DataError(f"{url}: cannot open ({exn.strerror or exn})") from None

    @contextlib.contextmanager
    def open_write(self, url: str) -> Iterator[BinaryIO]:
        path = local_path(url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exn:
            raise DataError(
                f"{url}: cannot create file ({exn.strerror or exn}); check the folder is writable "
                "and the disk is not full"
            ) from None
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def exists(self, url: str) -> bool:
        return local_path(url).is_file()

    def size(self, url: str) -> int:
        try:
            return local_path(url).stat().st_size
        except OSError:
            raise DataError(f"{url}: file not found; check the path or rebuild the shards") from None

    def remove(self, url: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            local_path(url).unlink()


class _LazyS3:
    """Forwards to ``asnn_dist.data.s3.BACKEND``, importing boto3 only when an s3:// URL is used."""

    def __getattr__(self, name: str) -> object:
        from asnn_dist.data import s3

        return getattr(s3.BACKEND, name)


# The extension point: scheme -> backend. "" is a plain local path.
BACKENDS: dict[str, StorageBackend] = {
    "": LocalBackend(),
    "file": LocalBackend(),
    "s3": _LazyS3(),  # type: ignore[dict-item]
}


def backend_for(url: str) -> StorageBackend:
    """The backend serving ``url``; DataError listing the supported schemes otherwise."""
    scheme = scheme_of(url)
    try:
        return BACKENDS[scheme]
    except KeyError:
        supported = ", ".join(sorted(f"{s}://" if s else "plain paths" for s in BACKENDS))
        raise DataError(
            f"{url}: unsupported storage scheme {scheme!r}; supported: {supported}"
        ) from None


def open_read(url: str) -> BinaryIO:
    """Open ``url`` for binary reading (caller closes it)."""
    return backend_for(url).open_read(url)


def open_write(url: str) -> contextlib.AbstractContextManager[BinaryIO]:
    """Context manager writing ``url`` atomically: the file appears only if the block succeeds."""
    return backend_for(url).open_write(url)


def exists(url: str) -> bool:
    """Whether ``url`` names an existing file."""
    return backend_for(url).exists(url)


def size(url: str) -> int:
    """Size of ``url`` in bytes (DataError when it does not exist)."""
    return backend_for(url).size(url)


def remove(url: str) -> None:
    """Delete ``url`` if it exists."""
    backend_for(url).remove(url)


def join(base: str, name: str) -> str:
    """``base`` folder + relative ``name``, keeping URL syntax for URLs and path syntax for paths."""
    if scheme_of(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(base, name)


def parent(url: str) -> str:
    """The folder holding ``url`` (a URL for URLs, a path for paths)."""
    if scheme_of(url):
        head, _, _ = url.rstrip("/").rpartition("/")
        return head
    return os.path.dirname(os.path.abspath(os.path.expanduser(url)))
