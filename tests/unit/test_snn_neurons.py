"""Neuron modules: registry, validation, state lifecycle, backends, single vs multi-step."""

from __future__ import annotations

import pytest
import torch

import asnn_dist.snn  # noqa: F401  (fills the registries)
from asnn_dist.registry import NEURONS, RegistryError
from asnn_dist.snn.neurons import LIF, AdaptiveLIF, reset_states

F64 = torch.float64


def _input(steps: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, 3, 5, generator=g, dtype=F64) * 1.5 + 0.8


def _randomise(neuron: AdaptiveLIF, seed: int = 1) -> AdaptiveLIF:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        neuron.leak.copy_(torch.rand(neuron.leak.shape, generator=g) * 0.8 + 0.2)
        neuron.gain.copy_(torch.rand(neuron.gain.shape, generator=g) + 0.3)
    return neuron


def test_registry_lookup_and_unknown_name() -> None:
    n = NEURONS.create("adaptive_lif", num_steps=4)
    assert isinstance(n, AdaptiveLIF)
    assert n.leak.shape == (4,) and n.gain.shape == (4,)
    assert torch.all(n.leak == 0.5) and torch.all(n.gain == 0.5)
    shared = NEURONS.create("adaptive_lif", num_steps=4, adaptive=False)
    assert shared.leak.shape == (1,) and shared.gain.shape == (1,)
    assert isinstance(NEURONS.create("lif"), LIF)
    with pytest.raises(RegistryError, match="registered: adaptive_lif, lif"):
        NEURONS.create("adaptive_lfi", num_steps=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=4, threshold=0.0), "threshold"),
        (dict(num_steps=4, threshold=-1.0), "threshold"),
        (dict(num_steps=4, reset="partial"), r"reset must be one of \['soft', 'hard'\]"),
        (dict(num_steps=4, backend="cuda"), r"backend must be one of \['fused', 'loop'\]"),
        (dict(num_steps=4, surrogate="relu"), r"surrogate must be one of \['atan', 'sigmoid'\]"),
        (dict(num_steps=4, alpha=-1.0), "alpha"),
        (dict(num_steps=4, adaptive="shared"), r"adaptive must be one of \[True, False, 'fixed_readout'\]"),
    ],
)
def test_adaptive_lif_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveLIF(**kwargs)


def test_lif_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tau"):
        LIF(tau=0.5)
    with pytest.raises(ValueError, match="threshold"):
        LIF(threshold=0.0)
    with pytest.raises(ValueError, match="v_reset"):
        LIF(threshold=0.5, v_reset=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        LIF(num_steps=0)


def test_forward_checks_time_steps() -> None:
    n = AdaptiveLIF(4)
    with pytest.raises(ValueError, match="num_steps=4"):
        n(torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match=r"\[T, B, \.\.\.\]"):
        n(torch.zeros(4))
    with pytest.raises(ValueError, match="num_steps=2"):
        LIF(num_steps=2)(torch.zeros(3, 2))
    assert LIF()(torch.zeros(7, 2)).shape == (7, 2)  # no num_steps: any T


@pytest.mark.parametrize("backend", ["fused", "loop"])
def test_state_is_reset_by_every_forward(backend: str) -> None:
    x = _input()
    for n in (_randomise(AdaptiveLIF(4, backend=backend).double()), LIF(backend=backend)):
        first = n(x)
        n.step(x[0])  # leftover single-step state must not leak into the next forward
        second = n(x)
        assert torch.equal(first, second)
        assert 0 < first.sum() < first.numel()


@pytest.mark.parametrize("backend", ["fused", "loop"])
@pytest.mark.parametrize("reset,adaptive", [("soft", True), ("hard", True), ("soft", False)])
def test_single_step_matches_multi_step_values_and_gradients(
    backend: str, reset: str, adaptive: bool
) -> None:
    steps = 5
    n = _randomise(AdaptiveLIF(steps, reset=reset, adaptive=adaptive, backend=backend).double())
    x = _input(steps).requires_grad_()
    gout = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    params = [x, n.leak, n.gain]

    multi = n(x)
    g_multi = torch.autograd.grad(multi, params, gout)

    n.reset_state()
    single = torch.stack([n.step(x[t]) for t in range(steps)])
    g_single = torch.autograd.grad(single, params, gout)

    torch.testing.assert_close(single, multi, rtol=0, atol=0)
    for a, b in zip(g_single, g_multi):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in g_multi)  # every parameter receives a gradient


def test_stepping_past_num_steps_raises_and_reset_restarts() -> None:
    n = _randomise(AdaptiveLIF(2).double())
    x = _input(2)
    first = [n.step(x[0]), n.step(x[1])]
    with pytest.raises(RuntimeError, match="reset_state"):
        n.step(x[0])
    reset_states(torch.nn.Sequential(n))
    again = [n.step(x[0]), n.step(x[1])]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_lif_single_step_matches_multi_step() -> None:
    x = _input(6)
    for kw in (dict(), dict(v_reset=None), dict(decay_input=False, v_reset=-0.2)):
        n = LIF(tau=2.0, detach_reset=True, **kw)
        multi = n(x)
        n.reset_state()
        single = torch.stack([n.step(x[t]) for t in range(6)])
        torch.testing.assert_close(single, multi, rtol=0, atol=0)


def test_backends_agree_for_lif_and_adaptive() -> None:
    x = _input(6).requires_grad_()
    cases = (dict(), dict(v_reset=None, threshold=0.5), dict(decay_input=False, detach_reset=True))
    for kw in cases:
        outs = []
        for backend in ("fused", "loop"):
            s = LIF(backend=backend, **kw)(x)
            outs.append((s, *torch.autograd.grad(s.sum(), x)))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adaptive_with_tau2_equals_lif_with_decay_input() -> None:
    """Method section 1: leak = 1 - 1/tau, gain = 1/tau, tau 2 -> 0.5/0.5 is a plain LIF."""
    x = _input(5)
    a = AdaptiveLIF(5, reset="hard").double()(x)
    b = LIF(tau=2.0, v_reset=0.0)(x)
    assert torch.equal(a, b)


def test_record_flag_stores_counts_only_when_on() -> None:
    n = AdaptiveLIF(4).double()
    x = _input(4)
    s = n(x)
    assert n.record is False and n.last_spike_counts is None
    n.record = True
    s = n(x)
    assert n.last_spike_counts.shape == (4,)
    assert n.last_spike_counts.tolist() == s.sum(dim=(1, 2)).tolist()
    assert n.last_numel_per_step == 15
    assert not n.last_spike_counts.requires_grad


def test_float32_module_and_repr() -> None:
    n = AdaptiveLIF(4, threshold=0.5, surrogate="atan", alpha=3.0)
    out = n(torch.randn(4, 2, 3))
    assert out.dtype == torch.float32 and set(out.unique().tolist()) <= {0.0, 1.0}
    assert "threshold=0.5" in repr(n) and "alpha=3.0" in repr(n)
