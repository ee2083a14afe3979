"""MLflow access with retries: reachability check up front, logging that never kills training.

Only world rank 0 and the driver talk to MLflow, always through a tracking URI (design rule).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, TypeVar

from asnn_dist.errors import ServiceError

log = logging.getLogger(__name__)
R = TypeVar("R")


def redact_uri(uri: str) -> str:
    """Drop any user:password@ part before a URI is printed or logged."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail before training if MLflow cannot be reached (the message names the URI)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (our own URI)
                if resp.status != 200:
                    raise ServiceError(f"MLflow at {redact_uri(uri)} answered {resp.status} on /health; check the server")
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceError(
                f"cannot reach MLflow tracking server at {redact_uri(uri)} ({exc}); "
                "check that it runs and that tracking.uri / MLFLOW_TRACKING_URI is right"
            ) from None
        return
    try:
        mlflow.set_tracking_uri(uri)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 (any backend failure means unusable)
        raise ServiceError(f"cannot open MLflow tracking store {redact_uri(uri)}: {exc}") from None


def with_retries(fn: Callable[[], R], what: str, attempts: int = 4, base_delay_s: float = 0.5) -> Optional[R]:
    """Run ``fn`` with exponential backoff; after the last failure log once and return None."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 (tracking must never kill training)
            if i == attempts - 1:
                log.warning("MLflow %s failed after %d attempts, continuing without it: %s", what, attempts, exc)
                return None
            time.sleep(base_delay_s * (2**i))
    return None


class RunLogger:
    """Log into one existing MLflow run; failures are retried, reported once, never raised."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)
        self._failed_once = False

    def _send(self, what: str, fn: Callable[[], Any]) -> None:
        def call() -> bool:
            fn()
            return True

        # After one reported failure, stop paying the backoff on every step.
        if with_retries(call, what, attempts=1 if self._failed_once else 4) is None:
            self._failed_once = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._send("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._send("log_params", lambda: self.client.log_batch(self.run_id, params=chunk))

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self._send("log_artifact", lambda: self.client.log_artifact(self.run_id, path, artifact_path))

    def set_tag(self, key: str, value: str) -> None:
        self._send("set_tag", lambda: self.client.set_tag(self.run_id, key, value))
