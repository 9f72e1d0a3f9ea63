"""Flow `ingest`: one data set into ROOT/NAME (skipped when its manifest exists)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.errors import one_line
from flows.params import DataSet, Location
from flows.retry import transient
from locdiff.orchestration import stages


@task(retries=2, retry_delay_seconds=10, cache_policy=NONE, retry_condition_fn=transient,
      task_run_name="ingest {dataset.name}")
def ingest_dataset(dataset: DataSet, root: str) -> int:
    """Run the data layer's ingest; retried on transient failures (network, S3)."""
    manifest = stages.ingest(dataset, root)
    return int(manifest.get("count", 0))


@flow(name="ingest", flow_run_name="ingest {dataset.name}")
def ingest(dataset: DataSet, root: Location) -> str:
    """Ingest one data set into ROOT/NAME unless that stage is complete."""
    with one_line():
        if stages.stage_complete("ingest", dataset, root):
            get_run_logger().info("ingest %s: manifest exists, skipped", dataset.name)
            return "skipped"
        count = ingest_dataset(dataset, root)
        get_run_logger().info("ingest %s: %d samples", dataset.name, count)
        return "done"
