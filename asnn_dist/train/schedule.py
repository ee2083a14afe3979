"""Learning-rate schedule per optimizer step: linear warmup, then cosine to min_lr (or constant)."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak: float, warmup: int = 0, min_lr: float = 0.0, kind: str = "cosine") -> float:
    """LR for optimizer step ``step`` (0-based), a pure function so resume is exact."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))
