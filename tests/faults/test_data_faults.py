"""Bad inputs to `locdiff data ingest | embed | inspect | export`, as a table (the style of test_cli_faults.py):
each case damages a copy of a good stage (an images stage of a few photos, a features stage of a small
table) or names a hostile NAME or encoder, runs one command in this process and expects exit code 2, exactly
ONE line on stderr naming the culprit, and every file that existed before unchanged, with no file added.

The stages' manifests and shards are untrusted: whoever wrote them may have written both (a shard's sha256
resealed in its manifest), so the checks below hold even when the checksums agree."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from locdiff.cli import main
from locdiff.data.datasource import open_source
from locdiff.data.featurize import read_shard_chunks
from locdiff.data.validation import ShardError
from locdiff.worlds.synth_photos import photo

from .helpers import assert_one_line_fault

Case = Callable[[dict[str, Path], Path], tuple[list[str], list[str]]]
ENCODER = "org/not-downloaded"  # a hub id: a config only; every case fails before a model is loaded


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """ROOT with ROOT/folder/images (6 photos, one shard) and ROOT/embeddings/features/precomputed (a 6-row table)."""
    base = tmp_path_factory.mktemp("data-faults")
    src = base / "photos"
    src.mkdir()
    rows = ["id,lat,lon"]
    for i in range(6):
        (src / f"p{i}.jpg").write_bytes(photo(10.0 + i, 20.0 + i, seed=i))
        rows.append(f"p{i},{10 + i},{20 + i}")
    (src / "meta.csv").write_text("\n".join(rows) + "\n")
    root = base / "root"
    assert main(["data", "ingest", "folder", "--root", str(root), "--source", str(src)]) == 0
    emb = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    table = pa.table({"id": [f"e{i}" for i in range(6)], "lat": np.linspace(-40, 40, 6), "lon": np.linspace(0, 50, 6),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 8)})
    pq.write_table(table, base / "emb.parquet")
    assert main(["data", "ingest", "embeddings", "--root", str(root), "--source", str(base / "emb.parquet")]) == 0
    return {"root": root, "images": root / "folder" / "images",
            "features": root / "embeddings" / "features" / "precomputed"}


def _copy(stages: dict[str, Path], tmp: Path) -> Path:
    root = tmp / "root"
    shutil.copytree(stages["root"], root)
    return root


def _edit_manifest(stage: Path, edit: Callable[[dict], object]) -> Path:
    path = stage / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return path


def _embed(root: Path) -> list[str]:
    return ["data", "embed", "folder", "--root", str(root), "--encoder", ENCODER, "--runner", "local"]


def _reseal(stage: Path, shard: str, data: bytes, count: int | None = None) -> None:
    """Write `data` as the shard and record its sha256 (and `count`) in the manifest, as whoever crafted both
    would."""
    (stage / shard).write_bytes(data)

    def edit(m: dict) -> None:
        entry = next(e for e in m["shards"] if e["shard"] == shard)
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        if count is not None:
            entry["count"] = count
    _edit_manifest(stage, edit)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- an images manifest that names what is not a shard of its folder --------------------------------------------

def embed_a_manifest_naming_a_shard_outside(s, tmp):
    root = _copy(s, tmp)
    path = _edit_manifest(root / "folder" / "images",
                          lambda m: m["shards"][0].update(shard="../../../../../../../../etc/passwd"))
    return _embed(root), [f"{path}: bad shard entry '../../"]


def embed_a_manifest_naming_an_absolute_shard(s, tmp):
    root = _copy(s, tmp)
    path = _edit_manifest(root / "folder" / "images", lambda m: m["shards"][0].update(shard="/etc/passwd"))
    return _embed(root), [f"{path}: bad shard entry '/etc/passwd'"]


def embed_a_manifest_with_a_null_shard_entry(s, tmp):
    root = _copy(s, tmp)
    path = _edit_manifest(root / "folder" / "images", lambda m: m["shards"].__setitem__(0, None))
    return _embed(root), [f"{path}: not a stage manifest"]


def embed_a_manifest_with_a_shard_name_not_a_string(s, tmp):
    root = _copy(s, tmp)
    path = _edit_manifest(root / "folder" / "images", lambda m: m["shards"][0].update(shard=5))
    return _embed(root), [f"{path}: bad shard entry 5"]


def embed_a_manifest_with_a_count_not_a_number(s, tmp):
    root = _copy(s, tmp)
    path = _edit_manifest(root / "folder" / "images", lambda m: m["shards"][0].update(count="many"))
    return _embed(root), [f"{path}: not a stage manifest"]


# -- sources that hold nothing ----------------------------------------------------------------------------------

def ingest_a_csv_with_a_header_and_no_rows(s, tmp):
    """Its rows lost, the CSV used to make an empty data set with exit 0, beside the photos it should have named."""
    src = tmp / "photos"
    src.mkdir()
    (src / "p0.jpg").write_bytes(photo(10.0, 20.0, seed=0))
    (src / "meta.csv").write_text("id,lat,lon\n")
    return (["data", "ingest", "folder", "--root", str(tmp / "root"), "--source", str(src)],
            [f"{src / 'meta.csv'}: the CSV has a header and no rows"])


# -- NAME and encoder names that lead out of ROOT ------------------------------------------------------------------

def ingest_a_name_that_is_an_absolute_config_path(s, tmp):
    """An absolute NAME is read as a config path, and used to be joined onto ROOT: ROOT/NAME was NAME itself, so
    the stage was written outside ROOT (beside the YAML)."""
    cfg = tmp / "mine"
    cfg.with_suffix(".yaml").write_text("name: folder\nsource: folder\nsplit: x\nlicense: x\n")
    return (["data", "ingest", str(cfg), "--root", str(tmp / "root"), "--source", str(s["images"].parent)],
            [f"data set name '{cfg}': must be a folder name under ROOT"])


def export_a_name_with_dotdot(s, tmp):
    return (["data", "export", "..", "--root", str(s["features"] / "x"), "--encoder", "precomputed", "--out",
             str(tmp / "t.parquet")], ["data set name '..'"])


def embed_with_an_encoder_config_whose_name_has_dotdot(s, tmp):
    """An encoder config's `name` is the features folder: ROOT/NAME/features/../../../x would be outside ROOT."""
    cfg = tmp / "enc.yaml"
    cfg.write_text("name: ../../../escaped\ntype: clip\nmodel: org/not-downloaded\n")
    return (["data", "embed", "folder", "--root", str(_copy(s, tmp)), "--encoder", str(cfg), "--runner", "local"],
            ["encoder name '../../../escaped'"])


# -- JSON that parses to nothing usable: nested too deeply, integers of more digits than Python converts ---------

def inspect_a_manifest_nested_too_deeply(s, tmp):
    root = _copy(s, tmp)
    path = root / "folder" / "images" / "manifest.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    return ["data", "inspect", str(root / "folder")], [f"{path}: not valid JSON (nested too deeply)"]


def embed_a_manifest_with_a_10000_digit_integer(s, tmp):
    root = _copy(s, tmp)
    path = root / "folder" / "images" / "manifest.json"
    path.write_text('{"shards": [], "count": ' + "9" * 10_000 + "}")
    return _embed(root), [f"{path}: not valid JSON (Exceeds the limit"]


def export_a_features_manifest_nested_too_deeply(s, tmp):
    root = _copy(s, tmp)
    path = root / "embeddings" / "features" / "precomputed" / "manifest.json"
    path.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    return (["data", "export", "embeddings", "--root", str(root), "--encoder", "precomputed", "--out",
             str(tmp / "t.parquet")], [f"{path}: not valid JSON (nested too deeply)"])


def inspect_a_json_member_nested_too_deeply(s, tmp):
    root = _copy(s, tmp)
    stage = root / "folder" / "images"
    _reseal(stage, "shard-000000.tar", _tar([("000000000.jpg", photo(1, 2, seed=0)),
                                             ("000000000.json", b"[" * 200_000 + b"]" * 200_000)]), 1)
    return (["data", "inspect", str(root / "folder")],
            [f"{stage / 'shard-000000.tar'}: member 000000000.json is not valid JSON (nested too deeply)"])



def export_a_features_manifest_a_billion_wide(s, tmp):
    """The dimension a features manifest records is bounded before an array of that width is allocated."""
    root = _copy(s, tmp)
    stage = root / "embeddings" / "features" / "precomputed"
    path = _edit_manifest(stage, lambda m: m["embedding"].update(dim=10**9))
    return (["data", "export", "embeddings", "--root", str(root), "--encoder", "precomputed", "--out",
             str(tmp / "t.parquet")], [f"{path}: embedding dimension 1,000,000,000, above the limit of 65,536"])


def export_a_features_manifest_counting_10_12_rows(s, tmp):
    """The rows a manifest counts size the table export allocates: 10^12 was "out of memory" naming nothing."""
    root = _copy(s, tmp)
    stage = root / "embeddings" / "features" / "precomputed"

    def edit(m: dict) -> None:
        m["shards"][0]["count"] = m["count"] = 10**12
    path = _edit_manifest(stage, edit)
    return (["data", "export", "embeddings", "--root", str(root), "--encoder", "precomputed", "--out",
             str(tmp / "t.parquet")], [f"{path}: features manifest is too large to load (out of memory)"])


# -- files where a stage's shard should be; outputs onto the inputs -----------------------------------------------

def inspect_a_shard_that_is_a_folder(s, tmp):
    """A folder in the place of a shard was named by its file descriptor ("3: is a directory")."""
    root = _copy(s, tmp)
    shard = root / "folder" / "images" / "shard-000000.tar"
    shard.unlink()
    shard.mkdir()
    return ["data", "inspect", str(root / "folder")], [f"{shard}: not a regular file"]


def export_out_onto_a_shard_of_the_stage(s, tmp):
    """`--out` naming the stage's own shard replaced the shard with the table."""
    shard = s["features"] / "shard-000000.tar"
    return (["data", "export", "embeddings", "--root", str(s["root"]), "--encoder", "precomputed", "--out",
             str(shard)], [f"--out {shard} is the features stage's shard-000000.tar file"])


def export_out_onto_the_manifest(s, tmp):
    path = s["features"] / "manifest.json"
    return (["data", "export", "embeddings", "--root", str(s["root"]), "--encoder", "precomputed", "--out",
             str(path)], [f"--out {path} is the features stage's manifest.json file"])


def _sparse(path: Path, size: int = 64 << 20) -> None:
    """`path` replaced by a sparse file of `size` bytes, far more than its manifest records (the fuzzing pass used
    3 GiB: 3.4 GB of peak memory under inspect, embed and export; 64 MiB keeps this test's own snapshots cheap)."""
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)


def inspect_a_sparse_shard_larger_than_recorded(s, tmp):
    root = _copy(s, tmp)
    shard = root / "folder" / "images" / "shard-000000.tar"
    _sparse(shard)
    return ["data", "inspect", str(root / "folder")], [f"{shard}: larger than the "]


def export_a_sparse_features_shard_larger_than_recorded(s, tmp):
    root = _copy(s, tmp)
    shard = root / "embeddings" / "features" / "precomputed" / "shard-000000.tar"
    _sparse(shard)
    return (["data", "export", "embeddings", "--root", str(root), "--encoder", "precomputed", "--out",
             str(tmp / "t.parquet")], [f"{shard}: larger than the "])

CASES: list[Case] = [
    embed_a_manifest_naming_a_shard_outside, embed_a_manifest_naming_an_absolute_shard,
    embed_a_manifest_with_a_null_shard_entry, embed_a_manifest_with_a_shard_name_not_a_string,
    embed_a_manifest_with_a_count_not_a_number, ingest_a_name_that_is_an_absolute_config_path,
    export_a_name_with_dotdot, embed_with_an_encoder_config_whose_name_has_dotdot,
    inspect_a_manifest_nested_too_deeply, embed_a_manifest_with_a_10000_digit_integer,
    export_a_features_manifest_nested_too_deeply, inspect_a_json_member_nested_too_deeply,
    export_a_features_manifest_a_billion_wide, export_a_features_manifest_counting_10_12_rows,
    inspect_a_shard_that_is_a_folder, export_out_onto_a_shard_of_the_stage,
    export_out_onto_the_manifest, inspect_a_sparse_shard_larger_than_recorded,
    export_a_sparse_features_shard_larger_than_recorded, ingest_a_csv_with_a_header_and_no_rows,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_data_fault_is_one_line_exit_2_and_nothing_is_lost(stages, tmp_path, capsys, case):
    argv, culprits = case(stages, tmp_path)
    assert_one_line_fault(argv, culprits, [tmp_path, stages["root"]], capsys)


def test_embed_refuses_a_shard_with_other_samples_than_its_manifest_says(stages, tmp_path):
    """A resealed shard of one sample that the manifest counts as five: named, before its features are written."""
    root = _copy(stages, tmp_path)
    stage = root / "folder" / "images"
    meta = json.dumps({"id": "x", "lat": 1.0, "lon": 2.0}).encode()
    _reseal(stage, "shard-000000.tar", _tar([("000000000.jpg", photo(1, 2, seed=0)), ("000000000.json", meta)]), 5)
    entry = json.loads((stage / "manifest.json").read_text())["shards"][0]
    job = {"images_url": str(stage / entry["shard"]), "sha256": entry["sha256"], "shard": entry["shard"],
           "count": entry["count"], "batch_size": 4}
    with pytest.raises(ShardError, match=r"shard-000000\.tar: 1 samples, the images manifest says 5"):
        list(read_shard_chunks(job, lambda images: np.zeros((len(images), 3), np.float32)))



@pytest.mark.parametrize("lat, lon", [("n", 1), (float("nan"), 1), (999, 1), (1, float("inf")), (1, None)])
def test_embed_skips_a_sample_whose_coordinates_are_not_valid(stages, tmp_path, lat, lon):
    """An images shard's JSON member is untrusted: coordinates that are not numbers, not finite or out of range
    are skipped as a record of ingest would be (counted), never written into the features; null ones are kept."""
    root = _copy(stages, tmp_path)
    stage = root / "folder" / "images"
    members = [("000000000.jpg", photo(1, 2, seed=0)),
               ("000000000.json", json.dumps({"id": "bad", "lat": lat, "lon": lon}).encode()),
               ("000000001.jpg", photo(3, 4, seed=1)),
               ("000000001.json", json.dumps({"id": "good", "lat": 3.0, "lon": 4.0}).encode())]
    _reseal(stage, "shard-000000.tar", _tar(members), 2)
    entry = json.loads((stage / "manifest.json").read_text())["shards"][0]
    job = {"images_url": str(stage / entry["shard"]), "sha256": entry["sha256"], "shard": entry["shard"],
           "count": 2, "batch_size": 4}
    chunks = list(read_shard_chunks(job, lambda images: np.zeros((len(images), 3), np.float32)))
    assert [m["id"] for c in chunks for m in c["metas"]] == ["good"]
    reason = "invalid_coordinates" if 999 in (lat, lon) or lon == float("inf") else "missing_coordinates"
    assert chunks[-1]["skipped"]["skipped"] == {reason: 1}



def test_embed_and_training_refuse_a_shard_larger_than_its_manifest_records_before_reading_it(stages, tmp_path):
    """A (sparse) file larger than its manifest records in the place of a shard is refused by its size: it used to
    be read whole (a 3 GiB one: 3.4 GB of peak memory under inspect, embed and export) only to fail its sha256."""
    root = _copy(stages, tmp_path)
    images, features = root / "folder" / "images", root / "embeddings" / "features" / "precomputed"
    src = open_source(str(features))
    entry = json.loads((images / "manifest.json").read_text())["shards"][0]
    job = {"images_url": str(images / entry["shard"]), "sha256": entry["sha256"], "shard": entry["shard"],
           "count": entry["count"], "bytes": entry["bytes"], "batch_size": 4}
    _sparse(images / "shard-000000.tar")
    _sparse(features / "shard-000000.tar")
    match = r"shard-000000\.tar: larger than the [0-9,]+ bytes the manifest records"
    with pytest.raises(ValueError, match=match):
        list(read_shard_chunks(job, lambda images: np.zeros((len(images), 3), np.float32)))
    with pytest.raises(ValueError, match=match):
        src.read(src.pieces[0])



@pytest.mark.parametrize("key", ["../../000000000", "/tmp/000000000", "./000000000"])
def test_embed_refuses_a_sample_key_that_is_a_path(stages, tmp_path, key):
    """The key of an images shard's sample names the members of the features shard embed writes: a crafted
    `../../000000000.jpg` member would have put `../../000000000.emb.npy` into it."""
    root = _copy(stages, tmp_path)
    stage = root / "folder" / "images"
    meta = json.dumps({"id": "x", "lat": 1.0, "lon": 2.0}).encode()
    _reseal(stage, "shard-000000.tar", _tar([(f"{key}.jpg", photo(1, 2, seed=0)), (f"{key}.json", meta)]), 1)
    entry = json.loads((stage / "manifest.json").read_text())["shards"][0]
    job = {"images_url": str(stage / entry["shard"]), "sha256": entry["sha256"], "shard": entry["shard"],
           "count": 1, "batch_size": 4}
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample key .* is not a plain name"):
        list(read_shard_chunks(job, lambda images: np.zeros((len(images), 3), np.float32)))
