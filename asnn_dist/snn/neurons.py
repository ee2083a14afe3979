"""Stateful spiking neuron modules (multi-step [T, B, ...] and single-step).

State lifecycle: ``forward`` (multi-step) calls ``reset_state()`` first and keeps no state
afterwards; that is the one place a forward resets. Single-step use goes through ``step()``,
which creates the membrane at the first step after a reset and counts steps so the adaptive
neuron picks leak[t] / gain[t]; ``reset_state()`` (or ``reset_states(model)``) starts over.

Backends: "fused" (``snn.fused``, one autograd node for all steps) and "loop" (the step
functions of ``snn.functional``, the reference). Both give the same values and gradients.

Statistics: set ``record = True`` (``snn.stats.collect_spike_stats`` does it) and forward
stores ``last_spike_counts`` [T] and ``last_numel_per_step``; when False nothing is computed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asnn_dist.registry import NEURONS
from asnn_dist.snn.functional import RESETS, adaptive_lif_step, lif_step, multistep_loop
from asnn_dist.snn.fused import fused_adaptive_lif, fused_lif
from asnn_dist.snn.surrogate import build_surrogate

BACKENDS = ("fused", "loop")
# ``adaptive`` values (config ``neuron.adaptive``): per-step leak/gain (True), one shared pair
# (False), or "fixed_readout": per-step leak/gain in a model whose readout scale is fixed at 1
# (the authors' ASNN=False ablation; the readout is the model's, the neuron is per-step).
ADAPTIVE_CHOICES = (True, False, "fixed_readout")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_threshold(threshold: float) -> None:
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")


class SpikingNeuron(nn.Module):
    """Shared plumbing: shape checks, state lifecycle, spike recording."""

    def __init__(self, num_steps: int | None, backend: str) -> None:
        super().__init__()
        bad = not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1
        if num_steps is not None and bad:
            raise ValueError(f"num_steps (T) must be an integer >= 1, got {num_steps!r}")
        _check_choice("backend", backend, BACKENDS)
        self.num_steps = num_steps
        self.backend = backend
        self.record = False
        self.last_spike_counts: Tensor | None = None
        self.last_numel_per_step = 0
        self.reset_state()

    def reset_state(self) -> None:
        """Forget the membrane and the step counter (single-step mode)."""
        self._v: Tensor | None = None
        self._t = 0

    def forward(self, x: Tensor) -> Tensor:
        """x [T, B, ...] -> spikes [T, B, ...]."""
        self.reset_state()
        if x.dim() < 2:
            raise ValueError(f"expected input [T, B, ...], got shape {tuple(x.shape)}")
        if self.num_steps is not None and x.shape[0] != self.num_steps:
            raise ValueError(
                f"input has {x.shape[0]} time steps but the neuron was built with "
                f"num_steps={self.num_steps}; inputs must be [T, B, ...] with T == num_steps"
            )
        spikes = self._multi_step(x)
        if self.record:
            with torch.no_grad():
                self.last_spike_counts = spikes.detach().flatten(1).sum(1)
            self.last_numel_per_step = spikes[0].numel()
        return spikes

    def step(self, x_t: Tensor) -> Tensor:
        """One time step x_t [B, ...] -> spikes [B, ...], carrying the membrane."""
        if self.num_steps is not None and self._t >= self.num_steps:
            raise RuntimeError(
                f"step() called {self._t + 1} times but num_steps={self.num_steps}; "
                "call reset_state() before the next sequence"
            )
        spike, self._v = self._single_step(x_t, self._v, self._t)
        self._t += 1
        return spike

    def _multi_step(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"{type(self).__name__} must override _multi_step")

    def _single_step(self, x_t: Tensor, v: Tensor | None, t: int) -> tuple[Tensor, Tensor]:
        raise RuntimeError(f"{type(self).__name__} must override _single_step")


@NEURONS.register("adaptive_lif")
class AdaptiveLIF(SpikingNeuron):
    """ASNN neuron: learnable leak[t] and gain[t] per time step (shared [1] if not adaptive)."""

    def __init__(
        self,
        num_steps: int,
        threshold: float = 1.0,
        reset: str = "soft",
        detach_reset: bool = False,
        adaptive: bool | str = True,
        surrogate: str = "sigmoid",
        alpha: float | None = None,
        init_leak: float = 0.5,
        init_gain: float = 0.5,
        backend: str = "fused",
    ) -> None:
        if num_steps is None:
            raise ValueError("num_steps (T) must be an integer >= 1, got None")
        super().__init__(num_steps, backend)
        _check_threshold(threshold)
        _check_choice("reset", reset, RESETS)
        self.surrogate = build_surrogate(surrogate, alpha)
        self.threshold = float(threshold)
        self.reset = reset
        self.detach_reset = bool(detach_reset)
        if adaptive not in ADAPTIVE_CHOICES:
            raise ValueError(f"adaptive must be one of {list(ADAPTIVE_CHOICES)}, got {adaptive!r}")
        self.adaptive = bool(adaptive)  # per-step parameters unless False
        n = num_steps if self.adaptive else 1
        self.leak = nn.Parameter(torch.full((n,), float(init_leak)))
        self.gain = nn.Parameter(torch.full((n,), float(init_gain)))

    def _multi_step(self, x: Tensor) -> Tensor:
        if self.backend == "fused":
            return fused_adaptive_lif(
                x, self.leak, self.gain, self.threshold, self.surrogate,
                self.reset, self.detach_reset,
            )
        return multistep_loop(self._single_step, x)[0]

    def _single_step(self, x_t: Tensor, v: Tensor | None, t: int) -> tuple[Tensor, Tensor]:
        i = t if self.adaptive else 0
        return adaptive_lif_step(
            x_t, v, self.leak[i], self.gain[i], self.threshold, self.surrogate,
            self.reset, self.detach_reset,
        )

    def extra_repr(self) -> str:
        return (
            f"num_steps={self.num_steps}, threshold={self.threshold}, reset={self.reset!r}, "
            f"detach_reset={self.detach_reset}, adaptive={self.adaptive}, "
            f"surrogate={self.surrogate}, backend={self.backend!r}"
        )


@NEURONS.register("lif")
class LIF(SpikingNeuron):
    """Plain LIF with SpikingJelly semantics (Spikformer: tau 2, hard reset to 0)."""

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        threshold: float = 1.0,
        v_reset: float | None = 0.0,
        detach_reset: bool = False,
        surrogate: str = "sigmoid",
        alpha: float | None = None,
        backend: str = "fused",
        num_steps: int | None = None,
    ) -> None:
        super().__init__(num_steps, backend)
        if not tau >= 1.0:
            raise ValueError(f"tau must be >= 1 (leak 1 - 1/tau in [0, 1)), got {tau!r}")
        _check_threshold(threshold)
        if v_reset is not None and not threshold > v_reset:
            raise ValueError(f"threshold ({threshold}) must be > v_reset ({v_reset})")
        self.surrogate = build_surrogate(surrogate, alpha)
        self.tau = float(tau)
        self.decay_input = bool(decay_input)
        self.threshold = float(threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.detach_reset = bool(detach_reset)

    def _multi_step(self, x: Tensor) -> Tensor:
        if self.backend == "fused":
            return fused_lif(
                x, self.tau, self.threshold, self.surrogate, self.v_reset,
                self.decay_input, self.detach_reset,
            )
        return multistep_loop(self._single_step, x)[0]

    def _single_step(self, x_t: Tensor, v: Tensor | None, t: int) -> tuple[Tensor, Tensor]:
        return lif_step(
            x_t, v, self.tau, self.threshold, self.surrogate, self.v_reset,
            self.decay_input, self.detach_reset,
        )

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, decay_input={self.decay_input}, threshold={self.threshold}, "
            f"v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
            f"surrogate={self.surrogate}, backend={self.backend!r}"
        )


def reset_states(model: nn.Module) -> None:
    """Reset every spiking neuron in ``model`` (only needed for single-step use)."""
    for m in model.modules():
        if isinstance(m, SpikingNeuron):
            m.reset_state()
