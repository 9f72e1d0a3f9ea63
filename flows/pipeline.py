"""The `train-locdiff` flow: ingest -> embed -> train -> evaluate -> promote, for one config.

The trained LocDiff model is registered in MLflow as `locdiff` (a pyfunc, locdiff.inference.pyfunc);
its evaluation metrics become tags of its version, and the alias `champion` moves to it when it beats
the champion on the flow's test sets (the first version is the champion).

Deployed from prefect.yaml; trigger it with
    prefect deployment run 'train-locdiff/train-locdiff' --param config=base
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.embed import embed
from flows.errors import one_line
from flows.evaluate import evaluate
from flows.ingest import ingest
from flows.params import DataSet, Location
from flows.retry import transient
from flows.train import train
from locdiff.orchestration import stages
from locdiff.worlds.synth import ensure_benchmark


@task(retries=1, retry_delay_seconds=5, cache_policy=NONE, retry_condition_fn=transient, task_run_name="promote")
def promote(run_dir: str, tests: list[str], tracking_uri: str | None) -> dict | None:
    """Move the registry's `champion` alias to this run's model when it beats the champion."""
    return stages.promote(run_dir, tests, tracking_uri=tracking_uri)


@task(cache_policy=NONE, task_run_name="synth {folder}")
def write_synth(folder: str) -> bool:
    """The synthetic benchmark (`locdiff synth --out FOLDER`, default sizes) unless it is complete there."""
    return ensure_benchmark(folder)


@flow(name="train-locdiff")
def train_locdiff(train_data: DataSet, tests: list[DataSet], config: str = "base", root: Location = "data",
                  workers: int = 2, gpus_per_worker: float = 0.0, degree: int | None = None,
                  resume: bool = True, overrides: list[str] | None = None,
                  tracking_uri: Location | None = None, val: DataSet | None = None,
                  embed_runner: Literal["auto", "local", "ray"] = "auto", synth: Location | None = None,
                  val_unseen: DataSet | None = None) -> dict:
    """Ingest and embed every data set, train `config` (on Ray with `workers` > 0), evaluate on the test
    sets. Without `val`, a share of the training rows is held out for validation (train.val_share);
    `val_unseen` (validation rows from regions absent from the training data) goes to LocDiff-H's fit.
    `embed_runner` chooses the embed stage's runner (auto, local, or Ray Data). `synth`: a folder where the
    synthetic benchmark is written first when it is not there and a data set reads from it (the
    deployment's demo data, data/synth).
    The run folder is named by the config, the data and their completion key: the same parameters a
    second time skip every finished stage; a changed override trains a new run. The config is resolved
    once (`preflight`) and the run planned once (`plan`: data identities, completion key, run folder)."""
    with one_line():
        resolved = stages.preflight(config, root, degree=degree, overrides=overrides, tracking_uri=tracking_uri,
                                    num_workers=workers, gpus_per_worker=gpus_per_worker)
        done = {}
        datasets = [train_data, *([val] if val else []), *([val_unseen] if val_unseen else []), *tests]
        if synth and any((ds.path or "").startswith(synth.rstrip("/") + "/") for ds in datasets):
            done["synth"] = "done" if write_synth(synth) else "skipped"  # only when a data set reads it
        for ds in datasets:
            done[f"ingest:{ds.name}"] = ingest(ds, root)
            done[f"embed:{ds.name}"] = embed(ds, root, degree, embed_runner)
        spec = stages.plan(config, train_data, root, val_spec=val, val_unseen_spec=val_unseen, config=resolved)
        run_dir = str(spec.run_dir) if resume else f"{spec.run_dir}-{stages.timestamp()}"
        record = train(config, train_data, root, run_dir, degree, overrides, workers, gpus_per_worker,
                       tracking_uri, val, val_unseen)
        done["train"] = "skipped" if record.get("skipped") else "done"
        evaluation = evaluate(run_dir, tests, root, tracking_uri)
        done.update({f"evaluate:{k}": v for k, v in evaluation["status"].items()})
        champion = promote(run_dir, [t.name for t in tests], tracking_uri)
        get_run_logger().info("MLflow run %s; stages %s; champion %s", record["mlflow_run_id"], done,
                              champion)
        return {"run_dir": run_dir, "mlflow_run_id": record["mlflow_run_id"], "stages": done,
                "results": evaluation["results"], "model_version": record.get("model_version"),
                "champion": champion}
