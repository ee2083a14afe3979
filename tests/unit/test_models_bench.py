"""``asnn-dist bench model`` on given numbers: FLOP accounting, the allocator environment, the
child-process protocol, how rows are kept over rounds and compared, and the target verdicts.
The measurements themselves run in ``asnn-dist bench model``, not in the unit suite."""

import argparse
import json

import pytest
import torch

from asnn_dist.bench import model as bench
from asnn_dist.bench import model_runs
from asnn_dist.bench.common import close_local_group


def test_training_flops_match_the_issue_figure():
    """22.4 GFLOP per training sample for Spikformer-4-384 at 32x32 and T=4 (3 x forward)."""
    flops = bench.train_flops_per_sample("spikformer_4_384", 32, 4)
    assert flops / 1e9 == pytest.approx(22.4, rel=0.01)


def test_allocator_env_preloads_jemalloc_only_where_found(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.setattr(bench.ctypes.util, "find_library", lambda name: None)
    env, label = bench.allocator_env("jemalloc")
    assert label == "glibc malloc (jemalloc not found)" and env["LD_PRELOAD"] == "libother.so"
    assert "MALLOC_CONF" not in env
    monkeypatch.setattr(bench.ctypes.util, "find_library", lambda name: f"lib{name}.so.2")
    env, label = bench.allocator_env("jemalloc")
    assert env["LD_PRELOAD"] == "libjemalloc.so.2 libother.so" and env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert label == "jemalloc (libjemalloc.so.2, decay off)"
    env, label = bench.allocator_env("glibc")
    assert label == "glibc malloc" and env["LD_PRELOAD"] == "libother.so" and "MALLOC_CONF" not in env


def test_child_process_reports_json():
    out = bench.run_child(dict(kind="peak", threads=1, size=64, repeats=2), timeout=120)
    assert set(out) == {"fp32_gflops", "bf16_gflops"} and out["fp32_gflops"] > 0 and out["bf16_gflops"] > 0


# Given measurements (seconds per step, MiB) per (kind, T, precision, k, states): the table and
# the targets are computed from these; nothing is timed.
STEP_S = {("train", 4, "fp32", 0, None): 1.0, ("train", 4, "bf16", 0, None): 0.5,
          ("train", 4, "fp32", 1, None): 1.25, ("train", 4, "fp32", 1, 1): 1.5,
          ("train", 8, "fp32", 0, None): 2.0, ("train", 8, "bf16", 0, None): 1.0,
          ("train", 8, "fp32", 1, None): 2.5, ("train", 8, "fp32", 1, 1): 4.0}
PEAK_MIB = {("train", 4, "fp32", 0, None): 4000.0, ("train", 4, "fp32", 1, None): 3000.0,
            ("train", 4, "fp32", 1, 1): 2500.0, ("train", 8, "fp32", 0, None): 7000.0,
            ("train", 8, "fp32", 1, None): 3300.0, ("train", 8, "fp32", 1, 1): 2600.0}


def _args(**kw) -> argparse.Namespace:
    base = dict(model="spikformer_tiny", image_size=16, batch=8, threads=1, warmup=0, iters=1, timeout=60.0,
                allocator="glibc", peak_size=64, zero_stage=2, steps=[4, 8], segments=[1], levels=[2], states=[1],
                rounds=2, bf16=True, checkpoint=True, accuracy=True, accuracy_epochs=1, accuracy_seeds=2)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def given(monkeypatch):
    """run_child answers from the tables above: the first round 0.5 s slower and 100 MiB lower
    than the second, so the rows must keep the fastest step and the highest peak."""
    calls: list[tuple] = []

    def fake(spec, timeout, env=None):
        if spec["kind"] == "peak":
            return {"fp32_gflops": 36.0, "bf16_gflops": 400.0}
        if spec["kind"] == "accuracy":
            return {"fp32_accs": [0.98, 0.97], "bf16_accs": [0.96, 0.97], "fp32_acc": 0.975, "bf16_acc": 0.965,
                    "fp32_s": 10.0, "bf16_s": 12.0}
        key = (spec["kind"], spec["steps"], spec["precision"], spec["segment"], spec["states"])
        first = key not in {c[0] for c in calls}
        calls.append((key, spec["zero_stage"]))
        step = STEP_S.get(key, 0.25) + (0.5 if first else 0.0)
        return {"step_s": step, "times": [step], "peak_mib": PEAK_MIB.get(key, 1000.0) - (100.0 if first else 0.0),
                "zero_stage": 2 if spec["precision"] == "bf16" else 0}

    monkeypatch.setattr(bench, "run_child", fake)
    monkeypatch.setattr(bench, "train_flops_per_sample", lambda model, size, steps: 1e9 * steps)
    return calls


def test_rows_keep_the_fastest_round_and_mark_the_lowest_memory(given):
    result = bench.measure(_args(), log=lambda s: None)
    rows = {(r["kind"], r["steps"], r["precision"], r["segment"], r["states"]): r for r in result["rows"]}
    assert len(rows) == 12 and len(given) == 24  # 6 configurations per T, two rounds each
    plain, bf16 = rows[("train", 4, "fp32", 0, None)], rows[("train", 4, "bf16", 0, None)]
    assert plain["img_s"] == 8.0 and plain["peak_mib"] == 4000.0 and plain["times"] == [1.5, 1.0]
    assert plain["util"] == pytest.approx(8.0 * 4 / 36.0) and bf16["util"] == pytest.approx(16.0 * 4 / 400.0)
    infer = rows[("infer", 4, "fp32", 0, None)]
    assert infer["gflops"] == pytest.approx(32.0 * 4 / 3)  # inference: a third of the training FLOPs
    assert rows[("train", 4, "fp32", 1, None)]["cost"] == pytest.approx(0.2)
    assert rows[("train", 8, "fp32", 1, 1)]["cost"] == pytest.approx(0.5)
    assert [key for key, r in rows.items() if r.get("best")] == [("train", 4, "fp32", 1, 1), ("train", 8, "fp32", 1, 1)]
    assert "1 S1 (best)" in bench.format_table(result)


def test_target_verdicts_follow_the_numbers(given):
    lines = bench.target_lines(bench.measure(_args(), log=lambda s: None))

    def met(start: str) -> bool:
        (line,) = [ln for ln in lines if ln.strip().startswith(start)]
        return "NOT met" not in line

    assert met("fp32 T=4 utilisation")  # 8 img/s x 4 GFLOP / 36 = 89% >= 85%
    assert met("fp32 T=4 peak memory vs official")  # 4000 MiB / 9 GiB = 0.43x <= 0.5x
    assert met("bf16 T=4 images/s vs official")  # 16 / 4.8 = 3.3x >= 2x
    assert met("bf16 / fp32 engine T=4 images/s (ZeRO-2 bf16 engine vs ZeRO-0")  # 2.0x >= 1.8x
    assert met("checkpointed peak memory T=8 (lowest: k=1 S1) / T=4 (lowest: k=1 S1)")  # 2600 / 2500
    assert not met("checkpointed peak memory T=8 (lowest within the 35% cost: k=1, cost 20%)")  # 3300 / 2500
    assert met("checkpointed peak memory T=8 / T=4, both k=1:")  # 3300 / 3000 = 1.1x
    assert met("checkpointed peak memory T=8 (best k) / plain T=4")  # 2600 / 4000
    assert not met("checkpointing throughput cost at T=8 (best k)")  # 50% > 35%
    assert not met("bf16 - fp32 accuracy")  # 1 point apart > 0.5


def test_train_rows_run_deepspeed_engines_in_their_precision(monkeypatch, tmp_path):
    """The bf16 rows are DeepSpeed's bf16 engine (bf16 parameters, no autocast), the fp32 rows
    the engine one fp32 rank runs (ZeRO-0): one tiny step of each, in this process."""
    torch.set_num_threads(1)
    spec = dict(kind="train", model="spikformer_tiny", image_size=16, num_classes=10, batch=2, threads=1, warmup=0,
                iters=1, steps=4, segment=0, levels=2, states=None, zero_stage=2)
    try:
        bf16 = json.loads(json.dumps(model_runs.RUNS["train"](dict(spec, precision="bf16"))))
        fp32 = json.loads(json.dumps(model_runs.RUNS["train"](dict(spec, precision="fp32"))))
    finally:
        close_local_group()  # the engines' one-rank group: later tests start their own
    assert bf16["param_dtype"] == "torch.bfloat16" and bf16["zero_stage"] == 2
    assert fp32["param_dtype"] == "torch.float32" and fp32["zero_stage"] == 0
