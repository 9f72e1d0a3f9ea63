"""The stages of the `train-locdiff` pipeline as functions (the Prefect flows in flows/ wrap them).

    ingest -> embed -> train (Ray Train + MLflow) -> evaluate (per test set, nested MLflow runs) -> promote

Disk layout under the storage root ROOT (local folder or s3://bucket/prefix):
- ROOT/NAME/images, ROOT/NAME/features/ENCODER: the data layer's stages (a stage is complete exactly when
  its manifest.json exists);
- ROOT/ray/RUN: Ray Train checkpoints;
- ROOT/runs/NAME (./runs/NAME for a remote root): the run folder (locdiff.runs: `locdiff predict` reads
  it; run.json, written last, holds the completion key and the MLflow run id) and
  eval/DATASET/{predictions.parquet, metrics.json, *.png} (evaluation complete when metrics.json exists).
  NAME carries the completion key, so a changed override or new data is a new run.

A training is planned once (`plan`: the config resolved, the data identified, the completion key and the
run folder, one `RunSpec`) and trained from that spec (`run_training`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from locdiff import tracking
from locdiff.data.featurize import embed as data_embed
from locdiff.data.ingest import ingest as data_ingest
from locdiff.data.manifest import read_manifest, require_manifest
from locdiff.data.shards import stage_dir
from locdiff.data.storage import check_writable, is_remote, join
from locdiff.data.stream import read_table
from locdiff.errors import UserError, describe
from locdiff.evaluation import evaluate_table
from locdiff.methods import get_method
from locdiff.model.config import Config
from locdiff.orchestration.ray_train import RayTrainSettings
from locdiff.orchestration.spec import DataSet, RunSpec, resolve_config
from locdiff.runs import RunFolder, check_data_encoder
from locdiff.throughput import THROUGHPUT_METRICS
from locdiff.training import check_devices
from locdiff.training import run as train_run

log = logging.getLogger(__name__)

MLFLOW_RECORD = "mlflow.json"  # the run folder's MLflow run id (resumes log to the same run)


def check_root(root: str) -> None:
    """Fail early, naming the fix, when the storage root cannot be created or written: a local folder, or
    an s3:// root without credentials, endpoint, bucket or access (`storage.check_writable`: the data stages
    would fail on their first write, naming neither the path nor the parameter)."""
    if is_remote(root):
        try:
            check_writable(root, "root", folder=True)
        except UserError:  # one line already (a URL that carries credentials: never repeated)
            raise
        except Exception as err:  # noqa: BLE001 - reported as one line; nothing has been written
            text = describe(err)
            text = text.removeprefix(f"{root}: ")  # named once
            raise UserError(f"storage root {root}: {text} (the `root` parameter)") from None
        return
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"storage root {path}: cannot create it ({err.strerror}); pass a writable "
                              "root (the `root` parameter) or fix the folder's permissions") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"storage root {path} is not writable; pass a writable root (the `root` "
                              "parameter) or fix the folder's permissions")


def preflight(config_name: str, root: str, *, degree: int | None = None, overrides: list[str] | None = None,
              tracking_uri: str | None = None, num_workers: int = 0, gpus_per_worker: float = 0.0) -> Config:
    """Check what the pipeline needs before any work: the config, the GPU request, the storage root, the
    MLflow store.

    Returns the resolved model config (hand it to `plan`). Raises ValueError (unknown config, bad
    override, `num_workers` or `gpus_per_worker` out of bounds), UserError (a device that does not exist:
    `training.check_devices`), PermissionError (root not writable) or TrackingUnavailable (MLflow server
    down), each saying what to fix.
    """
    config = resolve_config(config_name, degree=degree, overrides=overrides)
    check_devices(config, num_workers, gpus_per_worker)  # bounds and devices, not after hours of embedding
    tracking.check_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    check_root(root)  # last: it creates the root (or writes and removes an object in an s3:// one)
    return config


# ---- data stages -----------------------------------------------------------------------------------

def features_dir(spec: DataSet, root: str) -> str:
    return stage_dir(root, spec.name, "features", spec.features_encoder())


def stage_complete(stage: str, spec: DataSet, root: str) -> bool:
    """Whether the ingest ("images") or embed ("features") stage of spec has its manifest."""
    if stage == "ingest":
        if spec.dataset_config().source == "embeddings":  # precomputed: ingest writes the features
            return read_manifest(features_dir(spec, root)) is not None
        return read_manifest(stage_dir(root, spec.name, "images")) is not None
    if stage == "embed":
        return read_manifest(features_dir(spec, root)) is not None
    raise ValueError(f"unknown stage {stage!r}")


def ingest(spec: DataSet, root: str) -> dict[str, Any]:
    """Run the data layer's ingest of spec into ROOT/NAME; returns the manifest."""
    return data_ingest(spec.name, root, source=spec.path, limit=spec.limit, config=spec.dataset_config(),
                       progress=False)


def embed(spec: DataSet, root: str, degree: int | None = None, runner: str = "auto") -> dict[str, Any]:
    """Run the data layer's embed stage (no-op for precomputed embeddings); returns the manifest.

    runner: "auto", "local" or "ray" (see `locdiff.data.featurize.embed`)."""
    if spec.dataset_config().source == "embeddings":
        return require_manifest(features_dir(spec, root), "ingest")
    return data_embed(spec.name, root, spec.encoder, degree=degree, runner=runner, progress=False)


# ---- training ----------------------------------------------------------------------------------------

def run_name(config_name: str, train_name: str, degree: int, key: str | None = None) -> str:
    """The run's name: config, data and degree, plus the first digits of the completion key (config and
    data identities): the same parameters give the same run (skipped when complete), any change another."""
    base = f"{Path(config_name).stem}-{train_name}-L{degree}"
    return f"{base}-{key[:10]}" if key else base


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def run_dir_for(root: str, name: str) -> str:
    """ROOT/runs/NAME for a local root; ./runs/NAME when the root is remote (the run folder is local)."""
    if "://" in str(root):
        return str(Path("runs") / name)
    return str(Path(root).expanduser().resolve() / "runs" / name)


def plan(config_name: str, train_spec: DataSet, root: str, *, val_spec: DataSet | None = None,
         val_unseen_spec: DataSet | None = None, degree: int | None = None, overrides: list[str] | None = None,
         config: Config | None = None, run_dir: str | Path | None = None) -> RunSpec:
    """The one description of a pipeline training: the config (`config` when `preflight` resolved it
    already), the embedded data sets, the completion key and the run folder (`run_dir`, default
    ROOT/runs/NAME with NAME from `run_name`)."""
    config = config or resolve_config(config_name, degree=degree, overrides=overrides)
    spec = RunSpec.build(config, features_dir(train_spec, root),
                         val=features_dir(val_spec, root) if val_spec else None,
                         val_unseen=features_dir(val_unseen_spec, root) if val_unseen_spec else None,
                         config_name=config_name,
                         names={"train": train_spec.name, "val": val_spec.name if val_spec else None,
                                "val_unseen": val_unseen_spec.name if val_unseen_spec else None})
    if run_dir is None:
        run_dir = run_dir_for(root, run_name(config_name, train_spec.name, config.shdd.degree, spec.key))
    return spec.at(run_dir)


def plan_run(config_name: str, train_spec: DataSet, root: str, *, val_spec: DataSet | None = None,
             degree: int | None = None, overrides: list[str] | None = None) -> str:
    """The run folder of a training: ROOT/runs/NAME with NAME from `run_name` and the completion key."""
    return str(plan(config_name, train_spec, root, val_spec=val_spec, degree=degree, overrides=overrides).run_dir)


def training_record(run_dir: str | Path, *, tracking_uri: str | None = None,
                    check_tracking: bool = False) -> dict[str, Any] | None:
    """The completed training's record (run.json with its MLflow run), or None. With check_tracking, also
    None when the MLflow store does not hold the run (a new store: train again to log it there)."""
    record = RunFolder(run_dir).record()
    if record is None or not record.get("complete") or not record.get("mlflow_run_id"):
        return None
    if check_tracking and tracking.find_run(record.get("mlflow_run_id"), tracking_uri=tracking_uri) is None:
        log.warning("%s: MLflow run %s is not in the tracking store; training is logged again",
                    run_dir, record.get("mlflow_run_id"))
        return None
    return record


def run_training(spec: RunSpec, root: str, *, num_workers: int = 2, gpus_per_worker: float = 0.0,
               cpus_per_worker: float = 1.0, tracking_uri: str | None = None) -> dict[str, Any]:
    """Train the run `spec` on Ray (num_workers > 0) or in this process, with MLflow tracking; returns the
    record.

    The run folder's completion key decides: complete -> nothing to do; a checkpoint -> resumed (same run
    folder, same Ray run, same MLflow run). run.json (with the MLflow run id) is written last.
    """
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    check_root(root)
    run = RunFolder(spec.run_dir)
    run.create()
    ids = run.read_json(MLFLOW_RECORD, default={"run_id": None}) if run.file(MLFLOW_RECORD).exists() else {}
    previous = ids.get("run_id")
    if tracking.find_run(previous, tracking_uri=uri) is None:
        previous = None  # not in this store (a new one): a new MLflow run
    names = spec.names
    full = {**spec.resolved, "pipeline": {"config_name": spec.config_name, "train": names.get("train"),
                                          "val": names.get("val"), "root": str(root), "num_workers": num_workers,
                                          "gpus_per_worker": gpus_per_worker}}
    if names.get("val_unseen"):  # only then: the params of runs without it stay as they were
        full["pipeline"]["val_unseen"] = names["val_unseen"]
    inference = spec.config.predict.inference  # "one-step" where it is one (issue 19)
    with tracking.training_run(full, tracking_uri=uri, run_name=f"{run.path.name} {inference}", run_id=previous,
                               tags={"train_data": str(names.get("train")), "config": spec.config_name,
                                     "inference": inference}) as run_id:
        run.write_json(MLFLOW_RECORD, {"run_id": run_id})
        settings = RayTrainSettings(num_workers=max(1, num_workers), gpus_per_worker=gpus_per_worker,
                                    cpus_per_worker=cpus_per_worker, storage_root=join(str(root), "ray"),
                                    run_name=run.path.name, tracking_uri=uri, mlflow_run_id=run_id)
        outcome = train_run(spec, workers=num_workers, ray_settings=settings, progress=False)
        if previous is not None and not outcome.skipped:  # resumed: the params keep the first run's counts
            tracking.tag_resume(run_id, {"workers": num_workers, "gpus_per_worker": gpus_per_worker},
                                tracking_uri=uri)
        if outcome.ray is None:  # trained here (or finished earlier): log the per-step history
            _log_history(run_id, run.path, uri)
        # the training throughput (samples/s over training steps, peak GPU memory, MFU), Ray or not
        # (not again when the run holds it: a re-run after a kill before run.json finalizes the same training)
        speed = {k: v for k, v in (outcome.record.get("metrics") or {}).items() if k in THROUGHPUT_METRICS}
        if speed and not outcome.skipped:
            held = (tracking.find_run(run_id, tracking_uri=uri) or {}).get("metrics", {})
            if speed := {k: v for k, v in speed.items() if held.get(k) != v}:
                tracking.log_step_metrics(run_id, [{"step": int(outcome.record.get("step", 0)), **speed}],
                                          tracking_uri=uri)
        tracking.log_checkpoint(run_id, run.path, tracking_uri=uri)
        # LocDiff runs become the registered pyfunc model (locdiff.inference.pyfunc); baselines are logged
        # as their run folder files only
        logged = (tracking.log_model(run_id, run.path, tracking_uri=uri, key=outcome.record.get("key"))
                  if spec.config.method == "locdiff"
                  else {"model_uri": None, "version": None})
        record = {**outcome.record, "mlflow_run_id": run_id, "run_dir": str(run.path),
                  "model_uri": logged["model_uri"], "model_version": logged["version"]}
    run.write_record(record)
    return record


def train(config_name: str, train_spec: DataSet, root: str, run_dir: str | Path, *,
          degree: int | None = None, overrides: list[str] | None = None, num_workers: int = 2,
          gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, tracking_uri: str | None = None,
          val_spec: DataSet | None = None, val_unseen_spec: DataSet | None = None) -> dict[str, Any]:
    """Train `config_name` on the embedded data set `train_spec` into `run_dir` (`run_training` of the
    `plan`); without `val_spec` a share of the training rows is held out for validation, and
    `val_unseen_spec` (rows from regions absent from the training data) goes to LocDiff-H's fit."""
    spec = plan(config_name, train_spec, root, val_spec=val_spec, val_unseen_spec=val_unseen_spec,
                degree=degree, overrides=overrides, run_dir=run_dir)
    return run_training(spec, root, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                        cpus_per_worker=cpus_per_worker, tracking_uri=tracking_uri)


def _log_history(run_id: str, run_dir: Path, uri: str) -> None:
    """Log the run folder's per-step loss and lr that the MLflow run does not hold yet (all of them, or the
    rest of a history that a kill interrupted)."""
    held = {k: tracking.logged_steps(run_id, k, tracking_uri=uri) for k in ("loss", "lr")}
    rows = [{"step": r["step"], **{k: r[k] for k in held if k in r and r["step"] not in held[k]}}
            for r in RunFolder(run_dir).read_metrics() if "loss" in r]
    tracking.log_step_metrics(run_id, [r for r in rows if len(r) > 1], tracking_uri=uri)


# ---- evaluation ----------------------------------------------------------------------------------------

def evaluation_done(run_dir: str | Path, dataset: str, *, tracking_uri: str | None = None
                    ) -> dict[str, Any] | None:
    """The metrics of a finished evaluation (RUN/eval/NAME/metrics.json) that the training's MLflow
    run also holds; None otherwise."""
    run = RunFolder(run_dir)
    name = f"eval/{dataset}/metrics.json"
    if not run.file(name).exists():
        return None
    record = training_record(run_dir) or {}
    found = tracking.find_run(record.get("mlflow_run_id"), tracking_uri=tracking_uri)
    if found is None or f"{dataset}/acc_1km" not in found["metrics"]:
        return None
    return run.read_json(name)


def evaluate(run_dir: str | Path, spec: DataSet, root: str, *, tracking_uri: str | None = None,
             predict_options: dict[str, Any] | None = None) -> dict[str, float]:
    """Predict the test set, compute the metrics, draw the plots and log a nested MLflow run.

    Writes RUN/eval/NAME/{predictions.parquet, worldmap.png, error_cdf.png, reliability.png,
    calibration.json} (locdiff.evaluation) and metrics.json last. The registered model version of the
    run gets the metrics as tags.
    """
    run = RunFolder(run_dir)
    record = training_record(run_dir)
    if record is None:
        raise FileNotFoundError(f"{run_dir}: training has not finished (no complete run.json); run the train "
                                "stage first")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    cfg = run.read_config()
    method = get_method(cfg.get("method", "locdiff")).load(run.path, cfg)
    data = features_dir(spec, root)
    check_data_encoder(run, data)
    result = evaluate_table(method, read_table(data), run.file(f"eval/{spec.name}"),
                            name=cfg.get("method", "locdiff"), title=f"{run.path.name} on {spec.name}",
                            predict_options=predict_options)
    metrics = result.metrics
    tracking.log_evaluation(record["mlflow_run_id"], spec.name, metrics, result.predictions, plots=result.plots,
                            files=result.files, tracking_uri=uri)
    if record.get("model_version"):
        tags = tracking.evaluation_metrics(spec.name, metrics)
        if "ece" in metrics:
            tags[f"{spec.name}/ece"] = metrics["ece"]
        tracking.tag_model_version(record["model_version"], tags, tracking_uri=uri)
    run.write_json(f"eval/{spec.name}/metrics.json", metrics)
    return metrics


def promote(run_dir: str | Path, tests: list[str], *, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """Move the registry's `champion` alias to this run's model version when it beats the champion on
    the test sets `tests` (locdiff.tracking.promote); None when the run has no registered version."""
    record = training_record(run_dir) or {}
    if not record.get("model_version"):
        log.warning("%s: no registered model version (not a LocDiff run, or logged by an older version); "
                    "champion unchanged", run_dir)
        return None
    return tracking.promote(record["model_version"], tests, tracking_uri=tracking_uri)
