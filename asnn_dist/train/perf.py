"""Throughput helpers: a quick matmul-peak probe so utilisation is measured, not assumed."""

from __future__ import annotations

import time

import torch


def matmul_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5,
                      device: str = "cpu") -> float:
    """Best achieved FLOP/s of a square matmul on this device/threads in ~``seconds``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up (and BLAS thread pool start)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / max(time.perf_counter() - t0, 1e-12))
    return best
