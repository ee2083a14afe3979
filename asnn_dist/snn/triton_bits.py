"""Triton kernels for 1-bit spike storage on CUDA (``models.lean``): pack and unpack.

Why: the GPU counterpart of ``snn/native/bits_kernel.c`` with the same format: bit b of byte
j is value 8 j + b in memory order, so a spike tensor kept for backward costs 1 bit per
value instead of 32 (float32). One program handles BLOCK bytes as a [BLOCK, 8] tile: it reads
the values once and writes the bytes once (and the reverse for unpacking).

Packing also flags values other than 0 and 1 (per program, reduced on the device). Reading
that flag on the host would stall the GPU queue once per layer, so ``models.lean`` packs only
tensors a fused neuron produced (``snn.spike_registry``) and does not read it; tests do.
This module imports triton at import time: callers import it lazily (``snn.backends``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 512  # bytes per program (4096 values)
NUM_WARPS = 4


@triton.jit
def _pack(x_ptr, bits_ptr, flag_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bit = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit[None, :]
    inside = idx < n
    v = tl.load(x_ptr + idx, mask=inside, other=0)
    on = v != 0
    bad = on & (v != 1)
    packed = tl.sum(on.to(tl.int32) << bit[None, :], axis=1)  # disjoint bits: sum == or
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte * 8 < n)
    tl.store(flag_ptr + pid, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0))


@triton.jit
def _unpack(bits_ptr, y_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bit = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit[None, :]
    packed = tl.load(bits_ptr + byte, mask=byte * 8 < n, other=0).to(tl.int32)
    value = (packed[:, None] >> bit[None, :]) & 1
    tl.store(y_ptr + idx, value.to(tl.float32).to(y_ptr.dtype.element_ty), mask=idx < n)


def pack(x: Tensor) -> tuple[Tensor, Tensor]:
    """(bits, bad): x (contiguous) as uint8 [ceil(n / 8)] in memory order, and a device bool
    that is True when some value was neither 0 nor 1 (those were stored as 1)."""
    n = x.numel()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    programs = triton.cdiv(bits.numel(), BLOCK)
    flags = torch.zeros(max(programs, 1), dtype=torch.int32, device=x.device)
    if programs:
        _pack[(programs,)](x, bits, flags, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return bits, flags.amax() > 0


def unpack(bits: Tensor, out: Tensor) -> Tensor:
    """Fill the contiguous ``out`` (any float dtype) with the values ``pack`` stored."""
    n = out.numel()
    programs = triton.cdiv((n + 7) // 8, BLOCK)
    if programs:
        _unpack[(programs,)](bits, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
