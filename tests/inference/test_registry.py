"""The registered model: an MLflow pyfunc without pickles, the same predictions as the run folder, metrics as
version tags and the `champion` alias (on a real SQLite MLflow store)."""

from __future__ import annotations

from pathlib import Path

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
    root = Path(model_dir)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))]
    data = "data/locdiff-model"
    assert {f"{data}/model.safetensors", f"{data}/model.json", f"{data}/config.yaml", f"{data}/selection.json",
            f"{data}/run.json", f"{data}/gallery/gallery.json", f"{data}/encoder/model.safetensors",
            f"{data}/encoder/config.json", f"{data}/encoder/preprocessor_config.json"} <= set(files)
    assert not [f for f in files if f.endswith(".py") or f.startswith("code/")]  # no code in the model
    assert "code_paths" not in (root / "MLmodel").read_text()
    from locdiff import __version__

    assert f"locdiff=={__version__}" in (root / "requirements.txt").read_text().split()
    # no absolute local path in what locdiff wrote (MLmodel's artifact_path is MLflow's own record of the store)
    for f in files:
        if f != "MLmodel" and not f.endswith((".safetensors", ".faiss", ".npy")):
            assert "/tmp" not in (root / f).read_text() and str(root) not in (root / f).read_text(), f
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


def test_a_bad_embedding_row_does_not_fail_the_request(trained):
    """MLflow checks the request against the signature before the model runs: with `embedding` as
    Array(double), one row of text refused the whole request (and whole numbers, as JSON integers, too)."""
    import mlflow

    model = mlflow.pyfunc.load_model("models:/locdiff@champion")
    good = np.random.default_rng(4).normal(size=16)
    out = model.predict(pd.DataFrame({"embedding": [list(good), ["a"] * 16, [1] * 16]}))
    ref = Geolocator.load(trained["run_dir"]).locate_embeddings(np.stack([good, np.ones(16)]))
    assert out["lat"][0] == pytest.approx(ref[0].lat, abs=1e-3) and out["error"][0] == ""
    assert out["lat"][1] is None and "not a list of numbers" in out["error"][1]
    assert out["lat"][2] == pytest.approx(ref[1].lat, abs=1e-3) and out["error"][2] == ""


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


def test_the_model_carries_its_encoder(trained, photos, tiny_clip, tmp_path):
    """The registered model's files, copied elsewhere, locate the same after the encoder folder the run was
    trained with has moved away."""
    import shutil

    import mlflow

    files = sorted(str(p) for p in photos["test"].glob("*.jpg"))[:5]
    ref = Geolocator.load("models:/locdiff@champion").locate(files, top_k=3)
    copy = tmp_path / "elsewhere" / "model"
    mlflow.artifacts.download_artifacts(artifact_uri="models:/locdiff@champion", dst_path=str(copy))
    moved = tmp_path / "moved-encoder"
    shutil.move(str(tiny_clip), moved)
    try:
        g = Geolocator.load(copy)
        assert g.locate(files, top_k=3) == ref and all(r.ok for r in ref)
        assert g.encoder_config().model == str((copy / "data/locdiff-model/encoder").resolve())
        model = mlflow.pyfunc.load_model(str(copy))
        out = model.predict(pd.DataFrame({"image": [open(f, "rb").read() for f in files]}), params={"top_k": 3})
        assert list(out["lat"]) == [r.lat for r in ref] and (out["error"] == "").all()
    finally:
        shutil.move(str(moved), tiny_clip)


def test_nothing_in_the_model_runs_on_load(trained, tmp_path):
    """Python files written into a model (where MLflow would look for a model's code, and beside its data)
    are never imported: the model loads through the installed locdiff package."""
    import mlflow

    copy = tmp_path / "model"
    mlflow.artifacts.download_artifacts(artifact_uri="models:/locdiff@champion", dst_path=str(copy))
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for rel in ("code/locdiff/__init__.py", "code/locdiff/inference/pyfunc.py", "data/locdiff-model/__init__.py",
                "data/locdiff-model/locdiff/__init__.py", "data/locdiff-model/encoder/modeling_clip.py"):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_text(payload)
    emb = np.random.default_rng(4).normal(size=(2, 16))
    out = mlflow.pyfunc.load_model(str(copy)).predict(pd.DataFrame({"embedding": list(emb)}))
    g = Geolocator.load(copy)
    assert list(out["lat"]) == [r.lat for r in g.locate_embeddings(emb)]
    g.encoder()
    assert not marker.exists()
    import locdiff

    assert not str(Path(locdiff.__file__).resolve()).startswith(str(copy.resolve()))


def test_a_model_naming_code_is_refused_before_mlflow_loads_it(trained, photos, tmp_path, capsys, monkeypatch):
    """An MLmodel whose python_function flavor names a code folder (`code: code`) would have MLflow put that
    folder first on the import path before loading: every module imported after it (faiss on the first gallery
    search, uvicorn's loops) could come from the model. `locdiff serve`, `locate` and `Geolocator.load` refuse
    it in one line naming the model, before MLflow loads it."""
    import socket
    import sys

    import mlflow
    import uvicorn

    from locdiff.cli import main
    from locdiff.errors import UserError

    copy = tmp_path / "model"
    mlflow.artifacts.download_artifacts(artifact_uri="models:/locdiff@champion", dst_path=str(copy))
    mlmodel = yaml.safe_load((copy / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["code"] = "code"
    (copy / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (copy / "code").mkdir()
    (copy / "code" / "locdiff_payload.py").write_text("raise SystemExit('ran')\n")
    capsys.readouterr()  # the download's progress
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: served.append(a))  # never block on a real server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path_before = list(sys.path)
    try:
        for args in (["serve", "--model", str(copy), "--port", str(port)],
                     ["locate", "--run", str(copy), str(photos["test"])]):
            rc = main(args)
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1 and f"{copy}: its MLmodel names code to import" in err[0], err
        with pytest.raises(UserError, match="names code to import"):
            Geolocator.load(copy)
        assert served == [] and str(copy / "code") not in sys.path
    finally:
        sys.path[:] = path_before
