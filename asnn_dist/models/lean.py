"""Memory-lean training: layers that read spikes keep them for backward as 1 byte per value.

Why: a conv, linear or matmul saves its input for the weight gradient, and max-pooling saves
its input and int64 indices. When that input is a spike tensor (exactly 0 or 1) or a sum of
a few spike tensors (the residual streams of Spikformer and SEW-ResNet: small non-negative
integers), storing it as uint8 is lossless and 4x smaller than float32. The layers below do
the math of their torch counterparts in custom autograd functions that save the uint8 copy
(max-pooling recomputes its indices from it in backward). Being ordinary saved tensors, the
copies also pass through time-step checkpointing, so recomputed segments stay lean too.

Callers promise integer values in [0, 255] (they know it from the structure). Packing is on
only inside ``packing(True)`` (the model's forward) while gradients are recorded; otherwise
the layers are exactly their torch parents. Under autocast, inputs and weights are cast to
the autocast dtype explicitly, as autocast would.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_local = threading.local()


@contextmanager
def packing(enabled: bool) -> Iterator[None]:
    """Turn spike packing on or off for the layers called inside the block."""
    previous = getattr(_local, "enabled", False)
    _local.enabled = bool(enabled)
    try:
        yield
    finally:
        _local.enabled = previous


def packing_active() -> bool:
    return getattr(_local, "enabled", False) and torch.is_grad_enabled()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would compute a matmul/conv of x in (x's own without autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _no_autocast(x: Tensor) -> Any:
    return torch.autocast(x.device.type, enabled=False)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


class _SpikeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        cd = compute_dtype(x)
        with _no_autocast(x):
            y = F.linear(x.to(cd), weight.to(cd), _cast(bias, cd))
        ctx.save_for_backward(x.to(torch.uint8), weight)
        ctx.meta = (x.dtype, cd, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Optional[Tensor], ...]:
        packed, weight = ctx.saved_tensors
        x_dtype, cd, has_bias = ctx.meta
        g2 = gy.to(cd).reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight.to(cd)).view(*packed.shape[:-1], -1).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x2 = packed.reshape(-1, packed.shape[-1]).to(cd)
            gw = (x2.t() @ g2).t().to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(weight.dtype)
        return gx, gw, gb


class _SpikeConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], conv: nn.Conv2d) -> Tensor:
        cd = compute_dtype(x)
        with _no_autocast(x):
            y = F.conv2d(x.to(cd), weight.to(cd), _cast(bias, cd), conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.save_for_backward(x.to(torch.uint8), weight)
        ctx.meta = (x.dtype, cd, None if bias is None else [bias.numel()],
                    conv.stride, conv.padding, conv.dilation, conv.groups)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Optional[Tensor], ...]:
        packed, weight = ctx.saved_tensors
        x_dtype, cd, bias_sizes, stride, padding, dilation, groups = ctx.meta
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_sizes is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy.to(cd), packed.to(cd), weight.to(cd), bias_sizes, stride, padding, dilation,
            False, [0, 0], groups, mask,
        )
        return (None if gx is None else gx.to(x_dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype), None)


class _SpikeMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        ctx.args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        ctx.dtype = x.dtype
        ctx.save_for_backward(x.to(torch.uint8))
        return torch.ops.aten.max_pool2d(x, *ctx.args)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Optional[Tensor], None]:
        (packed,) = ctx.saved_tensors
        x = packed.to(ctx.dtype)
        _, idx = torch.ops.aten.max_pool2d_with_indices(x, *ctx.args)  # same first-max rule
        return torch.ops.aten.max_pool2d_with_indices_backward(gy, x, *ctx.args, idx), None


class _SpikeAttention(torch.autograd.Function):
    """y = q @ (k^T v * scale) for spike q, k, v [..., N, d]; saves the three as uint8."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        cd = compute_dtype(q)
        with _no_autocast(q):
            qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
            y = qc @ ((kc.transpose(-2, -1) @ vc) * scale)
        ctx.save_for_backward(q.to(torch.uint8), k.to(torch.uint8), v.to(torch.uint8))
        ctx.meta = (q.dtype, cd, scale)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Optional[Tensor], ...]:
        dtype, cd, scale = ctx.meta
        q, k, v = (t.to(cd) for t in ctx.saved_tensors)
        gy = gy.to(cd)
        kv = (k.transpose(-2, -1) @ v) * scale
        gq = gy @ kv.transpose(-2, -1)
        g_kv = (q.transpose(-2, -1) @ gy) * scale
        gk = v @ g_kv.transpose(-2, -1)
        gv = k @ g_kv
        return gq.to(dtype), gk.to(dtype), gv.to(dtype), None


class SpikeLinear(nn.Linear):
    """nn.Linear whose input (spikes or spike counts) is saved as uint8 while packing."""

    def forward(self, x: Tensor) -> Tensor:
        if packing_active():
            return _SpikeLinear.apply(x, self.weight, self.bias)
        return super().forward(x)


class SpikeConv2d(nn.Conv2d):
    """nn.Conv2d whose input (spikes or spike counts) is saved as uint8 while packing."""

    def forward(self, x: Tensor) -> Tensor:
        if packing_active() and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return _SpikeConv2d.apply(x, self.weight, self.bias, self)
        return super().forward(x)


class SpikeMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d on spikes that saves a uint8 input instead of input + int64 indices."""

    def forward(self, x: Tensor) -> Tensor:
        if packing_active() and not self.return_indices:
            return _SpikeMaxPool2d.apply(x, self)
        return super().forward(x)


def spike_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q @ (k^T v * scale) (Spikformer's attention without softmax, in the cheap order)."""
    if packing_active():
        return _SpikeAttention.apply(q, k, v, scale)
    return q @ ((k.transpose(-2, -1) @ v) * scale)
