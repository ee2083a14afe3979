"""bf16 through the real engine path: ``asnn-dist train``'s launcher, 2 Ray Train workers, each
a DeepSpeed engine with ``bf16`` enabled (bf16 parameters, fp32 master weights), ZeRO-2 and
ZeRO-3, on the digits demo config. Nothing casts the inputs: the model follows the precision
policy of ``snn.precision`` (fp32 images and encoder, bf16 convs, fp32 BatchNorm statistics,
membranes, head and loss)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from asnn_dist.config import load_config

pytestmark = pytest.mark.integration
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "digits-lenet-hybrid.yaml"


@pytest.mark.parametrize("stage", [2, 3])
def test_digits_trains_in_bf16_on_two_workers(stage, tmp_path, digits_shards, ray_local):
    from asnn_dist.train.checkpointing import load_final_model
    from asnn_dist.train.launcher import run_training

    cfg = load_config(DEMO_CONFIG, [
        f"workdir={tmp_path}", f"data.root={digits_shards}", "data.source=shards", "engine.precision=bf16",
        f"engine.zero_stage={stage}", "optim.epochs=2", "run.num_workers=2", "run.cpus_per_worker=1",
        "run.threads_per_worker=1", "run.progress=false", "run.eval_every_steps=0", "checkpoint.every_steps=0",
        "tracking.registered_model=null", f"run.name=bf16-zero{stage}",
    ])
    assert cfg.engine.precision == "bf16" and not cfg.run.use_gpu
    out = run_training(cfg)
    m = out.metrics
    assert m["val_count"] == 360 and math.isfinite(m["val_loss"])
    # two epochs of the demo recipe: far above chance (10 %) if bf16 training works
    assert m["val_top1"] > 0.6, m["val_top1"]
    state_dict, meta = load_final_model(str(out.checkpoint_path))
    # the consolidated model is fp32, buffers included (running statistics stayed fp32), and
    # its weights are the optimizer's fp32 masters, not the engine's bf16-rounded copies
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.float32 for v in floats.values())
    assert any(k.endswith("running_var") for k in floats)
    weight = state_dict["body.2.0.0.weight"]  # a conv of the LeNet
    assert not torch.equal(weight, weight.to(torch.bfloat16).float())
