"""Readout with a learnable scale per time step (method section 2).

logits = mean_t(scale[t] * y[t]); with ``learnable=False`` the scale is a fixed buffer (a
plain mean over time when init = 1). ``anytime`` gives the readout after each prefix of
steps, so "accuracy after the first t steps" costs one extra cumulative sum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PerStepReadout(nn.Module):
    """y [T, B, K] -> logits [B, K] = mean_t(scale[t] * y[t])."""

    def __init__(self, num_steps: int, learnable: bool = True, init: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps (T) must be an integer >= 1, got {num_steps!r}")
        self.num_steps = num_steps
        self.learnable = bool(learnable)
        scale = torch.full((num_steps,), float(init))
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def _scaled(self, y: Tensor) -> Tensor:
        if y.dim() < 2 or y.shape[0] != self.num_steps:
            raise ValueError(
                f"expected y [T={self.num_steps}, B, ...], got shape {tuple(y.shape)}"
            )
        return self.scale.to(y.dtype).view(-1, *([1] * (y.dim() - 1))) * y

    def forward(self, y: Tensor) -> Tensor:
        return self._scaled(y).mean(0)

    def anytime(self, y: Tensor) -> Tensor:
        """[T, B, K]: entry t is the readout from steps 0..t only."""
        steps = torch.arange(1, self.num_steps + 1, device=y.device, dtype=y.dtype)
        return self._scaled(y).cumsum(0) / steps.view(-1, *([1] * (y.dim() - 1)))

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, learnable={self.learnable}"
