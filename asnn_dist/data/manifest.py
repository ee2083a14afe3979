"""The manifest: one JSON file per split that says which shards make a complete dataset.

Why a manifest: the loader must know per-shard sample counts *before* reading (to give every
rank the same number of batches) and the class names (index = label); the sha256 and byte
counts let a rebuild be skipped safely. It is written last, so its presence means the shards
next to it are complete. Shard names are relative, so a shard folder can be copied or uploaded
(local -> s3://) as a whole without editing the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from asnn_dist.data import storage
from asnn_dist.data.errors import DataError

if TYPE_CHECKING:
    from asnn_dist.config import ExperimentConfig

FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ShardInfo(BaseModel):
    """One tar shard: its file name (relative to the manifest's folder) and what is in it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="file name relative to the manifest's folder")
    num_samples: int = Field(ge=1, description="samples in this shard")
    num_bytes: int = Field(ge=0, description="size of the tar file in bytes")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the tar file")


class ImageInfo(BaseModel):
    """How images are stored: decoded channel count, stored size and file extension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int = Field(description="1 (grayscale) or 3 (RGB) after decoding")
    height: int = Field(ge=0, description="stored height in pixels; 0 when images vary in size")
    width: int = Field(ge=0, description="stored width in pixels; 0 when images vary in size")
    ext: str = Field(pattern=r"^[a-z0-9]+$", description="extension of the image entry: png, jpg")

    @model_validator(mode="after")
    def _check_channels(self) -> "ImageInfo":
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        return self


class Manifest(BaseModel):
    """A split's shard list, sample count, class names and image format."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(default=FORMAT_VERSION, description="manifest schema version")
    split: str = Field(description="split name, e.g. train / test / val")
    shards: list[ShardInfo] = Field(min_length=1, description="shards in writing order")
    classes: list[str] = Field(min_length=1, description="class names; index = label")
    num_samples: int = Field(ge=1, description="total samples over all shards")
    image: ImageInfo
    created_by: str = Field(default="", description="tool and version that wrote the shards")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="builder settings (seed, fractions...) so a rebuild with other settings is noticed",
    )
    skipped: list[str] = Field(
        default_factory=list,
        description="source files left out of the shards ('<file>: <reason>'), e.g. unreadable images",
    )

    _base_url: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_consistent(self) -> "Manifest":
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported (this asnn-dist reads "
                f"{FORMAT_VERSION}); rebuild the shards or upgrade asnn-dist"
            )
        if not _SPLIT_RE.match(self.split):
            raise ValueError(f"split {self.split!r} must be letters, digits, '_' or '-'")
        total = sum(s.num_samples for s in self.shards)
        if total != self.num_samples:
            raise ValueError(f"num_samples is {self.num_samples} but the shards hold {total}")
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise ValueError("shard names are not unique")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names are not unique")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def base_url(self) -> str:
        """Folder the shard names are relative to (set by load/write)."""
        if self._base_url is None:
            raise DataError(
                f"manifest for split {self.split!r} has no location; load it with load_manifest() "
                "or pass base= to shard_urls()"
            )
        return self._base_url

    def with_base(self, base_url: str) -> "Manifest":
        """This manifest, located in folder ``base_url`` (returns self for chaining)."""
        self._base_url = base_url
        return self

    def shard_urls(self, base: str | None = None) -> list[str]:
        """Absolute shard URLs/paths, in manifest order."""
        folder = base if base is not None else self.base_url
        return [storage.join(folder, s.name) for s in self.shards]


def manifest_url(folder: str, split: str) -> str:
    """Where the manifest of ``split`` lives in ``folder``: ``<folder>/<split>.manifest.json``."""
    return storage.join(folder, f"{split}{MANIFEST_SUFFIX}")


def write_manifest(manifest: Manifest, folder: str) -> str:
    """Write ``manifest`` atomically into ``folder``; returns its URL. Call after the shards."""
    url = manifest_url(folder, manifest.split)
    text = manifest.model_dump_json(indent=2) + "\n"
    with storage.open_write(url) as f:
        f.write(text.encode("utf-8"))
    manifest.with_base(folder)
    return url


def load_manifest(url_or_path: str) -> Manifest:
    """Read a ``<split>.manifest.json``; DataError naming the file when missing or invalid."""
    if url_or_path.endswith("/") or (
        not storage.scheme_of(url_or_path) and storage.local_path(url_or_path).is_dir()
    ):
        raise DataError(
            f"{url_or_path}: is a folder; pass the manifest file inside it, "
            f"e.g. {manifest_url(url_or_path, 'train')}"
        )
    if not storage.exists(url_or_path):
        raise DataError(
            f"{url_or_path}: manifest not found; check the path or build the shards first "
            "(the manifest is written last, so a missing one can also mean an interrupted build)"
        )
    with storage.open_read(url_or_path) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise DataError(f"{url_or_path}: not valid JSON ({exn}); rebuild the shards") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exn:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exn.errors()
        )
        raise DataError(f"{url_or_path}: invalid manifest ({problems}); rebuild the shards") from None
    return manifest.with_base(storage.parent(url_or_path))


def check_manifest_matches(cfg: "ExperimentConfig", manifest: Manifest) -> None:
    """ConfigError when the config's class or channel count differs from the shards'.

    Why at start-up: a wrong ``data.num_classes`` otherwise surfaces as an index error inside a
    worker's loss (or trains a head with unused classes), and a wrong ``data.in_channels`` as a
    conv shape error after Ray and DeepSpeed have started, since the loader decodes with the
    manifest's channel count.
    """
    from asnn_dist.errors import ConfigError

    where = manifest_url(manifest.base_url, manifest.split)
    if cfg.data.num_classes != manifest.num_classes:
        raise ConfigError(
            f"data.num_classes={cfg.data.num_classes} but the manifest {where} lists {manifest.num_classes} "
            f"classes; set data.num_classes={manifest.num_classes} or point data.root at the right shards")
    if cfg.data.in_channels != manifest.image.channels:
        kind = {1: "grayscale", 3: "RGB"}.get(manifest.image.channels, "")
        raise ConfigError(
            f"data.in_channels={cfg.data.in_channels} but the manifest {where} stores {manifest.image.channels}-"
            f"channel ({kind}) images; set data.in_channels={manifest.image.channels}")


def sha256_of(url: str, chunk_bytes: int = 1 << 20) -> tuple[str, int]:
    """Hex sha256 and byte count of the file at ``url``."""
    digest = hashlib.sha256()
    count = 0
    with storage.open_read(url) as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            count += len(chunk)
    return digest.hexdigest(), count


def verify_shards(manifest: Manifest, check_sha256: bool = True) -> list[str]:
    """Problems found comparing the shards on storage with ``manifest`` (empty list = intact).

    Sizes are checked first (cheap); hashes only when sizes match and ``check_sha256``.
    """
    problems: list[str] = []
    for info, url in zip(manifest.shards, manifest.shard_urls()):
        if not storage.exists(url):
            problems.append(f"{url}: missing")
            continue
        found = storage.size(url)
        if found != info.num_bytes:
            problems.append(f"{url}: {found} bytes, manifest says {info.num_bytes}")
            continue
        if check_sha256:
            digest, _ = sha256_of(url)
            if digest != info.sha256:
                problems.append(f"{url}: sha256 differs from the manifest")
    return problems
