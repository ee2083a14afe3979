"""Spiking ResNet and SEW-ResNet (Fang et al., NeurIPS 2021), ResNet-18/34 topology, in ASNN form.

Both follow SpikingJelly's model zoo (basic blocks of two 3x3 conv-BN, 1x1 conv-BN
downsampling):
- Spiking ResNet: out = spike(BN(conv2(spike(BN(conv1(x))))) + shortcut(x)) - the neuron
  after the residual sum.
- SEW-ResNet (ADD): out = spike(BN(conv2(...))) + shortcut(x), where a downsampling shortcut
  is conv-BN-spike; the block output is a spike count (small integer), not a spike.
Stems: ImageNet (7x7/2 conv-BN-spike, 3x3/2 max-pool) or CIFAR (3x3/1 conv-BN-spike); the
conv+BN is the hybrid stem (direct steps get their own). Head: global average pool and a
linear layer at every step, then the per-step readout. BN statistics are per time step.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn

from asnn_dist.models.common import (
    ClassifierHead, HybridStem, NeuronFactory, SpikingClassifier, conv_bn, seq,
)
from asnn_dist.models.lean import SpikeMaxPool2d
from asnn_dist.models.temporal import ALL_STEPS, StepModule, Steps, StepSequential

STEMS = ("imagenet", "cifar")


class BasicBlock(StepModule):
    def __init__(
        self, c_in: int, c_out: int, stride: int, sew: bool, make_neuron: NeuronFactory, num_steps: int
    ) -> None:
        super().__init__()
        self.sew = sew
        self.conv1, self.sn1 = conv_bn(c_in, c_out, num_steps, stride=stride), make_neuron()
        self.conv2, self.sn2 = conv_bn(c_out, c_out, num_steps), make_neuron()
        self.downsample: Optional[StepSequential] = None
        if stride != 1 or c_in != c_out:
            layers = [conv_bn(c_in, c_out, num_steps, kernel=1, stride=stride)]
            if sew:
                layers.append(make_neuron())
            self.downsample = StepSequential(*layers)

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        out = self.conv2(self.sn1(self.conv1(x, steps), steps), steps)
        identity = x if self.downsample is None else self.downsample(x, steps)
        if self.sew:
            return self.sn2(out, steps) + identity
        return self.sn2(out + identity, steps)


class SpikingResNet(SpikingClassifier):
    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        sew: bool = True,
        stem: str = "imagenet",
        **options: Any,
    ) -> None:
        super().__init__(**options)  # encoding, neuron, readout: SpikingClassifier's
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {list(STEMS)}, got {stem!r}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} need the same non-zero length")
        minimum = (4 if stem == "imagenet" else 1) * 2 ** (len(widths) - 1)
        if image_size < minimum:
            raise ValueError(f"image_size must be >= {minimum} for this stem and depth, got {image_size}")
        T = self.num_steps
        make_neuron = self.neuron_factory()
        imagenet = stem == "imagenet"
        self.stem = HybridStem(
            lambda: conv_bn(in_channels, widths[0], T, kernel=7 if imagenet else 3, stride=2 if imagenet else 1,
                            spike_input=False),
            self.direct_steps, T,
        )
        body: list[nn.Module] = [make_neuron()]
        if imagenet:
            body.append(seq(SpikeMaxPool2d(3, stride=2, padding=1)))
        c_in = widths[0]
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                body.append(BasicBlock(c_in, width, stride, sew, make_neuron, T))
                c_in = width
        self.body = StepSequential(*body)
        self.head = seq(nn.AdaptiveAvgPool2d(1), nn.Flatten(), ClassifierHead(c_in, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_body(self, x_seq: Tensor, steps: Steps = ALL_STEPS) -> Tensor:
        return self.head(self.body(self.stem(x_seq, steps), steps))

