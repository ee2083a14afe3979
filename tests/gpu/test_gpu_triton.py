"""GPU checks of the Triton kernels (``-m gpu``; skipped cleanly without a CUDA device).

On a CUDA device: the fused adaptive LIF against the loop of step functions (values and the
gradients of x, leak, gain and threshold; every reset mode and surrogate; T from 1 to 32), its
bfloat16 path, no host syncs (CUDA's sync debug mode raises on any), 1-bit spike storage, and
a Spikformer on the GPU with and without packed spikes. ``tests/gpu/run_gpu_checks.sh`` runs
this file, a 1-GPU training run and the CUDA neuron benchmark in one command.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from asnn_dist.models.lean import pack, unpack
from asnn_dist.registry import create_model
from asnn_dist.snn import backends, native, spike_registry
from asnn_dist.snn.functional import adaptive_lif_step, multistep_loop
from asnn_dist.snn.fused import fused_adaptive_lif
from asnn_dist.snn.surrogate import AtanSurrogate, SigmoidSurrogate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DEV = "cuda"
MODES = list(itertools.product(["soft", "hard"], [False, True], ["sigmoid", "atan"]))


def _inputs(steps, n, seed, dtype=torch.float32, shared_leak=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (1.5 * torch.randn(steps, n, generator=g, device=DEV) + 0.6).to(dtype)
    gout = torch.randn(steps, n, generator=g, device=DEV).to(dtype)
    leak = torch.rand(1 if shared_leak else steps, generator=g, device=DEV) * 0.8 + 0.2
    gain = torch.rand(steps, generator=g, device=DEV) + 0.3
    return x, gout, leak, gain


def _run(kind, x, leak, gain, thr, sur, reset, detach, gout):
    """Spikes and the gradients of x, leak, gain and threshold (zeros where unused)."""
    xr, lk, gn, th = (t.clone().requires_grad_() for t in (x, leak, gain, thr))
    if kind == "fused":
        s = fused_adaptive_lif(xr, lk, gn, th, sur, reset, detach)
    else:
        i = (lambda t: t) if lk.numel() > 1 else (lambda t: 0)
        s = multistep_loop(lambda a, v, t: adaptive_lif_step(a, v, lk[i(t)], gn[t], th, sur, reset, detach), xr)[0]
    inputs = (xr, lk, gn, th)
    grads = torch.autograd.grad(s, inputs, gout, allow_unused=True)
    return (s, *(torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)))


def _check(got, want, rtol=1e-4):
    assert torch.equal(got[0], want[0]), "spikes differ from the step loop"
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, b.abs().max().item()))


def test_cuda_tensors_take_the_triton_kernels():
    assert backends.triton_importable(), "triton cannot be imported on this GPU machine"
    x = torch.randn(8, 10, device=DEV)
    assert backends.lif_backend(x, SigmoidSurrogate()) == "triton"
    assert backends.lif_backend(x.bfloat16(), AtanSurrogate()) == "triton"
    assert backends.bits_backend(x) == "triton"
    with backends.forced_triton(False):
        assert backends.lif_backend(x, SigmoidSurrogate()) == "torch"


@pytest.mark.parametrize("reset,detach,sur_name", MODES)
def test_triton_lif_matches_step_loop_on_cuda(reset, detach, sur_name):
    x, gout, leak, gain = _inputs(8, 100_003, MODES.index((reset, detach, sur_name)))
    sur = SigmoidSurrogate(4.0) if sur_name == "sigmoid" else AtanSurrogate(3.0)
    thr = torch.tensor(0.9, device=DEV)
    got = _run("fused", x, leak, gain, thr, sur, reset, detach, gout)
    _check(got, _run("loop", x, leak, gain, thr, sur, reset, detach, gout))
    assert 0.1 < got[0].mean() < 0.9


@pytest.mark.parametrize("steps,n", [(1, 1), (3, 37), (16, 4099), (32, 513)])
def test_triton_lif_every_length_on_cuda(steps, n):
    x, gout, leak, gain = _inputs(steps, n, steps, shared_leak=steps == 3)
    thr = torch.tensor(1.0, device=DEV)
    for reset, sur in (("soft", SigmoidSurrogate()), ("hard", AtanSurrogate())):
        _check(_run("fused", x, leak, gain, thr, sur, reset, False, gout),
               _run("loop", x, leak, gain, thr, sur, reset, False, gout))


def test_triton_lif_bfloat16_computes_in_float32():
    """bf16 activations: the kernel computes in float32 from the bf16 values, so its spikes
    equal the float32 step loop's on the same values; dx is that loop's, rounded to bf16."""
    x, gout, leak, gain = _inputs(8, 65_537, 3, torch.bfloat16)
    thr, sur = torch.tensor(1.0, device=DEV), SigmoidSurrogate()
    got = _run("fused", x, leak, gain, thr, sur, "soft", False, gout)
    want = _run("loop", x.float(), leak, gain, thr, sur, "soft", False, gout.float())
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert torch.equal(got[0].float(), want[0])
    torch.testing.assert_close(got[1].float(), want[1], rtol=1e-2, atol=1e-2)
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("triton_on", [True, False])
def test_fused_lif_never_syncs_the_host(triton_on):
    """Triton and the torch-op fallback read leak, gain and threshold on the device: CUDA's
    sync debug mode raises on any device-to-host copy or stream sync."""
    x, gout, leak, gain = _inputs(8, 50_000, 5)
    xr, lk, gn = (t.clone().requires_grad_() for t in (x, leak, gain))
    th = torch.tensor(0.9, device=DEV, requires_grad=True)
    with backends.forced_triton(triton_on):
        for sync_mode in ("default", "error"):  # warm-up first (Triton compiles, caches fill)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(sync_mode)
            try:
                for reset in ("soft", "hard"):
                    s = fused_adaptive_lif(xr, lk, gn, th, SigmoidSurrogate(), reset)
                    torch.autograd.grad(s, (xr, lk, gn, th), gout)
                    s = fused_adaptive_lif(xr, 0.5, 0.5, 1.0, AtanSurrogate(), reset)
                    torch.autograd.grad(s, xr, gout)
            finally:
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("triton_on", [True, False])
@pytest.mark.parametrize("reset,detach,sur_name", [("soft", False, "sigmoid"), ("hard", True, "atan")])
def test_window_lif_on_cuda_matches_step_loop_without_host_syncs(triton_on, reset, detach, sur_name):
    """A time-checkpointed window (steps 2.. of 8-step parameters, from a carried membrane):
    Triton (or the torch-op fallback) against the step loop, and no host syncs in either."""
    from asnn_dist.models.window_lif import window_adaptive_lif

    x, gs, _, _ = _inputs(3, 70_001, 9)
    _, _, leak, gain = _inputs(8, 1, 10)
    v0, gv = torch.randn(70_001, device=DEV), torch.randn(70_001, device=DEV)
    sur = SigmoidSurrogate(4.0) if sur_name == "sigmoid" else AtanSurrogate(3.0)

    def run(window):
        xr, lk, gn, vr = (t.clone().requires_grad_() for t in (x, leak, gain, v0))
        if window:
            s, v = window_adaptive_lif(xr, vr, lk, gn, 2, 0.9, sur, reset, detach)
        else:
            s, v = multistep_loop(lambda a, vv, t: adaptive_lif_step(a, vv, lk[2 + t], gn[2 + t], 0.9, sur, reset,
                                                                     detach), xr, vr)
        return (s, v, *torch.autograd.grad((s * gs).sum() + (v * gv).sum(), (xr, vr, lk, gn)))

    with backends.forced_triton(triton_on):
        run(True)  # warm-up: Triton compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = run(True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _check(got, run(False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_bits_on_cuda(dtype):
    bits_mod = backends.triton_bits()
    for n in (1, 9, 4097, 1_000_003):
        x = (torch.rand(n, device=DEV) < 0.3).to(dtype)
        bits, bad = bits_mod.pack(x)
        assert bits.numel() == -(-n // 8) and not bool(bad)
        assert torch.equal(bits_mod.unpack(bits, torch.empty_like(x)), x)
        if dtype == torch.float32 and native.load() is not None:
            assert torch.equal(bits.cpu(), native.pack_bits(x.cpu()))  # the C kernel's format
        y = x.clone()
        y[n // 2] = 3
        assert bool(bits_mod.pack(y)[1])


def test_lean_storage_on_cuda_keeps_neuron_spikes_as_bits():
    s = fused_adaptive_lif(torch.randn(4, 2, 8, 16, device=DEV) * 2, 0.5, 0.5, 1.0, SigmoidSurrogate())
    assert spike_registry.is_spikes(s)
    stored, meta = pack(s)
    assert meta[0] == "bits" and stored.is_cuda and torch.equal(unpack(stored, meta, torch.float32), s)
    stored, meta = pack(s + s)
    assert meta[0] == "u8" and torch.equal(unpack(stored, meta, torch.float32), s + s)


@pytest.mark.parametrize("autocast", [False, True])
def test_spikformer_on_cuda_packed_matches_plain(autocast):
    torch.manual_seed(0)
    from asnn_dist.models.execution import apply_spike_packing

    plain = create_model("spikformer_tiny", num_classes=5, in_channels=1, image_size=16,
                         neuron=dict(init_gain=1.0)).to(DEV)
    apply_spike_packing(plain, False)
    lean = apply_spike_packing(copy.deepcopy(plain), True)
    x, g = torch.rand(6, 1, 16, 16, device=DEV), torch.randn(6, 5, device=DEV)
    outs, saved = [], []
    for model in (plain, lean):
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.dim())) or t,
                                                         lambda t: t):
            out = model(x)
        out.float().backward(g)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert (torch.uint8, 1) in saved  # some spikes were kept as bits
    for (name, a), (_, b) in zip(plain.named_parameters(), lean.named_parameters()):
        assert torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5)
