"""Distributed training on Ray Train: the one engine (locdiff.engine) in every worker, DDP between them.

    settings = RayTrainSettings(num_workers=2, storage_root="runs/ray")     # or s3://bucket/prefix
    result = train_on_ray(config, "ROOT/NAME/features/ENCODER", run_dir, settings)
    method.fit(train, val, run_dir)     # finds the final checkpoint: only finalizes

Each worker builds the method's task from the config, opens the training data as a stream (its share of
the shards each epoch: locdiff.data.stream) and runs `locdiff.engine.train` with its rank, the model
wrapped by `ray.train.torch.prepare_model` (DDP) and Ray's checkpoint storage (`RayStore`). The global
batch is the config's (`train.batch_size`, split across workers) unless `per_worker_batch` is set (weak
scaling). Every `train.checkpoint_every` steps rank 0 reports the engine's state, which holds the stream
position; `FailureConfig(max_failures)` restarts the worker group after a worker dies and the engine
resumes at the exact row it checkpointed.

The same code runs on this machine (a local Ray started with a temp dir, CPU workers) and on a cluster:
set RAY_ADDRESS (e.g. `ray://head:10001` or `auto`) and ray.init connects to it; use an s3:// storage
root there so that every node sees the checkpoints. Ray is imported inside functions.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FAULT_MARKER = "fault-injected"
# Environment the workers get from the driver (a cluster's workers do not share the driver's shell).
FORWARDED_ENV = ("AWS_", "MLFLOW_", "LOCDIFF_")


@dataclass
class RayTrainSettings:
    """How to run training on Ray (the model's hyper-parameters stay in the model config)."""

    num_workers: int = 2
    gpus_per_worker: float = 0.0  # > 0: use_gpu, DDP over NCCL, bf16 autocast when train.amp
    cpus_per_worker: float = 1.0  # 0.5 when Ray Data shares the CPUs (STACK.md: else the job hangs)
    storage_root: str = "runs/ray"  # local folder or s3://bucket/prefix; checkpoints go under it
    run_name: str | None = None  # None: a new unique run; the same name resumes that run (`resume`)
    max_failures: int = 2  # worker-group restarts after a worker dies
    tracking_uri: str | None = None  # MLflow; with mlflow_run_id, loss and lr are logged per step
    mlflow_run_id: str | None = None
    # For the fault-tolerance test: the last rank kills itself (SIGKILL) on reaching this global step,
    # once per storage run (a marker file in the run folder remembers it).
    fault_kill_at_step: int | None = None
    # None: train.batch_size is the global batch, split across workers (the single-process training's
    # optimisation, unchanged); an int: each worker's batch (global = num_workers x it, weak scaling).
    per_worker_batch: int | None = None
    trace_dir: str | None = None  # tests: each rank appends the ids of every batch to trace_dir/rankR.jsonl
    ray_init: dict[str, Any] = field(default_factory=dict)  # extra ray.init kwargs for a local start


@dataclass
class RayTrainResult:
    run_dir: Path  # holds checkpoint.pt, config.yaml, metrics.jsonl
    step: int
    metrics: dict[str, float]
    storage_path: str  # the Ray run folder (checkpoints)
    restored_from_step: int  # > 0 when the last attempt resumed from a checkpoint
    samples_per_s: float  # global training throughput of the last attempt (excluding start-up)


class RayUnavailable(RuntimeError):
    """Ray could not be started or reached."""


def ensure_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Connect to RAY_ADDRESS when set, else start a local Ray (auth off, short temp dir) once."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True, **kwargs)
        else:
            if "_temp_dir" not in kwargs:  # short (socket paths), removed when this process ends
                kwargs["_temp_dir"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
                atexit.register(_remove_ray_temp, kwargs["_temp_dir"])
                _LOCAL_TEMP.append(kwargs["_temp_dir"])
            kwargs.setdefault("dashboard_host", "127.0.0.1")  # the State API (used by Ray Train) needs it
            ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    except Exception as err:  # noqa: BLE001 - name what to fix
        where = f"the cluster at RAY_ADDRESS={address}" if address else "a local Ray instance"
        raise RayUnavailable(f"cannot start or reach {where}: {err}. Check RAY_ADDRESS (unset it to run "
                             "locally) and that the head node is up (`ray status`).") from err


_LOCAL_TEMP: list[str] = []  # temp dirs of local Ray instances this process started


def _remove_ray_temp(path: str) -> None:
    import shutil

    import ray

    ray.shutdown()
    shutil.rmtree(path, ignore_errors=True)


def stop_local_ray() -> None:
    """Stop the local Ray this process started (and remove its temp dir); a cluster is left alone."""
    while _LOCAL_TEMP:
        _remove_ray_temp(_LOCAL_TEMP.pop())


def _absolute(path: str | Path) -> str:
    """Workers change directory: give them absolute local paths (URLs unchanged)."""
    return str(path) if "://" in str(path) else str(Path(path).expanduser().resolve())


def _storage(root: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for RunConfig: local folder or s3://."""
    if "://" not in root:
        path = Path(root).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except PermissionError as err:
            raise PermissionError(f"storage root {path}: cannot create it ({err.strerror}); choose a "
                                  "writable --root or fix its permissions") from None
        if not os.access(path, os.W_OK):
            raise PermissionError(f"storage root {path} is not writable; choose a writable root or fix "
                                  "its permissions")
        return str(path), None
    import pyarrow.fs

    from locdiff.data.storage import filesystem, s3_endpoint

    fs, inner = filesystem(root)
    if root.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ACCESS_KEY_ID"):
        # The filesystem is pickled to the Train controller and workers, which may not share this
        # process's environment: carry the endpoint and the credentials from the environment with it.
        import fsspec

        fs = fsspec.filesystem("s3", use_listings_cache=False, key=os.environ["AWS_ACCESS_KEY_ID"],
                               secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                               token=os.environ.get("AWS_SESSION_TOKEN"),
                               **({"endpoint_url": s3_endpoint()} if s3_endpoint() else {}))
    try:
        fs.makedirs(inner, exist_ok=True)
        fs.ls(inner.split("/", 1)[0])
    except PermissionError as err:
        raise PermissionError(f"storage root {root}: access denied ({err}); check the credentials and the "
                              "bucket policy") from None
    except (FileNotFoundError, OSError) as err:
        raise PermissionError(f"storage root {root}: cannot use it ({err}); create the bucket or check "
                              "AWS_ENDPOINT_URL") from None
    return inner, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


class RayStore:
    """Checkpoints in Ray Train's storage (local folder or s3://): rank 0 reports the engine's state and
    the metrics log as a `ray.train.Checkpoint`, the other ranks report without one. Per-step loss and
    lr go to MLflow at every checkpoint (each step exactly once across restarts)."""

    def __init__(self, rank: int, loop: dict[str, Any]) -> None:
        self.rank, self.loop = rank, loop
        self.history: list[dict[str, Any]] = []
        self.flushed = 0

    def load(self, map_location: Any) -> dict[str, Any] | None:
        import ray.train

        from locdiff.runs import load_state

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as folder:
            state = load_state(Path(folder) / "checkpoint.pt", map_location)
            log_file = Path(folder) / "metrics.jsonl"
            if log_file.exists():
                self.history = [json.loads(line) for line in log_file.read_text().splitlines() if line]
        step = int(state["step"])
        self.history = [r for r in self.history if r.get("step", 0) <= step]
        self.flushed = int(state.get("mlflow_flushed", step))
        if self.rank == 0:
            log.info("resuming from %s at step %d", ckpt.path, step)
        return state

    def log(self, rows: list[dict[str, Any]]) -> None:
        self.history.extend(rows)

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        import ray.train
        import torch

        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        step = int(state["step"])
        if self.loop.get("mlflow_run_id"):
            from locdiff.tracking import log_step_metrics

            rows = [{k: r[k] for k in ("step", "loss", "lr") if k in r} for r in self.history
                    if r.get("step", 0) > self.flushed and "loss" in r]
            try:
                log_step_metrics(self.loop["mlflow_run_id"], rows, tracking_uri=self.loop.get("tracking_uri"))
                self.flushed = step
            except Exception as err:  # noqa: BLE001 - tracking must not stop training; retried next time
                log.warning("could not log steps %d..%d to MLflow (%s); retrying at the next checkpoint",
                            self.flushed + 1, step, err)
        with tempfile.TemporaryDirectory(prefix="ckpt") as tmp:
            folder = Path(tmp)
            torch.save({**state, "mlflow_flushed": self.flushed}, folder / "checkpoint.pt")
            with (folder / "metrics.jsonl").open("w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def _step_hook(loop: dict[str, Any], rank: int, world: int):
    """Fault injection (the last rank SIGKILLs itself once at `fault_kill_at_step`) and the id trace."""
    import signal

    fault_at = loop.get("fault_kill_at_step")
    trace = Path(loop["trace_dir"]) / f"rank{rank}.jsonl" if loop.get("trace_dir") else None

    def on_step(step: int, rows: Any) -> None:
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


def _train_loop(loop: dict[str, Any]) -> None:
    """The Ray Train worker function (one per worker): the engine with Ray's rank, DDP and storage."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from locdiff import engine
    from locdiff.methods import get_method, prepare_data
    from locdiff.model.config import config_from_dict

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
    engine.train(task, source, settings, store=RayStore(rank, loop), val=val, dist=dist, progress=False,
                 on_step=_step_hook(loop, rank, world))


def train_on_ray(config: Any, train: str, run_dir: str | Path, settings: RayTrainSettings, *,
                 val: str | None = None, val_share: float = 0.0) -> RayTrainResult:
    """Train a method's task (LocDiff's denoiser or a trained baseline) with Ray Train; write the final
    checkpoint and log into run_dir, where `method.fit` finds them (it then only finalizes).

    Args:
        config: the resolved run config (a `locdiff.model.config.Config`).
        train, val: the data as paths or URLs (a features folder or an embeddings table); without `val`,
            `val_share` of the training rows is held out (the same rows on every worker).
        run_dir: receives checkpoint.pt, config.yaml and metrics.jsonl.
        settings: workers, GPUs, storage root, run name, failures.
    """
    import ray

    if settings.num_workers < 1:
        raise ValueError(f"num_workers must be >= 1; got {settings.num_workers}")
    if not isinstance(train, str | os.PathLike):
        raise ValueError("Ray training reads its data from a path or URL (a features folder or an embeddings "
                         "table), not from an in-memory table")
    storage_path, storage_fs = _storage(settings.storage_root)
    run_name = settings.run_name or f"locdiff-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError as err:
        raise PermissionError(f"run folder {run_dir}: cannot create it ({err.strerror}); choose a writable "
                              "storage root") from None
    use_gpu = settings.gpus_per_worker > 0
    resources = {"CPU": settings.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = settings.gpus_per_worker
    started_here = not ray.is_initialized()  # a Ray started for this call is stopped after it
    ensure_ray(num_cpus=max(2, int(np.ceil(settings.num_workers * settings.cpus_per_worker))),
               **settings.ray_init)
    try:
        return _fit(config, {"train": _absolute(train), "val": _absolute(val) if val else None,
                             "val_share": val_share}, run_dir, settings, storage_path, storage_fs, run_name,
                    use_gpu, resources)
    finally:
        if started_here:
            stop_local_ray()


def _fit(config: Any, data: dict[str, Any], run_dir: Path, settings: RayTrainSettings, storage_path: str,
         storage_fs: Any, run_name: str, use_gpu: bool, resources: dict[str, float]) -> RayTrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from locdiff.model.config import config_to_dict
    from locdiff.runs import RunFolder

    tracking_uri = None
    if settings.mlflow_run_id:
        from locdiff.tracking import absolute_uri, resolve_tracking_uri

        tracking_uri = absolute_uri(resolve_tracking_uri(settings.tracking_uri))  # workers run elsewhere
    loop = {"config": config_to_dict(config), **data, "tracking_uri": tracking_uri,
            "mlflow_run_id": settings.mlflow_run_id, "per_worker_batch": settings.per_worker_batch,
            "fault_kill_at_step": settings.fault_kill_at_step, "trace_dir": settings.trace_dir,
            "marker_dir": _absolute(run_dir / ".ray")}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    log.info("Ray Train: %d worker(s), %s per worker, run %s under %s", settings.num_workers, resources,
             run_name, settings.storage_root)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"Ray training of run {run_name} ended without a checkpoint")
    run = RunFolder(run_dir)
    from locdiff.runs import load_state

    with result.checkpoint.as_directory() as folder:
        state = load_state(Path(folder) / "checkpoint.pt")
        state.pop("mlflow_flushed", None)
        run.save_checkpoint(state)
        f = Path(folder) / "metrics.jsonl"
        from locdiff.runs import METRICS, write_text_atomic

        write_text_atomic(run.file(METRICS), f.read_text() if f.exists() else "")
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return RayTrainResult(run_dir=run_dir, step=int(metrics.get("step", 0)), metrics=metrics,
                          storage_path=f"{settings.storage_root.rstrip('/')}/{run_name}",
                          restored_from_step=int(metrics.get("restored_from_step", 0)),
                          samples_per_s=float(metrics.get("samples_per_s", 0.0)))
