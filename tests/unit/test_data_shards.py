"""Shard writing, manifests, storage and transforms on the bundled digits (real images)."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asnn_dist.data import storage
from asnn_dist.data.build import build_split
from asnn_dist.data.buildplan import InlineSource, balanced_sizes
from asnn_dist.data.errors import DataError
from asnn_dist.data.manifest import ImageInfo, load_manifest, manifest_url, verify_shards
from asnn_dist.data.sources import build_digits_shards, digits_splits, encode_png
from asnn_dist.data.transforms import ImageTransform, decode_image, random_translate, resize_square
from asnn_dist.data.writer import Sample, inline_entries


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    build_digits_shards(str(out), samples_per_shard=64, progress=False)
    return out


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            entry = tar.extractfile(member)
            assert entry is not None
            samples[key][ext] = entry.read()
    return samples


def test_manifest_contents(digits_dir: Path) -> None:
    train = load_manifest(str(digits_dir / "train.manifest.json"))
    test = load_manifest(str(digits_dir / "test.manifest.json"))
    assert train.num_samples + test.num_samples == 1797
    assert (train.num_samples, test.num_samples) == (1437, 360)
    assert train.classes == test.classes == [str(d) for d in range(10)]
    assert train.image == ImageInfo(channels=1, height=8, width=8, ext="png")
    assert train.format_version == 1 and train.split == "train"
    assert train.created_by.startswith("asnn-dist")
    for manifest in (train, test):
        sizes = [s.num_samples for s in manifest.shards]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 64
        assert [s.name for s in manifest.shards] == [
            f"{manifest.split}-{i:06d}.tar" for i in range(len(sizes))
        ]
        for info, url in zip(manifest.shards, manifest.shard_urls()):
            data = Path(url).read_bytes()
            assert hashlib.sha256(data).hexdigest() == info.sha256
            assert len(data) == info.num_bytes
            assert len(_read_tar(Path(url))) == info.num_samples
        assert verify_shards(manifest) == []


def test_shards_round_trip_real_pixels_and_stratified(digits_dir: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    labels_by_split: dict[str, list[int]] = {}
    keys: list[str] = []
    for split in ("train", "test"):
        labels_by_split[split] = []
        for url in load_manifest(str(digits_dir / f"{split}.manifest.json")).shard_urls():
            for key, entry in _read_tar(Path(url)).items():
                index = int(key.split("-")[1])
                label = int(entry["cls"])
                assert label == digits.target[index]
                pixels = np.asarray(Image.open(io.BytesIO(entry["png"])))
                np.testing.assert_array_equal(pixels, expected[index])
                labels_by_split[split].append(label)
                keys.append(key)
    assert len(keys) == len(set(keys)) == 1797
    per_class = collections.Counter(digits.target.tolist())
    test_counts = collections.Counter(labels_by_split["test"])
    for cls, count in per_class.items():
        assert abs(test_counts[cls] - count * 0.2) <= 1


def test_second_build_reuses_and_tampering_rebuilds(tmp_path: Path) -> None:
    build_digits_shards(str(tmp_path), samples_per_shard=256, progress=False)
    files = sorted(tmp_path.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in files}
    again = build_digits_shards(str(tmp_path), samples_per_shard=256, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(tmp_path.iterdir())} == before
    assert again["train"].num_samples == 1437
    # A shard changed after its manifest was written makes the next build rewrite that split.
    shard = tmp_path / "test-000000.tar"
    original = shard.read_bytes()
    os.chmod(shard, 0o644)
    shard.write_bytes(original[:-1] + b"x")
    rebuilt = build_digits_shards(str(tmp_path), samples_per_shard=256, progress=False)
    assert shard.read_bytes() == original  # deterministic shards: same bytes again
    assert (tmp_path / "train.manifest.json").stat().st_mtime_ns == before["train.manifest.json"]
    assert verify_shards(rebuilt["test"]) == []


def test_digits_split_is_fixed_by_seed() -> None:
    a, b = digits_splits(seed=3), digits_splits(seed=3)
    assert [s.key for s in a["test"]] == [s.key for s in b["test"]]
    assert {s.key for s in a["test"]} != {s.key for s in digits_splits(seed=4)["test"]}


def _tiny_samples(n: int) -> list[Sample]:
    img = encode_png(np.zeros((4, 4), dtype=np.uint8))
    return [Sample(key=f"s{i:03d}", data=img, ext="png", label=i % 2) for i in range(n)]


def test_inline_samples_build_balanced_shards_and_leave_bad_labels_out(tmp_path: Path) -> None:
    """In-memory samples go through the one shard builder (``build_split``)."""
    info = ImageInfo(channels=1, height=4, width=4, ext="png")

    def build(samples: list[Sample], out: Path, classes: list[str]):
        return build_split(InlineSource(), inline_entries(samples), str(out), "x", classes, info,
                           samples_per_shard=4, shuffle=False, progress=False).manifest

    manifest = build(_tiny_samples(10), tmp_path / "ok", ["a", "b"])
    assert [s.num_samples for s in manifest.shards] == [4, 3, 3]
    assert balanced_sizes(1437, 64) == [63] * 11 + [62] * 12
    bad = build([*_tiny_samples(3), Sample("k", _tiny_samples(1)[0].data, "png", 5)], tmp_path / "bad", ["a", "b"])
    assert bad.num_samples == 3 and any("label 5 outside 0..1" in line for line in bad.skipped)


def test_load_manifest_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.manifest.json"
    with pytest.raises(DataError, match=str(missing)):
        load_manifest(str(missing))
    broken = tmp_path / "broken.manifest.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON") as exc:
        load_manifest(str(broken))
    assert str(broken) in str(exc.value)
    wrong = tmp_path / "wrong.manifest.json"
    wrong.write_text(json.dumps({"format_version": 1, "split": "x", "shards": []}))
    with pytest.raises(DataError, match="invalid manifest") as exc:
        load_manifest(str(wrong))
    assert str(wrong) in str(exc.value)


def test_storage_local_and_file_urls(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/sub/a.bin"
    with storage.open_write(url) as f:
        f.write(b"hello")
    assert storage.exists(url) and storage.exists(str(tmp_path / "sub" / "a.bin"))
    assert storage.size(url) == 5
    with storage.open_read(url) as f:
        assert f.read() == b"hello"
    assert storage.join("file:///data/", "x.tar") == "file:///data/x.tar"
    assert storage.join(str(tmp_path), "x.tar") == str(tmp_path / "x.tar")
    assert manifest_url("s3://bucket/digits", "train") == "s3://bucket/digits/train.manifest.json"
    with pytest.raises(RuntimeError):
        with storage.open_write(str(tmp_path / "partial.bin")) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "partial.bin").exists()  # atomic: nothing left behind
    with pytest.raises(DataError, match=r"unsupported storage scheme 'gs'.*file://"):
        storage.open_read("gs://bucket/x.tar")
    with pytest.raises(DataError, match="missing.tar"):
        storage.open_read(str(tmp_path / "missing.tar"))


def test_transforms_shape_range_and_channels() -> None:
    gray = encode_png(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    image = ImageTransform(channels=1, image_size=16)(gray)
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    native = ImageTransform(channels=1)(gray)
    assert native.shape == (1, 8, 8) and native.max().item() == pytest.approx(252 / 255)
    rgb = encode_png(np.full((10, 12, 3), 255, dtype=np.uint8))
    small = ImageTransform(channels=3, image_size=4)(rgb)
    assert small.shape == (3, 4, 4) and torch.allclose(small, torch.ones(3, 4, 4))
    assert decode_image(rgb, channels=1).shape == (1, 10, 12)
    with pytest.raises(DataError, match="cannot decode"):
        decode_image(b"not an image", channels=1, where="sample 'k' in x.tar")
    assert resize_square(native, 8) is native


def test_random_translate_pads_with_zeros_and_is_seeded() -> None:
    ones = torch.ones(1, 8, 8)
    shifted = random_translate(ones, 2, torch.Generator().manual_seed(1))
    assert shifted.shape == (1, 8, 8)
    again = random_translate(ones, 2, torch.Generator().manual_seed(1))
    assert torch.equal(shifted, again)
    outs = [random_translate(ones, 2, torch.Generator().manual_seed(s)) for s in range(20)]
    assert any(o.sum() < 64 for o in outs)  # some shifts uncover zero padding
    assert all(set(o.unique().tolist()) <= {0.0, 1.0} for o in outs)
    gray = encode_png(np.full((8, 8), 255, dtype=np.uint8))
    aug = ImageTransform(channels=1, augment=True, generator=torch.Generator().manual_seed(0))
    assert aug(gray).shape == (1, 8, 8) and aug.shift_for(8) == 1
