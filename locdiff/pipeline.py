"""The stages of the `train-locdiff` pipeline as library functions (kept for its importers).

The stages live in `locdiff.orchestration.stages`, the data sets and the run description in
`locdiff.orchestration.spec`, evaluating one table in `locdiff.evaluation`:

    ingest -> embed -> train (Ray Train + MLflow) -> evaluate (per test set, nested MLflow runs) -> promote
"""

from __future__ import annotations

from locdiff.evaluation import accuracy_markdown
from locdiff.orchestration.spec import DataSet, RunSpec, resolve_config
from locdiff.orchestration.stages import (
    MLFLOW_RECORD,
    check_root,
    embed,
    evaluate,
    evaluation_done,
    features_dir,
    ingest,
    plan,
    plan_run,
    preflight,
    promote,
    run_dir_for,
    run_name,
    run_training,
    stage_complete,
    timestamp,
    train,
    training_record,
)
from locdiff.resources import model_config_path

DataSpec = DataSet  # one data set of the pipeline (the flows' `DataSet` parameter type)

__all__ = ["MLFLOW_RECORD", "DataSpec", "RunSpec", "accuracy_markdown", "check_root", "embed", "evaluate",
           "evaluation_done", "features_dir", "ingest", "model_config_path", "plan", "plan_run", "preflight",
           "promote", "resolve_config", "run_dir_for", "run_name", "run_training", "stage_complete", "timestamp",
           "train", "training_record"]
