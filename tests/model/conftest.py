"""Small synthetic data and a tiny config for the model tests (seeded; seconds on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from locdiff.model.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "model" / "tiny.yaml"

# Even smaller than tiny.yaml, so that every test trains in seconds.
TEST_OVERRIDES = [
    "shdd.degree=8",
    "shdd.kl_grid_size=162",
    "network.widths=[64,32]",
    "network.cond_dim=64",
    "network.time_dim=32",
    "train.steps=200",
    "train.batch_size=128",
    "train.lr=0.003",
    "train.warmup_steps=20",
    "train.checkpoint_every=100",
    "train.log_every=20",
    "train.ema_decay=0.98",
    "train.val_samples=128",
    "predict.samples=4",
    "predict.steps=5",
    "predict.batch_size=128",
    "predict.support_radius_km=1000",
]


@pytest.fixture(scope="session")
def synth_tables():
    from locdiff.worlds.synth import SynthConfig, make_benchmark

    return make_benchmark(SynthConfig(n_train=4000, n_val=300, n_test=400, n_unseen=200, dim=32, seed=3))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory, synth_tables):
    from locdiff.io import write_embeddings

    out = tmp_path_factory.mktemp("synth")
    for name, table in synth_tables.items():
        write_embeddings(out / f"{name}.parquet", table)
    return out


@pytest.fixture
def test_config() -> Config:
    return load_config(TINY, TEST_OVERRIDES)


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """These tests use tiny tensors: one intra-op thread is as fast, and on a shared 2-core machine two
    spinning OpenMP threads per process made them ~50x slower (measured: 7 s vs 434 s for one fit)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
