"""Generate DeepSpeed's JSON config from our typed config (never hand-written JSON).

AdamW and SGD are torch optimizers handed to ``deepspeed.initialize``: their step counts are
per-parameter tensors in the state dict, so a resumed run continues bit for bit (DeepSpeed's
CPU fused Adam keeps bias-correction powers in C++ state that a restore recomputes with
``pow``, which differs in the last bits). The schedule (warmup + cosine, per optimizer step) is ours (``schedule.py``) rather than a
DeepSpeed scheduler so that plain-PyTorch references and resumed runs share one definition.

``build_engine`` is the one place this package calls ``deepspeed.initialize`` (the training
worker, ``bench zero``, ``bench train``, the tests): it applies ``deepspeed_compat`` first, so
that fp32 ZeRO-3 runs keep no redundant fp32 master copy of their weight partition.

One rank. ZeRO-1/2 with a data-parallel world of one partitions nothing: the rank's partition
is the whole model, yet DeepSpeed still keeps an fp32 master clone of the weights, copies every
gradient into its flat buffer in per-parameter hooks, "averages" it with an all-reduce over one
rank, computes the gradient norm and copies the updated master back into the weights (measured
on the digits LeNet, 1 CPU thread: +8-13% CPU per step over a plain loop; ZeRO-0: +2-6%, most of
it the engine's flatten / one-rank all-reduce / unflatten of the gradients). ``run_stage`` runs
such an engine as ZeRO-0 and ``build_engine`` turns the one-rank all-reduce off when that trains
bit for bit the same weights (the tests check it over many steps, with gradient accumulation,
AdamW with weight decay and SGD with momentum), which holds when the update is elementwise in
the same order: fp32, a torch optimizer (adamw, sgd), no gradient clipping (ZeRO sums the clip
norm in another order: last-bit differences), no optimizer offload (that moves the step to
another optimizer and device), on CPU (where it was verified). Everything else keeps the
configured stage. The config, MLflow params and checkpoint folders keep the configured
``engine.zero_stage``; the checkpoint holds the stage-0 layout (a one-rank ZeRO-2 checkpoint
could not be resumed on another world size either: DeepSpeed refuses a changed DP world size).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch
    from deepspeed import DeepSpeedEngine

    from asnn_dist.config import ExperimentConfig

log = logging.getLogger(__name__)


def single_rank_exact(cfg: "ExperimentConfig", world_size: int) -> bool:
    """Whether a one-rank engine trains the same bits as ZeRO-0 without its all-reduce
    (module docstring: one rank, CPU, fp32, adamw/sgd, no clipping, no optimizer offload)."""
    e, o = cfg.engine, cfg.optim
    return (world_size == 1 and not cfg.run.use_gpu and e.precision == "fp32" and o.name in ("adamw", "sgd")
            and o.grad_clip == 0 and not e.offload_optimizer)


def run_stage(cfg: "ExperimentConfig", world_size: int) -> int:
    """The ZeRO stage the engine runs with: ``engine.zero_stage``, or 0 for a ZeRO-1/2 run where
    ``single_rank_exact`` holds (ZeRO-3 keeps its stage)."""
    if cfg.engine.zero_stage in (1, 2) and single_rank_exact(cfg, world_size):
        return 0
    return cfg.engine.zero_stage


def build_deepspeed_config(cfg: "ExperimentConfig", world_size: int, as_configured: bool = False
                           ) -> dict[str, Any]:
    """DeepSpeed's config dict; ``as_configured`` keeps ``engine.zero_stage`` even where
    ``run_stage`` would run one rank as stage 0 (for comparisons)."""
    o, e = cfg.optim, cfg.engine
    stage = e.zero_stage if as_configured else run_stage(cfg, world_size)
    zero: dict[str, Any] = {"stage": stage}
    gpu = cfg.run.use_gpu
    if stage >= 1 and gpu:
        # GPU: 200 M-element buckets (DeepSpeed's recommended size for ZeRO-1/2) and gradient
        # reduction overlapped with backward on a side stream.
        zero.update(reduce_bucket_size=2e8, allgather_bucket_size=2e8, overlap_comm=True, contiguous_gradients=True)
    elif stage >= 1:
        # CPU: small buckets keep tiny test models from allocating 500 MB buffers; gloo has no
        # side stream to overlap on.
        zero.update(reduce_bucket_size=5e7, allgather_bucket_size=5e7, overlap_comm=False, contiguous_gradients=True)
    if stage == 3 and gpu:
        # DeepSpeed's GPU defaults: 5e8 reduce bucket, 5e7 prefetch, small params (<1e5) kept whole.
        zero.update(reduce_bucket_size=5e8, stage3_param_persistence_threshold=1e5, stage3_prefetch_bucket_size=5e7,
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
                    stage3_gather_16bit_weights_on_model_save=True)
    elif stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4, stage3_prefetch_bucket_size=5e7,
                    stage3_gather_16bit_weights_on_model_save=True)
    if e.offload_optimizer and stage >= 1:  # pinned host buffers speed up GPU<->CPU copies
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}

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


def build_engine(cfg: "ExperimentConfig", model: "torch.nn.Module", world_size: int,
                 as_configured: bool = False) -> tuple["DeepSpeedEngine", Any]:
    """The DeepSpeed engine for ``model`` and its optimizer (DeepSpeed's wrapper; its
    ``param_groups`` are the ones to set the learning rate on), from our config, with
    ``deepspeed_compat`` applied. Every rank calls it (``deepspeed.initialize`` is collective).

    On one rank where ``run_stage`` gives 0 (and ``as_configured`` is False) the engine runs as
    ZeRO-0 and skips its gradient all-reduce over the single rank (a sum over one rank divided
    by one: the gradients it would write back are the ones it read)."""
    import deepspeed

    from asnn_dist.train import deepspeed_compat

    deepspeed_compat.apply()
    params = [p for p in model.parameters() if p.requires_grad]
    ds_config = build_deepspeed_config(cfg, world_size, as_configured)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                   optimizer=build_optimizer(cfg, params), config=ds_config)
    if not as_configured and run_stage(cfg, world_size) == 0 and single_rank_exact(cfg, world_size):
        _skip_single_rank_allreduce(engine)
        if cfg.engine.zero_stage != 0:
            log.info("one rank: ZeRO-%d would partition nothing; running DeepSpeed as ZeRO-0 "
                     "(same weights, fewer copies)", cfg.engine.zero_stage)
    return engine, optimizer


def _skip_single_rank_allreduce(engine: "DeepSpeedEngine") -> None:
    """Turn off a ZeRO-0 engine's backward all-reduce when its data-parallel world is one rank
    (DeepSpeed's own switch, ``enable_backward_allreduce``; checked, not assumed)."""
    import torch.distributed as dist

    ranks = dist.get_world_size() if dist.is_initialized() else 1
    if (engine.zero_optimization_stage() == 0 and getattr(engine, "dp_world_size", ranks) == 1 and ranks == 1
            and hasattr(engine, "enable_backward_allreduce")):
        engine.enable_backward_allreduce = False
