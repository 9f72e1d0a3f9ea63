"""The `locate-photos` flow through a real Prefect API (prefect_test_harness): a folder of unlabelled photos
(one unreadable) and the champion model in; a predictions table and a map beside the folder, an MLflow
inference run; a second run with the same `models:/` URI (downloaded again) embeds and predicts nothing."""

from __future__ import annotations

import io
import shutil

import pandas as pd
import pytest
from PIL import Image

from locdiff.data.exif import gps_exif
from locdiff.geo import haversine_km


def test_locate_photos_flow(prefect_api, trained, photos, tmp_path, store):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.locate import locate_photos
    from locdiff.inference.batch import INFERENCE_EXPERIMENT

    folder = tmp_path / "new"
    folder.mkdir()
    for p in sorted(photos["test"].glob("*.jpg"))[:7]:
        shutil.copy(p, folder / p.name)
    (folder / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    tagged = sorted(folder.glob("photo-*.jpg"))[0]  # one photo carries its own GPS tag
    buf = io.BytesIO()
    Image.open(tagged).save(buf, format="JPEG", quality=95, exif=gps_exif(48.8584, 2.2945))
    tagged.write_bytes(buf.getvalue())
    first = locate_photos(photos=str(folder), model="models:/locdiff@champion", shard_size=3, top_k=3,
                          return_state=True)
    out = first.result()
    located = tmp_path / "new-located"
    assert out["table"] == str(located / "predictions.parquet") and out["map"] == str(located / "map.png")
    df = pd.read_parquet(out["table"])
    assert len(df) == 7 and sorted(df["id"]) == sorted(p.name for p in folder.glob("photo-*.jpg"))
    assert {"lat", "lon"}.isdisjoint(df.columns)  # unlabelled: no truth columns
    assert {"pred_lat", "pred_lon", "confidence", "place", "mode3_probability"} <= set(df.columns)
    row = df[df["id"] == tagged.name].iloc[0]
    assert (row["exif_lat"], row["exif_lon"]) == pytest.approx((48.8584, 2.2945), abs=1e-6)
    assert row["exif_km"] == pytest.approx(float(haversine_km(48.8584, 2.2945, row["pred_lat"], row["pred_lon"])))
    assert df[df["id"] != tagged.name]["exif_lat"].isna().all()
    assert (located / "map.png").read_bytes()[:4] == b"\x89PNG"
    assert out["stages"]["ingest"]["skipped"] == {"truncated": 1}  # a JPEG's first marker, then junk
    assert out["stages"]["predict"] == {**out["stages"]["predict"], "shards": 3, "predicted": 3, "skipped": 0}

    client = MlflowClient()
    run = client.get_run(out["mlflow_run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == INFERENCE_EXPERIMENT and run.data.tags["locdiff.kind"] == "inference"
    assert run.data.params["model"] == "models:/locdiff@champion" and run.data.metrics["photos_located"] == 7
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"predictions.parquet", "map.png"}
    assert not any(k.endswith("acc_1km") for k in run.data.metrics)  # no evaluation

    features = sorted(p for p in (located / "photos" / "features").rglob("*") if p.is_file())
    written = {p: p.stat().st_mtime_ns for p in features}
    second = locate_photos(photos=str(folder), model="models:/locdiff@champion", shard_size=3, top_k=3,
                           return_state=True)
    again = second.result()
    assert {p: p.stat().st_mtime_ns for p in features if p.exists()} == written  # nothing embedded again
    assert again["stages"]["predict"]["predicted"] == 0 and again["stages"]["predict"]["skipped"] == 3
    assert pd.read_parquet(again["table"]).equals(df)

    with get_client(sync_client=True) as c:  # both runs (this test's own) are recorded by the Prefect API
        runs = [c.read_flow_run(s.state_details.flow_run_id) for s in (first, second)]
    assert [r.state.name for r in runs] == ["Completed", "Completed"] and runs[0].id != runs[1].id
    assert [r.parameters["photos"] for r in runs] == [str(folder)] * 2


def test_bad_parameters_fail_before_any_work(prefect_api, tmp_path):
    from flows.locate import locate_photos

    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 100\]"):
        locate_photos(photos=str(tmp_path), top_k=0)
    with pytest.raises(ValueError, match="http\\(s\\) input has no folder beside it"):
        locate_photos(photos="https://example.org/urls.csv")
    folder = tmp_path / "new"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.jpg")
    with pytest.raises(ValueError, match=r"^model .*nope: no such run folder"):  # before the ingest
        locate_photos(photos=str(folder), model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"^model s3://b/m: not a model location"):
        locate_photos(photos=str(folder), model="s3://b/m")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a registry without that model: looked up, not downloaded
    with pytest.raises(ValueError, match=r"^models:/nope@champion: .*nope.*\(tracking URI sqlite:///"):
        locate_photos(photos=str(folder), model="models:/nope@champion", tracking_uri=store)
    assert not (tmp_path / "new-located").exists()
