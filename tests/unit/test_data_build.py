"""Shard building: ImageNet-style trees (flat val + labels file), bad files, resume, sizes, CLI."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asnn_dist.data import storage
from asnn_dist.data.build import build_split, journal_url
from asnn_dist.data.builders import build_folder_shards, build_imagenet_shards, build_synthetic_shards
from asnn_dist.data.buildplan import Entry, make_key, plan_shards, unique_keys
from asnn_dist.data.cli_shards import main as shards_main
from asnn_dist.data.errors import DataError
from asnn_dist.data.folders import read_labels_file
from asnn_dist.data.manifest import ImageInfo, load_manifest, verify_shards
from asnn_dist.data.synthetic import SyntheticSource
from asnn_dist.testing.sources import InterruptingSource

CLASSES = ["n01440764", "n01443537", "n01484850"]


def jpeg(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def read_shards(manifest) -> dict[str, tuple[str, bytes, int]]:
    """key -> (image extension, image bytes, label) over all shards of a manifest."""
    out: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    for url in manifest.shard_urls():
        with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member)
                assert data is not None
                out[key][ext] = data.read()
    result = {}
    for key, entries in out.items():
        ext = next(e for e in entries if e != "cls")
        result[key] = (ext, entries[ext], int(entries["cls"]))
    return result


@pytest.fixture
def imagenet_tree(tmp_path: Path) -> tuple[Path, dict[str, bytes], dict[str, int]]:
    """train/<wnid>/*.JPEG (+ a PNG, a text file, a truncated JPEG) and a flat val/ + labels file."""
    root = tmp_path / "imagenet"
    files: dict[str, bytes] = {}
    labels: dict[str, int] = {}
    for c, wnid in enumerate(CLASSES):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(6):
            name = f"{wnid}_{i}"
            files[name] = jpeg(100 * c + i)
            labels[name] = c
            (folder / f"{name}.JPEG").write_bytes(files[name])
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (9, 99, 199)).save(png, "PNG")
    files["n01443537_png"], labels["n01443537_png"] = png.getvalue(), 1
    (root / "train" / "n01443537" / "n01443537_png.png").write_bytes(png.getvalue())
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image")
    (root / "train" / "n01484850" / "cut.JPEG").write_bytes(jpeg(7)[:300])
    (root / "train" / "n01484850" / ".DS_Store").write_bytes(b"\0\0")
    val = root / "val"
    val.mkdir()
    lines = ["ImageId,PredictionString"]
    for i in range(9):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        files[name], labels[name] = jpeg(1000 + i), i % 3
        (val / f"{name}.JPEG").write_bytes(files[name])
        lines.append(f"{name},{CLASSES[i % 3]} 12 34 56 78")  # Kaggle LOC_val_solution.csv style
    (val / "ILSVRC2012_val_99999999.JPEG").write_bytes(jpeg(5))  # no label line
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return root, files, labels


def test_imagenet_tree_round_trips_labels_and_bytes(imagenet_tree, tmp_path: Path) -> None:
    root, files, labels = imagenet_tree
    out = tmp_path / "shards"
    results = build_imagenet_shards(str(root), str(out), str(root / "LOC_val_solution.csv"),
                                    samples_per_shard=4, workers=2, progress=False)
    train, val = results["train"].manifest, results["val"].manifest
    assert train.classes == val.classes == CLASSES
    assert train.image == ImageInfo(channels=3, height=0, width=0, ext="jpg")
    assert (train.num_samples, val.num_samples) == (19, 9)
    stored = {**read_shards(train), **read_shards(val)}
    for key, (ext, data, label) in stored.items():
        name = key.rsplit("/", 1)[-1]
        assert data == files[name], key  # original bytes, no re-encoding
        assert label == labels[name], key
        assert ext == ("png" if name.endswith("_png") else "jpg")
    assert len(stored) == 28
    skipped = " | ".join(results["train"].skipped)
    assert "notes.txt: not a readable image" in skipped and "cut.JPEG: not a readable image" in skipped
    assert ".DS_Store" not in skipped and len(results["train"].skipped) == 2
    assert results["val"].skipped == [f"{root / 'val' / 'ILSVRC2012_val_99999999.JPEG'}: no label in "
                                      f"{root / 'LOC_val_solution.csv'}"]
    assert train.skipped == results["train"].skipped  # kept in the manifest too
    assert verify_shards(train) == [] and verify_shards(val) == []
    assert not storage.exists(journal_url(str(out), "train"))
    # A shard damaged after the build: the rerun rewrites it alone and keeps the skipped list.
    damaged = Path(train.shard_urls()[0])
    damaged.chmod(0o644)
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    again = build_imagenet_shards(str(root), str(out), str(root / "LOC_val_solution.csv"), samples_per_shard=4,
                                  progress=False)
    assert again["train"].written == [damaged.name] and again["val"].written == []
    assert sorted(again["train"].skipped) == sorted(results["train"].skipped)
    assert verify_shards(again["train"].manifest) == []


def test_val_as_class_folders_and_unknown_classes(imagenet_tree, tmp_path: Path) -> None:
    root, _, _ = imagenet_tree
    val = tmp_path / "val2"
    (val / CLASSES[2]).mkdir(parents=True)
    (val / CLASSES[2] / "a.JPEG").write_bytes(jpeg(3))
    result = build_folder_shards(str(val), str(tmp_path / "o"), "val", CLASSES, progress=False)
    assert [e[2] for e in read_shards(result.manifest).values()] == [2]
    (val / "n99999999").mkdir()
    with pytest.raises(DataError, match=r"n99999999.*not among the 3 known classes"):
        build_folder_shards(str(val), str(tmp_path / "o2"), "val", CLASSES, progress=False)
    with pytest.raises(DataError, match="labels file"):
        build_folder_shards(str(root / "val"), str(tmp_path / "o3"), "val", CLASSES, progress=False)


def test_labels_file_formats(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("# comment\na.JPEG n01443537\nsub/b.jpeg 2\nc n01440764\n\n")
    assert read_labels_file(str(path), CLASSES) == {"a": 1, "b": 2, "c": 0}
    path.write_text("a.JPEG n01443537\nb.JPEG n77777777\n")
    with pytest.raises(DataError, match=r"labels.txt:2: class 'n77777777' is neither"):
        read_labels_file(str(path), CLASSES)


def test_interrupted_build_resumes_without_rewriting_finished_shards(tmp_path: Path) -> None:
    source = InterruptingSource(24, 16, 3)
    entries = source.entries(40)
    plan = plan_shards(entries, samples_per_shard=5, shuffle=True, seed=1)
    source.stop_at = int(plan[5].entries[2].ref)  # dies inside the 6th shard
    image = ImageInfo(channels=3, height=16, width=24, ext="jpg")
    kw = dict(samples_per_shard=5, seed=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_split(source, entries, str(tmp_path), "train", ["a", "b", "c"], image, **kw)
    finished = sorted(p.name for p in tmp_path.glob("train-*.tar"))
    assert finished == [f"train-{i:06d}.tar" for i in range(5)]
    assert not (tmp_path / "train.manifest.json").exists()
    journal = json.loads((tmp_path / "train.build-journal.json").read_text())
    assert sorted(r["name"] for r in journal["shards"]) == finished
    mtimes = {n: (tmp_path / n).stat().st_mtime_ns for n in finished}
    tampered = tmp_path / finished[1]
    tampered.chmod(0o644)
    tampered.write_bytes(tampered.read_bytes()[:-1] + b"!")  # a finished shard went bad meanwhile

    source.stop_at = -1
    result = build_split(source, entries, str(tmp_path), "train", ["a", "b", "c"], image, **kw)
    assert result.reused == [n for n in finished if n != finished[1]]
    assert result.written == [finished[1]] + [f"train-{i:06d}.tar" for i in range(5, 8)]
    for name in result.reused:
        assert (tmp_path / name).stat().st_mtime_ns == mtimes[name]
    assert result.manifest.num_samples == 40 and verify_shards(result.manifest) == []
    assert not (tmp_path / "train.build-journal.json").exists()
    again = build_split(source, entries, str(tmp_path), "train", ["a", "b", "c"], image, **kw)
    assert again.written == [] and len(again.reused) == 8


def test_plans_by_bytes_seeded_shuffle_and_keys() -> None:
    entries = [Entry(f"k{i}", 0, i, size=1000) for i in range(20)]
    by_bytes = plan_shards(entries, shard_bytes=6000, shuffle=False)
    assert [len(s.entries) for s in by_bytes] == [2] * 10  # 1000 + 1536 tar overhead each
    a = plan_shards(entries, samples_per_shard=7, seed=3)
    assert [len(s.entries) for s in a] == [7, 7, 6]
    assert a == plan_shards(entries, samples_per_shard=7, seed=3)
    assert a != plan_shards(entries, samples_per_shard=7, seed=4)
    assert make_key("n01/n01_1.JPEG") == "n01/n01_1" and make_key("a b.c.jpg") == "a_b_c"
    assert unique_keys(["a", "a", "b", "a"]) == ["a", "a-2", "b", "a-3"]
    with pytest.raises(DataError, match="exactly one"):
        plan_shards(entries, samples_per_shard=5, shard_bytes=10)


def test_synthetic_shards_and_byte_target(tmp_path: Path) -> None:
    result = build_synthetic_shards(str(tmp_path), 12, num_classes=4, width=40, height=30,
                                    shard_bytes=20_000, progress=False)
    m = result.manifest
    assert m.num_samples == 12 and m.classes == [f"class{i:04d}" for i in range(4)]
    assert all(s.num_bytes <= 20_000 + 10_240 for s in m.shards) and len(m.shards) > 1
    stored = read_shards(m)
    counts = collections.Counter(label for _, _, label in stored.values())
    assert counts == {0: 3, 1: 3, 2: 3, 3: 3}
    ext, data, _ = next(iter(stored.values()))
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (40, 30)
    assert hashlib.sha256(SyntheticSource(40, 30, 4).encode(0, 0)).digest() == hashlib.sha256(
        SyntheticSource(40, 30, 4).encode(0, 0)).digest()  # regenerable in any worker


def test_cli_builds_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    assert shards_main(["build", "synthetic", "--out", str(out), "--num-samples", "10", "--num-classes",
                        "2", "--image-size", "24x16", "--samples-per-shard", "4", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"train: 10 samples in 3 shards (3 written, 0 kept, 0 files skipped) -> {out}/train.manifest.json"
    assert load_manifest(str(out / "train.manifest.json")).num_samples == 10
    assert shards_main(["digits", "--out", str(tmp_path / "d"), "--samples-per-shard", "500",
                        "--no-progress"]) == 0
    assert "test: 360 samples in 1 shards" in capsys.readouterr().out
    with pytest.raises(DataError, match="--root is required"):
        shards_main(["build", "imagenet", "--out", str(tmp_path / "x")])
