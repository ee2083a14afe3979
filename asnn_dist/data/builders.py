"""Shard builders per source: ImageNet-style trees, any folder-per-class tree, synthetic JPEGs.

Why thin functions over ``build_split``: each source only has to say which entries exist, what
the classes are and how images are stored; planning, resuming, parallel writing, skipping bad
files and the manifest are shared. Images are stored as their original bytes (no re-encode).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from asnn_dist.data.build import BuildResult, build_split
from asnn_dist.data.errors import DataError
from asnn_dist.data.folders import (
    FolderSource,
    class_names,
    has_class_folders,
    scan_class_folders,
    scan_flat_folder,
)
from asnn_dist.data.manifest import ImageInfo
from asnn_dist.data.synthetic import SyntheticSource

# Decoded as RGB; stored sizes vary (0) and most files are JPEGs. Other formats keep their own
# extension inside the shard and decode just the same.
PHOTO_IMAGE = ImageInfo(channels=3, height=0, width=0, ext="jpg")


def build_folder_shards(
    root: str,
    out_dir: str,
    split: str,
    classes: list[str] | None = None,
    labels_file: str | None = None,
    **options: Any,
) -> BuildResult:
    """Shards of one split from ``root``: class folders, or a flat folder plus ``labels_file``.

    ``classes`` (default: the sorted class folders of ``root``) fixes the label indices; pass the
    training split's classes when building its validation split. ``options`` go to
    ``build_split`` (samples_per_shard or shard_bytes, workers, shuffle, seed, progress).
    """
    params: dict[str, Any] = {"source": "folder", "split_folder": os.path.basename(os.path.normpath(root))}
    if labels_file is not None or not has_class_folders(root):
        if labels_file is None:
            raise DataError(
                f"{root}: no class folders inside; for a flat folder of images pass a labels file "
                "(--val-labels FILE with lines '<file name> <class>')"
            )
        if classes is None:
            raise DataError(f"{root}: a flat folder needs the class list of the training split")
        entries, problems = scan_flat_folder(root, labels_file, classes)
        params["labels_file"] = os.path.basename(labels_file)
    else:
        classes, entries = scan_class_folders(root, classes)
        problems = []
    return build_split(FolderSource(root), entries, out_dir, split, classes, PHOTO_IMAGE,
                       params=params, skipped=problems, **options)


def build_imagenet_shards(
    root: str,
    out_dir: str,
    val_labels: str | None = None,
    splits: tuple[str, ...] = ("train", "val"),
    **options: Any,
) -> dict[str, BuildResult]:
    """Shards of an ImageNet-style tree: ``root/train/<class>/*`` and ``root/val`` (either layout).

    Classes are the sorted folder names of ``root/train`` (WordNet ids for ImageNet, so index =
    the usual label). The validation split may be class folders or flat with ``val_labels``.
    """
    train_dir = Path(root) / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train/ folder; expected {root}/train/<class>/<images> (and {root}/val)")
    classes = class_names(str(train_dir))
    results: dict[str, BuildResult] = {}
    for split in splits:
        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found; expected the {split!r} split of {root}")
        labels = val_labels if split != "train" else None
        results[split] = build_folder_shards(str(folder), out_dir, split, classes, labels, **options)
    return results


def build_synthetic_shards(
    out_dir: str,
    num_samples: int,
    num_classes: int = 10,
    width: int = 500,
    height: int = 375,
    split: str = "train",
    quality: int = 90,
    data_seed: int = 0,
    offset: int = 0,
    **options: Any,
) -> BuildResult:
    """Shards of ``num_samples`` synthetic JPEGs (``width`` x ``height``, ``num_classes`` classes).

    ``offset`` shifts the image indices so another split gets other images.
    """
    if num_samples < 1 or num_classes < 1 or width < 1 or height < 1:
        raise DataError("synthetic shards need num_samples, num_classes, width and height >= 1")
    source = SyntheticSource(width, height, num_classes, seed=data_seed, quality=quality)
    params = {"source": "synthetic", "width": width, "height": height, "quality": quality,
              "data_seed": data_seed}
    classes = [f"class{i:04d}" for i in range(num_classes)]
    image = ImageInfo(channels=3, height=height, width=width, ext="jpg")
    return build_split(source, source.entries(num_samples, offset), out_dir, split, classes, image,
                       params=params, **options)
