"""The C kernels on bfloat16 tensors (``snn/native/bf16.h``): each reads bf16 into float,
computes exactly what its float32 version computes on the same values, and rounds each output
once. So the bf16 results must equal the float32 kernel's results rounded to bf16, bit for bit
(BatchNorm's double sums too; the neuron's per-block float sums to 1e-5); membranes stay
float32."""

from __future__ import annotations

import shutil

import pytest
import torch

from asnn_dist.snn import native
from asnn_dist.snn.surrogate import AtanSurrogate, SigmoidSurrogate

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler")


@pytest.fixture(autouse=True)
def kernels():
    assert native.load() is not None, "a C compiler exists but the C kernels did not build"
    with native.forced(True):
        yield


def test_bf16_store_rounds_to_nearest_even_like_torch():
    """Ties, subnormals, infinities and NaN through the bits round trip (unpack writes 0/1 only),
    and the BN apply with scale 1, shift 0 (which stores x * 1 + 0 rounded)."""
    vals = torch.tensor([1.0, 1.00390625, 1.01171875, -2.5e-39, 3.4e38, float("inf"), -float("inf"), 0.1, -7.77])
    x = torch.cat([vals, torch.randn(4000) * 100]).reshape(1, -1, 1)
    ones, zeros = torch.ones(1, 1), torch.zeros(1, 1)
    got = native.bn_apply(x.to(BF16), ones, zeros)
    assert torch.equal(got, x.to(BF16))  # bf16 in, exact through float, stored back unchanged
    ramp = (torch.arange(-3000, 3000, dtype=torch.float32) * 1.3e-3).reshape(1, -1, 1)
    y = native.bn_apply(ramp.to(BF16), torch.full((1, 1), 1.7), torch.full((1, 1), 0.3))
    ref = native.bn_apply(ramp.to(BF16).float(), torch.full((1, 1), 1.7), torch.full((1, 1), 0.3))
    assert torch.equal(y, ref.to(BF16))  # float result rounded like torch's .to(bfloat16)
    nan = native.bn_apply(torch.full((1, 4, 1), float("nan")).to(BF16), ones, zeros)
    assert torch.isnan(nan.float()).all()


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("surrogate", [SigmoidSurrogate(), AtanSurrogate(alpha=2.0)])
@pytest.mark.parametrize("window", [False, True])
def test_lif_bf16_equals_float32_rounded(hard, detach, surrogate, window):
    torch.manual_seed(0)
    steps, n = 4, 3001  # not a multiple of the block size
    x = (torch.randn(steps, n) * 1.5 + 0.8).to(BF16)
    leak, gain = [0.5, 0.75, 0.6, 0.9], [0.5, 1.25, 0.8, 1.0]
    v0 = (torch.randn(n) * 0.5) if window else None  # carried membranes are float32
    gout = torch.randn(steps, n).to(BF16)
    g_last = torch.randn(n) if window else None
    out = {}
    for dtype in (BF16, torch.float32):
        xd, gd = x.to(dtype), gout.to(dtype)
        spikes = torch.empty_like(xd)
        v_last = torch.empty(n) if window else None
        native.forward(xd, v0, leak, gain, 1.0, hard, spikes, v_last)
        gx, gv0 = torch.empty_like(xd), (torch.empty(n) if window else None)
        acc = native.backward(xd, v0, gd, g_last, leak, gain, 1.0, hard, detach, surrogate, gx, gv0, True)
        out[dtype] = (spikes, v_last, gx, gv0, acc)
    (s16, v16, gx16, gv16, acc16), (s32, v32, gx32, gv32, acc32) = out[BF16], out[torch.float32]
    assert s16.dtype == BF16 and torch.equal(s16, s32.to(BF16))
    assert torch.equal(gx16, gx32.to(BF16))
    # parameter sums: float products of the same values, summed per block in float (the
    # vectorised reduction may group lanes differently), then in double
    assert acc16 == pytest.approx(acc32, rel=1e-5, abs=1e-4)
    if window:
        assert v16.dtype == torch.float32 and torch.equal(v16, v32) and torch.equal(gv16, gv32)
    assert 0 < float(s32.mean()) < 1  # the test exercises firing and silence


def test_batchnorm_bf16_equals_float32_on_the_same_values():
    torch.manual_seed(0)
    x = (torch.randn(3, 257, 24) * 2 + 1).to(BF16)
    mean16, var16 = native.bn_stats(x)
    mean32, var32 = native.bn_stats(x.float())
    assert torch.equal(mean16, mean32) and torch.equal(var16, var32)  # double sums of the same values
    invstd = (var32 + 1e-5).rsqrt()
    scale = (torch.linspace(0.5, 2, 24).double() * invstd).float()
    shift = (torch.linspace(-1, 1, 24).double() - mean32 * scale.double()).float()
    y16 = native.bn_apply(x, scale, shift)
    assert y16.dtype == BF16 and torch.equal(y16, native.bn_apply(x.float(), scale, shift).to(BF16))
    gy = torch.randn(3, 257, 24).to(BF16)
    gx16, sum16, dot16 = native.bn_backward(x, gy, mean32, invstd, scale, True)
    gx32, sum32, dot32 = native.bn_backward(x.float(), gy.float(), mean32, invstd, scale, True)
    assert torch.equal(sum16, sum32) and torch.equal(dot16, dot32)
    assert torch.equal(gx16, gx32.to(BF16))


def test_bits_of_bf16_spikes():
    torch.manual_seed(0)
    spikes = (torch.rand(1003) < 0.3).to(BF16)
    bits = native.pack_bits(spikes)
    assert bits is not None and torch.equal(bits, native.pack_bits(spikes.float()))
    out = torch.empty(1003, dtype=BF16)
    assert torch.equal(native.unpack_bits(bits, out), spikes)
    assert native.pack_bits(spikes * 2) is None  # a 2 is not a spike: the caller keeps uint8
