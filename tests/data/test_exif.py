"""Geotagged photos (issue 20 item 2): a folder of JPEGs with EXIF GPS tags and no metadata file ingests
with each photo's tag as its label; photos without a tag are skipped as no_coordinates (kept unlabelled
with --unlabelled); a CSV's coordinates win over the tags and disagreements over 1 km are counted; a
malformed tag is counted and reported on one line, never a traceback. The photos are written by Pillow."""

from __future__ import annotations

import io
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locdiff.cli import main
from locdiff.data.config import load_dataset_config
from locdiff.data.exif import GPS_IFD, ExifError, gps_coordinates, gps_exif, gps_or_none
from locdiff.data.ingest import ingest
from locdiff.data.manifest import read_manifest
from locdiff.data.shards import stage_dir
from locdiff.data.validation import SourceError
from locdiff.geo import haversine_km

from .fixtures import jpeg, read_samples, write_csv

# (lat, lon): Paris, Sydney, Sao Paulo, Anchorage, Cape Town, Reykjavik
PLACES = [(48.8584, 2.2945), (-33.8568, 151.2153), (-23.5505, -46.6333), (61.2181, -149.9003),
          (-33.9249, 18.4241), (64.1466, -21.9426)]


def tagged(seed: int, exif: Image.Exif | None) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed))).save(buf, format="JPEG", quality=90, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def raw_gps(**tags) -> Image.Exif:
    exif = Image.Exif()
    exif[GPS_IFD] = {1: "N", 2: (1.0, 2.0, 3.0), 3: "E", 4: (4.0, 5.0, 6.0), **{int(k[1:]): v for k, v in tags.items()}}
    return exif


def read_back(root) -> list[dict]:
    d = stage_dir(str(root), "folder", "images")
    return [s["json"] for s in read_samples([f"{d}/{s['shard']}" for s in read_manifest(d)["shards"]])]


def cfg(**kw):
    return load_dataset_config("folder", **{"shard_size": 4, "max_side": 128, **kw})


def test_gps_tags_are_read_as_degrees():
    for i, (lat, lon) in enumerate(PLACES):
        got = gps_coordinates(tagged(i, gps_exif(lat, lon)))
        assert got == pytest.approx((lat, lon), abs=1e-6)  # the written degrees, minutes, seconds
    assert gps_coordinates(tagged(9, None)) is None
    assert gps_coordinates(tagged(9, gps_exif(0.0, 0.0))) is None  # "no fix"
    assert gps_coordinates(b"not an image") is None
    assert gps_coordinates(Image.open(io.BytesIO(tagged(1, gps_exif(*PLACES[1]))))) == pytest.approx(PLACES[1])


@pytest.mark.parametrize(("tags", "message"), [
    ({"t1": "X"}, "latitude reference 'X'"), ({"t3": "Q"}, "longitude reference 'Q'"),
    ({"t2": (95.0, 0.0, 0.0)}, "off the globe"), ({"t4": (12.0, 75.0, 0.0)}, "minutes or seconds"),
    ({"t2": (1.0, 2.0)}, "not degrees, minutes, seconds"),
])
def test_a_malformed_tag_is_one_clear_line(tags, message):
    with pytest.raises(ExifError, match=message) as err:
        gps_coordinates(tagged(3, raw_gps(**tags)))
    assert "\n" not in str(err.value)


def test_damaged_exif_bytes_never_raise_anything_else():
    good = bytearray(tagged(4, gps_exif(*PLACES[0])))
    start = good.find(b"Exif")
    rng = np.random.default_rng(0)
    read, reported = 0, 0
    for _ in range(200):
        bad = bytearray(good)
        for i in rng.integers(start + 6, start + 120, 6):
            bad[i] = int(rng.integers(0, 256))
        gps, problem = gps_or_none(bytes(bad))  # never raises
        assert gps is None or (abs(gps[0]) <= 90 and abs(gps[1]) <= 180)
        assert problem is None or "\n" not in problem
        read, reported = read + (gps is not None), reported + (problem is not None)
    # Pillow mostly warns and skips a damaged tag: those warnings are reported now (7 of 200 were before);
    # what is left as "no tag" is a pointer's tag number hit, or an entry count set to 0 (no warning at all)
    assert read and reported >= 130


def exif_jpeg(*, make_count: int = 4, gps_at: int | None = None, lat_at: int | None = None) -> bytes:
    """A JPEG whose EXIF block is written by hand: IFD0 with Make and a GPS pointer, the GPS block after it
    at 38 (or gps_at), its latitude's rationals at 92 (or lat_at), longitude's at 116."""
    def entry(tag, typ, count, value: bytes) -> bytes:
        return struct.pack(">HHL", tag, typ, count) + value.ljust(4, b"\0")

    ifd0 = struct.pack(">H", 2) + entry(0x010F, 2, make_count, b"Cam\0" if make_count <= 4 else b"\0\0\0\x60")
    ifd0 += entry(GPS_IFD, 4, 1, struct.pack(">L", 38 if gps_at is None else gps_at)) + b"\0" * 4
    gps = struct.pack(">H", 4) + entry(1, 2, 2, b"N") + entry(2, 5, 3, struct.pack(">L", lat_at or 92))
    gps += entry(3, 2, 2, b"E") + entry(4, 5, 3, struct.pack(">L", 116)) + b"\0" * 4
    tiff = b"MM\0\x2a" + struct.pack(">L", 8) + ifd0 + gps
    tiff += struct.pack(">6L", 10, 1, 30, 1, 0, 1) + struct.pack(">6L", 20, 1, 15, 1, 0, 1)
    assert len(tiff) == 140
    segment = b"Exif\0\0" + tiff
    plain = tagged(2, None)
    return plain[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + plain[2:]


def test_a_damaged_gps_block_is_reported_and_other_damage_is_not(tmp_path):
    """Pillow warns and skips a tag whose data lies past the block: about the GPS pointer or a GPS entry it
    is a reported problem (it was "no tag"), about another tag the GPS answer stands; no warning escapes."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert gps_or_none(exif_jpeg()) == (pytest.approx((10.5, 20.25)), None)
        assert gps_or_none(exif_jpeg(make_count=100_000)) == (pytest.approx((10.5, 20.25)), None)  # Make's
        for bad in (exif_jpeg(gps_at=5000), exif_jpeg(lat_at=5000)):  # the GPS block, a latitude, past the end
            gps, problem = gps_or_none(bad)
            assert gps is None and problem.startswith("unreadable GPS block (") and "\n" not in problem
            with pytest.raises(ExifError, match="unreadable GPS block"):
                gps_coordinates(Image.open(io.BytesIO(bad)))
    assert shown == []

    photos = [exif_jpeg(make_count=100_000), exif_jpeg(gps_at=5000), exif_jpeg(lat_at=5000), exif_jpeg()] * 8
    with ThreadPoolExecutor(4) as pool:  # as `locate` reads them: one photo's warning is not another's
        assert [p is None for _, p in pool.map(gps_or_none, photos)] == [True, False, False, True] * 8

    src = tmp_path / "photos"
    src.mkdir()
    (src / "good.jpg").write_bytes(exif_jpeg(make_count=100_000))
    (src / "cut.jpg").write_bytes(exif_jpeg(gps_at=5000))
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(coordinates="optional"),
               progress=False)
    assert m["count"] == 2 and m["unlabelled"] == 1 and m["exif"] == {"labelled": 1, "disagree": 0, "malformed": 1}


def test_a_folder_of_geotagged_photos_without_a_csv(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, (lat, lon) in enumerate(PLACES):
        (src / f"p{i}.jpg").write_bytes(tagged(i, gps_exif(lat, lon)))
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(), progress=False)
    assert m["count"] == 6 and m["skipped"] == {} and m["unlabelled"] == 0
    assert m["exif"] == {"labelled": 6, "disagree": 0, "malformed": 0}
    rows = {r["id"]: r for r in read_back(tmp_path / "root")}
    for i, (lat, lon) in enumerate(PLACES):
        assert (rows[f"p{i}.jpg"]["lat"], rows[f"p{i}.jpg"]["lon"]) == pytest.approx((lat, lon), abs=1e-6)


def test_untagged_photos_are_counted_or_kept_unlabelled(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        (src / f"tagged{i}.jpg").write_bytes(tagged(i, gps_exif(*PLACES[i])))
    (src / "plain.jpg").write_bytes(tagged(7, None))
    (src / "bad-tag.jpg").write_bytes(tagged(8, raw_gps(t1="X")))
    root = tmp_path / "root"
    assert main(["data", "ingest", "folder", "--root", str(root), "--source", str(src)]) == 0
    out = capsys.readouterr()
    assert "3 images" in out.out and "no_coordinates 2" in out.out and "1 unusable" in out.out
    assert "Traceback" not in out.err
    m = read_manifest(stage_dir(str(root), "folder", "images"))
    assert m["count"] == 3 and m["skipped"] == {"no_coordinates": 2} and m["exif"]["malformed"] == 1
    assert set(m["skipped_examples"]["no_coordinates"]) == {"plain.jpg", "bad-tag.jpg"}

    kept = ingest("folder", str(tmp_path / "root2"), source=str(src), config=cfg(coordinates="optional"),
                  progress=False)
    assert kept["count"] == 5 and kept["unlabelled"] == 2 and kept["skipped"] == {}
    rows = {r["id"]: r for r in read_back(tmp_path / "root2")}
    assert rows["plain.jpg"]["lat"] is None and rows["tagged1.jpg"]["lat"] == pytest.approx(PLACES[1][0], abs=1e-6)


def test_no_tag_at_all_says_what_to_do(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(tagged(1, None))
    with pytest.raises(SourceError, match="none of the 1 photos carries a GPS tag.*--unlabelled"):
        ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(), progress=False)


def test_the_csv_wins_and_disagreements_are_counted(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    near = (PLACES[0][0] + 0.004, PLACES[0][1])  # 0.45 km north of the tag
    far = (PLACES[1][0] + 0.05, PLACES[1][1])  # 5.6 km
    assert haversine_km(*PLACES[0], *near) < 1 < haversine_km(*PLACES[1], *far)
    for i in range(3):
        (src / f"p{i}.jpg").write_bytes(tagged(i, gps_exif(*PLACES[i])))
    (src / "p3.jpg").write_bytes(tagged(3, None))
    write_csv(src / "meta.csv", [{"id": "p0.jpg", "lat": near[0], "lon": near[1]},
                                 {"id": "p1.jpg", "lat": far[0], "lon": far[1]},
                                 {"id": "p2.jpg", "lat": PLACES[2][0], "lon": PLACES[2][1]},
                                 {"id": "p3.jpg", "lat": 10.0, "lon": 20.0}])
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(), progress=False)
    assert m["count"] == 4 and m["exif"] == {"labelled": 0, "disagree": 1, "malformed": 0}
    rows = {r["id"]: r for r in read_back(tmp_path / "root")}
    assert (rows["p0.jpg"]["lat"], rows["p1.jpg"]["lat"], rows["p3.jpg"]["lat"]) == (near[0], far[0], 10.0)
    assert rows["p1.jpg"]["exif"] == pytest.approx({"lat": PLACES[1][0], "lon": PLACES[1][1]}, abs=1e-6)


def test_six_tagged_demo_photos_ingest_with_their_places(tmp_path):
    """The demo's new photos (write_photos(gps=True): the tag inserted, pixels untouched) ingest without a
    CSV, all six at the places the generator drew (its metadata.csv, written for the same seed)."""
    import csv

    from locdiff.worlds.synth_photos import write_photos

    tagged = write_photos(tmp_path / "tagged", 6, seed=3, prefix="new", metadata=False, gps=True)
    ref = write_photos(tmp_path / "ref", 6, seed=3, prefix="new")
    with open(ref / "metadata.csv") as f:
        places = {f"{r['id']}.jpg": (float(r["lat"]), float(r["lon"])) for r in csv.DictReader(f)}
    for name in places:  # the same pixels: only the EXIF segment was added
        a, b = Image.open(tagged / name), Image.open(ref / name)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    m = ingest("folder", str(tmp_path / "root"), source=str(tagged), config=cfg(), progress=False)
    assert m["count"] == 6 and m["exif"]["labelled"] == 6 and m["skipped"] == {}
    for row in read_back(tmp_path / "root"):
        assert (row["lat"], row["lon"]) == pytest.approx(places[row["id"]], abs=1e-6)


def test_one_command_makes_training_data_and_a_test_set(tmp_path, capsys):
    """`data ingest folder --test-share P` on a folder of tagged photos: ROOT/folder and ROOT/folder-test,
    disjoint, together every photo, the test part chosen by a hash of the id (recomputed here)."""
    import hashlib

    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(5)
    for i in range(20):
        (src / f"p{i:02d}.jpg").write_bytes(tagged(i, gps_exif(float(rng.uniform(-60, 60)),
                                                               float(rng.uniform(-170, 170)))))
    root = tmp_path / "root"
    argv = ["data", "ingest", "folder", "--root", str(root), "--source", str(src), "--test-share", "0.25"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    ids = {}
    for name in ("folder", "folder-test"):
        d = stage_dir(str(root), name, "images")
        ids[name] = [s["json"]["id"] for s in read_samples([f"{d}/{s['shard']}" for s in read_manifest(d)["shards"]])]
        assert f"{name}: {len(ids[name])} images" in out
    expected = {f"p{i:02d}.jpg" for i in range(20)
                if int.from_bytes(hashlib.sha256(f"p{i:02d}.jpg".encode()).digest()[:8], "big") < 0.25 * 2**64}
    assert set(ids["folder-test"]) == expected and 0 < len(expected) < 20
    assert set(ids["folder"]) == {f"p{i:02d}.jpg" for i in range(20)} - expected
    manifests = [stage_dir(str(root), name, "images") + "/manifest.json" for name in ids]
    before = [Path(m).stat().st_mtime_ns for m in manifests]
    assert main(argv) == 0  # a second run finds both parts complete and rewrites nothing
    assert [Path(m).stat().st_mtime_ns for m in manifests] == before
    with pytest.raises(ValueError, match=r"^--test-share must be a number between 0 and 1, both excluded; got 1.5$"):
        ingest("folder", str(root), source=str(src), config=cfg(), test_share=1.5)
    with pytest.raises(ValueError, match=r"^the part of a split ingest must be one of train, test; got 'val'$"):
        ingest("folder", str(root), source=str(src), config=cfg(), test_share=0.5, part="val")
