"""Flow `train`: LocDiff on Ray Train with MLflow tracking (skipped when the run is complete); a thin
wrapper of `locdiff.orchestration.stages.train`."""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.errors import one_line
from flows.params import DataSet, Location
from flows.retry import transient
from locdiff.orchestration import stages


@task(retries=1, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=transient,
      task_run_name="train {config}")
def train_run(config: str, dataset: DataSet, root: str, run_dir: str, degree: int | None,
              overrides: list[str], workers: int, gpus_per_worker: float, tracking_uri: str | None,
              val: DataSet | None = None, val_unseen: DataSet | None = None) -> dict:
    """Train (resuming the run folder's last checkpoint on a retry) and log to MLflow."""
    return stages.train(config, dataset, root, run_dir, degree=degree, overrides=overrides, num_workers=workers,
                        gpus_per_worker=gpus_per_worker, tracking_uri=tracking_uri, val_spec=val,
                        val_unseen_spec=val_unseen)


@flow(name="train", flow_run_name="train {config}")
def train(config: str, dataset: DataSet, root: Location, run_dir: Location, degree: int | None = None,
          overrides: list[str] | None = None, workers: int = 2, gpus_per_worker: float = 0.0,
          tracking_uri: Location | None = None, val: DataSet | None = None,
          val_unseen: DataSet | None = None) -> dict:
    """Train one config on one data set's features into run_dir unless it is complete (run.json).
    `val_unseen`: validation rows from regions absent from the training data (LocDiff-H's choice)."""
    with one_line():
        record = stages.training_record(run_dir, tracking_uri=tracking_uri, check_tracking=True)
        if record is not None:
            get_run_logger().info("train: %s is complete (MLflow run %s), skipped", run_dir,
                                  record["mlflow_run_id"])
            return {**record, "skipped": True}
        if workers > 0 and not os.environ.get("RAY_ADDRESS"):
            get_run_logger().info("train: starting a local Ray for %d workers (a minute or so on a small "
                                  "machine), then %s", workers, config)
        record = train_run(config, dataset, root, run_dir, degree, list(overrides or []), workers,
                           gpus_per_worker, tracking_uri, val, val_unseen)
        get_run_logger().info("train: %d steps, MLflow run %s", record["step"], record["mlflow_run_id"])
        return record
