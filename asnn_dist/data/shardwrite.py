"""Write one planned shard: read each entry, check it is a decodable image, store its bytes.

Why this runs in its own light module: build worker processes import only this (PIL, tarfile,
the storage layer), not torch, so a pool of them starts in well under a second. Images are
stored as their original bytes (no re-encoding) under the extension of their real format; an
entry that cannot be read or decoded is skipped and reported with the reason, never kept.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

from asnn_dist.data import storage
from asnn_dist.data.buildplan import ShardPlan, Source
from asnn_dist.data.writer import TarShardWriter

# PIL format name -> tar member extension. MPO is a JPEG with extra frames (some cameras).
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp",
              "GIF": "gif", "TIFF": "tiff"}
IMAGE_EXTS = frozenset(FORMAT_EXT.values())

# Samples done: a shared multiprocessing counter in pool workers, a callback in-process.
_progress: Any = None


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard."""

    plan: ShardPlan
    name: str
    url: str
    source: Source
    num_classes: int


@dataclass
class ShardResult:
    """What was written: sample count, size and hash of the tar, and the entries left out."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    skipped: list[str] = field(default_factory=list)


def image_ext(data: bytes) -> str:
    """Extension of the image format of ``data`` after a full decode; ValueError saying why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; a decode error still raises
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or "?"
                if fmt in ("JPEG", "MPO"):
                    img.draft(img.mode, (64, 64))  # decodes every block, at 1/8 scale: cheap
                img.load()
    except Exception as exn:  # noqa: BLE001 - PIL raises many types for broken files
        detail = " ".join(str(exn).split()) or type(exn).__name__
        raise ValueError(f"not a readable image ({detail})") from None
    ext = FORMAT_EXT.get(fmt)
    if ext is None:
        raise ValueError(f"image format {fmt} is not supported (store JPEG, PNG, WebP, BMP, GIF, TIFF)")
    return ext


def init_worker(progress: Any, s3_settings: Any) -> None:
    """Pool initializer: the shared progress counter and the parent's S3 settings."""
    set_progress(progress)
    if s3_settings is not None:
        from asnn_dist.data import s3

        s3.configure(s3_settings)


def set_progress(progress: Any) -> None:
    """Count samples with ``progress``: a ``multiprocessing.Value`` or a no-argument callback."""
    global _progress
    _progress = progress


def _tick() -> None:
    if _progress is None:
        return
    if callable(_progress):
        _progress()
        return
    with _progress.get_lock():
        _progress.value += 1


def _checked(task: ShardTask, skipped: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The entries of ``task`` that are readable images, as tar samples; the rest go to ``skipped``."""
    for entry in task.plan.entries:
        where = task.source.describe(entry)
        try:
            data = task.source.read(entry)
            ext = image_ext(data)
        except (OSError, ValueError) as exn:
            skipped.append(f"{where}: {exn}")
        else:
            if 0 <= entry.label < task.num_classes:
                yield entry.key, {ext: data, "cls": str(entry.label).encode("ascii")}
            else:
                skipped.append(f"{where}: label {entry.label} outside 0..{task.num_classes - 1}")
        _tick()


def write_shard(task: ShardTask) -> ShardResult:
    """Write ``task``'s entries to ``task.url`` as they are read; an all-bad shard is removed."""
    skipped: list[str] = []
    with storage.open_write(task.url) as out, TarShardWriter(out) as tar:
        for key, entries in _checked(task, skipped):
            tar.write(key, entries)
        digest, num_bytes = tar.close()
    if tar.count == 0:
        storage.remove(task.url)
        return ShardResult(task.name, 0, 0, "", skipped)
    return ShardResult(task.name, tar.count, num_bytes, digest, skipped)
