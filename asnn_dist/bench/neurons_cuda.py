"""``asnn-dist bench neurons --device cuda``: the Triton LIF kernel against the torch-op fallback,
the loop of step functions and SpikingJelly (when installed) on one GPU, with the memory
bandwidth the Triton kernel achieves.

Why bandwidth: the neuron is elementwise work over T steps, so on a GPU its speed is bounded
by memory traffic, and "fraction of the device's peak bandwidth" says how good a kernel is
independently of the GPU. The least any implementation must move per element and step: the
forward reads x and writes the spikes (2 values), the backward reads x and dL/ds and writes
dx (3 values). Achieved GB/s = those bytes / measured time, reported against ``--peak-gbs``
(default 4800 GB/s, an H200's HBM3e; H100 SXM: 3350). The other backends' columns use the
same byte count, so their GB/s is an effective rate.

Layer: the Spikformer-8-768 MLP hidden activation, [T, B * N, 4 * 768] = [T, 32 * 64, 3072]
at batch 32 and 64 tokens (8x8 patches), and the 768-channel shape of its other layers.
Times: median of ``--repeats`` CUDA-event timings after two warm-up calls (the first
compiles the Triton kernels); backends alternate within each repeat.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch
from torch import Tensor, nn

from asnn_dist.snn import backends
from asnn_dist.snn.neurons import AdaptiveLIF

LAYERS = {"sf8-768-mlp": (32, 64, 3072), "sf8-768": (32, 64, 768)}
VALUES_FORWARD, VALUES_BACKWARD = 2, 3  # least values moved per element and step
MB = 2.0**20


def check_device() -> str | None:
    """Why this benchmark cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA (a CPU build)"
        return (f"--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False here "
                f"(torch {torch.__version__}, built {built}); run on a GPU machine or use --device cpu")
    if not backends.triton_importable():
        return "--device cuda times the Triton kernels, but triton cannot be imported: pip install triton"
    return None


class _Ops(nn.Module):
    """Runs a module with the fused kernel's torch-op path (Triton switched off)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        with backends.forced_triton(False):
            return self.module(x)


def _modules(T: int, sj: Callable[[], nn.Module] | None, device: torch.device) -> dict[str, nn.Module]:
    mods: dict[str, nn.Module] = {
        "triton": AdaptiveLIF(T, backend="fused"),
        "ops": _Ops(AdaptiveLIF(T, backend="fused")),
        "loop": AdaptiveLIF(T, backend="loop"),
    }
    if sj is not None:
        mods["sj"] = sj()
    return {name: m.to(device) for name, m in mods.items()}


def _timed(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _forward(module: nn.Module, x: Tensor) -> Callable[[], Any]:
    return lambda: module(x)


def _forward_backward(module: nn.Module, x: Tensor, gout: Tensor) -> Callable[[], Any]:
    def run() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(gout)
    return run


def _peak_mb(fn: Callable[[], Any], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MB


def run(steps: tuple[int, ...], repeats: int, dtype: torch.dtype, peak_gbs: float,
        sj: Callable[[], nn.Module] | None = None) -> list[dict]:
    """One row per (layer, T): fwd / fwd+bwd ms per backend, Triton bandwidth and its share of
    ``peak_gbs``, speedups, peak memory."""
    device = torch.device("cuda")
    rows = []
    for layer, shape in LAYERS.items():
        for T in steps:
            gen = torch.Generator(device=device).manual_seed(0)
            x = (1.5 * torch.randn(T, *shape, generator=gen, device=device)).to(dtype).requires_grad_()
            gout = torch.randn(T, *shape, generator=gen, device=device).to(dtype)
            mods = _modules(T, sj, device)
            picked = backends.lif_backend(x, mods["triton"].surrogate)
            if picked != "triton":
                raise RuntimeError(f"the fused kernel picked {picked!r}, not Triton, for {dtype} at T={T}")
            calls = {}
            for name, m in mods.items():
                calls[f"{name}_fwd"] = _forward(m, x)
                calls[f"{name}_fb"] = _forward_backward(m, x, gout)
            for fn in calls.values():  # warm-up: compiles the Triton kernels, fills the caches
                fn()
                fn()
            times: dict[str, list[float]] = {key: [] for key in calls}
            for _ in range(repeats):
                for key, fn in calls.items():
                    times[key].append(_timed(fn))
            ms = {key: statistics.median(v) for key, v in times.items()}
            values = T * x[0].numel()
            fwd_bytes = VALUES_FORWARD * values * x.element_size()
            bwd_bytes = VALUES_BACKWARD * values * x.element_size()
            bwd_ms = max(ms["triton_fb"] - ms["triton_fwd"], 1e-6)
            row: dict[str, Any] = {"layer": layer, "shape": "x".join(map(str, shape)), "T": T,
                                   "dtype": str(dtype).replace("torch.", "")}
            for name in mods:
                row[f"{name}_fwd_ms"] = ms[f"{name}_fwd"]
                row[f"{name}_ms"] = ms[f"{name}_fb"]
                row[f"{name}_peak_mb"] = _peak_mb(calls[f"{name}_fb"], device)
            row["fwd_gbs"] = fwd_bytes / (ms["triton_fwd"] * 1e6)
            row["bwd_gbs"] = bwd_bytes / (bwd_ms * 1e6)
            row["fb_gbs"] = (fwd_bytes + bwd_bytes) / (ms["triton_fb"] * 1e6)
            for key in ("fwd", "bwd", "fb"):
                row[f"{key}_peak_frac"] = row[f"{key}_gbs"] / peak_gbs
            row["ops_gbs"] = (fwd_bytes + bwd_bytes) / (ms["ops_fb"] * 1e6)
            row["speedup_vs_ops"] = ms["ops_fb"] / ms["triton_fb"]
            row["speedup_vs_loop"] = ms["loop_fb"] / ms["triton_fb"]
            rows.append(row)
            del x, gout, mods, calls
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table: times, Triton bandwidth (GB/s and share of the peak), speedups."""
    names = ["triton", "ops", "loop"] + (["sj"] if any("sj_ms" in r for r in rows) else [])
    cols = [("layer", "layer", "{}"), ("shape", "shape", "{}"), ("T", "T", "{}"), ("dtype", "dtype", "{}"),
            ("triton_fwd_ms", "triton fwd ms", "{:.3f}")]
    cols += [(f"{n}_ms", f"{n} ms", "{:.3f}") for n in names]
    cols += [("fwd_gbs", "fwd GB/s", "{:.0f}"), ("fwd_peak_frac", "fwd/peak", "{:.0%}"),
             ("bwd_gbs", "bwd GB/s", "{:.0f}"), ("bwd_peak_frac", "bwd/peak", "{:.0%}"),
             ("fb_peak_frac", "f+b/peak", "{:.0%}"), ("ops_gbs", "ops GB/s", "{:.0f}"),
             ("speedup_vs_ops", "vs ops", "{:.2f}x"), ("speedup_vs_loop", "vs loop", "{:.2f}x")]
    cols += [(f"{n}_peak_mb", f"{n} peak MB", "{:.0f}") for n in names]
    cells = [[head for _, head, _ in cols]]
    cells += [[fmt.format(r[key]) if key in r else "-" for key, _, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(steps: tuple[int, ...], repeats: int, dtype: torch.dtype, peak_gbs: float,
         sj: Callable[[], nn.Module] | None) -> int:
    """Print the table (``check_device`` must have passed)."""
    rows = run(steps, repeats, dtype, peak_gbs, sj)
    name = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__}, {name}, {dtype}, fwd+bwd, AdaptiveLIF (soft reset, sigmoid); "
          f"triton = fused kernel on CUDA, ops = its torch-op fallback, loop = step functions; "
          f"bandwidth: {VALUES_FORWARD} (fwd) + {VALUES_BACKWARD} (bwd) values per element and step, "
          f"peak {peak_gbs:.0f} GB/s")
    print(format_table(rows))
    return 0
