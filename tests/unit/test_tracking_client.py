"""MLflow logging from the training loop: ``RunLogger`` (retries, reported once, never raised)
and ``BackgroundRunLogger`` (the worker's: returns at once, sends in order on one thread,
nothing lost at flush/close). A real SQLite store where order and completeness are checked,
fake clients where failures and slowness are staged."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from asnn_dist.tracking import client as tracking
from asnn_dist.tracking.client import BackgroundRunLogger, RunLogger


class FakeClient:
    """Stands in for MlflowClient: records log_batch/set_tag calls; can fail or be slow."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.fail_first, self.delay_s, self.gate = fail_first, delay_s, gate
        self.attempts = 0
        self.batches: list[list] = []
        self.tags: list[tuple[str, str]] = []
        self.threads: set[str] = set()

    def _call(self) -> None:
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.attempts += 1
        if self.attempts <= self.fail_first:
            raise ConnectionError("mlflow down")

    def log_batch(self, run_id: str, metrics=(), params=()) -> None:
        self._call()
        self.batches.append(list(metrics))

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call()
        self.tags.append((key, value))

    @property
    def metrics(self) -> list[tuple[str, float, int]]:
        return [(m.key, m.value, m.step) for batch in self.batches for m in batch]


def fake_logger(monkeypatch, fake: FakeClient) -> RunLogger:
    monkeypatch.setattr(tracking, "with_retries", _fast(tracking.with_retries))
    logger = RunLogger.__new__(RunLogger)
    logger.uri, logger.run_id, logger.client = "fake://", "run", fake
    logger._failed_once, logger.failures = False, 0
    return logger


def _fast(with_retries):
    def call(fn, what, attempts=4, base_delay_s=0.5, report=True):
        return with_retries(fn, what, attempts=attempts, base_delay_s=0.001, report=report)
    return call


def test_metrics_all_arrive_in_order_with_their_own_timestamps(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("bg"))
    logger = BackgroundRunLogger(RunLogger(uri, run.info.run_id))
    stamps = []
    for step in range(1, 41):
        stamps.append(int(time.time() * 1000))
        logger.log_metrics({"train_loss": 1.0 / step, "lr": 1e-3 * step}, step)
        if step == 20:
            logger.set_tag("asnn.half", "yes")
    logger.flush()
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 41))
    assert [m.value for m in history] == [1.0 / s for s in range(1, 41)]
    # the timestamp is the moment of the call, not of the send
    assert all(abs(m.timestamp - t) <= 50 for m, t in zip(history, stamps))
    assert client.get_run(run.info.run_id).data.tags["asnn.half"] == "yes"
    logger.log_metrics({"train_loss": 0.5}, 41)
    logger.close()  # close flushes too
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 41
    assert logger.failures == 0


def test_calls_return_at_once_and_flush_waits(monkeypatch) -> None:
    fake = FakeClient(delay_s=0.2)
    logger = BackgroundRunLogger(fake_logger(monkeypatch, fake))
    t0 = time.perf_counter()
    for step in range(3):
        logger.log_metrics({"loss": float(step)}, step)
    assert time.perf_counter() - t0 < 0.1  # a synchronous logger would take 0.6 s
    logger.flush()
    assert [m[2] for m in fake.metrics] == [0, 1, 2]
    assert fake.threads == {"mlflow-background-logger"}  # never the training thread
    logger.close()


def test_waiting_metric_calls_go_out_as_one_batch_in_order(monkeypatch) -> None:
    gate = threading.Event()
    fake = FakeClient(gate=gate)
    logger = BackgroundRunLogger(fake_logger(monkeypatch, fake), max_pending=1000)
    logger.log_metrics({"a": 0.0}, 0)  # the thread takes it and waits at the gate
    time.sleep(0.05)
    for step in range(1, 600):
        logger.log_metrics({"a": float(step), "b": -float(step)}, step)
    gate.set()
    logger.close()
    assert [m[2] for m in fake.metrics if m[0] == "a"] == list(range(600))
    assert all(len(batch) <= tracking.MAX_METRICS_PER_CALL for batch in fake.batches)
    assert len(fake.batches) <= 4  # 1 + 1198 waiting metrics in batches of <= 1000


def test_full_queue_waits_for_room_instead_of_dropping(monkeypatch) -> None:
    fake = FakeClient(delay_s=0.02)
    logger = BackgroundRunLogger(fake_logger(monkeypatch, fake), max_pending=2)
    logger.set_tag("k", "v")  # non-metric calls are not coalesced: each one takes a slot
    for step in range(10):
        logger.log_metrics({"x": float(step)}, step)
    logger.close()
    assert [m[2] for m in fake.metrics] == list(range(10)) and fake.tags == [("k", "v")]


def test_failures_are_retried_reported_once_and_never_raised(monkeypatch, caplog) -> None:
    fake = FakeClient(fail_first=10**9)  # a dead server
    logger = BackgroundRunLogger(fake_logger(monkeypatch, fake))
    with caplog.at_level(logging.DEBUG, logger="asnn_dist.tracking.client"):
        for step in range(5):
            logger.log_metrics({"x": float(step)}, step)
            logger.flush()  # one call at a time: no coalescing
        logger.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "failed after 4 attempts" in warnings[0].getMessage()
    assert fake.attempts == 4 + 4  # the first call retried 4 times, the later ones tried once
    assert logger.failures == 5 and fake.batches == []


def test_logging_recovers_after_a_failure(monkeypatch, caplog) -> None:
    fake = FakeClient(fail_first=4)  # the first call fails all its attempts, then MLflow is back
    logger = BackgroundRunLogger(fake_logger(monkeypatch, fake))
    with caplog.at_level(logging.WARNING, logger="asnn_dist.tracking.client"):
        for step in range(3):
            logger.log_metrics({"x": float(step)}, step)
            logger.flush()
        logger.close()
    assert [m[2] for m in fake.metrics] == [1, 2] and logger.failures == 1
    assert len(caplog.records) == 1


def test_unexpected_error_in_the_thread_is_reported_once_and_logging_goes_on(monkeypatch, caplog) -> None:
    fake = FakeClient()
    inner = fake_logger(monkeypatch, fake)
    real = inner.log_metric_batch
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("bug outside the retried call")
        real(batch)

    inner.log_metric_batch = flaky
    logger = BackgroundRunLogger(inner)
    with caplog.at_level(logging.WARNING, logger="asnn_dist.tracking.client"):
        for step in range(3):
            logger.log_metrics({"x": float(step)}, step)
            logger.flush()
        logger.close()
    assert [m[2] for m in fake.metrics] == [2]
    assert len(caplog.records) == 1 and "unexpected error" in caplog.records[0].getMessage()


def test_bad_value_raises_in_the_caller_and_calls_after_close_are_synchronous(monkeypatch) -> None:
    fake = FakeClient()
    logger = BackgroundRunLogger(fake_logger(monkeypatch, fake))
    with pytest.raises((TypeError, ValueError)):
        logger.log_metrics({"x": "not a number"}, 0)
    logger.close()
    logger.close()  # idempotent
    logger.log_metrics({"x": 1.0}, 1)
    assert fake.metrics == [("x", 1.0, 1)] and "mlflow-background-logger" not in fake.threads


def test_run_logger_stops_backoff_and_warnings_after_the_first_failure(monkeypatch, caplog) -> None:
    fake = FakeClient(fail_first=10**9)
    logger = fake_logger(monkeypatch, fake)
    with caplog.at_level(logging.WARNING, logger="asnn_dist.tracking.client"):
        for step in range(3):
            logger.log_metrics({"x": 1.0}, step)  # synchronous: never raises
    assert fake.attempts == 4 + 1 + 1 and logger.failures == 3 and len(caplog.records) == 1


def test_setting_our_tracking_uri_leaves_the_users_environment_alone(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; the config loader reads that as the
    user's default, so a run must not change it for configs loaded afterwards."""
    import mlflow

    from asnn_dist.config import load_config
    from asnn_dist.tracking.client import set_mlflow_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    set_mlflow_uri(f"sqlite:///{tmp_path}/a.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/a.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert load_config(None, [f"workdir={tmp_path}/w"]).tracking.uri == f"sqlite:///{tmp_path}/w/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    set_mlflow_uri(f"sqlite:///{tmp_path}/b.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
