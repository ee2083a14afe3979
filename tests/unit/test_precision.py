"""The precision policy of ``snn.precision`` on CPU: what a bf16 engine (bf16 parameters, fp32
buffers, fp32 inputs) computes in which dtype. Models get their parameters cast exactly as
DeepSpeed's bf16 engine casts them (``cast_params``); one test builds the real engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asnn_dist.models.step_norm import StepBatchNorm
from asnn_dist.models.temporal import channels_last_seq
from asnn_dist.models.execution import apply_time_checkpointing
from asnn_dist.registry import MODELS, create_model
from asnn_dist.snn.encoders import ThresholdEncoder, build_encoder
from asnn_dist.snn.precision import cast_params, compute_dtype

BF16 = torch.bfloat16
TINY = sorted(MODELS.names(tag="tiny"))


def _kwargs(name: str) -> dict:
    kw = dict(num_classes=5, in_channels=1, image_size=16)
    if name.startswith("spikformer"):
        kw["neuron"] = dict(init_gain=1.0)  # every path carries gradient at init (test_models.py)
    return kw


def test_buffers_stay_fp32_under_a_low_precision_cast_but_follow_float64():
    """Running statistics and encoder thresholds never drop to bf16 (``Fp32Buffers``), while
    a float64 cast (gradcheck-style tests) still reaches them."""
    model = create_model("lenet_asnn_tiny", **_kwargs("lenet_asnn_tiny"))
    model.bfloat16()
    assert {p.dtype for p in model.parameters()} == {BF16}
    bns = [m for m in model.modules() if isinstance(m, StepBatchNorm)]
    assert bns and all(m.running_mean.dtype == m.running_var.dtype == torch.float32 for m in bns)
    assert model.encoder.temporal.thresholds.dtype == torch.float64
    model.double()
    assert all(m.running_var.dtype == torch.float64 for m in bns)


def test_encoder_thresholds_compare_in_fp32_or_better():
    """A value just above a threshold that bf16 cannot represent (1/3 with L=3) fires at the same
    step whatever cast the model got: thresholds stay float64 and the images stay fp32."""
    enc = ThresholdEncoder(3)  # thresholds 2/3, 1/3, 0
    x = torch.tensor([[1 / 3 + 1e-6, 1 / 3 - 1e-6, 2 / 3 + 1e-6]], dtype=torch.float32)
    ref = enc(x)
    enc.bfloat16()
    assert torch.equal(enc(x), ref)
    assert ref[1, 0, 0] == 1 and ref[2, 0, 1] == 1 and ref[0, 0, 2] == 1  # fired at 1/3, at 0, at 2/3
    # a naive bf16 comparison would move them: bf16(1/3 - 1e-6) == bf16(1/3) reaches 1/3
    assert x.to(BF16)[0, 1] >= torch.tensor(1 / 3).to(BF16)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("segment", [0, 2])
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_half_parameters_train_with_the_policy(name, segment, dtype):
    """bf16 (CPU and GPU engines) or fp16 (GPU engines; the dtype plumbing checked on CPU)
    parameters, fp32 images: forward and backward run without any input cast by the caller;
    logits (head and readout) are fp32; every parameter gets a finite gradient of its dtype;
    the running statistics stay fp32 and move."""
    torch.manual_seed(0)
    model = cast_params(apply_time_checkpointing(create_model(name, **_kwargs(name)), segment), dtype)
    assert compute_dtype(model) == dtype
    x = torch.rand(4, 1, 16, 16)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")}
    logits = model(x)
    assert logits.dtype == torch.float32
    F.cross_entropy(logits, torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.dtype == dtype and p.grad is not None and p.grad.dtype == dtype, pname
        assert torch.isfinite(p.grad.float()).all(), pname
    for n, b in model.named_buffers():
        if n.endswith(("running_mean", "running_var")):
            assert b.dtype == torch.float32, n
    assert any(not torch.equal(b, dict(model.named_buffers())[n]) for n, b in before.items())


def test_bf16_model_tracks_the_fp32_model():
    """Same weights, fp32 vs bf16 parameters: the encoded input is identical and the logits
    agree to bf16 accuracy (spikes flip only where a membrane sits within rounding of 1)."""
    torch.manual_seed(0)
    ref = create_model("lenet_asnn_tiny", **_kwargs("lenet_asnn_tiny")).eval()
    low = create_model("lenet_asnn_tiny", **_kwargs("lenet_asnn_tiny")).eval()
    low.load_state_dict(ref.state_dict())
    cast_params(low, BF16)
    x = torch.rand(8, 1, 16, 16)
    assert torch.equal(low.encoder(x), ref.encoder(x))
    with torch.no_grad():
        a, b = ref(x), low(x)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() <= 0.1 * a.abs().max()


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_bf16_batchnorm_reduces_in_fp32_and_rounds_once(layout):
    """Training BN on bf16 x with bf16 affine parameters: statistics from fp32 sums, y equals
    the fp32 normalisation of the same values rounded once to bf16, running statistics fp32;
    gradients match the fp32 computation to bf16 accuracy."""
    torch.manual_seed(0)
    steps, c = 3, 6
    shape = (steps, 8, 5, c) if layout == "tokens" else (steps, 8, c, 4, 4)
    x32 = torch.randn(shape) * 3 + 2
    if layout == "maps":
        x32 = channels_last_seq(x32)
    x = x32.to(BF16).requires_grad_()
    xr = x.detach().float().requires_grad_()  # the same (bf16-representable) values in fp32
    bn = StepBatchNorm(c, steps, channel_last=layout == "tokens")
    ref = StepBatchNorm(c, steps, channel_last=layout == "tokens")
    with torch.no_grad():
        for m in (bn, ref):
            m.weight.copy_(torch.linspace(0.5, 2, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    cast_params(bn, BF16)
    ref.weight.data = ref.weight.data.to(BF16).float()  # same values
    ref.bias.data = ref.bias.data.to(BF16).float()
    y, yr = bn(x), ref(xr)
    assert y.dtype == BF16 and bn.running_var.dtype == torch.float32
    assert torch.equal(y, yr.to(BF16)) or (y.float() - yr).abs().max() <= 2 ** -7 * yr.abs().max()
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    g = torch.randn(shape).to(BF16)
    (y.float() * g.float()).sum().backward()
    (yr * g.float()).sum().backward()
    assert x.grad.dtype == BF16 and bn.weight.grad.dtype == BF16
    for got, want in ((x.grad, xr.grad), (bn.weight.grad, ref.weight.grad), (bn.bias.grad, ref.bias.grad)):
        assert (got.float() - want).abs().max() <= 2 ** -6 * want.abs().max()


def test_rate_code_draws_in_fp32_for_bf16_images():
    enc = build_encoder("rate", 4)
    spikes = enc(torch.full((2, 3), 0.5).to(BF16))
    assert spikes.dtype == BF16 and set(spikes.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_bf16_batchnorm_inference_folds_running_statistics(layout):
    """Eval on bf16 x without autograd: one fused pass with fp32 scale/shift from the running
    statistics, equal to F.batch_norm's fp32 normalisation rounded once (within a bf16 unit)."""
    torch.manual_seed(0)
    steps, c = 2, 6
    shape = (steps, 4, 5, c) if layout == "tokens" else (steps, 4, c, 3, 3)
    x = torch.randn(shape) * 2 + 1
    if layout == "maps":
        x = channels_last_seq(x)
    bn = StepBatchNorm(c, steps, channel_last=layout == "tokens")
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(steps, c))
        bn.running_var.copy_(torch.rand(steps, c) + 0.5)
        bn.weight.copy_(torch.linspace(0.5, 2, c))
    cast_params(bn, BF16).eval()
    xb = x.to(BF16)
    with torch.no_grad():
        y = bn(xb)
        bn.float()
        ref = bn(xb.float())  # fp32 per-step F.batch_norm on the same values
    assert y.dtype == BF16 and y.shape == x.shape
    assert (y.float() - ref).abs().max() <= 2 ** -8 * ref.abs().max()
