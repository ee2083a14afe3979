"""Input encoders: the properties of the method's codes and the factory's validation."""

from __future__ import annotations

import pytest
import torch

import asnn_dist.snn  # noqa: F401  (fills the registries)
from asnn_dist.registry import ENCODERS
from asnn_dist.snn.encoders import (
    BitplaneEncoder,
    DirectEncoder,
    HybridEncoder,
    RateEncoder,
    ThresholdEncoder,
    build_encoder,
    equal_mass_thresholds,
)


def _image(b: int = 2, seed: int = 0) -> torch.Tensor:
    x = torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.5, 0.25])  # edge values on purpose
    return x


def _reference_threshold_code(x: torch.Tensor, z: list[float]) -> torch.Tensor:
    """The method's rule written as a loop with a fired mask."""
    fired = torch.zeros_like(x, dtype=torch.bool)
    out = []
    for zi in z:
        s = (x >= zi) & ~fired
        fired |= s
        out.append(s.to(x.dtype))
    return torch.stack(out)


def test_direct_repeats_the_image() -> None:
    x = _image()
    enc = ENCODERS.create("direct", num_steps=3)
    out = enc(x)
    assert out.shape == (3, *x.shape) and enc.direct_steps == 3 and enc.num_steps == 3
    assert all(torch.equal(out[t], x) for t in range(3))


def test_threshold_code_fires_exactly_once_with_m_equal_l() -> None:
    x = _image()
    enc = ThresholdEncoder(4)
    out = enc(x)
    assert enc.direct_steps == 0 and enc.thresholds.tolist() == [0.75, 0.5, 0.25, 0.0]
    assert torch.equal(out.sum(0), torch.ones_like(x))  # zeros too: no all-ones last frame
    assert torch.equal(out, _reference_threshold_code(x, [0.75, 0.5, 0.25, 0.0]))
    v = x[0, 0, 0, :4]  # 0 -> last step, 1 -> first, 0.5 -> second, 0.25 -> third
    assert out[:, 0, 0, 0, :4].argmax(0).tolist() == [3, 0, 1, 2]
    assert v.tolist() == [0.0, 1.0, 0.5, 0.25]


def test_threshold_code_at_most_once_with_more_levels() -> None:
    x = _image()
    enc = ThresholdEncoder(3, num_levels=4)  # the hybrid case: smallest threshold 1/4
    out = enc(x)
    assert out.sum(0).max() == 1
    assert torch.equal(out.sum(0), (x >= 0.25).to(x.dtype))
    assert torch.equal(out, _reference_threshold_code(x, [0.75, 0.5, 0.25]))


def test_bitplane_decodes_to_the_threshold_level() -> None:
    bits = 3
    q = 2**bits - 1
    x = torch.cat([torch.linspace(0, 1, 50), _image().flatten()]).view(1, 1, 1, -1)
    enc = BitplaneEncoder(bits)
    out = enc(x)
    assert out.shape == (bits, *x.shape) and set(out.unique().tolist()) <= {0.0, 1.0}
    code = sum(out[k] * 2**k for k in range(bits)).long()  # LSB first
    z = [1 - (i + 1) / q for i in range(q)]
    level = torch.stack([x >= zi for zi in z]).float().argmax(0)  # first reached threshold
    assert torch.equal(code, level + 1)
    assert code.min() >= 1 and code.max() <= q
    assert code.flatten()[0] == q and code.flatten()[49] == 1  # x = 0 and x = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_codes_compare_in_the_inputs_dtype_as_the_reference(dtype) -> None:
    """Thresholds are rounded to the input's dtype, as the authors' code compares a tensor with
    Python floats: a float32 0.7 reaches 1 - 3/10 at step 2 with T = 10 (compared in float64,
    float32(0.7) < 0.7 would fire a step later). Inputs: every threshold rounded to the dtype."""
    z10 = [1 - (i + 1) / 10 for i in range(10)]
    x = torch.tensor([z10], dtype=dtype)
    out = ThresholdEncoder(10)(x)
    assert torch.equal(out, _reference_threshold_code(x, z10))
    assert out[:, 0, 2].argmax() == 2 and out[:, 0].argmax(0).tolist() == list(range(10))
    hybrid = build_encoder("threshold", 10, direct_steps=1)(x)  # L = T = 10 over 9 steps
    assert torch.equal(hybrid[1:], _reference_threshold_code(x, z10[:9]))
    q = 2**5 - 1  # 23 of its 31 thresholds round down to float32
    zq = [1 - (i + 1) / q for i in range(q)]
    v = torch.tensor([zq], dtype=dtype)
    code = BitplaneEncoder(5).codes(v)
    assert code.tolist() == [list(range(1, q + 1))]  # each value reaches its own threshold
    if dtype == torch.float32:  # the case the float64 comparison got wrong
        assert torch.tensor(0.7, dtype=dtype).double() < 0.7
        assert (v[0].double() < torch.tensor(zq, dtype=torch.float64)).any()


def test_equal_mass_thresholds_closed_form_and_equal_shares() -> None:
    levels = 4
    z = equal_mass_thresholds(levels, levels)
    assert z[-1] == 0.0 and torch.all(z[1:] < z[:-1])
    p = torch.special.ndtr(torch.logit(z[:-1]))  # Phi(sigmoid^-1(z)) = 1 - (i+1)/L
    torch.testing.assert_close(p, torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = build_encoder("threshold", levels, levels="equal_mass")(x)
    share = out.sum(dim=(1, 2, 3, 4)) / x.numel()
    assert torch.allclose(share, torch.full((levels,), 1 / levels), atol=0.01)
    assert torch.equal(out.sum(0), torch.ones_like(x))


def test_rate_code_is_seeded_fresh_and_converges() -> None:
    x = _image(1)
    a, b = RateEncoder(8, seed=3), RateEncoder(8, seed=3)
    first = a(x)
    assert torch.equal(first, b(x))  # same seed, same draws
    assert not torch.equal(first, a(x))  # each forward draws fresh samples
    g = torch.Generator().manual_seed(5)
    c = RateEncoder(8, generator=g)
    assert torch.equal(c(x), RateEncoder(8, generator=torch.Generator().manual_seed(5))(x))
    long = RateEncoder(4000, seed=0)(x)
    assert (long.mean(0) - x).abs().max() < 0.03
    assert set(long.unique().tolist()) == {0.0, 1.0}


def test_hybrid_direct_steps_then_temporal_code() -> None:
    x = _image()
    enc = build_encoder("threshold", 4, direct_steps=1)
    assert isinstance(enc, HybridEncoder) and enc.direct_steps == 1 and enc.num_steps == 4
    out = enc(x)
    assert out.shape == (4, *x.shape) and torch.equal(out[0], x)
    # L = T = 4 levels over m = 3 steps: thresholds 0.75, 0.5, 0.25; faint values stay silent
    assert torch.equal(out[1:], _reference_threshold_code(x, [0.75, 0.5, 0.25]))
    for scheme in ("bitplane", "rate"):
        hyb = build_encoder(scheme, 5, direct_steps=2, seed=1)
        y = hyb(x)
        assert y.shape == (5, *x.shape) and torch.equal(y[1], x)
        assert set(y[2:].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(build_encoder("bitplane", 5, direct_steps=2)(x)[2:], BitplaneEncoder(3)(x))
    assert ENCODERS.create("hybrid", num_steps=4, direct_steps=1).direct_steps == 1


def test_factory_routes_k() -> None:
    assert isinstance(build_encoder("direct", 4), DirectEncoder)
    assert isinstance(build_encoder("threshold", 4, direct_steps=4), DirectEncoder)
    pure = build_encoder("threshold", 4)
    assert isinstance(pure, ThresholdEncoder) and pure.direct_steps == 0 and pure.num_levels == 4
    assert build_encoder("threshold", 4, num_levels=8).thresholds.tolist()[0] == 0.875
    assert isinstance(build_encoder("bitplane", 3), BitplaneEncoder)
    assert isinstance(build_encoder("rate", 3), RateEncoder)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scheme="threshold", num_steps=0), "num_steps"),
        (dict(scheme="threshold", num_steps=4, direct_steps=5), "direct_steps"),
        (dict(scheme="threshold", num_steps=4, direct_steps=-1), "direct_steps"),
        (dict(scheme="poisson", num_steps=4), r"scheme must be one of \['direct', 'threshold'"),
        (dict(scheme="threshold", num_steps=4, levels="log"), r"levels must be one of"),
        (dict(scheme="rate", num_steps=4, levels="equal_mass"), "levels"),
        (dict(scheme="bitplane", num_steps=4, num_levels=8), "num_levels"),
        (dict(scheme="threshold", num_steps=4, num_levels=3), "num_levels"),
        (dict(scheme="direct", num_steps=4, direct_steps=1), "direct_steps"),
        (dict(scheme="bitplane", num_steps=17), "bitplane"),
    ],
)
def test_factory_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_encoder(**kwargs)


def test_user_thresholds_are_validated() -> None:
    enc = ThresholdEncoder(2, thresholds=[0.8, 0.3])
    assert enc(torch.tensor([[0.9, 0.5, 0.1]])).tolist() == [[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]
    cases = (
        ([0.8, 0.0], r"\(0, 1\]"),
        ([1.2, 0.3], r"\(0, 1\]"),
        ([0.3, 0.8], "decreasing"),
        ([0.5], "2 values"),
    )
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            ThresholdEncoder(2, thresholds=bad)
    with pytest.raises(ValueError, match="direct_steps"):
        HybridEncoder(4, direct_steps=4)
