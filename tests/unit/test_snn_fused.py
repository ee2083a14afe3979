"""Surrogates, step functions and the fused kernel against the loop of step functions."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import asnn_dist.snn.fused as fused
from asnn_dist.snn import native
from asnn_dist.registry import SURROGATES
from asnn_dist.snn.functional import adaptive_lif_step, lif_step, multistep_loop
from asnn_dist.snn.fused import fused_adaptive_lif, fused_lif
from asnn_dist.snn.surrogate import heaviside

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-6)


# --- surrogates ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sigmoid", "atan"])
def test_surrogate_gradcheck_against_smooth_function(name: str) -> None:
    """f = spike + (smooth - spike).detach() has the value of the smooth function but the
    spike's backward, so gradcheck compares the surrogate with the numeric derivative."""
    sur = SURROGATES.create(name)
    x = torch.linspace(-1.5, 1.5, 31, dtype=F64, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        s = sur(x)
        return s + (sur.smooth(x) - s).detach()

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "name,alpha", [("sigmoid", 4.0), ("sigmoid", 1.5), ("atan", 2.0), ("atan", 3.0)]
)
def test_surrogate_backward_is_grad_out_times_derivative(name: str, alpha: float) -> None:
    sur = SURROGATES.create(name, alpha=alpha)
    x = torch.randn(50, dtype=F64, requires_grad=True)
    g = torch.randn(50, dtype=F64)
    (got,) = torch.autograd.grad(sur(x), x, g)
    (want,) = torch.autograd.grad(sur.smooth(x), x, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sur.grad(x.detach()), want / g, rtol=1e-10, atol=1e-14)
    k, scale, finish_ = sur.kernel_form()
    torch.testing.assert_close(scale * finish_(k * x.detach()), sur.grad(x.detach()))


def test_surrogate_values_and_formulas() -> None:
    x = torch.tensor([-1.0, -1e-12, 0.0, 1e-12, 2.0], dtype=F64)
    for name in ("sigmoid", "atan"):
        assert SURROGATES.create(name)(x).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # H(0) = 0: strict
    # sigmoid: alpha * sig(0) * (1 - sig(0)) = alpha / 4; atan: alpha / 2 at 0
    assert SURROGATES.create("sigmoid").grad(torch.zeros(1, dtype=F64)).item() == 1.0
    assert SURROGATES.create("atan", alpha=3.0).grad(torch.zeros(1, dtype=F64)).item() == 1.5
    s1 = SURROGATES.create("sigmoid", alpha=2.0).grad(torch.ones(1, dtype=F64)).item()
    sig = torch.sigmoid(torch.tensor(2.0, dtype=F64)).item()
    assert s1 == pytest.approx(2 * sig * (1 - sig), rel=1e-12)


def test_surrogates_are_immutable_and_validated() -> None:
    sur = SURROGATES.create("sigmoid")
    assert sur.alpha == 4.0 and SURROGATES.create("atan").alpha == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        sur.alpha = 1.0  # type: ignore[misc]
    assert SURROGATES.create("sigmoid") == sur  # value objects, nothing shared to mutate
    with pytest.raises(ValueError, match="alpha"):
        SURROGATES.create("atan", alpha=0.0)


# --- step functions ------------------------------------------------------------------------


def test_adaptive_step_hand_computed() -> None:
    xs = torch.tensor([[1.5], [0.5], [2.5]], dtype=F64)
    for reset, v_end in (("soft", 0.5625), ("hard", 0.0)):
        def step(x, v, t, reset=reset):
            return adaptive_lif_step(x, v, 0.5, 0.5, 1.0, heaviside, reset)

        spikes, v = multistep_loop(step, xs)
        assert spikes.flatten().tolist() == [0.0, 0.0, 1.0]  # u = 0.75, 0.625, 1.5625
        assert v.item() == pytest.approx(v_end)


def test_lif_step_spikingjelly_semantics_hand_computed() -> None:
    xs = torch.tensor([[1.5], [0.5], [2.5]], dtype=F64)

    def run(**kw):
        return multistep_loop(lambda x, v, t: lif_step(x, v, 2.0, 1.0, heaviside, **kw), xs)

    s, v = run()  # decay_input, hard reset to 0: h = 0.75, 0.625, 1.5625 (= adaptive 0.5/0.5)
    assert s.flatten().tolist() == [0.0, 0.0, 1.0] and v.item() == 0.0
    s, v = run(decay_input=False)  # h = 1.5 (fire, v=0), 0.5, 0.5 - 0.25 + 2.5 = 2.75 (fire)
    assert s.flatten().tolist() == [1.0, 0.0, 1.0] and v.item() == 0.0
    s, v = run(v_reset=None)  # soft: v = 1.5625 - 1
    assert s.flatten().tolist() == [0.0, 0.0, 1.0] and v.item() == pytest.approx(0.5625)
    s, v = run(v_reset=-0.5)  # rests at -0.5: h0 = -0.5 + (1.5 + 0) / 2 = 0.25, ...
    h1 = 0.25 + (0.5 - 0.75) / 2
    h2 = h1 + (2.5 - (h1 + 0.5)) / 2
    assert s.flatten().tolist() == [0.0, 0.0, 1.0] and h2 > 1.0 and v.item() == -0.5


# --- fused kernel vs loop --------------------------------------------------------------------


@pytest.mark.parametrize("reset", ["soft", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.usefixtures("kernel_path")
def test_a_membrane_exactly_at_the_threshold_does_not_fire(reset, dtype) -> None:
    """u > theta strictly, in every CPU implementation: leak = gain = 0.5, theta = 1 and
    x = 2, 1, 3 give u = 1 (a tie: silent), 1 (a tie again: silent, the membrane kept), 2
    (fires). Under u >= theta the first step would fire. Gradients match the loop too."""
    from asnn_dist.models.window_lif import window_adaptive_lif

    x = torch.tensor([[2.0, 0.5], [1.0, 0.5], [3.0, 0.5]], dtype=dtype)
    leak, gain = torch.full((3,), 0.5, dtype=dtype), torch.full((3,), 0.5, dtype=dtype)
    sur, gout = SURROGATES.create("sigmoid"), torch.ones_like(x)
    want = [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    ref = _run_adaptive("loop", x, leak, gain, 1.0, sur, reset, False, gout)
    out = _run_adaptive("fused", x, leak, gain, 1.0, sur, reset, False, gout)
    window, v_last = window_adaptive_lif(x, None, leak, gain, 0, 1.0, sur, reset)
    assert ref[0].tolist() == out[0].tolist() == window.tolist() == want
    assert v_last.tolist() == ([1.0, 0.4375] if reset == "soft" else [0.0, 0.4375])
    for got, exp in zip(out, ref):
        torch.testing.assert_close(got, exp, **(TOL if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)))


def _params(steps: int, adaptive: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = steps if adaptive else 1
    leak = torch.rand(n, generator=g, dtype=F64) * 0.8 + 0.2
    gain = torch.rand(n, generator=g, dtype=F64) + 0.3
    return leak, gain


def _run_adaptive(backend, x, leak, gain, thr, sur, reset, detach, gout):
    leak = leak.clone().requires_grad_()
    gain = gain.clone().requires_grad_()
    thr_arg = thr.clone().requires_grad_() if isinstance(thr, torch.Tensor) else thr
    x = x.clone().requires_grad_()
    if backend == "fused":
        s = fused_adaptive_lif(x, leak, gain, thr_arg, sur, reset, detach)
    else:
        i = (lambda t: t) if leak.numel() > 1 else (lambda t: 0)
        step = lambda xt, v, t: adaptive_lif_step(  # noqa: E731
            xt, v, leak[i(t)], gain[i(t)], thr_arg, sur, reset, detach
        )
        s = multistep_loop(step, x)[0]
    inputs = [x, leak, gain] + ([thr_arg] if isinstance(thr, torch.Tensor) else [])
    return (s, *torch.autograd.grad(s, inputs, gout))


COMBOS = list(
    itertools.product(["soft", "hard"], [False, True], [True, False], ["sigmoid", "atan"])
)


@pytest.mark.parametrize("reset,detach,adaptive,sur_name", COMBOS)
@pytest.mark.usefixtures("kernel_path")
def test_fused_matches_loop_values_and_all_gradients(reset, detach, adaptive, sur_name) -> None:
    steps = 6
    g = torch.Generator().manual_seed(COMBOS.index((reset, detach, adaptive, sur_name)))
    x = torch.randn(steps, 3, 2, 5, generator=g, dtype=F64) * 1.5 + 0.6
    gout = torch.randn(x.shape, generator=g, dtype=F64)
    leak, gain = _params(steps, adaptive, 1)
    sur = SURROGATES.create(sur_name)
    for thr in (1.0, torch.tensor(0.8, dtype=F64)):  # float, and a tensor that gets a gradient
        ref = _run_adaptive("loop", x, leak, gain, thr, sur, reset, detach, gout)
        out = _run_adaptive("fused", x, leak, gain, thr, sur, reset, detach, gout)
        assert 0.1 < ref[0].mean() < 0.6  # both spiking and silent neurons are exercised
        assert len(out) == len(ref)
        for got, want in zip(out, ref):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **TOL)
        assert all(r.abs().sum() > 0 for r in ref[1:])  # non-trivial gradients


@pytest.mark.usefixtures("kernel_path")
def test_fused_chunked_and_noncontiguous_and_expanded_grad(monkeypatch) -> None:
    monkeypatch.setattr(fused, "_chunk_size", lambda steps, n: 8)  # 30 -> 4 chunks, last short
    steps = 5
    base = torch.randn(steps, 5, 6, dtype=F64) * 1.5 + 0.5
    x = base.transpose(1, 2)  # non-contiguous input
    leak, gain = _params(steps, True, 2)
    sur = SURROGATES.create("sigmoid")
    gout = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    for reset in ("soft", "hard"):
        thr = torch.tensor(0.9, dtype=F64)
        ref = _run_adaptive("loop", x, leak, gain, thr, sur, reset, False, gout)
        out = _run_adaptive("fused", x, leak, gain, thr, sur, reset, False, gout)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, **TOL)
    # gout from .sum() is an expanded (stride 0) tensor
    xf = x.clone().requires_grad_()
    fused_adaptive_lif(xf, leak, gain, 1.0, sur).sum().backward()
    xl = x.clone().requires_grad_()
    step = lambda a, v, t: adaptive_lif_step(a, v, leak[t], gain[t], 1.0, sur)  # noqa: E731
    multistep_loop(step, xl)[0].sum().backward()
    torch.testing.assert_close(xf.grad, xl.grad, **TOL)


@pytest.mark.parametrize(
    "v_reset,decay_input,detach",
    list(itertools.product([0.0, None, -0.3], [True, False], [False, True])),
)
@pytest.mark.usefixtures("kernel_path")
def test_fused_lif_matches_spikingjelly_step(v_reset, decay_input, detach) -> None:
    steps, tau = 5, 2.5
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(steps, 4, 6, generator=g, dtype=F64) * 1.5 + 1.0).requires_grad_()
    gout = torch.randn(x.shape, generator=g, dtype=F64)
    sur = SURROGATES.create("atan")
    s_f = fused_lif(x, tau, 1.0, sur, v_reset, decay_input, detach)
    step = lambda a, v, t: lif_step(a, v, tau, 1.0, sur, v_reset, decay_input, detach)  # noqa: E731
    s_l = multistep_loop(step, x)[0]
    torch.testing.assert_close(s_f, s_l, **TOL)
    assert 0.05 < s_l.mean() < 0.8
    (gf,) = torch.autograd.grad(s_f, x, gout)
    (gl,) = torch.autograd.grad(s_l, x, gout)
    torch.testing.assert_close(gf, gl, **TOL)


@pytest.mark.usefixtures("kernel_path")
def test_fused_float32_close_to_loop_and_retain_graph() -> None:
    steps = 4
    x = torch.randn(steps, 8, 16, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.5
    leak, gain = (p.float() for p in _params(steps, True, 4))
    sur = SURROGATES.create("sigmoid")
    gout = torch.ones(x.shape)
    ref = _run_adaptive("loop", x, leak, gain, 1.0, sur, "soft", False, gout)
    out = _run_adaptive("fused", x, leak, gain, 1.0, sur, "soft", False, gout)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # backward twice through a retained graph gives the same gradient again
    xr = x.clone().requires_grad_()
    s = fused_adaptive_lif(xr, leak, gain, 1.0, sur)
    (g1,) = torch.autograd.grad(s, xr, gout, retain_graph=True)
    (g2,) = torch.autograd.grad(s, xr, gout)
    assert torch.equal(g1, g2)


@pytest.mark.usefixtures("kernel_path")
def test_fused_no_grad_and_bad_parameter_shapes() -> None:
    x = torch.randn(3, 2, 4, dtype=F64) + 0.8
    sur = SURROGATES.create("sigmoid")
    with torch.no_grad():
        s = fused_adaptive_lif(x, torch.full((3,), 0.5, dtype=F64), 0.5, 1.0, sur)
    ref = multistep_loop(lambda a, v, t: adaptive_lif_step(a, v, 0.5, 0.5, 1.0, sur), x)[0]
    assert torch.equal(s, ref)
    with pytest.raises(ValueError, match="leak"):
        fused_adaptive_lif(x, torch.full((2,), 0.5), 0.5, 1.0, sur)
    with pytest.raises(ValueError, match="reset"):
        fused_adaptive_lif(x, 0.5, 0.5, 1.0, sur, reset="partial")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("reset,detach,sur_name", [("soft", False, "sigmoid"), ("hard", True, "atan"),
                                                   ("soft", True, "atan"), ("hard", False, "sigmoid")])
def test_torch_ops_device_form_is_bit_identical_to_host_form(monkeypatch, dtype, reset, detach, sur_name) -> None:
    """Off the CPU the torch-op path takes leak, gain and a tensor threshold as 0-dim device
    tensors (reading them as floats would sync the host); run that form here: same bits."""
    steps = 5
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(steps, 3, 70, generator=g) * 1.5 + 0.6).to(dtype)
    gout = torch.randn(x.shape, generator=g).to(dtype)
    leak, gain = (p.to(dtype) for p in _params(steps, True, 3))
    sur = SURROGATES.create(sur_name)
    for lk, gn, thr in ((leak, gain, torch.tensor(0.83, dtype=dtype)), (leak[:1], gain[:1], 0.83)):
        outs = []
        for devices in (fused.HOST_SCALAR_DEVICES, ()):
            monkeypatch.setattr(fused, "HOST_SCALAR_DEVICES", devices)
            with native.forced(False):
                outs.append(_run_adaptive("fused", x, lk, gn, thr, sur, reset, detach, gout))
        assert len(outs[0]) == len(outs[1])
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    lif = []  # float parameters (SpikingJelly LIF): filled on the device in the device form
    for devices in (fused.HOST_SCALAR_DEVICES, ()):
        monkeypatch.setattr(fused, "HOST_SCALAR_DEVICES", devices)
        with native.forced(False):
            xr = x.clone().requires_grad_()
            s = fused_lif(xr, 2.5, 0.9, sur, None if reset == "soft" else 0.1, True, detach)
            lif.append((s, *torch.autograd.grad(s, xr, gout)))
    assert all(torch.equal(a, b) for a, b in zip(*lif))
