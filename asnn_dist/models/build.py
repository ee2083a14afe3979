"""Translate an ExperimentConfig into a model (the only place models meet the config)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from asnn_dist.registry import create_model

if TYPE_CHECKING:
    from asnn_dist.config import ExperimentConfig


def model_kwargs(cfg: "ExperimentConfig") -> dict:
    """Keyword arguments of the registered model factory (also logged with the model)."""
    return {
        "num_classes": cfg.data.num_classes,
        "in_channels": cfg.data.in_channels,
        "image_size": cfg.data.image_size,
        "encoding": cfg.encoding.model_dump(),
        "neuron": cfg.neuron.model_dump(),
        "learnable_readout": cfg.model.learnable_readout,
        "time_segment": cfg.checkpoint.time_segment,
        "time_levels": cfg.checkpoint.time_levels,
        "time_states": cfg.checkpoint.time_states,
        **cfg.model.options,
    }


def model_from_config(cfg: "ExperimentConfig") -> nn.Module:
    return create_model(cfg.model.name, **model_kwargs(cfg))
