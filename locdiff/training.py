"""Train one method into one run folder: the path `locdiff train` and the pipeline share.

The run is one `RunSpec` (locdiff.orchestration.spec), built at the boundary:
1. the config is validated and the folder checked for a compatible earlier run: its config, and its
   checkpoint (readable, complete, trained on embeddings of the data's dimension); nothing is written
   before these pass, and a fresh run that fails before its first checkpoint leaves no file behind;
2. the data is opened as streams (a validation share is held out when no validation set is given) and
   the completion key computed from the resolved config and the data identities; a complete run with
   the same key is skipped;
3. the method trains with the engine, in this process or on Ray Train (`workers` > 0), resuming from the
   folder's or the Ray storage's last checkpoint, then finalizes (validation choices, the gallery);
4. run.json records the key, the data, the encoder and the metrics, last.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locdiff.engine import resolve_device
from locdiff.errors import UserError
from locdiff.methods import get_method
from locdiff.model.config import Config, config_to_dict
from locdiff.orchestration.ray_session import check_cpu_request, check_gpu_request, local_gpus
from locdiff.orchestration.ray_train import RayTrainResult, RayTrainSettings, train_on_ray
from locdiff.orchestration.spec import RunSpec
from locdiff.runs import RunFolder, encoder_record

log = logging.getLogger(__name__)

MAX_WORKERS, MAX_GPUS_PER_WORKER = 1024, 64  # the bounds of a training's Ray workers and GPUs per worker


@dataclass
class TrainOutcome:
    run: RunFolder
    record: dict[str, Any]
    skipped: bool  # a complete run with the same key was found
    ray: RayTrainResult | None = None  # when trained on Ray


def check_devices(config: Config, workers: int = 0, gpus_per_worker: float = 0.0,
                  cpus_per_worker: float = 1.0) -> None:
    """Before any work (nothing is written when it refuses): the devices a training asks for exist.

    With `workers`, the GPUs and CPUs of the Ray workers (`ray_session.check_gpu_request`,
    `check_cpu_request`: a local Ray's; a cluster's GPUs are checked once connected). Without,
    `gpus_per_worker` > 0 means this process on this machine's GPU: refused when there is none, more than
    one is asked for, or train.device says cpu. train.device itself (used in this
    process: the training, or the final step after Ray) must name a device that exists. A count below 0 or
    past MAX_WORKERS / MAX_GPUS_PER_WORKER is refused first (a negative count is not "no Ray").
    """
    if not 0 <= workers <= MAX_WORKERS:
        raise UserError(f"workers: must be an integer in [0, {MAX_WORKERS}]; got {workers}")
    if not 0 <= gpus_per_worker <= MAX_GPUS_PER_WORKER:
        raise UserError(f"gpus_per_worker: must be a number in [0, {MAX_GPUS_PER_WORKER}]; got {gpus_per_worker:g}")
    if workers > 0:
        if not os.environ.get("RAY_ADDRESS"):
            check_gpu_request(workers, gpus_per_worker)
            check_cpu_request(workers, cpus_per_worker)
    elif gpus_per_worker > 0:
        have = local_gpus()
        if gpus_per_worker > 1:
            raise UserError(f"--gpus-per-worker {gpus_per_worker:g} without --workers: one process trains on "
                            "one GPU; use --workers N --gpus-per-worker 1 for several")
        if have == 0:
            raise UserError(f"--gpus-per-worker {gpus_per_worker:g} without --workers trains in this process on "
                            "its GPU, but this machine has no CUDA GPU (0 visible); leave out --gpus-per-worker "
                            "to train on the CPU, or add --workers N for a Ray cluster's GPUs (RAY_ADDRESS)")
        if config.train.device == "cpu":
            raise UserError(f"--gpus-per-worker {gpus_per_worker:g} asks for the GPU, but train.device is cpu; "
                            "set train.device=auto or cuda, or leave out --gpus-per-worker")
    resolve_device(config.train.device)


def throughput_line(metrics: dict[str, Any]) -> str:
    """The training throughput of a run's metrics as one line ("" when it has none): samples/s over the
    training steps, the peak GPU memory and the MFU where measured."""
    if not metrics.get("samples_per_s"):
        return ""
    parts = [f"throughput: {metrics['samples_per_s']:.1f} samples/s"]
    if "peak_gpu_memory_gib" in metrics:
        parts.append(f"peak GPU memory {metrics['peak_gpu_memory_gib']:.2f} GiB")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    return ", ".join(parts)


def _method_config(config: Config) -> Any:
    return config if config.method == "locdiff" else config_to_dict(config)


def train_run(config: Config, train: Any, out: str | Path, *, val: Any = None, val_unseen: Any = None,
              encoder: str | None = None, workers: int = 0, ray_settings: RayTrainSettings | None = None,
              progress: bool = True, max_steps_this_run: int | None = None,
              before_training: Callable[[RunFolder], None] | None = None) -> TrainOutcome:
    """Train `config.method` on `train` into the run folder `out` (see the module docstring): `run` of
    the `RunSpec` these arguments describe.

    Args:
        train, val: paths/URLs of features folders or embeddings tables, or EmbeddingTables.
        val_unseen: the same, validation rows from regions absent from `train` (LocDiff-H's choice).
        encoder: the encoder that made a table's embeddings (a features folder's manifest says it itself).
        workers, ray_settings, progress, max_steps_this_run, before_training: as for `run`.
    """
    spec = RunSpec.build(config, train, out, val=val, val_unseen=val_unseen, encoder=encoder)
    return run(spec, workers=workers, ray_settings=ray_settings, progress=progress,
               max_steps_this_run=max_steps_this_run, before_training=before_training)


def run(spec: RunSpec, *, workers: int = 0, ray_settings: RayTrainSettings | None = None, progress: bool = True,
        max_steps_this_run: int | None = None,
        before_training: Callable[[RunFolder], None] | None = None) -> TrainOutcome:
    """Train the run `spec` describes into its run folder (see the module docstring).

    Args:
        workers: > 0 trains on Ray Train with this many workers (`ray_settings`: a RayTrainSettings).
        max_steps_this_run: stop after this many steps (with a checkpoint), as an interruption would.
        before_training: called with the run folder once the run is known to need training (the
            pipeline opens its MLflow run there).
    """
    config, source, vsrc = spec.config, spec.source, spec.val_source
    if spec.run_dir is None or source is None:
        raise ValueError("a RunSpec needs its run folder and opened data (RunSpec.build(...).at(RUN_DIR))")
    check_devices(config, workers, float(getattr(ray_settings, "gpus_per_worker", 0.0)),
                  float(getattr(ray_settings, "cpus_per_worker", 1.0)))
    run = RunFolder(spec.run_dir)
    run.check_compatible(spec.resolved)
    if run.is_complete(spec.key):
        log.info("%s: complete for this config and data; nothing to train", run.path)
        return TrainOutcome(run, run.record(), skipped=True)
    enc = encoder_record(source.manifest, name=spec.encoder, dim=source.dim)
    if source.manifest is not None and spec.encoder and enc.get("name") != spec.encoder:
        raise ValueError(f"--encoder {spec.encoder}: {source.location} was embedded with {enc.get('name')!r} "
                         "(its manifest says so); leave out --encoder for a features folder")
    method = get_method(config.method).from_config(_method_config(config))
    if method.trains:  # a damaged checkpoint, or one of other data, is refused before anything is written
        run.check_resumable(source.dim, source.location or "the data")
    with run.removed_if_unstarted():  # a fresh run that fails before its first checkpoint leaves nothing
        run.remove_partial_files()
        run.clear_record()
        run.write_config(config)
        if before_training is not None:
            before_training(run)
        ray_result = None
        if workers > 0 and method.trains:
            settings = ray_settings or RayTrainSettings()
            settings.num_workers = workers
            state = run.load_checkpoint()
            if state is not None and int(state["step"]) >= method.settings(source).steps:
                log.info("%s: checkpoint at the final step %d; Ray training skipped", run.path, state["step"])
            elif isinstance(spec.train, str | Path):
                val = spec.val
                ray_result = train_on_ray(config, str(spec.train), run.path, settings,
                                          val=str(val) if isinstance(val, str | Path) else None,
                                          val_share=config.train.val_share if val is None else 0.0)
            else:
                raise ValueError("--workers needs the training data as a path or URL")
        metrics = method.fit(source, vsrc, run.path, progress=progress, max_steps_this_run=max_steps_this_run,
                             val_unseen=spec.val_unseen)
        state = run.load_checkpoint()
        step = int(state["step"]) if state is not None else 0
        steps = method.settings(source).steps if method.trains else 0
        record = {"key": spec.key, "complete": step >= steps, "method": config.method, "step": step,
                  "data": dict(spec.data),
                  "data_location": {"train": getattr(source, "location", None),
                                    "val": getattr(vsrc, "location", None)},
                  "encoder": enc, "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}}
        if ray_result is not None:
            record.update({"restored_from_step": ray_result.restored_from_step,
                           "samples_per_s": ray_result.samples_per_s, "ray_storage": ray_result.storage_path})
        if record["complete"]:
            run.write_record(record)
        return TrainOutcome(run, record, skipped=False, ray=ray_result)
