"""Ray Train with 2 CPU workers: trains, checkpoints to the storage root, survives a killed worker."""

from __future__ import annotations

import json

import pytest
import torch

from locdiff.distributed import FAULT_MARKER, RayTrainSettings, train_on_ray
from locdiff.model.config import config_from_dict

SMALL = {"shdd": {"degree": 6}, "network": {"widths": [32, 16], "cond_dim": 32, "time_dim": 16},
         "train": {"steps": 24, "batch_size": 64, "checkpoint_every": 8, "log_every": 4, "warmup_steps": 4}}


@pytest.fixture()
def s3_root(monkeypatch):
    """A real S3 endpoint (moto server on 127.0.0.1) with a bucket; yields the s3:// storage root."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from tests.orchestration.conftest import free_port

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpt")
    yield "s3://ckpt/locdiff"
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_worker_resumes_from_checkpoint(where, ray_local, tiny_data, tmp_path, mlflow_uri, request):
    """One worker SIGKILLs itself at step 13 (after the step-8 checkpoint, first attempt only): Ray
    restarts the group, training resumes at step 8 from the checkpoint in the storage root (a local
    folder, or S3 through a moto server) and completes; MLflow gets each step's loss exactly once."""
    from locdiff import tracking
    from locdiff.io import read_embeddings
    from locdiff.model.train import fit

    config = config_from_dict(SMALL)
    storage = tmp_path / "store" if where == "local" else request.getfixturevalue("s3_root")
    with tracking.training_run({"x": 1}) as run_id:
        settings = RayTrainSettings(num_workers=2, storage_root=str(storage), max_failures=2,
                                    mlflow_run_id=run_id, fault_kill_at_step=13)
        result = train_on_ray(config, str(tiny_data["train"]), tmp_path / "run", settings)

    assert (tmp_path / "run" / ".ray" / FAULT_MARKER).exists()  # the worker really was killed
    assert result.step == 24 and result.restored_from_step == 8
    from locdiff.data.storage import filesystem

    fs, inner = filesystem(result.storage_path)
    ckpts = [p for p in fs.ls(inner, detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint_2")]
    assert len(ckpts) == 2  # CheckpointConfig(num_to_keep=2) under the storage root
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 24 and set(state) >= {"model", "ema", "optimizer", "lr_scheduler", "rng"}
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25))

    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 25))
    assert {m.step for m in MlflowClient().get_metric_history(run_id, "lr")} == set(range(1, 25))

    # The run folder is in `locdiff train`'s format: the single-process fit resumes it at the end.
    table = read_embeddings(tiny_data["train"])
    out = fit(config, table, None, tmp_path / "run", progress=False)
    assert out.step == 24


def test_storage_root_without_permission_is_a_clear_error(tmp_path):
    settings = RayTrainSettings(storage_root="/sys/locdiff-no-permission")
    with pytest.raises(PermissionError, match="storage root .*locdiff-no-permission"):
        train_on_ray(config_from_dict(SMALL), "unused.parquet", tmp_path / "run", settings)


@pytest.mark.parametrize("shard_size", [1000, 128])  # 1 shard: rows dealt by rank; 5 shards: shards
def test_rank_split_reads_every_row_once(tiny_data, tmp_path, shard_size):
    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest
    from locdiff.distributed import _rank_table

    cfg = load_dataset_config("embeddings", shard_size=shard_size)
    ingest("t", str(tmp_path), source=str(tiny_data["train"]), config=cfg, progress=False)
    folder = str(tmp_path / "t" / "features" / cfg.encoder)
    parts = [_rank_table(folder, rank, 2) for rank in range(2)]
    ids = [i for table, _ in parts for i in table.ids]
    assert parts[0][1] == 600 and len(ids) == 600 and len(set(ids)) == 600
    assert all(len(table) >= 200 for table, _ in parts)
