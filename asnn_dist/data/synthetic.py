"""Synthetic JPEGs for scale tests and benchmarks: any count, size and class count, no download.

Why not random noise: noise JPEGs are 3-4x larger and slower to decode than photos, which would
skew every throughput number. These images are smooth colour fields (a coarse random grid
upsampled) with film grain (shifted windows of one noise texture, so generating is cheap),
close to ImageNet photos in bytes per pixel (about 100 KB at 500x375), tinted by class so a
model can learn something. Image ``i`` depends only on (seed, i), so any worker can
regenerate any sample.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from asnn_dist.data.buildplan import Entry


class SyntheticSource:
    """Generates the JPEG of entry ``ref`` (an index) on demand."""

    def __init__(self, width: int, height: int, num_classes: int, seed: int = 0, quality: int = 90) -> None:
        self.width = width
        self.height = height
        self.num_classes = num_classes
        self.seed = seed
        self.quality = quality
        self._texture: np.ndarray | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_texture": None}  # rebuilt in each worker, not shipped per task

    def _grain(self) -> np.ndarray:
        """A (2H, 2W, 3) noise texture made once per process; images take shifted windows of it."""
        if self._texture is None:
            rng = np.random.default_rng([self.seed, 7_777_777])
            shape = (2 * self.height, 2 * self.width, 3)
            self._texture = (rng.standard_normal(shape, dtype=np.float32) * 15.0).astype(np.int16)
        return self._texture

    def image(self, index: int, label: int) -> Image.Image:
        """The RGB image of sample ``index`` with class ``label``."""
        rng = np.random.default_rng([self.seed, index])
        tint = np.random.default_rng([self.seed, 1_000_003, label]).uniform(40, 215, size=3)
        coarse = rng.normal(0.0, 45.0, size=(48, 64, 3)) + tint
        small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
        smooth = np.asarray(small.resize((self.width, self.height), Image.BICUBIC), dtype=np.int16)
        top, left = int(rng.integers(0, self.height)), int(rng.integers(0, self.width))
        grain = self._grain()[top : top + self.height, left : left + self.width]
        return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8), "RGB")

    def encode(self, index: int, label: int) -> bytes:
        """JPEG bytes of sample ``index``."""
        buf = io.BytesIO()
        self.image(index, label).save(buf, format="JPEG", quality=self.quality)
        return buf.getvalue()

    def read(self, entry: Entry) -> bytes:
        return self.encode(int(entry.ref), entry.label)

    def describe(self, entry: Entry) -> str:
        return f"synthetic sample {entry.ref}"

    def entries(self, num_samples: int, offset: int = 0) -> list[Entry]:
        """``num_samples`` entries, classes balanced (index modulo class count).

        ``offset`` starts the indices elsewhere, so a second split gets different images.
        Sizes are estimated from one encoded sample (for shards sized in bytes).
        """
        estimate = len(self.encode(offset, 0)) if num_samples else 0
        return [
            Entry(key=f"synthetic-{i:08d}", label=i % self.num_classes, ref=i, size=estimate)
            for i in range(offset, offset + num_samples)
        ]
