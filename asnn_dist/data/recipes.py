"""Per-sample transform recipes: digits (resize + shift), CIFAR (pad-4 crop + flip), ImageNet.

Why recipes by name: the loader runs transforms inside DataLoader workers, so a recipe is a
small picklable spec (``TransformSpec``) built into a seeded callable per worker, reseeded per
sample (``reseed``) by the sample's stream position so a resumed epoch need not replay draws.
The ImageNet recipe is Spikformer's (timm's): train = random resized crop (scale 0.08-1, ratio 3/4-4/3,
bicubic) + horizontal flip + RandAugment rand-m9-n2-mstd0.5; eval = resize to size/0.875 (256
for 224) + centre crop. Mixup/cutmix act on whole batches (``mixing.py``). Images stay in
[0, 1] (no mean/std normalisation): spike encoders read intensities. JPEGs are decoded at a
reduced DCT scale (``draft``) only when the region used is still at least twice the output size.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from asnn_dist.data.errors import DataError
from asnn_dist.data.randaugment import RandAugment
from asnn_dist.data.transforms import ImageTransform, decode_image, resize_square

RECIPES = ("digits", "cifar", "imagenet")
Transform = Callable[[bytes, str], torch.Tensor]
_MODE = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class TransformSpec:
    """Which recipe, at what size, and whether random augmentation is on (train + augment)."""

    recipe: str = "digits"
    channels: int = 1
    image_size: int | None = None  # output side; imagenet default 224, others: stored size
    augment: bool = False  # random augmentation (the loader sets it only for training)
    max_shift: int | None = None  # digits: translation range (default 1/8 of the side)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # imagenet: area fraction of the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # imagenet: aspect ratio range of the crop
    eval_crop_pct: float = 0.875  # imagenet eval: resize to image_size / eval_crop_pct, centre crop
    rand_augment_ops: int = 2  # imagenet: RandAugment N (0 turns it off)
    rand_augment_magnitude: float = 9.0  # imagenet: RandAugment M (of 10)
    rand_augment_std: float = 0.5  # imagenet: std of the per-op magnitude noise
    cifar_padding: int = 4  # cifar: zero padding before the random crop

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise DataError(f"unknown transform recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.channels not in _MODE:
            raise DataError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size is not None and self.image_size < 1:
            raise DataError(f"image_size must be >= 1, got {self.image_size}")

    def build(self, seed: int) -> Transform:
        """The transform callable ``(bytes, where) -> float32 [C, S, S]``, seeded with ``seed``."""
        if self.recipe == "imagenet":
            return ImageNetTransform(self, random.Random(seed))
        if self.recipe == "cifar":
            return CifarTransform(self, random.Random(seed))
        return ImageTransform(self.channels, self.image_size, self.augment, self.max_shift,
                              generator=torch.Generator().manual_seed(seed))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 [C, H, W] in [0, 1].

    In numpy on purpose: one single-threaded pass. torch's intra-op threads, when the loader
    runs in-process on a busy machine, made this 10x slower than the decode itself.
    """
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    out = np.empty((array.shape[2], array.shape[0], array.shape[1]), dtype=np.float32)
    np.multiply(array.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=out)
    return torch.from_numpy(out)


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop, torchvision's algorithm (10 tries, then centre crop)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class _PilRecipe:
    """Shared decoding: open lazily, optionally draft-decode, crop+resize in one call."""

    def __init__(self, spec: TransformSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.size = spec.image_size or 224
        self.mode = _MODE[spec.channels]

    def reseed(self, seed: int) -> None:
        """Restart the augmentation draws from ``seed`` (the loader seeds each sample by position)."""
        self.rng.seed(seed)

    def _crop_resize(self, data: bytes, where: str, box_of: Callable[[int, int], tuple[float, ...]],
                     need: float) -> Image.Image:
        """Decode ``data``, crop ``box_of(width, height)`` (l, t, w, h) and resize to size x size.

        ``need`` is the side (in source pixels) the crop must keep after DCT downscaling.
        """
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
                    left, top, w, h = box_of(width, height)
                    if img.format == "JPEG":
                        reduce = next((r for r in (8, 4, 2) if min(w, h) / r >= 2 * need), 1)
                        if reduce > 1:
                            img.draft(img.mode, (width // reduce, height // reduce))
                    sx, sy = img.size[0] / width, img.size[1] / height
                    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
                    return img.convert(self.mode).resize((self.size, self.size), Image.BICUBIC, box=box)
        except DataError:
            raise
        except Exception as exn:  # noqa: BLE001 - PIL raises many types for corrupt images
            detail = " ".join(str(exn).split()) or type(exn).__name__
            raise DataError(f"{where}: cannot decode image ({detail}); the sample is corrupt") from None


class ImageNetTransform(_PilRecipe):
    """Spikformer's ImageNet recipe: RRC + flip + RandAugment (train), resize + centre crop (eval)."""

    def __init__(self, spec: TransformSpec, rng: random.Random) -> None:
        super().__init__(spec, rng)
        self.rand_augment = (
            RandAugment(spec.rand_augment_ops, spec.rand_augment_magnitude, spec.rand_augment_std)
            if spec.augment and spec.rand_augment_ops > 0 else None
        )

    def _train_box(self, width: int, height: int) -> tuple[float, ...]:
        return random_resized_crop_box(width, height, self.spec.crop_scale, self.spec.crop_ratio, self.rng)

    def _eval_box(self, width: int, height: int) -> tuple[float, ...]:
        resize_to = int(self.size / self.spec.eval_crop_pct)  # 256 for 224
        side = self.size * min(width, height) / resize_to  # crop side in source pixels
        return (width - side) / 2, (height - side) / 2, side, side

    def __call__(self, data: bytes, where: str = "image") -> torch.Tensor:
        if not self.spec.augment:
            return to_tensor(self._crop_resize(data, where, self._eval_box, self.size))
        img = self._crop_resize(data, where, self._train_box, self.size)
        if self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, self.rng)
        return to_tensor(img)


class CifarTransform:
    """CIFAR recipe: (resize to image_size if set) + train-time zero-pad crop and horizontal flip."""

    def __init__(self, spec: TransformSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng

    def reseed(self, seed: int) -> None:
        """Restart the augmentation draws from ``seed`` (the loader seeds each sample by position)."""
        self.rng.seed(seed)

    def __call__(self, data: bytes, where: str = "image") -> torch.Tensor:
        image = decode_image(data, self.spec.channels, where).to(torch.float32).div_(255.0)
        if self.spec.image_size is not None:
            image = resize_square(image, self.spec.image_size)
        if not self.spec.augment:
            return image
        pad = self.spec.cifar_padding
        height, width = image.shape[-2:]
        if pad > 0:
            padded = F.pad(image, (pad, pad, pad, pad))
            top, left = self.rng.randint(0, 2 * pad), self.rng.randint(0, 2 * pad)
            image = padded[:, top : top + height, left : left + width]
        if self.rng.random() < 0.5:
            image = image.flip(-1)
        return image.contiguous()
