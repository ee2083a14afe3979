"""The driver's console: which worker lines are dropped as known noise, and what the progress
and evaluation lines say. The end-to-end behaviour (a real Ray forwarding real worker output,
a real terminal) is in tests/integration/test_local_ray.py."""

from __future__ import annotations

import pytest

from asnn_dist.train.console import filter_lines, is_noise
from asnn_dist.train.progress import eval_summary, progress_line


@pytest.mark.parametrize("line", [
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "",
    "   ",
    "\x1b[0m  \x1b[36m",
    "[2026-12-02 01:14:04,438 E 14484 14512] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: 'e2d4f391' has constructor arguments in the object store and max_restarts > 0. If the arguments ...",
])
def test_known_noise_is_dropped(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", [
    "WARNING: DeepSpeed op build failed: falling back",
    "Traceback (most recent call last):",
    "[2026-12-02 E core_worker.cc:99: Actor with class name: 'RayTrainWorker' died unexpectedly",
    "eval step 24 (epoch 1), top-1 0.1028",
])
def test_real_lines_are_kept(line):
    assert not is_noise(line)


def test_filter_keeps_the_batch_metadata_and_drops_empty_batches():
    data = {"pid": 7, "ip": "127.0.0.1", "lines": ["", "real", "DeepSpeed x built successfully"]}
    assert filter_lines(data) == {"pid": 7, "ip": "127.0.0.1", "lines": ["real"]}
    assert filter_lines({"pid": 7, "lines": ["", "DeepSpeed x built successfully"]}) is None


def test_ray_still_has_the_printer_the_filter_wraps():
    """Fails loudly if a Ray upgrade moves the private dispatcher ``console.py`` wraps."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    assert callable(dispatcher.add_handler) and callable(dispatcher.remove_handler)
    assert isinstance(dispatcher.handlers, list) and hasattr(dispatcher, "_lock")
    assert callable(ray_worker.print_to_stdstream)


def test_progress_line_and_eval_summary():
    line = progress_line({"step": 60, "total": 240, "epoch": 3, "steps_per_s": 10.0}, width=20)
    assert line == "train [#####...............] 60/240 steps (25%) epoch 3 | 10.0 steps/s | ETA 0:18"
    assert progress_line({"step": 0, "total": 10}, width=10).endswith("ETA ?")
    text = eval_summary({"global_step": 48, "epoch": 2, "val_top1": 0.95833, "val_top5": 1.0, "val_loss": 0.4,
                         "train_images_per_s": 638.2, "val_firing_rate/mean": 0.03})
    assert text == "eval step 48 (epoch 2), top-1 0.9583, top-5 1.0000, loss 0.4000, 638 img/s, firing rate 0.030"
