"""Per-step BatchNorm in one node (C kernel and torch ops) against F.batch_norm step by step,
and the BN -> neuron memory sharing through ``snn.affine_source``."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from asnn_dist.models.step_norm import StepBatchNorm
from asnn_dist.models.temporal import Steps, channels_last_seq
from asnn_dist.snn import affine_source
from asnn_dist.models.step_neurons import StepAdaptiveLIF

F64 = torch.float64


def _reference(bn: StepBatchNorm, x: torch.Tensor, layout: str) -> torch.Tensor:
    """F.batch_norm on every step, channels at dim 1 of each step's [B, C, ...] view."""
    outs = []
    for t in range(x.shape[0]):
        xt = x[t] if layout == "maps" else x[t].reshape(-1, x.shape[-1])
        y = F.batch_norm(xt, bn.running_mean[t], bn.running_var[t], bn.weight, bn.bias, True, bn.momentum, bn.eps)
        outs.append(y if layout == "maps" else y.view(x[t].shape))
    return torch.stack(outs)


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_batched_training_bn_matches_f_batch_norm_per_step(layout):
    torch.manual_seed(0)
    steps, c = 3, 5
    shape = (steps, 4, 6, c) if layout == "tokens" else (steps, 4, c, 3, 3)
    x = (torch.randn(shape, dtype=F64) * torch.linspace(0.5, 3, c).view(*([1] * (len(shape) - 1 if layout == "tokens" else 2)), c, *([] if layout == "tokens" else [1, 1])).to(F64) + 2.0)
    if layout == "maps":
        x = channels_last_seq(x)  # how the models store conv maps
    bn = StepBatchNorm(c, steps, channel_last=layout == "tokens").double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref = StepBatchNorm(c, steps, channel_last=layout == "tokens").double()
    ref.load_state_dict(bn.state_dict())
    g = torch.randn(shape, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = bn(xa)
    yb = _reference(ref, xb, layout)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)
    ga = torch.autograd.grad(ya, (xa, bn.weight, bn.bias), g)
    gb = torch.autograd.grad(yb, (xb, ref.weight, ref.bias), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=1e-14)


@pytest.mark.usefixtures("kernel_path")
def test_recomputation_leaves_running_statistics_alone_and_eval_uses_them():
    bn = StepBatchNorm(4, 2, channel_last=True)
    x = torch.randn(2, 8, 4) * 3 + 1
    bn(x)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    bn(x, Steps(recomputing=True))
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    bn.eval()
    want = (x - stats[0][:, None]) / torch.sqrt(stats[1][:, None] + bn.eps)
    torch.testing.assert_close(bn(x), want, rtol=1e-5, atol=1e-5)


def _saved_storages(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, storages


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_neuron_after_bn_keeps_no_copy_of_its_input_and_same_gradients(layout):
    torch.manual_seed(1)
    steps, c = 4, 6
    if layout == "tokens":
        x = torch.randn(steps, 3, 5, c) * 2 + 1
    else:
        x = channels_last_seq(torch.randn(steps, 3, c, 4, 4) * 2 + 1)
    bn = StepBatchNorm(c, steps, channel_last=layout == "tokens")
    neuron = StepAdaptiveLIF(steps)  # the models' neuron (runs channels-last maps in memory order)
    g = torch.randn(x.shape)
    results = []
    for share in (True, False):
        xi = x.clone().requires_grad_()
        params = [xi, bn.weight, bn.bias, neuron.leak, neuron.gain]

        def run(share=share, xi=xi):
            y = bn(xi)
            return neuron(y if share else y.clone())  # a clone has no registered source

        spikes, storages = _saved_storages(run)
        results.append((spikes, torch.autograd.grad(spikes, params, g), storages))
    (s_share, g_share, st_share), (s_copy, g_copy, st_copy) = results
    assert torch.equal(s_share, s_copy)
    for a, b in zip(g_share, g_copy):
        assert torch.equal(a, b)  # y rebuilt bit for bit: the very same backward
    layer = x.numel() * x.element_size()
    big = lambda st: sum(v for v in st.values() if v >= layer)  # noqa: E731
    assert big(st_share) == layer  # BN's input only
    assert big(st_copy) == 2 * layer  # BN's input and the neuron's own input


@pytest.mark.usefixtures("kernel_path")
def test_hybrid_stem_join_keeps_no_copy_either():
    """The direct and spike steps' BN outputs, joined along time (``cat_steps``), are rebuilt
    from the two BN inputs: the neuron after the stem saves nothing of its own."""
    from asnn_dist.models.common import HybridStem, conv_bn

    torch.manual_seed(2)
    steps = 4
    stem = HybridStem(lambda: conv_bn(1, 8, steps, spike_input=False), 1, steps)
    neuron = StepAdaptiveLIF(steps)
    x = torch.rand(steps, 2, 1, 6, 6)
    g = torch.randn(steps, 2, 8, 6, 6)
    results = []
    for share in (True, False):
        params = [p for m in (stem, neuron) for p in m.parameters()]

        def run(share=share):
            y = stem(x)
            return neuron(y if share else y.clone(memory_format=torch.preserve_format))

        spikes, storages = _saved_storages(run)
        results.append((spikes, torch.autograd.grad(spikes, params, g), storages))
    (s1, g1, st1), (s2, g2, st2) = results
    assert torch.equal(s1, s2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    layer = g.numel() * 4
    assert sum(v for v in st2.values() if v >= layer) - sum(v for v in st1.values() if v >= layer) == layer


def test_lookup_refuses_modified_other_shape_and_other_thread():
    x = torch.randn(2, 3, 4)
    y = x * 2.0
    src = affine_source.affine(x, torch.full((2, 4), 2.0), torch.zeros(2, 4),
                               lambda a, s, b: torch.addcmul(b.unsqueeze(1), a, s.unsqueeze(1)))
    affine_source.register(y, src)
    assert affine_source.lookup(y) is src and affine_source.lookup(y.view(6, 4)) is src
    assert affine_source.lookup(y[:1]) is None  # fewer elements
    assert affine_source.lookup(y.transpose(1, 2)) is None  # not contiguous
    seen = []
    worker = threading.Thread(target=lambda: seen.append(affine_source.lookup(y)))
    worker.start()
    worker.join()
    assert seen == [None]
    y.add_(1.0)  # written after registration: no longer x * scale + shift
    assert affine_source.lookup(y) is None
    z = x * 3.0
    affine_source.register(z, src)
    key = z.data_ptr()
    del z  # the entry dies with the tensor
    assert key not in affine_source._entries()
