"""Batch location of an s3:// prefix of photos (a real S3 endpoint: moto server on 127.0.0.1): the results
land beside the input in S3, and a re-run predicts nothing again."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from tests.data.conftest import s3, upload  # noqa: F401 - the session's moto server fixture

pytestmark = pytest.mark.s3


def test_locate_an_s3_prefix(s3, trained, photos, tmp_path):  # noqa: F811
    import shutil

    import s3fs

    from locdiff.inference.batch import locate_photos

    local = tmp_path / "new"
    local.mkdir()
    for p in sorted(photos["test"].glob("*.jpg"))[:5]:
        shutil.copy(p, local / p.name)
    upload(local, "s3://data/incoming/new")
    out = locate_photos("s3://data/incoming/new", str(trained["run_dir"]), shard_size=2, log_to_mlflow=False)
    assert out["table"] == "s3://data/incoming/new-located/predictions.parquet"
    fs = s3fs.S3FileSystem(endpoint_url=s3)
    df = pd.read_parquet(io.BytesIO(fs.cat(out["table"])))
    assert sorted(df["id"]) == sorted(p.name for p in local.glob("*.jpg")) and df["confidence"].between(0, 1).all()
    assert fs.cat(out["map"])[:4] == b"\x89PNG"
    assert len(fs.ls("data/incoming/new-located/predictions/" + out["stages"]["predict"]["model_key"])) == 3
    again = locate_photos("s3://data/incoming/new", str(trained["run_dir"]), shard_size=2, log_to_mlflow=False)
    assert again["stages"]["predict"]["predicted"] == 0
    assert pd.read_parquet(io.BytesIO(fs.cat(again["table"]))).equals(df)
