"""The per-worker training function that Ray Train's TorchTrainer runs on every rank.

Every rank builds the model and its DeepSpeed engine, streams its share of the shards, trains,
evaluates (sums all-reduced so each sample counts once), saves its part of the checkpoint and
calls ``ray.train.report`` on the same cadence (the report is a barrier: the cadence depends
only on step counts, never on rank-local state). Only world rank 0 talks to MLflow, through a
background logger (``tracking.client.BackgroundRunLogger``): the loop never waits for MLflow;
the logger is flushed before every checkpoint (so MLflow holds every metric up to the step a
resumed run continues from) and at the end.

Resume is exact: a checkpoint stores DeepSpeed's state (weights, optimizer, ZeRO partitions),
the loop position (epoch, optimizer step, micro batches consumed in the epoch) and every
rank's loader position (``ShardLoader.state_dict``): the resumed loader skips the consumed
samples without decoding them and yields the batches the uninterrupted run would have
(checkpoints without a loader position fall back to reading and dropping the consumed batches).
Randomness needs no saved state: every stochastic part (rate code, dropout, mixing) is seeded
before each micro batch from (seed, rank, epoch, micro batch) (``randomness.py``), and
augmentation per sample by its stream position in the loader.

Devices: batches go to the rank's device (``ray.train.torch.get_device()``) with non-blocking
copies from pinned memory on CUDA; losses stay on the device and are read at the logging
cadence only, so the loop queues micro batches without waiting for the GPU. Precision: see
``snn.precision`` (images stay fp32; the model casts after its encoder; the loss is fp32).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from asnn_dist.config import ExperimentConfig
from asnn_dist.train import checkpointing as ckpt
from asnn_dist.train.deepspeed_config import build_engine, run_stage
from asnn_dist.train.evaluate import to_device
from asnn_dist.train.metrics import (LossMeter, average_buffers, evaluate_with_stats, learned_param_summary,
                                     mean_across_ranks)
from asnn_dist.train.randomness import mixing_rng, reseed_model
from asnn_dist.train.schedule import lr_at


@dataclass
class LoopState:
    epoch: int = 0
    global_step: int = 0
    micro_in_epoch: int = 0


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over the valid rows (padding rows that equalise batch counts add nothing)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)
    v = valid.to(ce.dtype)
    return (ce * v).sum() / v.sum().clamp_min(1.0)


def _progress(board: Any, total: int, initial: int, enabled: bool):
    """Rank 0's progress reporter to the driver's line (``progress.py``); None elsewhere."""
    if not enabled or board is None:
        return None
    from asnn_dist.train.progress import WorkerProgress

    return WorkerProgress(board, total, initial)  # a resumed run starts where it stands


def worker_device() -> torch.device:
    """This rank's device as Ray Train assigned it (its GPU with ``run.use_gpu``, else the CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


def _make_loaders(cfg: ExperimentConfig, rank: int, world: int, pin_memory: bool = False):
    """Train and val loaders of this rank; ``pin_memory`` (CUDA) lets batch copies overlap compute."""
    from asnn_dist.data.loader import ShardLoader
    from asnn_dist.data.manifest import load_manifest

    root = cfg.data.root
    from asnn_dist.data import s3
    from asnn_dist.train.storage import s3_endpoint

    s3.configure(endpoint_url=s3_endpoint(cfg.s3.endpoint_url))  # before the first manifest read
    common = dict(rank=rank, world_size=world, num_workers=cfg.data.num_workers, image_size=cfg.data.image_size,
                  seed=cfg.seed, recipe=cfg.data.recipe, s3_endpoint_url=s3_endpoint(cfg.s3.endpoint_url),
                  pin_memory=pin_memory)
    train_manifest = load_manifest(f"{root}/{cfg.data.train_split}.manifest.json")
    train = ShardLoader(train_manifest,
                        batch_size=cfg.optim.micro_batch_size, train=True,
                        shuffle_buffer=cfg.data.shuffle_buffer, augment=cfg.data.augment,
                        mode=cfg.data.mode, epoch_length=cfg.data.epoch_length, **common)
    val = ShardLoader(load_manifest(f"{root}/{cfg.data.val_split}.manifest.json"),
                      batch_size=cfg.optim.micro_batch_size, train=False, **common)
    return train, val, train_manifest.classes


class Trainer:
    """One rank's training run: owns the engine, the loaders, the loop state and the reports."""

    def __init__(self, cfg: ExperimentConfig, run_id: Optional[str], board: Any = None) -> None:
        import ray.train

        from asnn_dist.models.build import model_from_config, model_kwargs

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(cfg.run.threads_per_worker)
        torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts)
        model = model_from_config(cfg)
        self.device = worker_device()
        self.train_loader, self.val_loader, classes = _make_loaders(cfg, self.rank, self.world,
                                                                    pin_memory=self.device.type == "cuda")
        self.meta = {"model": cfg.model.name, "kwargs": model_kwargs(cfg), "classes": classes}
        self.engine, self.optimizer = build_engine(cfg, model, self.world)
        self.accum = cfg.optim.grad_accum_steps
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"each rank gets {len(self.train_loader)} micro batches per epoch, fewer than "
                f"optim.grad_accum_steps={self.accum}; lower optim.micro_batch_size or grad_accum_steps"
            )
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.state = LoopState()
        self.logger = None
        self.board, self.progress = board, None
        if self.rank == 0 and run_id:
            from asnn_dist.tracking.client import BackgroundRunLogger, RunLogger

            self.logger = BackgroundRunLogger(RunLogger(cfg.tracking.uri, run_id))
            stage = run_stage(cfg, self.world)
            if stage != cfg.engine.zero_stage:  # deepspeed_config: one rank runs ZeRO-1/2 as 0
                self.logger.set_tag("asnn.zero_stage_run", str(stage))

    # ---- checkpoints ------------------------------------------------------------------
    def restore(self) -> bool:
        import ray.train

        restored = ray.train.get_checkpoint()
        if restored is None:
            return False
        with restored.as_directory() as folder:
            self.state = LoopState(**ckpt.load_training_checkpoint(self.engine, folder, self.rank))
            loader_state = ckpt.load_loader_state(folder, self.rank)
        st = self.state
        if (loader_state is not None and st.micro_in_epoch > 0 and loader_state.get("epoch") == st.epoch
                and loader_state.get("batches_consumed") == st.micro_in_epoch):
            self.train_loader.load_state_dict(loader_state)  # else: read and drop the consumed batches
        if self.logger is not None:
            self.logger.set_tag("asnn.resumed_from_step", str(self.state.global_step))
        return True

    def report(self, metrics: dict[str, Any], final: bool = False) -> None:
        """Checkpoint every rank's state and report (a barrier: all ranks call it together)."""
        import ray.train
        from ray.train import Checkpoint

        average_buffers(self.engine.module)  # the saved (rank-0) buffers stand for all ranks
        if self.logger is not None:
            self.logger.flush()  # MLflow holds everything up to this checkpoint's step
        with tempfile.TemporaryDirectory(prefix="asnn-ckpt-") as folder:
            ckpt.save_training_checkpoint(self.engine, folder, self.rank, asdict(self.state),
                                          self.train_loader.state_dict())
            if final:
                sd = ckpt.consolidated_state_dict(self.engine, self.cfg.engine.zero_stage)
                if sd is not None:
                    ckpt.save_final_model(folder, sd, {**self.meta, "metrics": metrics})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self, extra: Optional[dict[str, float]] = None) -> dict[str, float]:
        module = self.engine.module
        average_buffers(module)
        reseed_model(module, self.cfg.seed, self.rank, "eval", self.state.global_step)
        metrics = evaluate_with_stats(module, self.val_loader, module.num_steps, self.cfg.run.spike_stats,
                                      device=self.device)
        with self._gathered_small_params():
            metrics.update(learned_param_summary(module))
        metrics.update(epoch=self.state.epoch, global_step=self.state.global_step, **(extra or {}))
        if self.logger is not None:
            self.logger.log_metrics(metrics, self.state.global_step)
        if self.progress is not None:
            self.progress.evaluated(metrics)
        return metrics

    def _gathered_small_params(self):
        if self.cfg.engine.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        small = [p for n, p in self.engine.module.named_parameters() if n.endswith(("leak", "gain", "scale"))]
        return deepspeed.zero.GatheredParameters(small, modifier_rank=None)

    # ---- training -----------------------------------------------------------------------
    def train_micro_batch(self, batch) -> torch.Tensor:
        """One micro batch: forward, backward, engine step. Returns the detached loss on the
        device (read at the logging cadence, ``LossMeter``: no host sync per micro batch)."""
        images, labels, valid = to_device(batch[:3], self.device)
        o, d = self.cfg.optim, self.cfg.data
        lr = lr_at(self.state.global_step, self.total_steps, o.lr, o.warmup_steps, o.min_lr, o.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        position = (self.cfg.seed, self.rank, self.state.epoch, self.state.micro_in_epoch)
        reseed_model(self.engine.module, *position)  # own stream per rank; a resumed run draws the same
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
            from asnn_dist.data.mixing import mix_batch, soft_target_cross_entropy

            images, targets = mix_batch(images, labels, d.num_classes, d.mixup_alpha, d.cutmix_alpha,
                                        label_smoothing=o.label_smoothing, rng=mixing_rng(*position))
            loss = soft_target_cross_entropy(self.engine(images).float(), targets, valid)
        else:
            loss = masked_loss(self.engine(images), labels, valid, o.label_smoothing)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def run(self) -> None:
        cfg, st = self.cfg, self.state
        self.progress = bar = _progress(self.board, self.total_steps, st.global_step,
                                        self.rank == 0 and cfg.run.progress)
        every_eval, every_ckpt = cfg.run.eval_every_steps, cfg.checkpoint.every_steps
        micro_per_epoch = self.steps_per_epoch * self.accum
        while st.epoch < cfg.optim.epochs:
            self.train_loader.set_epoch(st.epoch)
            self.engine.train()
            t0, seen, losses = time.perf_counter(), 0, LossMeter()
            # A restored loader continues at its saved batch; otherwise it starts the epoch.
            for micro, batch in enumerate(self.train_loader, start=self.train_loader.batches_consumed):
                if micro >= micro_per_epoch:
                    break
                if micro < st.micro_in_epoch:
                    continue  # resumed from a checkpoint without a loader position: trained before
                losses.add(self.train_micro_batch(batch))
                seen += int(batch[2].sum())  # the loader's CPU mask: no device sync
                st.micro_in_epoch = micro + 1
                if st.micro_in_epoch % self.accum:
                    continue
                st.global_step += 1
                if bar is not None:
                    bar.update(1, epoch=st.epoch + 1)
                if self.logger is not None and st.global_step % cfg.run.log_every_steps == 0:
                    rate = seen * self.world / max(time.perf_counter() - t0, 1e-9)
                    self.logger.log_metrics({"train_loss": losses.take(), "lr": self._lr(),
                                             "train_images_per_s": rate}, st.global_step)
                last_of_epoch = st.micro_in_epoch >= micro_per_epoch
                if last_of_epoch:
                    break
                if every_eval and st.global_step % every_eval == 0:
                    self.report(self.evaluate())
                elif every_ckpt and st.global_step % every_ckpt == 0:
                    self.report({"epoch": st.epoch, "global_step": st.global_step})
            elapsed = max(time.perf_counter() - t0, 1e-9)
            st.epoch, st.micro_in_epoch = st.epoch + 1, 0
            skipped = mean_across_ranks({"s": float(getattr(self.train_loader, "skipped_samples", 0))})["s"]
            metrics = self.evaluate({"train_images_per_s": seen * self.world / elapsed,
                                     "train_skipped_samples": skipped * self.world})
            self.report(metrics, final=st.epoch == cfg.optim.epochs)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        """Send what the background MLflow logger still holds (also after a failure)."""
        if self.logger is not None:
            self.logger.close()

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def quiet_ray_train(level: str) -> None:
    """Ray Train's loggers at ``run.log_level`` (every report otherwise logs its whole metrics
    dict at INFO). Some Train V2 modules name their logger by file path, so those count too."""
    names = [n for n in logging.root.manager.loggerDict
             if n == "ray.train" or n.startswith("ray.train.") or "/ray/train/" in n.replace("\\", "/")]
    for name in ["ray.train", *names]:
        logging.getLogger(name).setLevel(level)
    # boto3 says at INFO, from every rank, which credential provider it used.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    quiet_ray_train(cfg.run.log_level)
    trainer = Trainer(cfg, loop_config.get("mlflow_run_id"), loop_config.get("progress_board"))
    try:
        trainer.restore()
        trainer.run()
    finally:
        trainer.close()
