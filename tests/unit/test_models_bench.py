"""``asnn-dist bench model``: FLOP accounting, the child-process plumbing, and the table and
target lines (measurements replaced by in-process runs of a tiny model, to stay fast)."""

import json

import pytest
import torch

from asnn_dist.bench import model as bench
from asnn_dist.bench import model_runs


def test_training_flops_match_the_issue_figure():
    """22.4 GFLOP per training sample for Spikformer-4-384 at 32x32 and T=4 (3 x forward)."""
    flops = bench.train_flops_per_sample("spikformer_4_384", 32, 4)
    assert flops / 1e9 == pytest.approx(22.4, rel=0.01)


def test_child_process_reports_json(tmp_path):
    env, label = bench.allocator_env("jemalloc")
    assert "jemalloc" in label or "not found" in label
    out = bench.run_child(dict(kind="peak", threads=1, size=64, repeats=2), timeout=120, env=env)
    assert out["fp32_gflops"] > 0 and out["bf16_gflops"] > 0


def test_measure_builds_every_row_and_target(monkeypatch, capsys):
    def in_process(spec, timeout, env=None):
        if spec["kind"] == "peak":
            return {"fp32_gflops": 100.0, "bf16_gflops": 300.0}
        if spec["kind"] == "accuracy":
            return {"fp32_accs": [0.9], "bf16_accs": [0.9], "fp32_acc": 0.9, "bf16_acc": 0.9,
                    "fp32_s": 1.0, "bf16_s": 1.0}
        return json.loads(json.dumps(model_runs.RUNS[spec["kind"]](spec)))

    monkeypatch.setattr(bench, "run_child", in_process)
    torch.set_num_threads(1)
    argv = ["--model", "spikformer_tiny", "--image-size", "16", "--batch", "2", "--steps", "4", "8",
            "--segments", "2", "--states", "1", "--iters", "1", "--warmup", "0", "--threads", "1", "--json", "/dev/null"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "(best)" in out and "2 S1" in out and "bf16" in out and "infer" in out
    for needle in ("utilisation", "vs official fp32 4.8", "both k=2:", "both k=2 S1:", "[T=8 cost",
                   "throughput cost at T=8", "digits", "bf16 / fp32 engine T=4 images/s"):
        assert needle in out, needle


def test_train_rows_run_deepspeed_engines_in_their_precision(monkeypatch, tmp_path):
    """The bf16 rows are DeepSpeed's bf16 engine (bf16 parameters, no autocast), the fp32 rows
    the engine one fp32 rank runs (ZeRO-0); --rounds measures each configuration again."""
    calls = []

    def in_process(spec, timeout, env=None):
        calls.append((spec["kind"], spec.get("precision")))
        if spec["kind"] == "peak":
            return {"fp32_gflops": 100.0, "bf16_gflops": 300.0}
        return json.loads(json.dumps(model_runs.RUNS[spec["kind"]](spec)))

    monkeypatch.setattr(bench, "run_child", in_process)
    torch.set_num_threads(1)
    out = tmp_path / "rows.json"
    argv = ["--model", "spikformer_tiny", "--image-size", "16", "--batch", "2", "--steps", "4", "--no-checkpoint",
            "--no-accuracy", "--iters", "1", "--warmup", "0", "--threads", "1", "--rounds", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = {(r["kind"], r["precision"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("train", "bf16")]["param_dtype"] == "torch.bfloat16" and rows[("train", "bf16")]["zero_stage"] == 2
    assert rows[("train", "fp32")]["param_dtype"] == "torch.float32" and rows[("train", "fp32")]["zero_stage"] == 0
    assert all(len(r["times"]) == (2 if r["kind"] == "train" else 6) for r in rows.values())  # two rounds
    assert calls.count(("train", "bf16")) == 2 and calls[1:3] == [("train", "fp32"), ("train", "bf16")]
