"""ShardLoader: exact epochs across ranks and workers, equal batch counts, clear errors."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from asnn_dist.data.errors import DataError
from asnn_dist.data.loader import ShardLoader
from asnn_dist.data.manifest import Manifest, load_manifest
from asnn_dist.data.sources import build_digits_shards


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manifest]:
    # 64 per shard: train 23 shards, test 6 shards (enough for 2 ranks x 2 workers).
    return build_digits_shards(str(tmp_path_factory.mktemp("digits")), samples_per_shard=64,
                               progress=False)


def _epoch(
    manifest: Manifest | str, world_size: int, epoch: int = 0, **kw: Any
) -> tuple[list[list[str]], list[int]]:
    """Keys of valid rows per rank (in order) and batch counts per rank, one loader per rank."""
    keys: list[list[str]] = []
    counts: list[int] = []
    for rank in range(world_size):
        loader = ShardLoader(manifest, rank=rank, world_size=world_size, **kw)
        loader.set_epoch(epoch)
        rank_keys: list[str] = []
        n = 0
        for images, labels, valid, batch_keys in loader.iter_with_keys():
            n += 1
            assert images.shape[0] == labels.shape[0] == valid.shape[0] == len(batch_keys)
            rank_keys += [k for k, v in zip(batch_keys, valid.tolist()) if v]
        assert n == len(loader)
        assert len(rank_keys) == loader.num_rank_samples()
        keys.append(rank_keys)
        counts.append(n)
    return keys, counts


def test_eval_two_ranks_two_workers_exact_epoch(manifests: dict[str, Manifest]) -> None:
    keys, counts = _epoch(manifests["test"], 2, batch_size=32, num_workers=2, train=False)
    flat = [k for r in keys for k in r]
    assert len(flat) == len(set(flat)) == 360
    assert counts[0] == counts[1] == 6  # 180 per rank -> ceil(180 / 32)
    # Eval order is fixed: a second pass gives the same sequence.
    assert _epoch(manifests["test"], 2, batch_size=32, num_workers=2, train=False)[0] == keys


def test_train_epochs_reshuffle_same_sample_set(manifests: dict[str, Manifest]) -> None:
    kw: dict[str, Any] = dict(batch_size=50, num_workers=2, train=True, augment=True, shuffle_buffer=64)
    e0, c0 = _epoch(manifests["train"], 2, epoch=0, **kw)
    e1, c1 = _epoch(manifests["train"], 2, epoch=1, **kw)
    for keys in (e0, e1):
        flat = [k for r in keys for k in r]
        assert len(flat) == len(set(flat)) == 1437
    assert c0[0] == c0[1] == c1[0] == c1[1]
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, []))
    assert _epoch(manifests["train"], 2, epoch=0, **kw)[0] == e0  # reproducible per epoch


def test_batches_shapes_padding_and_in_process(manifests: dict[str, Manifest]) -> None:
    loader = ShardLoader(manifests["test"], batch_size=64, num_workers=0, train=False, image_size=16)
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # 360 -> 5 full + 1 padded
    for images, labels, valid in batches:
        assert images.shape == (64, 1, 16, 16) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and valid.dtype == torch.bool
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert labels.min() >= 0 and labels.max() <= 9
    assert [int(v.sum()) for _, _, v in batches] == [64] * 5 + [40]
    assert not batches[-1][2][40:].any()
    counts = collections.Counter(int(x) for _, labels, v in batches for x in labels[v])
    assert sum(counts.values()) == 360 and len(counts) == 10


def test_uneven_ranks_pad_to_equal_batch_counts(tmp_path: Path) -> None:
    # 1437 samples in 3 shards of 479 over 2 ranks: rank 0 holds 2 shards, rank 1 one.
    manifest = build_digits_shards(str(tmp_path), samples_per_shard=480, progress=False)["train"]
    keys, counts = _epoch(manifest, 2, batch_size=100, num_workers=0, train=False)
    assert counts == [10, 10]  # ceil(958 / 100) on both; rank 1 pads with valid=False
    assert [len(k) for k in keys] == [958, 479]
    assert len(set(keys[0] + keys[1])) == 1437


def test_too_few_shards(manifests: dict[str, Manifest]) -> None:
    with pytest.raises(DataError, match=r"at least 8 shards are needed.*smaller samples_per_shard"):
        ShardLoader(manifests["test"], batch_size=8, rank=0, world_size=2, num_workers=4)


def test_missing_shard_error_names_url_through_workers(
    manifests: dict[str, Manifest], tmp_path: Path
) -> None:
    source = Path(manifests["test"].base_url)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("test.manifest.json", *(s.name for s in manifests["test"].shards)):
        shutil.copy(source / name, copy / name)
    missing = copy / "test-000003.tar"
    missing.unlink()
    loader = ShardLoader(str(copy / "test.manifest.json"), batch_size=16, num_workers=2, train=False)
    with pytest.raises(DataError) as exc:
        list(loader)
    assert str(missing) in str(exc.value) and "not found" in str(exc.value)
    assert "Traceback" not in str(exc.value)


def test_truncated_shard_is_skipped_and_counted_garbage_shard_errors(
    manifests: dict[str, Manifest], tmp_path: Path
) -> None:
    # Deliberate change (issue 5): a cut-off shard keeps its readable samples, and the samples it
    # lost are skipped and counted; a shard unreadable from its first byte is still an error.
    source = Path(manifests["test"].base_url)
    for name in ("test.manifest.json", *(s.name for s in manifests["test"].shards)):
        shutil.copy(source / name, tmp_path / name)
    broken = tmp_path / "test-000001.tar"
    broken.chmod(0o644)
    broken.write_bytes(broken.read_bytes()[:5000])
    manifest = load_manifest(str(tmp_path / "test.manifest.json"))
    loader = ShardLoader(manifest, batch_size=16, num_workers=2, train=False)
    valid = sum(int(v.sum()) for _, _, v in loader)
    assert loader.skipped_samples > 0 and valid + loader.skipped_samples == 360
    assert str(broken) in loader.skipped_reasons[0] and "truncated" in loader.skipped_reasons[0]
    broken.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match=str(broken)):
        list(ShardLoader(manifest, batch_size=16, num_workers=2, train=False))


def test_rebatch_merges_partials_and_pads() -> None:
    from asnn_dist.data.rebatch import rebatch

    def part(start: int, n: int):
        ids = torch.arange(start, start + n)
        return ids.float().view(n, 1, 1, 1), ids, [f"k{i}" for i in ids.tolist()]

    full = part(0, 4)
    parts = [full, part(4, 3), part(7, 2), part(9, 1)]  # 10 samples, batch 4, 4 batches wanted
    out = list(rebatch(parts, batch_size=4, num_batches=4, expected_samples=10, where="test"))
    assert out[0][0] is full[0]  # full batches pass through without a copy
    assert [int(v.sum()) for _, _, v, _ in out] == [4, 4, 2, 0]
    valid_keys = [k for _, _, v, keys in out for k, ok in zip(keys, v.tolist()) if ok]
    assert sorted(valid_keys) == sorted(f"k{i}" for i in range(10))
    assert all(len(keys) == 4 and images.shape[0] == 4 for images, _, _, keys in out)
    with pytest.raises(DataError, match="manifest lists 11"):
        list(rebatch(parts, batch_size=4, num_batches=4, expected_samples=11, where="test"))


def test_file_url_manifest_and_stable_len(manifests: dict[str, Manifest]) -> None:
    url = "file://" + manifests["test"].base_url + "/test.manifest.json"
    loader = ShardLoader(url, batch_size=100, train=False)
    assert loader.urls[0].startswith("file://")
    assert sum(int(v.sum()) for _, _, v in loader) == 360
    train = ShardLoader(manifests["train"], batch_size=32, rank=1, world_size=3, train=True)
    lengths = set()
    for epoch in range(5):
        train.set_epoch(epoch)
        lengths.add(len(train))
        assert train.num_rank_samples() <= len(train) * 32
    assert len(lengths) == 1  # same batch count every epoch (usable for LR schedules)
