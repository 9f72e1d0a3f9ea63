"""Which task failures are worth a retry: transient ones (network, S3, a server restarting, a Ray
cluster hiccup), not bad input (ValueError, a missing file, no permission, no S3 credentials) or an
out-of-memory that would fail again."""

from __future__ import annotations

from typing import Any

PERMANENT = (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError, IsADirectoryError,
             NotADirectoryError, ImportError, MemoryError)
# the same, of libraries not imported here (by class name): no or partial S3 credentials (botocore), a GPU
# out of memory (torch)
PERMANENT_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "OutOfMemoryError"})


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry unless the exception is one of PERMANENT or PERMANENT_NAMES."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception as exc:  # noqa: BLE001 - anything else (OSError, ConnectionError, Ray errors) may pass
        return type(exc).__name__ not in PERMANENT_NAMES
    return True
