"""Flow `evaluate`: a trained run on test sets, one nested MLflow run each, and the accuracy table."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.errors import one_line
from flows.params import DataSet, Location
from flows.retry import transient
from locdiff.evaluation import accuracy_markdown
from locdiff.orchestration import stages


@task(retries=1, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=transient,
      task_run_name="evaluate {dataset.name}")
def evaluate_dataset(run_dir: str, dataset: DataSet, root: str, tracking_uri: str | None) -> dict:
    """Predict, score, plot and log one test set."""
    return stages.evaluate(run_dir, dataset, root, tracking_uri=tracking_uri)


@flow(name="evaluate", flow_run_name="evaluate")
def evaluate(run_dir: Location, datasets: list[DataSet], root: Location,
             tracking_uri: Location | None = None) -> dict:
    """Evaluate run_dir on each data set (skipping finished ones); publish the accuracy table."""
    with one_line():
        results, status = {}, {}
        for ds in datasets:
            done = stages.evaluation_done(run_dir, ds.name, tracking_uri=tracking_uri)
            if done is not None:
                get_run_logger().info("evaluate %s: metrics exist, skipped", ds.name)
            results[ds.name] = done or evaluate_dataset(run_dir, ds, root, tracking_uri)
            status[ds.name] = "skipped" if done is not None else "done"
        table = accuracy_markdown(results, title=f"LocDiff accuracy: {run_dir}")
        create_markdown_artifact(table, key="locdiff-accuracy", description="accuracy per test set")
        get_run_logger().info("accuracy\n%s", table)
        return {"results": results, "status": status}
