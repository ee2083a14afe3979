"""Model-agnostic SNN core: surrogates, step functions, fused kernels, neurons, encoders,
readout and spike statistics. Importing this package fills the NEURONS, ENCODERS and
SURROGATES registries.
"""

from asnn_dist.snn import encoders, functional, fused, neurons, readout, stats, surrogate
from asnn_dist.snn.encoders import (
    BitplaneEncoder,
    DirectEncoder,
    Encoder,
    HybridEncoder,
    RateEncoder,
    ThresholdEncoder,
    build_encoder,
    equal_mass_thresholds,
    equal_mass_transform,
    uniform_thresholds,
)
from asnn_dist.snn.functional import adaptive_lif_step, lif_step, multistep_loop
from asnn_dist.snn.fused import fused_adaptive_lif, fused_lif
from asnn_dist.snn.neurons import LIF, AdaptiveLIF, SpikingNeuron, reset_states
from asnn_dist.snn.readout import PerStepReadout
from asnn_dist.snn.stats import SpikeStats, collect_spike_stats, count_flops
from asnn_dist.snn.surrogate import AtanSurrogate, SigmoidSurrogate, Surrogate, build_surrogate

__all__ = [
    "AdaptiveLIF",
    "AtanSurrogate",
    "BitplaneEncoder",
    "DirectEncoder",
    "Encoder",
    "HybridEncoder",
    "LIF",
    "PerStepReadout",
    "RateEncoder",
    "SigmoidSurrogate",
    "SpikeStats",
    "SpikingNeuron",
    "Surrogate",
    "ThresholdEncoder",
    "adaptive_lif_step",
    "build_encoder",
    "build_surrogate",
    "collect_spike_stats",
    "count_flops",
    "encoders",
    "equal_mass_thresholds",
    "equal_mass_transform",
    "functional",
    "fused",
    "fused_adaptive_lif",
    "fused_lif",
    "lif_step",
    "multistep_loop",
    "neurons",
    "readout",
    "reset_states",
    "stats",
    "surrogate",
    "uniform_thresholds",
]
