"""Where MLflow tracking goes: the tracking URI (the argument, else MLFLOW_TRACKING_URI, else a local SQLite
store), its checks, and the `mlflow` module bound to it. Only the standard library and locdiff.errors at
import time (mlflow is imported inside functions), so the inference side (locdiff.inference.model_uri) and
the training side (locdiff.tracking) share it without importing each other.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from locdiff.errors import TrackingUnavailable

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI", "TrackingUnavailable", "absolute_uri", "check_tracking_uri",
           "experiment_id", "mlflow_for", "resolve_tracking_uri"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "locdiff"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: `uri` (from the config) if given, else MLFLOW_TRACKING_URI, else local SQLite."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_uri(uri: str) -> str:
    """A `sqlite:///relative.db` URI made absolute (for processes with another working directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


def without_credentials(uri: str) -> str:
    """`uri` without the user:password@ of an http(s) URL: what a message or a log line may show."""
    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailable with what to start when an http(s) tracking server does not answer.

    A `sqlite:///PATH` store is checked for a writable folder instead.
    """
    if uri.startswith(("http://", "https://")):
        uri = without_credentials(uri)  # user:password@ (sent by MLflow) is neither used for /health nor repeated
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status == 200:
                    return
                problem = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as err:
            problem = str(getattr(err, "reason", err))
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is not reachable ({problem}). Start the local stack with "
            "`infra/start.sh` (or `make demo`), or point MLFLOW_TRACKING_URI at a running server; "
            f"unset it to use the local store {DEFAULT_TRACKING_URI}."
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingUnavailable(
                f"MLflow store {uri}: folder {folder} does not exist or is not writable; create it or "
                "set MLFLOW_TRACKING_URI to a writable sqlite:///PATH or a running server."
            )


def mlflow_for(tracking_uri: str | None) -> Any:
    """The `mlflow` module with its tracking URI set (the resolved one, checked first)."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


def experiment_id(mlflow: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, creating it; a SQLite store keeps its artifacts next to the database
    (MLflow's default would be ./mlruns in whatever the working directory is)."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs = {}
    if uri.startswith("sqlite:///"):
        folder = Path(absolute_uri(uri).removeprefix("sqlite:///")).parent / "mlartifacts"
        kwargs["artifact_location"] = folder.as_uri()
    try:
        return mlflow.create_experiment(name, **kwargs)
    except Exception:  # noqa: BLE001 - created meanwhile by another process: use it
        return mlflow.get_experiment_by_name(name).experiment_id


