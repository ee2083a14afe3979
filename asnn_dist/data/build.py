"""Build one split's shards from a source: plan, keep finished shards, write the rest, manifest.

Why resumable: writing ImageNet to S3 takes hours, and a killed build must not start over. After
each shard, the build journal ``<split>.build-journal.json`` (next to the shards) records its
sample count, size and sha256; a rerun with the same plan hash keeps every shard whose stored
bytes still match (a previous complete manifest counts as a journal too) and writes only the
rest. The manifest is written last, so its presence still means "complete". Writing runs in
``workers`` spawned processes (the parent may hold threads or CUDA), with one progress bar.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
from dataclasses import dataclass, field
from typing import Any, Sequence

from tqdm import tqdm

import asnn_dist
from asnn_dist.data import storage
from asnn_dist.data.buildplan import Entry, ShardPlan, Source, plan_hash, plan_shards
from asnn_dist.data.errors import DataError
from asnn_dist.data.manifest import (
    ImageInfo,
    Manifest,
    ShardInfo,
    load_manifest,
    manifest_url,
    sha256_of,
    write_manifest,
)
from asnn_dist.data.shardwrite import ShardResult, ShardTask, init_worker, set_progress, write_shard
from asnn_dist.data.writer import shard_name

log = logging.getLogger(__name__)
JOURNAL_SUFFIX = ".build-journal.json"


@dataclass
class BuildResult:
    """The finished split: its manifest, which shards were written or kept, what was left out."""

    manifest: Manifest
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def journal_url(out_dir: str, split: str) -> str:
    """Where the build journal of ``split`` lives while the split is being built."""
    return storage.join(out_dir, f"{split}{JOURNAL_SUFFIX}")


def _read_journal(out_dir: str, split: str, params: dict[str, Any]) -> dict[str, ShardResult]:
    url = journal_url(out_dir, split)
    if not storage.exists(url):
        return {}
    with storage.open_read(url) as f:
        try:
            data = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("%s: unreadable build journal, ignoring it", url)
            return {}
    if data.get("params") != params:
        log.info("%s: journal of a build with other settings or sources, ignoring it", url)
        return {}
    return {r["name"]: ShardResult(**r) for r in data.get("shards", [])}


def _write_journal(out_dir: str, split: str, params: dict[str, Any], done: dict[str, ShardResult]) -> None:
    body = {"split": split, "params": params, "shards": [vars(r) for r in done.values()]}
    with storage.open_write(journal_url(out_dir, split)) as f:
        f.write(json.dumps(body, indent=1).encode("utf-8"))


def _previous_manifest(out_dir: str, split: str, params: dict[str, Any]) -> Manifest | None:
    url = manifest_url(out_dir, split)
    if not storage.exists(url):
        return None
    try:
        manifest = load_manifest(url)
    except DataError as exn:
        log.warning("ignoring the existing manifest: %s", exn)
        return None
    return manifest if manifest.params == params else None


def _intact(url: str, record: ShardResult) -> bool:
    """Whether the stored shard still has the recorded size and sha256."""
    if record.num_samples == 0:
        return True  # every entry was bad; nothing stored
    if not storage.exists(url) or storage.size(url) != record.num_bytes:
        return False
    return sha256_of(url)[0] == record.sha256


def _run(tasks: list[ShardTask], workers: int, bar: tqdm, on_done: Any) -> None:
    """Write ``tasks`` in-process (workers=0) or in a spawned process pool, reporting progress."""
    if workers <= 0:
        set_progress(lambda: bar.update(1))
        try:
            for task in tasks:
                on_done(write_shard(task))
        finally:
            set_progress(None)
        return
    from asnn_dist.data import s3

    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("q", 0)
    start = bar.n
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                  initargs=(counter, s3.settings()))
    try:
        pending = {pool.submit(write_shard, task) for task in tasks}
        while pending:
            done, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            bar.update(start + counter.value - bar.n)
            for future in done:
                on_done(future.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def build_split(
    source: Source,
    entries: Sequence[Entry],
    out_dir: str,
    split: str,
    classes: list[str],
    image: ImageInfo,
    *,
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
    workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    skipped: Sequence[str] = (),
    progress: bool = True,
) -> BuildResult:
    """Write ``entries`` as ``<out_dir>/<split>-NNNNNN.tar`` shards plus the manifest, resumably.

    ``skipped`` lists problems found before writing (e.g. files without a label); they are
    reported with the unreadable files found while writing and kept in the manifest. With
    ``workers > 0`` a script must call this under ``if __name__ == "__main__":`` (the spawned
    workers import the main module). Finished shards are checked by re-reading their sha256.
    """
    if samples_per_shard is None and shard_bytes is None:
        samples_per_shard = 1000
    plan = plan_shards(entries, samples_per_shard, shard_bytes, shuffle, seed)
    wanted = dict(params or {})
    wanted.update(samples_per_shard=samples_per_shard, shard_bytes=shard_bytes, shuffle=shuffle,
                  seed=seed, plan_sha256=plan_hash(plan))
    previous = _previous_manifest(out_dir, split, wanted)
    records: dict[str, ShardResult] = {}
    carried: list[str] = []  # files a previous complete build left out (not attributed to shards)
    if previous is not None:
        records = {s.name: ShardResult(s.name, s.num_samples, s.num_bytes, s.sha256) for s in previous.shards}
        carried = [line for line in previous.skipped if line not in set(skipped)]
    records.update(_read_journal(out_dir, split, wanted))

    done: dict[str, ShardResult] = {}
    todo: list[ShardTask] = []
    for shard in plan:
        name = shard_name(split, shard.index)
        url = storage.join(out_dir, name)
        record = records.get(name)
        if record is not None and _intact(url, record):
            done[name] = record
        else:
            todo.append(ShardTask(shard, name, url, source, len(classes)))
    reused = sorted(done)
    if not todo and previous is not None and {s.name for s in previous.shards} == {
        n for n, r in done.items() if r.num_samples
    }:
        return BuildResult(previous, [], reused, list(previous.skipped))

    storage.remove(manifest_url(out_dir, split))  # a stale manifest must not vouch for new shards
    _write_journal(out_dir, split, wanted, done)
    total = sum(len(s.entries) for s in plan)
    kept = sum(len(s.entries) for s in plan if shard_name(split, s.index) in done)

    def finished(result: ShardResult) -> None:
        done[result.name] = result
        for line in result.skipped:
            log.warning("skipped %s", line)
        _write_journal(out_dir, split, wanted, done)

    with tqdm(total=total, initial=kept, desc=f"write {split}", unit="img", unit_scale=True,
              disable=not progress, dynamic_ncols=True) as bar:
        _run(todo, workers, bar, finished)
    return _finish(plan, done, out_dir, split, classes, image, wanted, [*skipped, *carried],
                   [t.name for t in todo], reused)


def _finish(
    plan: list[ShardPlan], done: dict[str, ShardResult], out_dir: str, split: str,
    classes: list[str], image: ImageInfo, params: dict[str, Any], skipped: list[str],
    written: list[str], reused: list[str],
) -> BuildResult:
    """Write the manifest from the finished shards (plan order) and drop the journal."""
    shards: list[ShardInfo] = []
    for shard in plan:
        record = done[shard_name(split, shard.index)]
        skipped.extend(record.skipped)
        if record.num_samples:
            shards.append(ShardInfo(name=record.name, num_samples=record.num_samples,
                                    num_bytes=record.num_bytes, sha256=record.sha256))
    skipped = list(dict.fromkeys(skipped))  # a rewritten shard reports its bad files again
    if not shards:
        raise DataError(f"split {split!r}: no readable images among the source files "
                        f"({len(skipped)} skipped, e.g. {skipped[0] if skipped else '-'})")
    manifest = Manifest(
        split=split, shards=shards, classes=list(classes),
        num_samples=sum(s.num_samples for s in shards), image=image,
        created_by=f"asnn-dist {asnn_dist.__version__}", params=params, skipped=skipped,
    )
    write_manifest(manifest, out_dir)
    storage.remove(journal_url(out_dir, split))
    return BuildResult(manifest, written, reused, skipped)
