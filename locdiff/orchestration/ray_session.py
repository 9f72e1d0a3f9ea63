"""The Ray session: start a local Ray (127.0.0.1 only, token authentication) or connect to the cluster at
RAY_ADDRESS, forward the environment the Ray processes need, and check GPU requests against what exists.
Used by training on Ray Train (`locdiff.orchestration.ray_train`) and by embedding on Ray Data
(`locdiff.embed.ray_runner`). Ray itself is imported inside functions (an optional heavy library).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from locdiff.errors import UserError

log = logging.getLogger(__name__)

# Environment the Ray processes need from the driver's: S3 endpoint and credentials, MLflow, LocDiff
# settings. It reaches them through their own environment, never through train_loop_config or a pickled
# object (Ray keeps those in its run state): a local Ray's processes inherit this process's environment
# (ensure_ray restarts the local Ray it started when these variables change); a cluster's nodes have their
# own (infra/k8s: Secrets), and the non-secret ones are also passed in the job's runtime_env.
FORWARDED_ENV = ("AWS_", "MLFLOW_", "LOCDIFF_")
# A forwarded variable whose name holds one of these is a secret: never put in a runtime_env.
SECRET_ENV_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "SESSION", "AUTH")


class RayUnavailable(RuntimeError):
    """Ray could not be started or reached."""


def local_gpus() -> int:
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


def local_cpus() -> int:
    """The CPUs this process may use (its affinity where the platform has one, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_cpu_request(num_workers: int, cpus_per_worker: float = 1.0) -> None:
    """Refuse, before any work, more Ray workers than a local Ray on this machine can run (a UserError): the
    workers times their CPUs against the CPUs this process may use, at least 2 (the demo's 2 workers run on
    small machines). A cluster's (RAY_ADDRESS) are not checked here."""
    need = num_workers * cpus_per_worker
    have = max(2, local_cpus())
    if need > have:
        raise UserError(f"--workers {num_workers} with {cpus_per_worker:g} CPU each asks for {need:g} CPUs, but "
                        f"this machine has {have} for a local Ray; use fewer workers, or set RAY_ADDRESS to "
                        "train on a Ray cluster")


def _cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))



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
# The fault-injection settings of the tests (`locdiff.orchestration.ray_worker`) are read by the driver and
# passed to the workers in the loop config: no reason either.
FAULT_KILL_ENV = "LOCDIFF_FAULT_KILL_AT_STEP"  # the last rank SIGKILLs itself once at this global step
TRACE_ENV = "LOCDIFF_TRACE_DIR"  # each rank appends the ids of every batch to TRACE_DIR/rankR.jsonl
_NO_RESTART = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI",
               FAULT_KILL_ENV, TRACE_ENV)


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
    import ray

    ray.shutdown()
    shutil.rmtree(path, ignore_errors=True)


def stop_local_ray() -> None:
    """Stop the local Ray this process started (and remove its temp dir); a cluster is left alone."""
    while _LOCAL_TEMP:
        _remove_ray_temp(_LOCAL_TEMP.pop())
    _LOCAL_STARTED.clear()

