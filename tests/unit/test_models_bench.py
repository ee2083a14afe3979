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
                   "throughput cost at T=8", "digits"):
        assert needle in out, needle
