"""Mid-epoch resume from ``ShardLoader.state_dict()``: the resumed loader yields bit for bit the
batches an uninterrupted pass yields from that point (images after augmentation, labels,
valid masks, keys), with several DataLoader workers, merged partial tails, padding batches,
resampled epochs, corrupt samples and a cut shard; and it does not decode the samples it skips
(nor read their bytes, where a shard's headers describe it, ``tarindex``)."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from asnn_dist.data import recipes
from asnn_dist.data.builders import build_synthetic_shards
from asnn_dist.data.loader import ShardLoader
from asnn_dist.data.manifest import Manifest
from asnn_dist.data.ordering import ordered
from asnn_dist.data.samples import Skipped, WorkerEnd, collate, shard_samples
from asnn_dist.data.tarindex import materialize, scan_shard
from asnn_dist.data.writer import TarShardWriter


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """55 synthetic 32x24 JPEGs in 11 shards of 5: rank 1 of 2 reads 25 (fewer than rank 0,
    so its epoch ends with a padded tail batch and a batch of padding only)."""
    out = tmp_path_factory.mktemp("resume")
    return build_synthetic_shards(str(out), 55, num_classes=4, width=32, height=24,
                                  samples_per_shard=5, progress=False).manifest


def loader_args(**changes: Any) -> dict[str, Any]:
    return {**dict(batch_size=4, rank=1, world_size=2, train=True, recipe="imagenet", image_size=16,
                   augment=True, shuffle_buffer=6, seed=3), **changes}


def take(loader: ShardLoader, limit: int | None = None) -> list[tuple[Any, ...]]:
    out = []
    for batch in loader.iter_with_keys():
        out.append(batch)
        if len(out) == limit:
            break
    return out


def assert_same(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), f"batch {i}"
        assert a[3] == b[3], f"batch {i}"


def resumed_at(manifest: Manifest, k: int, epoch: int, **kw: Any) -> tuple[list[tuple[Any, ...]], ShardLoader]:
    first = ShardLoader(manifest, **kw)
    first.set_epoch(epoch)
    head = take(first, k) if k else []
    state = first.state_dict()
    resumed = ShardLoader(manifest, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)
    return head + take(resumed), resumed


@pytest.mark.parametrize("workers, mode", [(0, "exact"), (3, "exact"), (2, "resampled")])
def test_resume_at_every_batch_is_bit_exact(shards: Manifest, workers: int, mode: str) -> None:
    kw = loader_args(num_workers=workers, mode=mode, epoch_length=40)
    full = ShardLoader(shards, **kw)
    full.set_epoch(2)
    reference = take(full)
    if mode == "exact":  # 3 workers: 10/10/5 samples, partial tails merged, then a padding batch
        assert [int(b[2].sum()) for b in reference] == [4, 4, 4, 4, 4, 4, 1, 0]
    # in-process: every batch; with workers: mid-stream, among merged tails and among padding
    for k in range(len(reference) + 1) if workers == 0 else (1, 3, len(reference) - 2, len(reference) - 1):
        batches, _ = resumed_at(shards, k, 2, **kw)
        assert_same(batches, reference)


def corrupt(url: str, index: int) -> None:
    """Replace the image of the ``index``-th sample of a local shard with bytes no decoder reads."""
    path = url.removeprefix("file://")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    images = [i for i, (m, _) in enumerate(members) if not m.name.endswith(".cls")]
    with tarfile.open(path, "w") as tar:
        for i, (member, data) in enumerate(members):
            data = b"not an image" if i == images[index] else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_resume_with_corrupt_samples_counts_each_once(shards: Manifest, tmp_path: Path) -> None:
    """A sample that does not decode in every shard, and one shard cut short (read by the full
    tar reader, not from its headers): resumed batches and skip counts are still exact."""
    manifest = build_synthetic_shards(str(tmp_path), 55, num_classes=4, width=32, height=24,
                                      samples_per_shard=5, progress=False).manifest
    urls = manifest.shard_urls()
    for shard in range(len(manifest.shards)):
        corrupt(urls[shard], shard % 5)
    kw = loader_args(num_workers=2)
    full = ShardLoader(manifest, **kw)
    full.set_epoch(1)
    cut = Path(urls[full.rank_shard_indices()[1]])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 6 // 10])
    assert scan_shard(str(cut), 5) is None and scan_shard(urls[full.rank_shard_indices()[0]], 5) is not None
    reference = take(full)
    assert full.skipped_samples > 5  # one undecodable per shard of this rank, plus the cut samples
    for k in (2, 4, len(reference) - 1):
        batches, resumed = resumed_at(manifest, k, 1, **kw)
        assert_same(batches, reference)
        assert resumed.skipped_samples == full.skipped_samples


def test_header_index_gives_the_full_readers_samples(shards: Manifest, tmp_path: Path) -> None:
    url = shards.shard_urls()[0]
    indexed = scan_shard(url, 5)
    assert indexed is not None and [materialize(s) for s in indexed] == list(shard_samples(url, 5))
    assert scan_shard(url, 6) is None  # another count than the manifest's: the full reader decides
    folder_keys = str(tmp_path / "keys.tar")  # keys with a folder part, as the folder/ImageNet builders write
    with open(folder_keys, "wb") as out, TarShardWriter(out) as writer:
        for i in range(3):
            writer.write(f"n0144/img{i}", {"JPG": bytes([i]) * (700 * i), "cls": b"1"})
        writer.close()
    indexed = scan_shard(folder_keys, 3)
    assert indexed is not None and [materialize(s) for s in indexed] == list(shard_samples(folder_keys, 3))


def test_resume_decodes_only_the_samples_left(shards: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    original = recipes.ImageNetTransform.__call__

    def counting(self: Any, data: bytes, where: str = "image") -> torch.Tensor:
        calls[0] += 1
        return original(self, data, where)

    monkeypatch.setattr(recipes.ImageNetTransform, "__call__", counting)
    kw = loader_args(num_workers=0)
    first = ShardLoader(shards, **kw)
    take(first, 5)
    assert calls[0] == 20
    calls[0] = 0
    resumed = ShardLoader(shards, **kw)
    resumed.load_state_dict(first.state_dict())
    rest = take(resumed)
    assert len(rest) == 3 and calls[0] == 5  # 5 real samples left of 25; none decoded again
    stopped = ShardLoader(shards, **kw)
    take(stopped, 7)  # 6 full batches, the padded tail (1 sample); a padding batch follows
    calls[0] = 0
    padding = ShardLoader(shards, **kw)
    padding.load_state_dict(stopped.state_dict())
    assert len(take(padding)) == 1 and calls[0] == 1  # rebuilds the tail batch the padding repeats


def test_ordered_does_not_depend_on_delivery_order() -> None:
    """Worker items interleaved in any order (as DataLoader phases differ after a resume) come
    out in one order: round-robin by batch index, partial batches last in worker order."""
    def batch(worker: int, rows: int, tag: int) -> tuple[Any, ...]:
        return collate([(torch.tensor([float(tag)]), 0, f"w{worker}-{tag}", tag) for _ in range(rows)], worker)

    streams = {0: [batch(0, 2, 0), Skipped(1, "bad", 0), batch(0, 2, 1), batch(0, 1, 2), WorkerEnd(0)],
               1: [batch(1, 2, 0), WorkerEnd(1)],
               2: [Skipped(2, "cut", 2), batch(2, 2, 0), batch(2, 2, 1), batch(2, 1, 2), WorkerEnd(2)]}
    want = ["w0-0", "w1-0", "cut", "w2-0", "bad", "w0-1", "w2-1", "w0-2", "w2-2"]
    rng = random.Random(0)
    for _ in range(20):
        queues = {w: list(items) for w, items in streams.items()}
        mixed = []
        while any(queues.values()):
            w = rng.choice([k for k, q in queues.items() if q])
            mixed.append(queues[w].pop(0))
        done = [0, 0, 0]
        got = [item.reason if isinstance(item, Skipped) else item[2][0] for item in ordered(mixed, 2, done)]
        assert got == want and done == [2, 1, 2]
    resumed = [batch(0, 1, 2), WorkerEnd(0), WorkerEnd(1), batch(2, 2, 1), batch(2, 1, 2), WorkerEnd(2)]
    done = [2, 1, 1]  # consumed: w0-0, w1-0, w2-0, w0-1
    assert [item[2][0] for item in ordered(resumed, 2, done)] == ["w2-1", "w0-2", "w2-2"]
