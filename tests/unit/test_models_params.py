"""Parameter counts of the published sizes (direct coding, non-adaptive neurons) within 1% of
the papers, and the ASNN overhead is O(layers x T). Built on the meta device: no memory, no
initialisation, so the 66 M-parameter Spikformer costs milliseconds."""

import pytest
import torch

from asnn_dist.registry import create_model

PUBLISHED = {
    "spikformer_4_384": 9.32e6,
    "spikformer_8_384": 16.81e6,
    "spikformer_8_512": 29.68e6,
    "spikformer_8_768": 66.34e6,
    "sew_resnet34": 21.79e6,
    "sew_resnet18": 11.69e6,
    "spiking_resnet34": 21.79e6,
    "spiking_resnet18": 11.69e6,
}
DIRECT = dict(num_steps=4, direct_steps=4, scheme="direct")


def count(name: str, **kwargs) -> tuple[int, int]:
    """(parameters, spiking layers) of a model built on the meta device."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    neurons = sum(1 for m in model.modules() if hasattr(m, "leak"))
    return sum(p.numel() for p in model.parameters()), neurons


@pytest.mark.parametrize("name,target", sorted(PUBLISHED.items()))
def test_published_sizes_within_one_percent(name, target):
    params, _ = count(name, encoding=DIRECT, neuron=dict(adaptive=False))
    assert abs(params / target - 1) < 0.01, f"{name}: {params} vs {target:.0f}"


@pytest.mark.parametrize("name", ["spikformer_8_768", "sew_resnet34", "lenet_asnn"])
@pytest.mark.parametrize("steps", [4, 8])
def test_asnn_adds_only_per_step_scalars_per_layer(name, steps):
    """Adaptive neurons add 2 (T - 1) scalars per spiking layer; hybrid coding one more stem."""
    base, neurons = count(name, encoding=dict(DIRECT, num_steps=steps, direct_steps=steps),
                          neuron=dict(adaptive=False))
    adaptive, _ = count(name, encoding=dict(DIRECT, num_steps=steps, direct_steps=steps))
    assert adaptive - base == neurons * 2 * (steps - 1)
    hybrid, _ = count(name, encoding=dict(num_steps=steps, direct_steps=1, scheme="threshold"))
    stem_conv = hybrid - adaptive
    assert 0 < stem_conv < 0.02 * base  # one extra first conv + BN
