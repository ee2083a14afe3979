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


def test_cuda_device_without_a_gpu_fails_with_a_clear_message(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tests/gpu/run_gpu_checks.sh runs this benchmark")
    with pytest.raises(SystemExit) as exit_info:
        neurons.main(["--device", "cuda", "--steps", "8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda needs a CUDA GPU" in err and "torch.cuda.is_available() is False" in err


def test_cuda_table_shows_bandwidth_against_the_peak():
    from asnn_dist.bench import neurons_cuda

    row = {"layer": "sf8-768-mlp", "shape": "32x64x3072", "T": 8, "dtype": "float32", "triton_fwd_ms": 0.5,
           "fwd_gbs": 3200.0, "fwd_peak_frac": 2 / 3, "bwd_gbs": 2400.0, "bwd_peak_frac": 0.5,
           "fb_peak_frac": 0.55, "ops_gbs": 300.0, "speedup_vs_ops": 8.0, "speedup_vs_loop": 20.0}
    for name in ("triton", "ops", "loop"):
        row.update({f"{name}_ms": 1.0, f"{name}_peak_mb": 100.0})
    table = neurons_cuda.format_table([row])
    header, _, line = table.splitlines()
    for col in ("triton fwd ms", "fwd GB/s", "fwd/peak", "bwd/peak", "vs ops", "vs loop", "ops peak MB"):
        assert col in header
    assert "sj ms" not in header and "67%" in line and "50%" in line and "8.00x" in line
