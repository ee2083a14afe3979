"""Bundled real datasets turned into samples and shards.

Why digits: scikit-learn ships the 1,797 real 8x8 UCI handwritten digits, so demos and tests run
on real images with no download. Images are stored as lossless PNG (the same encoded-bytes path
ImageNet JPEGs take) and the train/test split is fixed and stratified by ``seed``.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from asnn_dist.data import storage
from asnn_dist.data.errors import DataError
from asnn_dist.data.manifest import ImageInfo, Manifest, load_manifest, manifest_url, verify_shards
from asnn_dist.data.writer import Sample, write_shards

log = logging.getLogger(__name__)

DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_IMAGE = ImageInfo(channels=1, height=8, width=8, ext="png")
DIGITS_SPLITS = ("train", "test")


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 [H, W] (grayscale) or [H, W, 3] (RGB) array."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def digits_splits(test_fraction: float = 0.2, seed: int = 0) -> dict[str, list[Sample]]:
    """scikit-learn's digits as PNG samples, split train/test stratified by class (fixed by seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    digits = load_digits()
    # Values are 0..16; scale to the full 0..255 range so decoded images lie in [0, 1].
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        index, test_size=test_fraction, stratify=labels, random_state=seed
    )

    def samples(idx: np.ndarray) -> list[Sample]:
        return [
            Sample(key=f"digits-{i:04d}", data=encode_png(images[i]), ext="png", label=int(labels[i]))
            for i in sorted(int(j) for j in idx)
        ]

    return {"train": samples(train_idx), "test": samples(test_idx)}


def _reusable(out_dir: str, split: str, params: dict[str, object]) -> Manifest | None:
    """The existing manifest of ``split`` if it was built with ``params`` and its shards are intact."""
    url = manifest_url(out_dir, split)
    if not storage.exists(url):
        return None
    try:
        manifest = load_manifest(url)
    except DataError as exn:
        log.warning("rebuilding %s: %s", split, exn)
        return None
    if manifest.params != params:
        log.info("rebuilding %s: built with %s, asked for %s", split, manifest.params, params)
        return None
    problems = verify_shards(manifest)
    if problems:
        log.warning("rebuilding %s: %s", split, "; ".join(problems))
        return None
    return manifest


def build_digits_shards(
    out_dir: str, samples_per_shard: int = 128, seed: int = 0, progress: bool = True
) -> dict[str, Manifest]:
    """Write digits train/test shards to ``out_dir``, reusing intact ones built with the same settings."""
    test_fraction = 0.2
    params: dict[str, object] = {
        "source": "sklearn.datasets.load_digits",
        "seed": seed,
        "test_fraction": test_fraction,
        "samples_per_shard": samples_per_shard,
    }
    manifests = {split: _reusable(out_dir, split, params) for split in DIGITS_SPLITS}
    if all(m is not None for m in manifests.values()):
        return {split: m for split, m in manifests.items() if m is not None}
    splits = digits_splits(test_fraction=test_fraction, seed=seed)
    result: dict[str, Manifest] = {}
    for split in DIGITS_SPLITS:
        existing = manifests[split]
        result[split] = existing if existing is not None else write_shards(
            splits[split],
            out_dir,
            split,
            DIGITS_CLASSES,
            samples_per_shard,
            DIGITS_IMAGE,
            progress=progress,
            params=params,
        )
    return result
