"""MLflow tracking from rank 0 and the driver: logging with retries, plots, model registry."""
