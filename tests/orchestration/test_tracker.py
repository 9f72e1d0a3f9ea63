"""The MLflow tracker as the engine's callback: each step's loss and lr reach the MLflow run exactly once,
across a resume and across a tracking store that was down at a checkpoint (a real SQLite store)."""

from __future__ import annotations

import pytest

from locdiff import tracking
from locdiff.orchestration.tracker import MlflowStepTracker

pytestmark = pytest.mark.slow  # a SQLite MLflow store takes seconds to create


def _rows(steps):
    return [{"step": s, "loss": 1.0 / s, "lr": 0.1, "elapsed_s": 0.5} for s in steps]


def _history(run_id, uri, key="loss"):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def test_steps_reach_mlflow_once_across_a_resume(mlflow_uri):
    with tracking.training_run({"x": 1}, tracking_uri=mlflow_uri) as run_id:
        pass
    first = MlflowStepTracker(run_id, mlflow_uri)
    first.on_log(_rows([4, 8]) + [{"step": 8, "val_loss": 0.5}])  # a validation row: not a step row
    state = {"step": 8}
    first.on_checkpoint(state)
    assert state == {"step": 8, "mlflow_flushed": 8}
    first.on_log(_rows([12]))  # then the worker dies before the next checkpoint
    second = MlflowStepTracker(run_id, mlflow_uri)
    second.on_resume(state)  # resumed from the step-8 checkpoint: step 12 is trained again
    second.on_log(_rows([12, 16]))
    second.on_checkpoint({"step": 16})
    assert _history(run_id, mlflow_uri) == [(s, pytest.approx(1.0 / s)) for s in (4, 8, 12, 16)]
    assert [s for s, _ in _history(run_id, mlflow_uri, "lr")] == [4, 8, 12, 16]
    assert _history(run_id, mlflow_uri, "elapsed_s") == []  # only step, loss and lr go per step


def test_rows_a_down_store_missed_are_kept_in_the_checkpoint_and_logged_later(mlflow_uri, tmp_path):
    with tracking.training_run({"x": 1}, tracking_uri=mlflow_uri) as run_id:
        pass
    down = MlflowStepTracker(run_id, f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    down.on_log(_rows([4, 8]))
    state = {"step": 8}
    down.on_checkpoint(state)  # a warning, never an error: tracking does not stop training
    assert state["mlflow_flushed"] == 0 and [r["step"] for r in state["mlflow_pending"]] == [4, 8]
    up = MlflowStepTracker(run_id, mlflow_uri)
    up.on_resume(state)
    up.on_log(_rows([12]))
    up.on_checkpoint(state := {"step": 12})
    assert [s for s, _ in _history(run_id, mlflow_uri)] == [4, 8, 12]
    assert state == {"step": 12, "mlflow_flushed": 12}


def test_steps_logged_at_a_lost_checkpoint_are_not_logged_again(mlflow_uri):
    """The process dies while the step-16 checkpoint is being stored, after its steps reached MLflow: the
    training resumes from step 8 and trains 12 and 16 again, which the run holds once."""
    with tracking.training_run({"x": 1}, tracking_uri=mlflow_uri) as run_id:
        pass
    first = MlflowStepTracker(run_id, mlflow_uri)
    first.on_log(_rows([4, 8]))
    first.on_checkpoint(kept := {"step": 8})
    first.on_log(_rows([12, 16]))
    first.on_checkpoint({"step": 16})  # logged, then the checkpoint is lost
    second = MlflowStepTracker(run_id, mlflow_uri)
    second.on_resume(kept)
    second.on_log(_rows([12, 16, 20]))
    second.on_checkpoint({"step": 20})
    assert [s for s, _ in _history(run_id, mlflow_uri)] == [4, 8, 12, 16, 20]
    assert [s for s, _ in _history(run_id, mlflow_uri, "lr")] == [4, 8, 12, 16, 20]
