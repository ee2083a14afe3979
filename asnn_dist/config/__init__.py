"""Typed experiment configuration (pydantic) loaded from YAML with overrides."""

from asnn_dist.config.loader import (
    apply_overrides,
    dump_config,
    flatten_config,
    load_config,
    read_config_tree,
    validate_config,
)
from asnn_dist.config.schema import (
    CheckpointConfig,
    DataConfig,
    EncodingConfig,
    EngineConfig,
    ExperimentConfig,
    ModelConfig,
    NeuronConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EncodingConfig",
    "EngineConfig",
    "ExperimentConfig",
    "ModelConfig",
    "NeuronConfig",
    "OptimConfig",
    "RunConfig",
    "TrackingConfig",
    "apply_overrides",
    "dump_config",
    "flatten_config",
    "load_config",
    "read_config_tree",
    "validate_config",
]
