"""``asnn-dist bench neurons`` on given numbers and tiny tensors: the target verdicts, the memory
measurements and the CUDA table. The timings themselves run in ``asnn-dist bench neurons``."""

from __future__ import annotations

import torch

from asnn_dist.bench import neurons
from asnn_dist.snn.neurons import AdaptiveLIF


def test_targets_at_t8_are_judged_on_the_numbers():
    """Speed >= 2x for lone layers (not the stack, whose linears dilute it), peak <= 0.5x for
    every row (rounded to 3 digits: a lone layer sits at 0.500 plus parameter gradients);
    other T are not judged."""
    rows = [
        {"layer": "spikformer", "shape": "32x64x384", "T": 8, "speedup_vs_loop": 2.4, "peak_ratio_vs_loop": 0.5004},
        {"layer": "conv", "shape": "32x128x16x16", "T": 8, "speedup_vs_loop": 1.9, "peak_ratio_vs_loop": 0.5006},
        {"layer": "stack4", "shape": "32x64x384", "T": 8, "speedup_vs_loop": 1.1, "peak_ratio_vs_loop": 0.41},
        {"layer": "spikformer", "shape": "32x64x384", "T": 4, "speedup_vs_loop": 0.5, "peak_ratio_vs_loop": 0.9},
    ]
    assert neurons.target_lines(rows) == [
        "  spikformer 32x64x384: speed 2.40x (target >= 2x) met",
        "  spikformer 32x64x384: peak memory 0.500x (target <= 0.5x) met",
        "  conv 32x128x16x16: speed 1.90x (target >= 2x) NOT met",
        "  conv 32x128x16x16: peak memory 0.501x (target <= 0.5x) NOT met",
        "  stack4 32x64x384: peak memory 0.410x (target <= 0.5x) met",
    ]
    assert neurons.target_lines(rows[3:]) == []


def test_saved_bytes_fused_keeps_its_input_only():
    """The fused neuron saves x alone for backward (it recomputes the membranes); the step loop
    keeps more than that (membranes and pre-spike potentials of every step)."""
    x = torch.randn(4, 2, 64, requires_grad=True)
    fused = neurons.saved_bytes(AdaptiveLIF(4, backend="fused"), x)
    loop = neurons.saved_bytes(AdaptiveLIF(4, backend="loop"), x)
    assert fused == x.numel() * 4 + 2 * 4 * 4  # x, plus the leak and gain tensors (T floats each)
    assert loop > 2 * x.numel() * 4


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
