"""ShardLoader modes: resampled epochs, mid-epoch resume (state_dict), corrupt samples, recipes."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from asnn_dist.data.build import build_split
from asnn_dist.data.builders import build_synthetic_shards
from asnn_dist.data.buildplan import InlineSource
from asnn_dist.data.errors import DataError
from asnn_dist.data.loader import ShardLoader
from asnn_dist.data.manifest import ImageInfo, Manifest
from asnn_dist.data.writer import Sample, inline_entries
from asnn_dist.testing.sources import replace_member


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """60 synthetic 32x24 JPEGs, 4 classes, 12 shards of 5."""
    out = tmp_path_factory.mktemp("synthetic")
    return build_synthetic_shards(str(out), 60, num_classes=4, width=32, height=24,
                                  samples_per_shard=5, progress=False).manifest


def valid_keys(loader: ShardLoader, limit: int | None = None) -> tuple[list[str], int]:
    keys: list[str] = []
    count = 0
    for images, labels, valid, batch_keys in loader.iter_with_keys():
        assert images.shape[0] == labels.shape[0] == len(batch_keys) == loader.batch_size
        keys += [k for k, v in zip(batch_keys, valid.tolist()) if v]
        count += 1
        if limit is not None and count == limit:
            break
    return keys, count


def test_resampled_equal_batches_any_shard_count(synthetic: Manifest) -> None:
    kw: dict[str, Any] = dict(batch_size=8, world_size=2, num_workers=2, mode="resampled",
                              epoch_length=100, recipe="imagenet", image_size=16, augment=True)
    # 12 shards would be too few for exact mode with 2 ranks x 8 workers, not for resampled.
    ShardLoader(synthetic, rank=0, **{**kw, "num_workers": 8})
    runs = []
    for epoch in (0, 0, 1):
        per_rank = []
        for rank in range(2):
            loader = ShardLoader(synthetic, rank=rank, **kw)
            loader.set_epoch(epoch)
            keys, count = valid_keys(loader)
            assert count == len(loader) == 7  # ceil(100 / (2 * 8))
            assert len(keys) == 56  # every row valid
            per_rank.append(keys)
        runs.append(per_rank)
    assert runs[0] == runs[1] and runs[0] != runs[2]  # reproducible per epoch, new draw per epoch
    assert set(sum(runs[0], [])) <= {f"synthetic-{i:08d}" for i in range(60)}
    with pytest.raises(DataError, match="evaluation needs mode='exact'"):
        ShardLoader(synthetic, batch_size=8, train=False, mode="resampled")


@pytest.mark.parametrize("train", [True, False])
def test_resume_mid_epoch_continues_exactly(synthetic: Manifest, train: bool) -> None:
    kw: dict[str, Any] = dict(batch_size=7, rank=1, world_size=2, num_workers=2, train=train,
                              recipe="imagenet", image_size=16, augment=train, shuffle_buffer=6)
    full = ShardLoader(synthetic, **kw)
    full.set_epoch(3)
    all_keys, total = valid_keys(full)
    assert len(all_keys) == len(set(all_keys)) == full.num_rank_samples()

    first = ShardLoader(synthetic, **kw)
    first.set_epoch(3)
    before, _ = valid_keys(first, limit=2)
    state = first.state_dict()
    assert state["epoch"] == 3 and state["batches_consumed"] == 2
    resumed = ShardLoader(synthetic, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the training loop's usual call keeps the restored position
    after, count = valid_keys(resumed)
    assert count == total - 2 and len(resumed) == total
    assert sorted(before + after) == sorted(all_keys)  # each sample exactly once
    assert resumed.batches_consumed == 0  # the pass finished; a new pass starts the epoch again
    resumed.set_epoch(4)
    assert valid_keys(resumed)[1] == total


def test_resume_with_other_layout_keeps_batch_count(synthetic: Manifest, caplog: Any) -> None:
    kw: dict[str, Any] = dict(batch_size=6, num_workers=2, recipe="imagenet", image_size=16)
    first = ShardLoader(synthetic, **kw)
    valid_keys(first, limit=3)
    other = ShardLoader(synthetic, **{**kw, "num_workers": 1})
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(first.state_dict())
    assert "num_workers" in caplog.text
    assert valid_keys(other)[1] == len(other) - 3
    resampled = ShardLoader(synthetic, **{**kw, "mode": "resampled", "epoch_length": 60})
    valid_keys(resampled, limit=4)
    again = ShardLoader(synthetic, **{**kw, "mode": "resampled", "epoch_length": 60})
    again.load_state_dict(resampled.state_dict())
    assert valid_keys(again)[1] == 10 - 4
    with pytest.raises(DataError, match="not a ShardLoader.state_dict"):
        again.load_state_dict({"epoch": 1})


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path: Path) -> None:
    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "JPEG")
        return buf.getvalue()

    samples = [Sample(f"s{i:02d}", jpeg(i), "jpg", i % 2) for i in range(16)]
    info = ImageInfo(channels=3, height=20, width=20, ext="jpg")
    manifest = build_split(InlineSource(), inline_entries(samples), str(tmp_path), "train", ["a", "b"], info,
                           samples_per_shard=4, shuffle=False, progress=False).manifest
    urls = manifest.shard_urls()
    replace_member(urls[1], "s05.jpg", jpeg(5)[:200])  # truncated JPEG
    replace_member(urls[2], "s11.jpg", b"definitely not a jpeg")
    for recipe in ("imagenet", "cifar"):
        loader = ShardLoader(manifest, batch_size=4, num_workers=2, train=False, recipe=recipe,
                             image_size=16)
        keys, count = valid_keys(loader)
        assert count == len(loader) == 4
        assert sorted(keys) == sorted(f"s{i:02d}" for i in range(16) if i not in (5, 11))
        assert loader.skipped_samples == 2
        assert sorted(r.split("'")[1] for r in loader.skipped_reasons) == ["s05", "s11"]
        assert all("cannot decode image" in r for r in loader.skipped_reasons)
