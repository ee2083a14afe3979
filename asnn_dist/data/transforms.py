"""Decode and transform images without torchvision.

Why no normalisation: spike encoders (rate, latency, direct) read pixel intensities as firing
probabilities or currents, so images stay in [0, 1]. Why tensors from PIL + ``interpolate``:
it keeps the dependency set small and the same code serves 8x8 digits and ImageNet JPEGs.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from asnn_dist.data.errors import DataError

_PIL_MODE = {1: "L", 3: "RGB"}


def decode_image(data: bytes, channels: int, where: str = "image") -> torch.Tensor:
    """PNG/JPEG bytes -> uint8 tensor [C, H, W] with ``channels`` (1 = grayscale, 3 = RGB)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            array = np.asarray(opened.convert(_PIL_MODE[channels]), dtype=np.uint8)
    except KeyError:
        raise DataError(f"{where}: channels must be 1 or 3, got {channels}") from None
    except Exception as exn:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        detail = " ".join(str(exn).split()) or type(exn).__name__
        raise DataError(f"{where}: cannot decode image ({detail}); the sample is corrupt") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float [C, H, W] image to [C, size, size]; antialiased when shrinking."""
    height, width = image.shape[-2:]
    if height == size and width == size:
        return image
    shrinking = size < height or size < width
    out = F.interpolate(
        image.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False,
        antialias=shrinking,
    )
    return out.squeeze(0).clamp_(0.0, 1.0)


def random_translate(image: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift [C, H, W] by up to ``max_shift`` pixels each way, filling uncovered pixels with 0."""
    if max_shift <= 0:
        return image
    dy, dx = (
        int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)
    )
    height, width = image.shape[-2:]
    padded = F.pad(image, (max_shift, max_shift, max_shift, max_shift))
    top, left = max_shift - dy, max_shift - dx
    return padded[:, top : top + height, left : left + width].contiguous()


class ImageTransform:
    """Bytes -> float32 [C, S, S] in [0, 1]: decode, resize, and (train only) random shift.

    ``generator`` (set per DataLoader worker) makes augmentation reproducible for a given seed.
    """

    def __init__(
        self,
        channels: int,
        image_size: int | None = None,
        augment: bool = False,
        max_shift: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if image_size is not None and image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        self.channels = channels
        self.image_size = image_size
        self.augment = augment
        self.max_shift = max_shift
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation draws from ``seed`` (the loader seeds each sample by position)."""
        self.generator.manual_seed(seed)

    def shift_for(self, size: int) -> int:
        """Translation range: the configured one, or 1/8 of the side (1 px for 8x8 digits)."""
        return self.max_shift if self.max_shift is not None else max(1, round(size / 8))

    def __call__(self, data: bytes, where: str = "image") -> torch.Tensor:
        image = decode_image(data, self.channels, where).to(torch.float32).div_(255.0)
        if self.image_size is not None:
            image = resize_square(image, self.image_size)
        if self.augment:
            image = random_translate(image, self.shift_for(image.shape[-1]), self.generator)
        return image
