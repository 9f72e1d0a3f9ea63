"""Distributed training on Ray Train: the one engine (locdiff.engine) in every worker, DDP between them.

    settings = RayTrainSettings(num_workers=2, storage_root="runs/ray")     # or s3://bucket/prefix
    result = train_on_ray(config, "ROOT/NAME/features/ENCODER", run_dir, settings)
    method.fit(train, val, run_dir)     # finds the final checkpoint: only finalizes

Each worker (`locdiff.orchestration.ray_worker.train_loop`) builds the method's task from the config, opens
the training data as a stream (its share of the shards each epoch: locdiff.data.stream) and runs
`locdiff.engine.train` with its rank, the model wrapped by `ray.train.torch.prepare_model` (DDP) and Ray's
checkpoint storage (`RayStore`). The global batch is the config's (`train.batch_size`, split across
workers) unless `per_worker_batch` is set (weak scaling). Every `train.checkpoint_every` steps rank 0
reports the engine's state, which holds the stream position; `FailureConfig(max_failures)` restarts the
worker group after a worker dies and the engine resumes at the exact row it checkpointed.

The same code runs on this machine (a local Ray started with a temp dir, CPU workers) and on a cluster:
set RAY_ADDRESS (e.g. `ray://head:10001` or `auto`) and ray.init connects to it
(`locdiff.orchestration.ray_session`); use an s3:// storage root there so that every node sees the
checkpoints. Ray is imported inside functions.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow.fs

from locdiff.data.storage import filesystem
from locdiff.errors import CorruptFileError, UserError
from locdiff.model.config import Config, config_to_dict
from locdiff.orchestration.ray_session import check_cpu_request, check_gpu_request, ensure_ray, stop_local_ray
from locdiff.orchestration.ray_worker import fault_settings, train_loop
from locdiff.orchestration.tracker import TRACKER_STATE
from locdiff.runs import METRICS, RunFolder, check_checkpoint, load_state, write_text_atomic
from locdiff.tracking import absolute_uri, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class RayTrainSettings:
    """How to run training on Ray (the model's hyper-parameters stay in the model config)."""

    num_workers: int = 2
    gpus_per_worker: float = 0.0  # > 0: use_gpu, DDP over NCCL, bf16 autocast when train.amp
    cpus_per_worker: float = 1.0  # 0.5 when Ray Data shares the CPUs (STACK.md: else the job hangs)
    storage_root: str = "runs/ray"  # local folder or s3://bucket/prefix; checkpoints go under it
    run_name: str | None = None  # None: a new unique run; the same name resumes that run (`resume`)
    max_failures: int = 2  # worker-group restarts after a worker dies
    # restarts of Ray Train's controller (e.g. a worker group that cannot be placed); Ray's default is
    # unlimited, which turns a request the cluster cannot meet into an endless retry
    controller_failure_limit: int = 2
    tracking_uri: str | None = None  # MLflow; with mlflow_run_id, loss and lr are logged per step
    mlflow_run_id: str | None = None
    # None: train.batch_size is the global batch, split across workers (the single-process training's
    # optimisation, unchanged); an int: each worker's batch (global = num_workers x it, weak scaling).
    per_worker_batch: int | None = None
    ray_init: dict[str, Any] = field(default_factory=dict)  # extra ray.init kwargs for a local start


@dataclass
class RayTrainResult:
    run_dir: Path  # holds checkpoint.pt, config.yaml, metrics.jsonl
    step: int
    metrics: dict[str, float]
    storage_path: str  # the Ray run folder (checkpoints)
    restored_from_step: int  # > 0 when the last attempt resumed from a checkpoint
    samples_per_s: float  # global training throughput of the last attempt (excluding start-up)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's index of a run's checkpoints
MAX_SNAPSHOT_BYTES = 16 << 20


def _cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def check_ray_checkpoint(storage_root: str, run_name: str) -> None:
    """Before the workers start: the checkpoint Ray Train would resume `run_name` from (the latest in its
    index) must be a readable, complete locdiff checkpoint; a damaged one is one CorruptFileError naming
    the file (a worker would fail on it, be restarted max_failures times and bury the cause in logs)."""
    fs, inner = filesystem(storage_root)
    shown_root = f"{storage_root.rstrip('/')}/{run_name}" if "://" in storage_root else f"{inner}/{run_name}"
    index, shown_index = f"{inner}/{run_name}/{RAY_SNAPSHOT}", f"{shown_root}/{RAY_SNAPSHOT}"
    hint = f"delete {shown_root} to train from scratch"
    if not fs.exists(index):
        return
    with fs.open(index, "rb") as f:
        raw = f.read(MAX_SNAPSHOT_BYTES + 1)
    try:
        if len(raw) > MAX_SNAPSHOT_BYTES:
            raise ValueError(f"larger than {MAX_SNAPSHOT_BYTES} bytes")
        latest = json.loads(raw).get("latest_checkpoint_result")
        name = None if latest is None else latest["checkpoint_dir_name"]
        if name is not None and (not isinstance(name, str) or not name.replace("_", "").replace("-", "")
                                 .replace(".", "").isalnum() or name.startswith(".")):
            raise ValueError(f"checkpoint_dir_name {name!r}")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CorruptFileError(shown_index, f"{shown_index}: not a Ray Train checkpoint index ({err}); "
                               f"{hint}") from None
    if name is None:
        return
    shown = f"{shown_root}/{name}/checkpoint.pt"
    if "://" not in storage_root:
        check_checkpoint(load_state(f"{inner}/{run_name}/{name}/checkpoint.pt", mmap=True, hint=hint), shown)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt") as tmp:
        local = Path(tmp) / "checkpoint.pt"
        try:
            fs.get(f"{inner}/{run_name}/{name}/checkpoint.pt", str(local))
        except FileNotFoundError:
            raise CorruptFileError(shown, f"{shown}: missing; {hint}") from None
        try:
            check_checkpoint(load_state(local, hint=hint), shown)
        except UserError as err:
            raise CorruptFileError(shown, str(err).replace(str(local), shown)) from None


def _user_error_in(error: BaseException | None) -> UserError | None:
    """The UserError a worker raised, found inside Ray Train's error (WorkerGroupError's worker_failures,
    RayTaskError causes, exception chains); None when there is none."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures.values())
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


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

    # The filesystem is pickled to the Train controller and workers: it carries the endpoint only
    # (`filesystem` passes no credentials), and each process that unpickles it takes the credentials from
    # its own environment (the usual AWS chain), so no secret travels in Ray's run state.
    fs, inner = filesystem(root)
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


def train_on_ray(config: Config, train: str, run_dir: str | Path, settings: RayTrainSettings, *,
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
    cluster = bool(os.environ.get("RAY_ADDRESS"))
    if not cluster:  # a local Ray has this machine's GPUs and CPUs: refused before anything starts
        check_gpu_request(settings.num_workers, settings.gpus_per_worker)
        check_cpu_request(settings.num_workers, settings.cpus_per_worker)
    storage_path, storage_fs = _storage(settings.storage_root)
    run_name = settings.run_name or f"locdiff-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    check_ray_checkpoint(settings.storage_root, run_name)
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
        if cluster or not started_here:  # the GPUs the running Ray has (a cluster's, or one started earlier)
            check_gpu_request(settings.num_workers, settings.gpus_per_worker, available=_cluster_gpus(ray),
                              where=f"the Ray cluster{' at ' + os.environ['RAY_ADDRESS'] if cluster else ''}")
        return _fit(config, {"train": _absolute(train), "val": _absolute(val) if val else None,
                             "val_share": val_share}, run_dir, settings, storage_path, storage_fs, run_name,
                    use_gpu, resources)
    finally:
        if started_here:
            stop_local_ray()


def _fit(config: Config, data: dict[str, Any], run_dir: Path, settings: RayTrainSettings, storage_path: str,
         storage_fs: Any, run_name: str, use_gpu: bool, resources: dict[str, float]) -> RayTrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tracking_uri = None
    if settings.mlflow_run_id:
        tracking_uri = absolute_uri(resolve_tracking_uri(settings.tracking_uri))  # workers run elsewhere
        if urlsplit(tracking_uri).password or "@" in urlsplit(tracking_uri).netloc:
            raise ValueError("the MLflow tracking URI carries credentials (user:password@host), which Ray would "
                             "keep in its run state: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                             "instead")
    loop = {"config": config_to_dict(config), **data, "tracking_uri": tracking_uri,
            "mlflow_run_id": settings.mlflow_run_id, "per_worker_batch": settings.per_worker_batch,
            **fault_settings(),  # the tests' fault injection (from the environment), normally none
            "marker_dir": _absolute(run_dir / ".ray")}
    # No environment in the loop config (Ray keeps it in its run state): the workers have their own
    # (FORWARDED_ENV; train_on_ray's ensure_ray restarted a local Ray whose environment was out of date).
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=settings.max_failures,
                                                          controller_failure_limit=settings.controller_failure_limit),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    log.info("Ray Train: %d worker(s), %s per worker, run %s under %s", settings.num_workers, resources,
             run_name, settings.storage_root)
    result = trainer.fit()
    if result.error is not None:
        cause = _user_error_in(result.error)  # e.g. a damaged checkpoint: its one line, not Ray's wrapping
        if cause is not None:
            raise UserError(f"Ray training failed: {cause}") from None
        raise RuntimeError(f"Ray training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"Ray training of run {run_name} ended without a checkpoint")
    run = RunFolder(run_dir)
    with result.checkpoint.as_directory() as folder:
        state = load_state(Path(folder) / "checkpoint.pt")
        for key in TRACKER_STATE:
            state.pop(key, None)
        run.save_checkpoint(state)
        f = Path(folder) / "metrics.jsonl"
        write_text_atomic(run.file(METRICS), f.read_text() if f.exists() else "")
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return RayTrainResult(run_dir=run_dir, step=int(metrics.get("step", 0)), metrics=metrics,
                          storage_path=f"{settings.storage_root.rstrip('/')}/{run_name}",
                          restored_from_step=int(metrics.get("restored_from_step", 0)),
                          samples_per_s=float(metrics.get("samples_per_s", 0.0)))
