"""Log a trained model to MLflow, register it, and move the alias only when it is better.

The alias (``champion`` by default) marks the version users deploy; it moves to a new version
only if that version's evaluation metric beats the current holder's (recorded as a version tag),
so a worse rerun never silently replaces a good model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from asnn_dist.tracking.client import set_mlflow_uri

log = logging.getLogger(__name__)

METRIC_TAG = "asnn.eval_metric"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias_moved: bool
    model_uri: str


def log_and_register(
    model: nn.Module,
    example: torch.Tensor,
    *,
    tracking_uri: str,
    run_id: str,
    registered_name: Optional[str],
    alias: str,
    metric_name: str,
    metric_value: float,
) -> Optional[Registration]:
    """Log ``model`` with a signature and input example into ``run_id`` and register it."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    set_mlflow_uri(tracking_uri)
    model = model.eval()
    with torch.no_grad():
        out = model(example)
    signature = infer_signature(example.numpy(), out.numpy())
    with mlflow.start_run(run_id=run_id), _without_pickle_notice():
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example.numpy(),
            # pickle keeps our module (anytime(), num_steps, ...); pt2 export would freeze it.
            serialization_format="pickle",
            # Said, not inferred: inference reloads the model in a subprocess and warns about
            # torch's local version label (such as +cpu), which pip could not install anyway.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    if not registered_name:
        return None
    client = MlflowClient(tracking_uri=tracking_uri)
    version = _create_version(client, registered_name, info.model_uri, run_id, info.model_id)
    client.set_model_version_tag(registered_name, version, METRIC_TAG, f"{metric_name}={metric_value:.6f}")
    moved = _maybe_move_alias(client, registered_name, alias, version, metric_value)
    return Registration(registered_name, version, moved, f"models:/{registered_name}/{version}")


def _current_metric(client, name: str, alias: str) -> Optional[float]:
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 (no holder yet)
        return None
    tag = (holder.tags or {}).get(METRIC_TAG, "")
    try:
        return float(tag.split("=", 1)[1])
    except (IndexError, ValueError):
        return None


class _DropPickleNotice(logging.Filter):
    """MLflow warns on every pickle-format save; we chose pickle on purpose (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle format" not in record.getMessage()


@contextlib.contextmanager
def _without_pickle_notice() -> Iterator[None]:
    logger, notice = logging.getLogger("mlflow.pytorch"), _DropPickleNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _create_version(client, name: str, source: str, run_id: str, model_id: Optional[str]) -> str:
    """Register through the client (the fluent API also prints what our summary line says)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return str(client.create_model_version(name, source, run_id=run_id, model_id=model_id).version)


def _maybe_move_alias(client, name: str, alias: str, version: str, value: float) -> bool:
    best = _current_metric(client, name, alias)
    if best is not None and value <= best:
        log.info("alias %s@%s stays (%.4f >= new %.4f)", name, alias, best, value)
        return False
    client.set_registered_model_alias(name, alias, version)
    return True


def load_registered_model(model_uri: str, tracking_uri: Optional[str] = None) -> nn.Module:
    """``models:/NAME@ALIAS`` (or any MLflow model URI) -> eval-mode torch module."""
    import mlflow

    if tracking_uri:
        set_mlflow_uri(tracking_uri)
    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    return model.eval()
