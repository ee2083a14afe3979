"""Data loading benchmark: shards vs one file or object per sample, on local disk and on S3 (moto).

Run: ``asnn-dist bench data [--samples 1600] [--workers 2] [--repeats 3] [--cache cold|warm]``.
``--resume [--resume-at 0.9]`` measures a mid-epoch resume instead (``bench/data_resume.py``).

What is measured: samples/s through decode + the ImageNet training recipe (random resized
crop 224, flip, RandAugment rand-m9-n2) in ``--workers`` DataLoader workers, batch 32, for
- local shards: ``ShardLoader`` over WebDataset tars on local disk;
- S3 shards: the same tars in an S3-compatible server (moto) on loopback, streamed through
  boto3 (anonymous requests to a public-read bucket: no credentials involved);
- folder of files: a map-style Dataset reading each JPEG with open()/read() in shuffled order
  (what users do without shards), with the *same* transform code, so only storage differs;
- S3 objects: the same JPEGs as one object each in the same S3 server, read by the same
  Dataset with one GET per sample (what users without shards do on S3).
The images are synthetic photo-like JPEGs (500x375, about 100 KB each, like ImageNet's).
Rates are steady state (from the first batch to the last), median over repeats; the sources
alternate within each repeat and ratios are medians of per-repeat ratios. Samples per
CPU-second (CPU time of this process and its DataLoader workers; the moto server excluded, as
a real S3 is someone else's machine) is printed next to them: it hardly moves when other work
loads the machine, while wall-clock rates can swing several-fold, but it cannot see time spent
waiting for I/O. "+ server" adds the moto server's CPU time: on loopback a GET's latency is
mostly that time, which a real S3 turns into waiting, so it is the load-proof view of what one
GET per sample costs against one per shard. With ``--cache cold`` (default) the page cache of
the local files is dropped (posix_fadvise DONTNEED) before each pass: the realistic case for a
dataset larger than RAM such as ImageNet; ``warm`` measures with everything cached.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from asnn_dist.data.recipes import TransformSpec
from asnn_dist.data.synthetic import SyntheticSource

BUCKET = "asnn-bench"


def _write_images(args: tuple[str, int, int, int, int, int]) -> int:
    """Write synthetic JPEGs ``start..stop`` under ``root/<class>/``; returns bytes written."""
    root, start, stop, width, height, num_classes = args
    source = SyntheticSource(width, height, num_classes)
    total = 0
    for i in range(start, stop):
        data = source.encode(i, i % num_classes)
        path = Path(root) / f"class{i % num_classes:04d}" / f"img{i:08d}.jpg"
        path.write_bytes(data)
        total += len(data)
    return total


def make_folder(root: Path, samples: int, width: int, height: int, classes: int, workers: int) -> int:
    """A folder-per-class tree of synthetic JPEGs; returns the total bytes."""
    for c in range(classes):
        (root / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
    chunks = [(str(root), s, min(s + 100, samples), width, height, classes) for s in range(0, samples, 100)]
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max(1, workers), mp_context=ctx) as pool:
        return sum(pool.map(_write_images, chunks))


class FolderDataset(Dataset):
    """The no-shards baseline: one file read per sample, same transform as the shard loader."""

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def __init__(self, files: list[tuple[str, int]], spec: TransformSpec, seed: int) -> None:
        self.files = files
        self.spec = spec
        self.seed = seed
        self._transform: Callable[[bytes, str], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._transform is None:
            info = get_worker_info()
            self._transform = self.spec.build(self.seed + (info.id if info else 0))
        path, label = self.files[index]
        return self._transform(self.read(path), path), label


class S3ObjectDataset(FolderDataset):
    """The no-shards baseline on S3: one GET per sample (``s3://`` URLs), same transform."""

    def __init__(self, files: list[tuple[str, int]], spec: TransformSpec, seed: int, settings: Any) -> None:
        super().__init__(files, spec, seed)
        self.settings = settings  # S3Settings: a DataLoader worker applies the driver's endpoint

    def read(self, path: str) -> bytes:
        from asnn_dist.data import s3

        if s3.settings() != self.settings:
            s3.configure(self.settings)
        bucket, key = s3.split_url(path)
        return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def evict(paths: Iterable[str]) -> None:
    """Drop the page cache of ``paths`` (clean pages only; a no-op where unsupported)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def steady_rate(batches: Iterable[Any], rows: Callable[[Any], int]) -> tuple[float, int]:
    """(samples/s from the first batch to the last, samples) of one pass."""
    first_time, first_rows, total = 0.0, 0, 0
    for i, batch in enumerate(batches):
        n = rows(batch)
        total += n
        if i == 0:
            first_time, first_rows = time.perf_counter(), n
    elapsed = time.perf_counter() - first_time
    return (total - first_rows) / max(elapsed, 1e-9), total


def upload_public(local_dir: Path, prefix: str, pattern: str = "*", threads: int = 8) -> list[str]:
    """Copy the files under ``local_dir`` to the bench bucket, readable without credentials;
    returns their ``s3://`` URLs (relative paths kept)."""
    from asnn_dist.data import s3

    client = s3.client()
    paths = sorted(p for p in local_dir.rglob(pattern) if p.is_file())
    keys = [f"{prefix}/{p.relative_to(local_dir).as_posix()}" for p in paths]

    def put(path_key: tuple[Path, str]) -> None:
        with open(path_key[0], "rb") as f:
            client.upload_fileobj(f, BUCKET, path_key[1], ExtraArgs={"ACL": "public-read"})

    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, zip(paths, keys)))
    return [f"s3://{BUCKET}/{k}" for k in keys]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asnn-dist bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1600, help="images (default: %(default)s)")
    p.add_argument("--image-size", default="500x375", help="stored WIDTHxHEIGHT (default: %(default)s)")
    p.add_argument("--out-size", type=int, default=224, help="crop side after augmentation (default: %(default)s)")
    p.add_argument("--classes", type=int, default=10, help="classes (default: %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=100, help="default: %(default)s")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="passes per source (default: %(default)s)")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold",
                   help="drop the local files' page cache before each pass (cold) or not (default: %(default)s)")
    p.add_argument("--workdir", help="keep generated data here (default: a temporary folder, removed)")
    p.add_argument("--resume", action="store_true",
                   help="measure what resuming mid-epoch costs against processing the skipped samples "
                        "(local shards only)")
    p.add_argument("--resume-at", type=float, default=0.9,
                   help="with --resume: where in the epoch to resume, a fraction (default: %(default)s)")
    return p


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers of past passes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def server_cpu_seconds(endpoint: str) -> Callable[[], float]:
    """CPU time of the moto server answering ``endpoint`` (a child of this process).

    Why: on loopback, a GET's latency is mostly the server's CPU time on this machine; counted
    with ours it gives samples per CPU-second of everything a source needs, a figure that other
    load on a shared machine barely moves (wall rates can swing several-fold)."""
    import psutil

    port = endpoint.rsplit(":", 1)[-1]
    found = [c for c in psutil.Process().children(recursive=True)
             if "moto.server" in " ".join(c.cmdline()) and port in c.cmdline()]

    def seconds() -> float:
        try:
            return sum(t.user + t.system for t in (c.cpu_times() for c in found))
        except psutil.NoSuchProcess:
            return 0.0

    return seconds


Rates = dict[str, list[float]]
SOURCES = {"local": "local shards", "folder": "folder of JPEG files", "s3": "S3 shards (moto, loopback)",
           "s3_objects": "S3 JPEG objects (moto)"}


def run(args: argparse.Namespace, work: Path) -> tuple[Rates, Rates, Rates, dict[str, int]]:
    """Generate data, start moto, measure every source ``args.repeats`` times.

    Returns wall-clock samples/s, samples per CPU-second (our processes only) and per CPU-second
    of our processes plus the S3 server, per pass, and the samples each source read in a pass.
    """
    from asnn_dist.data import s3
    from asnn_dist.data.builders import build_folder_shards
    from asnn_dist.data.loader import ShardLoader
    from asnn_dist.data.manifest import load_manifest
    from asnn_dist.testing.services import moto_s3_server

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    folder, shards = work / "folder", work / "shards"
    t0 = time.perf_counter()
    total_bytes = make_folder(folder, args.samples, width, height, args.classes, args.workers)
    made = time.perf_counter()
    manifest = build_folder_shards(str(folder), str(shards), "train", samples_per_shard=args.samples_per_shard,
                                   workers=args.workers, progress=False).manifest
    built = time.perf_counter()
    print(f"data: {args.samples} synthetic {width}x{height} JPEGs ({total_bytes / args.samples / 1e3:.0f} KB "
          f"avg) written in {made - t0:.1f} s; shards built at {args.samples / (built - made):.0f} samples/s "
          f"({len(manifest.shards)} shards)")
    spec = TransformSpec("imagenet", 3, args.out_size, augment=True)
    files = [(str(p), int(p.parent.name[len("class"):])) for p in sorted(folder.rglob("*.jpg"))]
    local_files = [f for f, _ in files] + [str(p) for p in shards.glob("*.tar")]
    rates: Rates = {k: [] for k in SOURCES}
    cpu_rates: Rates = {k: [] for k in SOURCES}
    all_cpu_rates: Rates = {k: [] for k in SOURCES}
    counts: dict[str, int] = {}
    with moto_s3_server() as endpoint:
        before = s3.settings()
        s3.configure(endpoint_url=endpoint, unsigned=True)
        server_cpu = server_cpu_seconds(endpoint)
        try:
            s3.client().create_bucket(Bucket=BUCKET, ACL="public-read")
            upload_public(shards, "train")
            remote = load_manifest(f"s3://{BUCKET}/train/train.manifest.json")
            urls = upload_public(folder, "folder", "*.jpg")
            objects = [(url, int(url.split("/")[-2][len("class"):])) for url in urls]
            settings = s3.settings()
            loaders: dict[str, Callable[[int], tuple[float, int]]] = {
                "local": lambda r: steady_rate(_shard_loader(ShardLoader, manifest, args, spec, r), _valid_rows),
                "s3": lambda r: steady_rate(_shard_loader(ShardLoader, remote, args, spec, r), _valid_rows),
                "folder": lambda r: steady_rate(DataLoader(
                    FolderDataset(files, spec, r), batch_size=args.batch_size, shuffle=True,
                    num_workers=args.workers, generator=torch.Generator().manual_seed(r)), _rows),
                "s3_objects": lambda r: steady_rate(DataLoader(
                    S3ObjectDataset(objects, spec, r, settings), batch_size=args.batch_size, shuffle=True,
                    num_workers=args.workers, generator=torch.Generator().manual_seed(r)), _rows),
            }
            order = list(loaders)
            for repeat in range(args.repeats):
                shift = repeat % len(order)
                for name in order[shift:] + order[:shift]:
                    if args.cache == "cold":
                        evict(local_files)
                    cpu, server = cpu_seconds(), server_cpu()
                    rate, count = loaders[name](repeat)
                    if count != args.samples:
                        raise RuntimeError(f"{name}: read {count} samples, expected {args.samples}")
                    rates[name].append(rate)
                    own = cpu_seconds() - cpu
                    cpu_rates[name].append(count / max(own, 1e-9))
                    all_cpu_rates[name].append(count / max(own + server_cpu() - server, 1e-9))
                    counts[name] = count
        finally:
            s3.configure(before)
    return rates, cpu_rates, all_cpu_rates, counts


def _valid_rows(batch: Any) -> int:
    return int(batch[2].sum())


def _rows(batch: Any) -> int:
    return len(batch[1])


def _shard_loader(cls: Any, manifest: Any, args: argparse.Namespace, spec: TransformSpec, seed: int) -> Any:
    return cls(manifest, batch_size=args.batch_size, num_workers=args.workers, train=True, augment=True,
               recipe=spec, image_size=args.out_size, seed=seed, shuffle_buffer=256)


def report(rates: Rates, cpu_rates: Rates, all_cpu_rates: Rates, counts: dict[str, int],
           args: argparse.Namespace) -> str:
    """The result table with the issue's targets.

    Ratios are medians of per-repeat ratios (sources measured back to back), which resists the
    load drift of a shared machine better than a ratio of medians; samples per CPU-second count
    only this process and its DataLoader workers, so other load on the machine barely moves them;
    "+ server" adds the moto server's CPU time (the GETs' cost, which a real S3 turns into waiting).
    """
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_rates.items()}
    all_cpu = {k: statistics.median(v) for k, v in all_cpu_rates.items()}

    def ratio(a: str, b: str, table: Rates) -> float:
        return statistics.median(x / y if y else float("nan") for x, y in zip(table[a], table[b]))

    lines = [f"decode + ImageNet train augment to {args.out_size}x{args.out_size}, {args.workers} workers, "
             f"batch {args.batch_size}, {args.samples} images, cache {args.cache}, {args.repeats} passes each",
             f"{'source':<28}{'samples':>8}{'samples/s':>10}{'vs local':>10}{'samples/CPU-s':>15}{'vs local':>10}"
             f"{'+ server':>10}   passes (samples/s)"]
    for key, name in SOURCES.items():
        passes = " ".join(f"{r:.0f}" for r in rates[key])
        wall = 1.0 if key == "local" else ratio(key, "local", rates)
        per_cpu = 1.0 if key == "local" else ratio(key, "local", cpu_rates)
        lines.append(f"{name:<28}{counts[key]:>8}{med[key]:>10.0f}{wall:>9.2f}x{cpu[key]:>15.0f}{per_cpu:>9.2f}x"
                     f"{all_cpu[key]:>10.0f}   {passes}")
    # S3 shards / S3 objects: one GET per shard instead of one per sample (about 5.7 ms each on
    # moto here, against about 3 ms of decode + augment per sample).
    targets = (("S3 / local shards", "s3", "local", 0.9), ("local shards / folder", "local", "folder", 1.2),
               ("S3 shards / S3 objects", "s3", "s3_objects", 2.0))
    for label, a, b, target in targets:
        wall, per_cpu, per_all = ratio(a, b, rates), ratio(a, b, cpu_rates), ratio(a, b, all_cpu_rates)
        met = ["met" if r >= target else "missed" for r in (wall, per_cpu, per_all)]
        lines.append(f"{label:<23} = {wall:.2f}x samples/s ({met[0]}), {per_cpu:.2f}x per CPU-s "
                     f"({met[1]}), {per_all:.2f}x per CPU-s + server ({met[2]}); target >= {target:.2f}x")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"load average at the end: {load:.1f} on {os.cpu_count()} CPUs (wall rates suffer from other load)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workdir:
        work = Path(args.workdir)
        if work.exists() and any(work.iterdir()):
            print(f"asnn-dist: error: --workdir {work} is not empty; pass a new or empty folder", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
        print(measure_in(args, work))
    else:
        with tempfile.TemporaryDirectory(prefix="asnn-bench-data-") as tmp:
            print(measure_in(args, Path(tmp)))
    return 0


def measure_in(args: argparse.Namespace, work: Path) -> str:
    """The table of the mode ``args`` asks for, with data generated under ``work``."""
    if args.resume:
        from asnn_dist.bench.data_resume import run as run_resume

        return run_resume(args, work)
    return report(*run(args, work), args)


if __name__ == "__main__":
    raise SystemExit(main())
