"""The one exception type the data package raises for problems a user can fix.

Why a single plain class: training and CLI code catch ``DataError`` to print one clear line
(which file or URL, and what to check) instead of a traceback, and DataLoader workers can
re-raise it across processes because its constructor takes a single message string.
"""

from __future__ import annotations

from asnn_dist.errors import UserError


class DataError(UserError):
    """A shard, manifest or sample problem; the message names the URL/file and the fix."""
