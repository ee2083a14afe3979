"""Translate an ExperimentConfig into a model, and a run's final checkpoint back into the
trained model (the only places models meet the config and the checkpoint metadata).

Why here: training registers the model it rebuilds and inference loads it the same way, so
both import this module instead of each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from asnn_dist.config.schema import EXECUTION_KEYS_FROM_CONFIG
from asnn_dist.errors import UserError
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
        **cfg.model.options,
    }


# How a model ran (checkpoint.*), which checkpoints written before models/execution.py kept
# with the model's keywords; a model rebuilt from them runs plainly (inference records no
# gradients).
EXECUTION_KEYWORDS = tuple(EXECUTION_KEYS_FROM_CONFIG)


def model_from_config(cfg: "ExperimentConfig") -> nn.Module:
    """The model to train: built from its keywords, then run as ``cfg.checkpoint`` says."""
    from asnn_dist.models.execution import apply_spike_packing, apply_time_checkpointing

    model = create_model(cfg.model.name, **model_kwargs(cfg))
    ckpt = cfg.checkpoint
    apply_time_checkpointing(model, ckpt.time_segment, ckpt.time_levels, ckpt.time_states)
    return apply_spike_packing(model, ckpt.pack_spikes)


def model_from_checkpoint(state_dict: dict[str, Any], meta: dict[str, Any]) -> nn.Module:
    """The trained model of a final checkpoint: ``meta`` names the registered model and its
    keywords (``model_kwargs``), ``state_dict`` holds the consolidated weights."""
    kwargs = {k: v for k, v in meta["kwargs"].items() if k not in EXECUTION_KEYWORDS}
    model = create_model(meta["model"], **kwargs)
    model.load_state_dict(state_dict)
    return model


def attach_metadata(model: nn.Module, in_channels: int, image_size: int, class_names: list[str]) -> nn.Module:
    """Plain attributes pickled with the module, so a registry model is self-describing."""
    model.input_spec = {"channels": in_channels, "image_size": image_size}
    model.class_names = list(class_names)
    return model


def input_spec(model: nn.Module) -> tuple[int, int]:
    """(channels, side) the model was trained on, as ``attach_metadata`` recorded them."""
    spec = getattr(model, "input_spec", None)
    if spec:
        return int(spec["channels"]), int(spec["image_size"])
    raise UserError("the model carries no input_spec; retrain or load it from a checkpoint folder")
