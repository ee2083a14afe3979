"""Spiking neurons that can also run inside a step window (explicit carried membrane).

Why: a checkpointed segment starts from the membranes the previous segment ended with and
hands its own on (``time_checkpoint.py``; the window is the ``steps`` argument of
``forward``, ``temporal.Steps``). The neuron classes of ``snn`` run all T steps from
rest; the subclasses here add that window mode and keep the plain multi-step forward (fused
kernel) for everything else. The neuron is still called as a module in both modes, so hooks
(spike statistics, ZeRO-3 parameter gathering) fire as usual. ``neuron_factory`` builds these.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from asnn_dist.models.temporal import ALL_STEPS, StepModule, Steps, is_channels_last_seq
from asnn_dist.models.window_lif import window_adaptive_lif
from asnn_dist.snn import backends, spike_registry
from asnn_dist.snn.functional import adaptive_lif_step, lif_step
from asnn_dist.snn.neurons import LIF, AdaptiveLIF, SpikingNeuron
from asnn_dist.snn.precision import is_low


class _WindowSteps(torch.autograd.Function):
    """A neuron over a window's steps from membrane v0 -> (spikes, last membrane).

    Saves only the input current and v0 (as the fused multi-step kernel saves only its
    input) and reruns the steps with autograd in backward, so a recomputed checkpoint segment
    keeps no per-step membranes alive."""

    @staticmethod
    def forward(ctx: Any, neuron: "WindowedNeuron", t0: int, x: Tensor, v0: Optional[Tensor],
                *params: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            spikes, v = neuron.run_steps(x, v0, t0, params)
        ctx.neuron, ctx.t0 = neuron, t0
        ctx.save_for_backward(x, v0, *params)
        return spikes, v

    @staticmethod
    def backward(ctx: Any, g_spikes: Tensor, g_v: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        x, v0, *params = ctx.saved_tensors
        wants = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            inputs = [None if t is None else t.detach().requires_grad_(w) for t, w in zip((x, v0, *params), wants)]
            spikes, v = ctx.neuron.run_steps(inputs[0], inputs[1], ctx.t0, inputs[2:])
        outs, grads = [spikes], [g_spikes]
        if g_v is not None:
            outs.append(v)
            grads.append(g_v)
        need = [t for t in inputs if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(outs, need, grads, allow_unused=True))
        result = [next(got) if t is not None and t.requires_grad else None for t in inputs]
        return (None, None, *result)


class WindowedNeuron(StepModule):
    """Mixin for a ``SpikingNeuron``: in a step window (``steps.membranes``), run the window's steps from the
    carried membrane with the neuron's pure step function (``snn.functional``); otherwise
    the usual multi-step forward (fused kernel), which starts from rest. The module is still
    called as a module, so hooks (spike statistics, ZeRO-3 parameter gathering) fire in both
    modes. Subclasses say which step function and parameters they use."""

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        # Elementwise in space: channels-last maps run in their memory order (a permuted,
        # contiguous view), so no layout round trip; carried membranes keep that order.
        permuted = is_channels_last_seq(x) and not x.is_contiguous()
        if permuted:
            x = x.permute(0, 1, 3, 4, 2)
        # The membrane integrates over steps in fp32 (snn.precision): bf16/fp16 inputs go to a
        # kernel that reads them into fp32 (C on CPU, Triton on CUDA), or are upcast here for
        # the torch-op paths; the spikes (exactly 0/1) go back in the input's dtype.
        dtype = x.dtype
        membranes = steps.membranes
        if is_low(dtype) and not self.integrates_in_fp32(x, membranes is not None):
            x = x.float()
        if membranes is None:
            spikes = super().forward(x)  # type: ignore[misc]
        else:
            spikes, membranes[self] = self.window_forward(x, membranes.get(self), steps.t0)
        if spikes.dtype != dtype:
            marked = spike_registry.is_spikes(spikes)
            spikes = spikes.to(dtype)
            if marked:  # still exactly 0/1: lean storage may keep it as bits (snn.spike_registry)
                spike_registry.mark(spikes)
        return spikes.permute(0, 1, 4, 2, 3) if permuted else spikes

    def integrates_in_fp32(self, x: Tensor, windowed: bool) -> bool:
        """Whether the kernel that runs x keeps an fp32 membrane for a bf16/fp16 x by itself:
        the fused kernel's C (bf16) and Triton backends; window mode: generic steps do not."""
        fused = getattr(self, "backend", "fused") == "fused"  # the "loop" reference integrates in x's dtype
        return fused and not windowed and backends.lif_backend(x, self.surrogate) != "torch"  # type: ignore[attr-defined]

    def window_forward(self, x: Tensor, v0: Optional[Tensor], t0: int) -> tuple[Tensor, Tensor]:
        """(spikes, last membrane) of steps t0.. of x from v0; generic: step functions."""
        return _WindowSteps.apply(self, t0, x, v0, *self.window_params())

    def run_steps(self, x: Tensor, v: Optional[Tensor], t0: int, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Steps t0.. of x [tau, B, ...] from membrane v: (spikes [tau, B, ...], last membrane)."""
        spikes = []
        for i, x_t in enumerate(x.unbind(0)):
            s, v = self.step_with(params, x_t, v, t0 + i)
            spikes.append(s)
        return torch.stack(spikes), v  # type: ignore[return-value]

    def window_params(self) -> tuple[Tensor, ...]:
        return ()

    def step_with(self, params: Sequence[Tensor], x_t: Tensor, v: Optional[Tensor], t: int) -> tuple[Tensor, Tensor]:
        raise TypeError(f"{type(self).__name__} must define step_with")


class StepAdaptiveLIF(WindowedNeuron, AdaptiveLIF):
    """AdaptiveLIF that can also run inside a step window."""

    def window_params(self) -> tuple[Tensor, ...]:
        return (self.leak, self.gain)

    def integrates_in_fp32(self, x: Tensor, windowed: bool) -> bool:
        if windowed:  # the window kernel: C / Triton (bf16 in, fp32 membranes) or torch ops
            return backends.lif_backend(x, self.surrogate) != "torch"  # type: ignore[attr-defined]
        return super().integrates_in_fp32(x, windowed)

    def window_forward(self, x: Tensor, v0: Optional[Tensor], t0: int) -> tuple[Tensor, Tensor]:
        """The hand-written window kernel (``window_lif.py``): as lean as the fused one."""
        return window_adaptive_lif(x, v0, self.leak, self.gain, t0, self.threshold, self.surrogate,
                                   self.reset, self.detach_reset)

    def step_with(self, params: Sequence[Tensor], x_t: Tensor, v: Optional[Tensor], t: int) -> tuple[Tensor, Tensor]:
        leak, gain = params
        i = t if self.adaptive else 0
        return adaptive_lif_step(x_t, v, leak[i], gain[i], self.threshold, self.surrogate, self.reset, self.detach_reset)


class StepLIF(WindowedNeuron, LIF):
    """LIF that can also run inside a step window."""

    def step_with(self, params: Sequence[Tensor], x_t: Tensor, v: Optional[Tensor], t: int) -> tuple[Tensor, Tensor]:
        return lif_step(x_t, v, self.tau, self.threshold, self.surrogate, self.v_reset, self.decay_input,
                        self.detach_reset)


WINDOWED: dict[type, type] = {AdaptiveLIF: StepAdaptiveLIF, LIF: StepLIF}


def windowed_class(cls: type) -> type:
    """The step-window variant of a neuron class (the class itself if it has none)."""
    return WINDOWED.get(cls, cls)


def step_neurons(model: nn.Module) -> list[nn.Module]:
    """Every spiking neuron of ``model``, in a fixed order; all must support windows."""
    neurons = [m for m in model.modules() if isinstance(m, SpikingNeuron)]
    bad = sorted({type(m).__name__ for m in neurons if not isinstance(m, WindowedNeuron)})
    if bad:
        raise ValueError(
            f"time-step checkpointing needs neurons that run in step windows; {', '.join(bad)} "
            f"cannot (supported: {', '.join(c.__name__ for c in WINDOWED)}); "
            "set checkpoint.time_segment=0"
        )
    return neurons
