"""Ray Train with 2 CPU workers: trains, checkpoints to the storage root, survives a killed worker."""

from __future__ import annotations

import json

import pytest
import torch

from locdiff.distributed import FAULT_MARKER, RayTrainSettings, train_on_ray
from locdiff.model.config import config_from_dict
from locdiff.orchestration.ray_session import FAULT_KILL_ENV, TRACE_ENV

SMALL = {"shdd": {"degree": 6}, "network": {"widths": [32, 16], "cond_dim": 32, "time_dim": 16},
         "train": {"steps": 24, "batch_size": 64, "checkpoint_every": 8, "log_every": 4, "warmup_steps": 4,
                   "val_share": 0.0}}


@pytest.fixture()
def s3_root(moto_s3):
    """The session's S3 endpoint (moto server on 127.0.0.1) with a bucket; yields the s3:// storage root."""
    from tests.conftest import make_bucket

    make_bucket(moto_s3, "ckpt")
    return "s3://ckpt/locdiff"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_worker_resumes_from_checkpoint(where, ray_local, tiny_data, tmp_path, mlflow_uri, request,
                                               monkeypatch):
    """One worker SIGKILLs itself at step 13 (mid-epoch, after the step-8 checkpoint, first attempt only):
    Ray restarts the group, training resumes at step 8 from the checkpoint in the storage root (a local
    folder, or S3 through a moto server) at the exact stream position and completes; every training row
    is seen exactly once per epoch, the replayed steps see the same rows as before the kill, and MLflow
    gets each step's loss exactly once."""
    from locdiff import tracking
    from locdiff.data.stream import BatchStream, open_source
    from locdiff.model.locdiff_method import LocDiffMethod

    config = config_from_dict(SMALL)
    storage = tmp_path / "store" if where == "local" else request.getfixturevalue("s3_root")
    trace = tmp_path / "trace"
    trace.mkdir()
    # the fault injection reaches the workers from the driver's environment, not through a signature
    monkeypatch.setenv(FAULT_KILL_ENV, "13")
    monkeypatch.setenv(TRACE_ENV, str(trace))
    with tracking.training_run({"x": 1}) as run_id:
        settings = RayTrainSettings(num_workers=2, storage_root=str(storage), max_failures=2,
                                    mlflow_run_id=run_id)
        result = train_on_ray(config, str(tiny_data["train"]), tmp_path / "run", settings)

    assert (tmp_path / "run" / ".ray" / FAULT_MARKER).exists()  # the worker really was killed
    assert result.step == 24 and result.restored_from_step == 8
    from locdiff.data.storage import filesystem

    fs, inner = filesystem(result.storage_path)
    ckpts = [p for p in fs.ls(inner, detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint_2")]
    assert len(ckpts) == 2  # CheckpointConfig(num_to_keep=2) under the storage root
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 24 and set(state) >= {"model", "ema", "optimizer", "lr_scheduler", "rng", "position"}
    assert not set(state) & {"mlflow_flushed", "mlflow_pending"}  # the tracker's entries stay in Ray's storage
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(4, 25, 4))

    # exactly once per epoch, counted from the ids each rank trained on (the last record of a step wins)
    per_step: dict[tuple[int, int], list[str]] = {}
    replayed = 0
    for rank in range(2):
        for line in (trace / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if (rank, rec["step"]) in per_step:
                assert per_step[(rank, rec["step"])] == rec["ids"]  # the replay reads the same rows
                replayed += 1
            per_step[(rank, rec["step"])] = rec["ids"]
    assert replayed >= 2 * 4  # steps 9..12 (at least) ran twice on both ranks
    src = open_source(str(tiny_data["train"]))
    per_epoch = BatchStream(src, 32, world_size=2).steps_per_epoch
    all_ids = set(src.read_all().ids)
    for epoch in range(24 // per_epoch):
        ids = [i for (r, st), v in per_step.items() if (st - 1) // per_epoch == epoch for i in v]
        assert len(ids) == len(all_ids) and set(ids) == all_ids, epoch

    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(4, 25, 4))

    # The run folder is in `locdiff train`'s format: the single-process fit only finalizes it.
    out = LocDiffMethod(config).fit(str(tiny_data["train"]), None, tmp_path / "run", progress=False)
    assert "loss" in out
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 24


def test_storage_root_without_permission_is_a_clear_error(tmp_path):
    settings = RayTrainSettings(storage_root="/sys/locdiff-no-permission")
    with pytest.raises(PermissionError, match="storage root .*locdiff-no-permission"):
        train_on_ray(config_from_dict(SMALL), "unused.parquet", tmp_path / "run", settings)
