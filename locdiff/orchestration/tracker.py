"""The MLflow tracker of a training, handed to the engine as a callback (`locdiff.engine.Callback`).

At every checkpoint it logs the per-step loss and learning rate logged since the last one to the
training's MLflow run, each step exactly once across restarts: the last step it logged is kept in the
checkpoint (`mlflow_flushed`), and so are the rows it could not log yet (`mlflow_pending`, retried at the
next checkpoint; tracking never stops a training). A resumed training does not log again the steps the run
already holds (logged at a checkpoint that was then lost: the process died while it was being stored).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from locdiff.engine import Callback
from locdiff.tracking import log_step_metrics, logged_steps

log = logging.getLogger(__name__)

STEP_KEYS = ("step", "loss", "lr")  # what goes to MLflow per step
TRACKER_STATE = ("mlflow_flushed", "mlflow_pending")  # the tracker's entries in a checkpoint


class MlflowStepTracker(Callback):
    """Per-step loss and lr of a training to the MLflow run `run_id`, at every checkpoint."""

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self.pending: list[dict[str, float]] = []
        self.flushed = 0  # the last step logged
        self.logged: set[int] = set()  # steps after `flushed` that the run holds already (a lost checkpoint's)

    def on_resume(self, state: Mapping[str, Any]) -> None:
        step = int(state["step"])
        self.flushed = int(state.get("mlflow_flushed", step))
        self.pending = [dict(r) for r in state.get("mlflow_pending") or []
                        if self.flushed < int(r.get("step", 0)) <= step]
        try:
            self.logged = {s for s in logged_steps(self.run_id, "loss", tracking_uri=self.tracking_uri)
                           if s > self.flushed}
        except Exception as err:  # noqa: BLE001 - tracking must not stop training
            log.warning("could not read the steps MLflow run %s holds (%s)", self.run_id, err)

    def on_log(self, rows: list[dict[str, Any]]) -> None:
        self.pending.extend({k: r[k] for k in STEP_KEYS if k in r} for r in rows if "loss" in r)

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        step = int(state["step"])
        rows = [r for r in self.pending if r["step"] > self.flushed and r["step"] not in self.logged]
        try:
            log_step_metrics(self.run_id, rows, tracking_uri=self.tracking_uri)
            self.flushed, self.pending = step, []
        except Exception as err:  # noqa: BLE001 - tracking must not stop training; retried next time
            log.warning("could not log steps %d..%d to MLflow (%s); retrying at the next checkpoint",
                        self.flushed + 1, step, err)
        state["mlflow_flushed"] = self.flushed
        if self.pending:
            state["mlflow_pending"] = [dict(r) for r in self.pending]
