"""A tensor known to be ``x * scale + shift`` of another, so its consumer can save x instead.

Why: a BatchNorm followed by a spiking neuron keeps two layer-sized tensors for backward: BN
its input x, the neuron its input y = BN(x). When BN computes y as the affine map
x * scale[t, c] + shift[t, c] (per-step statistics folded into scale and shift, as torch's
CPU batch_norm does) and registers y here, the neuron's kernel saves x (already kept by BN,
so no new memory) plus the small scale/shift, and rebuilds y in backward with the very same
function, bit for bit. The pair then keeps one tensor instead of two.

Safety: a lookup succeeds only for the same storage, dtype, element count and an unchanged
version counter (nothing wrote into y since), on the thread that registered it; otherwise
the consumer saves its input as usual. Entries die with y (weak reference).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor

_local = threading.local()


@dataclass(frozen=True)
class AffineSource:
    """y = rebuild(x, scale, shift); x is channels-last [T, M, C], scale/shift [T, C]."""

    x: Tensor
    scale: Tensor
    shift: Tensor
    rebuild: Callable[[Tensor, Tensor, Tensor], Tensor]

    def materialize(self) -> Tensor:
        """y again, computed exactly as when it was registered."""
        return self.rebuild(self.x, self.scale, self.shift)


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
          and t._version == version and source.x.numel() == t.numel())
    return source if ok else None


def save_input(ctx: Any, x: Tensor, *others: Optional[Tensor]) -> None:
    """``ctx.save_for_backward(x, *others)``, but for a registered x its source instead."""
    source = lookup(x)
    ctx.input_shape = x.shape
    ctx.input_rebuild = None if source is None else source.rebuild
    if source is None:
        ctx.save_for_backward(x, *others)
    else:
        ctx.save_for_backward(source.x, source.scale, source.shift, *others)


def saved_input(ctx: Any) -> tuple[Tensor, tuple[Optional[Tensor], ...]]:
    """(x, others) as given to ``save_input`` (x rebuilt from its source if it had one)."""
    saved = ctx.saved_tensors
    if ctx.input_rebuild is None:
        return saved[0], saved[1:]
    return ctx.input_rebuild(*saved[:3]).view(ctx.input_shape), saved[3:]
