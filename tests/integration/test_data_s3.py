"""Shards on a real S3-compatible HTTP server (moto server mode on loopback, started here).

Build to s3://, stream with 2 ranks x 2 workers (exact and resampled), corrupt and truncated
samples skipped and counted, clear errors for missing shards / buckets / endpoints, a resumed
build that keeps finished shards, an ImageNet-style tree through the CLI, and WebDataset's own
pipeline reading s3:// through our handler. Credentials are dummies set for these tests only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from asnn_dist.data import s3, storage
from asnn_dist.data.build import build_split
from asnn_dist.data.buildplan import InlineSource, plan_shards
from asnn_dist.data.builders import build_synthetic_shards
from asnn_dist.data.cli_shards import main as shards_main
from asnn_dist.data.errors import DataError, UnreachableError
from asnn_dist.data.loader import ShardLoader
from asnn_dist.data.manifest import ImageInfo, Manifest, load_manifest, verify_shards
from asnn_dist.data.writer import Sample, inline_entries
from asnn_dist.testing.services import free_port, moto_s3_server
from asnn_dist.testing.sources import InterruptingSource, replace_member

pytestmark = pytest.mark.integration
BUCKET = "asnn-data-test"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 server, dummy credentials in the environment, a versioned bucket."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
                            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        before = s3.settings()
        with moto_s3_server() as url:
            s3.configure(endpoint_url=url, max_attempts=3)
            client = s3.client()
            client.create_bucket(Bucket=BUCKET)
            client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
            yield url
        s3.configure(before)


@pytest.fixture(scope="module")
def synthetic(endpoint: str) -> Manifest:
    """48 synthetic 32x24 JPEGs in 12 shards on S3, written by 2 worker processes."""
    build_synthetic_shards(f"s3://{BUCKET}/synthetic", 48, num_classes=4, width=32, height=24,
                           samples_per_shard=4, workers=2, progress=False)
    return load_manifest(f"s3://{BUCKET}/synthetic/train.manifest.json")


def epoch_keys(manifest: Manifest, **kw: Any) -> tuple[list[list[str]], list[int]]:
    """Valid keys and batch counts per rank, 2 ranks."""
    keys, counts = [], []
    for rank in range(2):
        loader = ShardLoader(manifest, rank=rank, world_size=2, **kw)
        loader.set_epoch(1)
        rank_keys, n = [], 0
        for _, _, valid, batch_keys in loader.iter_with_keys():
            rank_keys += [k for k, v in zip(batch_keys, valid.tolist()) if v]
            n += 1
        assert n == len(loader)
        keys.append(rank_keys)
        counts.append(n)
    return keys, counts


def test_s3_shards_stream_to_two_ranks_two_workers(synthetic: Manifest) -> None:
    assert synthetic.base_url == f"s3://{BUCKET}/synthetic" and len(synthetic.shards) == 12
    assert verify_shards(synthetic) == []
    common: dict[str, Any] = dict(batch_size=5, num_workers=2, recipe="imagenet", image_size=16)
    everything = {f"synthetic-{i:08d}" for i in range(48)}
    for train in (True, False):
        keys, counts = epoch_keys(synthetic, train=train, augment=train, **common)
        flat = keys[0] + keys[1]
        assert len(flat) == len(set(flat)) == 48 and set(flat) == everything  # exactly once
        assert counts[0] == counts[1]
    keys, counts = epoch_keys(synthetic, train=True, mode="resampled", epoch_length=60, **common)
    assert counts == [6, 6] and all(len(k) == 30 for k in keys)  # ceil(60 / (2 * 5)), all valid
    saved = s3.settings()
    s3.configure(endpoint_url=None)  # the loader's own argument must point it at the server
    try:
        loader = ShardLoader(f"s3://{BUCKET}/synthetic/train.manifest.json", s3_endpoint_url=saved.endpoint_url,
                             train=False, **common)
        assert sum(int(v.sum()) for _, _, v in loader) == 48
    finally:
        s3.configure(saved)


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _inline_shards(samples: list[Sample], out: str, classes: list[str], info: ImageInfo) -> Manifest:
    """Shards of 4 samples each, in the given order, through the shard builder."""
    return build_split(InlineSource(), inline_entries(samples), out, "train", classes, info,
                       samples_per_shard=4, shuffle=False, progress=False).manifest


def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(endpoint: str) -> None:
    samples = [Sample(f"s{i:02d}", jpeg(i), "jpg", i % 2) for i in range(16)]
    info = ImageInfo(channels=3, height=20, width=20, ext="jpg")
    manifest = _inline_shards(samples, f"s3://{BUCKET}/corrupt", ["a", "b"], info)
    replace_member(manifest.shard_urls()[0], "s03.jpg", jpeg(3)[:150])  # corrupt JPEG
    last = manifest.shard_urls()[3]
    with storage.open_read(last) as f:
        whole = f.read()
    with storage.open_write(last) as f:
        f.write(whole[:3000])  # cut inside the second sample: one kept, three lost
    loader = ShardLoader(manifest, batch_size=4, num_workers=2, train=False, recipe="cifar")
    valid = [k for _, _, v, keys in loader.iter_with_keys() for k, ok in zip(keys, v.tolist()) if ok]
    assert loader.skipped_samples == 4 and len(valid) == 12 and "s03" not in valid
    reasons = " | ".join(loader.skipped_reasons)
    assert "sample 's03'" in reasons and "cannot decode image" in reasons
    assert f"{last}: truncated tar, 1 of 4 samples readable" in reasons


def test_missing_shard_bucket_and_endpoint_errors(synthetic: Manifest) -> None:
    url = f"s3://{BUCKET}/gone/train-000001.tar"
    samples = [Sample(f"g{i}", jpeg(i), "jpg", 0) for i in range(8)]
    info = ImageInfo(channels=3, height=20, width=20, ext="jpg")
    manifest = _inline_shards(samples, f"s3://{BUCKET}/gone", ["a"], info)
    storage.remove(url)
    with pytest.raises(DataError) as exc:
        list(ShardLoader(manifest, batch_size=4, num_workers=2, train=False, recipe="cifar"))
    assert str(exc.value).startswith(f"{url}: not found at S3 endpoint {s3.settings().endpoint_url}")
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match=r"bucket 'no-such-bucket' does not exist at S3 endpoint"):
        load_manifest("s3://no-such-bucket/x/train.manifest.json")
    with pytest.raises(DataError, match=r"s3://asnn-data-test/nothing/train.manifest.json: manifest not found"):
        load_manifest(f"s3://{BUCKET}/nothing/train.manifest.json")
    saved = s3.settings()
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        s3.configure(endpoint_url=dead, max_attempts=1)
        with pytest.raises(UnreachableError, match=f"cannot reach S3 endpoint {dead}.*check the endpoint URL"):
            load_manifest(synthetic.shard_urls()[0].replace(".tar", ".manifest.json"))
    finally:
        s3.configure(saved)


def test_interrupted_build_to_s3_keeps_finished_shards(endpoint: str) -> None:
    out = f"s3://{BUCKET}/resume"
    source = InterruptingSource(24, 16, 2)
    entries = source.entries(20)
    source.stop_at = int(plan_shards(entries, samples_per_shard=4, seed=0)[3].entries[0].ref)
    image = ImageInfo(channels=3, height=16, width=24, ext="jpg")
    with pytest.raises(KeyboardInterrupt):
        build_split(source, entries, out, "train", ["a", "b"], image, samples_per_shard=4, progress=False)
    client = s3.client()

    def versions() -> dict[str, str]:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="resume/train-")
        return {o["Key"].rsplit("/", 1)[1]: client.head_object(Bucket=BUCKET, Key=o["Key"])["VersionId"]
                for o in listed.get("Contents", [])}

    first = versions()
    assert sorted(first) == [f"train-{i:06d}.tar" for i in range(3)]
    source.stop_at = -1
    result = build_split(source, entries, out, "train", ["a", "b"], image, samples_per_shard=4, progress=False)
    assert result.reused == sorted(first) and result.written == ["train-000003.tar", "train-000004.tar"]
    after = versions()
    assert {k: after[k] for k in first} == first  # finished shards were not uploaded again
    assert load_manifest(f"{out}/train.manifest.json").num_samples == 20


def test_imagenet_tree_to_s3_with_cli_round_trips_labels(endpoint: str, tmp_path: Path) -> None:
    root, classes, truth = tmp_path / "imagenet", ["n01", "n02"], {}
    for c, wnid in enumerate(classes):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(4):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(10 * c + i))
    (root / "val").mkdir()
    lines = []
    for i in range(6):
        (root / "val" / f"val_{i}.JPEG").write_bytes(jpeg(100 + i))
        truth[f"val_{i}"] = i % 2
        lines.append(f"val_{i}.JPEG {classes[i % 2]}")
    (root / "val_labels.txt").write_text("\n".join(lines))
    out = f"s3://{BUCKET}/imagenet"
    assert shards_main(["build", "imagenet", "--root", str(root), "--val-labels", str(root / "val_labels.txt"),
                        "--out", out, "--samples-per-shard", "2", "--workers", "2", "--endpoint-url", endpoint,
                        "--no-progress"]) == 0
    val = load_manifest(f"{out}/val.manifest.json")
    assert val.classes == classes and val.num_samples == 6
    seen: dict[str, int] = {}
    for rank in range(2):
        loader = ShardLoader(val, batch_size=2, rank=rank, world_size=2, num_workers=1, train=False,
                             recipe="imagenet", image_size=16)
        for images, labels, valid, keys in loader.iter_with_keys():
            assert images.shape == (2, 3, 16, 16)
            seen.update({k: int(y) for k, y, ok in zip(keys, labels.tolist(), valid.tolist()) if ok})
    assert seen == truth


def test_webdataset_reads_s3_urls_through_our_handler(synthetic: Manifest) -> None:
    import webdataset as wds

    url = synthetic.shard_urls()[0]
    samples = list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))
    assert len(samples) == synthetic.shards[0].num_samples
    assert all(s["__url__"] == url and s["jpg"][:2] == b"\xff\xd8" for s in samples)
