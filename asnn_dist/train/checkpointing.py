"""Training checkpoints: the DeepSpeed state of every rank plus our loop state, in one folder
that Ray Train merges across ranks and persists to the run's storage (local or s3://). Every
rank also saves its train loader's position (``ShardLoader.state_dict``), so a resumed run
continues the epoch without reading back through the batches it had consumed."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

DS_TAG = "ds"
STATE_FILE = "train_state.json"
RNG_FILE = "rng_rank{rank}.pt"
LOADER_FILE = "loader_rank{rank}.json"
MODEL_FILE = "model.pt"
MODEL_META_FILE = "model_meta.json"


def rng_state() -> dict[str, Any]:
    """Every generator a rank draws from: Python, NumPy, torch's CPU generator and, where CUDA
    is present, every CUDA device's generator (key ``cuda``; absent on CPU machines)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state``'s generators. A state without ``cuda`` (written on a CPU machine,
    or before CUDA states were saved) leaves the CUDA generators seeded as they are; CUDA
    states on a machine without CUDA are skipped (the CPU generators are what CPU runs use)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_training_checkpoint(engine, folder: str, rank: int, loop_state: dict[str, Any],
                             loader_state: Optional[dict[str, Any]] = None) -> None:
    """Every rank calls this (DeepSpeed's save is collective); rank 0 writes the loop state,
    every rank its RNG states and its loader position (``loader_state``, when given)."""
    engine.save_checkpoint(folder, tag=DS_TAG)
    torch.save(rng_state(), os.path.join(folder, RNG_FILE.format(rank=rank)))
    if loader_state is not None:
        Path(folder, LOADER_FILE.format(rank=rank)).write_text(json.dumps(loader_state))
    if rank == 0:
        Path(folder, STATE_FILE).write_text(json.dumps(loop_state, indent=1))


def load_training_checkpoint(engine, folder: str, rank: int) -> dict[str, Any]:
    """Restore DeepSpeed state (module, optimizer, ZeRO partitions) and the loop state."""
    path, _ = engine.load_checkpoint(folder, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/{DS_TAG}")
    rng_path = Path(folder, RNG_FILE.format(rank=rank))
    if rng_path.exists():
        set_rng_state(torch.load(rng_path, weights_only=False))
    return json.loads(Path(folder, STATE_FILE).read_text())


def load_loader_state(folder: str, rank: int) -> Optional[dict[str, Any]]:
    """This rank's saved loader position; None for checkpoints written before it was saved."""
    path = Path(folder, LOADER_FILE.format(rank=rank))
    return json.loads(path.read_text()) if path.exists() else None


def fp32_master_weights(engine) -> Optional[dict[str, torch.Tensor]]:
    """The full fp32 master copy of every parameter of a bf16/fp16 engine, on the CPU (None for
    an fp32 engine). Collective: every rank calls it (DeepSpeed all-reduces each partition)."""
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None where the optimizer keeps no fp32 copy
        out[name] = (full if full is not None else p).detach().float().cpu().clone()
    return out


def consolidated_state_dict(engine, zero_stage: int) -> Optional[dict[str, torch.Tensor]]:
    """Full fp32 weights on rank 0 (None elsewhere); collective under ZeRO-3 and for bf16/fp16
    engines, whose parameters come from the optimizer's fp32 master copy (not the rounded
    16-bit weights the engine computes with)."""
    import torch.distributed as dist

    if zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    masters = fp32_master_weights(engine)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return None
    sd = {**sd, **(masters or {})}
    return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone() for k, v in sd.items()}


def save_final_model(folder: str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.save(state_dict, os.path.join(folder, MODEL_FILE))
    Path(folder, MODEL_META_FILE).write_text(json.dumps(meta, indent=1))


def load_final_model(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
    meta = json.loads(Path(folder, MODEL_META_FILE).read_text())
    return sd, meta
