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
    s[t] = H(h[t] - theta)       (H(0) = 0: fires only strictly above theta)
    v[t] = h[t] - theta * s[t]   (soft)   or   h[t] * (1 - s[t])   (hard)
Backward, with g_v = dL/dv[t] = leak[t+1] * g_h[t+1] and sg = surrogate'(h[t] - theta):
    g_s  = dL/ds[t] + g_v * dv/ds    (dv/ds = -theta soft, -h hard, 0 if detach_reset)
    g_h  = g_v * dv/dh + g_s * sg    (dv/dh = 1 soft, 1 - s hard)
    dx[t] = gain[t] g_h,  dgain[t] = <g_h, x[t]>,  dleak[t] = <g_h, v[t-1]>,
    dtheta = sum_t -<g_s, sg> (- <g_v, s[t]> for the soft reset).
One kernel per device, chosen by ``snn.backends``: on CPU (float32/float64/bfloat16, built-in
surrogates) the compiled C kernel (``snn.native``), on CUDA the Triton kernels
(``snn.triton_lif``); both run all T steps of a block of elements in cache or registers. The
torch ops below are the fallback where neither applies (other devices and dtypes, custom
surrogates, T > 32 on CUDA, CUDA without Triton, or the kernels switched off). All are checked
against the loop of step functions by the same parity tests.
No host syncs: on CPU the per-step leak/gain values are read as Python floats (free there);
on other devices the torch ops take them (and a tensor threshold) as 0-dim device tensors,
with the same results in float32/float64 (float16/bfloat16 round them to the input dtype).
Every output is marked in ``snn.spike_registry`` (it holds only 0 and 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from asnn_dist.snn import affine_source, backends, native, spike_registry
from asnn_dist.snn.functional import RESETS
from asnn_dist.snn.surrogate import KernelForm, Surrogate

# Chunking: the flattened batch (B x ...) is processed in chunks, all T steps of a chunk
# before the next, so the backward's [T, chunk] buffers stay in cache and no [T, B, ...]
# scratch is allocated. About 64 K elements per intra-op thread was fastest on the benchmark
# shapes (fewer, larger ops also suffer less when the CPU is shared); the [T, chunk] buffers
# are capped at 4 M elements.
CHUNK_ELEMS = 1 << 16
CHUNK_BUFFER_CAP = 1 << 22
# Devices whose per-step parameters the torch ops read as Python floats (no sync there);
# elsewhere they stay 0-dim tensors on the device. Tests empty it to run the device form on CPU.
HOST_SCALAR_DEVICES = ("cpu",)

Num = float | Tensor  # a per-step value: a Python float, or a 0-dim tensor on x's device


def _per_step(p: float | Tensor, steps: int, name: str, x: Tensor, host: bool) -> list:
    """leak or gain as T per-step values: floats on the host, else 0-dim device tensors (a
    float is filled on the device in float64, as Python would hold it)."""
    if isinstance(p, Tensor):
        flat = p.detach().reshape(-1)
        if flat.numel() not in (1, steps):
            raise ValueError(f"{name} must have 1 or T={steps} values, got shape {tuple(p.shape)}")
    elif host:
        return [float(p)] * steps
    else:
        flat = torch.full((1,), float(p), dtype=torch.float64, device=x.device)
    vals = flat.tolist() if host else list(flat.unbind(0))
    return vals * steps if len(vals) == 1 else vals


def _scalar(p: float | Tensor, x: Tensor, host: bool) -> Num:
    """The threshold: a float on the host, else a 0-dim device tensor."""
    if host or not isinstance(p, Tensor):
        return float(p) if host else torch.full((), float(p), dtype=torch.float64, device=x.device)
    return p.detach().reshape(())


def _axpy(y: Tensor, a: Num, x: Tensor, out: Tensor) -> Tensor:
    """out = y + a x (``out`` may be y). A 0-dim tensor ``a`` goes through addcmul, which
    rounds like add's alpha (one product, one sum)."""
    if isinstance(a, Tensor):
        return torch.addcmul(y, x, a, out=out)
    return torch.add(y, x, alpha=a, out=out)


def _axyz(y: Tensor, a: Num, x: Tensor, z: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
    """out = y + (a x) z, the order of ``addcmul(y, x, z, value=a)``; ``tmp`` holds a x."""
    if isinstance(a, Tensor):
        return torch.addcmul(y, torch.mul(x, a, out=tmp), z, out=out)
    return torch.addcmul(y, x, z, value=a, out=out)


def _kernel_form(surrogate: Surrogate) -> KernelForm:
    form = getattr(surrogate, "kernel_form", None)
    if form is not None:
        return form()
    return 1.0, 1.0, lambda y: surrogate.grad(y, out=y)


def _step(
    x_t: Tensor, v_prev: Tensor | None, leak: Num, gain: Num, thr: Num, neg_thr: Num, hard: bool,
    h: Tensor, s: Tensor, v_out: Tensor,
) -> None:
    """h = gain x + leak v_prev; s = H(h - thr); v_out = reset(h). Forward and recompute."""
    torch.mul(x_t, gain, out=h)
    if v_prev is not None:
        _axpy(h, leak, v_prev, out=h)
    torch.gt(h, thr, out=s)  # fires strictly above the threshold
    if hard:
        torch.le(h, thr, out=v_out)
        v_out.mul_(h)
    else:
        _axpy(h, neg_thr, s, out=v_out)  # h - thr s (what torch.sub with alpha computes)


def _forward(x2: Tensor, s2: Tensor, lk: list, gn: list, thr: Num, hard: bool) -> int:
    """Spikes of x2 [T, n] into s2; returns the chunk size (backward recomputes with it)."""
    steps, n = x2.shape
    chunk = _chunk_size(steps, n)
    h_buf, v_buf = x2.new_empty(chunk), x2.new_empty(chunk)
    neg_thr = -thr
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        h, v = h_buf[: hi - lo], v_buf[: hi - lo]
        for t in range(steps):
            _step(x2[t, lo:hi], v if t else None, lk[t], gn[t], thr, neg_thr, hard, h, s2[t, lo:hi], v)
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


def _backward_constants(lk: list, gn: list, thr: Num, k: float, kappa: float, x2: Tensor) -> tuple:
    """Per-step factors of the reverse sweep, computed in float64 as the Python floats of the
    host form are (so both forms round alike): (-thr lk kappa, -lk kappa) per step, dx scale
    gain kappa [T, 1], leak[1:] [T-1] and -k thr, the last three in x's dtype."""
    if not isinstance(thr, Tensor) and not isinstance(lk[0], Tensor):
        return ([-(thr * v * kappa) for v in lk], [-v * kappa for v in lk],
                x2.new_tensor([kappa * g for g in gn]).unsqueeze(1), x2.new_tensor(lk[1:]), x2.new_full((), -k * thr))
    lk64, gn64 = torch.stack(lk).double(), torch.stack(gn).double()
    thr64 = thr.double() if isinstance(thr, Tensor) else thr
    return (list((-(thr64 * lk64 * kappa)).unbind(0)), list((-lk64 * kappa).unbind(0)),
            (gn64 * kappa).to(x2.dtype).unsqueeze(1), lk64[1:].to(x2.dtype), (thr64 * -k).to(x2.dtype))


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
        spikes = torch.empty_like(x)
        n = x[0].numel()
        x2, s2 = x.view(steps, n), spikes.view(steps, n)
        ctx.backend = backends.lif_backend(x, surrogate)
        if ctx.backend == "triton":
            backends.triton_lif().forward(x2, s2, leak, gain, threshold, hard)
        else:
            host = ctx.backend == "c" or x.device.type in HOST_SCALAR_DEVICES
            lk, gn = _per_step(leak, steps, "leak", x, host), _per_step(gain, steps, "gain", x, host)
            thr = _scalar(threshold, x, host)
            if ctx.backend == "c":
                native.forward(x2, None, lk, gn, thr, hard, s2, None)  # type: ignore[arg-type]
            else:
                ctx.chunk = _forward(x2, s2, lk, gn, thr, hard)
        tensors = [t if isinstance(t, Tensor) else None for t in (leak, gain, threshold)]
        affine_source.save_input(ctx, x, *tensors)  # x, or the BN input it is rebuilt from
        # floats are kept as they are; tensors are read again from the saved copies in backward
        ctx.consts = tuple(None if isinstance(p, Tensor) else p for p in (leak, gain, threshold))
        ctx.consts += (surrogate, hard, detach_reset)
        spike_registry.mark(spikes)
        return spikes

    @staticmethod
    def backward(ctx: Any, gout: Tensor) -> tuple[Tensor | None, ...]:
        x, tensors = affine_source.saved_input(ctx)
        params = [t if t is not None else c for t, c in zip(tensors, ctx.consts[:3])]
        if ctx.backend == "triton":
            grads = _triton_backward(ctx, x, gout, params, tensors)
        elif ctx.backend == "c":
            grads = _native_backward(ctx, x, gout, params, tensors)
        else:
            grads = _torch_backward(ctx, x, gout, params, tensors)
        return (*grads, None, None, None)


def _torch_backward(ctx: Any, x: Tensor, gout: Tensor, params: list, tensors: tuple) -> tuple[Tensor | None, ...]:
    leak_t, gain_t, thr_t = tensors
    surrogate, hard, detach = ctx.consts[3:]
    need_x, need_leak, need_gain, need_thr = ctx.needs_input_grad[:4]
    k, kappa, finish_ = _kernel_form(surrogate)
    steps, n = x.shape[0], x[0].numel()
    host = x.device.type in HOST_SCALAR_DEVICES
    lk, gn = _per_step(params[0], steps, "leak", x, host), _per_step(params[1], steps, "gain", x, host)
    thr = _scalar(params[2], x, host)
    neg_thr = -thr
    soft_c, hard_c, gx_scale, lk_next, c0 = _backward_constants(lk, gn, thr, k, kappa, x.view(steps, n))
    x2, g2 = x.view(steps, n), gout.reshape(steps, n)
    gx = torch.empty_like(x) if need_x else None
    chunk = ctx.chunk  # same chunks as the forward: identical recomputed values
    H_b, V_b, G_b = (x2.new_empty(steps, chunk) for _ in range(3))
    s_b, q_b = x2.new_empty(chunk), x2.new_empty(chunk)
    M_b = x2.new_empty(steps, chunk) if hard else None
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
            _step(xc[t], V[t - 1] if t else None, lk[t], gn[t], thr, neg_thr, hard, H[t], s, V[t])
        # 2) surrogate'(h - thr) / kappa for all steps at once (G = k (h - thr) in one pass)
        finish_(torch.add(c0, H, alpha=k, out=G))
        if M_b is not None:
            M = torch.le(H, thr, out=M_b[:, :c])  # 1 - s
        # 3) reverse sweep: G[t] becomes dL/dh[t] / kappa in place
        for t in reversed(range(steps)):
            last = t == steps - 1
            if last or detach:
                q = gc[t]
            elif hard:  # dL/ds + g_v dv/ds = g - h leak[t+1] kappa G[t+1]
                q = _axyz(gc[t], hard_c[t + 1], H[t], G[t + 1], out=q_buf, tmp=q_buf)
            else:  # g - thr leak[t+1] kappa G[t+1]
                q = _axpy(gc[t], soft_c[t + 1], G[t + 1], out=q_buf)
            G[t].mul_(q)  # dL/ds[t] * surrogate' / kappa
            if need_thr:
                d_thr.append(G[t].sum() * -kappa)
            if last:
                continue
            if hard:
                _axyz(G[t], lk[t + 1], G[t + 1], M[t], out=G[t], tmp=q_buf)
            else:
                _axpy(G[t], lk[t + 1], G[t + 1], out=G[t])
        # 4) parameter gradients as batched dot products, then dx
        if need_thr and not hard and steps > 1:  # soft reset: dv[t]/dthr = -s[t]
            spikes = torch.gt(H[:-1], thr).to(G.dtype)
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
    )


def _triton_backward(ctx: Any, x: Tensor, gout: Tensor, params: list, tensors: tuple) -> tuple[Tensor | None, ...]:
    surrogate, hard, detach = ctx.consts[3:]
    need_x, need_leak, need_gain, need_thr = ctx.needs_input_grad[:4]
    steps, n = x.shape[0], x[0].numel()
    gx = torch.empty_like(x) if need_x else None
    d_leak, d_gain, d_thr = backends.triton_lif().backward(
        x.view(steps, n), gout.reshape(steps, n).contiguous(), None if gx is None else gx.view(steps, n),
        *params, hard, detach, surrogate)
    grads = [gx]
    for sums, like, needed in ((d_leak, tensors[0], need_leak), (d_gain, tensors[1], need_gain),
                               (d_thr, tensors[2], need_thr)):
        g = None
        if needed and like is not None:
            g = (sums if like.numel() > 1 else sums.sum()).to(like.dtype).reshape(like.shape)
        grads.append(g)
    return tuple(grads)


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


def _native_backward(ctx: Any, x: Tensor, gout: Tensor, params: list, tensors: tuple) -> tuple[Tensor | None, ...]:
    leak_t, gain_t, thr_t = tensors
    surrogate, hard, detach = ctx.consts[3:]
    need_x, need_leak, need_gain, need_thr = ctx.needs_input_grad[:4]
    steps, n = x.shape[0], x[0].numel()
    lk, gn = _per_step(params[0], steps, "leak", x, True), _per_step(params[1], steps, "gain", x, True)
    gx = torch.empty_like(x) if need_x else None
    acc = native.backward(
        x.view(steps, n), None, gout.reshape(steps, n).contiguous(), None, lk, gn, float(params[2]), hard, detach,
        surrogate, None if gx is None else gx.view(steps, n), None, need_leak or need_gain or need_thr,
    )
    index = list(range(steps))
    return (
        gx,
        param_grads(acc, index, leak_t, 0, need_leak),  # type: ignore[arg-type]
        param_grads(acc, index, gain_t, steps, need_gain),  # type: ignore[arg-type]
        None if not need_thr or thr_t is None else thr_t.new_full(thr_t.shape, acc[2 * steps]),  # type: ignore[index]
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
