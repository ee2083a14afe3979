"""Building blocks shared by the model families: time-distributed layers, per-step BatchNorm,
neuron factories, the encoder -> stem routing of hybrid coding, and the classifier base.

Layout is [T, B, ...] everywhere (inside a checkpointed window, [tau, B, ...] for the window's
steps, which step-dependent layers get as ``steps``: ``temporal.Steps``). Stateless layers
(conv, linear, pooling) run once over the flattened [T*B, ...] batch.
Conv maps [T, B, C, H, W] are stored channels-last from the stem on (``channels_last_seq``).
BatchNorm takes its statistics per time step (``StepBatchNorm``; why in ``step_norm.py``).
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from asnn_dist.models.lean import SpikeConv2d, SpikeLinear
from asnn_dist.models.step_neurons import windowed_class
from asnn_dist.models.step_norm import StepBatchNorm
from asnn_dist.models.temporal import ALL_STEPS, StepModule, Steps, StepSequential, cat_steps, channels_last_seq
from asnn_dist.snn import PerStepReadout, build_encoder
from asnn_dist.snn.precision import compute_dtype, is_low

NeuronFactory = Callable[..., nn.Module]

DEFAULT_ENCODING: dict[str, Any] = {"num_steps": 4, "direct_steps": 1, "scheme": "threshold", "levels": "uniform"}


class TimeDistributed(nn.Sequential):
    """Apply stateless modules to every step by folding time into the batch.

    A Sequential so that spike statistics see the conv/linear that reads a neuron's spikes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        y = super().forward(x.flatten(0, 1))
        if y.dim() == 4:  # maps leave channels-last (a 1-channel input can make conv pick NCHW)
            y = y.contiguous(memory_format=torch.channels_last)
        return y.unflatten(0, (t, b))


def seq(*modules: nn.Module) -> TimeDistributed:
    return TimeDistributed(*modules)


def conv_bn(
    c_in: int, c_out: int, num_steps: int, kernel: int = 3, stride: int = 1, spike_input: bool = True,
) -> StepSequential:
    """conv (no bias: BN follows) -> per-step BN, on [T, B, C, H, W].

    ``spike_input``: the input holds spikes or spike counts (kept as uint8 for backward)."""
    conv_cls = SpikeConv2d if spike_input else nn.Conv2d
    conv = conv_cls(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return StepSequential(seq(conv), StepBatchNorm(c_out, num_steps))


class Fp32Head:
    """Mixin for the classifier head: under autocast, or with bf16/fp16 weights (a bf16
    engine), it runs in fp32 (input and weights upcast; the weight gradient goes back in the
    weights' dtype).

    Why (``snn.precision``): bf16 logits carry 8 significant bits; on the digits run that
    cost about a point of test accuracy, while the head is a tiny share of the FLOPs."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if torch.is_autocast_enabled(kind) or is_low(self.weight.dtype):
            with torch.autocast(kind, enabled=False):
                return self.fp32_forward(x.float())
        return super().forward(x)  # type: ignore[misc]

    def fp32_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x, self.weight.float(), bias)


class ClassifierHead(Fp32Head, nn.Linear):
    """The per-step linear classifier (fp32 under autocast and on bf16 engines)."""


class SpikeClassifierHead(Fp32Head, SpikeLinear):
    """The per-step linear classifier on spikes (fp32 under autocast and on bf16 engines,
    input kept as uint8)."""

    def fp32_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packs():  # saves x packed; casts the weights to x's dtype (fp32)
            return SpikeLinear.forward(self, x)
        return Fp32Head.fp32_forward(self, x)


def neuron_factory(num_steps: int, neuron: Optional[dict[str, Any]] = None) -> NeuronFactory:
    """A callable making one spiking layer; call sites may override e.g. ``threshold=0.5``."""
    from asnn_dist.registry import NEURONS

    opts = dict(neuron or {})
    kind = opts.pop("kind", "adaptive_lif")
    cls = windowed_class(NEURONS.get(kind))
    return functools.partial(cls, num_steps=num_steps, **opts)


class HybridStem(StepModule):
    """First layer routed by the encoding: direct (analog) steps and spike steps get their own
    layer (conv+BN, asnn-method.md section 4); everything after the stem is shared.

    ``make_layer`` builds a StepModule on [tau, B, ...]. Routing uses absolute step indices, so
    a checkpointed window that starts at t0 sends only its steps below ``direct_steps`` to the
    direct layer.
    """

    def __init__(self, make_layer: Callable[[], nn.Module], direct_steps: int, num_steps: int) -> None:
        super().__init__()
        self.direct_steps = direct_steps
        self.num_steps = num_steps
        self.direct = make_layer() if direct_steps > 0 else None
        self.spike = make_layer() if direct_steps < num_steps else None

    def forward(self, x_seq: torch.Tensor, steps: Steps = ALL_STEPS) -> torch.Tensor:  # type: ignore[override]
        if x_seq.dim() == 5:
            x_seq = channels_last_seq(x_seq)  # conv maps stay channels-last from here on
        tau = x_seq.shape[0]
        k = min(max(self.direct_steps - steps.t0, 0), tau)
        parts = []
        if k > 0:
            parts.append(self.direct(x_seq[:k], steps))
        if k < tau:
            parts.append(self.spike(x_seq[k:], steps.shifted(k)))
        return cat_steps(parts)


class SpikingClassifier(nn.Module, abc.ABC):
    """encoder -> body (on [T, B, ...]) -> per-step logits -> learned per-step readout.

    ``neuron``: options of every spiking layer (``neuron_factory``).
    ``forward`` maps images [B, C, H, W] in [0, 1] to logits [B, K], so a registered model is
    self-contained (the encoder is part of it); ``forward_steps`` returns [T, B, K] for anytime
    accuracy. How the body runs (time-step checkpointing, packed spikes) is set from outside
    by ``models.execution``; the families only say what the body computes.
    """

    body_runner: Optional[Callable[["SpikingClassifier", torch.Tensor], torch.Tensor]] = None

    def __init__(
        self, *, encoding: Optional[dict[str, Any]] = None, neuron: Optional[dict[str, Any]] = None,
        learnable_readout: bool = True,
    ) -> None:
        # Families take these as ``**options`` and pass them here, so the list lives once
        # (and once more, for configs, in models/__init__.py's CLASSIFIER_KEYWORDS).
        super().__init__()
        enc = {**DEFAULT_ENCODING, **(encoding or {})}
        self.encoder = build_encoder(**enc)
        self.num_steps = self.encoder.num_steps
        self.direct_steps = self.encoder.direct_steps
        self.readout = PerStepReadout(self.num_steps, learnable=learnable_readout)
        self.neuron_options = dict(neuron or {})

    def neuron_factory(self) -> NeuronFactory:
        """Makes this model's spiking layers: the ``neuron`` options at its T steps."""
        return neuron_factory(self.num_steps, self.neuron_options)

    @abc.abstractmethod
    def forward_body(self, x_seq: torch.Tensor, steps: Steps = ALL_STEPS) -> torch.Tensor:
        """[tau, B, C, H, W] holding ``steps`` -> per-step logits [tau, B, K]; each family
        implements it."""

    def forward_steps(self, images: torch.Tensor) -> torch.Tensor:
        # Encode in the images' dtype (fp32 thresholds), then compute in the parameters'
        # dtype (bf16 on a bf16 engine); see snn.precision.
        x_seq = self.encoder(images)
        dtype = compute_dtype(self)
        if x_seq.dtype != dtype and x_seq.is_floating_point():
            x_seq = x_seq.to(dtype)
        if self.body_runner is not None and torch.is_grad_enabled():
            return self.body_runner(self, x_seq)  # e.g. checkpointed window by window
        return self.forward_body(x_seq)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.readout(self.forward_steps(images))

    def anytime(self, images: torch.Tensor) -> torch.Tensor:
        """Logits from the first t+1 steps, for every t: [T, B, K]."""
        return self.readout.anytime(self.forward_steps(images))
