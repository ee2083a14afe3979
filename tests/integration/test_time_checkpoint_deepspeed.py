"""Time-step checkpointing inside real DeepSpeed engines (ZeRO-2 and ZeRO-3, 2 gloo ranks on
CPU, fp32 and bf16 engines): the checkpointed model gives the same loss, full gradients, BN
running statistics and updated weights as the plain one. The model comes from the config
exactly as in training (``checkpoint.time_segment`` -> ``model_from_config``), on both
schedules: grouped segments (``time_levels``) and the binomial one (``time_states``). In bf16
the windows carry fp32 membranes and BN reduces each step's statistics alike in both modes
(``snn.precision``): the loss and BN statistics are the same bits as plain; the gradients agree
up to bf16 rounding, since autograd sums a bf16 parameter's gradient over the windows in bf16
(one rounded partial sum per window) where the plain run rounds its full sum once."""

from __future__ import annotations

import json
import os

import pytest

from asnn_dist.testing.services import free_port

pytestmark = pytest.mark.integration

STAGES = (2, 3)
PRECISIONS = ("fp32", "bf16")
DTYPE_NAMES = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}
# max |difference| / max |value| per tensor: fp32 near round-off; bf16 a few units of its last
# place (2^-8) from the per-window rounding of gradient sums (module docstring)
GRAD_TOL = {"fp32": 1e-5, "bf16": 2**-6}
SEGMENT = 1
SCHEDULES = {"levels": [], "binomial": ["checkpoint.time_states=1"]}  # time_levels 2 / binomial, 1 state
# dim 64: the 1x1 and 3x3 convs and MLP linears exceed ZeRO-3's persistence threshold (1e4
# elements), so stage 3 really partitions them and gathers them for the recomputation.
SETTINGS = ["model.name=spikformer_tiny", "model.options.dim=64", "data.image_size=16", "data.in_channels=1", "data.num_classes=5",
            "encoding.num_steps=4", "encoding.direct_steps=1", "optim.name=sgd", "optim.lr=0.1",
            "optim.micro_batch_size=4", "run.num_workers=2",
            "neuron.init_gain=1.0"]  # every path carries gradient at init (see tests/unit/test_models.py)


def _train_step(stage: int, segment: int, rank: int, world: int, extra: tuple[str, ...] = ()) -> dict:
    """One engine step; returns full (gathered) gradients, buffers and updated weights."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from asnn_dist.config import load_config
    from asnn_dist.models.build import model_from_config
    from asnn_dist.models.execution import time_checkpointing
    from asnn_dist.train.deepspeed_config import build_engine
    from asnn_dist.train.worker import masked_loss

    cfg = load_config(None, [*SETTINGS, f"engine.zero_stage={stage}", f"checkpoint.time_segment={segment}", *extra])
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg)
    assert getattr(time_checkpointing(model), "segment", 0) == segment  # 0: plain
    engine, _ = build_engine(cfg, model, world)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank its own batch
    images = torch.rand(4, 1, 16, 16, generator=gen)
    labels = torch.randint(0, 5, (4,), generator=gen)
    loss = masked_loss(engine(images), labels, torch.ones(4, dtype=torch.bool), 0.0)
    engine.backward(loss)
    names = [n for n, _ in engine.module.named_parameters()]
    partitioned = sum(1 for p in engine.module.parameters()
                      if hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.step()
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    buffers = {n: b.clone() for n, b in engine.module.named_buffers()}
    dtypes = sorted({str(p.dtype) for p in engine.module.parameters()})
    engine.destroy() if hasattr(engine, "destroy") else None
    return dict(loss=float(loss), names=names, grads=grads, weights=weights, buffers=buffers,
                partitioned=partitioned, dtypes=dtypes)


def _max_rel(a: dict, b: dict) -> float:
    worst = 0.0
    for n in b:
        scale = float(b[n].abs().max().clamp_min(1e-12))
        worst = max(worst, float((a[n] - b[n]).abs().max()) / scale)
    return worst


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report = {}
    try:
        for precision in PRECISIONS:
            for stage in STAGES:  # stage 3 last: it wraps the module with hooks
                run(report, precision, stage, rank, world)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def run(report: dict, precision: str, stage: int, rank: int, world: int) -> None:
    """Plain and checkpointed steps of one engine setting, compared (into ``report``)."""
    prec = (f"engine.precision={precision}",)
    plain = _train_step(stage, 0, rank, world, prec)
    for schedule, extra in SCHEDULES.items():
        ckpt = _train_step(stage, SEGMENT, rank, world, (*prec, *extra))
        report[f"{precision} {stage} {schedule}"] = dict(
            loss=(plain["loss"], ckpt["loss"]),
            grad=_max_rel(ckpt["grads"], plain["grads"]),
            weight=_max_rel(ckpt["weights"], plain["weights"]),
            buffer=_max_rel(ckpt["buffers"], plain["buffers"]),
            grad_norm=float(sum(g.float().norm() ** 2 for g in plain["grads"].values()) ** 0.5),
            params=len(plain["names"]),
            partitioned=ckpt["partitioned"],
            dtypes=plain["dtypes"],
        )


def test_time_checkpointing_matches_plain_under_zero2_and_zero3(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert sorted(report) == sorted(f"{p} {s} {name}" for p in PRECISIONS for s in STAGES for name in SCHEDULES)
        for key, r in report.items():
            plain_loss, ckpt_loss = r["loss"]
            tol = GRAD_TOL[key.split()[0]]
            assert abs(plain_loss - ckpt_loss) <= 1e-5 * abs(plain_loss), (rank, key, r)
            assert r["buffer"] < 1e-5, (rank, key, r)  # same forward: same BN statistics
            assert r["grad"] < tol and r["weight"] < tol, (rank, key, r)
            assert r["grad_norm"] > 0 and r["params"] > 20, (rank, key, r)
            # the bf16 engine really computes in bf16 (its parameters), the fp32 one in fp32
            assert r["dtypes"] == [DTYPE_NAMES[key.split()[0]]], (rank, key, r)
        for precision in PRECISIONS:  # ZeRO-3 split the weights
            assert all(report[f"{precision} 3 {name}"]["partitioned"] >= 5 for name in SCHEDULES)
    # both ranks hold the same (averaged) gradients and weights; losses differ per batch
    for precision in PRECISIONS:
        key = f"{precision} 2 levels"
        assert reports[0][key]["grad_norm"] == pytest.approx(reports[1][key]["grad_norm"], rel=1e-5)
        assert reports[0][key]["loss"] != reports[1][key]["loss"]
