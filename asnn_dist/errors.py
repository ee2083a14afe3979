"""User-facing error types: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """An error the user can fix (bad config, missing data, unreachable service)."""

    exit_code = 2


class ConfigError(UserError):
    """Invalid configuration: the message names the field, the bad value and what is allowed."""


class ServiceError(UserError):
    """An external service (MLflow, S3, Ray) could not be reached; the message names the URL."""

    exit_code = 3
