"""tests/gpu/run_gpu_checks.sh cannot run without a GPU; here: it is valid bash, its training
config (the shipped file plus its --set overrides) validates, its benchmark arguments parse,
and without CUDA it stops at once with a clear message instead of passing on skipped tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "run_gpu_checks.sh"


def _command(marker: str) -> list[str]:
    """The arguments of the script's command that contains ``marker`` (continued lines joined)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if marker in line)
    return re.findall(r'"[^"]*"|\S+', line)


def test_script_is_valid_bash_and_executable():
    assert SCRIPT.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_training_stage_config_validates(tmp_path):
    from asnn_dist.config import load_config

    words = _command("asnn_dist.cli train")
    config = words[words.index("train") + 1]
    overrides = [w.strip('"').replace("${WORK}", str(tmp_path)) for w in words[words.index("--set") + 1:]]
    cfg = load_config(str(ROOT / config), overrides)
    assert cfg.model.name == "spikformer_tiny" and cfg.run.num_workers == 1 and cfg.run.use_gpu
    assert cfg.engine.precision == "bf16" and cfg.tracking.registered_model is None


def test_benchmark_stage_arguments_parse():
    from asnn_dist.bench import neurons

    words = _command("bench neurons --device cuda (float32)")
    args = [w.strip('"').replace("${PEAK_GBS}", "4800") for w in words[words.index("neurons") + 1:]]
    assert args[:2] == ["--device", "cuda"] and "--peak-gbs" in args
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):  # parses, then stops: no GPU here
            neurons.main(args)


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("timeout") is None, reason="needs a machine without a GPU and coreutils timeout")
def test_without_cuda_the_script_stops_with_a_message():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 1
    assert "no CUDA device" in proc.stderr and "=== gpu tests" not in proc.stdout
