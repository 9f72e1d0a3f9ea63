"""A flow's failure is one readable line: `locdiff.errors.describe` of what a task raised.

    @flow(name="ingest")
    def ingest(dataset: DataSet, root: str) -> str:
        with one_line():
            ...

An error whose message already is that line (a `UserError`, a one-line ValueError, an unreachable
service) is raised as it is, so its type stays for callers and retries; anything else (a truncated torch
file, an unexpected bug, a message over several lines) becomes a `FlowFailed` with the line as its
message and the original chained as its cause (its traceback is in the task log). Prefect shows the flow
run as `Failed` with "Flow run encountered an exception: TYPE: LINE".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from locdiff.errors import describe

DEBUG_HINT = "see the task log for the traceback"


class FlowFailed(RuntimeError):
    """A flow's failure, reported as one line (the cause is chained)."""


@contextmanager
def one_line() -> Iterator[None]:
    """Re-raise a failure of the block as one line (see the module docstring)."""
    try:
        yield
    except FlowFailed:
        raise
    except Exception as exc:
        line = describe(exc, debug_hint=DEBUG_HINT)
        if line == str(exc):
            raise
        raise FlowFailed(line) from exc
