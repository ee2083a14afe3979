"""Which time steps a layer is running: the step context shared by step-dependent layers.

Why: time-step checkpointing (``time_checkpoint.py``) runs the network on a window of steps
[t0, t0 + tau) at a time, carrying each neuron's membrane from one window to the next. Layers
whose math depends on the absolute step index (adaptive neurons use leak[t] and gain[t],
``step_neurons.py``; per-step BatchNorm uses running statistics row t, ``step_norm.py``) read
that index from here, so a model is written once, for [tau, B, ...] inputs, and computes the
same function whether it runs all T steps at once (plain) or window by window (checkpointed).

The state is thread-local and set by context managers *inside* the function that
checkpointing recomputes, so the recomputation during backward (possibly on another thread)
sees the same window. Also here: the channels-last layout helpers for [T, B, C, H, W] maps.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from asnn_dist.snn import affine_source

_local = threading.local()


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


class StepWindow:
    """Explicit neuron state of one window: membranes enter in ``state`` and leave there."""

    def __init__(self, state: dict[nn.Module, Optional[Tensor]]) -> None:
        self.state = state


def step_offset() -> int:
    """Absolute index of the first step of the [tau, B, ...] input being processed."""
    return getattr(_local, "offset", 0)


def current_window() -> Optional[StepWindow]:
    return getattr(_local, "window", None)


def is_recomputing() -> bool:
    """True while checkpointing recomputes a window during backward."""
    return getattr(_local, "recomputing", False)


@contextmanager
def shifted(steps: int) -> Iterator[None]:
    """Inner calls see inputs that start ``steps`` later (e.g. the spike branch of a stem)."""
    previous = step_offset()
    _local.offset = previous + steps
    try:
        yield
    finally:
        _local.offset = previous


@contextmanager
def step_window(t0: int, state: dict[nn.Module, Optional[Tensor]]) -> Iterator[StepWindow]:
    """Run steps starting at ``t0`` with the given neuron membranes (None = resting)."""
    previous = (current_window(), step_offset())
    window = StepWindow(dict(state))
    _local.window, _local.offset = window, t0
    try:
        yield window
    finally:
        _local.window, _local.offset = previous


@contextmanager
def recomputing() -> Iterator[None]:
    previous = is_recomputing()
    _local.recomputing = True
    try:
        yield
    finally:
        _local.recomputing = previous
