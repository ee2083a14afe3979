"""One rank: ``build_engine`` runs ZeRO-1/2 as ZeRO-0 without the one-rank gradient all-reduce
where that trains the same bits (``deepspeed_config.run_stage``), and keeps the configured
stage everywhere else. Real DeepSpeed engines on a one-rank gloo group in this process."""

from __future__ import annotations

import pytest
import torch

from asnn_dist.config import load_config
from asnn_dist.train import checkpointing as ckpt
from asnn_dist.train.deepspeed_config import build_deepspeed_config, build_engine, run_stage, single_rank_exact
from asnn_dist.train.worker import masked_loss

BASE = ["model.name=lenet_asnn_tiny", "optim.micro_batch_size=16", "run.num_workers=1", "engine.zero_stage=2"]
BATCH = 16


def cfg_with(*extra: str):
    return load_config(None, [*BASE, *extra])


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.rand(BATCH, 1, 16, 16, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(n)]


def new_engine(cfg, as_configured: bool = False):
    from asnn_dist.models.build import model_from_config

    torch.manual_seed(cfg.seed)
    return build_engine(cfg, model_from_config(cfg), 1, as_configured=as_configured)


def train(engine, optimizer, data, start: int = 0) -> None:
    valid = torch.ones(BATCH, dtype=torch.bool)
    for i, (x, y) in enumerate(data, start):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * (1 + i % 3) / 3  # a changing lr, as the schedule does
        loss = masked_loss(engine(x), y, valid, 0.0)
        engine.backward(loss)
        engine.step()


def state(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("extra", [
    ("optim.name=adamw", "optim.weight_decay=0.05"),
    ("optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.05"),
    ("optim.grad_accum_steps=2",),
    ("engine.zero_stage=1",),
    ("engine.zero_stage=0",),  # stage 0 as configured: only the one-rank all-reduce goes
])
def test_one_rank_zero2_runs_as_zero0_with_the_same_weights(one_rank, extra) -> None:
    cfg = cfg_with(*extra)
    assert run_stage(cfg, 1) == 0 and run_stage(cfg, 2) == cfg.engine.zero_stage
    data = batches(12 * cfg.optim.grad_accum_steps)
    configured, opt_c = new_engine(cfg, as_configured=True)
    assert configured.zero_optimization_stage() == cfg.engine.zero_stage
    initial = state(configured)
    train(configured, opt_c, data)
    fast, opt_f = new_engine(cfg)
    assert fast.zero_optimization_stage() == 0 and fast.enable_backward_allreduce is False
    train(fast, opt_f, data)
    assert_bitwise_equal(state(fast), state(configured))
    assert any(not torch.equal(v, initial[k]) for k, v in state(fast).items())  # it trained
    configured.destroy()
    fast.destroy()


def test_resume_from_a_one_rank_checkpoint_is_exact(one_rank, tmp_path) -> None:
    cfg = cfg_with()
    data = batches(12)
    whole, opt_w = new_engine(cfg)
    train(whole, opt_w, data)
    first, opt_1 = new_engine(cfg)
    train(first, opt_1, data[:5])
    ckpt.save_training_checkpoint(first, str(tmp_path), 0, {"epoch": 0, "global_step": 5, "micro_in_epoch": 5})
    resumed, opt_r = new_engine(cfg)
    assert ckpt.load_training_checkpoint(resumed, str(tmp_path), 0)["global_step"] == 5
    train(resumed, opt_r, data[5:], start=5)
    assert_bitwise_equal(state(resumed), state(whole))
    assert ckpt.consolidated_state_dict(resumed, cfg.engine.zero_stage).keys() == state(whole).keys()
    for engine in (whole, first, resumed):
        engine.destroy()


def test_clipping_keeps_the_configured_stage(one_rank) -> None:
    cfg = cfg_with("optim.grad_clip=1.0")  # ZeRO sums the clip norm in another order
    engine, _ = new_engine(cfg)
    assert engine.zero_optimization_stage() == 2 and engine.enable_backward_allreduce is True
    engine.destroy()


@pytest.mark.parametrize("extra,world,stage,exact", [
    ((), 2, 2, False),                                  # more than one rank: ZeRO partitions
    (("optim.grad_clip=0.5",), 1, 2, False),
    (("engine.precision=bf16",), 1, 2, False),
    (("optim.name=lamb",), 1, 2, False),                # DeepSpeed's own optimizer
    (("engine.offload_optimizer=true",), 1, 2, False),  # ZeRO-Offload moves the step to the CPU
    (("run.use_gpu=true",), 1, 2, False),               # verified on CPU only
    (("engine.zero_stage=3",), 1, 3, True),             # ZeRO-3 keeps its stage
    (("engine.zero_stage=0",), 1, 0, True),             # stage 0 as configured: no all-reduce
    ((), 1, 0, True),
])
def test_run_stage(extra, world, stage, exact) -> None:
    cfg = cfg_with(*extra)
    assert run_stage(cfg, world) == stage
    assert single_rank_exact(cfg, world) == exact
    assert build_deepspeed_config(cfg, world)["zero_optimization"]["stage"] == stage
    assert build_deepspeed_config(cfg, world, as_configured=True)["zero_optimization"]["stage"] == cfg.engine.zero_stage
