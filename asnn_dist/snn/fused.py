"""Fused multi-step adaptive LIF: all T steps in one autograd node with a hand-written BPTT.

Why: the loop of step functions builds ~8 autograd nodes per step and keeps the membrane,
the pre-spike potential and the input of every step alive for backward. This kernel keeps
only the input current x [T, B, ...] (often alive anyway as the previous layer's output) and
recomputes the membrane during backward with the very same ops as the forward (bit-identical
on the same device), so spikes and resets seen by backward equal those of the forward. The
flattened batch is processed in cache-sized chunks (all T steps of a chunk, then the next),
with in-place ops into small preallocated buffers; surrogate scales are folded into the
multiply-adds that follow (``Surrogate.kernel_form``) to save passes over memory.
Memory: the forward saves x only (or, when x is a BatchNorm's output registered in
``snn.affine_source``, the BN's input that BN keeps anyway, and rebuilds x from it in
backward); the backward allocates dx plus [T, chunk] buffers.

Recurrence (method section 1; the loop reference is ``functional.adaptive_lif_step``):
    h[t] = leak[t] * v[t-1] + gain[t] * x[t]     v[-1] = 0
    s[t] = H(h[t] - theta)
    v[t] = h[t] - theta * s[t]   (soft)   or   h[t] * (1 - s[t])   (hard)
Backward, with g_v = dL/dv[t] = leak[t+1] * g_h[t+1] and sg = surrogate'(h[t] - theta):
    g_s  = dL/ds[t] + g_v * dv/ds    (dv/ds = -theta soft, -h hard, 0 if detach_reset)
    g_h  = g_v * dv/dh + g_s * sg    (dv/dh = 1 soft, 1 - s hard)
    dx[t] = gain[t] g_h,  dgain[t] = <g_h, x[t]>,  dleak[t] = <g_h, v[t-1]>,
    dtheta = sum_t -<g_s, sg> (- <g_v, s[t]> for the soft reset).
Per-step leak/gain values are read to Python floats once per call (one host sync on GPU).

Two implementations of the same contract: on CPU (float32/float64, built-in surrogates) the
compiled C kernel (``snn.native``), which runs all T steps of a block of elements in cache;
everywhere else (GPU, other dtypes, custom surrogates, or ``ASNN_DIST_NATIVE=0``) the torch
ops below. Both are checked against the loop of step functions by the same parity tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from asnn_dist.snn import affine_source, native
from asnn_dist.snn.functional import RESETS
from asnn_dist.snn.surrogate import KernelForm, Surrogate

# Chunking: the flattened batch (B x ...) is processed in chunks, all T steps of a chunk
# before the next, so the backward's [T, chunk] buffers stay in cache and no [T, B, ...]
# scratch is allocated. About 64 K elements per intra-op thread was fastest on the benchmark
# shapes (fewer, larger ops also suffer less when the CPU is shared); the [T, chunk] buffers
# are capped at 4 M elements.
CHUNK_ELEMS = 1 << 16
CHUNK_BUFFER_CAP = 1 << 22


def _per_step(p: float | Tensor, steps: int, name: str) -> list[float]:
    if not isinstance(p, Tensor):
        return [float(p)] * steps
    vals = p.detach().reshape(-1).tolist()
    if len(vals) == 1:
        return vals * steps
    if len(vals) != steps:
        raise ValueError(f"{name} must have 1 or T={steps} values, got shape {tuple(p.shape)}")
    return vals


def _kernel_form(surrogate: Surrogate) -> KernelForm:
    form = getattr(surrogate, "kernel_form", None)
    if form is not None:
        return form()
    return 1.0, 1.0, lambda y: surrogate.grad(y, out=y)


def _step(
    x_t: Tensor, v_prev: Tensor | None, leak: float, gain: float, thr: float, hard: bool,
    h: Tensor, s: Tensor, v_out: Tensor,
) -> None:
    """h = gain x + leak v_prev; s = H(h - thr); v_out = reset(h). Forward and recompute."""
    torch.mul(x_t, gain, out=h)
    if v_prev is not None:
        h.add_(v_prev, alpha=leak)
    torch.ge(h, thr, out=s)
    if hard:
        torch.lt(h, thr, out=v_out)
        v_out.mul_(h)
    else:
        torch.sub(h, s, alpha=thr, out=v_out)


def _forward(
    x2: Tensor, s2: Tensor, lk: list[float], gn: list[float], thr: float, hard: bool
) -> int:
    """Spikes of x2 [T, n] into s2; returns the chunk size (backward recomputes with it)."""
    steps, n = x2.shape
    chunk = _chunk_size(steps, n)
    h_buf, v_buf = x2.new_empty(chunk), x2.new_empty(chunk)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        h, v = h_buf[: hi - lo], v_buf[: hi - lo]
        for t in range(steps):
            _step(x2[t, lo:hi], v if t else None, lk[t], gn[t], thr, hard, h, s2[t, lo:hi], v)
    return chunk


def _chunk_size(steps: int, n: int) -> int:
    per_thread = CHUNK_ELEMS * max(1, torch.get_num_threads())
    return max(1, min(n, per_thread, max(1 << 13, CHUNK_BUFFER_CAP // steps)))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot products of [T, c] views without a [T, c] temporary (BLAS dot per row;
    measured much faster than bmm for these shapes)."""
    return torch.stack([torch.dot(a[i], b[i]) for i in range(a.shape[0])])


def _grad_like(
    parts: list[Tensor], scale: float, like: Tensor, steps: int,
    skip_first: bool = False, total: bool = False,
) -> Tensor:
    """Sum per-chunk partial gradients, scale, and shape them like the parameter."""
    if total:
        g = torch.stack(parts).sum() if parts else like.new_zeros(())
    else:
        g = torch.stack(parts).sum(0) if parts else like.new_zeros(steps - skip_first)
        if skip_first:  # v[-1] = 0: leak[0] gets no gradient
            g = torch.cat([g.new_zeros(1), g])
        g = g.sum() if like.numel() == 1 else g
    return (g * scale).to(like.dtype).reshape(like.shape)


class _FusedAdaptiveLIF(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        leak: float | Tensor,
        gain: float | Tensor,
        threshold: float | Tensor,
        surrogate: Surrogate,
        hard: bool,
        detach_reset: bool,
    ) -> Tensor:
        steps = x.shape[0]
        x = x.contiguous()
        lk, gn = _per_step(leak, steps, "leak"), _per_step(gain, steps, "gain")
        thr = float(threshold)
        spikes = torch.empty_like(x)
        n = x[0].numel()
        ctx.native = native.supports(x, surrogate)
        if ctx.native:
            native.forward(x.view(steps, n), None, lk, gn, thr, hard, spikes.view(steps, n), None)
        else:
            ctx.chunk = _forward(x.view(steps, n), spikes.view(steps, n), lk, gn, thr, hard)
        tensors = [t if isinstance(t, Tensor) else None for t in (leak, gain, threshold)]
        affine_source.save_input(ctx, x, *tensors)  # x, or the BN input it is rebuilt from
        ctx.consts = (lk, gn, thr, surrogate, hard, detach_reset)
        return spikes

    @staticmethod
    def backward(ctx: Any, gout: Tensor) -> tuple[Tensor | None, ...]:
        x, (leak_t, gain_t, thr_t) = affine_source.saved_input(ctx)
        lk, gn, thr, surrogate, hard, detach = ctx.consts
        need_x, need_leak, need_gain, need_thr = ctx.needs_input_grad[:4]
        if ctx.native:
            return _native_backward(ctx, x, gout, leak_t, gain_t, thr_t)
        k, kappa, finish_ = _kernel_form(surrogate)
        steps, n = x.shape[0], x[0].numel()
        x2, g2 = x.view(steps, n), gout.reshape(steps, n)
        gx = torch.empty_like(x) if need_x else None
        chunk = ctx.chunk  # same chunks as the forward: identical recomputed values
        H_b, V_b, G_b = (x2.new_empty(steps, chunk) for _ in range(3))
        s_b, q_b = x2.new_empty(chunk), x2.new_empty(chunk)
        M_b = x2.new_empty(steps, chunk) if hard else None
        c0 = x2.new_full((), -k * thr)  # G = k * (h - thr) in one pass
        gx_scale = x2.new_tensor([kappa * g for g in gn]).unsqueeze(1)
        d_leak: list[Tensor] = []
        d_gain: list[Tensor] = []
        d_thr: list[Tensor] = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            c = hi - lo
            H, V, G, s, q_buf = H_b[:, :c], V_b[:, :c], G_b[:, :c], s_b[:c], q_b[:c]
            xc, gc = x2[:, lo:hi], g2[:, lo:hi]
            # 1) recompute h[t] and v[t] of this chunk with the forward's exact ops
            for t in range(steps):
                _step(xc[t], V[t - 1] if t else None, lk[t], gn[t], thr, hard, H[t], s, V[t])
            # 2) surrogate'(h - thr) / kappa for all steps at once
            finish_(torch.add(c0, H, alpha=k, out=G))
            if M_b is not None:
                M = torch.lt(H, thr, out=M_b[:, :c])  # 1 - s
            # 3) reverse sweep: G[t] becomes dL/dh[t] / kappa in place
            for t in reversed(range(steps)):
                last = t == steps - 1
                if last or detach:
                    q = gc[t]
                elif hard:
                    q = torch.addcmul(gc[t], H[t], G[t + 1], value=-lk[t + 1] * kappa, out=q_buf)
                else:
                    q = torch.sub(gc[t], G[t + 1], alpha=thr * lk[t + 1] * kappa, out=q_buf)
                G[t].mul_(q)  # dL/ds[t] * surrogate' / kappa
                if need_thr:
                    d_thr.append(G[t].sum() * -kappa)
                if last:
                    continue
                if hard:
                    G[t].addcmul_(G[t + 1], M[t], value=lk[t + 1])
                else:
                    G[t].add_(G[t + 1], alpha=lk[t + 1])
            # 4) parameter gradients as batched dot products, then dx
            if need_thr and not hard and steps > 1:  # soft reset: dv[t]/dthr = -s[t]
                spikes = torch.ge(H[:-1], thr).to(G.dtype)
                lk_next = x2.new_tensor(lk[1:])
                d_thr.append(-kappa * (lk_next * _rowdot(G[1:], spikes)).sum())
            if need_gain:
                d_gain.append(_rowdot(G, xc))
            if need_leak and steps > 1:
                d_leak.append(_rowdot(G[1:], V[:-1]))
            if gx is not None:
                torch.mul(G, gx_scale, out=gx.view(steps, n)[:, lo:hi])
        return (
            gx,
            _grad_like(d_leak, kappa, leak_t, steps, skip_first=True) if need_leak else None,
            _grad_like(d_gain, kappa, gain_t, steps) if need_gain else None,
            _grad_like(d_thr, 1.0, thr_t, 1, total=True) if need_thr else None,
            None,
            None,
            None,
        )


def param_grads(
    acc: list[float], index: list[int], like: Tensor | None, base: int, needed: bool
) -> Tensor | None:
    """Gradient of a per-step parameter from the C kernel's per-step sums: step i of the call
    adds to entry index[i] (per-step parameters) or to the single entry (shared)."""
    if not needed or like is None:
        return None
    g = torch.zeros(like.numel(), dtype=torch.float64)
    for i, j in enumerate(index):
        g[j if like.numel() > 1 else 0] += acc[base + i]
    return g.to(like.dtype).reshape(like.shape)


def _native_backward(
    ctx: Any, x: Tensor, gout: Tensor, leak_t: Tensor | None, gain_t: Tensor | None, thr_t: Tensor | None
) -> tuple[Tensor | None, ...]:
    lk, gn, thr, surrogate, hard, detach = ctx.consts
    need_x, need_leak, need_gain, need_thr = ctx.needs_input_grad[:4]
    steps, n = x.shape[0], x[0].numel()
    gx = torch.empty_like(x) if need_x else None
    acc = native.backward(
        x.view(steps, n), None, gout.reshape(steps, n).contiguous(), None, lk, gn, thr, hard, detach,
        surrogate, None if gx is None else gx.view(steps, n), None, need_leak or need_gain or need_thr,
    )
    index = list(range(steps))
    return (
        gx,
        param_grads(acc, index, leak_t, 0, need_leak),  # type: ignore[arg-type]
        param_grads(acc, index, gain_t, steps, need_gain),  # type: ignore[arg-type]
        None if not need_thr or thr_t is None else thr_t.new_full(thr_t.shape, acc[2 * steps]),  # type: ignore[index]
        None,
        None,
        None,
    )


def fused_adaptive_lif(
    x: Tensor,
    leak: float | Tensor,
    gain: float | Tensor,
    threshold: float | Tensor,
    surrogate: Surrogate,
    reset: str = "soft",
    detach_reset: bool = False,
) -> Tensor:
    """All T steps of the adaptive LIF on x [T, B, ...] -> spikes [T, B, ...].

    ``leak``/``gain``: float, or tensor of T values (per step) or 1 value (shared).
    ``threshold``: float, or a one-element tensor (gets a gradient if it requires one).
    Exact BPTT of ``adaptive_lif_step`` looped over T (see module docstring).
    """
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be [T, B, ...] with T >= 1, got shape {tuple(x.shape)}")
    return _FusedAdaptiveLIF.apply(
        x, leak, gain, threshold, surrogate, reset == "hard", bool(detach_reset)
    )


def fused_lif(
    x: Tensor,
    tau: float,
    threshold: float | Tensor,
    surrogate: Surrogate,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
) -> Tensor:
    """SpikingJelly-semantics LIF through the adaptive kernel.

    With w = v - v_reset the LIF is an adaptive LIF with leak = 1 - 1/tau, gain = 1/tau
    (decay_input) or 1, threshold - v_reset, starting at w = 0 and hard-resetting to w = 0.
    """
    rest = 0.0 if v_reset is None else v_reset
    gain = 1.0 / tau if decay_input else 1.0
    return fused_adaptive_lif(
        x,
        1.0 - 1.0 / tau,
        gain,
        threshold - rest,
        surrogate,
        reset="soft" if v_reset is None else "hard",
        detach_reset=detach_reset,
    )
