"""Fused multi-step adaptive LIF: all T steps in one autograd node with a hand-written BPTT.

Why: the loop of step functions builds ~8 autograd nodes per step and keeps the membrane,
the pre-spike potential and the input of every step alive for backward. This kernel keeps
only the input current x [T, B, ...] (often alive anyway as the previous layer's output) and
recomputes the membrane during backward with the very same ops as the forward (bit-identical
on the same device), so spikes and resets seen by backward equal those of the forward. The
flattened batch is processed in cache-sized chunks (all T steps of a chunk, then the next),
with in-place ops into small preallocated buffers; surrogate scales are folded into the
multiply-adds that follow (``Surrogate.kernel_form``) to save passes over memory.

Recurrence (method section 1; the loop reference is ``functional.adaptive_lif_step``):
    h[t] = leak[t] * v[t-1] + gain[t] * x[t]     v[-1] = 0
    s[t] = H(h[t] - theta)
    v[t] = h[t] - theta * s[t]   (soft)   or   h[t] * (1 - s[t])   (hard)
Backward, with g_v = dL/dv[t] = leak[t+1] * g_h[t+1] and sg = surrogate'(h[t] - theta):
    g_s  = dL/ds[t] + g_v * dv/ds    (dv/ds = -theta soft, -h hard, 0 if detach_reset)
    g_h  = g_v * dv/dh + g_s * sg    (dv/dh = 1 soft, 1 - s hard)
    dx[t] = gain[t] g_h,  dgain[t] = <g_h, x[t]>,  dleak[t] = <g_h, v[t-1]>,
    dtheta = sum_t -<g_s, sg> (- <g_v, s[t]> for the soft reset).
Per-step leak/gain values are read to Python floats once per call (one host sync on GPU):
the kernel targets CPU; a GPU build would replace this file, keeping the same parity tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from asnn_dist.snn.functional import RESETS
from asnn_dist.snn.surrogate import KernelForm, Surrogate

# Elements per chunk of the flattened batch (B x ...): each chunk runs all T steps before the
# next, so the backward's [T, chunk] membrane buffer and the per-step scratch stay in cache
# and no [T, B, ...] scratch is ever allocated. 64 K was the fastest on the benchmark shapes.
CHUNK_ELEMS = 1 << 16


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


def _forward(x2: Tensor, s2: Tensor, lk: list[float], gn: list[float], thr: float, hard: bool) -> None:
    steps, n = x2.shape
    chunk = CHUNK_ELEMS
    h_buf, v_buf = x2.new_empty(min(chunk, n)), x2.new_empty(min(chunk, n))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        h, v = h_buf[: hi - lo], v_buf[: hi - lo]
        for t in range(steps):
            _step(x2[t, lo:hi], v if t else None, lk[t], gn[t], thr, hard, h, s2[t, lo:hi], v)


def _total(parts: list[list[Tensor]], scale: float, like: Tensor) -> Tensor:
    g = torch.stack([torch.stack(p).sum() if p else like.new_zeros(()) for p in parts])
    return g.mul_(scale)


def _reduce_like(per_step: Tensor, like: Tensor) -> Tensor:
    g = per_step.to(like.dtype)
    return g.sum().reshape(like.shape) if like.numel() == 1 else g.reshape(like.shape)


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
        _forward(x.view(steps, -1), spikes.view(steps, -1), lk, gn, thr, hard)
        tensors = [t if isinstance(t, Tensor) else None for t in (leak, gain, threshold)]
        ctx.save_for_backward(x, *tensors)
        ctx.consts = (lk, gn, thr, surrogate, hard, detach_reset)
        return spikes

    @staticmethod
    def backward(ctx: Any, gout: Tensor) -> tuple[Tensor | None, ...]:
        x, leak_t, gain_t, thr_t = ctx.saved_tensors
        lk, gn, thr, surrogate, hard, detach = ctx.consts
        need_x, need_leak, need_gain, need_thr = ctx.needs_input_grad[:4]
        k, kappa, finish_ = _kernel_form(surrogate)
        steps = x.shape[0]
        x2, g2 = x.view(steps, -1), gout.reshape(steps, -1)
        n = x2.shape[1]
        gx = torch.empty_like(x) if need_x else None
        gx2 = gx.view(steps, -1) if gx is not None else None
        chunk = min(CHUNK_ELEMS, n) if n else 1
        v_all = x2.new_empty(steps, chunk)
        a_b, q_b, g_b, h_b, m_b = (x2.new_empty(chunk) for _ in range(5))
        c0 = x2.new_full((), -k * thr)  # a = k * (h - thr) in the pass that builds it
        exact_h = hard or need_thr  # soft reset needs the exact h only for dtheta
        d_leak: list[list[Tensor]] = [[] for _ in range(steps)]
        d_gain: list[list[Tensor]] = [[] for _ in range(steps)]
        d_thr: list[Tensor] = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            c = hi - lo
            vs = v_all[:, :c]
            a, q_buf, G, h, m = a_b[:c], q_b[:c], g_b[:c], h_b[:c], m_b[:c]
            # 1) recompute the membranes v[t] of this chunk with the forward's exact ops
            for t in range(steps):
                _step(x2[t, lo:hi], vs[t - 1] if t else None, lk[t], gn[t], thr, hard, h, m, vs[t])
            # 2) reverse sweep; G holds dL/dh[t] / kappa
            for t in reversed(range(steps)):
                x_t, go = x2[t, lo:hi], g2[t, lo:hi]
                v_prev = vs[t - 1] if t else None
                if exact_h:
                    torch.mul(x_t, gn[t], out=h)
                    if v_prev is not None:
                        h.add_(v_prev, alpha=lk[t])
                    torch.add(c0, h, alpha=k, out=a)
                else:
                    torch.add(c0, x_t, alpha=k * gn[t], out=a)
                    if v_prev is not None:
                        a.add_(v_prev, alpha=k * lk[t])
                finish_(a)  # a = surrogate'(h - thr) / kappa
                last = t == steps - 1
                if last or detach:
                    q = go
                elif hard:
                    q = torch.addcmul(go, h, G, value=-lk[t + 1] * kappa, out=q_buf)
                else:
                    q = torch.sub(go, G, alpha=thr * lk[t + 1], out=q_buf)
                if need_thr and not hard and not last:  # soft reset: dv[t]/dthr = -s[t]
                    d_thr.append(-lk[t + 1] * kappa * torch.dot(G, torch.ge(h, thr, out=m)))
                a.mul_(q)  # dL/ds[t] * surrogate' / kappa
                if need_thr:
                    d_thr.append(-kappa * a.sum())
                if last:
                    G, a = a, G
                elif hard:
                    torch.addcmul(a, G, torch.lt(h, thr, out=m), value=lk[t + 1], out=G)
                else:
                    torch.add(a, G, alpha=lk[t + 1], out=G)
                if need_gain:
                    d_gain[t].append(torch.dot(G, x_t))
                if need_leak and v_prev is not None:
                    d_leak[t].append(torch.dot(G, v_prev))
                if gx2 is not None:
                    torch.mul(G, kappa * gn[t], out=gx2[t, lo:hi])
        return (
            gx,
            _reduce_like(_total(d_leak, kappa, x2), leak_t) if need_leak else None,
            _reduce_like(_total(d_gain, kappa, x2), gain_t) if need_gain else None,
            _reduce_like(torch.stack(d_thr).sum() if d_thr else x2.new_zeros(()), thr_t)
            if need_thr
            else None,
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
