"""Memory-lean training: layers that read spikes keep them for backward as 1 bit per value.

Why: a conv, linear or matmul saves its input for the weight gradient, and max-pooling saves
its input and int64 indices. When that input is a spike tensor (exactly 0 or 1), storing it
as 1 bit per value is lossless and 32x smaller than float32. On CPU the C kernel of
``snn.native`` packs it and checks every value is 0 or 1 (float32/float64/bfloat16). On CUDA the Triton
kernels of ``snn.triton_bits`` pack the tensors a fused neuron produced (``snn.spike_registry``;
any float dtype), without a check whose answer would have to be synced to the host. A sum of
a few spike tensors (the residual streams of Spikformer and SEW-ResNet: small non-negative
integers), or a tensor no kernel takes, is stored as uint8, lossless and 4x smaller. The
layers below do the math of their torch counterparts in custom autograd functions that save
the packed copy (max-pooling recomputes its indices from it in backward). Being ordinary saved
tensors, the copies also pass through time-step checkpointing, so recomputed segments stay
lean too.

Callers promise integer values in [0, 255] (they know it from the structure). Packing is on
while gradients are recorded and the layer's ``pack_spikes`` is true (the default; training
sets it from ``checkpoint.pack_spikes`` with ``models.execution.apply_spike_packing``);
otherwise the layers are exactly their torch parents. Under autocast, inputs and weights are
cast to the autocast dtype explicitly, as autocast would.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asnn_dist.snn import backends, native, spike_registry

class SavesSpikesPacked:
    """Mixin of the layers below: with ``pack_spikes`` (an attribute, so the execution setup
    can switch it per layer from outside the model) the spike input is saved packed."""

    pack_spikes: bool = True

    def packs(self) -> bool:
        return self.pack_spikes and torch.is_grad_enabled()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would compute a matmul/conv of x in (x's own without autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _no_autocast(x: Tensor) -> Any:
    return torch.autocast(x.device.type, enabled=False)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _memory_order(x: Tensor) -> Optional[Tensor]:
    """A contiguous view of x's memory (x contiguous, or a channels-last 4-D map), or None."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return None


def pack(x: Tensor) -> tuple[Tensor, tuple]:
    """(stored tensor, meta): 1 bit per value when all values are 0 or 1 and a kernel can take
    x (C: checked while packing; Triton: a fused neuron's spikes), else uint8 (the caller
    promises integers in [0, 255])."""
    flat = _memory_order(x)
    backend = "torch" if flat is None else backends.bits_backend(flat)
    bits = None
    if backend == "c":
        bits = native.pack_bits(flat)  # type: ignore[arg-type]
    elif backend == "triton" and spike_registry.is_spikes(flat):  # type: ignore[arg-type]
        bits = backends.triton_bits().pack(flat)[0]
    if bits is not None:
        return bits, ("bits", x.shape, flat is not x, x.dtype)
    return x.to(torch.uint8), ("u8", x.shape, False, x.dtype)


def unpack(stored: Tensor, meta: tuple, dtype: torch.dtype) -> Tensor:
    """The packed tensor again, in ``dtype`` (and, for bits, x's memory layout)."""
    kind, shape, channels_last, x_dtype = meta
    if kind == "u8":
        return stored.to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(shape, dtype=x_dtype, memory_format=fmt, device=stored.device)
    flat = out.permute(0, 2, 3, 1) if channels_last else out
    if stored.device.type != "cpu" or backends.bits_backend(flat) == "triton":  # bits on a GPU: Triton made them
        backends.triton_bits().unpack(stored, flat)
    else:
        native.unpack_bits(stored, flat)
    return out.to(dtype)


class _SpikeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        cd = compute_dtype(x)
        with _no_autocast(x):
            y = F.linear(x.to(cd), weight.to(cd), _cast(bias, cd))
        stored, ctx.pack = pack(x)
        ctx.save_for_backward(stored, weight)
        ctx.meta = (x.dtype, cd, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Optional[Tensor], ...]:
        packed, weight = ctx.saved_tensors
        x_dtype, cd, has_bias = ctx.meta
        shape = ctx.pack[1]
        g2 = gy.to(cd).reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight.to(cd)).view(*shape[:-1], -1).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x2 = unpack(packed, ctx.pack, cd).reshape(-1, shape[-1])
            gw = (x2.t() @ g2).t().to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(weight.dtype)
        return gx, gw, gb


class _SpikeConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: tuple, padding: tuple,
                dilation: tuple, groups: int) -> Tensor:
        cd = compute_dtype(x)
        with _no_autocast(x):
            y = F.conv2d(x.to(cd), weight.to(cd), _cast(bias, cd), stride, padding, dilation, groups)
        stored, ctx.pack = pack(x)
        ctx.save_for_backward(stored, weight)
        ctx.meta = (x.dtype, cd, None if bias is None else [bias.numel()], stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Optional[Tensor], ...]:
        packed, weight = ctx.saved_tensors
        x_dtype, cd, bias_sizes, stride, padding, dilation, groups = ctx.meta
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_sizes is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy.to(cd), unpack(packed, ctx.pack, cd), weight.to(cd), bias_sizes, stride, padding, dilation,
            False, [0, 0], groups, mask,
        )
        return (None if gx is None else gx.to(x_dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype), None, None, None, None)


class _SpikeMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        ctx.args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        ctx.dtype = x.dtype
        stored, ctx.pack = pack(x)
        ctx.save_for_backward(stored)
        return torch.ops.aten.max_pool2d(x, *ctx.args)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Optional[Tensor], None]:
        (packed,) = ctx.saved_tensors
        x = unpack(packed, ctx.pack, ctx.dtype)
        _, idx = torch.ops.aten.max_pool2d_with_indices(x, *ctx.args)  # same first-max rule
        return torch.ops.aten.max_pool2d_with_indices_backward(gy, x, *ctx.args, idx), None


def _heads(t: Tensor, heads: int) -> Tensor:
    """[..., N, C] -> [..., heads, N, C / heads] (a view)."""
    *lead, n, c = t.shape
    return t.view(*lead, n, heads, c // heads).transpose(-3, -2)


def _merge(t: Tensor) -> Tensor:
    """[..., heads, N, d] -> [..., N, heads * d]."""
    *lead, h, n, d = t.shape
    return t.transpose(-3, -2).reshape(*lead, n, h * d)


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float, heads: int) -> Tensor:
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    return _merge(qh @ ((kh.transpose(-2, -1) @ vh) * scale))


class _SpikeAttention(torch.autograd.Function):
    """Per head y = q @ (k^T v * scale) for spike q, k, v [..., N, C]; saves the three packed."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float, heads: int) -> Tensor:
        cd = compute_dtype(q)
        with _no_autocast(q):
            y = _attention(q.to(cd), k.to(cd), v.to(cd), scale, heads)
        stored = [pack(t) for t in (q, k, v)]
        ctx.save_for_backward(*(t for t, _ in stored))
        ctx.packs = [meta for _, meta in stored]
        ctx.meta = (q.dtype, cd, scale, heads)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Optional[Tensor], ...]:
        dtype, cd, scale, heads = ctx.meta
        q, k, v = (_heads(unpack(t, meta, cd), heads) for t, meta in zip(ctx.saved_tensors, ctx.packs))
        gy = _heads(gy.to(cd), heads)
        kv = (k.transpose(-2, -1) @ v) * scale
        gq = gy @ kv.transpose(-2, -1)
        g_kv = (q.transpose(-2, -1) @ gy) * scale
        gk = v @ g_kv.transpose(-2, -1)
        gv = k @ g_kv
        return _merge(gq).to(dtype), _merge(gk).to(dtype), _merge(gv).to(dtype), None, None


class SpikeLinear(SavesSpikesPacked, nn.Linear):
    """nn.Linear whose input (spikes or spike counts) is saved packed (``pack``)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.packs():
            return _SpikeLinear.apply(x, self.weight, self.bias)
        return super().forward(x)


class SpikeConv2d(SavesSpikesPacked, nn.Conv2d):
    """nn.Conv2d whose input (spikes or spike counts) is saved packed (``pack``).

    A strided 1x1 convolution without padding (a ResNet downsampling shortcut) reads every
    s-th pixel, so it takes those pixels first and runs with stride 1: the same values,
    a quarter of the input kept for backward, and no call of torch 2.13's CPU kernel for a
    strided 1x1 convolution's gradient on a channels-last odd batch, which corrupts the heap
    on small channel counts (``tests/unit/test_models_lean.py``)."""

    def forward(self, x: Tensor) -> Tensor:
        stride, padding = self.stride, self.padding
        if self.kernel_size == (1, 1) and padding == (0, 0) and stride != (1, 1) and x.dim() == 4:
            # channels-last, as every conv map between layers (TimeDistributed's output)
            x = x[:, :, :: stride[0], :: stride[1]].contiguous(memory_format=torch.channels_last)
            stride = (1, 1)
        if self.packs() and self.padding_mode == "zeros" and not isinstance(padding, str):
            return _SpikeConv2d.apply(x, self.weight, self.bias, stride, padding, self.dilation, self.groups)
        if stride == self.stride:
            return super().forward(x)
        return F.conv2d(x, self.weight, self.bias, stride, padding, self.dilation, self.groups)


class SpikeMaxPool2d(SavesSpikesPacked, nn.MaxPool2d):
    """nn.MaxPool2d on spikes that saves its input packed instead of input + int64 indices."""

    def forward(self, x: Tensor) -> Tensor:
        if self.packs() and not self.return_indices:
            return _SpikeMaxPool2d.apply(x, self)
        return super().forward(x)


class SpikeAttention(SavesSpikesPacked, nn.Module):
    """Multi-head q @ (k^T v * scale) on [..., N, C] (Spikformer's attention without softmax,
    in the cheap order), returned as [..., N, C] (heads concatenated); q, k, v are spikes."""

    def __init__(self, heads: int, scale: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.packs():
            return _SpikeAttention.apply(q, k, v, self.scale, self.heads)
        return _attention(q, k, v, self.scale, self.heads)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, scale={self.scale}"
