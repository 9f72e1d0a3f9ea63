"""Distributed training on Ray (kept for its importers): the pieces now live in `locdiff.orchestration`.

- `ray_session`: `ensure_ray`, `stop_local_ray`, `RayUnavailable`, `check_gpu_request`, `local_gpus`;
- `ray_train`: `RayTrainSettings`, `RayTrainResult`, `train_on_ray`, `check_ray_checkpoint`;
- `ray_worker`: `RayStore` and the function every Ray Train worker runs.
"""

from __future__ import annotations

from locdiff.orchestration.ray_session import (
    FORWARDED_ENV,
    SECRET_ENV_MARKERS,
    RayUnavailable,
    check_gpu_request,
    ensure_ray,
    local_gpus,
    stop_local_ray,
)
from locdiff.orchestration.ray_train import (
    RAY_SNAPSHOT,
    RayTrainResult,
    RayTrainSettings,
    _user_error_in,
    check_ray_checkpoint,
    train_on_ray,
)
from locdiff.orchestration.ray_worker import FAULT_MARKER, RayStore

__all__ = ["FAULT_MARKER", "FORWARDED_ENV", "RAY_SNAPSHOT", "SECRET_ENV_MARKERS", "RayStore", "RayTrainResult",
           "RayTrainSettings", "RayUnavailable", "_user_error_in", "check_gpu_request", "check_ray_checkpoint",
           "ensure_ray", "local_gpus", "stop_local_ray", "train_on_ray"]
