"""The authors' LeNet-style ASNN demonstration network (asnn-method.md section 5).

For a 32x32x3 input: conv 3->32->48->64 (3x3, BN, spiking, 2x2 max-pool), linear 1024->256 with
BN and spiking, linear to classes, per-step readout scale.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from asnn_dist.models.common import HybridStem, SpikeClassifierHead, SpikingClassifier, conv_bn, seq
from asnn_dist.models.lean import SpikeLinear, SpikeMaxPool2d
from asnn_dist.models.step_norm import StepBatchNorm
from asnn_dist.models.temporal import ALL_STEPS, Steps, StepSequential


class LeNetASNN(SpikingClassifier):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] = (32, 48, 64),
        hidden: int = 256,
        **options: Any,
    ) -> None:
        super().__init__(**options)  # encoding, neuron, readout: SpikingClassifier's
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2x2 pools), got {image_size}")
        T = self.num_steps
        make_neuron = self.neuron_factory()
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
        self.body = StepSequential(*layers)

    def forward_body(self, x_seq: Tensor, steps: Steps = ALL_STEPS) -> Tensor:
        return self.body(self.stem(x_seq, steps), steps)

