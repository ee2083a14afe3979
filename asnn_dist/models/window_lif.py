"""Adaptive LIF over a window of steps that starts from a given membrane (hand-written BPTT).

Why: checkpointed time segments start from the membrane carried in from the previous segment
and hand their last membrane on; the multi-step kernel of ``snn.fused`` starts from rest and
returns spikes only. Running the step functions under autograd works for any neuron
(``step_neurons._WindowSteps``) but costs about three times the fused kernel. This function keeps
the fused kernel's contract: it saves only the input current x and the entry membrane v0,
and recomputes the membranes in backward with the forward's exact ops (those of
``snn.fused``: h = gain x, then h += leak v), so spikes seen by backward equal the forward's.

Recurrence (asnn-method.md section 1; reference ``snn.functional.adaptive_lif_step``):
    h[t] = leak[t] v[t-1] + gain[t] x[t]   (v[-1] = v0, or no leak term when v0 is None)
    s[t] = H(h[t] - theta);  v[t] = h[t] - theta s[t] (soft)  or  h[t] (1 - s[t]) (hard)
Backward with g_v = dL/dv[t] (from step t+1: leak[t+1] g_h[t+1]; after the last step: the
gradient of the returned membrane) and sg = surrogate'(h[t] - theta):
    g_s = dL/ds[t] + g_v dv/ds  (dv/ds = -theta soft, -h hard, 0 with detach_reset)
    g_h = g_v dv/dh + g_s sg    (dv/dh = 1 soft, 1 - s hard)
    dx[t] = gain[t] g_h,  dgain[t] = <g_h, x[t]>,  dleak[t] = <g_h, v[t-1]>,  dv0 = leak[0] g_h[0].
One kernel per device, as for the fused neuron (``snn.backends``): on CPU (float32/float64, and
bfloat16 x with a float32 membrane; built-in surrogates) the compiled C kernel of ``snn.native``,
on CUDA the Triton kernel of ``snn.triton_lif`` (entry membrane in, last membrane out; leak and
gain stay device tensors, so no host syncs); the torch ops below are the fallback elsewhere,
reading leak and gain as 0-dim device tensors off the CPU (``snn.fused``'s rule).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from asnn_dist.snn import affine_source, backends, fused, native
from asnn_dist.snn.fused import _axpy, _per_step, param_grads
from asnn_dist.snn.surrogate import Surrogate


def _steps(x: Tensor, v0: Optional[Tensor], lk: list, gn: list, thr: float, hard: bool,
           keep: bool) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Spikes [tau, ...] and the last membrane; with ``keep`` also every h[t] and v[t]."""
    spikes = torch.empty_like(x)
    hs: list[Tensor] = []
    vs: list[Tensor] = []
    v = v0
    for t in range(x.shape[0]):
        h = torch.mul(x[t], gn[t])
        if v is not None:
            _axpy(h, lk[t], v, out=h)
        s = torch.gt(h, thr, out=spikes[t])  # strictly above the threshold
        v = torch.le(h, thr).to(h.dtype).mul_(h) if hard else torch.sub(h, s, alpha=thr)
        if keep:
            hs.append(h)
            vs.append(v)
    return spikes, v, hs, vs  # type: ignore[return-value]


class _WindowAdaptiveLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, v0: Optional[Tensor], leak: Tensor, gain: Tensor, t0: int,
                threshold: float, surrogate: Surrogate, hard: bool, detach_reset: bool) -> tuple[Tensor, Tensor]:
        steps = x.shape[0]
        index = list(range(t0, t0 + steps)) if leak.numel() > 1 else [0] * steps
        x = x.contiguous()
        v0 = None if v0 is None else v0.contiguous()
        ctx.backend = backends.lif_backend(x, surrogate)
        if ctx.backend == "torch" and x.device.type not in fused.HOST_SCALAR_DEVICES:
            # 0-dim device tensors (kept: this window's values, even if ZeRO-3 frees the parameter)
            lk = _per_step(_window(leak, t0, steps).clone(), steps, "leak", x, host=False)
            gn = _per_step(_window(gain, t0, steps).clone(), steps, "gain", x, host=False)
        elif ctx.backend == "triton":
            lk, gn = _window(leak, t0, steps).clone(), _window(gain, t0, steps).clone()
        else:  # CPU: the values as floats (reading CPU memory, no device sync)
            lk = [float(leak.detach().reshape(-1)[i]) for i in index]
            gn = [float(gain.detach().reshape(-1)[i]) for i in index]
        if ctx.backend in ("c", "triton"):
            # bf16 x: spikes in bf16, the membrane carried on in fp32 (snn.precision)
            spikes = torch.empty_like(x)
            v = torch.empty_like(x[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            flat_v0 = None if v0 is None else v0.view(-1)
            if ctx.backend == "c":
                native.forward(_flat(x), flat_v0, lk, gn, threshold, hard, _flat(spikes), v.view(-1))
            else:
                backends.triton_lif().forward(_flat(x), _flat(spikes), lk, gn, threshold, hard, v0=flat_v0,
                                              v_last=v.view(-1))
        else:
            spikes, v, _, _ = _steps(x, v0, lk, gn, threshold, hard, keep=False)
        affine_source.save_input(ctx, x, v0)  # x, or the BN input it is rebuilt from
        # values are read here; backward needs only shapes (parameters are not saved)
        ctx.consts = (index, lk, gn, threshold, surrogate, hard, detach_reset, leak.shape, gain.shape, leak.dtype)
        return spikes, v

    @staticmethod
    def backward(ctx: Any, g_s: Tensor, g_last: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        x, (v0,) = affine_source.saved_input(ctx)
        index, lk, gn, thr, surrogate, hard, detach, leak_shape, gain_shape, p_dtype = ctx.consts
        if ctx.backend == "c":
            return _native_backward(ctx, x, v0, g_s, g_last)
        if ctx.backend == "triton":
            return _triton_backward(ctx, x, v0, g_s, g_last)
        spikes, _, hs, vs = _steps(x, v0, lk, gn, thr, hard, keep=True)
        steps = x.shape[0]
        gx = torch.empty_like(x)
        d_leak = x.new_zeros(leak_shape).reshape(-1)
        d_gain = x.new_zeros(gain_shape).reshape(-1)
        g_v = g_last
        for t in reversed(range(steps)):
            h, s = hs[t], spikes[t]
            sg = surrogate.grad(h - thr)
            g_st = g_s[t]
            if g_v is not None and not detach:
                g_st = g_st - g_v * (h if hard else thr)
            g_h = g_st * sg
            if g_v is not None:
                g_h += (g_v * (1.0 - s)) if hard else g_v
            torch.mul(g_h, gn[t], out=gx[t])
            d_gain[index[t]] += torch.sum(g_h * x[t])
            v_prev = vs[t - 1] if t else v0
            if v_prev is not None:
                d_leak[index[t]] += torch.sum(g_h * v_prev)
            g_v = g_h * lk[t]
        g_v0 = g_v if v0 is not None and ctx.needs_input_grad[1] else None
        return (gx, g_v0, d_leak.view(leak_shape).to(p_dtype), d_gain.view(gain_shape).to(p_dtype),
                None, None, None, None, None)


def _flat(t: Tensor) -> Tensor:
    return t.view(t.shape[0], -1)


def _outputs(ctx: Any, x: Tensor, v0: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The kernels' gradient buffers for x and v0 (None where autograd needs none)."""
    need_x, need_v0 = ctx.needs_input_grad[:2]
    return (torch.empty_like(x) if need_x else None,
            torch.empty_like(v0) if v0 is not None and need_v0 else None)


def _native_backward(ctx: Any, x: Tensor, v0: Optional[Tensor], g_s: Tensor,
                     g_last: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    index, lk, gn, thr, surrogate, hard, detach, leak_shape, gain_shape, p_dtype = ctx.consts
    need_leak, need_gain = ctx.needs_input_grad[2:4]
    gx, gv0 = _outputs(ctx, x, v0)
    acc = native.backward(
        _flat(x), None if v0 is None else v0.view(-1), _flat(g_s.contiguous()),
        None if g_last is None else g_last.contiguous().view(-1), lk, gn, thr, hard, detach, surrogate,
        None if gx is None else _flat(gx), None if gv0 is None else gv0.view(-1), need_leak or need_gain,
    )
    steps = x.shape[0]
    like_leak = torch.empty(leak_shape, dtype=p_dtype)
    like_gain = torch.empty(gain_shape, dtype=p_dtype)
    d_leak = param_grads(acc, index, like_leak, 0, need_leak)  # type: ignore[arg-type]
    d_gain = param_grads(acc, index, like_gain, steps, need_gain)  # type: ignore[arg-type]
    return (gx, gv0, d_leak, d_gain, None, None, None, None, None)


def _window(p: Tensor, t0: int, steps: int) -> Tensor:
    """The window's per-step values of a parameter (a device view; shared: its one value)."""
    flat = p.detach().reshape(-1)
    return flat[t0 : t0 + steps] if flat.numel() > 1 else flat


def _triton_backward(ctx: Any, x: Tensor, v0: Optional[Tensor], g_s: Tensor,
                     g_last: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    index, lk, gn, thr, surrogate, hard, detach, leak_shape, gain_shape, p_dtype = ctx.consts
    need_leak, need_gain = ctx.needs_input_grad[2:4]
    gx, gv0 = _outputs(ctx, x, v0)
    d_leak, d_gain, _ = backends.triton_lif().backward(
        _flat(x), _flat(g_s.contiguous()), None if gx is None else _flat(gx), lk, gn, thr, hard, detach, surrogate,
        v0=None if v0 is None else v0.view(-1), g_last=None if g_last is None else g_last.contiguous().view(-1),
        gv0=None if gv0 is None else gv0.view(-1))
    t0 = index[0]
    grads = []
    for sums, shape, needed in ((d_leak, leak_shape, need_leak), (d_gain, gain_shape, need_gain)):
        g = None
        if needed:  # the window's steps t0.. of a per-step parameter, or the sum for a shared one
            numel = torch.Size(shape).numel()
            g = sums.new_zeros(numel)
            if numel > 1:
                g[t0 : t0 + len(index)] = sums
            else:
                g[0] = sums.sum()
            g = g.to(p_dtype).view(shape)
        grads.append(g)
    return (gx, gv0, *grads, None, None, None, None, None)


def window_adaptive_lif(x: Tensor, v0: Optional[Tensor], leak: Tensor, gain: Tensor, t0: int, threshold: float,
                        surrogate: Surrogate, reset: str = "soft", detach_reset: bool = False) -> tuple[Tensor, Tensor]:
    """Steps t0.. of x [tau, B, ...] from membrane v0 (None: rest) -> (spikes, last membrane).

    ``leak``/``gain``: the neuron's parameters, T values (per step) or 1 (shared)."""
    return _WindowAdaptiveLIF.apply(x, v0, leak, gain, t0, float(threshold), surrogate, reset == "hard",
                                    bool(detach_reset))
