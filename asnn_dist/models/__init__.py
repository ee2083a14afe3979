"""Model families in ASNN form, and the registered sizes of each ("flavours", as torchtitan's).

This file imports no torch: it only declares every model in MODELS (name -> class path, the
defaults of that size, the keywords the class takes), so configs validate ``model.name`` and
``model.options`` without importing a model. The registry imports a family's module (lenet.py,
spikformer.py, spiking_resnet.py: the architecture and nothing else) when a model is built.
``tests/unit/test_layering.py`` checks the keywords declared here against the classes.
"""

from __future__ import annotations

from typing import Any

from asnn_dist.registry import MODELS, create_model, list_models

# Keywords every family takes: the image (explicit in each class) and SpikingClassifier's own
# (models/common.py), which each class passes on as ``**options``.
IMAGE_KEYWORDS = ("num_classes", "in_channels", "image_size")
CLASSIFIER_KEYWORDS = ("encoding", "neuron", "learnable_readout")

CIFAR_POOLS = (False, False, True, True)  # Spikformer's SPS: 32x32 -> 8x8 tokens
IMAGENET_POOLS = (True, True, True, True)  # 224x224 -> 14x14 tokens


def _family(target: str, *own: str) -> Any:
    """``declare`` for one class: call it with a model name, tags and that size's defaults."""

    def declare(name: str, tags: tuple[str, ...] = (), **defaults: Any) -> None:
        MODELS.declare(name, target, (*IMAGE_KEYWORDS, *own, *CLASSIFIER_KEYWORDS), tags=tags, **defaults)

    return declare


_lenet = _family("asnn_dist.models.lenet:LeNetASNN", "widths", "hidden")
_lenet("lenet_asnn")
_lenet("lenet_asnn_tiny", tags=("tiny",), widths=(4, 8, 8), hidden=16)

_spikformer = _family("asnn_dist.models.spikformer:Spikformer", "dim", "depth", "heads", "mlp_ratio", "pools")
_spikformer("spikformer_4_384", dim=384, depth=4, heads=12, image_size=32, num_classes=10, pools=CIFAR_POOLS)
_spikformer("spikformer_8_384", dim=384, depth=8, heads=12, image_size=224, num_classes=1000, pools=IMAGENET_POOLS)
_spikformer("spikformer_8_512", dim=512, depth=8, heads=8, image_size=224, num_classes=1000, pools=IMAGENET_POOLS)
_spikformer("spikformer_8_768", dim=768, depth=8, heads=12, image_size=224, num_classes=1000, pools=IMAGENET_POOLS)
_spikformer("spikformer_tiny", tags=("tiny",), dim=32, depth=1, heads=2, image_size=16, num_classes=10,
           pools=CIFAR_POOLS)

_resnet = _family("asnn_dist.models.spiking_resnet:SpikingResNet", "layers", "widths", "sew", "stem")
for _sew, _name in ((False, "spiking_resnet"), (True, "sew_resnet")):
    for _depth, _layers in {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}.items():
        _resnet(f"{_name}{_depth}", layers=_layers, sew=_sew, stem="imagenet", image_size=224, num_classes=1000)
        _resnet(f"{_name}{_depth}_cifar", layers=_layers, sew=_sew, stem="cifar", image_size=32, num_classes=10)
    _resnet(f"{_name}_tiny", tags=("tiny",), layers=(1, 1), widths=(4, 8), sew=_sew, stem="cifar", image_size=16,
           num_classes=10)


def __getattr__(name: str) -> Any:
    """``asnn_dist.models.SpikingClassifier`` without importing torch for the catalogue."""
    if name == "SpikingClassifier":
        from asnn_dist.models.common import SpikingClassifier

        return SpikingClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CIFAR_POOLS", "IMAGENET_POOLS", "SpikingClassifier", "create_model", "list_models"]
