"""`asnn-dist bench neurons` runs end to end and prints every backend and the targets."""

from __future__ import annotations

from asnn_dist.bench import neurons


def test_bench_neurons_table_and_targets(capsys):
    assert neurons.main(["--steps", "8", "--repeats", "1", "--stack", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "fused = C kernel" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("layer"))
    for col in ("fused ms", "ops ms", "loop ms", "speedup", "peak ratio", "saved ratio"):
        assert col in header
    for layer in ("spikformer", "conv", "stack2"):
        assert any(line.lstrip().startswith(layer) for line in out.splitlines())
    assert out.count("(target >= 2x)") == 2 and out.count("(target <= 0.5x)") == 3


def test_peak_bytes_counts_only_what_the_call_allocates():
    import torch

    keep = torch.ones(1 << 20)  # alive before and after: not part of the peak
    assert neurons.peak_bytes(lambda: torch.ones(1 << 18).sum()) >= 4 * (1 << 18)
    assert neurons.peak_bytes(lambda: None) < 4 * (1 << 18)
    del keep
