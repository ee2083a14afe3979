"""Data helpers for tests: a source that stops a shard build part-way, and a way to break one
sample of a finished shard.

Why here: the resume tests on local disk (unit) and on S3 (integration) interrupt a build the
same way, and the loader tests on both need a corrupt image inside a shard, which the shard
builder itself refuses to store (it decodes every image and leaves broken ones out).
"""

from __future__ import annotations

import io
import tarfile

from asnn_dist.data import storage
from asnn_dist.data.buildplan import Entry
from asnn_dist.data.synthetic import SyntheticSource
from asnn_dist.data.writer import TarShardWriter


class InterruptingSource(SyntheticSource):
    """Synthetic source that 'crashes' (KeyboardInterrupt, as Ctrl-C would) when asked for
    the sample whose ref is ``stop_at`` (-1: never)."""

    stop_at = -1

    def read(self, entry: Entry) -> bytes:
        if entry.ref == self.stop_at:
            raise KeyboardInterrupt
        return super().read(entry)


def replace_member(url: str, name: str, data: bytes) -> None:
    """Rewrite member ``name`` (``<key>.<ext>``) of the shard at ``url`` (local or s3://) with
    ``data``, keeping every other member and the order (the manifest's sha256 goes stale)."""
    with storage.open_read(url) as f:
        raw = f.read()
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            body = tar.extractfile(member)
            samples.setdefault(key, {})[ext] = body.read() if body is not None else b""
    key, ext = name.split(".", 1)
    if ext not in samples.get(key, {}):
        raise KeyError(f"{url} has no member {name}")
    samples[key][ext] = data
    with storage.open_write(url) as out, TarShardWriter(out) as writer:
        for sample_key, entries in samples.items():
            writer.write(sample_key, entries)
        writer.close()
