"""Tensors known to hold only 0 and 1: the outputs of the fused spiking neurons.

Why: ``models.lean`` keeps spike tensors for backward as 1 bit per value, which is lossless
only when every value is 0 or 1. On CPU the C packer checks this while packing, for free. On
a GPU the check's answer lives on the device, and reading it would stall the host once per
layer (a device-to-host sync); so the fused neuron marks its output here, the GPU packer
trusts a marked, unmodified tensor and stores anything else as uint8.

Safety (as in ``snn.affine_source``): a lookup succeeds only for the same storage, dtype and
element count with an unchanged version counter (nothing wrote into the tensor since), on
the thread that marked it; entries die with the tensor (weak reference).
"""

from __future__ import annotations

import threading
import weakref

from torch import Tensor

_local = threading.local()


def _entries() -> dict[int, tuple[weakref.ref, int, int]]:
    if not hasattr(_local, "entries"):
        _local.entries = {}
    return _local.entries


def mark(spikes: Tensor) -> None:
    """Record that the contiguous tensor ``spikes`` holds only 0 and 1."""
    if spikes.is_inference():  # inference mode: nothing is saved for backward (and no version counter)
        return
    entries = _entries()
    key = spikes.data_ptr()

    def drop(ref: weakref.ref, key: int = key, entries: dict = entries) -> None:
        current = entries.get(key)
        if current is not None and current[0] is ref:
            del entries[key]

    entries[key] = (weakref.ref(spikes, drop), spikes._version, spikes.numel())


def is_spikes(t: Tensor) -> bool:
    """Whether t is (a contiguous view of all of) a marked tensor, unmodified since."""
    entry = _entries().get(t.data_ptr()) if t.is_contiguous() and not t.is_inference() else None
    if entry is None:
        return False
    ref, version, numel = entry
    s = ref()
    return (s is not None and s.dtype == t.dtype and numel == t.numel() == s.numel()
            and s._version == version and t._version == version)
