"""Batch-level mixup / cutmix with label smoothing, as in timm's ``Mixup`` (mode "batch").

Why on the batch and in the training loop: mixing pairs samples across the batch, which a
per-sample worker transform cannot do, and it must see the exact batch the model sees. The
Spikformer ImageNet defaults are mixup alpha 0.8, cutmix alpha 1.0, switch probability 0.5,
label smoothing 0.1. One lambda per batch; each sample is mixed with the batch reversed.
Padding rows (``valid=False``) are repeats of real samples, so mixing with them is harmless;
mask them in the loss (``soft_target_cross_entropy(..., valid=...)``).
"""

from __future__ import annotations

import math
import random

import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """[B] int labels -> [B, K] float targets: 1 - s + s/K on the label, s/K elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)
    return targets


def cutmix_box(height: int, width: int, lam: float, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box covering about ``1 - lam`` of the image, centre uniform."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = rng.randint(0, height - 1), rng.randint(0, width - 1)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    rng: random.Random | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``images`` [B, C, H, W] with their reversed batch; returns (images, soft targets [B, K]).

    With probability ``prob`` the batch is mixed: cutmix (with probability ``switch_prob`` when
    both alphas are > 0) pastes a box of the partner image and sets lambda to the kept area;
    otherwise mixup blends the images. Targets are ``lam * y + (1 - lam) * y_partner`` of the
    label-smoothed one-hot labels. ``images`` is not modified.
    """
    rng = rng or random.Random()
    y1 = smooth_one_hot(labels, num_classes, label_smoothing)
    y2 = y1.flip(0)
    use_mix = (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < prob
    if not use_mix:
        return images, y1
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    if use_cutmix:
        lam = rng.betavariate(cutmix_alpha, cutmix_alpha)
        height, width = images.shape[-2:]
        top, bottom, left, right = cutmix_box(height, width, lam, rng)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    else:
        lam = rng.betavariate(mixup_alpha, mixup_alpha)
        mixed = images * lam + images.flip(0) * (1.0 - lam)
    return mixed, y1 * lam + y2 * (1.0 - lam)


def soft_target_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over (valid) rows of ``-sum_k targets * log_softmax(logits)``."""
    per_row = -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if valid is None:
        return per_row.mean()
    weights = valid.to(per_row.dtype)
    return (per_row * weights).sum() / weights.sum().clamp_min(1.0)
