"""Surrogate spike functions: Heaviside forward, smooth derivative backward.

Why objects and not module instances: a surrogate is a pure, immutable rule (a name and an
alpha), so it is a frozen dataclass. Nothing is shared or mutated between neurons, unlike
libraries that keep one default surrogate module as a mutable default argument.

Each surrogate has ``__call__(x)`` (spike = 1.0 where x >= 0, gradient through an autograd
Function) and ``grad(x)`` (the surrogate derivative itself, which the fused multi-step kernel
calls directly inside its hand-written backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from asnn_dist.registry import SURROGATES


def heaviside(x: Tensor) -> Tensor:
    """H(x) = 1.0 where x >= 0, else 0.0, in x's dtype."""
    return (x >= 0).to(x.dtype)


def _sigmoid_finish_(y: Tensor) -> Tensor:
    """y <- sig(y) * (1 - sig(y)) in place (two passes)."""
    y.sigmoid_()
    return y.addcmul_(y, y, value=-1.0)  # sig - sig^2


def _atan_finish_(y: Tensor) -> Tensor:
    """y <- 1 / (1 + y^2) in place."""
    return y.square_().add_(1.0).reciprocal_()


def sigmoid_grad(x: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
    """d/dx sigmoid(alpha x) = alpha * sig * (1 - sig); ``out`` may alias ``x``."""
    y = torch.mul(x, alpha, out=out) if out is not None else x * alpha
    return _sigmoid_finish_(y).mul_(alpha)


def atan_grad(x: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
    """d/dx (1/pi) arctan(pi/2 alpha x) = alpha/2 / (1 + (pi/2 alpha x)^2); ``out`` may alias x."""
    k = math.pi / 2 * alpha
    y = torch.mul(x, k, out=out) if out is not None else x * k
    return _atan_finish_(y).mul_(alpha / 2)


class _SigmoidSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return heaviside(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:
        (x,) = ctx.saved_tensors
        return grad_out * sigmoid_grad(x, ctx.alpha), None


class _AtanSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return heaviside(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:
        (x,) = ctx.saved_tensors
        return grad_out * atan_grad(x, ctx.alpha), None


class Surrogate(Protocol):
    """What neurons and the fused kernel need from a surrogate."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def grad(self, x: Tensor, out: Tensor | None = None) -> Tensor: ...


KernelForm = tuple[float, float, Callable[[Tensor], Tensor]]


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"surrogate alpha must be a positive finite number, got {alpha!r}")


@SURROGATES.register("sigmoid")
@dataclass(frozen=True)
class SigmoidSurrogate:
    """Heaviside with the sigmoid-derivative surrogate (ASNN default, alpha = 4)."""

    alpha: float = 4.0

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def __call__(self, x: Tensor) -> Tensor:
        return _SigmoidSpike.apply(x, float(self.alpha))

    def grad(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Surrogate derivative at x (written into ``out`` when given; it may alias x)."""
        return sigmoid_grad(x, float(self.alpha), out)

    def kernel_form(self) -> KernelForm:
        """(k, scale, finish_) with grad(x) = scale * finish_(k * x), finish_ in place.

        Lets the fused kernel build k * (h - theta) in the same pass as h and fold the
        scale into a later multiply-add, saving passes over memory.
        """
        return float(self.alpha), float(self.alpha), _sigmoid_finish_

    def smooth(self, x: Tensor) -> Tensor:
        """The smooth function whose derivative is the surrogate (for tests and plots)."""
        return torch.sigmoid(self.alpha * x)


@SURROGATES.register("atan")
@dataclass(frozen=True)
class AtanSurrogate:
    """Heaviside with the arctan surrogate (SpikingJelly's default shape, alpha = 2)."""

    alpha: float = 2.0

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def __call__(self, x: Tensor) -> Tensor:
        return _AtanSpike.apply(x, float(self.alpha))

    def grad(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Surrogate derivative at x (written into ``out`` when given; it may alias x)."""
        return atan_grad(x, float(self.alpha), out)

    def kernel_form(self) -> KernelForm:
        """(k, scale, finish_) with grad(x) = scale * finish_(k * x), finish_ in place."""
        return math.pi / 2 * float(self.alpha), float(self.alpha) / 2, _atan_finish_

    def smooth(self, x: Tensor) -> Tensor:
        """The smooth function whose derivative is the surrogate (for tests and plots)."""
        return 0.5 + torch.atan(math.pi / 2 * self.alpha * x) / math.pi


def build_surrogate(name: str, alpha: float | None = None) -> Surrogate:
    """Surrogate by registry name; ``alpha=None`` keeps the surrogate's own default.

    Raises ValueError (not the registry's KeyError) so neuron constructors report a bad
    ``surrogate`` argument the same way as every other bad argument.
    """
    if name not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES.names()}, got {name!r}")
    return SURROGATES.create(name) if alpha is None else SURROGATES.create(name, alpha=alpha)
