"""Shared fixtures: tiny synthetic data, one local Ray for the session, a SQLite MLflow store."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

REPO = Path(__file__).resolve().parents[2]
# The tiny model config, shortened further so that one training takes seconds on 2 cores.
TINY_OVERRIDES = ["train.steps=24", "train.checkpoint_every=8", "train.log_every=4", "train.batch_size=64",
                  "train.warmup_steps=4", "predict.samples=2", "predict.steps=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic benchmark at a tiny size: train/test/test_unseen Parquet embeddings tables."""
    from locdiff.synth import SynthConfig, write_benchmark

    out = tmp_path_factory.mktemp("synth")
    return write_benchmark(out, SynthConfig(n_train=600, n_test=60, n_unseen=40, dim=32, seed=0))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for every test of the session that trains in-process."""
    import ray

    from locdiff.distributed import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
