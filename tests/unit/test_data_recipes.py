"""Transform recipes (ImageNet / CIFAR), RandAugment and batch mixup/cutmix with label smoothing."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from asnn_dist.data.errors import DataError
from asnn_dist.data.mixing import mix_batch, smooth_one_hot, soft_target_cross_entropy
from asnn_dist.data.randaugment import OPS, RandAugment
from asnn_dist.data.recipes import TransformSpec, random_resized_crop_box


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, quality=95)
    return buf.getvalue()


def test_imagenet_eval_resizes_and_centre_crops() -> None:
    # 64x48 image: a white 32x32 square at the centre; resize 36 (= 32 / 0.875) + centre crop 32.
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[8:40, 16:48] = 255
    out = TransformSpec("imagenet", 3, 32).build(0)(encode(image, "PNG"), "x")
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # the crop covers 48 * 32/36 = 42.7 source pixels around the centre: the square fills ~75 %
    centre, corner = out[:, 12:20, 12:20], out[:, :2, :2]
    assert centre.min() > 0.95 and corner.max() < 0.05


def test_imagenet_train_is_seeded_random_and_in_range() -> None:
    rng = np.random.default_rng(0)
    data = encode(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    spec = TransformSpec("imagenet", 3, 24, augment=True)
    a, b = spec.build(1), spec.build(1)
    outs_a = [a(data, "x") for _ in range(6)]
    outs_b = [b(data, "x") for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))  # same seed, same augmentations
    assert len({round(float(x.sum()), 3) for x in outs_a}) > 1  # random from call to call
    assert all(x.shape == (3, 24, 24) and 0 <= x.min() and x.max() <= 1 for x in outs_a)
    gray = TransformSpec("imagenet", 1, 16, augment=True).build(0)(data, "x")
    assert gray.shape == (1, 16, 16)


def test_random_resized_crop_box_bounds() -> None:
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
    # an extreme aspect ratio falls back to a centred crop within the ratio range
    left, top, w, h = random_resized_crop_box(400, 10, (0.99, 1.0), (3 / 4, 4 / 3), rng)
    assert (w, h) == (13, 10) and left == (400 - 13) // 2


def test_large_jpeg_is_draft_decoded_same_picture() -> None:
    # A 1600x1200 smooth gradient: the eval crop (1050 px) is > 2 x 224, so the JPEG is decoded at
    # a reduced DCT scale; the result must match a full decode closely.
    x = np.linspace(0, 255, 1600, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, 1200, dtype=np.float32)[:, None, None]
    image = np.broadcast_to((x + y) / 2, (1200, 1600, 3)).astype(np.uint8)
    data = encode(image)
    fast = TransformSpec("imagenet", 3, 224).build(0)(data, "x")
    full = Image.open(io.BytesIO(data)).convert("RGB")
    side = 224 * 1200 / 256
    box = ((1600 - side) / 2, (1200 - side) / 2, (1600 + side) / 2, (1200 + side) / 2)
    ref = torch.from_numpy(np.asarray(full.resize((224, 224), Image.BICUBIC, box=box), dtype=np.float32) / 255)
    assert (fast.permute(1, 2, 0) - ref).abs().mean() < 0.01


def test_cifar_recipe_pad_crop_flip() -> None:
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    data = encode(image, "PNG")
    plain = TransformSpec("cifar", 3).build(0)(data, "x")
    assert plain.shape == (3, 32, 32) and torch.allclose(plain, torch.full_like(plain, 200 / 255))
    aug = TransformSpec("cifar", 3, augment=True).build(0)
    outs = [aug(data, "x") for _ in range(30)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any((o == 0).any() for o in outs)  # some crops show the zero padding
    assert all((o == 0).sum() <= 3 * (32 * 32 - 28 * 28) for o in outs)  # at most 4 px each way


def test_corrupt_image_is_a_data_error() -> None:
    good = encode(np.zeros((20, 20, 3), dtype=np.uint8))
    for recipe in ("imagenet", "cifar", "digits"):
        transform = TransformSpec(recipe, 3, 16).build(0)
        with pytest.raises(DataError, match="sample 'k' in s.tar: cannot decode image"):
            transform(good[: len(good) // 2], "sample 'k' in s.tar")
    with pytest.raises(DataError, match="unknown transform recipe"):
        TransformSpec("coco")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_ops_keep_size(mode: str) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).convert(mode)
    rng = random.Random(0)
    for name, op in OPS.items():
        out = op(img, 9.0, rng)
        assert out.size == img.size and out.mode == mode, name
    augment = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    changed = sum(augment(img, rng).tobytes() != img.tobytes() for _ in range(20))
    assert 5 <= changed <= 20  # each of 2 ops applies with p = 0.5


def test_mix_batch_mixup_cutmix_and_smoothing() -> None:
    images = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    smooth = smooth_one_hot(labels, 5, 0.1)
    assert torch.allclose(smooth.sum(1), torch.ones(4))
    assert smooth[0, 0].item() == pytest.approx(0.92) and smooth[0, 1].item() == pytest.approx(0.02)
    mixed, targets = mix_batch(images, labels, 5, cutmix_alpha=0.0, rng=random.Random(0))
    lam = float(targets[0, 0] - 0.02) / 0.9
    assert torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    mixed, targets = mix_batch(images, labels, 5, mixup_alpha=0.0, label_smoothing=0.0, rng=random.Random(1))
    pasted = (mixed != images).any(0).any(0)  # pixels taken from the partner image
    assert torch.allclose(targets[0, 0], torch.tensor(1.0 - pasted.float().mean().item()))
    assert torch.equal(mixed[0][:, ~pasted], images[0][:, ~pasted])
    same, hard = mix_batch(images, labels, 5, prob=0.0, label_smoothing=0.0)
    assert same is images and torch.equal(hard, torch.eye(5)[:4])
    logits = torch.randn(4, 5)
    assert torch.allclose(soft_target_cross_entropy(logits, hard), torch.nn.functional.cross_entropy(logits, labels))
    valid = torch.tensor([True, True, False, False])
    assert torch.allclose(soft_target_cross_entropy(logits, hard, valid),
                          torch.nn.functional.cross_entropy(logits[:2], labels[:2]))
