"""BatchNorm with statistics per time step (the convention of every model in this package).

Why per step: BN over the flattened [T*B] batch (Spikformer's convention) needs every step
before any step can be normalised, so it cannot run step by step; per-step batch statistics
(as in the authors' LeNet, which applies its BatchNorm at every step) let plain and
time-checkpointed execution compute the same function. Each step is normalised over its own
batch (and space, or tokens); the affine pair is shared. Running statistics are kept per step
([T, C] buffers) so that eval normalises step t with step t's statistics: our choice, not the
authors' (their BatchNorm keeps one running mean and variance per channel, updated at every
step). A checkpoint recomputation (``Steps.recomputing``)
normalises with the same batch statistics but leaves the running statistics alone, so they
are updated exactly once per training forward.

Training on channels-last float32/float64 maps (tokens [T, B, N, C], or conv maps stored
[T, B, H, W, C]) normalises all steps in one autograd node (``_StepBatchNormFn``; on CPU the C
kernels of ``snn.native``, elsewhere torch ops): statistics folded into y = x * scale + shift
as torch's CPU batch_norm does, saving only the input x. It registers y as an affine image of
x (``snn.affine_source``), so the spiking neuron that reads y saves nothing more (it rebuilds
y from x in backward). Other layouts and eval run ``F.batch_norm`` step by step.

Precision (``snn.precision``): bf16/fp16 inputs (a bf16 engine's convs, or autocast) take
the batched path too; their statistics are reduced in fp32 (fp32 inputs: float64), scale
and shift stay fp32 and y = x * scale + shift is rounded once to x's dtype; gradient sums
are fp32. Running statistics are fp32 buffers whatever the parameters' dtype
(``Fp32Buffers``); the step-by-step path hands ``F.batch_norm`` the affine pair in their
dtype (its mixed-precision form: low-precision input, fp32 statistics and affine).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asnn_dist.models.temporal import ALL_STEPS, StepModule, Steps, is_channels_last_seq
from asnn_dist.snn import affine_source, native
from asnn_dist.snn.precision import Fp32Buffers, is_low, stat_dtype


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """x * scale[t, c] + shift[t, c] for x [T, M, C] (the one formula forward and rebuild use);
    fp32 scale/shift on bf16/fp16 x: computed in fp32, rounded once to x's dtype."""
    if native.supports(x):
        return native.bn_apply(x, scale, shift)
    y = torch.addcmul(shift.unsqueeze(1), x, scale.unsqueeze(1))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _affine_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of scale and shift: x's own, fp32 for bf16/fp16 x."""
    return torch.float32 if is_low(dtype) else dtype


class _StepBatchNormFn(torch.autograd.Function):
    """Training BN of x [T, M, C] with statistics per step t and channel c (over M).

    Returns (y, mean, biased var) - the statistics [T, C] (float64, fp32 for bf16/fp16 x) for
    the running update."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        if native.supports(x):
            mean, var = native.bn_stats(x)
        else:
            var, mean = torch.var_mean(x.to(stat_dtype(x.dtype)), dim=1, correction=0)
        invstd = (var + eps).rsqrt()
        scale_s = weight.detach().to(mean.dtype) * invstd
        scale = scale_s.to(_affine_dtype(x.dtype))
        shift = (bias.detach().to(mean.dtype) - mean * scale_s).to(scale.dtype)
        y = _affine(x, scale, shift)
        ctx.save_for_backward(x, mean, invstd, scale)
        ctx.param_dtype = weight.dtype
        ctx.mark_non_differentiable(mean, var)
        affine_source.register(y, affine_source.affine(x, scale, shift, _affine))
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, gy: Tensor, _gm: Optional[Tensor], _gv: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        x, mean, invstd, scale = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        m = x.shape[1]
        if native.supports(x):
            gx, sum_gy, dotp = native.bn_backward(x, gy, mean, invstd, scale, need_x)
        else:
            sd = mean.dtype
            xc = x.to(sd) - mean.unsqueeze(1)
            g = gy.to(sd)
            sum_gy, dotp = g.sum(1), (g * xc).sum(1)
            gx = None
            if need_x:
                k1, k2 = (sum_gy / m).unsqueeze(1), (dotp * invstd * invstd / m).unsqueeze(1)
                gx = ((g - k1 - xc * k2) * scale.to(sd).unsqueeze(1)).to(x.dtype)
        gw = (dotp * invstd).sum(0).to(ctx.param_dtype) if need_w else None
        gb = sum_gy.sum(0).to(ctx.param_dtype) if need_b else None
        return gx, gw, gb, None


class StepBatchNorm(StepModule, Fp32Buffers):
    """BatchNorm with per-time-step statistics (see module docstring), input [tau, B, ...]
    holding steps ``steps.t0``.. .

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

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        t0, tau = steps.t0, x.shape[0]
        if t0 + tau > self.num_steps:
            raise ValueError(
                f"steps {t0}..{t0 + tau - 1} exceed num_steps={self.num_steps} of this BatchNorm"
            )
        recomputing = steps.recomputing
        batched = self.training and x.is_floating_point()
        folded = not self.training and is_low(x.dtype) and not torch.is_grad_enabled()
        if self.channel_last:
            x = x.contiguous() if batched or folded else x
            if folded:
                return self._eval_affine(x, t0)
            return self._batched(x, t0, recomputing) if batched else self._per_step(x, t0, recomputing, flat=True)
        if is_channels_last_seq(x):  # conv maps stored [T, B, H, W, C]: the fast 2-D kernel
            xl = x.permute(0, 1, 3, 4, 2)
            if folded:
                return self._eval_affine(xl, t0).permute(0, 1, 4, 2, 3)
            y = self._batched(xl, t0, recomputing) if batched else self._per_step(xl, t0, recomputing, flat=True)
            return y.permute(0, 1, 4, 2, 3)
        return self._per_step(x, t0, recomputing, flat=False)

    def _eval_affine(self, x: Tensor, t0: int) -> Tensor:
        """Inference on bf16/fp16 channels-last x [tau, ..., C] (contiguous): y = x * scale +
        shift with fp32 scale/shift folded from the running statistics (as torch's CPU batch
        norm folds them), rounded once; all steps in one pass (C kernel on CPU)."""
        x3 = x.reshape(x.shape[0], -1, self.num_features)
        rows = slice(t0, t0 + x3.shape[0])
        invstd = (self.running_var[rows].float() + self.eps).rsqrt()
        scale = self.weight.float() * invstd
        shift = self.bias.float() - self.running_mean[rows].float() * scale
        return _affine(x3, scale.contiguous(), shift.contiguous()).view(x.shape)

    def _batched(self, x: Tensor, t0: int, recomputing: bool) -> Tensor:
        """All steps of channels-last x [tau, ..., C] (contiguous) in one node; see module doc."""
        x3 = x.reshape(x.shape[0], -1, self.num_features)
        y, mean, var = _StepBatchNormFn.apply(x3, self.weight, self.bias, self.eps)
        if not recomputing:  # counted once per training forward
            with torch.no_grad():
                m = x3.shape[1]
                unbiased = var * (m / max(m - 1, 1))
                rows = slice(t0, t0 + x3.shape[0])
                self.running_mean[rows].lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var[rows].lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        return y.view(x.shape)

    def _per_step(self, x: Tensor, t0: int, recomputing: bool, flat: bool) -> Tensor:
        # Running statistics are read in eval and updated in training, except while a
        # checkpointed window is recomputed (it was counted in the forward already): then
        # throwaway copies take the update (the op saves the same tensors either way).
        scratch = self.training and recomputing
        weight, bias = self.weight, self.bias
        if weight.dtype != x.dtype or is_low(weight.dtype):  # mixed form: fp32 statistics and affine
            weight, bias = weight.to(self.running_mean.dtype), bias.to(self.running_mean.dtype)
        outs = []
        for i, x_t in enumerate(x.unbind(0)):
            rm, rv = self.running_mean[t0 + i], self.running_var[t0 + i]
            if scratch:
                rm, rv = rm.clone(), rv.clone()
            inp = x_t.reshape(-1, self.num_features) if flat else x_t
            y = F.batch_norm(inp, rm, rv, weight, bias, self.training, self.momentum, self.eps)
            outs.append(y.view(x_t.shape) if flat else y)
        return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_steps={self.num_steps}, channel_last={self.channel_last}, "
            f"eps={self.eps}, momentum={self.momentum}"
        )
