"""Activation checkpointing across time steps (``time_segment`` = k steps per segment).

The network runs segment by segment: steps [t0, t0 + k) go through the whole body with the
neuron membranes carried in from the previous segment (``temporal.step_window``). Each
segment runs under ``torch.utils.checkpoint`` (non-reentrant), so autograd keeps only the
segment's inputs: its slice of the encoded input and the membranes at its start (the state
at segment boundaries). During backward each segment is recomputed from those, one at a
time, so activation memory is that of one segment plus T / k boundary states instead of all
T steps. The last segment is not recomputed: its backward comes first, so its activations
are alive only as long as a recomputed segment's would be (so k >= T recomputes nothing). Recomputation runs under
``temporal.recomputing()``: BatchNorm normalises with the same batch statistics but does
not update its running statistics a second time.

Two levels (``time_levels: 2``, the default): the boundary states are what grows with T
(every neuron's membrane, often more than a step's activations), so the segments are also
grouped, about sqrt(n) per group, and every group but the last runs under one more
checkpoint: only group boundaries stay alive, plus the boundaries inside the one group being
differentiated (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost"). The
price is one more forward of the earlier groups. Nested non-reentrant checkpoints do this
without extra bookkeeping: an outer recomputation reruns the group, whose inner segments
then save only their inputs again.

Plain and checkpointed execution compute the same function because every step-dependent
layer reads the absolute step index from the window (per-step BN statistics, per-step
leak/gain); see ``temporal.py``, ``step_norm.py`` and ``step_neurons.py``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from asnn_dist.models.lean import packing
from asnn_dist.models.step_neurons import step_neurons
from asnn_dist.models.temporal import recomputing, step_window


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), recomputing()


def _run_window(
    body: Callable[[Tensor], Tensor], neurons: list[nn.Module], t0: int, pack: bool, x: Tensor,
    *state: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    # Everything a layer reads from context is set here, inside the recomputed function.
    with packing(pack), step_window(t0, dict(zip(neurons, state))) as window:
        y = body(x)
    return (y, *(window.state.get(n) for n in neurons))


def _run_group(
    body: Callable[[Tensor], Tensor], neurons: list[nn.Module], t0: int, segment: int, pack: bool, x: Tensor,
    *state: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    """Steps [t0, t0 + len(x)) as segments of ``segment`` steps: each checkpointed but the last
    (whose backward comes first, so keeping its activations costs no more than recomputing)."""
    outputs = []
    steps = x.shape[0]
    for lo in range(0, steps, segment):
        args = (body, neurons, t0 + lo, pack, x[lo : lo + segment], *state)
        if lo + segment >= steps:
            y, *state = _run_window(*args)
        else:
            y, *state = checkpoint(_run_window, *args, use_reentrant=False, context_fn=_contexts)
        outputs.append(y)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs), *state)


def run_time_segments(
    body: Callable[[Tensor], Tensor], x_seq: Tensor, segment: int, model: nn.Module, pack: bool = False,
    levels: int = 2,
) -> Tensor:
    """``body`` ([tau, B, ...] -> [tau, B, K]) over x_seq [T, B, ...], k = ``segment`` steps
    per checkpointed segment; returns [T, B, K] equal to ``body(x_seq)`` run plainly.
    ``pack``: layers keep spike tensors as uint8 (``lean.py``) in every segment.
    ``levels``: 1 keeps the state at every segment boundary (n - 1 states for n segments);
    2 groups about sqrt(n) segments under one more checkpoint, keeping only the group
    boundaries plus the boundaries inside the group being differentiated (about 2 sqrt(n)
    states), for one more forward of the earlier groups."""
    if segment < 1:
        raise ValueError(f"time_segment must be >= 1 to checkpoint, got {segment}")
    if levels not in (1, 2):
        raise ValueError(f"time_levels must be 1 or 2, got {levels!r}")
    neurons = step_neurons(model)
    state: list[Optional[Tensor]] = [None] * len(neurons)  # every neuron starts at rest
    steps = x_seq.shape[0]
    n_segments = -(-steps // segment)
    group = segment * (max(1, round(math.sqrt(n_segments))) if levels == 2 else n_segments)
    outputs = []
    for t0 in range(0, steps, group):
        args = (body, neurons, t0, segment, pack, x_seq[t0 : t0 + group], *state)
        if t0 + group >= steps:
            y, *state = _run_group(*args)
        else:
            y, *state = checkpoint(_run_group, *args, use_reentrant=False, context_fn=_contexts)
        outputs.append(y)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
