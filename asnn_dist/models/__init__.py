"""Model families in ASNN form; importing this package registers them in MODELS."""

from asnn_dist.models import lenet, spiking_resnet, spikformer  # noqa: F401
from asnn_dist.models.common import SpikingClassifier
from asnn_dist.registry import create_model, list_models

__all__ = ["SpikingClassifier", "create_model", "list_models"]
