"""Build the compiled ops once at install time, so that the first training run does not
compile them inside every worker: DeepSpeed's CPU ops (shared-memory all-reduce, fused Adam;
about a minute) and the C kernel of the adaptive LIF neuron (``snn.native``, about a second)."""

from __future__ import annotations

import os
import sys


def prebuild() -> list[str]:
    """Build DeepSpeed's ops for this machine's accelerator: the CPU ops where torch sees no
    GPU (DS_ACCELERATOR=cpu, as CPU training runs set it); on a GPU machine DeepSpeed's own
    choice (its CUDA ops build at first use where they are compatible)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    built = []
    for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        builder.load(verbose=False)
        built.append(builder.NAME)
    return built


def prebuild_native_kernels() -> str:
    from asnn_dist.snn import native

    lib = native.load()
    return "built" if lib is not None else "not built (the torch-op path will be used)"


if __name__ == "__main__":
    print("deepspeed ops ready:", ", ".join(prebuild()) or "none needed")
    print("C kernels (LIF, BatchNorm, spike bits):", prebuild_native_kernels())
    sys.exit(0)
