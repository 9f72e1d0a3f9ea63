"""The `locate-photos` flow: where were these photos taken? A folder, URL list or s3:// prefix of
unlabelled photos in, a predictions table and a map out (beside the input), logged to MLflow as an
inference run. Stages (locdiff.inference.batch): ingest -> embed (the model's encoder) -> predict per
shard -> table and map -> MLflow; a re-run skips the finished shards of every stage.

Deployed from prefect.yaml; trigger it with
    prefect deployment run 'locate-photos/locate-photos' --param photos=s3://bucket/new-photos \
        --param model=models:/locdiff@champion
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.errors import one_line
from flows.params import Location
from flows.retry import transient
from locdiff.inference import batch
from locdiff.inference.geolocator import Geolocator


@task(retries=2, retry_delay_seconds=10, cache_policy=NONE, retry_condition_fn=transient)
def ingest_photos(job: batch.LocateJob) -> batch.LocateJob:
    """Shard the photos (coordinates optional); resumes finished shards on a retry."""
    batch.ingest(job)
    return job


@task(retries=1, retry_delay_seconds=10, cache_policy=NONE, retry_condition_fn=transient)
def embed_and_predict(job: batch.LocateJob, tracking_uri: str | None) -> batch.LocateJob:
    """Embed with the model's encoder, predict every shard without a table yet, write the table and map."""
    g = Geolocator.load(job.model, tracking_uri=tracking_uri)
    features, manifest = batch.embed(job, g)
    tables = batch.predict(job, g, features, manifest)
    batch.write_outputs(job, tables)
    return job


@task(retries=1, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=transient)
def log_run(job: batch.LocateJob, seconds: float, tracking_uri: str | None) -> str:
    """The evaluation-free inference run in MLflow (params, counts, the table and the map)."""
    return batch.log_inference(job, seconds=seconds, tracking_uri=tracking_uri)


@flow(name="locate-photos")
def locate_photos(photos: Location, model: Location = "models:/locdiff@champion", out: Location | None = None,
                  top_k: int = 5, method: str = "locdiff", shard_size: int = 1000,
                  allow_private_addresses: bool = False, tracking_uri: Location | None = None) -> dict:
    """Locate every photo of `photos` (a folder, a CSV URL list or an s3:// prefix) with `model` (a model
    URI or a run folder); writes OUT/predictions.parquet and OUT/map.png, OUT defaulting to
    PHOTOS-located beside the input."""
    with one_line():
        t0 = time.monotonic()
        job = batch.plan(photos, model, out=out, top_k=top_k, method=method, shard_size=shard_size,
                         allow_private_addresses=allow_private_addresses, tracking_uri=tracking_uri)
        job = ingest_photos(job)
        job = embed_and_predict(job, tracking_uri)
        run_id = log_run(job, time.monotonic() - t0, tracking_uri)
        get_run_logger().info("located %d photos of %s: %s, %s (MLflow run %s); stages %s",
                              job.stages["outputs"]["located"], photos, job.table, job.map, run_id, job.stages)
        return {"table": job.table, "map": job.map, "mlflow_run_id": run_id, "stages": job.stages}
