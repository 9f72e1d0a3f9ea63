"""The registered model: an MLflow pyfunc without pickles, the same predictions as the run folder, metrics as
version tags and the `champion` alias (on a real SQLite MLflow store)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from locdiff import Geolocator, tracking


@pytest.fixture(scope="module")
def model_dir(trained, tmp_path_factory):
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri="models:/locdiff/1",
                                               dst_path=str(tmp_path_factory.mktemp("dl")))


def test_the_model_is_a_pyfunc_of_tensors_and_text(model_dir):
    from pathlib import Path

    root = Path(model_dir)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))]
    data = "data/locdiff-model"
    assert {f"{data}/model.safetensors", f"{data}/model.json", f"{data}/config.yaml", f"{data}/selection.json",
            f"{data}/run.json", f"{data}/gallery/gallery.json", "code/locdiff/inference/pyfunc.py"} <= set(files)
    assert any(f.startswith(f"{data}/gallery/data-") and f.endswith("/index.faiss") for f in files)
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "locdiff.inference.pyfunc" and flavor["data"] == data
    assert set(mlmodel["flavors"]) == {"python_function"}  # no pickled flavor besides it
    sig = mlmodel["signature"]
    assert {c["name"] for c in yaml.safe_load(sig["inputs"])} == {"id", "image", "embedding"}
    outputs = {c["name"] for c in yaml.safe_load(sig["outputs"])}
    assert {"lat", "lon", "confidence", "top_k_lat", "top_k_probability"} <= outputs
    assert {p["name"] for p in yaml.safe_load(sig["params"])} == {"top_k", "method"}


def test_registry_and_run_folder_predict_the_same(trained, photos):
    files = sorted(str(p) for p in photos["test"].glob("*.jpg"))[:6]
    emb = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    a, b = Geolocator.load(trained["run_dir"]), Geolocator.load("models:/locdiff@champion")
    assert b.run.path != a.run.path  # a downloaded copy
    for method in ("locdiff", "locdiff-h"):
        assert a.locate(files, method=method) == b.locate(files, method=method)
        assert a.locate_embeddings(emb, method=method) == b.locate_embeddings(emb, method=method)


def test_pyfunc_predict_in_process(trained, photos):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/locdiff@champion")
    emb = np.random.default_rng(2).normal(size=(3, 16))
    out = model.predict(pd.DataFrame({"embedding": list(emb)}), params={"top_k": 2})
    ref = Geolocator.load(trained["run_dir"]).locate_embeddings(emb, top_k=2)
    assert list(out["lat"]) == [r.lat for r in ref] and list(out["confidence"]) == [r.confidence for r in ref]
    assert [len(x) for x in out["top_k_lat"]] == [len(r.modes) for r in ref] and (out["error"] == "").all()
    jpg = open(sorted(photos["test"].glob("*.jpg"))[0], "rb").read()
    out = model.predict(pd.DataFrame({"id": ["a", "b"], "image": [jpg, b"not an image"]}))
    assert out["id"].tolist() == ["a", "b"] and np.isfinite(out["lat"][0]) and out["error"][0] == ""
    assert out["lat"][1] is None and "undecodable" in out["error"][1]  # null in JSON (issue 20 item 4)


def test_versions_carry_metrics_and_the_champion_moves_only_when_beaten(trained, store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    v1 = client.get_model_version("locdiff", "1")
    assert float(v1.tags["photos-test/geoscore"]) == pytest.approx(trained["metrics"]["geoscore"], rel=1e-5)
    assert {"photos-test/acc_200km", "photos-test/median_km", "photos-test/ece"} <= set(v1.tags)
    assert str(client.get_model_version_by_alias("locdiff", "champion").version) == "1"  # the first version
    worse = tracking.log_model(trained["record"]["mlflow_run_id"], trained["run_dir"])["version"]
    better = tracking.log_model(trained["record"]["mlflow_run_id"], trained["run_dir"])["version"]
    g = trained["metrics"]["geoscore"]
    tracking.tag_model_version(worse, {"photos-test/geoscore": g - 1})
    tracking.tag_model_version(better, {"photos-test/geoscore": g + 1, "other/geoscore": 0.0})
    assert tracking.promote(worse, ["photos-test"])["moved"] is False
    assert tracking.promote(better, ["other"])["moved"] is False  # the champion has no "other" metrics
    moved = tracking.promote(better, ["photos-test", "other"])
    assert moved["moved"] and str(client.get_model_version_by_alias("locdiff", "champion").version) == better
    tracking.promote("1", ["photos-test"])  # the champion's equal score does not move it back
    assert str(client.get_model_version_by_alias("locdiff", "champion").version) == better
