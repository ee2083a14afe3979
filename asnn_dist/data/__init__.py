"""Data: WebDataset shards + manifest, storage (local, s3://), transforms and the streaming loader.

Flow: a source (ImageNet-style folders, bundled digits, synthetic JPEGs) gives entries ->
``build_split`` writes tar shards resumably and, last, ``<split>.manifest.json`` ->
``ShardLoader`` streams a rank's slice of the shards and yields equal, masked batches;
``mix_batch`` applies mixup/cutmix with label smoothing on the batch.

Names are imported lazily (PEP 562): shard-writing worker processes import only what they use,
without torch, so a pool of them starts quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataError": "errors",
    "UnreachableError": "errors",
    "ShardLoader": "loader",
    "ImageInfo": "manifest",
    "Manifest": "manifest",
    "ShardInfo": "manifest",
    "load_manifest": "manifest",
    "manifest_url": "manifest",
    "verify_shards": "manifest",
    "write_manifest": "manifest",
    "build_digits_shards": "sources",
    "digits_splits": "sources",
    "BuildResult": "build",
    "build_split": "build",
    "build_folder_shards": "builders",
    "build_imagenet_shards": "builders",
    "build_synthetic_shards": "builders",
    "ImageTransform": "transforms",
    "decode_image": "transforms",
    "TransformSpec": "recipes",
    "mix_batch": "mixing",
    "soft_target_cross_entropy": "mixing",
    "Sample": "writer",
    "register_webdataset_scheme": "s3",
}

__all__ = [
    "BuildResult",
    "DataError",
    "ImageInfo",
    "ImageTransform",
    "Manifest",
    "Sample",
    "ShardInfo",
    "ShardLoader",
    "TransformSpec",
    "UnreachableError",
    "build_digits_shards",
    "build_folder_shards",
    "build_imagenet_shards",
    "build_split",
    "build_synthetic_shards",
    "decode_image",
    "digits_splits",
    "load_manifest",
    "manifest_url",
    "mix_batch",
    "register_webdataset_scheme",
    "soft_target_cross_entropy",
    "verify_shards",
    "write_manifest",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asnn_dist.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"asnn_dist.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from asnn_dist.data.build import BuildResult, build_split
    from asnn_dist.data.builders import build_folder_shards, build_imagenet_shards, build_synthetic_shards
    from asnn_dist.data.errors import DataError, UnreachableError
    from asnn_dist.data.loader import ShardLoader
    from asnn_dist.data.manifest import (
        ImageInfo,
        Manifest,
        ShardInfo,
        load_manifest,
        manifest_url,
        verify_shards,
        write_manifest,
    )
    from asnn_dist.data.mixing import mix_batch, soft_target_cross_entropy
    from asnn_dist.data.recipes import TransformSpec
    from asnn_dist.data.s3 import register_webdataset_scheme
    from asnn_dist.data.sources import build_digits_shards, digits_splits
    from asnn_dist.data.transforms import ImageTransform, decode_image
    from asnn_dist.data.writer import Sample
