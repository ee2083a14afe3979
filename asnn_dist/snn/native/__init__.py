"""Compiled CPU kernels: the adaptive LIF (``lif_kernel.c``), per-step BatchNorm
(``bn_kernel.c``) and 1-bit spike storage (``bits_kernel.c``): build, cache, load, call.

Why compiled: on CPU the neuron and normalisation layers are memory-bound elementwise work,
and torch ops pay one dispatch and one pass over memory per op and step; the C kernels run
all T steps of a block of elements in cache (forward and backward), with no scratch tensors
beyond their outputs. They are plain C (no torch headers), so building takes about a second
with the system compiler; ``cc`` missing or failing is not an error: the callers then keep
their torch-op paths (one warning).

Cache: ``$ASNN_DIST_KERNEL_CACHE`` or ``~/.cache/asnn_dist/kernels``, one file per source,
compiler and CPU (the build uses ``-march=native``), written atomically so that concurrent
workers on one node build at most once each and never load a half-written file.
``python -m asnn_dist.train.prebuild`` builds it at install time.
``ASNN_DIST_NATIVE=0`` switches it off (the torch-op path is then used everywhere).

Calls go through ctypes, which releases the GIL; tensors are passed as raw pointers, so the
callers (``snn.fused``) hand over contiguous CPU float32/float64/bfloat16 tensors of matching
shapes (bfloat16: float32 membranes and BatchNorm affine, ``MEMBRANE_DTYPES``; see
``snn.precision``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("lif_kernel.c", "bn_kernel.c", "bits_kernel.c"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("parallel.h", "bf16.h"))
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")
ARCH_FLAGS = ("-march=native",)
SURROGATE_CODES = {"SigmoidSurrogate": 0, "AtanSurrogate": 1}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
# bfloat16 tensors are read into float32 and outputs rounded once (bf16.h); the neuron's
# membranes (v0, v_last and their gradients) and BatchNorm's scale/shift are float32 then.
MEMBRANE_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_forced: Optional[bool] = None


def cache_dir() -> Path:
    root = os.environ.get("ASNN_DIST_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "asnn_dist" / "kernels"


def _cpu_identity() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compile(cc: str, out: Path) -> None:
    """Compile to a temporary file in the cache folder, then rename it into place (atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        last = None
        for arch in (ARCH_FLAGS, ()):  # some compilers do not know -march=native
            cmd = [cc, *FLAGS, *arch, "-o", tmp, *map(str, SOURCES)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return
            last = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"{cc} failed: {' | '.join(last or [])}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + HEADERS) + repr((FLAGS, ARCH_FLAGS, version, _cpu_identity())).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"asnn_kernels-{key}.so"


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.asnn_lif_forward.argtypes = [i32, i64, i64, p, p, p, p, f64, i32, p, p, i32]
    lib.asnn_lif_forward.restype = i32
    lib.asnn_lif_backward.argtypes = [i32, i64, i64, p, p, p, p, p, p, f64, i32, i32, i32, f64, p, p, p, i32]
    lib.asnn_lif_backward.restype = i32
    lib.asnn_bn_stats.argtypes = [i32, i64, i64, i64, p, p, p, i32]
    lib.asnn_bn_apply.argtypes = [i32, i64, i64, i64, p, p, p, p, i32]
    lib.asnn_bn_backward.argtypes = [i32, i64, i64, i64, p, p, p, p, p, p, p, i32]
    lib.asnn_pack_bits.argtypes = [i32, i64, p, p, i32]
    lib.asnn_unpack_bits.argtypes = [i32, i64, p, p, i32]
    for fn in (lib.asnn_bn_stats, lib.asnn_bn_apply, lib.asnn_bn_backward, lib.asnn_pack_bits, lib.asnn_unpack_bits):
        fn.restype = i32


def load(build: bool = True) -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it first if needed; None if it cannot be had."""
    global _lib, _tried
    with _lock:
        if _lib is not None or _tried:
            return _lib
        _tried = True
        if sys.platform == "win32":
            return None
        cc = _compiler()
        if cc is None:
            log.warning("no C compiler (cc/gcc/clang) found: the fused LIF kernel uses torch ops")
            return None
        try:
            path = library_path(cc)
            if not path.exists():
                if not build:
                    return None
                _compile(cc, path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            _lib = lib
        except Exception as err:  # noqa: BLE001 - any failure means: use the torch-op path
            log.warning("could not build the C LIF kernel (%s): the fused LIF kernel uses torch ops", err)
        return _lib


def enabled() -> bool:
    """Whether CPU calls of the fused kernel go to the C kernel (forced, env, or available)."""
    if _forced is not None:
        return _forced and load() is not None
    if os.environ.get("ASNN_DIST_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return load() is not None


@contextmanager
def forced(on: bool) -> Iterator[None]:
    """Use (True) or avoid (False) the C kernel inside the block (tests, benchmarks)."""
    global _forced
    previous, _forced = _forced, on
    try:
        yield
    finally:
        _forced = previous


def supports(x: Tensor, surrogate: object = None) -> bool:
    """Whether the C kernels can run this call: CPU float32/float64/bfloat16 (and for the
    neuron a built-in surrogate)."""
    known = surrogate is None or type(surrogate).__name__ in SURROGATE_CODES
    return x.device.type == "cpu" and x.dtype in DTYPE_CODES and known and enabled()


def _check(rc: int, what: str) -> None:
    if rc:
        raise MemoryError(f"C {what} kernel: out of memory")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _doubles(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_double * len(values))(*values)


def forward(x: Tensor, v0: Optional[Tensor], leak: Sequence[float], gain: Sequence[float], thr: float,
            hard: bool, spikes: Optional[Tensor], v_last: Optional[Tensor]) -> None:
    """Spikes of x [T, n] (into ``spikes``) and the last membrane (into ``v_last``) from v0
    (None: rest). All tensors contiguous; x and spikes of one dtype, v0 and v_last of
    ``MEMBRANE_DTYPES[x.dtype]``; outputs may be None."""
    steps, n = x.shape
    rc = _lib.asnn_lif_forward(  # type: ignore[union-attr]
        DTYPE_CODES[x.dtype], steps, n, _ptr(x), _ptr(v0), _doubles(leak), _doubles(gain), float(thr),
        int(hard), _ptr(spikes), _ptr(v_last), torch.get_num_threads())
    _check(rc, "LIF")


def backward(x: Tensor, v0: Optional[Tensor], gout: Tensor, g_last: Optional[Tensor], leak: Sequence[float],
             gain: Sequence[float], thr: float, hard: bool, detach: bool, surrogate: object,
             gx: Optional[Tensor], gv0: Optional[Tensor], want_params: bool) -> Optional[list[float]]:
    """BPTT of ``forward``: dx into ``gx``, dL/dv0 into ``gv0`` (either may be None); returns
    [dleak[0..T-1], dgain[0..T-1], dthr] (sums over elements) when ``want_params``."""
    steps, n = x.shape
    acc = (ctypes.c_double * (2 * steps + 1))() if want_params else None
    rc = _lib.asnn_lif_backward(  # type: ignore[union-attr]
        DTYPE_CODES[x.dtype], steps, n, _ptr(x), _ptr(v0), _ptr(gout), _ptr(g_last), _doubles(leak),
        _doubles(gain), float(thr), int(hard), int(detach), SURROGATE_CODES[type(surrogate).__name__],
        float(surrogate.alpha), _ptr(gx), _ptr(gv0), acc, torch.get_num_threads())  # type: ignore[attr-defined]
    _check(rc, "LIF")
    return list(acc) if acc is not None else None


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-step mean and biased variance of channels-last x [T, M, C], as float64 [T, C]."""
    steps, m, c = x.shape
    mean = torch.empty(steps, c, dtype=torch.float64)
    var = torch.empty(steps, c, dtype=torch.float64)
    _check(_lib.asnn_bn_stats(DTYPE_CODES[x.dtype], steps, m, c, _ptr(x), _ptr(mean), _ptr(var),  # type: ignore[union-attr]
                              torch.get_num_threads()), "BatchNorm")
    return mean, var


def bn_apply(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """x * scale[t, c] + shift[t, c] for x [T, M, C]; scale and shift [T, C] in x's dtype
    (float32 for bfloat16 x: computed in float32, y rounded once)."""
    steps, m, c = x.shape
    y = torch.empty_like(x)
    _check(_lib.asnn_bn_apply(DTYPE_CODES[x.dtype], steps, m, c, _ptr(x), _ptr(scale), _ptr(shift),  # type: ignore[union-attr]
                              _ptr(y), torch.get_num_threads()), "BatchNorm")
    return y


def bn_backward(x: Tensor, gy: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor,
                want_gx: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """(gx or None, sum_m gy [T, C], sum_m gy (x - mean) [T, C]) for x, gy [T, M, C]; mean
    and invstd float64 [T, C]; scale [T, C] in x's dtype (weight x invstd)."""
    steps, m, c = x.shape
    gx = torch.empty_like(x) if want_gx else None
    sums = torch.zeros(steps, 2, c, dtype=torch.float64)  # per step: the sum_gy row, then the dotp row
    _check(_lib.asnn_bn_backward(  # type: ignore[union-attr]
        DTYPE_CODES[x.dtype], steps, m, c, _ptr(x), _ptr(gy), _ptr(mean), _ptr(invstd), _ptr(scale), _ptr(gx),
        _ptr(sums), torch.get_num_threads()), "BatchNorm")
    return gx, sums[:, 0], sums[:, 1]


def pack_bits(x: Tensor) -> Optional[Tensor]:
    """x (contiguous) as 1 bit per value (uint8 [ceil(n / 8)], memory order), or None when a
    value is neither 0 nor 1."""
    n = x.numel()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    rc = _lib.asnn_pack_bits(DTYPE_CODES[x.dtype], n, _ptr(x), _ptr(bits), torch.get_num_threads())  # type: ignore[union-attr]
    _check(rc < 0, "bit packing")
    return None if rc else bits


def unpack_bits(bits: Tensor, out: Tensor) -> Tensor:
    """Fill the contiguous ``out`` (float32/float64/bfloat16) with the values ``pack_bits`` stored."""
    rc = _lib.asnn_unpack_bits(DTYPE_CODES[out.dtype], out.numel(), _ptr(bits), _ptr(out),  # type: ignore[union-attr]
                               torch.get_num_threads())
    _check(rc, "bit unpacking")
    return out
