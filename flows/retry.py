"""Which task failures are worth a retry: transient ones (network, S3, a server restarting, a Ray
cluster hiccup), not bad input (ValueError, a missing file, no permission) that would fail again."""

from __future__ import annotations

from typing import Any

PERMANENT = (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError, IsADirectoryError,
             NotADirectoryError, ImportError)


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry unless the exception is one of PERMANENT."""
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception:  # noqa: BLE001 - anything else (OSError, ConnectionError, Ray errors) may pass
        return True
    return True
