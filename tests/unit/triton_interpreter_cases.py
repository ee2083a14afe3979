"""Triton kernels on CPU tensors under Triton's interpreter: values and all gradients of the
fused adaptive LIF against the loop of step functions (float32), the bit format against the C
kernel's, and the whole CUDA route (Triton LIF + Triton bits) in a tiny model.

Not collected on its own (no ``test_`` prefix): ``test_snn_triton.py`` runs this file in a
child pytest with TRITON_INTERPRET=1 set before anything imports triton. Triton decides
between compiling and interpreting when a kernel is defined, its own library kernels
(``tl.sum``, ...) included, so the variable must be set before the first ``import triton``,
which other parts of a test session (DeepSpeed) do early; a child process keeps that exact.
The CUDA runs of the same kernels are in tests/gpu.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_snn_triton.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from asnn_dist.models import lean  # noqa: E402
from asnn_dist.snn import backends, native, spike_registry, triton_bits, triton_lif  # noqa: E402
from asnn_dist.snn.functional import adaptive_lif_step, multistep_loop  # noqa: E402
from asnn_dist.snn.fused import fused_adaptive_lif  # noqa: E402
from asnn_dist.snn.surrogate import AtanSurrogate, SigmoidSurrogate  # noqa: E402


@pytest.fixture(autouse=True)
def cuda_route():
    """Dispatch CPU tensors as CUDA ones: the fused kernel and lean packing pick Triton."""
    assert isinstance(triton_lif._lif_backward, InterpretedFunction)
    with backends.pretend_device("cuda"), backends.forced_triton(True):
        yield


# --- fused adaptive LIF: Triton vs the loop of step functions, float32 -------------------------

MODES = list(itertools.product(["soft", "hard"], [False, True], ["sigmoid", "atan"]))
SHAPES = [(1, 1), (3, 37), (8, 1000)]  # T and elements: odd sizes, not multiples of a block


def _make(steps, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(steps, n, generator=g) + 0.6).to(dtype)
    gout = torch.randn(steps, n, generator=g).to(dtype)
    leak = (torch.rand(steps, generator=g) * 0.8 + 0.2).to(dtype)
    gain = (torch.rand(steps, generator=g) + 0.3).to(dtype)
    return x, gout, leak, gain


def _grads(run, x, leak, gain, thr, gout):
    """Spikes and the gradients of x and of every tensor parameter (leak, gain, threshold)."""
    x = x.clone().requires_grad_()
    params = [p.clone().requires_grad_() if isinstance(p, torch.Tensor) else p for p in (leak, gain, thr)]
    s = run(x, *params)
    inputs = [x] + [p for p in params if isinstance(p, torch.Tensor)]
    grads = torch.autograd.grad(s, inputs, gout, allow_unused=True)  # T = 1: the leak is unused
    return (s, *(torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)))


@pytest.mark.parametrize("steps,n", SHAPES)
@pytest.mark.parametrize("reset,detach,sur_name", MODES)
def test_triton_lif_matches_step_loop_values_and_all_gradients(steps, n, reset, detach, sur_name):
    case = MODES.index((reset, detach, sur_name)) * len(SHAPES) + SHAPES.index((steps, n))
    x, gout, leak, gain = _make(steps, n, case)
    sur = SigmoidSurrogate(4.0) if sur_name == "sigmoid" else AtanSurrogate(3.0)
    if case % 3 == 1:
        leak = leak[:1]  # one shared leak (stride 0 in the kernel)
    thr = torch.tensor(0.9) if case % 2 else 0.9  # a tensor threshold gets its gradient too

    def fused(xr, lk, gn, th):
        assert backends.lif_backend(xr, sur) == "triton"
        return fused_adaptive_lif(xr, lk, gn, th, sur, reset, detach)

    def loop(xr, lk, gn, th):
        i = (lambda t: t) if lk.numel() > 1 else (lambda t: 0)
        step = lambda a, v, t: adaptive_lif_step(a, v, lk[i(t)], gn[t], th, sur, reset, detach)  # noqa: E731
        return multistep_loop(step, xr)[0]

    got = _grads(fused, x, leak, gain, thr, gout)
    want = _grads(loop, x, leak, gain, thr, gout)
    assert torch.equal(got[0], want[0])  # same rounding as the separate torch ops: same spikes
    if n > 1:
        assert 0.05 < want[0].mean() < 0.9
    for a, b in zip(got[1:], want[1:]):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_triton_lif_membrane_at_the_threshold_does_not_fire(reset):
    """u > theta strictly: u = 1 (tie), 1 (tie), 2 with leak = gain = 0.5, theta = 1 (as in
    test_snn_fused); a tensor threshold takes the same rule."""
    x = torch.tensor([[2.0, 0.5], [1.0, 0.5], [3.0, 0.5]])
    leak, gain, sur = torch.full((3,), 0.5), torch.full((3,), 0.5), SigmoidSurrogate()
    assert backends.lif_backend(x, sur) == "triton"
    for thr in (1.0, torch.tensor(1.0)):
        s = fused_adaptive_lif(x, leak, gain, thr, sur, reset)
        ref = multistep_loop(lambda a, v, t: adaptive_lif_step(a, v, 0.5, 0.5, 1.0, sur, reset), x)[0]
        assert s.tolist() == ref.tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
        got = _grads(lambda *a: fused_adaptive_lif(*a, sur, reset), x, leak, gain, thr, torch.ones_like(x))
        want = _grads(lambda xr, lk, gn, th: multistep_loop(
            lambda a, v, t: adaptive_lif_step(a, v, lk[t], gn[t], th, sur, reset), xr)[0],
            x, leak, gain, thr, torch.ones_like(x))
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_triton_lif_kernels_exact_in_float64_and_respect_limits():
    """The kernels alone (no autograd), float64: sums and dx to rounding, a float threshold
    without rounding to float32, and the step limit of the backward's register tiles."""
    x, gout, leak, gain = _make(5, 300, 7, torch.float64)
    thr = 0.8  # not a float32 value: float64 compute reads it from a float64 device tensor
    sur = SigmoidSurrogate(2.5)
    spikes, gx = torch.empty_like(x), torch.empty_like(x)
    triton_lif.forward(x, spikes, leak, gain, thr, False)
    d_leak, d_gain, d_thr = triton_lif.backward(x, gout, gx, leak, gain, thr, False, False, sur)
    xr, lk, gn = (t.clone().requires_grad_() for t in (x, leak, gain))
    ref = multistep_loop(lambda a, v, t: adaptive_lif_step(a, v, lk[t], gn[t], thr, sur), xr)[0]
    want = torch.autograd.grad(ref, (xr, lk, gn), gout)
    assert torch.equal(spikes, ref)
    for a, b in zip((gx, d_leak, d_gain), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert d_thr.dtype == torch.float64 and d_thr.shape == ()
    with pytest.raises(ValueError, match="T <= 32"):
        triton_lif.backward(torch.zeros(33, 2), torch.zeros(33, 2), None, 0.5, 0.5, 1.0, False, False, sur)
    with pytest.raises(ValueError, match="gain"):
        triton_lif.forward(x, spikes, leak, gain[:2], thr, False)


# --- 1-bit spike storage ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 9, 4097, 10001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_triton_bits_round_trip_and_c_format(n, dtype):
    x = (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3).to(dtype)
    bits, bad = triton_bits.pack(x)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-n // 8) and not bool(bad)
    assert torch.equal(triton_bits.unpack(bits, torch.full_like(x, 7.0)), x)
    if dtype in (torch.float32, torch.float64) and native.load() is not None:
        assert torch.equal(bits, native.pack_bits(x))  # one format for both kernels
    y = x.clone()
    y[n // 2] = 2.0  # a spike count: flagged
    assert bool(triton_bits.pack(y)[1])


def test_lean_packs_marked_spikes_as_bits_on_the_cuda_route():
    sur = SigmoidSurrogate()
    x = 1.5 * torch.randn(3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    spikes = fused_adaptive_lif(x, torch.full((3,), 0.5), 0.5, 1.0, sur)
    assert spike_registry.is_spikes(spikes) and spike_registry.is_spikes(spikes.flatten(0, 1))
    assert not spike_registry.is_spikes(spikes[0])  # a part of it: not known
    maps = spikes.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    for t in (spikes, spikes.flatten(0, 1)):
        stored, meta = lean.pack(t)
        assert meta[0] == "bits" and stored.numel() == -(-t.numel() // 8)
        assert torch.equal(lean.unpack(stored, meta, torch.float32), t)
    stored, meta = lean.pack(maps)  # a copy nobody marked, and a sum of spikes: uint8
    assert meta[0] == "u8" and torch.equal(lean.unpack(stored, meta, torch.float32), maps)
    assert lean.pack(spikes + spikes)[1][0] == "u8"
    spikes.mul_(2)  # written after marking: no longer trusted
    assert lean.pack(spikes)[1][0] == "u8"


def test_tiny_model_on_the_triton_route_matches_the_cpu_kernels():
    """LeNet ASNN (tiny) forward + backward: Triton LIF and Triton bits vs C / torch ops."""
    from asnn_dist.registry import create_model

    torch.manual_seed(0)
    model = create_model("lenet_asnn_tiny", num_classes=4, in_channels=1, image_size=8)
    x, g = torch.rand(3, 1, 8, 8), torch.randn(3, 4)
    results, saved = [], []
    for route in ("cuda", None):
        with backends.pretend_device(route), torch.autograd.graph.saved_tensors_hooks(
                lambda t, route=route: saved.append((route, t.dtype, t.dim())) or t, lambda t: t):
            model.zero_grad()
            out = model(x)
            out.backward(g)
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert ("cuda", torch.uint8, 1) in saved  # spikes kept as bits by the Triton packer
    (out_t, grads_t), (out_c, grads_c) = results
    torch.testing.assert_close(out_t, out_c, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_t, grads_c):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- time windows (checkpointed segments): entry membrane in, last membrane out --------------

@pytest.mark.parametrize("reset,detach,sur_name", [("soft", False, "sigmoid"), ("hard", False, "atan"),
                                                    ("soft", True, "atan"), ("hard", True, "sigmoid")])
@pytest.mark.parametrize("with_v0,t0,steps,n", [(True, 2, 3, 37), (False, 0, 4, 1000), (True, 1, 1, 5)])
def test_triton_window_matches_step_loop_with_carried_membranes(reset, detach, sur_name, with_v0, t0, steps, n):
    """window_adaptive_lif on the Triton route (steps t0.. of per-step parameters, from v0,
    returning the last membrane) against the loop of step functions: spikes exact, the last
    membrane and every gradient (x, v0, leak, gain; the last membrane's too) to float32 rounding."""
    from asnn_dist.models.window_lif import window_adaptive_lif

    x, gs, _, _ = _make(steps, n, 11 + t0 + steps)
    _, _, leak, gain = _make(t0 + steps + 1, 1, 5)  # the neuron's per-step parameters over all T
    v0 = (0.7 * torch.randn(n, generator=torch.Generator().manual_seed(3))) if with_v0 else None
    gv = torch.randn(n, generator=torch.Generator().manual_seed(4))
    sur = SigmoidSurrogate(4.0) if sur_name == "sigmoid" else AtanSurrogate(3.0)

    def run(window: bool):
        xr, lk, gn = x.clone().requires_grad_(), leak.clone().requires_grad_(), gain.clone().requires_grad_()
        vr = None if v0 is None else v0.clone().requires_grad_()
        if window:
            assert backends.lif_backend(xr, sur) == "triton"
            s, v = window_adaptive_lif(xr, vr, lk, gn, t0, 0.9, sur, reset, detach)
        else:
            step = lambda a, v, t: adaptive_lif_step(a, v, lk[t0 + t], gn[t0 + t], 0.9, sur, reset, detach)  # noqa: E731
            s, v = multistep_loop(step, xr, vr)
        inputs = [xr, lk, gn] + ([vr] if vr is not None else [])
        grads = torch.autograd.grad((s * gs).sum() + (v * gv).sum(), inputs, allow_unused=True)
        return s, v, [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]

    (s, v, g), (s_ref, v_ref, g_ref) = run(True), run(False)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(v, v_ref, rtol=2e-5, atol=2e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item()))
