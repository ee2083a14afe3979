"""BatchNorm with statistics per time step (the convention of every model in this package).

Why per step: BN over the flattened [T*B] batch (Spikformer's convention) needs every step
before any step can be normalised, so it cannot run step by step; per-step statistics (the
authors' LeNet convention) let plain and time-checkpointed execution compute the same
function. Each step is normalised over its own batch (and space, or tokens); the affine pair
is shared; running statistics are kept per step ([T, C] buffers) so that eval normalises step
t with step t's statistics. A checkpoint recomputation (``temporal.recomputing()``)
normalises with the same batch statistics but leaves the running statistics alone, so they
are updated exactly once per training forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asnn_dist.models.temporal import is_channels_last_seq, is_recomputing, step_offset


class StepBatchNorm(nn.Module):
    """BatchNorm with per-time-step statistics (see module docstring), input [tau, B, ...].

    ``channel_last=False``: channels at dim 2 ([tau, B, C, ...], conv maps);
    ``channel_last=True``: channels last ([tau, B, ..., C], token sequences).
    """

    def __init__(
        self, num_features: int, num_steps: int, channel_last: bool = False,
        eps: float = 1e-5, momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_steps = num_steps
        self.channel_last = channel_last
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_steps, num_features))
        self.register_buffer("running_var", torch.ones(num_steps, num_features))

    def forward(self, x: Tensor) -> Tensor:
        t0, steps = step_offset(), x.shape[0]
        if t0 + steps > self.num_steps:
            raise ValueError(
                f"steps {t0}..{t0 + steps - 1} exceed num_steps={self.num_steps} of this BatchNorm"
            )
        if self.channel_last:
            return self._per_step(x, t0, flat=True)
        if is_channels_last_seq(x):  # conv maps stored [T, B, H, W, C]: the fast 2-D kernel
            return self._per_step(x.permute(0, 1, 3, 4, 2), t0, flat=True).permute(0, 1, 4, 2, 3)
        return self._per_step(x, t0, flat=False)

    def _per_step(self, x: Tensor, t0: int, flat: bool) -> Tensor:
        # Running statistics are read in eval and updated in training, except while a
        # checkpointed window is recomputed (it was counted in the forward already): then
        # throwaway copies take the update (the op saves the same tensors either way).
        scratch = self.training and is_recomputing()
        outs = []
        for i, x_t in enumerate(x.unbind(0)):
            rm, rv = self.running_mean[t0 + i], self.running_var[t0 + i]
            if scratch:
                rm, rv = rm.clone(), rv.clone()
            inp = x_t.reshape(-1, self.num_features) if flat else x_t
            y = F.batch_norm(inp, rm, rv, self.weight, self.bias, self.training, self.momentum, self.eps)
            outs.append(y.view(x_t.shape) if flat else y)
        return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_steps={self.num_steps}, channel_last={self.channel_last}, "
            f"eps={self.eps}, momentum={self.momentum}"
        )
