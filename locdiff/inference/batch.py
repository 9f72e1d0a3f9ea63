"""Locate a whole collection of unlabelled photos (the stages of the `locate-photos` flow).

    photos: a folder, an archive, a CSV URL list (column `url`) or an s3:// prefix, local or remote
    out:    where the results go; default: beside the input, PHOTOS-located (http(s) inputs need one)

    OUT/photos/images/shard-*.tar          ingest (the data layer, `coordinates: optional`)
    OUT/photos/features/ENCODER/shard-*    embed, with the model's own image encoder (float32)
    OUT/predictions/MODELKEY/shard-*.SHA.parquet   predict, one table per feature shard (and its sha256)
    OUT/predictions.parquet, OUT/map.png   the whole table (README "Formats", predictions of unlabelled
                                           data, plus place names and the top-k modes) and a world map

A photo that carries an EXIF GPS tag keeps it through the ingest (locdiff.data.exif): the table then has
exif_lat, exif_lon and exif_km (the tag's distance from the answer); a CSV given with the photos wins over
the tags, as in the ingest.

Every stage resumes: ingest and embed skip their finished shards (their manifests), and a feature
shard whose table exists for the same model and settings (MODELKEY: a hash of the model's weights,
choices and the top-k/method settings) and the same shard bytes (SHA: the start of its sha256) is not
predicted again. The run is logged to MLflow as an inference run (experiment `locdiff-inference`: params,
counts, the table and the map; no evaluation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from locdiff import runs, tracking
from locdiff.data import storage
from locdiff.data.config import MAX_SHARD_SIZE, load_dataset_config
from locdiff.data.datasource import Piece, open_source
from locdiff.data.featurize import embed as data_embed
from locdiff.data.ingest import ingest as data_ingest
from locdiff.data.shards import stage_dir
from locdiff.errors import UserError
from locdiff.inference.geolocator import Geolocator, check_top_k, with_gps_tags, write_locations
from locdiff.inference.model_uri import MODEL_FORMS, check_location, check_registered
from locdiff.plots import locations_map

log = logging.getLogger(__name__)

NAME = "photos"  # the data set name under OUT
INFERENCE_EXPERIMENT = "locdiff-inference"


@dataclass
class LocateJob:
    photos: str
    model: str
    out: str
    top_k: int = 5
    method: str = "locdiff"
    shard_size: int = 1000
    allow_private_addresses: bool = False
    stages: dict[str, Any] = field(default_factory=dict)  # what each stage did

    @property
    def table(self) -> str:
        return storage.join(self.out, "predictions.parquet")

    @property
    def map(self) -> str:
        return storage.join(self.out, "map.png")


def default_out(photos: str) -> str:
    """PHOTOS-located beside the input (a folder, archive, CSV or s3:// prefix)."""
    if photos.startswith(("http://", "https://")):
        raise UserError(f"{photos}: an http(s) input has no folder beside it; give `out` (a folder or s3:// "
                        "prefix) for the results")
    base = photos.rstrip("/")
    stem = base.rsplit("/", 1)[-1]
    if not stem or (base.startswith("s3://") and "/" not in base.removeprefix("s3://")):
        raise UserError(f"{photos}: the top of a file system or bucket has nothing beside it; give `out` for "
                        "the results")
    for ext in (".csv", ".tar", ".zip", ".tar.gz", ".tgz"):
        if stem.lower().endswith(ext):
            base = base[: len(base) - len(ext)]
            break
    return f"{base}-located"


def plan(photos: str, model: str, *, out: str | None = None, top_k: int = 5, method: str = "locdiff",
         shard_size: int = 1000, allow_private_addresses: bool = False,
         tracking_uri: str | None = None) -> LocateJob:
    """Check the parameters (nothing is written; a registry model is looked up, not downloaded) and name the
    output folder."""
    if not photos:
        raise UserError("photos: give a folder, URL list (CSV) or s3:// prefix of photos")
    check_top_k(top_k)
    if method not in ("locdiff", "locdiff-h"):
        raise UserError(f"method must be 'locdiff' or 'locdiff-h'; got {method!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise UserError(f"shard_size must be an integer in [1, {MAX_SHARD_SIZE}]; got {shard_size!r}")
    check_location(model, "model")  # a registry URI is downloaded when loaded; it must exist before the ingest
    if not model.startswith(("models:/", "runs:/")) and not Path(model).expanduser().exists():
        raise UserError(f"model {model}: no such run folder or MLflow model folder; give {MODEL_FORMS}")
    out = (out or default_out(photos)).rstrip("/")
    check_registered(model, tracking_uri)  # last: the other parameters are checked without the registry
    return LocateJob(photos=photos, model=model, out=out, top_k=top_k, method=method, shard_size=shard_size,
                     allow_private_addresses=allow_private_addresses)


def ingest(job: LocateJob) -> dict[str, Any]:
    """The data layer's ingest of the photos into OUT/photos/images (coordinates optional); resumes."""
    cfg = load_dataset_config("folder", coordinates="optional", shard_size=job.shard_size,
                              allow_private_addresses=job.allow_private_addresses or None)
    manifest = data_ingest(NAME, job.out, source=job.photos, config=cfg, progress=False)
    job.stages["ingest"] = {"count": manifest["count"], "skipped": manifest.get("skipped", {})}
    return manifest


def embed(job: LocateJob, geolocator: Geolocator) -> tuple[str, dict[str, Any]]:
    """The data layer's embed stage with the model's encoder; returns (features folder, manifest). The
    embeddings are stored in float32 (the data layer's default, float16, moved answers by tens of metres and
    modes by kilometres from those of `locdiff locate` and the API)."""
    cfg = dataclasses.replace(geolocator.encoder_config(), storage_dtype="float32")
    manifest = data_embed(NAME, job.out, cfg, degree=None, progress=False)
    job.stages["embed"] = {"count": manifest["count"], "encoder": manifest["encoder"]}
    return stage_dir(job.out, NAME, "features", cfg.name), manifest


def model_key(geolocator: Geolocator, job: LocateJob) -> str:
    """What the predictions depend on: the weights, the validation choices and the settings."""
    h = hashlib.sha256()
    for name in (runs.WEIGHTS, runs.SELECTION, runs.CONFIG):
        path = geolocator.run.file(name)
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(block)
    h.update(f"{job.method}|{job.top_k}".encode())
    return h.hexdigest()[:16]


def predict(job: LocateJob, geolocator: Geolocator, features: str, manifest: dict[str, Any]) -> list[str]:
    """One predictions table per feature shard, named by the shard's sha256 (skipped when it exists for this
    model key: a shard rewritten with other photos is predicted again); returns them."""
    runs.check_encoder(geolocator.encoder_record, manifest.get("encoder"), int(manifest["embedding"]["dim"]),
                  run=geolocator.source, data=features)
    key = model_key(geolocator, job)
    folder = storage.join(job.out, "predictions", key)
    src = open_source(features)
    by_shard: dict[str, list[Piece]] = {}
    for piece in src.pieces:
        by_shard.setdefault(piece.url, []).append(piece)
    tables, done, skipped = [], 0, 0
    for entry in manifest["shards"]:
        url = storage.join(features, entry["shard"])
        table = storage.join(folder, entry["shard"].replace(".tar", f".{entry['sha256'][:16]}.parquet"))
        tables.append(table)
        if storage.exists(table):
            skipped += 1
            continue
        rows = [src.read(p) for p in by_shard.get(url, [])]
        ids = [str(i) for r in rows for i in r.ids]
        emb = np.concatenate([r.emb for r in rows]) if rows else np.zeros((0, src.dim), np.float32)
        located = geolocator.locate_embeddings(emb, top_k=job.top_k, method=job.method, ids=ids,
                                               encoder=manifest.get("encoder")) if ids else []
        lat = np.concatenate([r.lat if r.lat is not None else np.full(len(r), np.nan) for r in rows]) \
            if rows else np.zeros(0)
        lon = np.concatenate([r.lon if r.lon is not None else np.full(len(r), np.nan) for r in rows]) \
            if rows else np.zeros(0)
        located = with_gps_tags(located, lat, lon)
        tmp = os.path.join(storage.local_tmp_dir(job.out), f"{entry['shard']}.{os.getpid()}.parquet")
        write_locations(tmp, located, job.top_k)
        storage.put_file_atomic(tmp, table)
        done += 1
    job.stages["predict"] = {"shards": len(tables), "predicted": done, "skipped": skipped, "model_key": key,
                             "confidence_radius_km": geolocator.radius_km}
    return tables


def write_outputs(job: LocateJob, tables: list[str]) -> dict[str, Any]:
    """OUT/predictions.parquet (all shards, in order) and OUT/map.png; returns counts."""
    frames = []
    for t in tables:
        with storage.open_file(t) as f:
            frames.append(pd.read_parquet(io.BytesIO(f.read())))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes_atomic(job.table, buf.getvalue())
    tmp = os.path.join(storage.local_tmp_dir(job.out), f"map.{os.getpid()}.png")
    if len(df):
        locations_map(tmp, df["pred_lat"], df["pred_lon"], [str(i).rsplit("/", 1)[-1] for i in df["id"]],
                      title=f"{len(df)} photos of {job.photos}")
    else:
        locations_map(tmp, [], [], title=f"no photos in {job.photos}")
    storage.put_file_atomic(tmp, job.map)
    summary = {"located": int(len(df)),
               "mean_confidence": float(df["confidence"].mean()) if len(df) else float("nan")}
    job.stages["outputs"] = summary
    return summary


def log_inference(job: LocateJob, *, seconds: float, tracking_uri: str | None = None) -> str:
    """An MLflow run in the `locdiff-inference` experiment: params, counts, the table and the map."""
    mlflow = tracking._mlflow(tracking_uri)
    exp = tracking.experiment_id(mlflow, INFERENCE_EXPERIMENT, tracking.resolve_tracking_uri(tracking_uri))
    params = {"photos": job.photos, "model": job.model, "out": job.out, "top_k": job.top_k,
              "method": job.method, "shard_size": job.shard_size, "model_key": job.stages["predict"]["model_key"],
              "confidence_radius_km": job.stages["predict"]["confidence_radius_km"]}
    with mlflow.start_run(run_name=f"locate-{job.out.rsplit('/', 1)[-1]}", experiment_id=exp,
                          tags={"locdiff.kind": "inference"}) as run:
        mlflow.log_params(params)
        metrics = {"photos_located": job.stages["outputs"]["located"], "seconds": seconds,
                   "photos_skipped": sum(job.stages["ingest"].get("skipped", {}).values()),
                   "shards_predicted": job.stages["predict"]["predicted"],
                   "shards_skipped": job.stages["predict"]["skipped"]}
        if job.stages["outputs"]["located"]:
            metrics["mean_confidence"] = job.stages["outputs"]["mean_confidence"]
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            for url in (job.table, job.map):
                local = Path(tmp) / url.rsplit("/", 1)[-1]
                local.write_bytes(storage.read_bytes(url))
                mlflow.log_artifact(str(local))
        return run.info.run_id


def locate_photos(photos: str, model: str = "models:/locdiff@champion", *, out: str | None = None,
                  top_k: int = 5, method: str = "locdiff", shard_size: int = 1000,
                  allow_private_addresses: bool = False, tracking_uri: str | None = None,
                  log_to_mlflow: bool = True) -> dict[str, Any]:
    """All stages in this process (the flow runs the same stages as tasks); returns a summary."""
    t0 = time.monotonic()
    job = plan(photos, model, out=out, top_k=top_k, method=method, shard_size=shard_size,
               allow_private_addresses=allow_private_addresses, tracking_uri=tracking_uri)
    g = Geolocator.load(model, tracking_uri=tracking_uri)
    ingest(job)
    features, manifest = embed(job, g)
    tables = predict(job, g, features, manifest)
    write_outputs(job, tables)
    run_id = log_inference(job, seconds=time.monotonic() - t0, tracking_uri=tracking_uri) if log_to_mlflow else None
    return {"table": job.table, "map": job.map, "mlflow_run_id": run_id, "stages": job.stages}
