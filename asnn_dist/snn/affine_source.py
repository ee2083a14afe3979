"""A tensor known to be ``x * scale + shift`` of another, so its consumer can save x instead.

Why: a BatchNorm followed by a spiking neuron keeps two layer-sized tensors for backward: BN
its input x, the neuron its input y = BN(x). When BN computes y as the affine map
x * scale[t, c] + shift[t, c] (per-step statistics folded into scale and shift, as torch's
CPU batch_norm does) and registers y here, the neuron's kernel saves x (already kept by BN,
so no new memory) plus the small scale/shift, and rebuilds y in backward with the very same
function, bit for bit. The pair then keeps one tensor instead of two.

Safety: a lookup succeeds only for the same storage, dtype, element count and an unchanged
version counter (nothing wrote into y since), on the thread that registered it; otherwise
the consumer saves its input as usual. Entries die with y (weak reference). A tensor joined
from registered parts (``concat``; the hybrid stem's direct and spike steps) is registered
too, with a rebuild that joins the rebuilt parts.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

_local = threading.local()


@dataclass(frozen=True)
class AffineSource:
    """y = rebuild(*tensors), a tensor of ``numel`` elements (see ``affine`` and ``concat``)."""

    tensors: tuple[Tensor, ...]
    rebuild: Callable[..., Tensor]
    numel: int

    def materialize(self) -> Tensor:
        """y again, computed exactly as when it was registered."""
        return self.rebuild(*self.tensors)


def affine(x: Tensor, scale: Tensor, shift: Tensor, fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> AffineSource:
    """y = fn(x, scale, shift); x channels-last [T, M, C], scale/shift [T, C] (BN's form)."""
    return AffineSource((x, scale, shift), fn, x.numel())


def concat(parts: list[AffineSource]) -> AffineSource:
    """y = the flat concatenation of the parts' tensors (e.g. the direct and the spike steps
    of a hybrid stem, each its own BN's output, joined along time)."""
    sizes = [len(p.tensors) for p in parts]

    def rebuild(*tensors: Tensor) -> Tensor:
        out, i = [], 0
        for part, n in zip(parts, sizes):
            out.append(part.rebuild(*tensors[i : i + n]).reshape(-1))
            i += n
        return torch.cat(out)

    return AffineSource(tuple(t for p in parts for t in p.tensors), rebuild, sum(p.numel for p in parts))


def _entries() -> dict[int, tuple[weakref.ref, int, AffineSource]]:
    if not hasattr(_local, "entries"):
        _local.entries = {}
    return _local.entries


def register(y: Tensor, source: AffineSource) -> None:
    """Record that the contiguous tensor y equals ``source.materialize()``."""
    entries = _entries()
    key = y.data_ptr()

    def drop(_ref: weakref.ref, key: int = key, entries: dict = entries) -> None:
        current = entries.get(key)
        if current is not None and current[0] is _ref:
            del entries[key]

    entries[key] = (weakref.ref(y, drop), y._version, source)


def lookup(t: Tensor) -> Optional[AffineSource]:
    """The source of t if t is (a contiguous view of) a registered, unmodified tensor."""
    entry = _entries().get(t.data_ptr()) if t.is_contiguous() else None
    if entry is None:
        return None
    ref, version, source = entry
    y = ref()
    ok = (y is not None and y.dtype == t.dtype and y.numel() == t.numel() and y._version == version
          and t._version == version and source.numel == t.numel())
    return source if ok else None


def save_input(ctx: Any, x: Tensor, *others: Optional[Tensor]) -> None:
    """``ctx.save_for_backward(x, *others)``, but for a registered x its source instead."""
    source = lookup(x)
    ctx.input_shape = x.shape
    ctx.input_rebuild = None if source is None else source.rebuild
    ctx.input_count = 1 if source is None else len(source.tensors)
    ctx.save_for_backward(*((x,) if source is None else source.tensors), *others)


def saved_input(ctx: Any) -> tuple[Tensor, tuple[Optional[Tensor], ...]]:
    """(x, others) as given to ``save_input`` (x rebuilt from its source if it had one)."""
    saved, n = ctx.saved_tensors, ctx.input_count
    if ctx.input_rebuild is None:
        return saved[0], saved[1:]
    return ctx.input_rebuild(*saved[:n]).view(ctx.input_shape), saved[n:]
