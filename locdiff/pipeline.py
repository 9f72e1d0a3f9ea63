"""The stages of the `train-locdiff` pipeline as library functions (the Prefect flows in flows/ wrap them).

    ingest -> embed -> train (Ray Train + MLflow) -> evaluate (per test set, nested MLflow runs)

Disk layout under the storage root ROOT (local folder or s3://bucket/prefix):
- ROOT/NAME/images, ROOT/NAME/features/ENCODER: the data layer's stages (a stage is complete exactly when
  its manifest.json exists);
- ROOT/ray/RUN: Ray Train checkpoints;
- ROOT/runs/NAME (./runs/NAME for a remote root): the run folder (locdiff.runs: `locdiff predict` reads
  it; run.json, written last, holds the completion key and the MLflow run id) and
  eval/DATASET/{predictions.parquet, metrics.json, *.png} (evaluation complete when metrics.json exists).
  NAME carries the completion key, so a changed override or new data is a new run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locdiff.engine import THROUGHPUT_METRICS

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
MLFLOW_RECORD = "mlflow.json"  # the run folder's MLflow run id (resumes log to the same run)


@dataclass
class DataSpec:
    """One data set of the pipeline.

    name: the folder under ROOT (ROOT/NAME/...) and the metric prefix (NAME/acc_1km ...).
    source: the data set config (configs/datasets/SOURCE.yaml): im2gps3k, yfcc4k, mp16, folder,
        embeddings, ...; defaults to name.
    path: --source PATH_OR_URL for sources that need one (folder, embeddings, gws15k).
    encoder: the image encoder for the embed stage (ignored for precomputed embeddings).
    limit: only the first N metadata rows.
    """

    name: str
    source: str | None = None
    path: str | None = None
    encoder: str = "clip-vit-l14"
    limit: int | None = None

    @classmethod
    def parse(cls, obj: Any) -> DataSpec:
        if isinstance(obj, DataSpec):
            return obj
        if hasattr(obj, "model_dump"):
            obj = obj.model_dump()
        if isinstance(obj, str):
            return cls(name=obj)
        if not isinstance(obj, dict) or "name" not in obj:
            raise ValueError(f"a data set must be a name or a mapping with 'name'; got {obj!r}")
        unknown = set(obj) - {"name", "source", "path", "encoder", "limit"}
        if unknown:
            raise ValueError(f"data set {obj.get('name')!r}: unknown key(s) {sorted(unknown)}; valid: "
                             "name, source, path, encoder, limit")
        return cls(**obj)

    @property
    def config_name(self) -> str:
        return self.source or self.name

    def dataset_config(self):
        from locdiff.data.config import load_dataset_config

        return load_dataset_config(self.config_name)

    def features_encoder(self) -> str:
        """The features folder name: the source's own encoder for precomputed embeddings."""
        cfg = self.dataset_config()
        if cfg.source == "embeddings":
            return cfg.encoder
        from locdiff.data.config import encoder_folder_name

        return encoder_folder_name(self.encoder)


def model_config_path(name: str) -> Path:
    """configs/model/NAME.yaml as shipped with the package (or a YAML path); ValueError listing the known
    names otherwise (`locdiff.resources`, which `locdiff train --config` uses too)."""
    from locdiff.resources import model_config_path as packaged

    return packaged(name)


def resolve_config(name: str, *, degree: int | None = None, overrides: list[str] | None = None):
    """The typed model config of configs/model/NAME.yaml with `shdd.degree` and `--set`-style overrides."""
    from locdiff.model.config import load_config

    sets = list(overrides or [])
    if degree is not None:
        sets.append(f"shdd.degree={int(degree)}")
    return load_config(model_config_path(name), overrides=sets)


def check_root(root: str) -> None:
    """Fail early, naming the fix, when a local storage root cannot be created or written."""
    if "://" in str(root):
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


# ---- data stages -----------------------------------------------------------------------------------

def features_dir(spec: DataSpec, root: str) -> str:
    from locdiff.data.shards import stage_dir

    return stage_dir(root, spec.name, "features", spec.features_encoder())


def stage_complete(stage: str, spec: DataSpec, root: str) -> bool:
    """Whether the ingest ("images") or embed ("features") stage of spec has its manifest."""
    from locdiff.data.manifest import read_manifest
    from locdiff.data.shards import stage_dir

    if stage == "ingest":
        if spec.dataset_config().source == "embeddings":  # precomputed: ingest writes the features
            return read_manifest(features_dir(spec, root)) is not None
        return read_manifest(stage_dir(root, spec.name, "images")) is not None
    if stage == "embed":
        return read_manifest(features_dir(spec, root)) is not None
    raise ValueError(f"unknown stage {stage!r}")


def ingest(spec: DataSpec, root: str) -> dict[str, Any]:
    """Run the data layer's ingest of spec into ROOT/NAME; returns the manifest."""
    from locdiff.data.ingest import ingest as data_ingest

    return data_ingest(spec.name, root, source=spec.path, limit=spec.limit, config=spec.dataset_config(),
                       progress=False)


def embed(spec: DataSpec, root: str, degree: int | None = None, runner: str = "auto") -> dict[str, Any]:
    """Run the data layer's embed stage (no-op for precomputed embeddings); returns the manifest.

    runner: "auto", "local" or "ray" (see `locdiff.data.featurize.embed`)."""
    from locdiff.data.manifest import require_manifest

    if spec.dataset_config().source == "embeddings":
        return require_manifest(features_dir(spec, root), "ingest")
    from locdiff.data.featurize import embed as data_embed

    return data_embed(spec.name, root, spec.encoder, degree=degree, runner=runner, progress=False)


# ---- training ----------------------------------------------------------------------------------------

def run_name(config_name: str, train_name: str, degree: int, key: str | None = None) -> str:
    """The run's name: config, data and degree, plus the first digits of the completion key (config and
    data identities): the same parameters give the same run (skipped when complete), any change another."""
    base = f"{Path(config_name).stem}-{train_name}-L{degree}"
    return f"{base}-{key[:10]}" if key else base


def timestamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")


def run_dir_for(root: str, name: str) -> str:
    """ROOT/runs/NAME for a local root; ./runs/NAME when the root is remote (the run folder is local)."""
    if "://" in str(root):
        return str(Path("runs") / name)
    return str(Path(root).expanduser().resolve() / "runs" / name)


def plan_run(config_name: str, train_spec: DataSpec, root: str, *, val_spec: DataSpec | None = None,
             degree: int | None = None, overrides: list[str] | None = None) -> str:
    """The run folder of a training: ROOT/runs/NAME with NAME from `run_name` and the completion key."""
    from locdiff.methods import prepare_data
    from locdiff.model.config import config_to_dict
    from locdiff.runs import completion_key

    config = resolve_config(config_name, degree=degree, overrides=overrides)
    source, val = prepare_data(features_dir(train_spec, root),
                               features_dir(val_spec, root) if val_spec else None,
                               val_share=config.train.val_share, seed=config.train.seed)
    key = completion_key(config_to_dict(config), {"train": source.identity(),
                                                  "val": val.identity() if val is not None else None})
    return run_dir_for(root, run_name(config_name, train_spec.name, config.shdd.degree, key))


def preflight(config_name: str, root: str, *, degree: int | None = None, overrides: list[str] | None = None,
              tracking_uri: str | None = None):
    """Check what the pipeline needs before any work: the config, the storage root, the MLflow store.

    Returns the resolved model config. Raises ValueError (unknown config, bad override),
    PermissionError (root not writable) or TrackingUnavailable (MLflow server down), each saying what
    to fix.
    """
    from locdiff import tracking

    config = resolve_config(config_name, degree=degree, overrides=overrides)
    tracking.check_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    check_root(root)  # last: it creates the root
    return config


def training_record(run_dir: str | Path, *, tracking_uri: str | None = None,
                    check_tracking: bool = False) -> dict[str, Any] | None:
    """The completed training's record (run.json with its MLflow run), or None. With check_tracking, also
    None when the MLflow store does not hold the run (a new store: train again to log it there)."""
    from locdiff.runs import RunFolder

    record = RunFolder(run_dir).record()
    if record is None or not record.get("complete") or not record.get("mlflow_run_id"):
        return None
    if check_tracking:
        from locdiff.tracking import find_run

        if find_run(record.get("mlflow_run_id"), tracking_uri=tracking_uri) is None:
            log.warning("%s: MLflow run %s is not in the tracking store; training is logged again",
                        run_dir, record.get("mlflow_run_id"))
            return None
    return record


def train(config_name: str, train_spec: DataSpec, root: str, run_dir: str | Path, *,
          degree: int | None = None, overrides: list[str] | None = None, num_workers: int = 2,
          gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, tracking_uri: str | None = None,
          fault_kill_at_step: int | None = None, val_spec: DataSpec | None = None) -> dict[str, Any]:
    """Train on Ray (num_workers > 0) or in this process, with MLflow tracking; returns the record.

    The run folder's completion key (config and data) decides: complete -> nothing to do; a checkpoint ->
    resumed (same run folder, same Ray run, same MLflow run). run.json (with the MLflow run id) is written
    last. Without `val_spec` a share of the training rows is held out for validation.
    """
    from locdiff import tracking
    from locdiff.distributed import RayTrainSettings
    from locdiff.model.config import config_to_dict
    from locdiff.runs import RunFolder
    from locdiff.training import train_run

    config = resolve_config(config_name, degree=degree, overrides=overrides)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    check_root(root)
    run = RunFolder(run_dir)
    run.create()
    data = features_dir(train_spec, root)
    val = features_dir(val_spec, root) if val_spec else None
    ids = run.read_json(MLFLOW_RECORD, default={"run_id": None}) if run.file(MLFLOW_RECORD).exists() else {}
    previous = ids.get("run_id")
    if tracking.find_run(previous, tracking_uri=uri) is None:
        previous = None  # not in this store (a new one): a new MLflow run
    full = {**config_to_dict(config), "pipeline": {"config_name": config_name, "train": train_spec.name,
                                                   "val": val_spec.name if val_spec else None,
                                                   "root": str(root), "num_workers": num_workers,
                                                   "gpus_per_worker": gpus_per_worker}}
    with tracking.training_run(full, tracking_uri=uri, run_name=run.path.name, run_id=previous,
                               tags={"train_data": train_spec.name, "config": config_name}) as run_id:
        run.write_json(MLFLOW_RECORD, {"run_id": run_id})
        settings = RayTrainSettings(num_workers=max(1, num_workers), gpus_per_worker=gpus_per_worker,
                                    cpus_per_worker=cpus_per_worker, storage_root=_join(root, "ray"),
                                    run_name=run.path.name, tracking_uri=uri, mlflow_run_id=run_id,
                                    fault_kill_at_step=fault_kill_at_step)
        outcome = train_run(config, data, run.path, val=val, workers=num_workers, ray_settings=settings,
                            progress=False)
        if outcome.ray is None:  # trained here (or finished earlier): log the per-step history
            _log_history(run_id, run.path, uri)
        # the training throughput (samples/s over training steps, peak GPU memory, MFU), Ray or not
        speed = {k: v for k, v in (outcome.record.get("metrics") or {}).items() if k in THROUGHPUT_METRICS}
        if speed and not outcome.skipped:
            tracking.log_step_metrics(run_id, [{"step": int(outcome.record.get("step", 0)), **speed}],
                                      tracking_uri=uri)
        tracking.log_checkpoint(run_id, run.path, tracking_uri=uri)
        # LocDiff runs become the registered pyfunc model (locdiff.inference.pyfunc); baselines are logged
        # as their run folder files only
        logged = (tracking.log_model(run_id, run.path, tracking_uri=uri) if config.method == "locdiff"
                  else {"model_uri": None, "version": None})
        record = {**outcome.record, "mlflow_run_id": run_id, "run_dir": str(run.path),
                  "model_uri": logged["model_uri"], "model_version": logged["version"]}
    run.write_record(record)
    return record


def _log_history(run_id: str, run_dir: Path, uri: str) -> None:
    """Log the run folder's per-step loss and lr to an MLflow run that does not have them yet."""
    from locdiff import tracking
    from locdiff.runs import RunFolder

    found = tracking.find_run(run_id, tracking_uri=uri) or {}
    if found.get("metrics", {}).get("loss") is not None:
        return
    rows = RunFolder(run_dir).read_metrics()
    tracking.log_step_metrics(run_id, [{k: r[k] for k in ("step", "loss", "lr") if k in r} for r in rows
                                       if "loss" in r], tracking_uri=uri)


def _join(root: str, *parts: str) -> str:
    from locdiff.data.storage import join

    return join(str(root), *parts)


# ---- evaluation ----------------------------------------------------------------------------------------

def evaluation_done(run_dir: str | Path, dataset: str, *, tracking_uri: str | None = None
                    ) -> dict[str, Any] | None:
    """The metrics of a finished evaluation (RUN/eval/NAME/metrics.json) that the training's MLflow
    run also holds; None otherwise."""
    from locdiff.runs import RunFolder

    run = RunFolder(run_dir)
    name = f"eval/{dataset}/metrics.json"
    if not run.file(name).exists():
        return None
    from locdiff.tracking import find_run

    record = training_record(run_dir) or {}
    found = find_run(record.get("mlflow_run_id"), tracking_uri=tracking_uri)
    if found is None or f"{dataset}/acc_1km" not in found["metrics"]:
        return None
    return run.read_json(name)


def evaluate(run_dir: str | Path, spec: DataSpec, root: str, *, tracking_uri: str | None = None,
             predict_options: dict[str, Any] | None = None) -> dict[str, float]:
    """Predict the test set, compute the metrics, draw the plots and log a nested MLflow run.

    Writes RUN/eval/NAME/{predictions.parquet, worldmap.png, error_cdf.png, reliability.png,
    calibration.json} and metrics.json last. The metrics include `ece`, the expected calibration error of
    the confidence (the probability of lying within the run's confidence radius); the registered model
    version of the run gets the metrics as tags.
    """
    import pandas as pd

    from locdiff import tracking
    from locdiff.data.stream import read_table
    from locdiff.io import write_predictions
    from locdiff.methods import get_method
    from locdiff.metrics import geo_metrics
    from locdiff.runs import RunFolder, check_data_encoder

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
    table = read_table(data)
    if not table.labelled:
        raise ValueError(f"{table.source}: evaluation needs lat/lon")
    pred = method.predict(table, **(predict_options or {}))
    metrics = geo_metrics(pred.lat, pred.lon, table.lat, table.lon)
    radius = float(getattr(method, "confidence_radius_km", 0.0) or 0.0)
    out = run.file(f"eval/{spec.name}")
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.get("method", "locdiff")
    write_predictions(out / "predictions.parquet", table.ids, table.lat, table.lon, pred.lat, pred.lon,
                      method=name, confidence=pred.confidence)
    df = pd.DataFrame({"id": table.ids.astype(str), "lat": table.lat, "lon": table.lon,
                       "pred_lat": pred.lat, "pred_lon": pred.lon, "method": name})
    if pred.confidence is not None:
        df["confidence"] = pred.confidence
    plots = draw_plots(df, out, title=f"{run.path.name} on {spec.name}")
    files = []
    if pred.confidence is not None and radius > 0:
        from locdiff import plots as plotting
        from locdiff.calibration import reliability
        from locdiff.metrics import distances_km

        hit = distances_km(pred.lat, pred.lon, table.lat, table.lon) <= radius
        rel = reliability(pred.confidence, hit)
        metrics["ece"] = rel["ece"]
        metrics["confidence_radius_km"] = radius
        run.write_json(f"eval/{spec.name}/calibration.json", {"radius_km": radius, **rel})
        files.append(run.file(f"eval/{spec.name}/calibration.json"))
        plots["reliability"] = plotting.reliability_plot(
            out / "reliability.png", rel, title=f"{run.path.name} on {spec.name}: within {radius:g} km")
    tracking.log_evaluation(record["mlflow_run_id"], spec.name, metrics, df, plots=plots, files=files,
                            tracking_uri=uri)
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
    from locdiff import tracking

    record = training_record(run_dir) or {}
    if not record.get("model_version"):
        log.warning("%s: no registered model version (not a LocDiff run, or logged by an older version); "
                    "champion unchanged", run_dir)
        return None
    return tracking.promote(record["model_version"], tests, tracking_uri=tracking_uri)


def draw_plots(df: Any, out: Path, *, title: str = "") -> dict[str, Path]:
    """World map of predictions against truths and the error CDF, as PNGs in out."""
    from locdiff import plots
    from locdiff.metrics import distances_km

    paths = {"worldmap": out / "worldmap.png", "error_cdf": out / "error_cdf.png"}
    plots.world_map(paths["worldmap"], df["pred_lat"], df["pred_lon"], df["lat"], df["lon"], title=title)
    dist = distances_km(df["pred_lat"], df["pred_lon"], df["lat"], df["lon"])
    plots.error_cdf(paths["error_cdf"], {str(df["method"].iloc[0]) if len(df) else "model": dist},
                    title=title)
    return paths


def accuracy_markdown(results: dict[str, dict[str, float]], *, title: str = "") -> str:
    """The accuracy table (percent with two decimals, median km, GeoScore) as Markdown."""
    from locdiff.tracking import THRESHOLDS_KM

    head = ["data set", "n"] + [f"{t} km" for t in THRESHOLDS_KM] + ["median km", "GeoScore"]
    lines = [f"### {title}" if title else "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for name, m in results.items():
        cells = [name, str(int(m.get("n", 0)))] + [f"{m[f'acc_{t}km']:.2f} %" for t in THRESHOLDS_KM]
        cells += [f"{m['median_km']:,.0f}", f"{m['geoscore']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line) + "\n"
