"""The authors' LeNet-style ASNN demonstration network (asnn-method.md section 5).

For a 32x32x3 input: conv 3->32->48->64 (3x3, BN, spiking, 2x2 max-pool), linear 1024->256 with
BN and spiking, linear to classes, per-step readout scale.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from asnn_dist.models.common import HybridStem, SpikingClassifier, neuron_factory, seq
from asnn_dist.registry import MODELS


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))


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
    ) -> None:
        super().__init__(encoding, learnable_readout)
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2x2 pools), got {image_size}")
        make_neuron = neuron_factory(self.num_steps, neuron)
        self.stem = HybridStem(lambda: _conv_bn(in_channels, widths[0]), self.direct_steps, self.num_steps)
        layers: list[nn.Module] = [make_neuron(), seq(nn.MaxPool2d(2))]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [seq(_conv_bn(c_in, c_out)), make_neuron(), seq(nn.MaxPool2d(2))]
        side = image_size // 8
        layers += [
            seq(nn.Flatten(), nn.Linear(widths[-1] * side * side, hidden, bias=False), nn.BatchNorm1d(hidden)),
            make_neuron(),
            seq(nn.Linear(hidden, num_classes)),
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
