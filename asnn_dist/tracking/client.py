"""MLflow access with retries: reachability check up front, logging that never kills training.

Only world rank 0 and the driver talk to MLflow, always through a tracking URI (design rule).
The training worker logs through ``BackgroundRunLogger``: its calls return at once and one
thread sends them, in order, with ``RunLogger``'s retries; ``flush`` waits until everything
queued before it has been sent (the worker flushes before every checkpoint and at the end).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from asnn_dist.errors import ServiceError

log = logging.getLogger(__name__)
# MLflow announces at INFO that it creates/upgrades a new SQLite store's tables (two lines on
# every first run of the demo); its warnings and errors still show.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
R = TypeVar("R")


def redact_uri(uri: str) -> str:
    """Drop any user:password@ part before a URI is printed or logged."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail before training if MLflow cannot be reached (the message names the URI)."""
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
        set_mlflow_uri(uri)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 (any backend failure means unusable)
        raise ServiceError(f"cannot open MLflow tracking store {redact_uri(uri)}: {exc}") from None


def experiment_id(client: Any, name: str, artifact_location: Optional[str] = None) -> str:
    """The id of the named MLflow experiment, created (with its artifact root) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        client.create_experiment(name, artifact_location=artifact_location)
        exp = client.get_experiment_by_name(name)
    return exp.experiment_id


def set_mlflow_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its export of MLFLOW_TRACKING_URI to the environment.

    MLflow writes the URI into ``os.environ``; the config loader reads MLFLOW_TRACKING_URI as the
    user's default, so a run in this process would otherwise become the default of every config
    loaded after it (and of every process started from it)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def with_retries(fn: Callable[[], R], what: str, attempts: int = 4, base_delay_s: float = 0.5,
                 report: bool = True) -> Optional[R]:
    """Run ``fn`` with exponential backoff; after the last failure log (a warning, or a debug
    line when ``report`` is False) and return None."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 (tracking must never kill training)
            if i == attempts - 1:
                log.log(logging.WARNING if report else logging.DEBUG,
                        "MLflow %s failed after %d attempts, continuing without it: %s", what, attempts, exc)
                return None
            time.sleep(base_delay_s * (2**i))
    return None


class RunLogger:
    """Log into one existing MLflow run; failures are retried, reported once, never raised.

    The first failed call is retried with backoff (4 attempts) and reported as one warning;
    after it, every call is tried once and a failure is only a debug line (``failures`` counts
    the calls that failed), so a dead server costs neither backoff nor log spam on every step."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)
        self._failed_once = False
        self.failures = 0

    def _send(self, what: str, fn: Callable[[], Any]) -> None:
        def call() -> bool:
            fn()
            return True

        # After one reported failure, stop paying the backoff (and reporting) on every step.
        first = not self._failed_once
        if with_retries(call, what, attempts=4 if first else 1, report=first) is None:
            self._failed_once = True
            self.failures += 1

    @staticmethod
    def metric_batch(metrics: dict[str, float], step: int, timestamp_ms: Optional[int] = None) -> list:
        """MLflow ``Metric`` entities, stamped now (or ``timestamp_ms``); values made float here."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        return [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def log_metric_batch(self, batch: list) -> None:
        self._send("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_metric_batch(self.metric_batch(metrics, step))

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


_CLOSE = object()
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit


class BackgroundRunLogger:
    """``RunLogger``'s calls on one background thread, so that the training loop never waits
    for MLflow (a call to a local SQLite store takes milliseconds; to a remote server, or one
    that fails and is retried with backoff, much longer).

    - Order: one thread sends the calls first in, first out. Metric calls waiting in the queue
      together go out as one ``log_batch`` (at most 1000 metrics, in their order); each keeps
      the timestamp of the moment it was logged, not of the send.
    - Nothing lost: the queue is bounded (``max_pending`` calls); when it is full, a call waits
      for room (the loop then runs at MLflow's pace, as a synchronous logger would) rather than
      dropping metrics. ``flush`` returns when every call made before it has been sent (or has
      failed); ``close`` flushes and stops the thread. Values are converted to float when
      logged, so a bad value raises in the caller, as before.
    - Failures: ``RunLogger``'s semantics (first failure retried with backoff, reported once,
      later ones tried once; never raised). An unexpected error in the thread is reported once
      too and the thread goes on with the next call.
    """

    def __init__(self, logger: RunLogger, max_pending: int = 256) -> None:
        self.logger = logger
        self.run_id = logger.run_id
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max_pending)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mlflow-background-logger", daemon=True)
        self._thread.start()

    # ---- the RunLogger interface (all return at once) ----------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(("metrics", RunLogger.metric_batch(metrics, step)))

    def set_tag(self, key: str, value: str) -> None:
        self._put(("call", lambda: self.logger.set_tag(key, value)))

    def log_params(self, params: dict[str, str]) -> None:
        self._put(("call", lambda: self.logger.log_params(params)))

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self._put(("call", lambda: self.logger.log_artifact(path, artifact_path)))

    @property
    def failures(self) -> int:
        return self.logger.failures

    # ---- flushing ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every call made before this one has been sent (or has failed)."""
        if self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        """Flush and stop the thread (idempotent); later calls are sent synchronously."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join()

    def __enter__(self) -> "BackgroundRunLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the thread --------------------------------------------------------------------------
    def _put(self, item: tuple[str, Any]) -> None:
        if self._closed or not self._thread.is_alive():
            self._send(item)  # after close: no thread left to hand it to
            return
        self._queue.put(item)

    def _run(self) -> None:
        reported = False
        while True:
            item = self._queue.get()
            done = 1
            try:
                if item is _CLOSE:
                    return
                if item[0] == "metrics":  # coalesce metric calls already waiting, in order
                    batch = list(item[1])
                    while len(batch) < MAX_METRICS_PER_CALL:
                        try:
                            nxt = self._queue.queue[0]  # peek (only this thread takes items)
                        except IndexError:
                            break
                        if nxt is _CLOSE or nxt[0] != "metrics" or len(batch) + len(nxt[1]) > MAX_METRICS_PER_CALL:
                            break
                        batch += self._queue.get_nowait()[1]
                        done += 1
                    item = ("metrics", batch)
                self._send(item)
            except Exception as exc:  # noqa: BLE001 (tracking must never kill training)
                if not reported:
                    log.warning("MLflow background logging: unexpected error, continuing: %s", exc)
                    reported = True
            finally:
                for _ in range(done):
                    self._queue.task_done()

    def _send(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == "metrics":
            self.logger.log_metric_batch(payload)
        else:
            payload()
