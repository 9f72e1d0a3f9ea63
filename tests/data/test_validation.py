"""Corrupt input: bad records are counted by reason, never fatal; a wrong source is fatal, clearly."""

from __future__ import annotations

import pytest

from locdiff.cli import main
from locdiff.data.config import load_dataset_config
from locdiff.data.ingest import ingest
from locdiff.data.validation import ChecksumError, RecordError, SourceError, check_record_coordinates, open_image

from .fixtures import build_folder, jpeg, write_csv


def cfg(name: str, **kw):
    # the fixtures are served on 127.0.0.1: private addresses must be allowed explicitly
    kw.setdefault("allow_private_addresses", True)
    return load_dataset_config(name, shard_size=4, max_side=128, retries=1, backoff=0.01, timeout=5, **kw)


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_damaged_tar_counts_the_records_past_the_damage(kind, served, s3, tmp_path):
    exp = build_folder(tmp_path / "src", "", damaged=True)
    if kind == "http":
        dest = served[0] / "damaged"
        dest.mkdir(exist_ok=True)
        (dest / "folder.tar").write_bytes((tmp_path / "src" / "folder.tar").read_bytes())
        src, root = f"{served[1]}/damaged/folder.tar", str(tmp_path / "root")
    else:
        from .conftest import upload

        upload(tmp_path / "src", "s3://fixtures/damaged")
        src, root = "s3://fixtures/damaged/folder.tar", "s3://data/damaged"
    m = ingest("folder", root, source=src, config=cfg("folder"), progress=False)
    assert m["skipped"] == exp.skipped == {"damaged_archive": 4}
    assert m["count"] == len(exp.good) == 6


def test_truncated_and_undecodable_images_are_told_apart():
    data = jpeg(1)
    assert open_image(data).size == (96, 72)
    with pytest.raises(RecordError) as err:
        open_image(data[: len(data) // 2])
    assert err.value.reason == "truncated"
    with pytest.raises(RecordError) as err:
        open_image(b"GIF89a" + b"\0" * 20)
    assert err.value.reason == "undecodable"
    with pytest.raises(RecordError) as err:
        open_image(b"")
    assert err.value.reason == "truncated"


def test_an_image_cut_inside_its_header_is_truncated():
    """A JPEG or PNG cut before Pillow can identify it (its first 200 bytes, its signature alone) is a cut
    file, "truncated" (it was "undecodable"); bytes that never began an image stay "undecodable"."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(1))).save(buf, format="PNG")
    cut = {"jpeg 200": jpeg(1)[:200], "jpeg 3": jpeg(1)[:3], "png 20": buf.getvalue()[:20],
           "png 8": buf.getvalue()[:8]}
    other = {"text": b"not an image at all", "soi alone": b"\xff\xd8", "gif": b"GIF89a" + b"\0" * 20}
    for name, data in {**cut, **other}.items():
        with pytest.raises(RecordError) as err:
            open_image(data)
        assert err.value.reason == ("truncated" if name in cut else "undecodable"), name
        assert "\n" not in str(err.value)


def test_no_csv_is_fatal_with_a_clear_message(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(2))
    with pytest.raises(SourceError, match=r"no metadata CSV.*no \.csv file"):
        ingest("folder", str(tmp_path / "root"), source=str(tmp_path), config=cfg("folder"), progress=False)


def test_no_coordinate_columns_is_fatal_and_names_file_and_column(tmp_path):
    write_csv(tmp_path / "meta.csv", [{"id": "a", "latitude": "1", "lon": "2"}])
    msg = r"meta\.csv: no latitude column 'lat'.*columns \['id', 'latitude', 'lon'\]"
    with pytest.raises(SourceError, match=msg):
        ingest("folder", str(tmp_path / "root"), source=str(tmp_path), config=cfg("folder"), progress=False)


def test_cli_reports_a_wrong_source_and_exits_2(tmp_path, capsys):
    rc = main(["data", "ingest", "folder", "--root", str(tmp_path / "r"), "--source", str(tmp_path / "nope")])
    assert rc == 2
    assert "no such folder or archive" in capsys.readouterr().err
    rc = main(["data", "ingest", "gws15k", "--root", str(tmp_path / "r")])
    assert rc == 2
    assert "not public: give its folder with --source" in capsys.readouterr().err


def test_published_checksum_mismatch_is_an_error(sources, tmp_path):
    url, _ = sources["im2gps3k"]["http"]
    bad = cfg("im2gps3k")
    bad.images.sha256 = "0" * 64
    msg = r"im2gps3ktest\.zip: sha256 [0-9a-f]{64} differs from the published 0+"
    with pytest.raises(ChecksumError, match=msg):
        ingest("im2gps3k", str(tmp_path), source=url, config=bad, progress=False)
    assert not (tmp_path / "im2gps3k" / "images" / "manifest.json").exists()


def test_per_record_checksum_mismatch_is_counted(tmp_path):
    build_folder(tmp_path, "", n=4, archive=False)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "metadata.csv")))
    for i, r in enumerate(rows):
        from .fixtures import sha

        r["sha256"] = sha((tmp_path / f"{r['id']}.jpg").read_bytes()) if i != 1 else "ab" * 32
    write_csv(tmp_path / "metadata.csv", rows)
    m = ingest("folder", str(tmp_path / "root"), source=str(tmp_path),
               config=cfg("folder", sha256_column="sha256"), progress=False)
    assert m["skipped"] == {"checksum_mismatch": 1} and m["count"] == 3
    assert m["skipped_examples"]["checksum_mismatch"] == ["img0001"]


def test_unknown_config_keys_are_rejected(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\nsource: folder\nshard_sise: 3\n")
    with pytest.raises(ValueError, match=r"x\.yaml: shard_sise: unknown key \(did you mean 'shard_size'\?\)"):
        load_dataset_config(str(p))


def test_img2dataset_downloader_without_the_extra_is_a_clear_error(sources, tmp_path):
    try:
        import img2dataset  # noqa: F401

        pytest.skip("img2dataset is installed here")
    except ImportError:
        pass
    url, _ = sources["mp16"]["http"]
    with pytest.raises(ImportError, match=r"pip install 'locdiff\[mp16\]'"):
        ingest("mp16", str(tmp_path), source=url, config=cfg("mp16", downloader="img2dataset"),
               progress=False)
    # "auto" falls back to the builtin downloader when img2dataset is absent
    auto = cfg("mp16", downloader="auto", img2dataset_threshold=1)
    m = ingest("mp16", str(tmp_path), source=url, config=auto, progress=False)
    assert m["count"] == 8


def test_changed_settings_rewrite_the_stage_and_drop_stale_shards(tmp_path):
    build_folder(tmp_path / "src", "", n=10, archive=False)
    root = str(tmp_path / "root")
    first = ingest("folder", root, source=str(tmp_path / "src"), config=cfg("folder"), progress=False)
    assert len(first["shards"]) == 3
    second = ingest("folder", root, source=str(tmp_path / "src"), limit=5, config=cfg("folder"),
                    progress=False)
    assert second["count"] == 5 and len(second["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "root" / "folder" / "images").glob("shard-*")) == [
        "shard-000000.tar", "shard-000001.tar"]


@pytest.mark.parametrize("lat,reason", [("1_0", "missing_coordinates"), ("\u0661", "missing_coordinates"),
                                        ("91", "invalid_coordinates"), ("inf", "invalid_coordinates")])
def test_a_coordinate_that_is_not_a_plain_number_is_counted_not_read(lat, reason):
    """Python's float() reads "1_0" as 10 and Arabic-Indic "١" as 1: a CSV cell must be ASCII digits (with a
    sign, a point, an exponent), or the row is counted under its reason."""
    with pytest.raises(RecordError) as err:
        check_record_coordinates(lat, "5")
    assert err.value.reason == reason
    assert check_record_coordinates(" -12.5e0 ", "+.5") == (-12.5, 0.5)


@pytest.mark.parametrize("where", ["folder", "tar", "http"])
def test_a_metadata_csv_above_its_byte_limit_is_refused_naming_it(where, served, tmp_path):
    """The CSV is streamed to disk (or read in place) and parsed a chunk at a time; its size is still bounded
    by max_metadata_bytes, wherever it comes from, and the message names the file and the setting."""
    if where == "http":
        root, base = served
        build_folder(root / "meta-limit", "", n=10, archive=False)
        source = f"{base}/meta-limit/metadata.csv"
    else:
        build_folder(tmp_path / "src", "", n=10, archive=where == "tar")
        source = str(tmp_path / "src" / ("folder.tar" if where == "tar" else ""))
    small = cfg("folder", max_metadata_bytes=100)
    with pytest.raises(SourceError, match=r"metadata\.csv.*\(raise max_metadata_bytes\)"):
        ingest("folder", str(tmp_path / "root"), source=source, config=small, progress=False)
    m = ingest("folder", str(tmp_path / "root"), source=source, config=cfg("folder"), progress=False)
    assert m["count"] == 10
