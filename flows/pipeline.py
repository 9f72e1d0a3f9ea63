"""The `train-locdiff` flow: ingest -> embed -> train -> evaluate for one config.

Deployed from prefect.yaml; trigger it with
    prefect deployment run 'train-locdiff/train-locdiff' --param config=base
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger

from flows.embed import embed
from flows.evaluate import evaluate
from flows.ingest import ingest
from flows.params import DataSet
from flows.train import train
from locdiff import pipeline


@flow(name="train-locdiff")
def train_locdiff(train_data: DataSet, tests: list[DataSet], config: str = "base", root: str = "data",
                  workers: int = 2, gpus_per_worker: float = 0.0, degree: int | None = None,
                  resume: bool = True, overrides: list[str] | None = None,
                  tracking_uri: str | None = None,
                  embed_runner: Literal["auto", "local", "ray"] = "auto") -> dict:
    """Ingest and embed every data set, train `config` on Ray, evaluate on the test sets."""
    cfg = pipeline.preflight(config, root, degree=degree, overrides=overrides, tracking_uri=tracking_uri)
    stages = {}
    for ds in [train_data, *tests]:
        stages[f"ingest:{ds.name}"] = ingest(ds, root)
        stages[f"embed:{ds.name}"] = embed(ds, root, degree, embed_runner)
    run_dir = pipeline.run_dir_for(root, pipeline.run_name(config, train_data.name, cfg.shdd.degree, resume))
    record = train(config, train_data, root, run_dir, degree, overrides, workers, gpus_per_worker,
                   tracking_uri)
    stages["train"] = "skipped" if record.get("skipped") else "done"
    evaluation = evaluate(run_dir, tests, root, tracking_uri)
    stages.update({f"evaluate:{k}": v for k, v in evaluation["status"].items()})
    get_run_logger().info("MLflow run %s; stages %s", record["mlflow_run_id"], stages)
    return {"run_dir": run_dir, "mlflow_run_id": record["mlflow_run_id"], "stages": stages,
            "results": evaluation["results"]}
