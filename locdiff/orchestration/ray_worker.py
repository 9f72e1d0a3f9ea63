"""The function every Ray Train worker runs: the one engine (locdiff.engine) with the worker's rank, the
model wrapped by `ray.train.torch.prepare_model` (DDP), Ray's checkpoint storage (`RayStore`) and, when the
training has an MLflow run, the MLflow tracker as the engine's callback.

Fault injection for the tests reaches the workers through the loop config, filled by the driver from its
environment (`LOCDIFF_FAULT_KILL_AT_STEP`, `LOCDIFF_TRACE_DIR`; `fault_settings`), never through a public
signature.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from locdiff import engine
from locdiff.data.stream import Rows
from locdiff.methods import get_method, prepare_data
from locdiff.model.config import config_from_dict
from locdiff.orchestration.ray_session import FAULT_KILL_ENV, TRACE_ENV
from locdiff.orchestration.tracker import MlflowStepTracker
from locdiff.runs import check_checkpoint, load_state

log = logging.getLogger(__name__)

FAULT_MARKER = "fault-injected"


def fault_settings() -> dict[str, Any]:
    """The tests' fault injection, from this (the driver's) environment: the global step at which the last
    rank SIGKILLs itself once (`LOCDIFF_FAULT_KILL_AT_STEP`) and the folder where each rank traces the ids
    of its batches (`LOCDIFF_TRACE_DIR`); both None normally."""
    at = os.environ.get(FAULT_KILL_ENV, "").strip()
    trace = os.environ.get(TRACE_ENV, "").strip()
    return {"fault_kill_at_step": int(at) if at else None,
            "trace_dir": str(Path(trace).expanduser().resolve()) if trace else None}


class RayStore(engine.CheckpointStore):
    """Checkpoints in Ray Train's storage (local folder or s3://): rank 0 reports the engine's state and
    the metrics log as a `ray.train.Checkpoint`, the other ranks report without one."""

    def __init__(self, rank: int, loop: dict[str, Any]) -> None:
        self.rank, self.loop = rank, loop
        self.history: list[dict[str, Any]] = []
        self.where: str | None = None  # the checkpoint resumed from

    def load(self, map_location: Any) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return None if ckpt is None else self.restore(ckpt, map_location)

    def restore(self, ckpt: Any, map_location: Any = "cpu") -> dict[str, Any]:
        """The engine's state from a `ray.train.Checkpoint` (weights only: a pickle payload is refused)."""
        self.where = f"{ckpt.path}/checkpoint.pt"  # named in the engine's errors about it
        with ckpt.as_directory() as folder:
            state = load_state(Path(folder) / "checkpoint.pt", map_location)
            check_checkpoint(state, self.where)
            log_file = Path(folder) / "metrics.jsonl"
            if log_file.exists():
                self.history = [json.loads(line) for line in log_file.read_text().splitlines() if line]
        step = int(state["step"])
        self.history = [r for r in self.history if r.get("step", 0) <= step]
        if self.rank == 0:
            log.info("resuming from %s at step %d", ckpt.path, step)
        return state

    def log(self, rows: list[dict[str, Any]]) -> None:
        self.history.extend(rows)

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="ckpt") as tmp:
            folder = Path(tmp)
            torch.save(state, folder / "checkpoint.pt")
            with (folder / "metrics.jsonl").open("w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def _step_hook(loop: dict[str, Any], rank: int, world: int) -> Callable[[int, Rows], None] | None:
    """Fault injection (the last rank SIGKILLs itself once at `fault_kill_at_step`) and the id trace;
    None when neither is asked for."""
    fault_at = loop.get("fault_kill_at_step")
    trace = Path(loop["trace_dir"]) / f"rank{rank}.jsonl" if loop.get("trace_dir") else None
    if fault_at is None and trace is None:
        return None

    def on_step(step: int, rows: Rows) -> None:
        if trace is not None:
            with trace.open("a") as f:
                f.write(json.dumps({"step": step, "ids": [str(i) for i in rows.ids]}) + "\n")
        if fault_at is not None and step == fault_at and rank == world - 1:
            marker = Path(loop["marker_dir"]) / FAULT_MARKER
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"killed rank {rank} at step {step}\n")
                # Give the controller (it polls every 2 s) time to register the last checkpoint.
                time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.5)
                os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def train_loop(loop: dict[str, Any]) -> None:
    """The Ray Train worker function (one per worker): the engine with Ray's rank, DDP and storage."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    config = config_from_dict(loop["config"], source="ray train config")
    method = get_method(config.method).from_config(config if config.method == "locdiff" else loop["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    source, val = prepare_data(loop["train"], loop.get("val"), val_share=loop.get("val_share", 0.0),
                               seed=config.train.seed)
    task = method.task(source)
    settings = method.settings(source)
    if loop.get("per_worker_batch"):
        settings.batch_size = int(loop["per_worker_batch"]) * world
    # static_graph: the null-condition vector gets no gradient when classifier-free guidance is off, the
    # same parameters every step, which DDP then allows.
    dist = engine.Distributed(rank, world, device=get_device(),
                              wrap=lambda m: prepare_model(m, parallel_strategy_kwargs={"static_graph": True}))
    tracker = ([MlflowStepTracker(loop["mlflow_run_id"], loop.get("tracking_uri"))]
               if loop.get("mlflow_run_id") else [])
    engine.train(task, source, settings, store=RayStore(rank, loop), val=val, dist=dist, progress=False,
                 on_step=_step_hook(loop, rank, world), callbacks=tracker)
