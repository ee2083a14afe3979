"""Time-step checkpointing computes the same training step as plain execution: loss, every
gradient, BN running statistics and the updated weights agree within 1e-5 relative (float64),
for every family and segment lengths 1, 2 and T; and it keeps less memory alive."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from asnn_dist.models.step_neurons import StepAdaptiveLIF, _WindowSteps
from asnn_dist.models.step_norm import StepBatchNorm
from asnn_dist.models.execution import apply_time_checkpointing, time_checkpointing
from asnn_dist.models.time_checkpoint import binomial_plan
from asnn_dist.models.window_lif import window_adaptive_lif
from asnn_dist.registry import create_model

T = 4
MODELS = ["spikformer_tiny", "sew_resnet_tiny", "lenet_asnn_tiny", "spiking_resnet_tiny"]
HYBRID = dict(num_steps=T, direct_steps=1, scheme="threshold")


def build(name: str, encoding: dict = HYBRID, segment: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = dict(neuron=dict(init_gain=1.0)) if name.startswith("spikformer") else {}
    model = create_model(name, num_classes=5, in_channels=1, image_size=16, encoding=encoding, **extra, **kw)
    return apply_time_checkpointing(model.double(), segment)


def checkpointed(model: torch.nn.Module, segment: int, levels: int = 2, states=None) -> torch.nn.Module:
    """A copy of ``model`` that checkpoints its body every ``segment`` steps."""
    return apply_time_checkpointing(copy.deepcopy(model), segment, levels, states)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One SGD step; returns loss, grads, buffers after the forward and params after the step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return dict(loss=loss.detach(), grads=grads,
                buffers={n: b.clone() for n, b in model.named_buffers()},
                params={n: p.detach().clone() for n, p in model.named_parameters()})


def assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for n in a:
        scale = b[n].abs().max().clamp_min(1e-12)
        err = ((a[n] - b[n]).abs().max() / scale).item()
        assert err < 1e-5, f"{what} {n}: relative error {err:.2e}"


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("segment,levels,states", [(1, 2, None), (1, 1, None), (2, 2, None), (T, 2, None),
                                                  (1, 2, 0), (1, 2, 1), (2, 2, 1)])
def test_checkpointed_training_step_equals_plain(name, segment, levels, states):
    plain = build(name)
    ckpt = checkpointed(plain, segment, levels, states)
    x, y = batch()
    ref, got = train_step(plain, x, y), train_step(ckpt, x, y)
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert_close(got["grads"], ref["grads"], "grad")
    assert_close(got["buffers"], ref["buffers"], "buffer")  # running stats updated once
    assert_close(got["params"], ref["params"], "param")
    assert any((b != 0).any() for n, b in got["buffers"].items() if n.endswith("running_mean"))


def test_plain_lif_neurons_checkpoint_through_the_generic_window():
    """Neurons without a window kernel (SpikingJelly-style LIF) rerun their step function."""
    plain = build("lenet_asnn_tiny", neuron=dict(kind="lif", v_reset=None))
    ckpt = checkpointed(plain, 1)
    x, y = batch()
    ref, got = train_step(plain, x, y), train_step(ckpt, x, y)
    assert_close(got["grads"], ref["grads"], "grad")
    assert_close(got["buffers"], ref["buffers"], "buffer")


def test_uneven_segments_and_late_direct_steps():
    """T=5 with segments of 2 (last one short) and 2 direct steps crossing a boundary."""
    enc = dict(num_steps=5, direct_steps=3, scheme="threshold")
    plain = build("sew_resnet_tiny", encoding=enc)
    ckpt = checkpointed(plain, 2)
    x, y = batch()
    ref, got = train_step(plain, x, y), train_step(ckpt, x, y)
    assert_close(got["grads"], ref["grads"], "grad")
    assert_close(got["buffers"], ref["buffers"], "buffer")


def test_eval_and_no_grad_run_plainly_and_agree():
    model = build("spikformer_tiny", segment=1)
    x, _ = batch(3)
    seen = []
    model.blocks[0].attn.q_lif.register_forward_hook(lambda m, a, o: seen.append(a[1]))
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert [(s.t0, s.membranes) for s in seen] == [(0, None)]  # no grad: one plain multi-step pass
    assert torch.allclose(model(x), out, atol=1e-12)  # grad recorded: checkpointed, same values
    assert len(seen) == 1 + T and [s.t0 for s in seen[1:]] == list(range(T))
    assert all(s.membranes is not None for s in seen[1:])


def test_two_levels_keep_fewer_boundary_states():
    """T=8, k=1: one level keeps 7 boundary states; two (groups of 3 segments) at most 3, so
    the step's peak falls although it recomputes more."""
    from asnn_dist.bench.neurons import peak_bytes

    enc = dict(num_steps=8, direct_steps=1, scheme="threshold")
    torch.manual_seed(0)
    flat = apply_time_checkpointing(create_model("spikformer_tiny", in_channels=1, image_size=16, encoding=enc,
                                                 dim=64), 1, levels=1)
    grouped = checkpointed(flat, 1, levels=2)
    x = torch.rand(16, 1, 16, 16)
    peaks = [peak_bytes(lambda m=m: m(x).sum().backward()) for m in (flat, grouped)]
    assert peaks[1] < 0.8 * peaks[0]
    with pytest.raises(ValueError, match="time_levels"):
        apply_time_checkpointing(flat, 1, levels=3)
    assert time_checkpointing(flat).levels == 1  # a refused schedule leaves the model as it was


def _griewank_cost(units: int, states: int) -> int:
    """Closed form of the fewest recomputed steps with s = states + 1 snapshots (Griewank,
    1992): r = least repetitions with C(s + r, s) >= units, cost r * units - C(s + r, s - 1)."""
    s, r = states + 1, 1
    while math.comb(s + r, s) < units:
        r += 1
    return r * units - math.comb(s + r, s + 1)


def test_binomial_plan_is_griewanks_optimum():
    for units in range(1, 21):
        assert binomial_plan(units, 0)[0] == units * (units - 1) // 2  # from the start every time
        assert binomial_plan(units, units)[0] == max(units - 1, 0)  # every boundary kept
        for states in range(1, 6):
            assert binomial_plan(units, states)[0] == _griewank_cost(units, states), (units, states)


@pytest.mark.parametrize("segment,states", [(1, 0), (1, 1), (1, 2), (2, 1)])
def test_binomial_schedule_recomputes_what_it_plans_and_matches_plain(segment, states):
    """T=8: equal values and gradients, and the last body BN sees T + planned recomputed steps."""
    enc = dict(num_steps=8, direct_steps=1, scheme="threshold")
    plain = build("spikformer_tiny", encoding=enc)
    ckpt = checkpointed(plain, segment, states=states)
    seen = []
    last_bn = [m for m in ckpt.modules() if isinstance(m, StepBatchNorm)][-1]
    last_bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    x, y = batch()
    ref, got = train_step(plain, x, y), train_step(ckpt, x, y)
    assert_close(got["grads"], ref["grads"], "grad")
    assert_close(got["buffers"], ref["buffers"], "buffer")
    assert sum(seen) == 8 + segment * binomial_plan(8 // segment, states)[0]


def test_binomial_schedule_memory_follows_its_state_budget():
    """T=8, k=1: fewer states, lower peak; one state beats two levels' grouping (3 states)."""
    from asnn_dist.bench.neurons import peak_bytes

    enc = dict(num_steps=8, direct_steps=1, scheme="threshold")
    torch.manual_seed(0)
    base = create_model("spikformer_tiny", in_channels=1, image_size=16, encoding=enc, dim=64)
    x = torch.rand(16, 1, 16, 16)

    def peak(states):
        model = checkpointed(base, 1, states=states)
        return peak_bytes(lambda: model(x).sum().backward())

    grouped, s0, s1, s3 = peak(None), peak(0), peak(1), peak(3)
    assert s0 < s1 < s3 and s1 < 0.9 * grouped
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="time_states"):
            apply_time_checkpointing(base, 1, states=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="time_segment"):
            apply_time_checkpointing(base, bad)


def test_window_offsets_reach_every_step():
    """Inside segments of 1, each BN sees absolute step indices 0..T-1 exactly once."""
    model = build("lenet_asnn_tiny", segment=1)
    bn = next(m for m in model.body.modules() if isinstance(m, StepBatchNorm))
    offsets = []
    bn.register_forward_pre_hook(lambda m, a: offsets.append((a[1].t0, a[0].shape[0])))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    assert offsets[:T] == [(t, 1) for t in range(T)]  # the forward; recomputation follows


def test_checkpointing_keeps_less_memory():
    """Peak bytes allocated by one training step: segments of 2 need clearly less at T=8
    (k=1 keeps 7 boundary states, which for this tiny model weigh about as much as the
    activations that BN + neuron sharing already trims from the plain run)."""
    from asnn_dist.bench.neurons import peak_bytes

    enc = dict(num_steps=8, direct_steps=1, scheme="threshold")
    torch.manual_seed(0)
    plain = create_model("spikformer_tiny", in_channels=1, image_size=16, encoding=enc, dim=64)
    ckpt = checkpointed(plain, 2)
    x = torch.rand(16, 1, 16, 16)

    def step(model):
        return lambda: model(x).sum().backward()

    assert peak_bytes(step(ckpt)) < 0.6 * peak_bytes(step(plain))


@pytest.mark.parametrize("reset,detach,adaptive,surrogate", [
    ("soft", False, True, "sigmoid"), ("hard", False, True, "atan"),
    ("soft", True, False, "sigmoid"), ("hard", True, False, "sigmoid"),
])
@pytest.mark.parametrize("with_v0,t0", [(False, 0), (True, 2)])
@pytest.mark.usefixtures("kernel_path")
def test_window_kernel_matches_step_function_reference(reset, detach, adaptive, surrogate, with_v0, t0):
    """The hand-written window kernel against autograd through snn.functional's step."""
    torch.manual_seed(0)
    n = StepAdaptiveLIF(6, reset=reset, detach_reset=detach, adaptive=adaptive, surrogate=surrogate).double()
    with torch.no_grad():
        n.leak.uniform_(0.2, 0.9)
        n.gain.uniform_(0.3, 1.2)
    x = (1.5 * torch.randn(3, 4, 5, dtype=torch.float64)).requires_grad_()
    v0 = torch.randn(4, 5, dtype=torch.float64).requires_grad_() if with_v0 else None
    gs, gv = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    inputs = [x, n.leak, n.gain] + ([v0] if with_v0 else [])
    results = []
    for run in (lambda: _WindowSteps.apply(n, t0, x, v0, n.leak, n.gain),
                lambda: window_adaptive_lif(x, v0, n.leak, n.gain, t0, n.threshold, n.surrogate, reset, detach)):
        s, v = run()
        results.append((s, v, torch.autograd.grad((s * gs).sum() + (v * gv).sum(), inputs)))
    (s_ref, v_ref, g_ref), (s, v, g) = results
    assert torch.equal(s, s_ref) and torch.allclose(v, v_ref, atol=1e-12)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.usefixtures("kernel_path")
def test_window_kernel_from_rest_equals_fused_multistep_kernel():
    n = StepAdaptiveLIF(4).double()
    with torch.no_grad():
        n.leak.uniform_(0.2, 0.9)
    x = (1.5 * torch.randn(4, 3, 7, dtype=torch.float64)).requires_grad_()
    g = torch.randn_like(x)
    plain = n(x)
    (gx_plain,) = torch.autograd.grad(plain, x, g)
    spikes, _ = window_adaptive_lif(x, None, n.leak, n.gain, 0, n.threshold, n.surrogate)
    (gx,) = torch.autograd.grad(spikes, x, g)
    assert torch.equal(spikes, plain)
    assert torch.allclose(gx, gx_plain, atol=1e-12)


@pytest.mark.parametrize("reset,adaptive", [("soft", True), ("hard", False)])
def test_window_torch_ops_read_parameters_on_the_device_bit_for_bit(monkeypatch, reset, adaptive):
    """Off the CPU (a GPU without Triton) the window's torch ops read leak and gain as 0-dim
    device tensors, no host syncs; that form gives the host form's values and gradients exactly."""
    from asnn_dist.snn import fused, native

    torch.manual_seed(0)
    n = StepAdaptiveLIF(5, reset=reset, adaptive=adaptive)
    with torch.no_grad():
        n.leak.uniform_(0.2, 0.9)
        n.gain.uniform_(0.3, 1.2)
    x, v0 = 1.5 * torch.randn(3, 4, 6), torch.randn(4, 6)
    gs, gv = torch.randn(3, 4, 6), torch.randn(4, 6)
    outs = []
    for devices in (fused.HOST_SCALAR_DEVICES, ()):
        monkeypatch.setattr(fused, "HOST_SCALAR_DEVICES", devices)
        xr, vr = x.clone().requires_grad_(), v0.clone().requires_grad_()
        with native.forced(False):
            s, v = window_adaptive_lif(xr, vr, n.leak, n.gain, 1, n.threshold, n.surrogate, reset)
            outs.append((s, v, *torch.autograd.grad((s * gs).sum() + (v * gv).sum(), [xr, vr, n.leak, n.gain])))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
