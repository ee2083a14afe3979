"""The compiled C LIF kernel: build and cache, fallback, dispatch, threads, edge shapes.

Values and gradients against the loop of step functions are checked by the parity tests of
``test_snn_fused.py`` and ``test_models_time_checkpoint.py``, which run on both paths."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from asnn_dist.snn import native
from asnn_dist.snn.fused import fused_adaptive_lif
from asnn_dist.snn.functional import adaptive_lif_step, multistep_loop
from asnn_dist.snn.surrogate import AtanSurrogate, SigmoidSurrogate

CC = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")


@needs_cc
def test_builds_atomically_into_the_cache_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ASNN_DIST_KERNEL_CACHE", str(tmp_path))
    path = native.library_path(CC)
    assert path.parent == tmp_path and not path.exists()
    native._compile(CC, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    lib = ctypes.CDLL(str(path))
    native._declare(lib)
    x = torch.tensor([[0.5, 3.0], [1.5, 0.0]], dtype=torch.float64)
    spikes = torch.empty_like(x)
    leak = (ctypes.c_double * 2)(0.5, 0.5)
    gain = (ctypes.c_double * 2)(1.0, 1.0)
    assert lib.asnn_lif_forward(1, 2, 2, x.data_ptr(), None, leak, gain, 1.0, 0, spikes.data_ptr(), None, 1) == 0
    # h0 = (0.5, 3.0) -> s = (0, 1), v = (0.5, 2.0); h1 = (0.25 + 1.5, 1.0 + 0) -> s = (1, 0):
    # a membrane exactly at the threshold stays silent (u > theta, strictly)
    assert spikes.tolist() == [[0.0, 1.0], [1.0, 0.0]]


@needs_cc
def test_a_failing_compiler_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        native._compile(shutil.which("false") or "false", tmp_path / "lif.so")
    assert list(tmp_path.iterdir()) == []


def test_switched_off_by_environment_and_by_forced(monkeypatch):
    monkeypatch.setenv("ASNN_DIST_NATIVE", "0")
    assert not native.enabled()
    x = torch.randn(3, 8)
    assert not native.supports(x, SigmoidSurrogate())
    with native.forced(False):
        assert not native.enabled()


@needs_cc
@pytest.mark.parametrize("on", [True, False])
def test_fused_kernel_dispatches_to_the_chosen_path(monkeypatch, on):
    calls = []
    real_forward, real_backward = native.forward, native.backward
    monkeypatch.setattr(native, "forward", lambda *a: calls.append("f") or real_forward(*a))
    monkeypatch.setattr(native, "backward", lambda *a: calls.append("b") or real_backward(*a))
    x = torch.randn(4, 2, 3, requires_grad=True)
    with native.forced(on):
        fused_adaptive_lif(x, torch.full((4,), 0.5), 0.5, 1.0, SigmoidSurrogate()).sum().backward()
        # GPU tensors, other dtypes (float16; bfloat16 has kernels) and custom surrogates never reach it
        assert not native.supports(x.detach().to(torch.float16), SigmoidSurrogate())
        assert native.supports(x.detach().to(torch.bfloat16), SigmoidSurrogate()) == on
        assert not native.supports(x.detach(), object())
    assert calls == (["f", "b"] if on else [])


def _run(x: torch.Tensor, threads: int, **kw):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        leak = torch.linspace(0.3, 0.9, x.shape[0], dtype=x.dtype).requires_grad_()
        gain = torch.linspace(1.1, 0.4, x.shape[0], dtype=x.dtype).requires_grad_()
        xr = x.clone().requires_grad_()
        s = fused_adaptive_lif(xr, leak, gain, 1.0, SigmoidSurrogate(), **kw)
        grads = torch.autograd.grad(s, (xr, leak, gain), torch.linspace(-1, 1, x.numel()).view(x.shape).to(x.dtype))
        return s, grads
    finally:
        torch.set_num_threads(previous)


@needs_cc
@pytest.mark.usefixtures("kernel_path")
def test_threads_split_the_work_deterministically():
    x = 1.5 * torch.randn(5, 3 * 1000 + 7, generator=torch.Generator().manual_seed(0))  # many blocks, short tail
    s1, g1 = _run(x, 1)
    s2, g2 = _run(x, 2)
    s2b, g2b = _run(x, 2)
    assert torch.equal(s1, s2) and torch.equal(g1[0], g2[0])  # elementwise: independent of the split
    for a, b in zip(g1[1:], g2[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # sums: split-dependent rounding only
    assert torch.equal(s2, s2b) and all(torch.equal(a, b) for a, b in zip(g2, g2b))  # run to run


@needs_cc
@pytest.mark.parametrize("steps,n", [(1, 1), (40, 3), (3, 513), (2, 0)])
@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_edge_shapes_match_the_step_loop(steps, n, reset):
    x = (1.5 * torch.randn(steps, n, dtype=torch.float64) + 0.5).requires_grad_()
    leak = torch.rand(steps, dtype=torch.float64).requires_grad_()
    gain = (torch.rand(steps, dtype=torch.float64) + 0.5).requires_grad_()
    sur = AtanSurrogate()
    with native.forced(True):
        s = fused_adaptive_lif(x, leak, gain, 1.0, sur, reset)
        got = torch.autograd.grad(s.sum(), (x, leak, gain))
    step = lambda a, v, t: adaptive_lif_step(a, v, leak[t], gain[t], 1.0, sur, reset)  # noqa: E731
    ref = multistep_loop(step, x)[0]
    want = torch.autograd.grad(ref.sum(), (x, leak, gain), allow_unused=True)
    assert torch.equal(s, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=0, atol=1e-9)


def _sigmoid_grad_exact(y: torch.Tensor, alpha: float) -> torch.Tensor:
    e = torch.exp(-(alpha * y).abs())
    return alpha * e / (1 + e) ** 2


@needs_cc
def test_surrogates_of_the_c_kernel_match_torch_over_the_whole_range():
    """The kernel's own exp (branch-free, vectorised) against the float64 formulas, with
    dL/ds = 1, one step and gain 1, so dx is the surrogate at h - thr. The sigmoid reference
    is the cancellation-free alpha e / (1 + e)^2, e = exp(-|alpha y|) (``SigmoidSurrogate.grad``'s
    sig - sig^2 loses digits for y >> 0, so the kernel uses this form too)."""
    y = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([-1e4, -88.0, 88.0, 1e4, 0.0])])
    for dtype, rtol in ((torch.float32, 3e-6), (torch.float64, 1e-13)):
        atan = AtanSurrogate(2.0)
        for sur, ref in ((SigmoidSurrogate(4.0), _sigmoid_grad_exact), (atan, lambda y, a: atan.grad(y))):
            x = (y.to(dtype) + 1.0).requires_grad_()  # thr 1: h - thr = x - 1
            with native.forced(True):
                (g,) = torch.autograd.grad(fused_adaptive_lif(x[None], 0.5, 1.0, 1.0, sur).sum(), x)
            want = ref(x.detach().double() - 1.0, sur.alpha)
            torch.testing.assert_close(g.double(), want, rtol=rtol, atol=1e-30)


@needs_cc
def test_kernels_share_torchs_openmp_runtime():
    """The kernels' parallel regions run on the libgomp torch already loaded (no second
    runtime whose threads would compete with torch's)."""
    import re

    import os

    assert native.load() is not None
    maps = open("/proc/self/maps").read()
    # the soname the kernels ask for; vendored copies with hashed names (scikit-learn's) are others' own
    runtimes = sorted(set(re.findall(r"\S*/libgomp\.so\.1\b", maps)))
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if os.path.exists(os.path.join(torch_lib, "libgomp.so.1")):
        assert runtimes == [os.path.join(torch_lib, "libgomp.so.1")], runtimes
