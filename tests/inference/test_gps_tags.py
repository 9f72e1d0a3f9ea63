"""A photo's own GPS tag (issue 20 item 2) where photos are located: the Python API, `locdiff locate` and
the registered model report exif_lat, exif_lon and the tag's distance from the answer, computed here
independently with the haversine formula; a photo without a tag reports none, a malformed tag is one
warning line, never an error."""

from __future__ import annotations

import io
import math
import shutil

import pandas as pd
import pytest
from PIL import Image

from locdiff import Geolocator
from locdiff.cli import main
from locdiff.data.exif import GPS_IFD, gps_exif

PARIS = (48.8584, 2.2945)


def with_tag(src, dst, exif) -> None:
    buf = io.BytesIO()
    Image.open(src).save(buf, format="JPEG", quality=95, exif=exif)
    dst.write_bytes(buf.getvalue())


def km(a, b) -> float:  # an independent haversine (mean Earth radius 6371.0088 km)
    p1, p2 = math.radians(a[0]), math.radians(b[0])
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(b[1] - a[1]) / 2) ** 2
    return 2 * 6371.0088 * math.asin(math.sqrt(h))


@pytest.fixture(scope="module")
def tagged_folder(photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tagged")
    src = sorted(photos["test"].glob("*.jpg"))
    with_tag(src[0], folder / "a-paris.jpg", gps_exif(*PARIS))
    shutil.copy(src[1], folder / "b-plain.jpg")
    bad = Image.Exif()
    bad[GPS_IFD] = {1: "X", 2: (1.0, 2.0, 3.0), 3: "E", 4: (4.0, 5.0, 6.0)}
    with_tag(src[2], folder / "c-bad-tag.jpg", bad)
    return folder


def test_the_api_reports_the_tag(trained, tagged_folder, caplog):
    g = Geolocator.load(trained["run_dir"])
    files = sorted(str(p) for p in tagged_folder.glob("*.jpg"))
    a, b, c = g.locate(files, top_k=2)
    assert a.ok and (a.exif_lat, a.exif_lon) == pytest.approx(PARIS, abs=1e-6)
    assert a.exif_km == pytest.approx(km(PARIS, (a.lat, a.lon)), rel=1e-9)
    assert b.ok and c.ok and b.exif_lat is None and c.exif_lat is None and c.exif_km is None
    assert any("c-bad-tag.jpg: GPS tag ignored (GPS latitude reference 'X'" in m for m in caplog.messages)
    same = g.locate([open(files[0], "rb").read(), Image.open(files[0])], top_k=2)  # bytes and a PIL image
    assert [(r.exif_lat, r.exif_lon) for r in same] == [(a.exif_lat, a.exif_lon)] * 2


def test_the_cli_prints_and_writes_the_tag(trained, tagged_folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["locate", "--run", str(trained["run_dir"]), str(tagged_folder), "--no-progress",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "photo's GPS tag (km from answer)" in text
    line = next(x for x in text.splitlines() if "a-paris.jpg" in x)
    assert "48.8584,2.2945 (" in line
    df = pd.read_csv(out)
    row = df[df["id"].str.endswith("a-paris.jpg")].iloc[0]
    assert (row["exif_lat"], row["exif_lon"]) == pytest.approx(PARIS, abs=1e-6)
    assert row["exif_km"] == pytest.approx(km(PARIS, (row["pred_lat"], row["pred_lon"])), rel=1e-6)
    assert df[df["id"].str.endswith("b-plain.jpg")]["exif_lat"].isna().all()


def test_the_registered_model_reports_the_tag(trained, tagged_folder):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/locdiff@champion")
    files = sorted(tagged_folder.glob("*.jpg"))
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert (out["exif_lat"][0], out["exif_lon"][0]) == pytest.approx(PARIS, abs=1e-6)
    assert out["exif_km"][0] == pytest.approx(km(PARIS, (out["lat"][0], out["lon"][0])), rel=1e-9)
    assert out["exif_lat"][1:].isna().all() and (out["error"] == "").all()
