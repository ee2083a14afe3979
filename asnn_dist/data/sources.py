"""Bundled real datasets turned into samples and shards.

Why digits: scikit-learn ships the 1,797 real 8x8 UCI handwritten digits, so demos and tests run
on real images with no download. Images are stored as lossless PNG (the same encoded-bytes path
ImageNet JPEGs take) and the train/test split is fixed and stratified by ``seed``. Shards are
written by the same resumable builder as every other source (``build.py``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from asnn_dist.data.build import BuildResult, build_split
from asnn_dist.data.buildplan import InlineSource
from asnn_dist.data.errors import DataError
from asnn_dist.data.manifest import ImageInfo, Manifest
from asnn_dist.data.writer import Sample, inline_entries

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


def build_digits_shards(
    out_dir: str,
    samples_per_shard: int = 128,
    seed: int = 0,
    progress: bool = True,
    workers: int = 0,
    shard_bytes: int | None = None,
) -> dict[str, Manifest]:
    """Write digits train/test shards to ``out_dir`` (local or s3://), keeping intact ones.

    Samples stay in key order inside each split (the split itself is already random), so
    rebuilding with the same settings gives byte-identical shards.
    """
    return {split: r.manifest for split, r in build_digits(
        out_dir, samples_per_shard, seed, progress, workers, shard_bytes).items()}


def build_digits(
    out_dir: str,
    samples_per_shard: int | None = 128,
    seed: int = 0,
    progress: bool = True,
    workers: int = 0,
    shard_bytes: int | None = None,
) -> dict[str, BuildResult]:
    """Like ``build_digits_shards``, returning what each split's build wrote, kept and skipped."""
    test_fraction = 0.2
    params: dict[str, object] = {
        "source": "sklearn.datasets.load_digits",
        "seed": seed,
        "test_fraction": test_fraction,
    }
    per_shard = None if shard_bytes is not None else samples_per_shard
    splits = digits_splits(test_fraction=test_fraction, seed=seed)
    return {
        split: build_split(
            InlineSource(),
            inline_entries(splits[split]),
            out_dir, split, DIGITS_CLASSES, DIGITS_IMAGE,
            samples_per_shard=per_shard, shard_bytes=shard_bytes, workers=workers,
            shuffle=False, seed=seed, params=params, progress=progress,
        )
        for split in DIGITS_SPLITS
    }
