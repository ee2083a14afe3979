"""RandAugment on PIL images, following timm's ``rand-m9-n2-mstd0.5`` (the Spikformer recipe).

Why our own: the repo has no torchvision/timm dependency, and the policy is small. As in timm:
``num_ops`` operations are drawn uniformly (with replacement) from the 15 below, each applied
with probability 0.5, at a magnitude drawn around ``magnitude`` (out of 10) with standard
deviation ``magnitude_std``, clipped to [0, 10]. Signed operations flip sign with p = 0.5, and
geometric ones fill uncovered pixels with the ImageNet mean colour.
"""

from __future__ import annotations

import random
from typing import Callable

from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL_RGB = (124, 116, 104)  # ImageNet mean * 255, timm's fill colour


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    return FILL_RGB if img.mode == "RGB" else 128


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_fill(img))


def _rotate(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return img.rotate(_signed(level / MAX_LEVEL * 30.0, rng), resample=Image.BILINEAR, fillcolor=_fill(img))


def _shear_x(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, _signed(level / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0))


def _shear_y(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, 0, 0, _signed(level / MAX_LEVEL * 0.3, rng), 1, 0))


def _translate_x(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, 0, _signed(level / MAX_LEVEL * 0.45, rng) * img.size[0], 0, 1, 0))


def _translate_y(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, _signed(level / MAX_LEVEL * 0.45, rng) * img.size[1]))


def _enhancer(kind: type) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    def apply(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
        factor = max(0.1, 1.0 + _signed(level / MAX_LEVEL * 0.9, rng))
        return kind(img).enhance(factor)

    return apply


def _posterize(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    bits = max(1, 4 - int(level / MAX_LEVEL * 4))  # timm's original (non-increasing) posterize
    return ImageOps.posterize(img, bits)


def _solarize(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return ImageOps.solarize(img, 256 - int(level / MAX_LEVEL * 256))


def _solarize_add(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    add = int(level / MAX_LEVEL * 110)
    table = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(table * len(img.getbands()))


OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Invert": lambda img, level, rng: ImageOps.invert(img),
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _enhancer(ImageEnhance.Color),
    "Contrast": _enhancer(ImageEnhance.Contrast),
    "Brightness": _enhancer(ImageEnhance.Brightness),
    "Sharpness": _enhancer(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


class RandAugment:
    """Apply ``num_ops`` random operations (each with probability ``prob``) to an RGB/L image."""

    def __init__(
        self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5,
        ops: tuple[str, ...] = tuple(OPS),
    ) -> None:
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(OPS)}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.prob = prob
        self.ops = ops

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.num_ops):
            name = self.ops[rng.randrange(len(self.ops))]
            if rng.random() >= self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = rng.gauss(self.magnitude, self.magnitude_std)
            img = OPS[name](img, min(MAX_LEVEL, max(0.0, level)), rng)
        return img
