"""Which kernel runs a call: the C kernels on CPU, Triton on CUDA, torch ops everywhere else.

Why one place: the fused neuron (``snn.fused``) and 1-bit spike storage (``models.lean``) choose
by the same rule, and the rule is a pure function (``select_backend``) that tests check on a
machine without a GPU. Triton is imported only when a CUDA tensor asks for it, so CPU-only
installs never load it, and tests can set ``TRITON_INTERPRET=1`` before the Triton modules are
imported (Triton decides between compiling and interpreting when a kernel is defined).

Switches: ``ASNN_DIST_TRITON=0`` or ``forced_triton(False)`` keep CUDA tensors on the torch-op
path (benchmarks compare the two); ``ASNN_DIST_NATIVE=0`` or ``native.forced(False)`` do the same
for the C kernels on CPU. ``pretend_device("cuda")`` sends CPU tensors down the CUDA route: the
Triton kernels then run on CPU tensors, which only Triton's interpreter can do (tests).
"""

from __future__ import annotations

import functools
import importlib
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator, Optional

import torch
from torch import Tensor

from asnn_dist.snn import native

C_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # bf16: read into float32 (native/bf16.h)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The Triton LIF backward unrolls T_PAD (next power of two >= T) steps over register tiles:
# beyond 32 it spills and takes minutes to compile, so longer sequences use torch ops.
MAX_TRITON_STEPS = 32

_forced_triton: Optional[bool] = None
_pretend: Optional[str] = None


def select_backend(device_type: str, dtype: torch.dtype, triton_available: bool, native_available: bool = False,
                   surrogate_known: bool = True, steps: int = 1) -> str:
    """'c', 'triton' or 'torch' for a call on ``device_type`` tensors of ``dtype``.

    C on CPU (float32/float64/bfloat16), Triton on CUDA (float16/bfloat16/float32/float64, T <= 32),
    torch ops otherwise; custom surrogates (not built into the kernels) always take torch ops."""
    if not surrogate_known:
        return "torch"
    if device_type == "cpu" and native_available and dtype in C_DTYPES:
        return "c"
    if device_type == "cuda" and triton_available and dtype in TRITON_DTYPES and steps <= MAX_TRITON_STEPS:
        return "triton"
    return "torch"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether ``import triton`` works here (checked once)."""
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - missing, or broken for this platform: torch ops instead
        return False
    return True


def triton_enabled() -> bool:
    """Whether CUDA calls may use the Triton kernels (forced, environment, importable)."""
    if _forced_triton is not None:
        return _forced_triton and triton_importable()
    if os.environ.get("ASNN_DIST_TRITON", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return triton_importable()


@contextmanager
def forced_triton(on: bool) -> Iterator[None]:
    """Use (True) or avoid (False) the Triton kernels inside the block (tests, benchmarks)."""
    global _forced_triton
    previous, _forced_triton = _forced_triton, on
    try:
        yield
    finally:
        _forced_triton = previous


@contextmanager
def pretend_device(device_type: Optional[str]) -> Iterator[None]:
    """Dispatch CPU tensors as if they lived on ``device_type`` inside the block (tests only:
    the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``)."""
    global _pretend
    previous, _pretend = _pretend, device_type
    try:
        yield
    finally:
        _pretend = previous


def _device_type(x: Tensor) -> str:
    return _pretend if _pretend is not None and x.device.type == "cpu" else x.device.type


def surrogate_known(surrogate: object) -> bool:
    """Whether the compiled kernels implement this surrogate (the built-in sigmoid and atan)."""
    return type(surrogate).__name__ in native.SURROGATE_CODES


def lif_backend(x: Tensor, surrogate: object) -> str:
    """The backend of a fused adaptive LIF call on x [T, ...]."""
    dev, known = _device_type(x), surrogate_known(surrogate)
    native_ok = dev == "cpu" and known and x.dtype in C_DTYPES and native.enabled()
    triton_ok = dev == "cuda" and triton_enabled()
    return select_backend(dev, x.dtype, triton_ok, native_ok, known, x.shape[0])


def bits_backend(x: Tensor) -> str:
    """The backend that packs / unpacks spike tensors like x as 1 bit per value."""
    dev = _device_type(x)
    native_ok = dev == "cpu" and x.dtype in C_DTYPES and native.enabled()
    return select_backend(dev, x.dtype, dev == "cuda" and triton_enabled(), native_ok)


def triton_lif() -> ModuleType:
    """``snn.triton_lif``, imported on first use."""
    return importlib.import_module("asnn_dist.snn.triton_lif")


def triton_bits() -> ModuleType:
    """``snn.triton_bits``, imported on first use."""
    return importlib.import_module("asnn_dist.snn.triton_bits")
