"""MLflow tracking for training and evaluation runs.

One MLflow run per training, holding the whole resolved config as flattened params, loss and learning
rate per step, the config, the checkpoint and the model (a pyfunc without pickles, locdiff.inference.pyfunc,
registered as `locdiff`); one nested run per evaluation set holding `DATASET/acc_1km` ...
`DATASET/acc_2500km`, `DATASET/median_km`, `DATASET/geoscore`, `DATASET/ece`, the predictions table, a
world map of predictions against truths, the error CDF and the reliability plot. The parent run gets the
same metrics and plots so that its page shows everything.

The registry: every model version carries its evaluation metrics as tags (`DATASET/geoscore` ...); the
alias `champion` names the version to serve: the first registered version, then any version whose mean
GeoScore over the test sets of its pipeline beats the champion's on the same sets (`promote`).

The tracking URI comes from the argument (the config), else `MLFLOW_TRACKING_URI`, else a local SQLite
store `sqlite:///mlflow.db` (`locdiff.tracking_store`, which the inference side shares). mlflow is imported
inside functions (the library stays importable without starting it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from locdiff import runs
from locdiff.inference import pyfunc
from locdiff.methods import GeoMethod, get_method
from locdiff.metrics import ACCURACY_KEYS, THRESHOLDS_KM
from locdiff.model.config import read_run_config
from locdiff.tracking_store import (
    DEFAULT_EXPERIMENT,
    DEFAULT_TRACKING_URI,
    TrackingUnavailable,
    absolute_uri,
    check_tracking_uri,
    experiment_id,
    resolve_tracking_uri,
)
from locdiff.tracking_store import mlflow_for as _mlflow

__all__ = ["CHAMPION", "DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI", "METRIC_NAMES", "PROMOTION_METRIC",
           "REGISTERED_MODEL", "THRESHOLDS_KM", "TrackingUnavailable", "absolute_uri", "check_tracking_uri",
           "evaluation_metrics", "experiment_id", "find_run", "flatten_config", "load_logged_model",
           "log_checkpoint", "log_evaluation", "log_model", "log_step_metrics", "logged_steps", "promote", "read_run",
           "resolve_tracking_uri", "tag_model_version", "tag_resume", "training_run"]

logger = logging.getLogger(__name__)

REGISTERED_MODEL = "locdiff"
# The evaluation metric names, each logged as f"{dataset}/{name}" (the issue fixes these spellings).
METRIC_NAMES = ACCURACY_KEYS + ("median_km", "geoscore")


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
        exp = None
    else:
        exp = mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id
    with mlflow.start_run(run_id=run_id, run_name=run_name, tags=dict(tags or {}), experiment_id=exp) as run:
        if run_id is None:
            mlflow.log_params(flatten_config(config))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
                mlflow.log_artifact(str(path))
        yield run.info.run_id


def tag_resume(run_id: str, settings: Mapping[str, Any], *, tracking_uri: str | None = None) -> None:
    """Tag the run with what a resumed training ran with, `NAME_resumed` = value (e.g. workers_resumed = "1"):
    its params keep the values the training began with (MLflow params cannot change). The latest resume's."""
    client = _client(tracking_uri)
    for key, value in settings.items():
        client.set_tag(run_id, f"{key}_resumed", str(value))


def _set_experiment(mlflow: Any, name: str, uri: str) -> None:
    """Use experiment `name` (created when missing) for the runs started next."""
    mlflow.set_experiment(experiment_id=experiment_id(mlflow, name, uri))


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
    # its own experiment, whatever experiment the process used last (e.g. an inference run's)
    exp = mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id
    return mlflow.start_run(run_id=run_id, experiment_id=exp)


def log_step_metrics(run_id: str, rows: Sequence[Mapping[str, float]], *,
                     tracking_uri: str | None = None) -> None:
    """Log per-step rows like {"step": 10, "loss": 0.3, "lr": 1e-3} to the run in batches."""
    if not rows:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    metrics = [Metric(key=k, value=float(v), timestamp=now, step=int(row["step"]))
               for row in rows for k, v in row.items() if k != "step"]
    for i in range(0, len(metrics), 1000):  # the REST API takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def logged_steps(run_id: str, key: str = "loss", *, tracking_uri: str | None = None) -> set[int]:
    """The steps at which the run holds metric `key` (e.g. those a training logged before it was killed)."""
    return {int(m.step) for m in _client(tracking_uri).get_metric_history(run_id, key)}


def log_checkpoint(run_id: str, run_dir: str | Path, *, tracking_uri: str | None = None) -> None:
    """Log the run folder's own files (locdiff.runs: config, checkpoint, predictor, log, choices) under
    `checkpoint/`; data such as the retrieval gallery is referenced by the run, not copied."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    for name in (runs.CONFIG, runs.CHECKPOINT, runs.METRICS, runs.WEIGHTS, runs.MODEL, runs.SELECTION):
        path = Path(run_dir) / name
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="checkpoint")


CHAMPION = "champion"
KEY_TAG = "locdiff.key"  # a model version's run completion key (log_model)
PROMOTION_METRIC = "geoscore"


def log_model(run_id: str, run_dir: str | Path, *, tracking_uri: str | None = None,
              registered_name: str = REGISTERED_MODEL, key: str | None = None) -> dict[str, Any]:
    """Log a LocDiff run folder as the pyfunc model of locdiff.inference.pyfunc (weights as safetensors,
    config as YAML/JSON, its image encoder, a signature; no code, nothing pickled) and register
    it as `registered_name`; the first version becomes `champion`. Returns {"model_uri", "version"}.

    `key` (the run's completion key) tags the version: a version of this MLflow run with the same key is
    returned instead of registering another (a re-run after a kill or a retry after the registration)."""
    if not runs.RunFolder(run_dir).has_model():
        raise FileNotFoundError(f"{run_dir}: no trained model to log ({runs.WEIGHTS}, {runs.MODEL})")
    if key is not None:
        for v in _client(tracking_uri).search_model_versions(f"run_id = '{run_id}'"):
            if v.name == registered_name and (v.tags or {}).get(KEY_TAG) == key:
                logger.info("model %s version %s holds this run already", registered_name, v.version)
                return {"model_uri": v.source, "version": str(v.version)}
    mlflow = _mlflow(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="locdiff-stage-") as tmp, _in_run(mlflow, run_id):
        data = pyfunc.stage(run_dir, tmp)
        info = mlflow.pyfunc.log_model(name="model", loader_module=pyfunc.LOADER_MODULE, data_path=str(data),
                                       signature=pyfunc.signature(),
                                       pip_requirements=pyfunc.requirements(),
                                       registered_model_name=registered_name)
    version = str(info.registered_model_version) if info.registered_model_version is not None else None
    if version is not None:
        client = _client(tracking_uri)
        if key is not None:
            client.set_model_version_tag(registered_name, version, KEY_TAG, key)
        try:
            client.get_model_version_by_alias(registered_name, CHAMPION)
        except Exception:  # noqa: BLE001 - no champion yet (MlflowException RESOURCE_DOES_NOT_EXIST)
            client.set_registered_model_alias(registered_name, CHAMPION, version)
            logger.info("model %s version %s is the first: alias %s", registered_name, version, CHAMPION)
    return {"model_uri": info.model_uri, "version": version}


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def tag_model_version(version: str, metrics: Mapping[str, float], *, tracking_uri: str | None = None,
                      registered_name: str = REGISTERED_MODEL) -> None:
    """Set each metric (e.g. {"im2gps3k/geoscore": 1234.5}) as a tag of the model version."""
    client = _client(tracking_uri)
    for key, value in metrics.items():
        client.set_model_version_tag(registered_name, version, key, f"{float(value):.6g}")


def promote(version: str, tests: Sequence[str], *, tracking_uri: str | None = None,
            registered_name: str = REGISTERED_MODEL, metric: str = PROMOTION_METRIC) -> dict[str, Any]:
    """Move the `champion` alias to `version` when it beats the champion on the test sets `tests`.

    Both versions' tags `TEST/metric` are compared, averaged over the test sets that both were evaluated
    on; the version wins when its mean is higher (GeoScore: higher is better). No common test set: the
    champion stays. No champion: the version becomes it. Returns {"champion", "moved", "reason"}.
    """
    client = _client(tracking_uri)
    mine = client.get_model_version(registered_name, version).tags
    try:
        champ = client.get_model_version_by_alias(registered_name, CHAMPION)
    except Exception:  # noqa: BLE001 - no champion yet
        client.set_registered_model_alias(registered_name, CHAMPION, version)
        return {"champion": version, "moved": True, "reason": "no champion yet"}
    if str(champ.version) == str(version):
        return {"champion": version, "moved": False, "reason": "already the champion"}
    common = [t for t in tests if f"{t}/{metric}" in mine and f"{t}/{metric}" in champ.tags]
    if not common:
        reason = (f"no test set of {list(tests)} carries {metric} on both version {version} and the champion "
                  f"(version {champ.version})")
        logger.warning("champion stays at version %s: %s", champ.version, reason)
        return {"champion": str(champ.version), "moved": False, "reason": reason}
    new = sum(float(mine[f"{t}/{metric}"]) for t in common) / len(common)
    old = sum(float(champ.tags[f"{t}/{metric}"]) for t in common) / len(common)
    if new > old:
        client.set_registered_model_alias(registered_name, CHAMPION, version)
        reason = f"mean {metric} {new:.6g} > {old:.6g} (version {champ.version}) on {', '.join(common)}"
        logger.info("champion -> version %s: %s", version, reason)
        return {"champion": version, "moved": True, "reason": reason}
    reason = f"mean {metric} {new:.6g} <= {old:.6g} (version {champ.version}) on {', '.join(common)}"
    return {"champion": str(champ.version), "moved": False, "reason": reason}


def load_logged_model(model_uri: str, *, tracking_uri: str | None = None, dst: str | Path | None = None
                      ) -> GeoMethod:
    """The method (a `locdiff.model.locdiff_method.LocDiffMethod`, ready to predict) of a model logged by `log_model`:
    downloaded (to `dst`, default a temporary folder) and read from its data folder as a run folder is.
    (`locdiff.Geolocator.load(model_uri)` gives the whole predictor, encoder and place names included.)"""
    import mlflow

    if dst is not None:
        mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst))
        folder, keep = pyfunc.resolve_model(local)
    else:
        folder, keep = pyfunc.resolve_model(model_uri, tracking_uri=tracking_uri)
    cfg = read_run_config(folder)
    method = get_method(cfg.get("method", "locdiff")).load(Path(folder), cfg)
    method._download = keep  # a temporary download lives as long as the method
    return method


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
                   files: Sequence[str | Path] = (), tracking_uri: str | None = None) -> str:
    """Log one evaluation set as a nested run of the training run; return the nested run id.

    Args:
        parent_run_id: the training run.
        dataset: the evaluation set's name, the metric prefix.
        metrics: at least METRIC_NAMES (accuracies in percent, median in km, GeoScore).
        predictions: a pandas DataFrame in the predictions table format.
        plots: name -> PNG path (world map, error CDF, reliability), logged under `plots/DATASET/`.
        files: more files for the nested run (e.g. the calibration JSON), logged under `evaluation/`.
    """
    mlflow = _mlflow(tracking_uri)
    named = evaluation_metrics(dataset, metrics)
    extra = {f"{dataset}/{k}": float(v) for k, v in metrics.items()
             if k not in METRIC_NAMES and isinstance(v, int | float)}
    values = {**named, **extra}
    client = mlflow.tracking.MlflowClient()
    with _in_run(mlflow, parent_run_id):
        _log_new_metrics(mlflow, client, parent_run_id, values)
        for path in (plots or {}).values():
            mlflow.log_artifact(str(path), artifact_path=f"plots/{dataset}")
        exp = mlflow.active_run().info.experiment_id
        # logged again (a retry, or a re-run after a kill before the evaluation's metrics.json): its nested run
        earlier = [c.info.run_id for c in client.search_runs(
            [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", order_by=["attributes.start_time"])
            if c.data.tags.get("dataset") == dataset]
        with mlflow.start_run(run_id=earlier[0] if earlier else None, run_name=f"eval-{dataset}", nested=True,
                              tags={"dataset": dataset}, experiment_id=exp) as child:
            _log_new_metrics(mlflow, client, child.info.run_id, values)
            mlflow.log_param("dataset", dataset)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"predictions_{dataset}.parquet"
                predictions.to_parquet(path, index=False)
                mlflow.log_artifact(str(path), artifact_path="predictions")
            for path in (plots or {}).values():
                mlflow.log_artifact(str(path), artifact_path="plots")
            for path in files:
                mlflow.log_artifact(str(path), artifact_path="evaluation")
            return child.info.run_id


def _log_new_metrics(mlflow: Any, client: Any, run_id: str, values: Mapping[str, float]) -> None:
    """Log to the active run `run_id` the metrics it does not hold with these values yet (no duplicate
    points when an evaluation is logged again)."""
    held = client.get_run(run_id).data.metrics
    new = {k: v for k, v in values.items() if held.get(k) != v}
    if new:
        mlflow.log_metrics(new)


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
