"""Which time steps a layer is running (``Steps``), passed explicitly from layer to layer.

Why: time-step checkpointing (``time_checkpoint.py``) runs the network on a window of steps
[t0, t0 + tau) at a time, carrying each neuron's membrane from one window to the next. Layers
whose math depends on the absolute step index (adaptive neurons use leak[t] and gain[t],
``step_neurons.py``; per-step BatchNorm uses running statistics row t, ``step_norm.py``; the
hybrid stem routes steps below ``direct_steps`` to its direct layer) take the window as a
second argument, ``forward(x, steps)``, so a model is written once, for [tau, B, ...] inputs,
and computes the same function whether it runs all T steps at once (``ALL_STEPS``) or window
by window. Such layers are ``StepModule``s; ``StepSequential`` hands ``steps`` to the ones it
holds and calls the rest (conv, pooling, linear) as usual.

Also here: the channels-last layout helpers for [T, B, C, H, W] maps.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from asnn_dist.snn import affine_source

def is_channels_last_seq(x: Tensor) -> bool:
    """x [T, B, C, H, W] stored as [T, B, H, W, C] (how conv maps flow between layers)."""
    return x.dim() == 5 and x.permute(0, 1, 3, 4, 2).is_contiguous()


def channels_last_seq(x: Tensor) -> Tensor:
    """The same [T, B, C, H, W] values stored channels-last (oneDNN convs and BN run 2-4x
    faster on it than on NCHW; conv, pooling and elementwise ops keep the layout)."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def cat_steps(parts: list[Tensor]) -> Tensor:
    """Concatenate along time, keeping a channels-last layout. When every part is a
    registered affine image (a BN output), so is the result (``snn.affine_source``)."""
    if len(parts) == 1:
        return parts[0]
    channels_last = all(is_channels_last_seq(p) for p in parts)
    flat = [p.permute(0, 1, 3, 4, 2) for p in parts] if channels_last else parts
    joined = torch.cat(flat)
    sources = [affine_source.lookup(p) for p in flat]
    if torch.is_grad_enabled() and all(s is not None for s in sources):
        affine_source.register(joined, affine_source.concat(sources))  # type: ignore[arg-type]
    return joined.permute(0, 1, 4, 2, 3) if channels_last else joined


class Steps:
    """The steps a [tau, B, ...] input holds: they start at absolute step ``t0``; with
    ``membranes`` (a window of a checkpointed run) each neuron starts from its entry there
    (missing = resting) and leaves its last membrane there, without them (a plain run) every
    neuron runs from rest. ``recomputing``: checkpointing runs the window again during
    backward (BatchNorm then leaves its running statistics alone: they were updated once)."""

    __slots__ = ("t0", "membranes", "recomputing")

    def __init__(self, t0: int = 0, membranes: Optional[dict[nn.Module, Optional[Tensor]]] = None,
                 recomputing: bool = False) -> None:
        self.t0, self.membranes, self.recomputing = t0, membranes, recomputing

    def shifted(self, k: int) -> "Steps":
        """The same window for an input that starts ``k`` steps later (the spike branch of a
        stem); the membranes are shared."""
        return Steps(self.t0 + k, self.membranes, self.recomputing)

    def __repr__(self) -> str:
        mode = "plain" if self.membranes is None else "window"
        return f"Steps(t0={self.t0}, {mode}{', recomputing' if self.recomputing else ''})"


ALL_STEPS = Steps()  # a plain run of all T steps from rest


class StepModule(nn.Module):
    """A layer that depends on the absolute step index: ``forward(x, steps)``."""


class StepSequential(StepModule, nn.Sequential):
    """nn.Sequential that hands ``steps`` to its StepModules (and only x to the others)."""

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        for module in self:
            x = module(x, steps) if isinstance(module, StepModule) else module(x)
        return x
