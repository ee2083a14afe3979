"""Building blocks shared by the model families: time-distributed layers, neuron factories,
and the encoder -> stem routing of hybrid coding.

Layout is [T, B, ...] everywhere. Stateless layers (conv, linear, BN, pooling) run once over the
flattened [T*B, ...] batch, so BatchNorm statistics are taken over all steps and samples together
(the Spikformer convention).
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Callable, Optional

import torch
from torch import nn

from asnn_dist.snn import PerStepReadout, build_encoder

NeuronFactory = Callable[..., nn.Module]

DEFAULT_ENCODING: dict[str, Any] = {"num_steps": 4, "direct_steps": 1, "scheme": "threshold", "levels": "uniform"}


class TimeDistributed(nn.Module):
    """Apply a stateless module to every step by folding time into the batch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        y = self.module(x.flatten(0, 1))
        return y.unflatten(0, (t, b))


def seq(*modules: nn.Module) -> TimeDistributed:
    return TimeDistributed(nn.Sequential(*modules))


def neuron_factory(num_steps: int, neuron: Optional[dict[str, Any]] = None) -> NeuronFactory:
    """A callable making one spiking layer; call sites may override e.g. ``threshold=0.5``."""
    from asnn_dist.registry import NEURONS

    opts = dict(neuron or {})
    kind = opts.pop("kind", "adaptive_lif")
    cls = NEURONS.get(kind)
    return functools.partial(cls, num_steps=num_steps, **opts)


class HybridStem(nn.Module):
    """First layer routed by the encoding: direct (analog) steps and spike steps get their own
    conv+BN (asnn-method.md section 4); everything after the stem is shared."""

    def __init__(self, make_layer: Callable[[], nn.Module], direct_steps: int, num_steps: int) -> None:
        super().__init__()
        self.direct_steps = direct_steps
        self.num_steps = num_steps
        self.direct = seq(make_layer()) if direct_steps > 0 else None
        self.spike = seq(make_layer()) if direct_steps < num_steps else None

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        k = self.direct_steps
        parts = []
        if self.direct is not None:
            parts.append(self.direct(x_seq[:k]))
        if self.spike is not None:
            parts.append(self.spike(x_seq[k:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class SpikingClassifier(nn.Module, abc.ABC):
    """encoder -> body (on [T, B, ...]) -> per-step logits -> learned per-step readout.

    ``forward`` maps images [B, C, H, W] in [0, 1] to logits [B, K], so a registered model is
    self-contained (the encoder is part of it); ``forward_steps`` returns [T, B, K] for anytime
    accuracy.
    """

    def __init__(self, encoding: Optional[dict[str, Any]], learnable_readout: bool = True) -> None:
        super().__init__()
        enc = {**DEFAULT_ENCODING, **(encoding or {})}
        self.encoder = build_encoder(**enc)
        self.num_steps = self.encoder.num_steps
        self.direct_steps = self.encoder.direct_steps
        self.readout = PerStepReadout(self.num_steps, learnable=learnable_readout)

    @abc.abstractmethod
    def forward_body(self, x_seq: torch.Tensor) -> torch.Tensor:
        """[T, B, C, H, W] -> per-step logits [T, B, K]; each family implements it."""

    def forward_steps(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_body(self.encoder(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.readout(self.forward_steps(images))

    def anytime(self, images: torch.Tensor) -> torch.Tensor:
        """Logits from the first t+1 steps, for every t: [T, B, K]."""
        return self.readout.anytime(self.forward_steps(images))
