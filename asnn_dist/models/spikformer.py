"""Spikformer (Zhou et al., ICLR 2023) in ASNN form (asnn-method.md section 5).

Structure of the official code (ZK-Zhou/spikformer):
- SPS stem: conv3x3-BN-spike blocks with D/8, D/4, D/2, D channels and 3x3/2 max-pools (CIFAR:
  after the last two, 32x32 -> 8x8 = 64 tokens; ImageNet: after all four, 224 -> 14x14 = 196
  tokens), then a relative position embedding conv-BN-spike added to its input.
- L blocks: x = x + SSA(x); x = x + MLP(x). SSA: Q, K, V each 1x1 conv (a linear over
  channels) + BN + spike; attention Q (K^T V) * 0.125 without softmax (the official ImageNet
  code's order; exact, as spike products are small integers), an attention neuron at
  threshold 0.5, then a projection linear + BN + spike. MLP: linear-BN-spike twice (ratio 4).
- mean over tokens, a linear head at every step, then the per-step readout (ASNN).

Differences, all deliberate: every spiking layer is an adaptive neuron from the ``neuron``
dict; the first conv+BN is the hybrid stem (direct steps get their own); BN statistics are
per time step (``step_norm.StepBatchNorm``); linears before BN have no bias (a bias followed
by BN has an identically zero gradient: the official proj/fc biases are dead parameters), so
counts are 0.06-0.1% below the papers'. Tokens are laid out [T, B, N, C] so that every 1x1
conv is one matrix multiply.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from asnn_dist.models import CIFAR_POOLS
from asnn_dist.models.common import (
    ClassifierHead, HybridStem, NeuronFactory, SpikingClassifier, conv_bn, seq,
)
from asnn_dist.models.lean import SpikeAttention, SpikeLinear, SpikeMaxPool2d
from asnn_dist.models.step_norm import StepBatchNorm
from asnn_dist.models.temporal import ALL_STEPS, StepModule, Steps, StepSequential


class LinearBN(StepModule):
    """Linear over the channel (last) dim, no bias, then per-step BN: a 1x1 conv1d + BN.

    ``spike_input``: the input is spikes or a residual sum of spikes (kept as uint8)."""

    def __init__(self, c_in: int, c_out: int, num_steps: int, spike_input: bool = True) -> None:
        super().__init__()
        self.linear = (SpikeLinear if spike_input else nn.Linear)(c_in, c_out, bias=False)
        self.bn = StepBatchNorm(c_out, num_steps, channel_last=True)

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        return self.bn(self.linear(x), steps)


class SpikingPatchSplitting(StepModule):
    """SPS: [T, B, C, H, W] images -> [T, B, N, D] spike tokens (plus the position term)."""

    def __init__(
        self, in_channels: int, dim: int, pools: Sequence[bool], make_neuron: NeuronFactory,
        num_steps: int, direct_steps: int,
    ) -> None:
        super().__init__()
        widths = [dim // 8, dim // 4, dim // 2, dim]
        self.stem = HybridStem(
            lambda: conv_bn(in_channels, widths[0], num_steps, spike_input=False), direct_steps, num_steps
        )
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            if i:
                layers.append(conv_bn(widths[i - 1], width, num_steps))
            layers.append(make_neuron())
            if pools[i]:
                layers.append(seq(SpikeMaxPool2d(3, stride=2, padding=1)))
        self.proj = StepSequential(*layers)
        self.rpe = StepSequential(conv_bn(dim, dim, num_steps), make_neuron())

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        x = self.proj(self.stem(x, steps), steps)
        x = x + self.rpe(x, steps)
        return x.flatten(3).transpose(-1, -2).contiguous()


class SpikingSelfAttention(StepModule):
    """SSA on [T, B, N, D] without softmax: spike(Q (K^T V) * scale) -> proj-BN-spike."""

    def __init__(self, dim: int, heads: int, make_neuron: NeuronFactory, num_steps: int, scale: float = 0.125) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.q, self.k, self.v = (LinearBN(dim, dim, num_steps) for _ in range(3))
        self.q_lif, self.k_lif, self.v_lif = make_neuron(), make_neuron(), make_neuron()
        self.attention = SpikeAttention(heads, scale)
        self.attn_lif = make_neuron(threshold=0.5)
        self.proj = LinearBN(dim, dim, num_steps)
        self.proj_lif = make_neuron()

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        q = self.q_lif(self.q(x, steps), steps)
        k = self.k_lif(self.k(x, steps), steps)
        v = self.v_lif(self.v(x, steps), steps)
        y = self.attention(q, k, v)  # [T, B, N, C], heads concatenated
        return self.proj_lif(self.proj(self.attn_lif(y, steps), steps), steps)


class SpikingMLP(StepModule):
    def __init__(self, dim: int, hidden: int, make_neuron: NeuronFactory, num_steps: int) -> None:
        super().__init__()
        self.fc1, self.fc1_lif = LinearBN(dim, hidden, num_steps), make_neuron()
        self.fc2, self.fc2_lif = LinearBN(hidden, dim, num_steps), make_neuron()

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        h = self.fc1_lif(self.fc1(x, steps), steps)
        return self.fc2_lif(self.fc2(h, steps), steps)


class Block(StepModule):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, make_neuron: NeuronFactory, num_steps: int) -> None:
        super().__init__()
        self.attn = SpikingSelfAttention(dim, heads, make_neuron, num_steps)
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio), make_neuron, num_steps)

    def forward(self, x: Tensor, steps: Steps = ALL_STEPS) -> Tensor:  # type: ignore[override]
        x = x + self.attn(x, steps)
        return x + self.mlp(x, steps)


class Spikformer(SpikingClassifier):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        dim: int = 384,
        depth: int = 4,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        pools: Sequence[bool] = CIFAR_POOLS,
        **options: Any,
    ) -> None:
        super().__init__(**options)  # encoding, neuron, readout: SpikingClassifier's
        if len(pools) != 4:
            raise ValueError(f"pools needs 4 flags (one per SPS conv), got {list(pools)}")
        if dim % 8:
            raise ValueError(f"dim must be a multiple of 8 (SPS widths D/8..D), got {dim}")
        factor = 2 ** sum(bool(p) for p in pools)
        if image_size % factor:
            raise ValueError(f"image_size must be a multiple of {factor} ({sum(pools)} stride-2 pools), got {image_size}")
        T = self.num_steps
        make_neuron = self.neuron_factory()
        self.sps = SpikingPatchSplitting(in_channels, dim, pools, make_neuron, T, self.direct_steps)
        self.blocks = StepSequential(*(Block(dim, heads, mlp_ratio, make_neuron, T) for _ in range(depth)))
        self.head = ClassifierHead(dim, num_classes)
        self.apply(_init_weights)

    def forward_body(self, x_seq: Tensor, steps: Steps = ALL_STEPS) -> Tensor:
        tokens = self.blocks(self.sps(x_seq, steps), steps)
        return self.head(tokens.mean(2))


def _init_weights(m: nn.Module) -> None:
    """As the official code: truncated normal (std 0.02) for linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

