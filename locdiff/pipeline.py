"""The stages of the `train-locdiff` pipeline as library functions (the Prefect flows in flows/ wrap them).

    ingest -> embed -> train (Ray Train + MLflow) -> evaluate (per test set, nested MLflow runs)

Disk layout under the storage root ROOT (local folder or s3://bucket/prefix):
- ROOT/NAME/images, ROOT/NAME/features/ENCODER: the data layer's stages (a stage is complete exactly when
  its manifest.json exists);
- ROOT/ray/RUN: Ray Train checkpoints;
- runs/RUN (local, next to the process): the run folder `locdiff predict` reads (checkpoint.pt,
  config.yaml, metrics.jsonl), `train.json` (written last: the training stage is complete) and
  eval/DATASET/{predictions.parquet, metrics.json, *.png} (evaluation complete when metrics.json exists).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TRAIN_RECORD = "train.json"


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
    """configs/model/NAME.yaml (or a YAML path); ValueError listing the known names otherwise."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = REPO / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
        raise ValueError(f"unknown model config {name!r}: no file {path}; known configs: "
                         f"{', '.join(known) or '(none)'}")
    return path


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

def run_name(config_name: str, train_name: str, degree: int, resume: bool) -> str:
    """The run's name: stable (config, data, degree) when resuming, else with a time stamp."""
    base = f"{Path(config_name).stem}-{train_name}-L{degree}"
    return base if resume else f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir_for(root: str, name: str) -> str:
    """ROOT/runs/NAME for a local root; ./runs/NAME when the root is remote (the run folder is local)."""
    if "://" in str(root):
        return str(Path("runs") / name)
    return str(Path(root).expanduser().resolve() / "runs" / name)


def preflight(config_name: str, root: str, *, degree: int | None = None, overrides: list[str] | None = None,
              tracking_uri: str | None = None):
    """Check what the pipeline needs before any work: the config, the storage root, the MLflow store.

    Returns the resolved model config. Raises ValueError (unknown config, bad override),
    PermissionError (root not writable) or TrackingUnavailable (MLflow server down), each saying what
    to fix.
    """
    from locdiff import tracking

    config = resolve_config(config_name, degree=degree, overrides=overrides)
    check_root(root)
    tracking.check_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    return config


def training_record(run_dir: str | Path, *, tracking_uri: str | None = None,
                    check_tracking: bool = False) -> dict[str, Any] | None:
    """The completed training's record (run_dir/train.json), or None. With check_tracking, also None
    when the MLflow store does not hold the run (a new store: train again to log it there)."""
    path = Path(run_dir) / TRAIN_RECORD
    record = json.loads(path.read_text()) if path.exists() else None
    if record is not None and check_tracking:
        from locdiff.tracking import find_run

        if find_run(record.get("mlflow_run_id"), tracking_uri=tracking_uri) is None:
            log.warning("%s: MLflow run %s is not in the tracking store; training is logged again",
                        run_dir, record.get("mlflow_run_id"))
            return None
    return record


def train(config_name: str, train_spec: DataSpec, root: str, run_dir: str | Path, *,
          degree: int | None = None, overrides: list[str] | None = None, num_workers: int = 2,
          gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, tracking_uri: str | None = None,
          fault_kill_at_step: int | None = None) -> dict[str, Any]:
    """Train on Ray with MLflow tracking and finish the run folder; returns the training record.

    Resumes an interrupted run (same run folder, same Ray run, same MLflow run). The record
    (run_dir/train.json: MLflow run id, steps, metrics, throughput) is written last.
    """
    from locdiff import tracking
    from locdiff.distributed import RayTrainResult, RayTrainSettings, train_on_ray
    from locdiff.methods import get_method
    from locdiff.model.config import config_to_dict

    config = resolve_config(config_name, degree=degree, overrides=overrides)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    check_root(root)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = features_dir(train_spec, root)
    id_file = run_dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if id_file.exists() else None
    if tracking.find_run(previous, tracking_uri=uri) is None:
        previous = None  # not in this store (a new one): a new MLflow run
    cfg_dict = config_to_dict(config)
    full = {**cfg_dict, "pipeline": {"config_name": config_name, "train": train_spec.name, "root": str(root),
                                     "num_workers": num_workers, "gpus_per_worker": gpus_per_worker}}
    with tracking.training_run(full, tracking_uri=uri, run_name=run_dir.name, run_id=previous,
                               tags={"train_data": train_spec.name, "config": config_name}) as run_id:
        id_file.write_text(run_id)
        from locdiff.data.features import load_features

        table = load_features(data)
        method = get_method(config.method).from_config(cfg_dict)
        if config.method != "locdiff":  # a baseline: trained by its own fit in this process
            final = method.fit(table, None, run_dir, progress=False)
            method.save(run_dir)
            _save_config(config, run_dir)
            tracking.log_checkpoint(run_id, run_dir, tracking_uri=uri)
            record = {"mlflow_run_id": run_id, "run_dir": str(run_dir), "step": 0, "model_uri": None,
                      "metrics": _numbers(final or {})}
            _write_json(run_dir / TRAIN_RECORD, record)
            return record
        settings = RayTrainSettings(num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                                    cpus_per_worker=cpus_per_worker,
                                    storage_root=_join(root, "ray"), run_name=run_dir.name,
                                    tracking_uri=uri, mlflow_run_id=run_id,
                                    fault_kill_at_step=fault_kill_at_step)
        from locdiff.model.train import load_checkpoint

        ckpt = load_checkpoint(run_dir) if config.method == "locdiff" else None
        if ckpt is not None and int(ckpt["step"]) >= config.train.steps:
            # Training finished earlier (the record or the MLflow run went missing): do not train again.
            log.info("%s: checkpoint at the final step %d; Ray training skipped", run_dir, ckpt["step"])
            result = RayTrainResult(run_dir=run_dir, step=int(ckpt["step"]), metrics={}, storage_path="",
                                    restored_from_step=int(ckpt["step"]), samples_per_s=0.0)
            _log_history(run_id, run_dir, uri)
        else:
            result = train_on_ray(config, data, run_dir, settings)
        # The method's own post-training steps (validation choices, the LocDiff-H gallery) on the run
        # folder: `fit` resumes from the final checkpoint, so it does not train again.
        final = method.fit(table, None, run_dir, progress=False)
        method.save(run_dir)
        tracking.log_checkpoint(run_id, run_dir, tracking_uri=uri)
        model = getattr(method, "model", None)
        model_uri = tracking.log_model(run_id, model, tracking_uri=uri) if model is not None else None
        record = {"mlflow_run_id": run_id, "run_dir": str(run_dir), "step": result.step,
                  "restored_from_step": result.restored_from_step, "samples_per_s": result.samples_per_s,
                  "ray_storage": result.storage_path, "model_uri": model_uri,
                  "metrics": _numbers({**result.metrics, **(final or {})})}
    _write_json(run_dir / TRAIN_RECORD, record)
    return record


def _log_history(run_id: str, run_dir: Path, uri: str) -> None:
    """Log run_dir/metrics.jsonl's per-step loss and lr to a new MLflow run of a finished training."""
    from locdiff import tracking

    path = run_dir / "metrics.jsonl"
    if not path.exists() or tracking.find_run(run_id, tracking_uri=uri).get("metrics", {}).get("loss"):
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tracking.log_step_metrics(run_id, [{k: r[k] for k in ("step", "loss", "lr") if k in r} for r in rows
                                       if "loss" in r], tracking_uri=uri)


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float)}


def _save_config(config: Any, run_dir: Path) -> None:
    from locdiff.model.config import save_config

    if not (run_dir / "config.yaml").exists():
        save_config(config, run_dir / "config.yaml")


def _join(root: str, *parts: str) -> str:
    from locdiff.data.storage import join

    return join(str(root), *parts)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


# ---- evaluation ----------------------------------------------------------------------------------------

def evaluation_done(run_dir: str | Path, dataset: str, *, tracking_uri: str | None = None
                    ) -> dict[str, Any] | None:
    """The metrics of a finished evaluation (run_dir/eval/NAME/metrics.json) that the training's MLflow
    run also holds; None otherwise."""
    path = Path(run_dir) / "eval" / dataset / "metrics.json"
    if not path.exists():
        return None
    from locdiff.tracking import find_run

    record = training_record(run_dir) or {}
    run = find_run(record.get("mlflow_run_id"), tracking_uri=tracking_uri)
    if run is None or f"{dataset}/acc_1km" not in run["metrics"]:
        return None
    return json.loads(path.read_text())


def evaluate(run_dir: str | Path, spec: DataSpec, root: str, *, tracking_uri: str | None = None,
             predict_options: dict[str, Any] | None = None) -> dict[str, float]:
    """Predict the test set, compute the metrics, draw the plots and log a nested MLflow run.

    Writes run_dir/eval/NAME/{predictions.parquet, worldmap.png, error_cdf.png} and metrics.json last.
    """
    import pandas as pd

    from locdiff import tracking
    from locdiff.data.features import load_features
    from locdiff.methods import get_method
    from locdiff.metrics import geo_metrics
    from locdiff.model.config import read_run_config

    run_dir = Path(run_dir)
    record = training_record(run_dir)
    if record is None:
        raise FileNotFoundError(f"{run_dir}: training has not finished (no {TRAIN_RECORD}); run the train "
                                "stage first")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_uri(uri)
    cfg = read_run_config(run_dir)
    method = get_method(cfg.get("method", "locdiff")).load(run_dir, cfg)
    table = load_features(features_dir(spec, root))
    if not table.labelled:
        raise ValueError(f"{table.source}: evaluation needs lat/lon")
    pred = method.predict(table, **(predict_options or {}))
    metrics = geo_metrics(pred.lat, pred.lon, table.lat, table.lon)
    out = run_dir / "eval" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"id": table.ids.astype(str), "lat": table.lat, "lon": table.lon,
                       "pred_lat": pred.lat, "pred_lon": pred.lon, "method": cfg.get("method", "locdiff")})
    if pred.confidence is not None:
        df["confidence"] = pred.confidence
    df.to_parquet(out / "predictions.parquet", index=False)
    plots = draw_plots(df, out, title=f"{run_dir.name} on {spec.name}")
    tracking.log_evaluation(record["mlflow_run_id"], spec.name, metrics, df, plots=plots, tracking_uri=uri)
    _write_json(out / "metrics.json", metrics)
    return metrics


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
