"""Helpers that start real local services (MLflow server, S3-compatible server, PostgreSQL
databases) for the test suite and for benchmarks; loopback only, bounded waits."""
