"""Data: WebDataset shards + manifest, a storage layer, transforms and the streaming loader.

Flow: a source (bundled digits today, ImageNet folders next) gives ``Sample``s ->
``write_shards`` writes tar shards and, last, ``<split>.manifest.json`` -> ``ShardLoader``
reads a rank's slice of the shards and yields equal, masked batches.
"""

from asnn_dist.data.errors import DataError
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
from asnn_dist.data.sources import build_digits_shards, digits_splits
from asnn_dist.data.transforms import ImageTransform, decode_image
from asnn_dist.data.writer import Sample, write_shards

__all__ = [
    "DataError",
    "ImageInfo",
    "ImageTransform",
    "Manifest",
    "Sample",
    "ShardInfo",
    "ShardLoader",
    "build_digits_shards",
    "decode_image",
    "digits_splits",
    "load_manifest",
    "manifest_url",
    "verify_shards",
    "write_manifest",
    "write_shards",
]
