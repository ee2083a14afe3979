"""Memory-lean training: layers that keep spike inputs packed (1 bit per value for spikes,
uint8 for spike counts) give the same values and gradients as their torch parents (and as
unpacked models), and keep fewer bytes alive."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from asnn_dist.models.execution import apply_spike_packing
from asnn_dist.models.lean import SpikeAttention, SpikeConv2d, SpikeLinear, SpikeMaxPool2d, pack, unpack
from asnn_dist.registry import create_model


def live_bytes_after(fn) -> tuple[int, object]:
    """Bytes still allocated when fn() returns (what autograd keeps for backward)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return sum(e.nbytes() for e in events), out


def spikes(*shape, dtype=torch.float64, p=0.3) -> torch.Tensor:
    return (torch.rand(*shape) < p).to(dtype)


def grads_of(fn, inputs, module):
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    tensors = [*inputs, *module.parameters()] if module is not None else list(inputs)
    return out, torch.autograd.grad(out, tensors, g)


LAYERS = {
    "linear": (lambda: SpikeLinear(12, 7), lambda: [spikes(3, 5, 12) * 2]),  # spike counts 0..2
    "conv": (lambda: SpikeConv2d(4, 6, 3, stride=2, padding=1),
             lambda: [spikes(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)]),
    "maxpool": (lambda: SpikeMaxPool2d(3, stride=2, padding=1), lambda: [spikes(2, 3, 8, 8, p=0.2)]),
    "attention": (lambda: SpikeAttention(heads=2, scale=0.125), lambda: [spikes(2, 3, 5, 8) for _ in range(3)]),
}


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_packed_layers_match_their_torch_parents(kind):
    torch.manual_seed(0)
    make, make_inputs = LAYERS[kind]
    module = make().double()
    inputs = [x.requires_grad_() for x in make_inputs()]
    module.pack_spikes = False
    ref_out, ref_grads = grads_of(module, inputs, module)
    assert not type(module(*inputs).grad_fn).__name__.startswith("_Spike")
    module.pack_spikes = True
    out, grads = grads_of(module, inputs, module)
    # the packed path really ran: its backward node is our function, not torch's
    assert type(module(*inputs).grad_fn).__name__.startswith("_Spike") or kind == "maxpool"
    assert torch.equal(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_packed_layers_under_bf16_autocast_match_autocast(kind):
    torch.manual_seed(0)
    make, make_inputs = LAYERS[kind]
    module = make()
    x = make_inputs()[0].float().requires_grad_()
    results = []
    for pack in (False, True):
        module.pack_spikes = pack
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float().square().sum(), [x, *module.parameters()])
        results.append((out, grads))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-2, atol=1e-2)


def test_multi_head_attention_matches_per_head_products():
    q, k, v = (spikes(2, 5, 8) for _ in range(3))
    y = SpikeAttention(heads=2, scale=0.125)(q, k, v)
    for h in range(2):
        qh, kh, vh = (t[..., 4 * h : 4 * h + 4] for t in (q, k, v))
        assert torch.allclose(y[..., 4 * h : 4 * h + 4], qh @ (kh.transpose(-2, -1) @ vh) * 0.125)


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_keeps_spikes_as_bits_and_counts_as_bytes(kernel_path, dtype):
    s = spikes(3, 4, 5, 7, dtype=dtype)  # 420 values: a partial last byte
    maps = spikes(2, 3, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    for x in (s, maps, s.transpose(1, 2)):  # contiguous, channels-last, and a strided view
        stored, meta = pack(x)
        flat_ok = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        want = "bits" if kernel_path == "native" and flat_ok else "u8"
        assert meta[0] == want
        if want == "bits":
            assert stored.dtype == torch.uint8 and stored.numel() == -(-x.numel() // 8)
        back = unpack(stored, meta, dtype)
        assert torch.equal(back, x) and back.stride() == x.stride() if flat_ok else torch.equal(back, x)
    stored, meta = pack(s * 3)  # counts 0 or 3: not bits
    assert meta[0] == "u8" and torch.equal(unpack(stored, meta, dtype), s * 3)


def test_packed_linear_keeps_one_bit_per_spike_and_one_byte_per_count():
    lin = SpikeLinear(256, 8)
    for s, saved_per_value in ((spikes(1024, 256, dtype=torch.float32, p=0.5), 1 / 8),
                               (2 * spikes(1024, 256, dtype=torch.float32, p=0.5), 1)):
        def fn(pack: bool, s=s):
            lin.pack_spikes = pack
            return lin(s.clone())  # a fresh input: only what autograd saves stays alive

        (kept_plain, y_plain), (kept_lean, y_lean) = live_bytes_after(lambda: fn(False)), live_bytes_after(lambda: fn(True))
        assert torch.equal(y_plain, y_lean)
        assert kept_plain - kept_lean >= (4 - saved_per_value) * s.numel()
        with torch.no_grad():  # no graph: the plain torch path
            assert torch.equal(lin(s), y_plain)


@pytest.mark.parametrize("name", ["spikformer_tiny", "sew_resnet_tiny", "spiking_resnet_tiny", "lenet_asnn_tiny"])
def test_packed_models_give_same_values_and_gradients_with_less_memory(name):
    torch.manual_seed(0)
    extra = dict(neuron=dict(init_gain=1.0)) if name.startswith("spikformer") else {}
    plain = apply_spike_packing(create_model(name, num_classes=5, in_channels=1, image_size=16, **extra), False)
    lean = apply_spike_packing(copy.deepcopy(plain), True)
    x, g = torch.rand(6, 1, 16, 16), torch.randn(6, 5)
    kept_plain, out_plain = live_bytes_after(lambda: plain(x))
    kept_lean, out_lean = live_bytes_after(lambda: lean(x))
    assert torch.equal(out_plain, out_lean)
    out_plain.backward(g)
    out_lean.backward(g)
    for (n, a), (_, b) in zip(plain.named_parameters(), lean.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n
    assert kept_lean < 0.85 * kept_plain, (kept_lean, kept_plain)


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("pack_spikes", [False, True])
def test_strided_pointwise_conv_takes_its_pixels_first(pack_spikes):
    """A ResNet shortcut (1x1, stride 2) on a channels-last odd batch with few channels: torch
    2.13's CPU gradient for it corrupts the heap (this test then crashes); the layer takes
    every second pixel and convolves with stride 1, equal to the strided conv on NCHW."""
    torch.manual_seed(0)
    conv = SpikeConv2d(4, 8, 1, stride=2, bias=False)
    conv.pack_spikes = pack_spikes
    for _ in range(20):
        x = spikes(3, 4, 16, 16, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        y = conv(x)
        gy = torch.randn(y.shape)
        gx, gw = torch.autograd.grad(y, [x, conv.weight], gy)
        ref_x = x.detach().contiguous().requires_grad_()
        ref = torch.nn.functional.conv2d(ref_x, conv.weight, None, 2)
        ref_gx, ref_gw = torch.autograd.grad(ref, [ref_x, conv.weight], gy)
        assert y.shape == (3, 8, 8, 8) and torch.allclose(y, ref, atol=1e-6)
        assert torch.allclose(gx, ref_gx, atol=1e-6) and torch.allclose(gw, ref_gw, atol=1e-5)
