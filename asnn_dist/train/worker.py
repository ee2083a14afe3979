"""The per-worker training function that Ray Train's TorchTrainer runs on every rank.

Every rank: builds the model and its DeepSpeed engine, streams its share of the shards, trains,
evaluates (sums all-reduced so each sample counts once), saves its part of the checkpoint and
calls ``ray.train.report`` on the same cadence (the report is a barrier). Only world rank 0
talks to MLflow.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F

from asnn_dist.config import ExperimentConfig
from asnn_dist.train import checkpointing as ckpt
from asnn_dist.train.deepspeed_config import build_deepspeed_config
from asnn_dist.train.evaluate import evaluate
from asnn_dist.train.schedule import lr_at


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over the valid rows (padding rows that equalise batch counts add nothing)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)
    v = valid.to(ce.dtype)
    return (ce * v).sum() / v.sum().clamp_min(1.0)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:  # pragma: no cover - ray always ships it
        from tqdm import tqdm
    bar = tqdm(total=total, desc="train steps")
    if initial:
        bar.update(initial)  # resumed run: the bar starts where the run stands
    return bar


def _make_loaders(cfg: ExperimentConfig, rank: int, world: int):
    from asnn_dist.data.loader import ShardLoader
    from asnn_dist.data.manifest import load_manifest

    root = cfg.data.root
    common = dict(rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                  image_size=cfg.data.image_size, seed=cfg.seed)
    train = ShardLoader(load_manifest(f"{root}/{cfg.data.train_split}.manifest.json"),
                        batch_size=cfg.optim.micro_batch_size, train=True,
                        shuffle_buffer=cfg.data.shuffle_buffer, augment=cfg.data.augment, **common)
    val = ShardLoader(load_manifest(f"{root}/{cfg.data.val_split}.manifest.json"),
                      batch_size=cfg.optim.micro_batch_size, train=False, **common)
    return train, val


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train

    from asnn_dist.models.build import model_from_config, model_kwargs

    cfg = ExperimentConfig.model_validate(loop_config["config"])
    logging.getLogger("ray.train").setLevel(cfg.run.log_level)
    run_id: Optional[str] = loop_config.get("mlflow_run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.run.threads_per_worker)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts)

    model = model_from_config(cfg)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=build_deepspeed_config(cfg, world),
    )
    train_loader, val_loader = _make_loaders(cfg, rank, world)
    accum = cfg.optim.grad_accum_steps
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"each rank gets {len(train_loader)} micro batches per epoch, fewer than "
            f"optim.grad_accum_steps={accum}; lower optim.micro_batch_size or grad_accum_steps"
        )
    total_steps = steps_per_epoch * cfg.optim.epochs

    state = {"epoch": 0, "global_step": 0}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            state = ckpt.load_training_checkpoint(engine, folder, rank)

    logger = None
    if rank == 0 and run_id:
        from asnn_dist.tracking.client import RunLogger

        logger = RunLogger(cfg.tracking.uri, run_id)
    bar = _progress(total_steps, state["global_step"], rank == 0 and cfg.run.progress)
    torch.manual_seed(cfg.seed + 1000 * rank + state["epoch"])  # per-rank stochastic codes

    step = state["global_step"]
    for epoch in range(state["epoch"], cfg.optim.epochs):
        train_loader.set_epoch(epoch)
        engine.train()
        t0, seen, loss_acc = time.perf_counter(), 0, 0.0
        for micro, batch in enumerate(train_loader):
            if micro >= steps_per_epoch * accum:
                break
            images, labels, valid = batch[:3]
            lr = lr_at(step, total_steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr, cfg.optim.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = masked_loss(engine(images), labels, valid, cfg.optim.label_smoothing)
            engine.backward(loss)
            engine.step()
            seen += int(valid.sum())
            loss_acc += float(loss.detach())
            if (micro + 1) % accum:
                continue
            step += 1
            if bar is not None:
                bar.update(1)
            if logger is not None and step % cfg.run.log_every_steps == 0:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                logger.log_metrics({"train_loss": loss_acc / accum / cfg.run.log_every_steps, "lr": lr,
                                    "images_per_s": seen * world / elapsed}, step)
                loss_acc = 0.0
        epoch_time = time.perf_counter() - t0
        metrics = evaluate(engine.module, val_loader, engine.module.num_steps)
        metrics.update(epoch=epoch + 1, global_step=step, train_images_per_s=seen * world / max(epoch_time, 1e-9))
        if logger is not None:
            logger.log_metrics(metrics, step)
        _report(engine, cfg, rank, {"epoch": epoch + 1, "global_step": step}, metrics,
                final=epoch + 1 == cfg.optim.epochs, meta={"model": cfg.model.name, "kwargs": model_kwargs(cfg)})
    if bar is not None:
        bar.close()


def _report(engine, cfg: ExperimentConfig, rank: int, loop_state: dict[str, Any], metrics: dict[str, Any],
            final: bool, meta: dict[str, Any]) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="asnn-ckpt-") as folder:
        ckpt.save_training_checkpoint(engine, folder, rank, loop_state)
        if final:
            sd = ckpt.consolidated_state_dict(engine, cfg.engine.zero_stage)
            if sd is not None:
                ckpt.save_final_model(folder, sd, {**meta, "metrics": metrics})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
