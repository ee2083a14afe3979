"""How a model runs is applied from outside it (``models/execution.py``): time-step
checkpointing and spike packing are set on a built model, change no values, no state-dict
key and no model keyword, and the model families know nothing of them."""

from __future__ import annotations

import ast
import copy
import pickle
from pathlib import Path

import pytest
import torch

from asnn_dist.models.build import model_from_checkpoint
from asnn_dist.models.execution import apply_spike_packing, apply_time_checkpointing, time_checkpointing
from asnn_dist.models.lean import SavesSpikesPacked
from asnn_dist.registry import create_model

FAMILIES = Path(__file__).resolve().parents[2] / "asnn_dist" / "models"
KW = dict(num_classes=5, in_channels=1, image_size=16, encoding=dict(num_steps=4, direct_steps=1))


def test_time_checkpointing_is_installed_replaced_and_removed_without_touching_the_weights():
    torch.manual_seed(0)
    model = create_model("spikformer_tiny", **KW)
    keys = list(model.state_dict())
    assert time_checkpointing(model) is None
    apply_time_checkpointing(model, 2, levels=1)
    assert (time_checkpointing(model).segment, time_checkpointing(model).levels) == (2, 1)
    apply_time_checkpointing(model, 1, states=3)
    assert (time_checkpointing(model).segment, time_checkpointing(model).states) == (1, 3)
    assert list(model.state_dict()) == keys
    clone = pickle.loads(pickle.dumps(model))  # what a registered model would carry
    assert time_checkpointing(clone).states == 3
    apply_time_checkpointing(model, 0)
    assert time_checkpointing(model) is None


def test_packing_switches_every_layer_that_reads_spikes():
    model = create_model("sew_resnet_tiny", **KW)
    layers = [m for m in model.modules() if isinstance(m, SavesSpikesPacked)]
    assert len(layers) >= 5 and all(m.pack_spikes for m in layers)  # on by default: lossless
    apply_spike_packing(model, False)
    assert not any(m.pack_spikes for m in layers)
    x = torch.rand(4, 1, 16, 16)
    plain = model(x)
    assert not any(type(n).__name__.startswith("_Spike") for n in _graph(plain))
    packed = apply_spike_packing(copy.deepcopy(model), True)(x)
    assert torch.equal(plain, packed) and any(type(n).__name__.startswith("_Spike") for n in _graph(packed))


def _graph(out: torch.Tensor) -> list:
    seen, todo = [], [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.append(node)
            todo.extend(n for n, _ in node.next_functions)
    return seen


def test_checkpoints_written_with_execution_keywords_still_load():
    """Final checkpoints saved before execution moved out of the models list time_segment and
    friends among the model keywords; the trained model is rebuilt without them."""
    torch.manual_seed(0)
    model = create_model("lenet_asnn_tiny", **KW)
    old_kwargs = {**KW, "time_segment": 2, "time_levels": 1, "time_states": None, "pack_spikes": False}
    loaded = model_from_checkpoint(model.state_dict(), {"model": "lenet_asnn_tiny", "kwargs": old_kwargs})
    x = torch.rand(2, 1, 16, 16)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert time_checkpointing(loaded) is None


def test_a_neuron_without_step_windows_is_refused_when_checkpointing_is_applied():
    from asnn_dist.snn.neurons import AdaptiveLIF

    model = create_model("lenet_asnn_tiny", **KW)
    model.body[0] = AdaptiveLIF(num_steps=4)  # the snn class, without window support
    with pytest.raises(ValueError, match="set checkpoint.time_segment=0"):
        apply_time_checkpointing(model, 1)
    assert time_checkpointing(model) is None


@pytest.mark.parametrize("family", ["lenet.py", "spikformer.py", "spiking_resnet.py"])
def test_model_families_import_no_execution_machinery(family):
    """A family file says what the network computes: no checkpointing, packing switches or
    execution keywords in it."""
    tree = ast.parse((FAMILIES / family).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"asnn_dist.models.time_checkpoint", "asnn_dist.models.execution"}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    assert not names & {"time_segment", "time_levels", "time_states", "pack_spikes", "packing"}
