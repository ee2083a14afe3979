"""How a model runs, applied from outside the model (as torchtitan applies activation
checkpointing to a model it did not write): time-step checkpointing and packed spikes.

Why outside: the model files say what the network computes; memory/recompute trade-offs are
the training run's choice (``checkpoint.*`` in the config), made after the model is built and
equally applicable to any family. Nothing here changes values or gradients (the equality
tests in ``tests/unit/test_models_time_checkpoint.py`` and ``test_models_lean.py`` show it),
and nothing here is saved in a state dict.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from asnn_dist.models.lean import SavesSpikesPacked
from asnn_dist.models.step_neurons import step_neurons
from asnn_dist.models.time_checkpoint import TimeCheckpointing


def apply_time_checkpointing(model: nn.Module, segment: int, levels: int = 2, states: Optional[int] = None) -> nn.Module:
    """Checkpoint ``model``'s body every ``segment`` steps while it trains (0: run it plainly).

    ``levels``/``states``: the schedule (``time_checkpoint.py``). Raises ValueError for a bad
    schedule, or when a neuron of the model cannot run in step windows."""
    if not hasattr(model, "forward_body"):
        raise TypeError(f"{type(model).__name__} has no forward_body: not a SpikingClassifier")
    if segment == 0 and not isinstance(segment, bool):
        model.__dict__.pop("body_runner", None)
        return model
    runner = TimeCheckpointing(segment, levels, states)  # checks the schedule
    step_neurons(model)  # every neuron must run in windows: fail now, not in the first step
    model.body_runner = runner
    return model


def apply_spike_packing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Whether layers that read spikes save them packed for backward (lossless, ``lean.py``)."""
    for module in model.modules():
        if isinstance(module, SavesSpikesPacked):
            module.pack_spikes = bool(enabled)
    return model


def time_checkpointing(model: nn.Module) -> Optional[TimeCheckpointing]:
    """The schedule ``apply_time_checkpointing`` installed on ``model`` (None: plain)."""
    runner = getattr(model, "body_runner", None)
    return runner if isinstance(runner, TimeCheckpointing) else None
