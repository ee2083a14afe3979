"""``asnn_dist.train.deepspeed_compat``: ZeRO-3 fp32 weights serve as their own fp32 master
partition. The patch logic is checked on stand-in classes (idempotent, a no-op without the
bug); real ZeRO-3 engines (CPU, 2 gloo ranks) check that the master shares the parameter
storage, that training with and without the fix is bit-identical, that a checkpoint saved
with the fix resumes bit-exactly and consolidates, and that ``bench zero``'s accounting of
ZeRO-3 comes within 10 % of 16P/N."""

from __future__ import annotations

import json
import os

import pytest
import torch

from asnn_dist.bench import zero as bench_zero
from asnn_dist.testing.services import free_port
from asnn_dist.train import deepspeed_compat as compat


# ---- the patch on stand-in classes -----------------------------------------------------------
class Buggy:
    """Mimics DeepSpeed 0.19.8: a string device compared with a tensor's torch.device."""

    def __init__(self, device: str = "cpu", offload_optimizer: bool = False) -> None:
        self.device, self.offload_optimizer, self.seen = device, offload_optimizer, []

    def _create_fp32_partitions(self):
        flat = torch.zeros(2)
        self.seen.append((self.device, flat.device == self.device))
        if self.device == torch.device("meta"):
            raise RuntimeError("boom")
        return "built"


class Fixed:
    def __init__(self) -> None:
        self.device = "cpu"

    def _create_fp32_partitions(self):
        return torch.zeros(2).device == torch.device(self.device)


class NoMethod:
    pass


def test_patch_is_idempotent_and_scoped_to_the_call() -> None:
    original = Buggy.__dict__["_create_fp32_partitions"]
    assert compat.bug_present(Buggy) and not compat.is_applied(Buggy)
    try:
        assert compat.apply(Buggy)
        wrapper = Buggy.__dict__["_create_fp32_partitions"]
        assert compat.apply(Buggy) and Buggy.__dict__["_create_fp32_partitions"] is wrapper  # not wrapped twice
        assert compat.bug_present(Buggy)  # still judged on the original source
        obj = Buggy()
        assert obj._create_fp32_partitions() == "built"
        assert obj.seen == [(torch.device("cpu"), True)]  # a torch.device while it runs ...
        assert type(obj.device) is str and obj.device == "cpu"  # ... the string again afterwards
        offload = Buggy(offload_optimizer=True)
        offload._create_fp32_partitions()
        assert offload.seen == [("cpu", False)]  # the offload path runs unchanged
        failing = Buggy(device="meta")
        with pytest.raises(RuntimeError, match="boom"):
            failing._create_fp32_partitions()
        assert failing.device == "meta" and type(failing.device) is str  # restored on errors too
    finally:
        assert compat.remove(Buggy)
    assert Buggy.__dict__["_create_fp32_partitions"] is original and not compat.remove(Buggy)


def test_patch_is_a_no_op_without_the_bug(monkeypatch) -> None:
    for cls in (Fixed, NoMethod):
        before = dict(vars(cls))
        assert not compat.bug_present(cls) and not compat.apply(cls) and not compat.is_applied(cls)
        assert dict(vars(cls)) == before
    # a torch whose torch.device equals its string: DeepSpeed's own test works, nothing to do
    monkeypatch.setattr(compat, "_torch_device_differs_from_str", lambda: False)
    assert not compat.bug_present(Buggy) and not compat.apply(Buggy) and not compat.is_applied(Buggy)


def test_real_deepspeed_class() -> None:
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    was = compat.is_applied()
    try:
        compat.remove()
        original = Stage3.__dict__["_create_fp32_partitions"]
        present = compat.bug_present()
        if deepspeed.__version__ == "0.19.8" and torch.device("cpu") != "cpu":
            assert present  # the version this repository pins
        assert compat.apply() == present and compat.apply() == present and compat.is_applied() == present
        assert compat.bug_present() == present  # judged on the original source, patched or not
        assert compat.remove() == present and Stage3.__dict__["_create_fp32_partitions"] is original
    finally:
        if was:
            compat.apply()


# ---- real ZeRO-3 engines ---------------------------------------------------------------------
WORLD = 2
STEPS, SAVE_AT = 4, 2
SETTINGS = ["model.name=lenet_asnn_tiny", "model.options={widths: [8, 16, 32], hidden: 1024}",
            "data.image_size=16", "encoding.num_steps=2", "encoding.direct_steps=1", "engine.zero_stage=3",
            "engine.precision=fp32", "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05",
            "optim.grad_clip=0.05", "optim.micro_batch_size=2", "optim.grad_accum_steps=2",
            f"run.num_workers={WORLD}"]


def _engine(cfg, fix: bool, seed: int):
    import deepspeed

    from asnn_dist.models.build import model_from_config
    from asnn_dist.train.deepspeed_config import build_deepspeed_config, build_engine, build_optimizer

    torch.manual_seed(seed)
    model = model_from_config(cfg)
    if fix:
        engine, _ = build_engine(cfg, model, WORLD)  # applies the fix
    else:  # DeepSpeed as shipped
        compat.remove()
        params = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                               optimizer=build_optimizer(cfg, params),
                                               config=build_deepspeed_config(cfg, WORLD))
    return engine


def _train(engine, cfg, rank: int, steps: range) -> list[float]:
    """Optimizer steps on batches that depend only on (step, micro, rank): resumable."""
    from asnn_dist.train.worker import masked_loss

    losses = []
    b, size = cfg.optim.micro_batch_size, cfg.data.image_size
    for step in steps:
        for micro in range(cfg.optim.grad_accum_steps):
            gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
            images = torch.rand(b, cfg.data.in_channels, size, size, generator=gen)
            labels = torch.randint(0, cfg.data.num_classes, (b,), generator=gen)
            torch.manual_seed(7 + step)  # whatever the model draws
            loss = masked_loss(engine(images), labels, torch.ones(b, dtype=torch.bool), 0.0)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
    return losses


def _full_weights(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    from asnn_dist.bench.common import quiet_libraries

    quiet_libraries()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    import torch.distributed as dist
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from asnn_dist.config import load_config
    from asnn_dist.train import checkpointing as ckpt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = load_config(None, SETTINGS)
    rep: dict = {}
    try:
        # DeepSpeed as shipped: a separate fp32 master clone
        plain = _engine(cfg, fix=False, seed=cfg.seed)
        rep["plain_shared"] = bench_zero.master_is_shared(plain)
        plain_losses, plain_weights = _train(plain, cfg, rank, range(STEPS)), _full_weights(plain)
        plain_sd = plain._zero3_consolidated_16bit_state_dict()
        plain.destroy()

        fixed = _engine(cfg, fix=True, seed=cfg.seed)
        opt = fixed.optimizer
        rep["fixed_shared"] = bench_zero.master_is_shared(fixed)
        rep["same_tensor"] = all(m is q for m, q in zip(opt.fp32_partitioned_groups_flat,
                                                        opt.fp16_partitioned_groups_flat))
        rep["device_restored"] = type(opt.device) is str
        rep["partitioned"] = sum(1 for p in fixed.module.parameters() if p.ds_tensor.numel() < p.ds_numel)
        fixed_losses, fixed_weights = _train(fixed, cfg, rank, range(STEPS)), _full_weights(fixed)
        rep["grad_norm"] = float(fixed.get_global_grad_norm())
        fixed_sd = fixed._zero3_consolidated_16bit_state_dict()
        fixed.destroy()
        rep["losses_equal"] = plain_losses == fixed_losses and len(set(fixed_losses)) > 1
        rep["weights_equal"] = _same(plain_weights, fixed_weights)
        rep["weights_moved"] = not _same(plain_weights, _full_weights_init(cfg))
        if rank == 0:
            rep["consolidated_equal"] = _same(plain_sd, fixed_sd) and len(fixed_sd) > 0

        # with the fix: train, checkpoint, resume in a fresh engine (other init), continue
        folder = os.path.join(out_dir, "ckpt")
        first = _engine(cfg, fix=True, seed=cfg.seed)
        head = _train(first, cfg, rank, range(SAVE_AT))
        ckpt.save_training_checkpoint(first, folder, rank, {"global_step": SAVE_AT})
        saved_weights = _full_weights(first)
        first.destroy()
        dist.barrier()
        if rank == 0:  # zero_to_fp32 consolidation of the aliased fp32 partitions
            merged = get_fp32_state_dict_from_zero_checkpoint(folder, tag=ckpt.DS_TAG)
            rep["zero_to_fp32_equal"] = (saved_weights.keys() <= merged.keys()
                                         and _same({k: merged[k] for k in saved_weights}, saved_weights))
        resumed = _engine(cfg, fix=True, seed=cfg.seed + 1)
        rep["fresh_differs"] = not _same(_full_weights(resumed), saved_weights)
        state = ckpt.load_training_checkpoint(resumed, folder, rank)
        rep["loaded_equal"] = _same(_full_weights(resumed), saved_weights) and state["global_step"] == SAVE_AT
        rep["resumed_shared"] = bench_zero.master_is_shared(resumed)
        tail = _train(resumed, cfg, rank, range(SAVE_AT, STEPS))
        rep["resume_losses_equal"] = head + tail == fixed_losses
        rep["resume_weights_equal"] = _same(_full_weights(resumed), fixed_weights)
        resumed.destroy()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(rep, fh)


def _full_weights_init(cfg) -> dict[str, torch.Tensor]:
    """The initial weights (plain module, same seed) to check that training changed them."""
    from asnn_dist.models.build import model_from_config

    torch.manual_seed(cfg.seed)
    return {n: p.detach().clone() for n, p in model_from_config(cfg).named_parameters()}


def test_zero3_fix_is_bitwise_neutral_and_resumes_exactly(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, rep in enumerate(reports):
        assert rep["plain_shared"] is False and rep["fixed_shared"] is True, (rank, rep)
        assert rep["same_tensor"] and rep["device_restored"] and rep["resumed_shared"], (rank, rep)
        assert rep["partitioned"] >= 2, (rank, rep)  # ZeRO-3 really split the big tensors
        assert rep["grad_norm"] > 0.05, (rank, rep)  # gradient clipping was active
        for key in ("losses_equal", "weights_equal", "weights_moved", "fresh_differs", "loaded_equal",
                    "resume_losses_equal", "resume_weights_equal"):
            assert rep[key] is True, (rank, key, rep)
    assert reports[0]["consolidated_equal"] is True and reports[0]["zero_to_fp32_equal"] is True


def test_bench_zero_stage3_within_10_percent_of_16p_over_n() -> None:
    # a model whose big tensors (> stage3_param_persistence_threshold) hold most parameters
    overrides = ["model.name=lenet_asnn_tiny", "model.options={widths: [8, 16, 32], hidden: 2048}",
                 *bench_zero.DEFAULT_SETTINGS, "optim.grad_accum_steps=2"]
    rows = bench_zero.measure(stages=(3,), ranks=WORLD, overrides=overrides)
    assert [r.rank for r in rows] == [0, 1]
    for r in rows:
        theory = bench_zero.paper_theory(3, r.num_params, r.world)
        assert r.shared_master is True and r.bytes["master"] == 0, r
        assert abs(r.model_state / theory - 1) <= 0.10, (r.model_state / theory, r)
        ds = bench_zero.deepspeed_theory(3, r.num_params, r.world, r.small_params, r.accum, r.shared_master)
        assert r.model_state == pytest.approx(ds, rel=0.02), r
    summary = bench_zero.zero3_summary(rows)
    assert summary.count("(within 10%)") == 2 * WORLD and "no copy" in summary
