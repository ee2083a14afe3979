"""Training progress a person can watch: one line per worker group, drawn by the driver.

Rank 0 sends its step count (at most every ``SEND_EVERY_S``) and one summary per evaluation to
a tiny actor on the driver's node; the driver polls it and draws a single line that updates in
place on a terminal, or prints a plain line every ``PLAIN_EVERY_S`` when its output is a file
(``ray job logs``, CI). Worker-side progress bars cannot do this: Ray forwards each worker's
carriage returns as separate prefixed lines.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import Any, Optional, TextIO

SEND_EVERY_S = 0.5
PLAIN_EVERY_S = 30.0


class ProgressBoard:
    """Holds the latest step count and the evaluation summaries (a Ray actor, 0 CPUs)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.events: list[str] = []

    def update(self, state: dict[str, Any]) -> None:
        self.state = state

    def event(self, text: str) -> None:
        self.events.append(text)

    def poll(self, seen: int) -> tuple[dict[str, Any], list[str]]:
        return self.state, self.events[seen:]


def start_board() -> Any:
    """The board actor, pinned to the driver's node (it lives and dies with the driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_concurrency=4)(ProgressBoard).options(scheduling_strategy=here).remote()


def eval_summary(metrics: dict[str, float]) -> str:
    """The one line printed per evaluation."""
    parts = [f"eval step {int(metrics.get('global_step', 0))} (epoch {int(metrics.get('epoch', 0))})",
             f"top-1 {metrics.get('val_top1', float('nan')):.4f}", f"top-5 {metrics.get('val_top5', float('nan')):.4f}",
             f"loss {metrics.get('val_loss', float('nan')):.4f}"]
    if "train_images_per_s" in metrics:
        parts.append(f"{metrics['train_images_per_s']:.0f} img/s")
    if "val_firing_rate/mean" in metrics:
        parts.append(f"firing rate {metrics['val_firing_rate/mean']:.3f}")
    return ", ".join(parts)


class WorkerProgress:
    """Rank 0's side: step counts (rate-limited, fire-and-forget) and evaluation summaries."""

    def __init__(self, board: Any, total: int, initial: int = 0) -> None:
        self.board, self.total, self.step = board, total, initial
        self.start_step, self.t0, self.sent_at = initial, time.monotonic(), 0.0
        self.epoch = 0
        self._send(force=True)

    def update(self, n: int = 1, epoch: Optional[int] = None) -> None:
        self.step += n
        if epoch is not None:
            self.epoch = epoch
        self._send(force=self.step >= self.total)

    def evaluated(self, metrics: dict[str, float]) -> None:
        self.board.event.remote(eval_summary(metrics))

    def close(self) -> None:
        self._send(force=True)

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.sent_at < SEND_EVERY_S:
            return
        self.sent_at = now
        rate = (self.step - self.start_step) / max(now - self.t0, 1e-9)
        self.board.update.remote({"step": self.step, "total": self.total, "epoch": self.epoch, "steps_per_s": rate})


def progress_line(state: dict[str, Any], width: int = 40) -> str:
    """``train [#####.....] 120/240 steps (50%) epoch 5 | 11.8 steps/s | ETA 0:10``."""
    step, total = int(state.get("step", 0)), max(int(state.get("total", 1)), 1)
    done = min(step / total, 1.0)
    filled = int(done * width)
    rate = float(state.get("steps_per_s", 0.0))
    eta = f"{int((total - step) / rate) // 60}:{int((total - step) / rate) % 60:02d}" if rate > 0 else "?"
    return (f"train [{'#' * filled}{'.' * (width - filled)}] {step}/{total} steps ({done:.0%}) "
            f"epoch {int(state.get('epoch', 0))} | {rate:.1f} steps/s | ETA {eta}")


class DriverProgress:
    """Polls the board and draws the line; ``suspend`` lets other output print cleanly above it."""

    def __init__(self, board: Any, stream: TextIO = sys.stdout, poll_s: float = 0.5,
                 plain_every_s: float = PLAIN_EVERY_S) -> None:
        self.board, self.stream, self.poll_s, self.plain_every_s = board, stream, poll_s, plain_every_s
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.lock = threading.RLock()
        self.seen, self.line, self.drawn, self.printed_at = 0, "", False, 0.0
        self.last_plain = ""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="asnn-progress", daemon=True)

    def __enter__(self) -> "DriverProgress":
        from asnn_dist.train.console import add_output_guard

        add_output_guard(self)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from asnn_dist.train.console import remove_output_guard

        self._stop.set()
        self.thread.join(timeout=10)
        self._poll_once()
        with self.lock:
            self._erase()
            if self.line and self.line != self.last_plain:
                self._write(self.line + "\n")  # the final state stays on screen
        remove_output_guard(self)

    def suspend(self) -> None:
        """Erase the line and hold it off until ``resume`` (another thread prints meanwhile)."""
        self.lock.acquire()
        self._erase()

    def resume(self) -> None:
        try:
            if self.tty and self.line:
                self._draw()
        finally:
            self.lock.release()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll_once()

    def _poll_once(self) -> None:
        import ray

        try:
            state, events = ray.get(self.board.poll.remote(self.seen), timeout=10)
        except Exception:  # noqa: BLE001 - progress must never break a run
            return
        with self.lock:
            self.seen += len(events)
            if events:
                self._erase()
                for text in events:
                    self._write(text + "\n")
            if state:
                self.line = progress_line(state, width=self._bar_width())
                now = time.monotonic()
                if self.tty:
                    self._draw()
                elif now - self.printed_at >= self.plain_every_s and self.line != self.last_plain:
                    self._write(self.line + "\n")
                    self.printed_at, self.last_plain = now, self.line

    def _bar_width(self) -> int:
        cols = shutil.get_terminal_size((100, 20)).columns if self.tty else 100
        return max(10, min(40, cols - 70))

    def _draw(self) -> None:
        self._write("\r\x1b[K" + self.line)
        self.drawn = True

    def _erase(self) -> None:
        if self.drawn:
            self._write("\r\x1b[K")
            self.drawn = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass
