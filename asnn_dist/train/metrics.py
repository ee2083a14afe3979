"""Metrics computed on every rank and reduced once: the training loss kept on the device,
evaluation with spike statistics, and the learned per-step ASNN parameters summarised for
MLflow.

Devices: every collective runs on tensors on the process group's device
(``collective_device``: the rank's GPU under NCCL, the CPU under gloo), and values reach the
host only where they are logged (one read per logging or evaluation cadence, never per micro
batch: a read of a GPU value waits for the whole queue of kernels).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from asnn_dist.train.evaluate import all_reduce_sums, collective_device, eval_sums, sums_to_metrics


class LossMeter:
    """Sum of micro-batch losses on the device they were computed on; read at the logging
    cadence only (``take``), so the training loop never waits for the device per micro batch."""

    def __init__(self) -> None:
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        """Accumulate a (0-dim) loss on its device: no host sync."""
        value = loss.detach().to(torch.float64)
        self.total = value.clone() if self.total is None else self.total.add_(value)
        self.count += 1

    def take(self) -> float:
        """Mean of the losses added since the last take (one host read), then start over."""
        mean = float(self.total) / self.count if self.total is not None and self.count else 0.0
        self.total, self.count = None, 0
        return mean


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (each rank evaluates the same number of batches)."""
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across ranks.

    Each rank updates its running statistics from its own batches; DeepSpeed does not sync
    buffers. Averaging before every evaluation and checkpoint makes all ranks evaluate the same
    function, and the saved (rank-0) model equal to the one that was evaluated.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    device = collective_device()
    flat = torch.cat([b.detach().reshape(-1).to(device, torch.float64) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b), non_blocking=True)
        offset += n


def evaluate_with_stats(model: nn.Module, batches: Iterable, num_steps: int, spike_stats: bool,
                        prefix: str = "val_", device: Optional[torch.device] = None) -> dict[str, float]:
    """Loss, top-1/5, anytime accuracy (exact counts across ranks) and spike statistics;
    batches are moved to ``device`` (default: where the model's parameters are)."""
    from asnn_dist.snn.stats import collect_spike_stats

    was_training = model.training
    model.eval()
    try:
        if spike_stats:
            with collect_spike_stats(model) as stats:
                sums = eval_sums(model, batches, num_steps, device)
            extra = {f"{prefix}{k}": v for k, v in stats.summary().items()}
            for name, rate in stats.firing_rates().items():
                for t, r in enumerate(rate.tolist()):
                    extra[f"{prefix}firing_rate_step/{name}/t{t + 1}"] = r
        else:
            sums, extra = eval_sums(model, batches, num_steps, device), {}
    finally:
        model.train(was_training)
    metrics = sums_to_metrics(all_reduce_sums(sums), prefix)
    metrics.update(mean_across_ranks(extra))
    return metrics


def learned_param_summary(model: nn.Module) -> dict[str, float]:
    """Mean/min/max of learned leaks and gains per layer, and the readout scale per step."""
    out: dict[str, float] = {}
    for name, mod in model.named_modules():
        for key in ("leak", "gain"):
            p = getattr(mod, key, None)
            if isinstance(p, torch.Tensor) and p.numel() > 0:
                v = p.detach().float()
                out[f"{key}/{name}/mean"] = float(v.mean())
                out[f"{key}/{name}/min"] = float(v.min())
                out[f"{key}/{name}/max"] = float(v.max())
    scale = getattr(getattr(model, "readout", None), "scale", None)
    if isinstance(scale, torch.Tensor):
        for t, v in enumerate(scale.detach().float().tolist()):
            out[f"readout_scale/t{t + 1}"] = v
    return out
