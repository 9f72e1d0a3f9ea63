"""Shared fixtures: tiny synthetic data, one local Ray for the session, a SQLite MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

REPO = Path(__file__).resolve().parents[2]
# The tiny model config, shortened further so that one training takes seconds on 2 cores.
TINY_OVERRIDES = ["train.steps=24", "train.checkpoint_every=8", "train.log_every=4", "train.batch_size=64",
                  "train.warmup_steps=4", "predict.samples=2", "predict.steps=4"]


from tests.conftest import free_port  # noqa: E402,F401 - the shared helper, re-exported for these tests


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic benchmark at a tiny size: train/test/test_unseen Parquet embeddings tables."""
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    out = tmp_path_factory.mktemp("synth")
    return write_benchmark(out, SynthConfig(n_train=600, n_test=60, n_unseen=40, dim=32, seed=0))


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
