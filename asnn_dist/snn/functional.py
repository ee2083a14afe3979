"""Pure neuron step functions: the reference every kernel and module is checked against.

A step function maps (input current, membrane before the step) to (spike, membrane after the
reset). It holds no state, so a model, a fused kernel and a test can all call the same math.
``v=None`` means the resting state before the first step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

SpikeFn = Callable[[Tensor], Tensor]
Scalar = float | Tensor
RESETS = ("soft", "hard")


def adaptive_lif_step(
    current: Tensor,
    v: Tensor | None,
    leak: Scalar,
    gain: Scalar,
    threshold: Scalar,
    spike_fn: SpikeFn,
    reset: str = "soft",
    detach_reset: bool = False,
) -> tuple[Tensor, Tensor]:
    """One ASNN neuron step (method section 1); returns (spike, membrane after reset).

    u = leak * v + gain * current;  s = H(u - threshold)  (fires when u > threshold, strictly:
    the method's rule and the authors' code; ``spike_fn`` is a surrogate, whose H(0) = 0);
    soft reset: u - threshold * s;  hard reset: u * (1 - s) (back to 0).
    ``detach_reset`` stops the gradient through the s used in the reset only.
    """
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    u = gain * current if v is None else leak * v + gain * current
    spike = spike_fn(u - threshold)
    s = spike.detach() if detach_reset else spike
    v_next = u - threshold * s if reset == "soft" else u * (1.0 - s)
    return spike, v_next


def lif_step(
    current: Tensor,
    v: Tensor | None,
    tau: float,
    threshold: Scalar,
    spike_fn: SpikeFn,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
) -> tuple[Tensor, Tensor]:
    """One LIF step with SpikingJelly's multi-step LIF semantics.

    charge: decay_input  h = v + (x - (v - v_reset)) / tau
            otherwise    h = v - (v - v_reset) / tau + x        (v_reset None counts as 0)
    fire:   s = H(h - threshold)   (h > threshold, strictly; SpikingJelly fires at h >= threshold)
    reset:  v_reset None -> soft, h - threshold * s;  else hard, (1 - s) * h + s * v_reset
    The resting state (``v=None``) is v_reset for a hard reset and 0 for a soft one.
    """
    rest = 0.0 if v_reset is None else v_reset
    if v is None:
        v = torch.full_like(current, rest)
    if decay_input:
        h = v + (current - (v - rest)) / tau
    else:
        h = v - (v - rest) / tau + current
    spike = spike_fn(h - threshold)
    s = spike.detach() if detach_reset else spike
    if v_reset is None:
        v_next = h - threshold * s
    else:
        v_next = (1.0 - s) * h + s * v_reset
    return spike, v_next


StepFn = Callable[[Tensor, Tensor | None, int], tuple[Tensor, Tensor]]


def multistep_loop(
    step_fn: StepFn, x_seq: Tensor, v: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Run ``step_fn(x_t, v, t)`` over the leading time dim of x_seq [T, B, ...].

    Returns (spikes [T, B, ...], membrane after the last step). ``t`` lets the step pick
    per-step parameters (leak[t], gain[t]). Uses ``unbind`` so autograd stacks the input
    gradient once instead of materialising a full-size zero tensor per step.
    """
    spikes = []
    for t, x_t in enumerate(x_seq.unbind(0)):
        s, v = step_fn(x_t, v, t)
        spikes.append(s)
    return torch.stack(spikes), v
