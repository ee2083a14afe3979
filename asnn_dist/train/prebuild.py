"""Build DeepSpeed's CPU ops once at install time (shared-memory all-reduce, fused Adam), so
that the first training run does not spend a minute compiling them inside every worker."""

from __future__ import annotations

import os
import sys


def prebuild() -> list[str]:
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


if __name__ == "__main__":
    print("deepspeed ops ready:", ", ".join(prebuild()) or "none needed")
    sys.exit(0)
