"""Generate DeepSpeed's JSON config from our typed config (never hand-written JSON).

AdamW and SGD are torch optimizers handed to ``deepspeed.initialize``: their step counts are
per-parameter tensors in the state dict, so a resumed run continues bit for bit (DeepSpeed's
CPU fused Adam keeps bias-correction powers in C++ state that a restore recomputes with
``pow``, which differs in the last bits). The schedule (warmup + cosine, per optimizer step) is ours (``schedule.py``) rather than a
DeepSpeed scheduler so that plain-PyTorch references and resumed runs share one definition.

``build_engine`` is the one place this package calls ``deepspeed.initialize`` (the training
worker, ``bench zero``, ``bench train``, the tests): it applies ``deepspeed_compat`` first, so
that fp32 ZeRO-3 runs keep no redundant fp32 master copy of their weight partition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine

    from asnn_dist.config import ExperimentConfig


def build_deepspeed_config(cfg: "ExperimentConfig", world_size: int) -> dict[str, Any]:
    o, e = cfg.optim, cfg.engine
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.zero_stage >= 1:
        # Small buckets keep tiny CPU test models from allocating 500 MB buffers.
        zero.update(reduce_bucket_size=5e7, allgather_bucket_size=5e7, overlap_comm=False, contiguous_gradients=True)
    if e.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4, stage3_prefetch_bucket_size=5e7,
                    stage3_gather_16bit_weights_on_model_save=True)
    if e.offload_optimizer and e.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum_steps,
        "train_batch_size": o.micro_batch_size * o.grad_accum_steps * world_size,
        "zero_optimization": zero,
        "gradient_clipping": o.grad_clip,
        "steps_per_print": e.steps_per_print,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if o.name == "lamb":  # DeepSpeed's own LAMB; AdamW/SGD are torch optimizers (build_optimizer)
        ds["optimizer"] = {"type": "Lamb", "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay}}
    if e.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif e.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return ds


def build_optimizer(cfg: "ExperimentConfig", params) -> Optional["torch.optim.Optimizer"]:
    """The client optimizer for ``deepspeed.initialize`` (None: DeepSpeed builds LAMB itself)."""
    import torch

    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                 foreach=True)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return None


def build_engine(cfg: "ExperimentConfig", model: "torch.nn.Module", world_size: int
                 ) -> tuple["DeepSpeedEngine", Any]:
    """The DeepSpeed engine for ``model`` and its optimizer (DeepSpeed's wrapper; its
    ``param_groups`` are the ones to set the learning rate on), from our config, with
    ``deepspeed_compat`` applied. Every rank calls it (``deepspeed.initialize`` is collective)."""
    import deepspeed

    from asnn_dist.train import deepspeed_compat

    deepspeed_compat.apply()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                   optimizer=build_optimizer(cfg, params),
                                                   config=build_deepspeed_config(cfg, world_size))
    return engine, optimizer
