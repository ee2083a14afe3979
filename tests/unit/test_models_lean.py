"""Memory-lean training: layers that keep spike inputs as uint8 give the same values and
gradients as their torch parents (and as unpacked models), and keep fewer bytes alive."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from asnn_dist.models.lean import SpikeConv2d, SpikeLinear, SpikeMaxPool2d, packing, spike_attention
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
    "attention": (None, lambda: [spikes(2, 3, 5, 4) for _ in range(3)]),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_packed_layers_match_their_torch_parents(kind):
    torch.manual_seed(0)
    make, make_inputs = LAYERS[kind]
    module = make().double() if make else None
    inputs = [x.requires_grad_() for x in make_inputs()]
    fn = module if module is not None else (lambda q, k, v: spike_attention(q, k, v, 0.125))
    ref_out, ref_grads = grads_of(fn, inputs, module)
    with packing(True):
        out, grads = grads_of(fn, inputs, module)
        # the packed path really ran: its backward node is our function, not torch's
        assert type(fn(*inputs).grad_fn).__name__.startswith("_Spike") or kind == "maxpool"
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
        with torch.autocast("cpu", dtype=torch.bfloat16), packing(pack):
            out = module(x)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float().square().sum(), [x, *module.parameters()])
        results.append((out, grads))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-2, atol=1e-2)


def test_packed_linear_keeps_one_byte_per_value():
    lin = SpikeLinear(256, 8)
    s = spikes(1024, 256, dtype=torch.float32, p=0.5)

    def forward(pack: bool):
        def fn():
            with packing(pack):
                return lin(s.clone())  # a fresh input: only what autograd saves stays alive
        return live_bytes_after(fn)

    (kept_plain, y_plain), (kept_lean, y_lean) = forward(False), forward(True)
    assert torch.equal(y_plain, y_lean)
    assert kept_plain - kept_lean >= 3 * s.numel()  # 4 bytes -> 1 byte per value
    with torch.no_grad(), packing(True):  # no graph: the plain torch path
        assert torch.equal(lin(s), y_plain)


@pytest.mark.parametrize("name", ["spikformer_tiny", "sew_resnet_tiny", "spiking_resnet_tiny", "lenet_asnn_tiny"])
def test_packed_models_give_same_values_and_gradients_with_less_memory(name):
    torch.manual_seed(0)
    extra = dict(neuron=dict(init_gain=1.0)) if name.startswith("spikformer") else {}
    plain = create_model(name, num_classes=5, in_channels=1, image_size=16, pack_spikes=False, **extra)
    lean = copy.deepcopy(plain)
    lean.pack_spikes = True
    x, g = torch.rand(6, 1, 16, 16), torch.randn(6, 5)
    kept_plain, out_plain = live_bytes_after(lambda: plain(x))
    kept_lean, out_lean = live_bytes_after(lambda: lean(x))
    assert torch.equal(out_plain, out_lean)
    out_plain.backward(g)
    out_lean.backward(g)
    for (n, a), (_, b) in zip(plain.named_parameters(), lean.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n
    assert kept_lean < 0.85 * kept_plain, (kept_lean, kept_plain)
