"""The authors' LeNet-style ASNN demonstration network (asnn-method.md section 5).

For a 32x32x3 input: conv 3->32->48->64 (3x3, BN, spiking, 2x2 max-pool), linear 1024->256 with
BN and spiking, linear to classes, per-step readout scale.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from asnn_dist.models.common import (
    HybridStem, SpikeClassifierHead, SpikingClassifier, conv_bn, neuron_factory, seq,
)
from asnn_dist.models.lean import SpikeLinear, SpikeMaxPool2d
from asnn_dist.models.step_norm import StepBatchNorm
from asnn_dist.registry import MODELS


class LeNetASNN(SpikingClassifier):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] = (32, 48, 64),
        hidden: int = 256,
        encoding: Optional[dict[str, Any]] = None,
        neuron: Optional[dict[str, Any]] = None,
        learnable_readout: bool = True,
        time_segment: int = 0,
        time_levels: int = 2,
        time_states: Optional[int] = None,
        pack_spikes: bool = True,
    ) -> None:
        super().__init__(encoding, learnable_readout, time_segment, pack_spikes, time_levels, time_states)
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2x2 pools), got {image_size}")
        T = self.num_steps
        make_neuron = neuron_factory(T, neuron)
        self.stem = HybridStem(
            lambda: conv_bn(in_channels, widths[0], T, spike_input=False), self.direct_steps, T
        )
        layers: list[nn.Module] = [make_neuron(), seq(SpikeMaxPool2d(2))]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [conv_bn(c_in, c_out, T), make_neuron(), seq(SpikeMaxPool2d(2))]
        side = image_size // 8
        layers += [
            seq(nn.Flatten(), SpikeLinear(widths[-1] * side * side, hidden, bias=False)),
            StepBatchNorm(hidden, T),
            make_neuron(),
            seq(SpikeClassifierHead(hidden, num_classes)),
        ]
        self.body = nn.Sequential(*layers)

    def forward_body(self, x_seq):  # type: ignore[override]
        return self.body(self.stem(x_seq))


@MODELS.register("lenet_asnn")
def lenet_asnn(**kwargs: Any) -> LeNetASNN:
    return LeNetASNN(**kwargs)


@MODELS.register("lenet_asnn_tiny", tags=("tiny",))
def lenet_asnn_tiny(**kwargs: Any) -> LeNetASNN:
    kwargs.setdefault("widths", (4, 8, 8))
    kwargs.setdefault("hidden", 16)
    return LeNetASNN(**kwargs)
