"""Compatibility fix for DeepSpeed ZeRO-3: let fp32 weights be their own fp32 master partition.

The bug. ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` (DeepSpeed 0.19.8,
stage3.py) builds the fp32 partition the optimizer updates from each flat parameter partition
(``fp16_partitioned_groups_flat``, the rank's slice of the weights, whatever their dtype). It
means to reuse that partition when it already is fp32 on the optimizer's device:

    elif flat.dtype == self.master_weights_and_grads_dtype and flat.device == self.device:
        self.fp32_partitioned_groups_flat.append(flat)     # alias: no second copy

but ``self.device`` is the *string* ``get_accelerator().current_device_name()`` ('cpu', or
'cuda:0' on GPU), and in current torch (2.13 here) ``torch.device('cpu') == 'cpu'`` is False.
So the test always fails and every fp32 ZeRO-3 run keeps a redundant clone of its weight
partition, 4P/N bytes per rank (20P/N instead of the 16P/N of the ZeRO paper), on CPU and on
GPU alike. Mixed precision (bf16/fp16 weights) and optimizer offload are unaffected: the dtype
differs, or the offload branch comes first.

The fix. While ``_create_fp32_partitions`` runs, ``self.device`` is the equivalent
``torch.device`` (restored to the original string afterwards, also if the method raises), so
DeepSpeed's own comparison works and its alias branch is taken. Only the not-offloaded case is
touched (``offload_optimizer`` set: the method runs unchanged). ``apply`` patches only when the
bug is present: the method exists, its source has the ``.device == self.device`` test and torch
says a ``torch.device`` differs from its string; otherwise (another DeepSpeed or torch, source
not readable, DeepSpeed not installed) it does nothing. It is idempotent, silent (one debug
log line), and ``remove`` undoes it. ``asnn_dist.train.deepspeed_config.build_engine``, which
builds every DeepSpeed engine of this package, applies it; call ``apply()`` yourself before a
``deepspeed.initialize`` of your own.

Why sharing the storage is safe (checked in DeepSpeed 0.19.8's stage3.py and engine.py). The
alias is the layout DeepSpeed itself intends here (it comments that under autocast "groups in
fp32_partitioned_groups are aliases"); the master and the parameter partition hold the same
fp32 values at all times anyway, the clone only doubled them.
- Optimizer step (``step``): gradients live in their own buffer (``grad_partitions_flat_buffer``,
  handed over as ``fp32_partition.grad``); the torch optimizer updates the fp32 partition in
  place, which now is the parameter partition, and ``_reassign_or_swap_out_partitioned_
  parameters``' ``flat.data.copy_(fp32.data)`` becomes a copy of a tensor onto itself (torch
  returns early for identical views; DeepSpeed's comment: "will not trigger any copy"). The
  ``ds_tensor`` views are then re-pointed at the same flat buffer as before.
- Gradient clipping and overflow checks (``unscale_and_clip_grads``, ``has_overflow``,
  ``_get_norm_groups``) read and scale gradients only, never the weights.
- Optimizer-state init (``initialize_optimizer_states``) only attaches zero gradients; no step
  runs, so nothing is written to the weights before training.
- Checkpoint save (``_rigid_state_dict``): ``fp32_flat_groups`` are the (aliased) partitions
  and the optimizer state is keyed by them, exactly as before; torch.save writes the values.
- Checkpoint load (``_rigid_load_state_dict``, ``load_state_dict``, the universal-checkpoint
  ``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` / ``load_module_checkpoint_state_
  from_checkpoint_dir_stage3``): each copies the saved fp32 partition into the master and then
  the master into the parameter partition (a self-copy now), then re-points ``ds_tensor``; the
  result is the same state as with the clone. ``_set_fp32_optimizer_param_groups`` /
  ``_clear_fp32_optimizer_param_groups`` only put the partitions into the torch optimizer's
  param groups around ``state_dict``/``load_state_dict``. ``_restore_from_bit16_weights`` /
  ``refresh_fp32_params`` copy the parameter partition into the master: a no-op.
- Consolidation: ``_zero3_consolidated_16bit_state_dict`` all-gathers the ``ds_tensor``
  partitions (views of the parameter partition); ``zero_to_fp32`` concatenates the saved
  ``fp32_flat_groups``; both see the same values as before.
- Offload (``offload_optimizer``, NVMe swapping, ``params_in_nvme_and_cpu``) takes other
  branches of ``_create_fp32_partitions`` and is left alone.
One visible difference, for the better: an in-place edit of the weights under
``deepspeed.zero.GatheredParameters(..., modifier_rank=r)`` now also reaches the master, where
with the clone the next optimizer step silently restored the old master weights (unless
``refresh_fp32_params`` was called). This package only reads under ``GatheredParameters``.
``offload_states``/``reload_states`` (DeepSpeed FusedAdam on an accelerator only) move the two
lists separately, which leaves two equal copies after a reload, as before the fix.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Optional

log = logging.getLogger(__name__)

_METHOD = "_create_fp32_partitions"
_BUGGY_TEST = ".device == self.device"  # the comparison in DeepSpeed's alias branch
_MARK = "__asnn_device_compat__"  # set on our wrapper; holds the original function


def _stage3_class() -> Optional[type]:
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    except Exception:  # DeepSpeed missing or broken: nothing to fix
        return None
    return DeepSpeedZeroOptimizer_Stage3


def _torch_device_differs_from_str() -> bool:
    import torch

    return not (torch.device("cpu") == "cpu")


def bug_present(cls: Optional[type] = None) -> bool:
    """Whether ``cls`` (default: DeepSpeed's ZeRO-3 optimizer) has the string-device test that
    never matches (see the module docstring). Reads the unpatched method's source."""
    cls = cls if cls is not None else _stage3_class()
    method = getattr(cls, _METHOD, None) if cls is not None else None
    if method is None or not _torch_device_differs_from_str():
        return False
    method = getattr(method, _MARK, method)
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return False  # cannot check: leave DeepSpeed as it is
    return _BUGGY_TEST in source


def is_applied(cls: Optional[type] = None) -> bool:
    cls = cls if cls is not None else _stage3_class()
    return cls is not None and hasattr(getattr(cls, _METHOD, None), _MARK)


def _wrap(original: Any) -> Any:
    @functools.wraps(original)
    def _create_fp32_partitions(self: Any, *args: Any, **kwargs: Any) -> Any:
        device = getattr(self, "device", None)
        if type(device) is not str or getattr(self, "offload_optimizer", False):
            return original(self, *args, **kwargs)  # already a torch.device, or the offload path
        import torch

        self.device = torch.device(device)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.device = device

    setattr(_create_fp32_partitions, _MARK, original)
    return _create_fp32_partitions


def apply(cls: Optional[type] = None) -> bool:
    """Patch ``cls`` (default: DeepSpeed's ZeRO-3 optimizer) if it has the bug; idempotent.
    Returns whether the fix is active afterwards."""
    cls = cls if cls is not None else _stage3_class()
    if cls is None:
        return False
    if is_applied(cls):
        return True
    if not bug_present(cls):
        return False
    setattr(cls, _METHOD, _wrap(getattr(cls, _METHOD)))
    log.debug("ZeRO-3 fp32 master partition: sharing the parameter partition (%s.%s patched)",
              cls.__name__, _METHOD)
    return True


def remove(cls: Optional[type] = None) -> bool:
    """Undo ``apply`` (for comparisons against DeepSpeed as shipped). Returns whether it was applied."""
    cls = cls if cls is not None else _stage3_class()
    if cls is None or not is_applied(cls):
        return False
    setattr(cls, _METHOD, getattr(getattr(cls, _METHOD), _MARK))
    return True
