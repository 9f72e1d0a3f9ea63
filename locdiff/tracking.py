"""MLflow tracking for training and evaluation runs.

One MLflow run per training, holding the whole resolved config as flattened params, loss and learning
rate per step, the config, the checkpoint and the model (the run folder's predictor files under the
`locdiff` flavor: safetensors, JSON and YAML, no pickle; registered as `locdiff`); one nested run per
evaluation set holding `DATASET/acc_1km` ... `DATASET/acc_2500km`, `DATASET/median_km`,
`DATASET/geoscore`, the predictions table, a world map of predictions against truths and the error CDF
plot. The parent run gets the same metrics and plots so that its page shows
everything.

The tracking URI comes from the argument (the config), else `MLFLOW_TRACKING_URI`, else a local SQLite
store `sqlite:///mlflow.db`. mlflow is imported inside functions (the library stays importable without
starting it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "locdiff"
REGISTERED_MODEL = "locdiff"
# The evaluation metric names, each logged as f"{dataset}/{name}" (the issue fixes these spellings).
THRESHOLDS_KM = (1, 25, 200, 750, 2500)
METRIC_NAMES = tuple(f"acc_{t}km" for t in THRESHOLDS_KM) + ("median_km", "geoscore")


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: `uri` (from the config) if given, else MLFLOW_TRACKING_URI, else local SQLite."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_uri(uri: str) -> str:
    """A `sqlite:///relative.db` URI made absolute (for processes with another working directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailable with what to start when an http(s) tracking server does not answer.

    A `sqlite:///PATH` store is checked for a writable folder instead.
    """
    if uri.startswith(("http://", "https://")):
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


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into dotted keys with string values, e.g. {"model.width": "256"}."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value), default=str)
        else:
            flat[name] = str(value)
    return flat


def _mlflow(tracking_uri: str | None):
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


@contextlib.contextmanager
def training_run(config: Mapping[str, Any], *, tracking_uri: str | None = None,
                 experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, run_id: str | None = None) -> Iterator[str]:
    """Open (or reopen by `run_id`) the training run, log the flattened config as params; yield run_id.

    The run ends FINISHED when the block exits normally and FAILED when it raises.
    """
    mlflow = _mlflow(tracking_uri)
    if run_id is None:
        _set_experiment(mlflow, experiment, resolve_tracking_uri(tracking_uri))
    with mlflow.start_run(run_id=run_id, run_name=run_name, tags=dict(tags or {})) as run:
        if run_id is None:
            mlflow.log_params(flatten_config(config))
            with tempfile.TemporaryDirectory() as tmp:
                import yaml

                path = Path(tmp) / "config.yaml"
                path.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
                mlflow.log_artifact(str(path))
        yield run.info.run_id


def _set_experiment(mlflow: Any, name: str, uri: str) -> None:
    """Use experiment `name`, creating it; a SQLite store keeps its artifacts next to the database
    (MLflow's default would be ./mlruns in whatever the working directory is)."""
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        folder = Path(absolute_uri(uri).removeprefix("sqlite:///")).parent / "mlartifacts"
        try:
            mlflow.create_experiment(name, artifact_location=folder.as_uri())
        except Exception:  # noqa: BLE001 - created meanwhile by another process: use it
            pass
    mlflow.set_experiment(name)


def _plain(obj: Any) -> Any:
    """Config values as YAML-safe builtins (tuples to lists, paths to strings)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def _in_run(mlflow: Any, run_id: str):
    """The run as the active run: the current one if it is already active, else reopened."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return contextlib.nullcontext(active)
    return mlflow.start_run(run_id=run_id)


def log_step_metrics(run_id: str, rows: Sequence[Mapping[str, float]], *,
                     tracking_uri: str | None = None) -> None:
    """Log per-step rows like {"step": 10, "loss": 0.3, "lr": 1e-3} to the run in batches."""
    if not rows:
        return
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    metrics = [Metric(key=k, value=float(v), timestamp=now, step=int(row["step"]))
               for row in rows for k, v in row.items() if k != "step"]
    for i in range(0, len(metrics), 1000):  # the REST API takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_checkpoint(run_id: str, run_dir: str | Path, *, tracking_uri: str | None = None) -> None:
    """Log the run folder's own files (locdiff.runs: config, checkpoint, predictor, log, choices) under
    `checkpoint/`; data such as the retrieval gallery is referenced by the run, not copied."""
    from mlflow.tracking import MlflowClient

    from locdiff import runs

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    for name in (runs.CONFIG, runs.CHECKPOINT, runs.METRICS, runs.WEIGHTS, runs.MODEL, runs.SELECTION):
        path = Path(run_dir) / name
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="checkpoint")


class _RunFolderFlavor:
    """The `locdiff` MLflow flavor: the run folder's predictor files as they are (locdiff.runs: tensors in
    safetensors, JSON and YAML), nothing pickled. MLflow calls `save_model` from `Model.log`."""

    __name__ = "locdiff"

    @staticmethod
    def save_model(path: str, mlflow_model: Any, run_dir: str) -> None:
        import shutil

        from locdiff import __version__ as version
        from locdiff import runs

        os.makedirs(path)
        names = (runs.CONFIG, runs.WEIGHTS, runs.MODEL, runs.SELECTION)  # the gallery is data: referenced
        files = [name for name in names if (Path(run_dir) / name).is_file()]
        for name in files:
            shutil.copyfile(Path(run_dir) / name, Path(path) / name)
        mlflow_model.add_flavor("locdiff", locdiff_version=version, files=files,
                                method=runs.RunFolder(run_dir).read_config().get("method", "locdiff"),
                                loader="locdiff.tracking.load_logged_model")
        mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(run_id: str, run_dir: str | Path, *, tracking_uri: str | None = None,
              registered_name: str = REGISTERED_MODEL) -> str:
    """Log the run folder's predictor as the MLflow model `model` of the run and register it; return its URI.

    The model is the run's own files (config.yaml, model.safetensors, model.json, selection.json) under the
    `locdiff` flavor: tensors, JSON and YAML, no pickle (loading it runs no code from the store). Load it
    with `load_logged_model(uri)`.
    """
    from mlflow.models import Model

    from locdiff import runs

    if not runs.RunFolder(run_dir).has_model():
        raise FileNotFoundError(f"{run_dir}: no trained model to log ({runs.WEIGHTS}, {runs.MODEL})")
    mlflow = _mlflow(tracking_uri)
    with _in_run(mlflow, run_id):
        info = Model.log(None, name="model", flavor=_RunFolderFlavor, registered_model_name=registered_name,
                         run_dir=str(run_dir))
    return info.model_uri


def load_logged_model(model_uri: str, *, tracking_uri: str | None = None, dst: str | Path | None = None):
    """The method (a `locdiff.methods.GeoMethod`, ready to predict) of a model logged by `log_model`:
    its files are downloaded (to `dst`, default a temporary folder) and read as a run folder is."""
    import mlflow

    from locdiff.methods import get_method
    from locdiff.model.config import read_run_config

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst) if dst is not None else None)
    cfg = read_run_config(local)
    return get_method(cfg.get("method", "locdiff")).load(Path(local), cfg)


def evaluation_metrics(dataset: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """Prefix the metrics of one data set: {"acc_1km": 3.2, ...} -> {"DATASET/acc_1km": 3.2, ...}.

    Raises ValueError when one of METRIC_NAMES is missing.
    """
    missing = [m for m in METRIC_NAMES if m not in metrics]
    if missing:
        raise ValueError(f"evaluation metrics of {dataset!r} lack {missing}; got {sorted(metrics)}")
    return {f"{dataset}/{m}": float(metrics[m]) for m in METRIC_NAMES}


def log_evaluation(parent_run_id: str, dataset: str, metrics: Mapping[str, float],
                   predictions: Any, *, plots: Mapping[str, str | Path] | None = None,
                   tracking_uri: str | None = None) -> str:
    """Log one evaluation set as a nested run of the training run; return the nested run id.

    Args:
        parent_run_id: the training run.
        dataset: the evaluation set's name, the metric prefix.
        metrics: at least METRIC_NAMES (accuracies in percent, median in km, GeoScore).
        predictions: a pandas DataFrame in the predictions table format.
        plots: name -> PNG path (world map, error CDF), logged under `plots/DATASET/`.
    """
    mlflow = _mlflow(tracking_uri)
    named = evaluation_metrics(dataset, metrics)
    extra = {f"{dataset}/{k}": float(v) for k, v in metrics.items()
             if k not in METRIC_NAMES and isinstance(v, int | float)}
    with _in_run(mlflow, parent_run_id):
        mlflow.log_metrics({**named, **extra})
        for path in (plots or {}).values():
            mlflow.log_artifact(str(path), artifact_path=f"plots/{dataset}")
        with mlflow.start_run(run_name=f"eval-{dataset}", nested=True,
                              tags={"dataset": dataset}) as child:
            mlflow.log_metrics({**named, **extra})
            mlflow.log_param("dataset", dataset)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"predictions_{dataset}.parquet"
                predictions.to_parquet(path, index=False)
                mlflow.log_artifact(str(path), artifact_path="predictions")
            for path in (plots or {}).values():
                mlflow.log_artifact(str(path), artifact_path="plots")
            return child.info.run_id


def find_run(run_id: str | None, *, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """{"status", "metrics"} of run_id in the tracking store, or None when the store does not hold it
    (e.g. a fresh store after the state folder was deleted)."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri)).get_run(run_id)
    except MlflowException:
        return None
    return {"status": run.info.status, "metrics": dict(run.data.metrics)}


def read_run(run_id: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Params, metrics, artifact paths (recursive) and nested runs of a run, through MLflow's API."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    run = client.get_run(run_id)

    def walk(path: str | None = None) -> list[str]:
        out = []
        for f in client.list_artifacts(run_id, path):
            out.extend(walk(f.path) if f.is_dir else [f.path])
        return out

    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    return {"params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "artifacts": walk(), "status": run.info.status,
            "children": {c.data.tags.get("dataset", c.info.run_name): c.info.run_id for c in children}}
