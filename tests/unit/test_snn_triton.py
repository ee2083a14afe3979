"""The rule that picks a kernel per device (C on CPU, Triton on CUDA, torch ops elsewhere), the
spike registry 1-bit storage relies on, and the Triton kernels themselves on CPU tensors.

The Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1), which must be set
before the first ``import triton`` in a process (DeepSpeed imports it early in a test
session): ``test_triton_kernels_under_the_interpreter`` runs ``triton_interpreter_cases.py``
(parity of values and all gradients with the loop of step functions, float32; bit format;
a tiny model on the Triton route) in a child pytest with the variable set. The same kernels
on a GPU: tests/gpu.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asnn_dist.snn import backends, native, spike_registry
from asnn_dist.snn.backends import select_backend
from asnn_dist.snn.fused import fused_adaptive_lif
from asnn_dist.snn.surrogate import AtanSurrogate, SigmoidSurrogate

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton, Linux)")
CASES = Path(__file__).with_name("triton_interpreter_cases.py")


# --- the dispatch rule (no GPU, no Triton needed) --------------------------------------------


def test_select_backend_one_kernel_per_device():
    f32, bf16 = torch.float32, torch.bfloat16
    assert select_backend("cpu", f32, triton_available=True, native_available=True) == "c"
    assert select_backend("cpu", torch.float64, False, True) == "c"
    assert select_backend("cpu", bf16, True, True) == "c"  # the C kernels take float32/float64/bfloat16
    assert select_backend("cpu", torch.float16, True, True) == "torch"
    assert select_backend("cpu", f32, True, native_available=False) == "torch"  # no compiler / switched off
    for dtype in (torch.float16, bf16, f32, torch.float64):
        assert select_backend("cuda", dtype, triton_available=True) == "triton"
    assert select_backend("cuda", f32, triton_available=False) == "torch"
    assert select_backend("cuda", torch.int32, True) == "torch"
    assert select_backend("cuda", f32, True, steps=32) == "triton"
    assert select_backend("cuda", f32, True, steps=33) == "torch"  # beyond the register tiles
    assert select_backend("cuda", f32, True, surrogate_known=False) == "torch"
    assert select_backend("cpu", f32, True, True, surrogate_known=False) == "torch"
    assert select_backend("mps", f32, True, True) == "torch"


def test_cpu_tensors_take_the_c_kernel_or_torch_ops():
    x = torch.randn(4, 10)
    with native.forced(True):
        want = "c" if native.load() is not None else "torch"
        assert backends.lif_backend(x, SigmoidSurrogate()) == want
        assert backends.lif_backend(x, object()) == "torch"
        assert backends.lif_backend(x.bfloat16(), AtanSurrogate()) == want  # bf16 has its own C kernel
        assert backends.lif_backend(x.half(), AtanSurrogate()) == "torch"  # fp16 has none on CPU
    with native.forced(False):
        assert backends.lif_backend(x, SigmoidSurrogate()) == "torch"
        assert backends.bits_backend(x) == "torch"


@needs_triton
def test_cuda_route_picks_triton_unless_switched_off(monkeypatch):
    x = torch.randn(4, 10)
    with backends.pretend_device("cuda"):
        assert backends.lif_backend(x, SigmoidSurrogate()) == "triton"
        assert backends.lif_backend(torch.randn(33, 2), SigmoidSurrogate()) == "torch"
        assert backends.bits_backend(x.half()) == "triton"
        with backends.forced_triton(False):
            assert backends.lif_backend(x, SigmoidSurrogate()) == "torch"
        monkeypatch.setenv("ASNN_DIST_TRITON", "0")
        assert backends.lif_backend(x, SigmoidSurrogate()) == "torch"


# --- spike registry ------------------------------------------------------------------------


def test_fused_neuron_output_is_marked_as_spikes_until_written():
    x = 1.5 * torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(0))
    with native.forced(False):  # any backend marks its output
        s = fused_adaptive_lif(x, torch.full((3,), 0.5), 0.5, 1.0, SigmoidSurrogate())
    assert spike_registry.is_spikes(s) and spike_registry.is_spikes(s.flatten(0, 1))
    assert not spike_registry.is_spikes(s[1]) and not spike_registry.is_spikes(s.transpose(2, 3))
    assert not spike_registry.is_spikes(s.clone()) and not spike_registry.is_spikes(x)
    s.add_(1)
    assert not spike_registry.is_spikes(s)


# --- the kernels, interpreted, in a child process -------------------------------------------


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already the child")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=CASES.parents[2])
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and " passed" in summary and "skipped" not in summary, \
        f"child pytest failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"


def test_model_neurons_keep_the_mark_through_their_dtype_cast():
    """Model neurons integrate bf16 input in fp32 and cast the spikes back: still marked."""
    from asnn_dist.models.step_neurons import windowed_class
    from asnn_dist.snn.neurons import AdaptiveLIF

    neuron = windowed_class(AdaptiveLIF)(4)
    s = neuron((2 * torch.randn(4, 3, 10)).bfloat16())
    assert s.dtype == torch.bfloat16 and spike_registry.is_spikes(s)


@needs_triton
def test_triton_kernels_compile_for_sm90_without_spills():
    """What the interpreter cannot check: the kernels type-check and compile for an H100/H200
    (sm_90) here, without a GPU, keep every value in registers (no local memory), and leave the
    forward's multiply-adds unfused (the step loop's rounding)."""
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no offline compile API: {err}")
    triton_lif = backends.triton_lif()
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

    def build(fn, types: dict, consts: dict):
        sig = {name: types.get(name, "*fp32") for name in fn.arg_names if name not in consts}
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": triton_lif.NUM_WARPS, "enable_fp_fusion": False})
        if cuobjdump.exists():
            cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"asnn-{fn.__name__}-{os.getpid()}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True).stdout
            cubin.unlink()
            assert "LOCAL:0" in usage, usage
        return kernel.asm["ptx"]

    scalars = {"thr_val": "fp32", "alpha": "fp32", "n": "i32", "steps": "i32", "leak_stride": "i32",
               "gain_stride": "i32"}
    for window in (False, True):  # a time window: entry membrane in, last membrane out
        ptx = build(triton_lif._lif_forward, scalars, dict(HARD=False, THR_PTR=False, HAS_V0=window, STORE_V=window,
                                                           ACC=tl.float32, BLOCK=1024))
        assert "fma.rn.f32" not in ptx
    bf16 = dict(scalars, x_ptr="*bf16", go_ptr="*bf16", gx_ptr="*bf16")
    for types, consts, window in ((scalars, dict(HARD=False, DETACH=False, SUR=0, THR_PTR=False), False),
                                  (bf16, dict(HARD=True, DETACH=True, SUR=1, THR_PTR=True), False),
                                  (bf16, dict(HARD=False, DETACH=False, SUR=0, THR_PTR=False), True)):
        build(triton_lif._lif_backward, types, dict(consts, STORE_GX=True, HAS_V0=window, HAS_GLAST=window,
                                                     STORE_GV0=window, ACC=tl.float32, T_PAD=8,
                                                     BLOCK=triton_lif.backward_block(8)))
    triton_bits = backends.triton_bits()
    build(triton_bits._pack, {"x_ptr": "*bf16", "bits_ptr": "*u8", "flag_ptr": "*i32", "n": "i32"}, dict(BLOCK=512))
    build(triton_bits._unpack, {"bits_ptr": "*u8", "y_ptr": "*fp32", "n": "i32"}, dict(BLOCK=512))
