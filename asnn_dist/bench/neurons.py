"""Neuron kernel benchmark: fused multi-step adaptive LIF vs the loop of step functions
(vs SpikingJelly's multi-step LIFNode, torch backend, when it is installed).

Run: ``asnn-dist bench neurons --steps 4 8 16 --repeats 5 [--threads N]``; on a GPU
``asnn-dist bench neurons --device cuda [--peak-gbs 4800] [--dtype bfloat16]`` times the Triton
kernel against the torch-op fallback and reports its memory bandwidth (``bench/neurons_cuda.py``).
Neurons: ASNN AdaptiveLIF (per-step leak/gain, soft reset, sigmoid surrogate) with the
"fused" backend (on CPU its compiled C kernel, ``snn.native``), the same fused kernel on its
torch-op path ("fused-ops", what GPUs and other dtypes run) and the "loop" backend (the step
functions, the reference); SpikingJelly's LIFNode (tau 2, soft reset) as an outside
reference. Ratios compare fused with loop measured in the same run; on a shared machine
timings are noisy (backends alternate within each repeat, and ``--threads 1`` avoids
intra-op threads waiting for a busy core).

What is measured, per layer shape and T, all fp32 on the current device (CPU here):
- time: median wall time of forward + backward (input and upstream gradient prepared
  beforehand, one warm-up call first).
- peak MB: the high-water mark of bytes allocated by torch during one forward + backward,
  relative to the start (spikes, saved tensors, gradients, temporaries). It is read from the
  allocation trace of ``torch.profiler`` with ``profile_memory=True``: every allocation and
  free is an event with a signed byte count; the running sum's maximum is the peak. This is
  exact for torch tensors (allocator level), unlike process RSS, so no subprocess is needed.
- saved MB: bytes of the distinct tensor storages autograd keeps for backward after the
  forward (``torch.autograd.graph.saved_tensors_hooks``); the layer input is included since
  in a network it is another layer's output kept alive only for this layer.
Layers: Spikformer-sized [T, 32, 64 tokens, 384 ch] and conv-sized [T, 32, 128, 16, 16].
Allocator: by default this process gets the glibc malloc thresholds the training workers run
with (``train.ray_setup.WORKER_ENV``), so freed layer-sized buffers are reused instead of being
unmapped and faulted in again on every call (which costs about as much as the C kernel's
work); ``--malloc default`` keeps glibc's defaults.

A lone neuron layer's peak is dominated by its output and its input gradient, which every
implementation must allocate (2 of the loop's ~2.9 layer-sized tensors), so alone it cannot
fall to half the loop's. In a network the peak is the sum of what each layer keeps for
backward: ``--stack D`` adds rows for a stack of D [Linear 384->384 + per-step BN + neuron]
blocks on the Spikformer shape, built from the model's own layers (a slice of a Spikformer
MLP): the linears keep their spike inputs as 1 byte per value (``models.lean``; the first one
reads analog input), and the fused neuron saves nothing of its own, as it rebuilds its input
from the BN's (``snn.affine_source``), while the loop keeps its input and two membrane
sequences. There the neuron's saved tensors make the difference in the peak.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from asnn_dist.models.spikformer import LinearBN
from asnn_dist.snn import native
from asnn_dist.snn.neurons import AdaptiveLIF

LAYERS = {"spikformer": (32, 64, 384), "conv": (32, 128, 16, 16)}
MB = 2.0**20


def _spikingjelly_lif(backend: str = "torch") -> Callable[[], nn.Module] | None:
    """A factory of SpikingJelly's multi-step LIFNode (``backend``: its torch or cupy kernels),
    or None when SpikingJelly is not installed."""
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
    except ImportError:
        return None

    class _SJ(nn.Module):
        """LIFNode (tau 2 = leak/gain 0.5, soft reset) reset before each forward."""

        def __init__(self) -> None:
            super().__init__()
            kwargs = dict(
                tau=2.0, v_reset=None, surrogate_function=surrogate.Sigmoid(alpha=4.0),
                step_mode="m",
            )
            if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
                kwargs["backend"] = backend  # SpikingJelly < 2.0 also has cupy/triton
            self.node = neuron.LIFNode(**kwargs)

        def forward(self, x: Tensor) -> Tensor:
            functional.reset_net(self.node)
            return self.node(x)

    return _SJ


def _fwd_bwd(module: nn.Module, x: Tensor, gout: Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)
    module(x).backward(gout)


def peak_bytes(fn: Callable[[], Any]) -> int:
    """High-water mark of torch allocations during fn(), from the profiler's trace."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else kineto prints 2 lines per profile (torch 2.13)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward during module(x)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return sum(storages.values())


def _time_interleaved(
    backends: dict[str, nn.Module], x: Tensor, gout: Tensor, repeats: int
) -> dict[str, float]:
    """Median fwd+bwd ms per backend; backends alternate within each repeat so that load
    from other processes hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in backends}
    for module in backends.values():
        _fwd_bwd(module, x, gout)  # warm-up
    for _ in range(repeats):
        for name, module in backends.items():
            t0 = time.perf_counter()
            _fwd_bwd(module, x, gout)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


class _Stack(nn.Module):
    """D blocks of [Linear -> per-step BN -> neuron] on [T, B, tokens, C]: a slice of a
    Spikformer MLP built from the model's own layers (``LinearBN``: the linears after the first
    read spikes and keep them as uint8 for backward)."""

    def __init__(self, make_neuron: Callable[[], nn.Module], depth: int, channels: int, steps: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linears = nn.ModuleList(LinearBN(channels, channels, steps, spike_input=i > 0) for i in range(depth))
        self.neurons = nn.ModuleList(make_neuron() for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for linear, neuron in zip(self.linears, self.neurons):  # LinearBN packs its spikes (the default)
            x = neuron(linear(x))
        return x


class _TorchOps(nn.Module):
    """Runs a module with the fused kernel's torch-op path (the C kernel switched off)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        with native.forced(False):
            return self.module(x)


def _backends(T: int, sj: Callable[[], nn.Module] | None, stack: int) -> dict[str, nn.Module]:
    makers: dict[str, Callable[[], nn.Module]] = {
        "fused": lambda: AdaptiveLIF(T, backend="fused"),
        "fused-ops": lambda: _TorchOps(AdaptiveLIF(T, backend="fused")),
        "loop": lambda: AdaptiveLIF(T, backend="loop"),
    }
    if sj is not None:
        makers["spikingjelly"] = sj
    if stack:
        return {name: _Stack(make, stack, LAYERS["spikformer"][-1], T) for name, make in makers.items()}
    return {name: make() for name, make in makers.items()}


def run(steps: tuple[int, ...] = (4, 8, 16), repeats: int = 5, stack: int = 0) -> list[dict]:
    """One row per (layer, T) with time / memory of each backend and fused-vs-loop ratios."""
    sj = _spikingjelly_lif()
    rows = []
    layers = dict(LAYERS)
    if stack:
        layers[f"stack{stack}"] = LAYERS["spikformer"]
    for layer, shape in layers.items():
        for T in steps:
            gen = torch.Generator().manual_seed(0)
            x = (1.5 * torch.randn(T, *shape, generator=gen)).requires_grad_()
            gout = torch.randn(T, *shape, generator=gen)
            backends = _backends(T, sj, stack if layer.startswith("stack") else 0)
            row: dict[str, Any] = {"layer": layer, "shape": "x".join(map(str, shape)), "T": T}
            for name, ms in _time_interleaved(backends, x, gout, repeats).items():
                row[f"{name}_ms"] = ms
            for name, module in backends.items():
                x.grad = None  # freed before, not inside, the measured call
                module.zero_grad(set_to_none=True)
                row[f"{name}_peak_mb"] = peak_bytes(lambda: module(x).backward(gout)) / MB
                row[f"{name}_saved_mb"] = saved_bytes(module, x) / MB
            x.grad = None
            row["speedup_vs_loop"] = row["loop_ms"] / row["fused_ms"]
            row["peak_ratio_vs_loop"] = row["fused_peak_mb"] / row["loop_peak_mb"]
            row["saved_ratio_vs_loop"] = row["fused_saved_mb"] / row["loop_saved_mb"]
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table: one line per (layer, T); SpikingJelly columns only when measured."""
    backends = ["fused", "fused-ops", "loop"]
    if any("spikingjelly_ms" in r for r in rows):
        backends.append("spikingjelly")
    short = {"fused": "fused", "fused-ops": "ops", "loop": "loop", "spikingjelly": "sj"}
    cols = [("layer", "layer", "{}"), ("shape", "shape", "{}"), ("T", "T", "{}")]
    for b in backends:
        cols.append((f"{b}_ms", f"{short[b]} ms", "{:.1f}"))
    cols.append(("speedup_vs_loop", "speedup", "{:.2f}x"))
    for b in backends:
        cols.append((f"{b}_peak_mb", f"{short[b]} peak MB", "{:.0f}"))
    cols.append(("peak_ratio_vs_loop", "peak ratio", "{:.2f}"))
    for b in backends:
        cols.append((f"{b}_saved_mb", f"{short[b]} saved MB", "{:.0f}"))
    cols.append(("saved_ratio_vs_loop", "saved ratio", "{:.2f}"))
    cells = [[head for _, head, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[key]) if key in r else "-" for key, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def use_worker_malloc() -> bool:
    """Apply the training workers' glibc malloc thresholds to this process (mallopt)."""
    import ctypes
    import ctypes.util

    from asnn_dist.train.ray_setup import WORKER_ENV

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    return bool(libc.mallopt(m_mmap_threshold, int(WORKER_ENV["MALLOC_MMAP_THRESHOLD_"]))
                and libc.mallopt(m_trim_threshold, int(WORKER_ENV["MALLOC_TRIM_THRESHOLD_"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asnn-dist bench neurons", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="time steps T (default: 4 8 16 on cpu, 8 on cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--malloc", choices=["worker", "default"], default="worker",
                        help="glibc malloc thresholds: the training workers' (default) or glibc's own")
    parser.add_argument("--stack", type=int, default=4,
                        help="also measure a stack of this many Linear+neuron blocks (0 = off)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: C kernel vs torch ops vs loop; cuda: Triton kernel vs torch ops vs loop, "
                             "with memory bandwidth")
    parser.add_argument("--peak-gbs", type=float, default=4800.0,
                        help="--device cuda: the GPU's peak memory bandwidth in GB/s (default: H200's 4800)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="--device cuda: activation dtype (default float32)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = [8] if args.device == "cuda" else [4, 8, 16]
    if any(t < 1 for t in args.steps) or args.repeats < 1:
        parser.error("--steps values and --repeats must be >= 1")
    if args.device == "cuda":
        from asnn_dist.bench import neurons_cuda

        problem = neurons_cuda.check_device()
        if problem:
            parser.error(problem)
        if args.peak_gbs <= 0:
            parser.error("--peak-gbs must be > 0")
        sj = _spikingjelly_lif("cupy" if importlib.util.find_spec("cupy") else "torch")
        return neurons_cuda.main(tuple(args.steps), args.repeats, getattr(torch, args.dtype), args.peak_gbs, sj)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc = "worker malloc thresholds" if args.malloc == "worker" and use_worker_malloc() else "default malloc"
    rows = run(tuple(args.steps), args.repeats, args.stack)
    kernel = "C kernel" if native.enabled() else "C kernel unavailable: torch ops"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, fwd+bwd, {malloc}; "
          f"fused = {kernel}, ops = the fused kernel's torch-op path")
    print(format_table(rows))
    lines = target_lines(rows)
    if lines:
        print("targets (issue 3, T = 8: fused >= 2x faster than the loop, <= 0.5x its peak memory):")
        print("\n".join(lines))
    return 0


def target_lines(rows: list[dict]) -> list[str]:
    """Issue 3's targets at T = 8: speed of each lone layer (in the stack the linears' matmuls
    dilute it) and peak memory of every row."""
    out = []
    for r in (r for r in rows if r["T"] == 8):
        name = f"{r['layer']} {r['shape']}"
        if not r["layer"].startswith("stack"):
            ok = r["speedup_vs_loop"] >= 2.0
            out.append(f"  {name}: speed {r['speedup_vs_loop']:.2f}x (target >= 2x) {'met' if ok else 'NOT met'}")
        ratio = round(r["peak_ratio_vs_loop"], 3)  # a lone layer sits at 0.500 plus a few bytes of parameter grads
        out.append(f"  {name}: peak memory {ratio:.3f}x (target <= 0.5x) {'met' if ratio <= 0.5 else 'NOT met'}")
    return out
