"""Flow `embed`: image embeddings (and SHDD targets) of one data set (skipped when complete)."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.errors import one_line
from flows.params import DataSet, Location
from flows.retry import transient
from locdiff.orchestration import stages


@task(retries=1, retry_delay_seconds=10, cache_policy=NONE, retry_condition_fn=transient,
      task_run_name="embed {dataset.name}")
def embed_dataset(dataset: DataSet, root: str, degree: int | None, runner: str = "auto") -> int:
    """Run the data layer's embed stage; it resumes finished shards on a retry."""
    manifest = stages.embed(dataset, root, degree, runner=runner)
    return int(manifest.get("count", 0))


@flow(name="embed", flow_run_name="embed {dataset.name}")
def embed(dataset: DataSet, root: Location, degree: int | None = None,
          runner: Literal["auto", "local", "ray"] = "auto") -> str:
    """Embed one ingested data set into ROOT/NAME/features/ENCODER unless that stage is complete.

    runner: "local" (this process), "ray" (Ray Data: the cluster at RAY_ADDRESS or a local Ray, parallel
    over shards, GPU actors when there are GPUs) or "auto" (Ray for large jobs on a cluster, several GPUs
    or more than 4 CPUs; see locdiff.data.featurize.choose_runner)."""
    with one_line():
        if stages.stage_complete("embed", dataset, root):
            get_run_logger().info("embed %s: manifest exists, skipped", dataset.name)
            return "skipped"
        count = embed_dataset(dataset, root, degree, runner)
        get_run_logger().info("embed %s: %d samples", dataset.name, count)
        return "done"
