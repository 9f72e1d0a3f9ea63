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
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from locdiff.data.storage import filesystem
from locdiff.errors import CorruptFileError, UserError
from locdiff.runs import check_checkpoint, load_state

log = logging.getLogger(__name__)

FAULT_MARKER = "fault-injected"
# Environment the Ray processes need from the driver's: S3 endpoint and credentials, MLflow, LocDiff
# settings. It reaches them through their own environment, never through train_loop_config or a pickled
# object (Ray keeps those in its run state): a local Ray's processes inherit this process's environment
# (ensure_ray restarts the local Ray it started when these variables change); a cluster's nodes have their
# own (infra/k8s: Secrets), and the non-secret ones are also passed in the job's runtime_env.
FORWARDED_ENV = ("AWS_", "MLFLOW_", "LOCDIFF_")
# A forwarded variable whose name holds one of these is a secret: never put in a runtime_env.
SECRET_ENV_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "SESSION", "AUTH")


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


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's index of a run's checkpoints
MAX_SNAPSHOT_BYTES = 16 << 20


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpu_request(num_workers: int, gpus_per_worker: float, available: float | None = None,
                      where: str = "this machine") -> None:
    """Refuse, before any work, a GPU request that cannot run (a UserError saying what was asked and what
    exists): more GPUs than `available` (default: this machine's CUDA devices, for a local Ray), or a
    fractional share of a GPU with several workers (two DDP ranks on one GPU, which NCCL refuses)."""
    if num_workers < 1 or gpus_per_worker < 0:
        raise UserError(f"--workers must be >= 1 and --gpus-per-worker >= 0; got {num_workers} and "
                        f"{gpus_per_worker:g}")
    if gpus_per_worker == 0:
        return
    if num_workers > 1 and gpus_per_worker != int(gpus_per_worker):
        raise UserError(f"--gpus-per-worker {gpus_per_worker:g} with {num_workers} workers would put two "
                        "ranks on one GPU, which NCCL refuses; give each worker whole GPUs (1) or use one worker")
    need = num_workers * gpus_per_worker
    have = local_gpus() if available is None else available
    if have < need:
        raise UserError(f"--workers {num_workers} --gpus-per-worker {gpus_per_worker:g} asks for {need:g} GPU(s), "
                        f"but {where} has {have:g}; use fewer workers or GPUs, or leave out --gpus-per-worker "
                        "to train on the CPUs")


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


def ensure_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Connect to RAY_ADDRESS when set, else start a local Ray once (127.0.0.1 only, token auth).

    A local Ray listens on 127.0.0.1 only (its dashboard too) and uses Ray's token authentication with a
    token made for this process (RAY_AUTH_TOKEN, unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set);
    its processes inherit this process's environment, credentials included. When the AWS_/MLFLOW_/
    LOCDIFF_ variables changed since the local Ray this process started, it is restarted so that its
    workers see the new values. A cluster (RAY_ADDRESS) gets the non-secret ones in the job's runtime_env
    and authenticates with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (infra/README.md).
    """
    import ray

    if ray.is_initialized():
        changed = _local_env_changed(ray)
        if not changed:
            return
        log.info("%s changed since the local Ray started: restarting it so that its workers see the new "
                 "values", ", ".join(changed))
        stop_local_ray()
        ray.shutdown()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _cluster_auth()  # its refusals say what to fix themselves
    try:
        if address:
            runtime_env = dict(kwargs.pop("runtime_env", None) or {})
            env_vars = {**_worker_env(secrets=False), **(runtime_env.get("env_vars") or {})}
            if env_vars:
                runtime_env["env_vars"] = env_vars
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env or None, **kwargs)
        else:
            _local_auth()
            if "_temp_dir" not in kwargs:  # short (socket paths), removed when this process ends
                kwargs["_temp_dir"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
                atexit.register(_remove_ray_temp, kwargs["_temp_dir"])
                _LOCAL_TEMP.append(kwargs["_temp_dir"])
            kwargs.setdefault("dashboard_host", "127.0.0.1")  # the State API (used by Ray Train) needs it
            kwargs.setdefault("_node_ip_address", "127.0.0.1")
            if sys.platform == "linux" and os.path.exists("/sys/class/net/lo"):
                # torch.distributed's gloo (the CPU DDP backend) then connects ranks over loopback too
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            t0 = time.monotonic()
            log.info("starting a local Ray (%d CPUs, 127.0.0.1 only); its processes take a minute or so to "
                     "start on a small machine", num_cpus or os.cpu_count())
            with _loopback_only():
                ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
            log.info("local Ray ready in %.0f s", time.monotonic() - t0)
            _LOCAL_STARTED.update(gcs=ray.get_runtime_context().gcs_address, env=_worker_env())
            node_ip = ray.util.get_node_ip_address()
            if node_ip not in ("127.0.0.1", "::1"):
                log.warning("the local Ray runs on %s, not 127.0.0.1: other hosts may reach it", node_ip)
    except Exception as err:  # noqa: BLE001 - name what to fix
        where = f"the cluster at RAY_ADDRESS={address}" if address else "a local Ray instance"
        auth = (" If the cluster uses token authentication, set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                "(infra/README.md)." if address else "")
        raise RayUnavailable(f"cannot start or reach {where}: {err}. Check RAY_ADDRESS (unset it to run "
                             f"locally) and that the head node is up (`ray status`).{auth}") from err


_LOCAL_TEMP: list[str] = []  # temp dirs of local Ray instances this process started
_LOCAL_STARTED: dict[str, Any] = {}  # the local Ray ensure_ray started: its GCS address and environment


def _is_secret(name: str, value: str) -> bool:
    """A credential: by its name, or a URL carrying user:password@."""
    from urllib.parse import urlsplit

    if any(m in name.upper() for m in SECRET_ENV_MARKERS):
        return True
    try:
        return "@" in urlsplit(value).netloc
    except ValueError:
        return True  # not parseable: do not forward it


def _worker_env(*, secrets: bool = True) -> dict[str, str]:
    """The forwarded part of this process's environment (without the secrets when `secrets` is False)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    return env if secrets else {k: v for k, v in env.items() if not _is_secret(k, v)}


def _local_env_changed(ray: Any) -> list[str]:
    """The forwarded variables (names) that changed since ensure_ray started the running local Ray."""
    if not _LOCAL_STARTED:
        return []
    try:
        if ray.get_runtime_context().gcs_address != _LOCAL_STARTED["gcs"]:
            return []  # not the one started here: leave it alone
    except Exception:  # noqa: BLE001 - not ours: leave it alone
        return []
    now, then = _worker_env(), _LOCAL_STARTED["env"]
    return sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k) and k not in _NO_RESTART)


# MLflow's client sets these itself (the workers get the tracking URI and run id in the loop config):
# a change is no reason to restart the local Ray.
_NO_RESTART = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")


def _refresh_ray_auth() -> None:
    """Make an imported Ray see RAY_AUTH_* changes (Ray reads them once, at import or first init)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as err:  # another Ray version: it reads the environment itself
        log.debug("could not refresh Ray's auth settings: %s", err)


def _local_auth() -> None:
    """Token authentication for a local Ray, with a token made for this process when none is set."""
    import secrets

    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode and mode != "token":
        log.warning("RAY_AUTH_MODE=%s ignored: the local Ray always uses token authentication", mode)
    os.environ["RAY_AUTH_MODE"] = "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN") and not _token_file_ok(path):
        log.warning("RAY_AUTH_TOKEN_PATH=%s holds no token; the local Ray uses a token of its own", path)
        path = None
    if not (os.environ.get("RAY_AUTH_TOKEN") or path):
        # Inherited by this process's children (Ray's own processes, a flow's subprocesses), not logged.
        # RAY_AUTH_TOKEN comes first in Ray's search, before RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    _refresh_ray_auth()


def _cluster_auth() -> None:
    """Token mode for a cluster when a token is configured (Ray's defaults otherwise). Turning
    authentication off is refused: a cluster reachable without a token runs anyone's code."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        raise ValueError(f"RAY_AUTH_MODE is 'disabled': refusing to connect to {os.environ.get('RAY_ADDRESS')} "
                         "without token authentication; run the cluster with RAY_AUTH_MODE=token and set "
                         "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH here (infra/README.md)")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN") and not _token_file_ok(path):
        # Ray aborts the process on an unreadable token file: say what to fix instead.
        raise ValueError(f"RAY_AUTH_TOKEN_PATH={path}: no readable, non-empty token file; point it at the "
                         "cluster's token (infra/README.md) or set RAY_AUTH_TOKEN")
    default = Path.home() / ".ray" / "auth_token"
    if not mode and (os.environ.get("RAY_AUTH_TOKEN") or path or default.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
        _refresh_ray_auth()


def _token_file_ok(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return bool(f.read(4096).strip())
    except OSError:
        return False


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """During a local ray.init: Ray resolves 127.0.0.1 to the machine's address (and then listens on every
    interface) unless it runs in single-machine mode, which this turns on for the start."""
    try:
        from ray._private import ray_constants
    except ImportError:  # another Ray version: the warning after the start tells
        yield
        return
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved


def _remove_ray_temp(path: str) -> None:
    import shutil

    import ray

    ray.shutdown()
    shutil.rmtree(path, ignore_errors=True)


def stop_local_ray() -> None:
    """Stop the local Ray this process started (and remove its temp dir); a cluster is left alone."""
    while _LOCAL_TEMP:
        _remove_ray_temp(_LOCAL_TEMP.pop())
    _LOCAL_STARTED.clear()


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

    from locdiff.data.storage import filesystem

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


class RayStore:
    """Checkpoints in Ray Train's storage (local folder or s3://): rank 0 reports the engine's state and
    the metrics log as a `ray.train.Checkpoint`, the other ranks report without one. Per-step loss and
    lr go to MLflow at every checkpoint (each step exactly once across restarts)."""

    def __init__(self, rank: int, loop: dict[str, Any]) -> None:
        self.rank, self.loop = rank, loop
        self.history: list[dict[str, Any]] = []
        self.flushed = 0
        self.where: str | None = None  # the checkpoint resumed from

    def load(self, map_location: Any) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return None if ckpt is None else self.restore(ckpt, map_location)

    def restore(self, ckpt: Any, map_location: Any = "cpu") -> dict[str, Any]:
        """The engine's state from a `ray.train.Checkpoint` (weights only: a pickle payload is refused)."""
        from locdiff.runs import check_checkpoint, load_state

        self.where = f"{ckpt.path}/checkpoint.pt"  # named in the engine's errors about it
        with ckpt.as_directory() as folder:
            state = load_state(Path(folder) / "checkpoint.pt", map_location)
            check_checkpoint(state, self.where)
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
    cluster = bool(os.environ.get("RAY_ADDRESS"))
    if not cluster:  # a local Ray has this machine's GPUs: refused before anything starts
        check_gpu_request(settings.num_workers, settings.gpus_per_worker)
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
        from urllib.parse import urlsplit

        if urlsplit(tracking_uri).password or "@" in urlsplit(tracking_uri).netloc:
            raise ValueError("the MLflow tracking URI carries credentials (user:password@host), which Ray would "
                             "keep in its run state: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                             "instead")
    loop = {"config": config_to_dict(config), **data, "tracking_uri": tracking_uri,
            "mlflow_run_id": settings.mlflow_run_id, "per_worker_batch": settings.per_worker_batch,
            "fault_kill_at_step": settings.fault_kill_at_step, "trace_dir": settings.trace_dir,
            "marker_dir": _absolute(run_dir / ".ray")}
    # No environment in the loop config (Ray keeps it in its run state): the workers have their own
    # (FORWARDED_ENV; train_on_ray's ensure_ray restarted a local Ray whose environment was out of date).
    trainer = TorchTrainer(
        _train_loop,
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
