"""``asnn-dist bench data`` on tiny inputs: every source row is measured in one run (local
shards, local folder, S3 shards and one S3 object per sample, both through a real moto server)
and each reads every sample once per pass. Behaviour only; speed is the benchmark's business."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from asnn_dist.cli import main

TINY = ["--samples", "24", "--image-size", "64x48", "--out-size", "32", "--classes", "2",
        "--samples-per-shard", "8", "--batch-size", "4", "--repeats", "2", "--cache", "warm"]
ROWS = ("local shards", "folder of JPEG files", "S3 shards (moto, loopback)", "S3 JPEG objects (moto)")


@pytest.mark.parametrize("workers", [0, 2])
def test_bench_data_rows_and_counts(workers: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    assert main(["bench", "data", *TINY, "--workers", str(workers), "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    counts = {}
    for row in ROWS:
        match = re.search(rf"^{re.escape(row)}\s+(\d+)\s+(\d+)\s+[\d.]+x", out, re.M)
        assert match, f"row {row!r} missing:\n{out}"
        counts[row] = int(match.group(1))
        assert int(match.group(2)) > 0, out  # a measured rate, not a placeholder
    assert set(counts.values()) == {24}, counts
    assert re.search(r"^S3 shards / S3 objects\s+= [\d.]+x samples/s .*target >= 2.00x$", out, re.M), out
    assert (work / "folder").is_dir() and list((work / "shards").glob("*.tar"))


def test_bench_data_refuses_a_used_workdir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert main(["bench", "data", *TINY, "--workdir", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_bench_data_resume_mode_prints_the_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--resume``: one run measures processing p samples, a fresh and a resumed first batch,
    and prints the cost ratio; the resumed batch is checked against the uninterrupted pass."""
    args = ["--samples", "24", "--image-size", "64x48", "--out-size", "32", "--classes", "2",
            "--samples-per-shard", "4", "--batch-size", "4", "--repeats", "1", "--cache", "warm"]
    assert main(["bench", "data", "--resume", "--resume-at", "0.5", *args, "--workers", "2",
                 "--workdir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^resume at batch 3 of 6 \(p = 12 samples\), 2 workers", out, re.M), out
    for row in ("process p samples (fresh loader)", "first batch, fresh loader", "first batch, resumed at p",
                "resume cost (resumed - fresh)"):
        for unit in ("CPU-s", "s"):
            assert re.search(rf"^{re.escape(f'{row}, {unit}')}\s+-?\d+\.\d+   -?\d+\.\d+$", out, re.M), out
    for kind in ("CPU time", "wall time"):
        assert re.search(rf"^resume cost / processing p \({kind}\) = -?[\d.]+ % \((met|missed); target <= 5 %\)$",
                         out, re.M), out
    assert "resumed batch bit-identical to the uninterrupted pass: yes" in out
