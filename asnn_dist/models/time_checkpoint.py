"""Activation checkpointing across time steps (``time_segment`` = k steps per segment).

The network runs segment by segment: steps [t0, t0 + k) go through the whole body with the
neuron membranes carried in from the previous segment (a ``temporal.Steps`` window). Each
segment runs under ``torch.utils.checkpoint`` (non-reentrant), so autograd keeps only the
segment's inputs: its slice of the encoded input and the membranes at its start (the state
at segment boundaries). During backward each segment is recomputed from those, one at a
time, so activation memory is that of one segment plus T / k boundary states instead of all
T steps. The last segment is not recomputed: its backward comes first, so its activations
are alive only as long as a recomputed segment's would be (so k >= T recomputes nothing). A
recomputed window says so (``Steps.recomputing``, set by the checkpoint's recomputation
context, also for windows nested in a recomputed group): BatchNorm normalises with the same
batch statistics but does not update its running statistics a second time.

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
layer takes the window, with its absolute step index, as an argument (per-step BN
statistics, per-step leak/gain); see ``temporal.py``, ``step_norm.py`` and
``step_neurons.py``. ``TimeCheckpointing`` is what ``models.execution`` installs on a model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from asnn_dist.models.step_neurons import step_neurons
from asnn_dist.models.temporal import Steps

Body = Callable[[Tensor, Steps], Tensor]


class _Phase:
    """Whether a checkpointed function is now being recomputed during backward, or runs
    inside one that is (a window of a recomputed group). One per checkpoint call, passed to
    the function as an argument, so the recomputation sees it on whatever thread runs it."""

    def __init__(self, outer: Optional["_Phase"] = None) -> None:
        self.outer, self.active = outer, False

    @property
    def recomputing(self) -> bool:
        return self.active or (self.outer is not None and self.outer.recomputing)

    @contextlib.contextmanager
    def again(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False


def _checkpointed(fn: Callable[..., tuple], phase: Optional[_Phase], *args: object) -> tuple:
    """``fn(inner_phase, *args)`` under a non-reentrant checkpoint whose recomputation marks
    ``inner_phase`` (nested in ``phase``) as recomputing."""
    inner = _Phase(phase)
    return checkpoint(fn, inner, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), inner.again()))


def _run_window(
    phase: Optional[_Phase], body: Body, neurons: list[nn.Module], t0: int, x: Tensor, *state: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    # The window is built here, inside the recomputed function, from its arguments.
    steps = Steps(t0, dict(zip(neurons, state)), recomputing=phase is not None and phase.recomputing)
    y = body(x, steps)
    return (y, *(steps.membranes.get(n) for n in neurons))  # type: ignore[union-attr]


def _run_group(
    phase: Optional[_Phase], body: Body, neurons: list[nn.Module], t0: int, segment: int, x: Tensor,
    *state: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    """Steps [t0, t0 + len(x)) as segments of ``segment`` steps: each checkpointed but the last
    (whose backward comes first, so keeping its activations costs no more than recomputing)."""
    outputs = []
    steps = x.shape[0]
    for lo in range(0, steps, segment):
        args = (body, neurons, t0 + lo, x[lo : lo + segment], *state)
        if lo + segment >= steps:
            y, *state = _run_window(phase, *args)
        else:
            y, *state = _checkpointed(_run_window, phase, *args)
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
    phase: Optional[_Phase], body: Body, neurons: list[nn.Module], t0: int, segment: int, states: int,
    x: Tensor, *state: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    units = -(-x.shape[0] // segment)
    if units <= 1:
        return _run_window(phase, body, neurons, t0, x, *state)
    cut = binomial_plan(units, states)[1] * segment
    y0, *state = _checkpointed(_run_binomial, phase, body, neurons, t0, segment, states, x[:cut], *state)
    y1, *state = _run_binomial(phase, body, neurons, t0 + cut, segment, max(states - 1, 0), x[cut:], *state)
    return (torch.cat([y0, y1]), *state)


def run_time_segments(
    body: Body, x_seq: Tensor, segment: int, model: nn.Module, levels: int = 2, states: Optional[int] = None,
) -> Tensor:
    """``body`` ([tau, B, ...] holding a window of steps -> [tau, B, K]) over x_seq [T, B, ...],
    k = ``segment`` steps per checkpointed segment; returns [T, B, K] equal to
    ``body(x_seq, ALL_STEPS)`` run plainly.
    ``levels``: 1 keeps the state at every segment boundary (n - 1 states for n segments);
    2 groups about sqrt(n) segments under one more checkpoint, keeping only the group
    boundaries plus the boundaries inside the group being differentiated (about 2 sqrt(n)
    states), for one more forward of the earlier groups.
    ``states`` n (not None): the binomial schedule with at most n boundary states alive
    (``binomial_plan``), which then replaces ``levels``. ``TimeCheckpointing`` checks them."""
    neurons = step_neurons(model)
    if states is not None:
        return _run_binomial(None, body, neurons, 0, segment, states, x_seq, *[None] * len(neurons))[0]
    state: list[Optional[Tensor]] = [None] * len(neurons)  # every neuron starts at rest
    steps = x_seq.shape[0]
    n_segments = -(-steps // segment)
    group = segment * (max(1, round(math.sqrt(n_segments))) if levels == 2 else n_segments)
    outputs = []
    for t0 in range(0, steps, group):
        args = (body, neurons, t0, segment, x_seq[t0 : t0 + group], *state)
        if t0 + group >= steps:
            y, *state = _run_group(None, *args)
        else:
            y, *state = _checkpointed(_run_group, None, *args)
        outputs.append(y)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


@dataclass(frozen=True)
class TimeCheckpointing:
    """A model's body runner (``SpikingClassifier.body_runner``): checkpoint the body every
    ``segment`` steps on the given schedule while gradients are recorded."""

    segment: int
    levels: int = 2
    states: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.segment, bool) or not isinstance(self.segment, int) or self.segment < 1:
            raise ValueError(f"time_segment must be an integer >= 1 to checkpoint (0 = off), got {self.segment!r}")
        check_schedule(self.levels, self.states)

    def __call__(self, model: nn.Module, x_seq: Tensor) -> Tensor:
        return run_time_segments(model.forward_body, x_seq, self.segment, model, self.levels, self.states)
