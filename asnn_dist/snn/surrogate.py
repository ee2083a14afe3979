"""Surrogate spike functions: Heaviside forward, smooth derivative backward.

Why objects and not module instances: a surrogate is a pure, immutable rule (a name and an
alpha), so it is a frozen dataclass. Nothing is shared or mutated between neurons, unlike
libraries that keep one default surrogate module as a mutable default argument.

Each surrogate has ``__call__(x)`` (spike = 1.0 where x > 0, strictly, as in the method and
the authors' code; gradient through an autograd Function) and ``grad(x)`` (the surrogate
derivative itself, which the fused multi-step kernel calls directly inside its hand-written
backward). A surrogate is defined by its ``kernel_form`` alone: grad, the autograd backward
and the fused kernel all evaluate that one form, so they round alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from asnn_dist.registry import SURROGATES


def heaviside(x: Tensor) -> Tensor:
    """H(x) = 1.0 where x > 0 (strictly: a membrane at the threshold does not fire), else 0.0."""
    return (x > 0).to(x.dtype)


def _sigmoid_finish_(y: Tensor) -> Tensor:
    """y <- sig(y) * (1 - sig(y)) in place (two passes)."""
    y.sigmoid_()
    return y.addcmul_(y, y, value=-1.0)  # sig - sig^2


def _atan_finish_(y: Tensor) -> Tensor:
    """y <- 1 / (1 + y^2) in place."""
    return y.square_().add_(1.0).reciprocal_()


KernelForm = tuple[float, float, Callable[[Tensor], Tensor]]


class _Spike(torch.autograd.Function):
    """Heaviside forward; backward multiplies by the surrogate's derivative at x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, surrogate: "HeavisideSurrogate") -> Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return heaviside(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:
        (x,) = ctx.saved_tensors
        return grad_out * ctx.surrogate.grad(x), None


class Surrogate(Protocol):
    """What neurons and the fused kernel need from a surrogate."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def grad(self, x: Tensor, out: Tensor | None = None) -> Tensor: ...


@dataclass(frozen=True)
class HeavisideSurrogate(ABC):
    """Base of the built-in surrogates: a subclass gives ``kernel_form`` and ``smooth``."""

    alpha: float

    def __post_init__(self) -> None:
        a = self.alpha
        if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
            raise ValueError(f"surrogate alpha must be a positive finite number, got {a!r}")

    def __call__(self, x: Tensor) -> Tensor:
        return _Spike.apply(x, self)

    def grad(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Surrogate derivative at x (written into ``out`` when given; it may alias x)."""
        k, scale, finish_ = self.kernel_form()
        y = torch.mul(x, k, out=out) if out is not None else x * k
        return finish_(y).mul_(scale)

    @abstractmethod
    def kernel_form(self) -> KernelForm:
        """(k, scale, finish_) with grad(x) = scale * finish_(k * x), finish_ in place.

        Lets the fused kernel build k * (h - theta) in the same pass as h and fold the
        scale into a later multiply-add, saving passes over memory.
        """

    @abstractmethod
    def smooth(self, x: Tensor) -> Tensor:
        """The smooth function whose derivative is the surrogate (for tests and plots)."""


@SURROGATES.register("sigmoid")
@dataclass(frozen=True)
class SigmoidSurrogate(HeavisideSurrogate):
    """Heaviside with the sigmoid-derivative surrogate (ASNN default, alpha = 4)."""

    alpha: float = 4.0

    def kernel_form(self) -> KernelForm:
        """alpha sig(alpha x)(1 - sig(alpha x)): k = scale = alpha."""
        return float(self.alpha), float(self.alpha), _sigmoid_finish_

    def smooth(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.alpha * x)


@SURROGATES.register("atan")
@dataclass(frozen=True)
class AtanSurrogate(HeavisideSurrogate):
    """Heaviside with the arctan surrogate (SpikingJelly's default shape, alpha = 2)."""

    alpha: float = 2.0

    def kernel_form(self) -> KernelForm:
        """alpha/2 / (1 + (pi/2 alpha x)^2): k = pi/2 alpha, scale = alpha/2."""
        return math.pi / 2 * float(self.alpha), float(self.alpha) / 2, _atan_finish_

    def smooth(self, x: Tensor) -> Tensor:
        return 0.5 + torch.atan(math.pi / 2 * self.alpha * x) / math.pi


def build_surrogate(name: str, alpha: float | None = None) -> Surrogate:
    """Surrogate by registry name; ``alpha=None`` keeps the surrogate's own default.

    Raises ValueError (not the registry's KeyError) so neuron constructors report a bad
    ``surrogate`` argument the same way as every other bad argument.
    """
    if name not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES.names()}, got {name!r}")
    return SURROGATES.create(name) if alpha is None else SURROGATES.create(name, alpha=alpha)
