"""Train one method into one run folder: the path `locdiff train` and the pipeline share.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locdiff.distributed import check_gpu_request, local_gpus
from locdiff.engine import resolve_device
from locdiff.errors import UserError
from locdiff.model.config import Config, config_to_dict
from locdiff.runs import RunFolder, absolute_location, completion_key, encoder_record

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run: RunFolder
    record: dict[str, Any]
    skipped: bool  # a complete run with the same key was found
    ray: Any = None  # the RayTrainResult when trained on Ray


def check_devices(config: Config, workers: int = 0, gpus_per_worker: float = 0.0) -> None:
    """Before any work (nothing is written when it refuses): the devices a training asks for exist.

    With `workers`, the GPUs of the Ray workers (`distributed.check_gpu_request`; a cluster's are checked
    once connected). Without, `gpus_per_worker` > 0 means this process on this machine's GPU: refused when
    there is none, more than one is asked for, or train.device says cpu. train.device itself (used in this
    process: the training, or the final step after Ray) must name a device that exists.
    """
    if workers > 0:
        if not os.environ.get("RAY_ADDRESS"):
            check_gpu_request(workers, gpus_per_worker)
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
              encoder: str | None = None, workers: int = 0, ray_settings: Any = None, progress: bool = True,
              max_steps_this_run: int | None = None, before_training: Any = None) -> TrainOutcome:
    """Train `config.method` on `train` into the run folder `out` (see the module docstring).

    Args:
        train, val: paths/URLs of features folders or embeddings tables, or EmbeddingTables.
        val_unseen: the same, validation rows from regions absent from `train` (LocDiff-H's choice).
        encoder: the encoder that made a table's embeddings (a features folder's manifest says it itself).
        workers: > 0 trains on Ray Train with this many workers (`ray_settings`: a RayTrainSettings).
        before_training: called with the run folder once the run is known to need training (the
            pipeline opens its MLflow run there).
    """
    from locdiff.methods import get_method, prepare_data

    check_devices(config, workers, float(getattr(ray_settings, "gpus_per_worker", 0.0)))
    train, val = absolute_location(train), absolute_location(val)  # recorded: found again from anywhere
    resolved = config_to_dict(config)
    run = RunFolder(out)
    run.check_compatible(resolved)
    source, vsrc = prepare_data(train, val, val_share=config.train.val_share, seed=config.train.seed)
    data = {"train": source.identity(), "val": vsrc.identity() if vsrc is not None else None}
    if val_unseen is not None:  # only then: the completion keys of runs without it stay as they were
        val_unseen = absolute_location(val_unseen)
        data["val_unseen"] = prepare_data(source, val_unseen)[1].identity()
    key = completion_key(resolved, data)
    if run.is_complete(key):
        log.info("%s: complete for this config and data; nothing to train", run.path)
        return TrainOutcome(run, run.record(), skipped=True)
    enc = encoder_record(source.manifest, name=encoder, dim=source.dim)
    if source.manifest is not None and encoder and enc.get("name") != encoder:
        raise ValueError(f"--encoder {encoder}: {source.location} was embedded with {enc.get('name')!r} "
                         "(its manifest says so); leave out --encoder for a features folder")
    method = get_method(config.method).from_config(_method_config(config))
    if method.trains:  # a damaged checkpoint, or one of other data, is refused before anything is written
        run.check_resumable(source.dim, source.location or "the data")
    with run.removed_if_unstarted():  # a fresh run that fails before its first checkpoint leaves nothing
        run.clear_record()
        run.write_config(config)
        if before_training is not None:
            before_training(run)
        ray_result = None
        if workers > 0 and method.trains:
            from locdiff.distributed import RayTrainSettings, train_on_ray

            settings = ray_settings or RayTrainSettings()
            settings.num_workers = workers
            state = run.load_checkpoint()
            if state is not None and int(state["step"]) >= method.settings(source).steps:
                log.info("%s: checkpoint at the final step %d; Ray training skipped", run.path, state["step"])
            else:
                if isinstance(train, str | Path):
                    ray_result = train_on_ray(config, str(train), run.path, settings,
                                              val=str(val) if isinstance(val, str | Path) else None,
                                              val_share=config.train.val_share if val is None else 0.0)
                else:
                    raise ValueError("--workers needs the training data as a path or URL")
        metrics = method.fit(source, vsrc, run.path, progress=progress, max_steps_this_run=max_steps_this_run,
                             val_unseen=val_unseen)
        state = run.load_checkpoint()
        step = int(state["step"]) if state is not None else 0
        steps = method.settings(source).steps if method.trains else 0
        record = {"key": key, "complete": step >= steps, "method": config.method, "step": step, "data": data,
                  "data_location": {"train": getattr(source, "location", None),
                                    "val": getattr(vsrc, "location", None)},
                  "encoder": enc, "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}}
        if ray_result is not None:
            record.update({"restored_from_step": ray_result.restored_from_step,
                           "samples_per_s": ray_result.samples_per_s, "ray_storage": ray_result.storage_path})
        if record["complete"]:
            run.write_record(record)
        return TrainOutcome(run, record, skipped=False, ray=ray_result)
