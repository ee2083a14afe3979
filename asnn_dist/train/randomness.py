"""Per-rank, position-derived random streams for everything stochastic in training.

Why: a generator seeded once (the rate encoder used seed 0 on every rank) makes every rank draw
the same noise, and its state must be checkpointed to resume exactly. Seeding each stochastic
part before every micro batch from (seed, rank, epoch, micro batch) gives each rank its own
stream and makes a resumed run draw what an uninterrupted one drew, with nothing to save.
The parts: modules with a ``reseed(seed)`` method (``snn.encoders.RateEncoder``), torch's
global generators (CPU and every CUDA device: dropout and anything else drawing from them),
and the batch mixing (``mixing_rng``). Data augmentation is seeded per sample by its stream
position in the loader (``data/pipeline.py``).
"""

from __future__ import annotations

import random

import torch

from asnn_dist.data.sharding import derive_seed


def reseed_model(module: torch.nn.Module, *key: object) -> None:
    """Seed ``module``'s stochastic parts and torch's global generators from ``key``
    (e.g. ``(seed, rank, epoch, micro)``); every submodule gets its own stream."""
    base = derive_seed("model", *key)
    torch.manual_seed(base)
    for index, (name, sub) in enumerate(module.named_modules()):
        reseed = getattr(sub, "reseed", None)
        if callable(reseed):
            reseed(derive_seed(base, index, name))


def mixing_rng(*key: object) -> random.Random:
    """The generator of mixup/cutmix for one micro batch (``key`` as in ``reseed_model``)."""
    return random.Random(derive_seed("mixing", *key))
