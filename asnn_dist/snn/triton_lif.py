"""Triton kernels of the fused adaptive LIF (CUDA): forward and hand-written BPTT.

Why: the GPU counterpart of the C kernel (``snn/native/lif_kernel.c``) with the same contract
(``snn.fused``): the forward keeps nothing but its input, the backward recomputes the
membranes, and both make one pass over memory. The torch-op path makes ~10 passes per step.

- Forward: one program per block of BLOCK elements runs all T steps with the membrane in
  registers; it reads x once and writes the spikes once.
- Backward: a program recomputes h[t] of its block for every step into a [T_PAD, BLOCK]
  register tile (T_PAD = next power of two >= T, loops unrolled; every thread owns all T rows
  of its elements, so picking row t is register selection), then runs the reverse sweep,
  reading dL/ds and x once and writing dx once. Parameter sums go per program to a
  [programs, 2 T_PAD + 1] buffer that torch sums in float64 on the device (deterministic,
  no atomics).
- No host syncs: leak and gain are read from device memory (stride 0 when shared), the
  threshold too when it is a tensor; gradients come back as device tensors.
- Rounding: FP fusion is off (``enable_fp_fusion=False``): h = gain x + leak v rounds like the
  step loop's separate torch ops, and the backward's recomputation like the forward, so both
  see the same spikes. float16/bfloat16/float32 compute in float32 (spikes and dx are stored
  in the input dtype), float64 in float64; the surrogate's alpha enters as a float32 scalar.

Recurrence and backward: exactly those of ``snn.fused`` (module docstring there). This module
imports triton at import time: callers import it lazily (``snn.backends`` decides).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from asnn_dist.snn.backends import MAX_TRITON_STEPS
from asnn_dist.snn.native import SURROGATE_CODES

FORWARD_BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _surrogate(y, alpha, SUR: tl.constexpr):
    """alpha sig(a y)(1 - sig(a y)) = alpha e / (1 + e)^2 with e = exp(-|alpha y|) (no
    cancellation), or atan's alpha/2 / (1 + (pi/2 alpha y)^2)."""
    if SUR == 0:
        e = tl.exp(-tl.abs(alpha * y))
        d = 1.0 + e
        out = alpha * e / (d * d)
    else:
        w = 1.5707963267948966 * alpha * y
        out = alpha * 0.5 / (1.0 + w * w)
    return out


@triton.jit
def _threshold(thr_ptr, thr_val, THR_PTR: tl.constexpr, ACC: tl.constexpr):
    if THR_PTR:
        thr = tl.load(thr_ptr).to(ACC)
    else:
        thr = thr_val  # a float32 scalar argument (not used for float64 compute)
    return thr


@triton.jit
def _reset(h, thr, HARD: tl.constexpr):
    """v after the step: 0 where h > thr (hard) or h - thr s (soft); s = h > thr, strictly."""
    if HARD:
        v = tl.where(h > thr, 0.0, h).to(h.dtype)
    else:
        v = h - thr * (h > thr).to(h.dtype)
    return v


@triton.jit
def _lif_forward(x_ptr, s_ptr, v0_ptr, vlast_ptr, leak_ptr, gain_ptr, thr_ptr, thr_val, n, steps, leak_stride,
                 gain_stride, HARD: tl.constexpr, THR_PTR: tl.constexpr, HAS_V0: tl.constexpr,
                 STORE_V: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    thr = _threshold(thr_ptr, thr_val, THR_PTR, ACC)
    if HAS_V0:  # a time window that starts from the membrane the previous window left
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        v = tl.zeros([BLOCK], ACC)
    for t in range(steps):
        row = t * tl.cast(n, tl.int64) + offs
        xt = tl.load(x_ptr + row, mask=mask, other=0.0).to(ACC)
        lk = tl.load(leak_ptr + t * leak_stride).to(ACC)
        gn = tl.load(gain_ptr + t * gain_stride).to(ACC)
        h = gn * xt + lk * v
        tl.store(s_ptr + row, (h > thr).to(ACC).to(s_ptr.dtype.element_ty), mask=mask)
        v = _reset(h, thr, HARD)
    if STORE_V:
        tl.store(vlast_ptr + offs, v.to(vlast_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lif_backward(x_ptr, go_ptr, gx_ptr, part_ptr, v0_ptr, glast_ptr, gv0_ptr, leak_ptr, gain_ptr, thr_ptr,
                  thr_val, alpha, n, steps, leak_stride, gain_stride, HARD: tl.constexpr, DETACH: tl.constexpr,
                  SUR: tl.constexpr, THR_PTR: tl.constexpr, STORE_GX: tl.constexpr, HAS_V0: tl.constexpr,
                  HAS_GLAST: tl.constexpr, STORE_GV0: tl.constexpr, ACC: tl.constexpr, T_PAD: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n64 = tl.cast(n, tl.int64)
    inside = offs < n64
    rows = tl.arange(0, T_PAD)
    thr = _threshold(thr_ptr, thr_val, THR_PTR, ACC)
    # 1) recompute h[t] of every step with the forward's exact ops; row t of H holds h[t]
    H = tl.zeros([T_PAD, BLOCK], ACC)
    if HAS_V0:
        v0 = tl.load(v0_ptr + offs, mask=inside, other=0.0).to(ACC)
    else:
        v0 = tl.zeros([BLOCK], ACC)
    v = v0
    for t in tl.static_range(T_PAD):
        # padded steps (t >= T) read x = 0 and dL/ds = 0 and store nothing: no gradient flows
        live = offs < tl.where(t < steps, n64, 0)
        tc = tl.minimum(t, steps - 1)
        xt = tl.load(x_ptr + t * n64 + offs, mask=live, other=0.0).to(ACC)
        lk = tl.load(leak_ptr + tc * leak_stride).to(ACC)
        gn = tl.load(gain_ptr + tc * gain_stride).to(ACC)
        h = gn * xt + lk * v
        H = tl.where(rows[:, None] == t, h[None, :], H)
        v = _reset(h, thr, HARD)
    # 2) reverse sweep; DG/DL rows collect gh x[t] and gh v[t-1] for the parameter sums
    DG = tl.zeros([T_PAD, BLOCK], ACC)
    DL = tl.zeros([T_PAD, BLOCK], ACC)
    thr_acc = tl.zeros([BLOCK], ACC)
    gv = tl.zeros([BLOCK], ACC)  # dL/dv[t]; zero through the padded steps
    if HAS_GLAST:  # the gradient of the returned last membrane enters at step T-1
        glast = tl.load(glast_ptr + offs, mask=inside, other=0.0).to(ACC)
    else:
        glast = tl.zeros([BLOCK], ACC)
    for i in tl.static_range(T_PAD):
        t = T_PAD - 1 - i
        live = offs < tl.where(t < steps, n64, 0)
        if HAS_GLAST:
            gv = tl.where(t == steps - 1, glast, gv)
        tc = tl.minimum(t, steps - 1)
        sel = rows[:, None] == t
        h = tl.sum(tl.where(sel, H, 0.0), axis=0)
        go = tl.load(go_ptr + t * n64 + offs, mask=live, other=0.0).to(ACC)
        xt = tl.load(x_ptr + t * n64 + offs, mask=live, other=0.0).to(ACC)
        lk = tl.load(leak_ptr + tc * leak_stride).to(ACC)
        gn = tl.load(gain_ptr + tc * gain_stride).to(ACC)
        s = (h > thr).to(ACC)
        sg = _surrogate(h - thr, alpha, SUR)
        if DETACH:
            gs = go
        elif HARD:
            gs = go - gv * h
        else:
            gs = go - gv * thr
        gss = gs * sg
        if HARD:
            gh = gss + gv * (1.0 - s)
            thr_acc += gss
        else:
            gh = gss + gv
            thr_acc += gss + gv * s
        if STORE_GX:
            tl.store(gx_ptr + t * n64 + offs, (gn * gh).to(gx_ptr.dtype.element_ty), mask=live)
        DG = tl.where(sel, (gh * xt)[None, :], DG)
        if t > 0:
            hp = tl.sum(tl.where(rows[:, None] == t - 1, H, 0.0), axis=0)
            DL = tl.where(sel, (gh * _reset(hp, thr, HARD))[None, :], DL)
        elif HAS_V0:
            DL = tl.where(sel, (gh * v0)[None, :], DL)
        gv = lk * gh
    if STORE_GV0:  # dL/dv0 = leak[0] dL/dh[0]
        tl.store(gv0_ptr + offs, gv.to(gv0_ptr.dtype.element_ty), mask=inside)
    base = part_ptr + pid.to(tl.int64) * (2 * T_PAD + 1)
    tl.store(base + rows, tl.sum(DL, axis=1))
    tl.store(base + T_PAD + rows, tl.sum(DG, axis=1))
    tl.store(base + 2 * T_PAD, -tl.sum(thr_acc, axis=0))


def _acc(dtype: torch.dtype) -> tuple[tl.dtype, torch.dtype]:
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _param(p: float | Tensor, steps: int, name: str, x: Tensor) -> tuple[Tensor, int]:
    """(device tensor, stride between steps): per-step values, or one shared value (stride 0).
    A float is filled on the device (a kernel launch, no host sync)."""
    if not isinstance(p, Tensor):
        return torch.full((1,), float(p), dtype=_acc(x.dtype)[1], device=x.device), 0
    flat = p.detach().reshape(-1)
    if flat.numel() not in (1, steps):
        raise ValueError(f"{name} must have 1 or T={steps} values, got shape {tuple(p.shape)}")
    return flat, (flat.stride(0) if flat.numel() > 1 else 0)


def _threshold_args(threshold: float | Tensor, x: Tensor) -> tuple[Tensor, float, bool]:
    """(pointer, value, from pointer): a tensor threshold stays on the device; a float is a
    float32 kernel argument (float64 compute: a float64 device tensor, so it is not rounded)."""
    if isinstance(threshold, Tensor):
        return threshold.detach().reshape(-1), 0.0, True
    if x.dtype == torch.float64:
        return torch.full((1,), float(threshold), dtype=torch.float64, device=x.device), 0.0, True
    return x, float(threshold), False


def padded_steps(steps: int) -> int:
    """T_PAD of the backward's register tile."""
    return triton.next_power_of_2(max(1, steps))


def backward_block(steps: int) -> int:
    """Elements per backward program: about 16 tile values per thread (3 tiles of T_PAD rows)."""
    per_thread = max(1, 16 // padded_steps(steps))
    return 32 * NUM_WARPS * per_thread


def forward(x: Tensor, spikes: Tensor, leak: float | Tensor, gain: float | Tensor, threshold: float | Tensor,
            hard: bool, v0: Optional[Tensor] = None, v_last: Optional[Tensor] = None) -> None:
    """Spikes of x [T, n] into ``spikes`` [T, n] (both contiguous, same dtype and device).
    A time window (checkpointed segments) starts from membrane ``v0`` [n] (None: rest) and
    writes its last membrane into ``v_last`` [n] (None: not kept)."""
    steps, n = x.shape
    lk, lk_stride = _param(leak, steps, "leak", x)
    gn, gn_stride = _param(gain, steps, "gain", x)
    thr_ptr, thr_val, thr_from_ptr = _threshold_args(threshold, x)
    if n == 0:
        return
    grid = (triton.cdiv(n, FORWARD_BLOCK),)
    _lif_forward[grid](x, spikes, x if v0 is None else v0, x if v_last is None else v_last, lk, gn, thr_ptr,
                       thr_val, n, steps, lk_stride, gn_stride, HARD=bool(hard), THR_PTR=thr_from_ptr,
                       HAS_V0=v0 is not None, STORE_V=v_last is not None, ACC=_acc(x.dtype)[0],
                       BLOCK=FORWARD_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


def backward(x: Tensor, gout: Tensor, gx: Optional[Tensor], leak: float | Tensor, gain: float | Tensor,
             threshold: float | Tensor, hard: bool, detach: bool, surrogate: object, v0: Optional[Tensor] = None,
             g_last: Optional[Tensor] = None, gv0: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """BPTT of ``forward``: dx into ``gx`` [T, n] (None: not needed); returns the float64 sums
    over elements (dleak [T], dgain [T], dthr []) as device tensors. x, gout contiguous [T, n].
    A window: its entry membrane ``v0``, the gradient ``g_last`` of its last membrane, and
    dL/dv0 written into ``gv0`` (each [n], None when absent / not needed)."""
    steps, n = x.shape
    if steps > MAX_TRITON_STEPS:
        raise ValueError(f"the Triton LIF kernel takes T <= {MAX_TRITON_STEPS} steps, got {steps}")
    lk, lk_stride = _param(leak, steps, "leak", x)
    gn, gn_stride = _param(gain, steps, "gain", x)
    thr_ptr, thr_val, thr_from_ptr = _threshold_args(threshold, x)
    t_pad, block = padded_steps(steps), backward_block(steps)
    programs = triton.cdiv(n, block)
    acc_tl, acc_torch = _acc(x.dtype)
    part = torch.empty(programs, 2 * t_pad + 1, dtype=acc_torch, device=x.device)
    if programs:
        _lif_backward[(programs,)](
            x, gout, x if gx is None else gx, part, x if v0 is None else v0, x if g_last is None else g_last,
            x if gv0 is None else gv0, lk, gn, thr_ptr, thr_val, float(surrogate.alpha),  # type: ignore[attr-defined]
            n, steps, lk_stride, gn_stride, HARD=bool(hard), DETACH=bool(detach),
            SUR=SURROGATE_CODES[type(surrogate).__name__], THR_PTR=thr_from_ptr, STORE_GX=gx is not None,
            HAS_V0=v0 is not None, HAS_GLAST=g_last is not None, STORE_GV0=gv0 is not None,
            ACC=acc_tl, T_PAD=t_pad, BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False)
    sums = part.to(torch.float64).sum(0)
    return sums[:steps], sums[t_pad : t_pad + steps], sums[2 * t_pad]
