"""Photos without coordinates (issue 10 item 6): with `coordinates: optional` (`--unlabelled`) a folder,
a CSV without lat/lon or a URL list is ingested with lat/lon null and the manifest says so; a folder
without any CSV is read for every JPEG/PNG/WebP under it. The default still requires coordinates."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from locdiff.cli import main
from locdiff.data.config import load_dataset_config
from locdiff.data.ingest import ingest
from locdiff.data.manifest import read_manifest
from locdiff.data.shards import stage_dir
from locdiff.data.validation import SourceError

from .fixtures import jpeg, png, read_samples, write_csv


def cfg(**kw):
    return load_dataset_config("folder", **{"shard_size": 3, "max_side": 128, "coordinates": "optional", **kw})


def read_back(root) -> list[dict]:
    d = stage_dir(str(root), "folder", "images")
    return read_samples([f"{d}/{s['shard']}" for s in read_manifest(d)["shards"]])


def webp(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed))).save(buf, format="WEBP")
    return buf.getvalue()


@pytest.fixture
def photos(tmp_path):
    """A folder of photos without any CSV: nested folders, three formats, and files to leave out."""
    src = tmp_path / "photos"
    files = {"b.jpg": jpeg(1), "a/z.png": png(2), "a/y.webp": webp(3), "a/b/c.JPEG": jpeg(4),
             "notes.txt": b"not a photo", ".hidden/x.jpg": jpeg(5), "._b.jpg": b"junk", "broken.jpg": b"xx"}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def test_a_folder_without_csv_is_every_photo_in_sorted_order(photos, tmp_path):
    m = ingest("folder", str(tmp_path / "root"), source=str(photos), config=cfg(), progress=False)
    ids = ["a/b/c.JPEG", "a/y.webp", "a/z.png", "b.jpg"]
    assert m["rows"] == 5 and m["count"] == 4 and m["skipped"] == {"undecodable": 1}  # broken.jpg
    assert m["coordinates"] == "optional" and m["unlabelled"] == 4
    samples = read_back(tmp_path / "root")
    assert [s["json"]["id"] for s in samples] == ids  # sorted relative paths, in key order
    assert all(s["json"]["lat"] is None and s["json"]["lon"] is None for s in samples)
    # a new photo changes the listing, so a re-run rewrites the stage
    (photos / "0.jpg").write_bytes(jpeg(9))
    again = ingest("folder", str(tmp_path / "root"), source=str(photos), config=cfg(), progress=False)
    assert again["count"] == 5 and read_back(tmp_path / "root")[0]["json"]["id"] == "0.jpg"


def test_default_still_requires_coordinates(photos, tmp_path):
    with pytest.raises(SourceError, match="no metadata CSV"):
        ingest("folder", str(tmp_path / "root"), source=str(photos), config=cfg(coordinates="required"),
               progress=False)


def test_cli_unlabelled_flag(photos, tmp_path, capsys):
    rc = main(["data", "ingest", "folder", "--root", str(tmp_path / "root"), "--source", str(photos),
               "--unlabelled"])
    assert rc == 0
    assert "folder: 4 images in 1 shards (4 without coordinates); skipped: undecodable 1" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "root" / "folder")]) == 0
    out = capsys.readouterr().out
    assert "coordinates optional: 4 without coordinates" in out and "map of 0 locations" in out


def test_a_csv_with_some_coordinates_keeps_the_rest_unlabelled(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"p{i}.jpg").write_bytes(jpeg(10 + i))
    write_csv(src / "meta.csv", [{"id": "p0", "lat": "48.5", "lon": "2.25", "file": "p0.jpg"},
                                 {"id": "p1", "lat": "", "lon": "", "file": "p1.jpg"},
                                 {"id": "p2", "lat": "123", "lon": "5", "file": "p2.jpg"},
                                 {"id": "p3", "lat": "nan", "lon": "1", "file": "p3.jpg"}])
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(), progress=False)
    assert m["skipped"] == {"invalid_coordinates": 1}  # given but wrong: still an error
    got = {s["json"]["id"]: (s["json"]["lat"], s["json"]["lon"]) for s in read_back(tmp_path / "root")}
    assert got == {"p0": (48.5, 2.25), "p1": (None, None), "p3": (None, None)}
    assert m["unlabelled"] == 2
    # required (the default): the rows without coordinates are skipped
    m = ingest("folder", str(tmp_path / "req"), source=str(src), config=cfg(coordinates="required"),
               progress=False)
    assert m["count"] == 1 and m["skipped"] == {"missing_coordinates": 2, "invalid_coordinates": 1}


def test_a_csv_without_coordinate_or_id_columns(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.jpg").write_bytes(jpeg(20))
    (src / "y.jpg").write_bytes(jpeg(21))
    write_csv(src / "list.csv", [{"file": "x.jpg"}, {"file": "y.jpg"}])
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(), progress=False)
    assert m["count"] == 2 and [s["json"]["id"] for s in read_back(tmp_path / "root")] == ["x.jpg", "y.jpg"]
    # neither an id nor a file name: every row is counted, none becomes ".jpg"
    write_csv(src / "list.csv", [{"lat": "1", "lon": "2"}, {"lat": "3", "lon": "4"}])
    m = ingest("folder", str(tmp_path / "root3"), source=str(src), config=cfg(), progress=False)
    assert m["count"] == 0 and m["skipped"] == {"missing_id": 2}
    # one coordinate column alone is a typo, said so
    write_csv(src / "list.csv", [{"file": "x.jpg", "lat": "1"}])
    with pytest.raises(SourceError, match="no longitude column 'lon'"):
        ingest("folder", str(tmp_path / "root2"), source=str(src), config=cfg(), progress=False)


def test_a_url_list_without_coordinates(served, tmp_path):
    root, base = served
    (root / "unl").mkdir(exist_ok=True)
    for i in range(3):
        (root / "unl" / f"{i}.jpg").write_bytes(jpeg(30 + i))
    src = tmp_path / "urls.csv"
    write_csv(src, [{"id": f"u{i}", "url": f"{base}/unl/{i}.jpg"} for i in range(3)]
              + [{"id": "gone", "url": f"{base}/unl/gone.jpg"}])
    m = ingest("folder", str(tmp_path / "out"), source=str(src), progress=False,
               config=cfg(allow_private_addresses=True, retries=0))
    assert m["count"] == 3 and m["unlabelled"] == 3 and m["skipped"] == {"missing_file": 1}
    assert [s["json"]["lat"] for s in read_back(tmp_path / "out")] == [None, None, None]


def test_shdd_targets_of_unlabelled_images_are_a_clear_error(photos, tmp_path):
    from locdiff.data.featurize import embed

    ingest("folder", str(tmp_path / "root"), source=str(photos), config=cfg(), progress=False)
    with pytest.raises(ValueError, match=r"4 of 4 images have no coordinates.*embed without --degree"):
        embed("folder", str(tmp_path / "root"), "some/model", degree=2, progress=False)


@pytest.mark.parametrize("kind", ["tar", "s3"])
def test_an_archive_or_s3_prefix_without_csv(kind, photos, s3, tmp_path):
    if kind == "tar":
        import tarfile

        with tarfile.open(tmp_path / "photos.tar", "w") as t:
            t.add(photos, "photos")  # under a top folder, as archives usually are
        src = str(tmp_path / "photos.tar")
        want = ["photos/a/b/c.JPEG", "photos/a/y.webp", "photos/a/z.png", "photos/b.jpg"]
    else:
        from .conftest import upload

        upload(photos, "s3://fixtures/unlabelled-photos")
        src = "s3://fixtures/unlabelled-photos"
        want = ["a/b/c.JPEG", "a/y.webp", "a/z.png", "b.jpg"]
    m = ingest("folder", str(tmp_path / "root"), source=src, config=cfg(), progress=False)
    assert m["count"] == 4 and m["skipped"] == {"undecodable": 1}
    assert [s["json"]["id"] for s in read_back(tmp_path / "root")] == want
