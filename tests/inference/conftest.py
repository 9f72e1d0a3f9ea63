"""Shared fixtures of the locate tests: synthetic geotagged photos, a tiny randomly initialised CLIP built
from a config (locdiff.worlds.synth_photos, no download), and a LocDiff run trained on their embeddings through
the real stages (ingest -> embed -> train -> evaluate), registered in an MLflow SQLite store. Seconds on
2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

# A very small model, so that a training takes seconds.
OVERRIDES = ["shdd.degree=8", "shdd.kl_grid_size=162", "network.widths=[64,32]", "network.cond_dim=64",
             "network.time_dim=32", "train.steps=80", "train.batch_size=64", "train.lr=0.003",
             "train.warmup_steps=10", "train.checkpoint_every=40", "train.log_every=20", "train.val_share=0.15",
             "train.val_samples=128", "predict.samples=4", "predict.steps=4", "hybrid.top_k=8"]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast and does not fight the other processes for 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from locdiff.worlds.synth_photos import tiny_clip

    return tiny_clip(tmp_path_factory.mktemp("encoders") / "tiny-clip")


@pytest.fixture(scope="session")
def other_clip(tmp_path_factory) -> Path:
    """Another encoder of the same dimension (other weights, other folder)."""
    from locdiff.worlds.synth_photos import tiny_clip

    return tiny_clip(tmp_path_factory.mktemp("encoders2") / "other-clip", seed=1)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Geotagged photos: train (360, with metadata.csv) and test (40), folder-source layout."""
    from locdiff.worlds.synth_photos import write_photos

    root = tmp_path_factory.mktemp("photos")
    return {"train": write_photos(root / "train", 360, seed=1), "test": write_photos(root / "test", 40, seed=2)}


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A SQLite MLflow store for the session (MLFLOW_TRACKING_URI points at it while the tests run)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def trained(tmp_path_factory, photos, tiny_clip, store) -> dict:
    """The pipeline's stages on the photos: ingest, embed with the tiny CLIP, train (in this process),
    register the model, evaluate on the test photos (metrics as version tags), promote."""
    from locdiff import pipeline

    root = tmp_path_factory.mktemp("root")
    train = pipeline.DataSpec(name="photos-train", source="folder", path=str(photos["train"]),
                              encoder=str(tiny_clip))
    test = pipeline.DataSpec(name="photos-test", source="folder", path=str(photos["test"]),
                             encoder=str(tiny_clip))
    for spec in (train, test):
        pipeline.ingest(spec, str(root))
        pipeline.embed(spec, str(root))
    run_dir = root / "runs" / "tiny"
    record = pipeline.train("tiny", train, str(root), run_dir, overrides=OVERRIDES, num_workers=0,
                            tracking_uri=store)
    metrics = pipeline.evaluate(run_dir, test, str(root), tracking_uri=store)
    champion = pipeline.promote(run_dir, ["photos-test"], tracking_uri=store)
    return {"root": root, "run_dir": run_dir, "record": record, "metrics": metrics, "champion": champion,
            "features": {"train": pipeline.features_dir(train, str(root)),
                         "test": pipeline.features_dir(test, str(root))}}
