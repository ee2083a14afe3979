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

Binomial (``time_states: n``): at most n boundary states alive at once (besides the resting
start), placed where they cost the fewest recomputed steps for that budget (Griewank, 1992,
"Achieving logarithmic growth of temporal and spatial complexity in reverse automatic
differentiation"; the ``revolve`` schedule). With n states, T steps cost about log_n(T)
recomputations each instead of growing memory with T: a schedule for a memory budget, where
the two fixed rules above give memory that still grows with T. ``binomial_plan`` gives the
split and its cost; the nesting is the same as above, one checkpoint per split.

Plain and checkpointed execution compute the same function because every step-dependent
layer reads the absolute step index from the window (per-step BN statistics, per-step
leak/gain); see ``temporal.py``, ``step_norm.py`` and ``step_neurons.py``.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache
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


def check_schedule(levels: int, states: Optional[int]) -> None:
    """Raise ValueError unless ``levels`` is 1 or 2 and ``states`` is None or an integer >= 0."""
    if levels not in (1, 2):
        raise ValueError(f"time_levels must be 1 or 2, got {levels!r}")
    if states is not None and (isinstance(states, bool) or not isinstance(states, int) or states < 0):
        raise ValueError(f"time_states must be an integer >= 0 or None (use time_levels), got {states!r}")


@lru_cache(maxsize=None)
def binomial_plan(units: int, states: int) -> tuple[int, int]:
    """(recomputed units, head length) of the cheapest schedule that differentiates ``units``
    segments keeping at most ``states`` boundary states beside the start: the head
    [0, head) runs checkpointed, the tail carries one state fewer (the head's start stays
    alive for its recomputation). No state budget means recompute from the start each time."""
    if units <= 1:
        return 0, units
    if states == 0:
        return units * (units - 1) // 2, units - 1
    return min((j + binomial_plan(units - j, states - 1)[0] + binomial_plan(j, states)[0], j)
               for j in range(1, units))


def _run_binomial(
    body: Callable[[Tensor], Tensor], neurons: list[nn.Module], t0: int, segment: int, states: int, pack: bool,
    x: Tensor, *state: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    units = -(-x.shape[0] // segment)
    if units <= 1:
        return _run_window(body, neurons, t0, pack, x, *state)
    cut = binomial_plan(units, states)[1] * segment
    head = (body, neurons, t0, segment, states, pack, x[:cut], *state)
    y0, *state = checkpoint(_run_binomial, *head, use_reentrant=False, context_fn=_contexts)
    y1, *state = _run_binomial(body, neurons, t0 + cut, segment, max(states - 1, 0), pack, x[cut:], *state)
    return (torch.cat([y0, y1]), *state)


def run_time_segments(
    body: Callable[[Tensor], Tensor], x_seq: Tensor, segment: int, model: nn.Module, pack: bool = False,
    levels: int = 2, states: Optional[int] = None,
) -> Tensor:
    """``body`` ([tau, B, ...] -> [tau, B, K]) over x_seq [T, B, ...], k = ``segment`` steps
    per checkpointed segment; returns [T, B, K] equal to ``body(x_seq)`` run plainly.
    ``pack``: layers keep spike tensors as uint8 (``lean.py``) in every segment.
    ``levels``: 1 keeps the state at every segment boundary (n - 1 states for n segments);
    2 groups about sqrt(n) segments under one more checkpoint, keeping only the group
    boundaries plus the boundaries inside the group being differentiated (about 2 sqrt(n)
    states), for one more forward of the earlier groups.
    ``states`` n (not None): the binomial schedule with at most n boundary states alive
    (``binomial_plan``), which then replaces ``levels``."""
    if segment < 1:
        raise ValueError(f"time_segment must be >= 1 to checkpoint, got {segment}")
    check_schedule(levels, states)
    neurons = step_neurons(model)
    if states is not None:
        return _run_binomial(body, neurons, 0, segment, states, pack, x_seq, *[None] * len(neurons))[0]
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
