"""Smoke tests of ``bench zero`` and ``bench train`` on their tiniest settings: the real
DeepSpeed engines (2 gloo ranks) and the real Ray Train path run; the checks are on the
structure and sanity of the numbers, not on speed."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from asnn_dist.bench import train as bench_train
from asnn_dist.bench import zero as bench_zero

# A model whose big tensors (> stage3_param_persistence_threshold) hold most parameters.
ZERO_OVERRIDES = ["model.name=lenet_asnn_tiny", "model.options={widths: [8, 16, 32], hidden: 2048}",
                  *bench_zero.DEFAULT_SETTINGS, "optim.grad_accum_steps=2"]


def test_theory_formulas() -> None:
    p, n = 1000, 2
    assert [bench_zero.paper_theory(s, p, n) for s in range(4)] == [16000, 12000, 10000, 8000]
    # DeepSpeed's fp32 layout: + master clone (stages 1-2; ZeRO-3 shares the parameter partition
    # with deepspeed_compat), + whole small params (stage 3)
    assert bench_zero.deepspeed_theory(0, p, n) == 16000
    assert bench_zero.deepspeed_theory(2, p, n) == 12000
    assert bench_zero.deepspeed_theory(3, p, n, small_params=100) == 8000 + 200
    assert bench_zero.deepspeed_theory(3, p, n, small_params=100, shared_master=False) == 10000 + 200
    assert bench_zero.deepspeed_theory(1, p, n, accum=1) == 4 * p + 16 * p / n


@pytest.mark.parametrize("path,category", [
    ("module.fc.weight", "params"), ("module.fc.weight.grad", "grads"), ("module.fc.weight.ds_tensor", "params"),
    ("optimizer.bit16_groups_flat[0]", "params"), ("optimizer.optimizer.state[*][exp_avg]", "optim"),
    ("optimizer.single_partition_of_fp32_groups[0]", "master"), ("optimizer.grad_partitions_flat_buffer", "grads"),
    ("optimizer.all_grad_tensors[0][0]", "grads"), ("optimizer.ipg_buckets[*].buffer[0]", "buffers"), ("gc", "other"),
])
def test_categorise(path: str, category: str) -> None:
    assert bench_zero.categorise(path) == category


def test_bench_zero_two_ranks() -> None:
    rows = bench_zero.measure(stages=(0, 2, 3), ranks=2, overrides=ZERO_OVERRIDES)
    assert [(r.stage, r.rank) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    by = {(r.stage, r.rank): r for r in rows}
    p = rows[0].num_params
    assert p > 250_000 and rows[0].small_params < 0.1 * p
    z0, z2, z3 = by[0, 0].bytes, by[2, 0].bytes, by[3, 0].bytes
    assert z0["params"] == z0["grads"] == 4 * p and z0["master"] == 0
    assert 8 * p <= z0["optim"] <= 8 * p + 4096  # exp_avg, exp_avg_sq (+ scalar step tensors)
    assert z2["params"] == pytest.approx(4 * p, rel=0.01)  # ZeRO-2 keeps the whole weights
    for stage_bytes in (z2, z3):  # gradients and optimizer state are partitioned
        assert stage_bytes["optim"] == pytest.approx(z0["optim"] / 2, rel=0.05)
    assert z2["master"] == pytest.approx(2 * p, rel=0.05)  # ZeRO-2 clones its fp32 master partition
    assert z3["master"] == 0 and by[3, 0].shared_master  # ZeRO-3's is the parameter partition
    assert 0.45 < z3["params"] / z0["params"] < 0.6
    assert z3["grads"] == pytest.approx(z0["grads"] / 2, rel=0.05)
    # ZeRO-2 sizes a rank's gradient partition by the whole of every parameter it overlaps: the
    # 262k-element linear straddles the boundary here, so it counts on both ranks.
    assert 2 * p <= z2["grads"] <= 4 * p
    for r in (r for r in rows if r.stage in (0, 3)):  # DeepSpeed's fp32 layout, to the byte
        ds = bench_zero.deepspeed_theory(r.stage, r.num_params, r.world, r.small_params, r.accum)
        assert r.model_state == pytest.approx(ds, rel=0.05), (r.stage, r.rank)
    text = bench_zero.table(rows) + bench_zero.zero3_summary(rows)
    assert "ds-ratio" in text and "ZeRO-3 rank 1" in text and "no copy" in text


def test_bench_train_tiny(tmp_path) -> None:
    rep = bench_train.run_benchmark(str(tmp_path), epochs=2, local_epochs=2, model="lenet_asnn_tiny",
                                    overrides=["optim.micro_batch_size=64"])
    names = [s.name.split(" (")[0] for s in rep.sides]
    local = [bench_train.PLAIN, bench_train.LOCAL_DS]
    assert names == [*local, bench_train.RAY, *local]
    for side in rep.sides:
        assert len(side.rates) == 2 and all(r > 0 for r in side.rates)
        assert all(c > 0 for c in side.cpu_s[1:])  # CPU seconds of the steady-state epoch
    ray = rep.sides[2]
    assert ray.extra["final_rate"] == pytest.approx(ray.rates[-1])
    assert 0 < ray.extra["worker_core"] < 1.5  # one thread per worker (plus Ray's own threads)
    assert rep.train_samples > 1000 and rep.steps_per_epoch == -(-rep.train_samples // 64)
    assert rep.log_call_s > 0 and rep.log_enqueue_s > 0
    # one worker: the engines ran ZeRO-2 as ZeRO-0 (deepspeed_config.run_stage), and said so
    assert all(s.name.endswith("(ZeRO-2 as 0)") for s in rep.sides if not s.name.startswith(bench_train.PLAIN))
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(ray.extra["run_id"]).data.tags
    assert tags["asnn.zero_stage_run"] == "0"
    text = bench_train.format_report(rep)
    assert "overhead vs plain" in text and "MLflow log_metrics" in text
    assert not dist.is_initialized()  # the benchmark's local process group is gone
