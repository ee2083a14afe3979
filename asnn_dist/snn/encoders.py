"""Input encoders: image [B, C, H, W] in [0, 1] -> sequence [T, B, C, H, W] (method 3-4).

Every encoder has ``num_steps`` (T) and ``direct_steps`` (how many leading steps carry the
analog image: T for direct, 0 for a pure temporal code, k for hybrid), so a model can send
steps [:direct_steps] through its own stem and the spike steps through the shared first layer.

Threshold rule shared by the temporal codes: decreasing thresholds z[0] > z[1] > ...; a value
fires at the first step whose threshold it reaches and never again (fired mask). Because the
thresholds decrease, "reached z[i] but not z[i-1]" is that rule in one vectorised comparison.

Precision (``snn.precision``): thresholds are float64 buffers that never follow a bf16/fp16
cast of the model; a code rounds them to the input's dtype and compares there, as the
authors' code compares a float32 image with Python-float thresholds: a float32 0.7 reaches
the threshold 1 - 3/10 (in float64 it would sit just below it and fire a step later). The
input images stay fp32 under a bf16 engine, so a value fires at the same step as in fp32
training (the model casts the encoded sequence to its compute dtype afterwards). Rate codes
draw their uniforms in fp32 or better.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from asnn_dist.registry import ENCODERS
from asnn_dist.snn.precision import Fp32Buffers, is_low

SCHEMES = ("direct", "threshold", "bitplane", "rate")
TEMPORAL_SCHEMES = ("threshold", "bitplane", "rate")
LEVELS = ("uniform", "equal_mass")
MAX_BITS = 16  # q = 65535 levels; float32 images cannot resolve more


def _check_steps(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_levels(levels: str) -> None:
    if levels not in LEVELS:
        raise ValueError(f"levels must be one of {list(LEVELS)}, got {levels!r}")


def uniform_thresholds(num_levels: int, steps: int) -> Tensor:
    """z[i] = 1 - (i + 1) / L for i < steps (float64); the L-th one is 0."""
    i = torch.arange(steps, dtype=torch.float64)
    return 1.0 - (i + 1.0) / num_levels


def equal_mass_thresholds(num_levels: int, steps: int) -> Tensor:
    """z[i] = sigmoid(Phi^-1(1 - (i + 1) / L)) in closed form (float64); the L-th one is 0.

    For a standard normal pre-activation p, P(sigmoid(p) >= z[i]) = (i + 1) / L, so each of
    the L steps receives the same share 1/L of the values.
    """
    return torch.sigmoid(torch.special.ndtri(uniform_thresholds(num_levels, steps)))


def equal_mass_transform(x: Tensor) -> Tensor:
    """LayerNorm over all but the batch dim (no affine), then sigmoid (authors' recipe)."""
    return torch.sigmoid(F.layer_norm(x, x.shape[1:]))


def level_thresholds(levels: str, num_levels: int, steps: int) -> Tensor:
    _check_levels(levels)
    rule = uniform_thresholds if levels == "uniform" else equal_mass_thresholds
    return rule(num_levels, steps)


class Encoder(Fp32Buffers):
    """Base: ``forward(x [B, ...]) -> [T, B, ...]`` with ``num_steps`` and ``direct_steps``;
    threshold buffers stay float64 under a bf16/fp16 cast (``Fp32Buffers``)."""

    def __init__(self, num_steps: int, direct_steps: int) -> None:
        super().__init__()
        _check_steps("num_steps (T)", num_steps)
        self.num_steps = num_steps
        self.direct_steps = direct_steps

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, direct_steps={self.direct_steps}"


def _repeat(x: Tensor, steps: int) -> Tensor:
    return x.unsqueeze(0).repeat(steps, *([1] * x.dim()))


@ENCODERS.register("direct")
class DirectEncoder(Encoder):
    """The same analog image at every step."""

    def __init__(self, num_steps: int) -> None:
        super().__init__(num_steps, direct_steps=num_steps)

    def forward(self, x: Tensor) -> Tensor:
        return _repeat(x, self.num_steps)


@ENCODERS.register("threshold")
class ThresholdEncoder(Encoder):
    """Temporal (time-to-first-spike) code with L levels over ``num_steps`` = m steps.

    Default L = m, so the last threshold is 0 and every value fires exactly once; L > m
    (hybrid, L = T) leaves values below 1 - m/L silent. ``thresholds`` overrides the level
    rule with user values: strictly decreasing, each in (0, 1].
    """

    def __init__(
        self,
        num_steps: int,
        num_levels: int | None = None,
        levels: str = "uniform",
        thresholds: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_steps, direct_steps=0)
        _check_levels(levels)
        self.num_levels = num_steps if num_levels is None else num_levels
        _check_steps("num_levels", self.num_levels, minimum=num_steps)
        self.levels = levels
        if thresholds is None:
            z = level_thresholds(levels, self.num_levels, num_steps)
        else:
            z = torch.as_tensor(list(thresholds), dtype=torch.float64)
            if z.numel() != num_steps:
                raise ValueError(f"thresholds needs {num_steps} values, got {z.numel()}")
            if not bool(((z > 0) & (z <= 1)).all()):
                raise ValueError(f"thresholds must lie in (0, 1], got {z.tolist()}")
            if num_steps > 1 and not bool((z[1:] < z[:-1]).all()):
                raise ValueError(f"thresholds must be strictly decreasing, got {z.tolist()}")
        self.register_buffer("thresholds", z, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        r = equal_mass_transform(x) if self.levels == "equal_mass" else x
        z = self.thresholds.to(r.dtype).view(-1, *([1] * r.dim()))  # compared in the input's dtype
        reached = r.unsqueeze(0) >= z  # monotone in step: once reached, reached forever
        spikes = reached.to(x.dtype)
        spikes[1:] -= reached[:-1].to(x.dtype)  # fire only at the first reached step
        return spikes

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_levels={self.num_levels}, levels={self.levels!r}"


@ENCODERS.register("bitplane")
class BitplaneEncoder(Encoder):
    """Binary code: ``num_steps`` = B bits carry the code c in 1..q (q = 2^B - 1), LSB first.

    Level j = first i with x >= z[i] over the q thresholds of the level rule, c = j + 1.
    """

    def __init__(self, num_steps: int, levels: str = "uniform") -> None:
        _check_steps("num_steps (bitplane bits)", num_steps)
        if num_steps > MAX_BITS:
            raise ValueError(f"bitplane num_steps must be <= {MAX_BITS}, got {num_steps}")
        super().__init__(num_steps, direct_steps=0)
        self.levels = levels
        self.num_levels = 2**num_steps - 1
        z = level_thresholds(levels, self.num_levels, self.num_levels)
        self.register_buffer("ascending", z.flip(0).contiguous(), persistent=False)
        self.register_buffer("bits", 2 ** torch.arange(num_steps), persistent=False)

    def codes(self, x: Tensor) -> Tensor:
        """Code c in 1..q per value (int64): one plus the number of thresholds above it.

        Compared in the input's dtype (thresholds rounded to it); bf16/fp16 values and their
        rounded thresholds are searched in fp32, which holds both exactly.
        """
        r = equal_mass_transform(x) if self.levels == "equal_mass" else x
        z = self.ascending.to(r.dtype)
        if is_low(r.dtype):
            z, r = z.float(), r.float()
        above = self.num_levels - torch.searchsorted(z, r.contiguous(), right=True)
        return above.clamp_(max=self.num_levels - 1) + 1

    def forward(self, x: Tensor) -> Tensor:
        c = self.codes(x)
        bits = self.bits.view(-1, *([1] * c.dim()))
        return ((c.unsqueeze(0) & bits) != 0).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels!r}"


@ENCODERS.register("rate")
class RateEncoder(Encoder):
    """Poisson/rate code s[t] ~ Bernoulli(x); fresh draws from a seeded generator each call.

    Training calls ``reseed`` before every micro batch with a seed derived from (seed, rank,
    position) (``train/randomness.py``): ranks draw different noise, and a resumed run draws
    what the uninterrupted one drew, with no generator state to checkpoint.
    """

    def __init__(
        self, num_steps: int, seed: int = 0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(num_steps, direct_steps=0)
        self.seed = int(seed)
        self.generator = generator
        self._generators: dict[str, torch.Generator] = {}

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self.generator is not None:
            return self.generator
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def reseed(self, seed: int) -> None:
        """Restart the draws from ``seed`` on every device (an explicit ``generator`` is reseeded too)."""
        self.seed = int(seed)
        self._generators.clear()
        if self.generator is not None:
            self.generator.manual_seed(self.seed)

    def forward(self, x: Tensor) -> Tensor:
        u = torch.rand(
            (self.num_steps, *x.shape), generator=self._generator_for(x.device),
            device=x.device, dtype=torch.float32 if is_low(x.dtype) else x.dtype,
        )
        return (u < x.unsqueeze(0)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


@ENCODERS.register("hybrid")
class HybridEncoder(Encoder):
    """k direct (analog) steps, then m = T - k steps of a temporal code of the same image.

    The threshold code uses L = T levels by default (authors' code), so with k = 1 the
    smallest threshold is 1/T and the faintest values reach the network only directly.
    """

    def __init__(
        self,
        num_steps: int,
        direct_steps: int = 1,
        scheme: str = "threshold",
        levels: str = "uniform",
        num_levels: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(num_steps, direct_steps)
        _check_steps("direct_steps (k)", direct_steps)
        if direct_steps >= num_steps:
            raise ValueError(
                f"hybrid needs 1 <= direct_steps (k) < num_steps (T) = {num_steps}, got "
                f"{direct_steps}; use the direct encoder for k = T"
            )
        if num_levels is not None and scheme != "threshold":
            raise ValueError(f"num_levels applies to scheme 'threshold' only, got {scheme!r}")
        if scheme == "threshold" and num_levels is None:
            num_levels = num_steps  # authors' code: L = T, smallest threshold 1/T for k = 1
        self.scheme = scheme
        self.temporal = _temporal(scheme, num_steps - direct_steps, levels, num_levels, seed)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([_repeat(x, self.direct_steps), self.temporal(x)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme!r}"


def _temporal(scheme: str, steps: int, levels: str, num_levels: int | None, seed: int) -> Encoder:
    if scheme not in TEMPORAL_SCHEMES:
        raise ValueError(
            f"temporal scheme must be one of {list(TEMPORAL_SCHEMES)}, got {scheme!r}"
        )
    _check_levels(levels)
    if scheme == "threshold":
        return ThresholdEncoder(steps, num_levels=num_levels, levels=levels)
    if scheme == "bitplane":
        return BitplaneEncoder(steps, levels=levels)
    if levels != "uniform":
        raise ValueError(
            "levels='equal_mass' applies to the threshold and bitplane codes; "
            "scheme 'rate' takes levels='uniform'"
        )
    return RateEncoder(steps, seed=seed)


def build_encoder(
    scheme: str,
    num_steps: int,
    direct_steps: int = 0,
    levels: str = "uniform",
    num_levels: int | None = None,
    seed: int = 0,
) -> Encoder:
    """The one factory for configs: scheme + T + k (direct steps) + level rule.

    k = 0: pure temporal code; 0 < k < T: hybrid; k = T (or scheme "direct"): direct.
    ``num_levels`` (threshold code only) defaults to T, as in the authors' code.
    """
    _check_steps("num_steps (T)", num_steps)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    _check_levels(levels)
    if isinstance(direct_steps, bool) or not isinstance(direct_steps, int):
        raise ValueError(f"direct_steps (k) must be an integer, got {direct_steps!r}")
    if not 0 <= direct_steps <= num_steps:
        raise ValueError(
            f"direct_steps (k) must be in [0, num_steps={num_steps}], got {direct_steps}"
        )
    if num_levels is not None and scheme != "threshold":
        raise ValueError(f"num_levels applies to scheme 'threshold' only, got scheme {scheme!r}")
    if scheme == "direct":
        if direct_steps not in (0, num_steps):
            raise ValueError(
                f"scheme 'direct' uses all {num_steps} steps; direct_steps (k) = {direct_steps} "
                "needs a temporal scheme (threshold, bitplane, rate) for the other steps"
            )
        return DirectEncoder(num_steps)
    if direct_steps == num_steps:
        return DirectEncoder(num_steps)
    if direct_steps == 0:
        return _temporal(scheme, num_steps, levels, num_levels, seed)
    return HybridEncoder(num_steps, direct_steps, scheme, levels, num_levels, seed)
