"""What the driver's console shows of the workers' output: everything except known-harmless noise.

Ray forwards every worker's stdout/stderr to the driver (and so to ``ray job logs``). A few
lines there are noise on every run and tell a user nothing they can act on; they are dropped
here, each with the reason, by wrapping Ray's own log printer. Everything else, warnings and
errors included, is printed as Ray prints it, above the progress line (``progress.py``).

This wraps a private part of Ray (``ray._private.ray_logging``'s stream dispatcher); the test
``tests/unit/test_console.py`` fails loudly if a Ray upgrade moves it.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Optional

HANDLER = "ray_print_logs"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# (pattern, why it is dropped)
KNOWN_NOISE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Actor with class name: 'PreemptionWatcher' .*constructor arguments in the object store"),
     "Ray Train 2.60's controller logs it for its own preemption-watcher actor at every worker-group "
     "start (ray-project/ray#53727); the watcher works, and nothing here is the user's to fix"),
    (re.compile(r"^DeepSpeed \S+ built successfully$"),
     "DeepSpeed prints it whenever a rank loads an already-built op (every rank, every start)"),
)

_guards: list[Any] = []
_lock = threading.RLock()


def is_noise(line: str) -> bool:
    """Blank lines and the known-harmless lines above."""
    text = ANSI.sub("", line).strip()
    return not text or any(p.search(text) for p, _ in KNOWN_NOISE)


def filter_lines(data: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The log batch without its noise lines, or None when nothing is left to print."""
    lines = [line for line in data.get("lines", []) if not is_noise(line)]
    if not lines:
        return None
    return {**data, "lines": lines}


def _dispatcher():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def install_log_filter() -> bool:
    """Wrap Ray's driver-side log printer (once per ``ray.init``); False if it is not there."""
    dispatcher = _dispatcher()
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    current = next((fn for name, fn in handlers if name == HANDLER), None)
    if current is None or getattr(current, "_asnn_filtered", False):
        return current is not None

    def filtered(data: dict[str, Any], _print: Callable[[dict[str, Any]], None] = current) -> None:
        kept = filter_lines(data)
        if kept is None:
            return
        with _lock:
            for guard in _guards:
                guard.suspend()
            try:
                _print(kept)
            finally:
                for guard in _guards:
                    guard.resume()

    filtered._asnn_filtered = True  # type: ignore[attr-defined]
    dispatcher.remove_handler(HANDLER)
    dispatcher.add_handler(HANDLER, filtered)
    return True


def add_output_guard(guard: Any) -> None:
    """Register something drawn in place (a progress line) to erase and redraw around logs."""
    with _lock:
        _guards.append(guard)


def remove_output_guard(guard: Any) -> None:
    with _lock:
        if guard in _guards:
            _guards.remove(guard)
