"""The precision policy: which tensors follow the engine's dtype and which stay fp32, and why.

With ``engine.precision: bf16`` (or fp16 on GPU) DeepSpeed casts the module's *parameters*
to bf16 and keeps fp32 master weights in its optimizer; it leaves buffers alone (DeepSpeed
0.19 casts parameters only). Nothing casts the inputs. The model then follows one rule: the
matmul-heavy layers compute in the parameters' dtype ("compute dtype"); everything that
accumulates, compares against thresholds or reduces over many values stays fp32:

- Input images stay fp32 (loader -> device); the encoder rounds its thresholds (float64
  buffers) to the images' dtype and compares there, as the authors' code does, so a value
  right at a threshold fires at the same step as in fp32 training. Its spikes (exactly 0/1) and the analog direct steps are then cast
  to the compute dtype by the model (``SpikingClassifier.forward_steps``), as autocast casts
  a conv's input.
- Convs, linears and spike attention run in the compute dtype (bf16 products, fp32 sums
  inside oneDNN / cuBLAS); spike tensors saved for backward are stored losslessly as bits
  or uint8 whatever the dtype.
- BatchNorm (``models.step_norm``): batch statistics are reduced in fp32 or better (the C
  kernels sum in float64, the torch ops in fp32 for bf16/fp16 inputs), running statistics are
  fp32 buffers, the normalisation y = x * scale + shift uses fp32 scale/shift and rounds y
  once to the compute dtype; gradient sums likewise. On CPU the C kernels read bf16 tensors
  directly (``snn/native/bf16.h``): no conversion passes.
- Spiking neurons integrate the membrane in fp32 (the input current is upcast; checkpointed
  time windows carry fp32 membranes, so checkpointed and plain runs agree) and return spikes in
  the compute dtype (exact). Leak and gain are read as Python floats.
- The classifier head and the per-step readout compute in fp32 (input and weights upcast):
  bf16 logits carry 8 significant bits, which cost about a point of digits test accuracy,
  while the head is a tiny share of the FLOPs. The loss is fp32 (``train.worker.masked_loss``)
  and so are the evaluation sums (float64).
- Buffers never drop below fp32: modules that hold statistics or thresholds use
  ``Fp32Buffers``, so even ``module.bfloat16()`` leaves them fp32 (device moves still apply).

The same model code also runs under ``torch.autocast`` with fp32 parameters: the compute
dtype is then fp32 and autocast lowers the matmuls; BatchNorm, neurons and head follow the
same fp32 rules.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

LOW_PRECISION = (torch.bfloat16, torch.float16)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_low(dtype: torch.dtype) -> bool:
    """bf16 or fp16: the dtypes that round sums and statistics too coarsely to keep them."""
    return dtype in LOW_PRECISION


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the engine gave the module's parameters (fp32 when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and statistics over a tensor of ``dtype`` are reduced in."""
    return torch.float32 if is_low(dtype) else torch.float64


def cast_params(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters only, as DeepSpeed's bf16/fp16 engine does (buffers keep their dtype);
    for inference and benchmarks that want the engine's precision without an engine."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


class Fp32Buffers(nn.Module):
    """Mixin: floating buffers follow device moves but never a cast to bf16/fp16.

    Why: running statistics and encoder thresholds lose their meaning in 8 significant bits
    (a running variance updated with momentum 0.1 stalls; a threshold of 1/3 moves)."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:  # type: ignore[override]
        kept = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point() and not is_low(b.dtype)}
        out = super()._apply(fn, recurse)
        for key, old in kept.items():
            new = self._buffers[key]
            if new is not None and is_low(new.dtype):
                self._buffers[key] = old.to(device=new.device)
        return out
