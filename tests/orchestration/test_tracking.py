"""MLflow tracking on a real SQLite store: params, per-step metrics, evaluation runs, the model (more on the
registered model: tests/inference/test_registry.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from locdiff import tracking
from locdiff.metrics import geo_metrics
from locdiff.runs import RunFolder


def test_flatten_config_dotted_and_lists():
    flat = tracking.flatten_config({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None", "f": "{}"}


def test_training_and_evaluation_runs(mlflow_uri, tmp_path):
    config = {"method": "locdiff", "train": {"steps": 3, "lr": 0.001}, "network": {"widths": [8, 4]}}
    with tracking.training_run(config, run_name="t") as run_id:
        tracking.log_step_metrics(run_id, [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in (1, 2, 3)])
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 60, 50), rng.uniform(-180, 180, 50)
    plat, plon = lat + rng.normal(0, 1, 50), lon
    metrics = geo_metrics(plat, plon, lat, lon)
    df = pd.DataFrame({"id": [str(i) for i in range(50)], "lat": lat, "lon": lon,
                       "pred_lat": plat, "pred_lon": plon})
    png = tmp_path / "map.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    cal = tmp_path / "calibration.json"
    cal.write_text("{}")
    child = tracking.log_evaluation(run_id, "synth-test", metrics, df, plots={"worldmap": png}, files=[cal])
    run_dir = _locdiff_run(tmp_path / "run")
    logged = tracking.log_model(run_id, run_dir)

    run = tracking.read_run(run_id)
    assert run["params"]["train.lr"] == "0.001" and run["params"]["network.widths"] == "[8, 4]"
    for name in tracking.METRIC_NAMES:
        assert run["metrics"][f"synth-test/{name}"] == pytest.approx(metrics[name])
    assert "config.yaml" in run["artifacts"] and "plots/synth-test/map.png" in run["artifacts"]
    assert run["children"] == {"synth-test": child}
    nested = tracking.read_run(child)
    assert {"predictions/predictions_synth-test.parquet", "evaluation/calibration.json"} <= set(nested["artifacts"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    versions = client.search_model_versions("name='locdiff'")
    assert len(versions) == 1 and versions[0].run_id == run_id
    # the model is the run's files (tensors, JSON, YAML): nothing pickled, and it loads back as the method
    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(logged["model_uri"]))
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert {"MLmodel", "data/locdiff-model/config.yaml", "data/locdiff-model/model.json",
            "data/locdiff-model/model.safetensors", "data/locdiff-model/selection.json"} <= set(files)
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth", ".pt"))]  # no pickle anywhere
    assert str(client.get_model_version_by_alias("locdiff", "champion").version) == logged["version"]
    loaded = tracking.load_logged_model(logged["model_uri"], dst=tmp_path / "loaded")
    expected = RunFolder(run_dir).load_model()[0]
    got = loaded.model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_run_logged_again_with_its_key_is_not_registered_twice(mlflow_uri, tmp_path):
    """The pipeline logs the model with the run's completion key: a re-run after a kill (or a retry) between
    the registration and run.json returns the version registered then; a run trained on is a new version."""
    from mlflow.tracking import MlflowClient

    with tracking.training_run({"method": "locdiff"}, run_name="t") as run_id:
        pass
    run_dir = _locdiff_run(tmp_path / "run")
    first = tracking.log_model(run_id, run_dir, key="k1")
    assert tracking.log_model(run_id, run_dir, key="k1") == first
    other = tracking.log_model(run_id, run_dir, key="k2")
    assert other["version"] != first["version"]
    assert sorted(int(v.version) for v in MlflowClient().search_model_versions("name='locdiff'")) == [1, 2]
    assert tracking.load_logged_model(first["model_uri"], dst=tmp_path / "loaded") is not None


def test_an_evaluation_logged_again_keeps_one_nested_run_and_one_point_per_metric(mlflow_uri, tmp_path):
    """A retry of the evaluate task, or a re-run after a kill before the evaluation's metrics.json, logs the
    same evaluation again: into the same nested run, with no second point of any metric."""
    from mlflow.tracking import MlflowClient

    with tracking.training_run({"x": 1}, run_name="t") as run_id:
        pass
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 60, 20), rng.uniform(-180, 180, 20)
    metrics = geo_metrics(lat + 1.0, lon, lat, lon)
    df = pd.DataFrame({"id": [str(i) for i in range(20)], "lat": lat, "lon": lon, "pred_lat": lat + 1.0,
                       "pred_lon": lon})
    first = tracking.log_evaluation(run_id, "synth-test", metrics, df)
    again = tracking.log_evaluation(run_id, "synth-test", metrics, df)
    assert again == first
    client = MlflowClient()
    exp = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")) == 1
    for run in (run_id, first):
        assert len(client.get_metric_history(run, "synth-test/geoscore")) == 1, run


def _locdiff_run(out: Path) -> Path:
    """A run folder with an untrained LocDiff predictor (what `locdiff train` saves, without training)."""
    from locdiff.model.config import load_config
    from locdiff.model.locdiff_method import LocDiffMethod
    from locdiff.model.objective import build_model

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml")
    method = LocDiffMethod.from_config(cfg)
    method.model = build_model(cfg, 8)
    RunFolder(out).write_config(cfg)
    method.save(out)
    return out


def test_missing_metric_is_an_error(mlflow_uri):
    with pytest.raises(ValueError, match="lack .*geoscore"):
        tracking.evaluation_metrics("x", {"acc_1km": 1.0})


def test_unreachable_server_says_what_to_start():
    from tests.orchestration.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(tracking.TrackingUnavailable, match="infra/start.sh"):
        tracking.check_tracking_uri(uri, timeout=2)
    with pytest.raises(tracking.TrackingUnavailable, match="not reachable"):
        with tracking.training_run({"a": 1}, tracking_uri=uri):
            pass
