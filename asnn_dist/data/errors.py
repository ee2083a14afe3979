"""The exception types the data package raises for problems a user can fix.

Why plain classes with one message string: training and CLI code catch ``DataError`` to print
one clear line (which file or URL, and what to check) instead of a traceback, and DataLoader
workers re-raise them across processes by message and kind.
"""

from __future__ import annotations

from asnn_dist.errors import ServiceError, UserError


class DataError(UserError):
    """A shard, manifest or sample problem; the message names the URL/file and the fix."""


class UnreachableError(DataError, ServiceError):
    """A storage endpoint (S3) could not be reached: a DataError with the service exit code."""
