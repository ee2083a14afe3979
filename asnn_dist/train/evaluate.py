"""Evaluation shared by training workers and ``asnn-dist evaluate``: sums first, then one
all-reduce, so every sample counts exactly once however the data is split across ranks.

Devices: batches go to the model's device with non-blocking copies, the sums accumulate there
(float64) and reach the host once, after the all-reduce; the all-reduce runs on the process
group's device (``collective_device``: NCCL needs CUDA tensors, gloo takes CPU ones).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SUM_KEYS = ("loss_sum", "correct1", "correct5", "count")


def collective_device() -> torch.device:
    """The device of the tensors the default process group reduces: the rank's current GPU
    under NCCL, else the CPU (gloo; also without a group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The batch's tensors on ``device``: non-blocking copies (overlap with compute when the
    loader pinned them); tensors already there are returned as they are."""
    return [t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch]


@torch.no_grad()
def eval_sums(model: nn.Module, batches: Iterable, num_steps: int,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """Vector [loss_sum, correct1, correct5, count, anytime_correct[0..T-1]] over valid rows,
    on ``device`` (default: the model's)."""
    device = device or model_device(model)
    sums = torch.zeros(len(SUM_KEYS) + num_steps, dtype=torch.float64, device=device)
    for batch in batches:
        images, labels, valid = to_device(batch[:3], device)
        steps = model.forward_steps(images)  # [T, B, K]
        any_logits = model.readout.anytime(steps)
        logits = any_logits[-1]
        v = valid.to(torch.float64)
        loss = F.cross_entropy(logits.float(), labels, reduction="none").double()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit1 = (top[:, 0] == labels).double()
        hit5 = (top == labels[:, None]).any(dim=-1).double()
        sums[0] += (loss * v).sum()
        sums[1] += (hit1 * v).sum()
        sums[2] += (hit5 * v).sum()
        sums[3] += v.sum()
        step_hits = (any_logits.argmax(-1) == labels[None]).double()  # [T, B]
        sums[4:] += (step_hits * v[None]).sum(dim=1)
    return sums


def all_reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """The sums over all ranks, on the CPU (the one host read of an evaluation)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sums = sums.to(collective_device(), copy=True)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums.cpu()


def sums_to_metrics(sums: torch.Tensor, prefix: str = "val_") -> dict[str, float]:
    sums = sums.cpu()
    count = max(float(sums[3]), 1.0)
    out = {
        f"{prefix}loss": float(sums[0]) / count,
        f"{prefix}top1": float(sums[1]) / count,
        f"{prefix}top5": float(sums[2]) / count,
        f"{prefix}count": float(sums[3]),
    }
    for t, c in enumerate(sums[4:].tolist()):
        out[f"{prefix}anytime_top1_t{t + 1}"] = c / count
    return out


def evaluate(model: nn.Module, batches: Iterable, num_steps: int, prefix: str = "val_",
             distributed: Optional[bool] = None, device: Optional[torch.device] = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums = eval_sums(model, batches, num_steps, device)
    if distributed is not False:
        sums = all_reduce_sums(sums)
    model.train(was_training)
    return sums_to_metrics(sums, prefix)
