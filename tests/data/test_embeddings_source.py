"""The embeddings source (`locdiff data ingest embeddings`: a Parquet table to feature shards): its output for a
table with bad rows over several row groups, and its memory, which does not grow with the table."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from locdiff.data.config import load_dataset_config
from locdiff.data.features import load_features
from locdiff.data.ingest import ingest

from .fixtures import killed_before_placing

REPO = Path(__file__).resolve().parents[2]
N, DIM = 70, 8


def _bad_rows_table(path: Path, value_type: pa.DataType) -> dict[str, list]:
    """70 rows in row groups of 16, with bad ones in several groups; returns its columns as Python lists."""
    rng = np.random.default_rng(3)
    ids: list = [f"e{i}" for i in range(N)]
    lat: list = rng.uniform(-80, 80, N).tolist()
    lon: list = rng.uniform(-180, 180, N).tolist()
    emb: list = rng.normal(size=(N, DIM)).tolist()  # float64: a float32 column rounds them on writing
    ids[3], ids[5], ids[60] = None, "   ", None  # missing ids: named by their row
    ids[10], ids[40] = ids[9], ids[12]  # duplicates (of a good row, and of a row with bad coordinates)
    ids[33] = " e33 "  # stripped
    lat[12], lon[14], lat[50] = 95.0, None, math.nan
    emb[20], emb[22], emb[31] = emb[20][:7], None, emb[31] + [0.5]  # wrong lengths (None: length 0)
    emb[25][2], emb[27][1], emb[30][0] = math.nan, None, math.inf
    table = pa.table({"id": pa.array(ids, pa.string()), "lat": pa.array(lat, pa.float64()),
                      "lon": pa.array(lon, pa.float64()), "embedding": pa.array(emb, value_type)})
    pq.write_table(table, path, row_group_size=16)
    return {"id": ids, "lat": lat, "lon": lon, "embedding": emb}


# the shard bytes the implementation that read the whole table wrote for these tables (sha256 of each shard)
_FIRST = ["53f407202cfdea709286436674eea284722e4f2422a345390348644e13997d27",
          "223f68fc8916230d7df4f9d7c58ec66b3a2fb4362fa8192d014d3f562b6775df",
          "02ba095ce823eea30fa925c7682dce0cc66787b05ba530537ebb17d6e058cfa1",
          "54b90ee45037c729218626de093c8b74ee743300f6fef66b276168b574ef82e3"]
REFERENCE = {
    "float32-all": _FIRST + ["783d62eefb5549cdd06b6af623fbc42069cb4b3439074f93dc4de9851ceaabc5",
                             "7d9981f376c1653d865e3159dcb9290be4ce6974cee34e18ea87d90adc58475d",
                             "4581d957f25db06170e70d61f24fcdc84783d14974649c3be4b1bd75b8d68d46",
                             "9a69a02bc611cd74ae53ef0dfedd309ea18f73bb6581cf380e181777e74b293a"],
    "float64-limit": _FIRST + ["35dbe1d590a2a406edfbcf494ce1230a6ad10768103fe9106cb1412a96d65413"],
}
# and its skip log, row by row (the coordinates' details quote the values as read)
COORDINATES = {12: "lat=95.0 must be in [-90, 90] and lon=-2.5750875872402617 in [-180, 360] degrees",
               14: "lat=38.05404596674563, lon=None", 50: "lat=nan, lon=160.9706387396438"}

BAD = {3: ("row 3", "missing_id"), 5: ("row 5", "missing_id"), 10: ("e9", "duplicate_id"),
       12: ("e12", "invalid_coordinates"), 14: ("e14", "missing_coordinates"),
       20: ("e20", "invalid_embedding"), 22: ("e22", "invalid_embedding"), 25: ("e25", "invalid_embedding"),
       27: ("e27", "invalid_embedding"), 30: ("e30", "invalid_embedding"), 31: ("e31", "invalid_embedding"),
       40: ("e12", "duplicate_id"), 50: ("e50", "missing_coordinates"), 60: ("row 60", "missing_id")}


@pytest.mark.parametrize("case,value_type,limit", [("float32-all", pa.list_(pa.float32()), None),
                                                   ("float64-limit", pa.large_list(pa.float64()), 45)])
def test_a_table_with_bad_rows_gives_the_same_shards_skips_and_manifest(tmp_path, caplog, case, value_type, limit):
    cols = _bad_rows_table(tmp_path / "t.parquet", value_type)
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == 5
    root = tmp_path / "root"
    cfg = load_dataset_config("embeddings", shard_size=7)
    with caplog.at_level(logging.WARNING, logger="locdiff.data.validation"):
        m = ingest("embeddings", str(root), source=str(tmp_path / "t.parquet"), config=cfg, limit=limit,
                   progress=False)
    rows = N if limit is None else limit
    bad = {i: b for i, b in BAD.items() if i < rows}
    good = [i for i in range(rows) if i not in bad]
    # what was skipped, in the order of the rows, with the details of the embeddings
    details = {20: "length 7, expected 8", 22: "length 0, expected 8", 31: "length 9, expected 8",
               25: "NaN or infinite values", 27: "NaN or infinite values", 30: "NaN or infinite values",
               **COORDINATES}
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert skipped == [f"skipped {bad[i][0]!r}: {bad[i][1]}" + (f" ({details[i]})" if i in details else "")
                       for i in sorted(bad)]
    reasons: dict[str, list[str]] = {}
    for i in sorted(bad):
        reasons.setdefault(bad[i][1], []).append(bad[i][0])
    assert m["skipped"] == {k: len(v) for k, v in sorted(reasons.items())}
    assert m["skipped_examples"] == dict(sorted(reasons.items()))
    assert (m["rows"], m["count"], m["embedding"]["dim"]) == (rows, len(good), DIM)
    assert [s["count"] for s in m["shards"]] == [7] * (len(good) // 7) + ([len(good) % 7] if len(good) % 7 else [])
    # the samples: the good rows in order, float32 embeddings, the coordinates as given
    table = load_features(str(root), "embeddings", "precomputed")
    assert list(table.ids) == [cols["id"][i].strip() for i in good]
    np.testing.assert_array_equal(table.embedding, np.asarray([cols["embedding"][i] for i in good], np.float32))
    np.testing.assert_array_equal(table.lat, [cols["lat"][i] for i in good])
    np.testing.assert_array_equal(table.lon, [cols["lon"][i] for i in good])
    # and the very bytes of the shards
    stage = root / "embeddings" / "features" / "precomputed"
    shas = [hashlib.sha256((stage / s["shard"]).read_bytes()).hexdigest() for s in m["shards"]]
    assert shas == [s["sha256"] for s in m["shards"]]
    assert shas == REFERENCE[case]
    assert json.loads((stage / "manifest.json").read_text())["shards"] == m["shards"]


def test_an_ingest_killed_between_shards_resumes_to_the_same_shards_and_manifest(tmp_path, monkeypatch):
    """Shards are written as the table is read; a run killed after two of them, run again, keeps those two and
    ends as an uninterrupted run does."""
    _bad_rows_table(tmp_path / "t.parquet", pa.list_(pa.float32()))
    src, cfg = str(tmp_path / "t.parquet"), load_dataset_config("embeddings", shard_size=7)
    with killed_before_placing(monkeypatch, "shard-000002.tar"):
        ingest("embeddings", str(tmp_path / "root"), source=src, config=cfg, progress=False)
    stage = tmp_path / "root" / "embeddings" / "features" / "precomputed"
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stage.glob("shard-*.tar")}
    assert sorted(finished) == ["shard-000000.tar", "shard-000001.tar"] and not (stage / "manifest.json").exists()
    resumed = ingest("embeddings", str(tmp_path / "root"), source=src, config=cfg, progress=False)
    clean = ingest("embeddings", str(tmp_path / "clean"), source=src, config=cfg, progress=False)
    assert resumed == clean and [s["sha256"] for s in resumed["shards"]] == REFERENCE["float32-all"]
    for name, stat in finished.items():  # not written again
        assert ((stage / name).stat().st_ino, (stage / name).stat().st_mtime_ns) == stat
    assert [p for p in stage.rglob("*") if p.is_file() and ".tmp" in p.name] == []


def test_duplicates_across_batches_keep_the_first_and_log_the_others(tmp_path, monkeypatch, caplog):
    """Read five rows at a time (and the ids asked for two at a time), the duplicates of rows in earlier batches are
    skipped and logged as in one batch: the same skip log and the very same shards."""
    from locdiff.data.sources import embeddings
    from locdiff.data.sources.records import SeenIds

    monkeypatch.setattr(embeddings, "MAX_BATCH_ROWS", 5)  # rows 9 and 10, 12 and 40: in different batches
    monkeypatch.setattr(SeenIds, "CHUNK", 2)
    _bad_rows_table(tmp_path / "t.parquet", pa.list_(pa.float32()))
    cfg = load_dataset_config("embeddings", shard_size=7)
    with caplog.at_level(logging.WARNING, logger="locdiff.data.validation"):
        m = ingest("embeddings", str(tmp_path / "root"), source=str(tmp_path / "t.parquet"), config=cfg,
                   progress=False)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert [s.split(" (")[0] for s in skipped] == [f"skipped {BAD[i][0]!r}: {BAD[i][1]}" for i in sorted(BAD)]
    assert m["skipped_examples"]["duplicate_id"] == ["e9", "e12"]
    assert [s["sha256"] for s in m["shards"]] == REFERENCE["float32-all"]
    stage = tmp_path / "root" / "embeddings" / "features" / "precomputed"
    assert [p for p in stage.rglob("*") if p.is_file() and ".tmp" in p.name] == []  # nor the ids' file


def test_a_killed_ingest_leaves_ids_that_a_rerun_does_not_count_as_seen(tmp_path, monkeypatch):
    """The ids a killed run had seen (on disk, left as a SIGKILL leaves them) are not carried over: the re-run,
    which reads the table from its first row again, skips the same duplicates as an uninterrupted run."""
    from locdiff.data.sources import embeddings
    from locdiff.data.sources.records import SeenIds

    monkeypatch.setattr(embeddings, "MAX_BATCH_ROWS", 5)
    _bad_rows_table(tmp_path / "t.parquet", pa.list_(pa.float32()))
    src, cfg = str(tmp_path / "t.parquet"), load_dataset_config("embeddings", shard_size=7)
    stage = tmp_path / "root" / "embeddings" / "features" / "precomputed"
    with monkeypatch.context() as kill:
        kill.setattr(SeenIds, "close", lambda self: self._db.close())  # killed: the file is not removed
        with killed_before_placing(monkeypatch, "shard-000002.tar"):
            ingest("embeddings", str(tmp_path / "root"), source=src, config=cfg, progress=False)
    assert [p.name for p in (stage / ".tmp").iterdir() if p.name.startswith("seen-")]
    resumed = ingest("embeddings", str(tmp_path / "root"), source=src, config=cfg, progress=False)
    clean = ingest("embeddings", str(tmp_path / "clean"), source=src, config=cfg, progress=False)
    assert resumed == clean and [s["sha256"] for s in resumed["shards"]] == REFERENCE["float32-all"]
    assert resumed["skipped"]["duplicate_id"] == 2
    assert [p for p in stage.rglob("*") if p.is_file() and ".tmp" in p.name] == []


def test_a_full_disk_under_the_ids_seen_is_one_line(tmp_path, monkeypatch, capsys):
    """The ids seen are written to disk as the table is read: a full disk there (SQLite's own error) is the one
    line of any full disk, exit code 2, and the file is removed."""
    import sqlite3

    from locdiff.cli import main

    real = sqlite3.connect

    def full(path, **kw):  # noqa: ANN001, ANN003 (a disk with room for two pages: the ids of the first batch fill it)
        db = real(path, **kw)
        db.execute("PRAGMA max_page_count=2")
        return db

    rows = 300
    pq.write_table(pa.table({"id": [f"mp16/{i:026d}.jpg" for i in range(rows)], "lat": [1.0] * rows,
                             "lon": [2.0] * rows, "embedding": [[0.5, 0.25]] * rows}), tmp_path / "t.parquet")
    monkeypatch.setattr(sqlite3, "connect", full)
    root = tmp_path / "root"
    assert main(["data", "ingest", "embeddings", "--root", str(root), "--source", str(tmp_path / "t.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    stage = root / "embeddings" / "features" / "precomputed"
    assert err.startswith(f"locdiff data ingest: error: {stage}: no space left on device (writing {stage}/.tmp/seen-")
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert [p for p in root.rglob("*") if p.is_file() and ".tmp" in p.name] == []


def test_a_damaged_table_is_refused_before_anything_is_written(tmp_path, capsys):
    """The whole table is read once before the first shard: a file damaged past its first rows is refused in
    one line naming it, and the stage an earlier ingest wrote stays as it was."""
    from locdiff.cli import main

    _bad_rows_table(tmp_path / "t.parquet", pa.list_(pa.float32()))
    root = tmp_path / "root"
    argv = ["data", "ingest", "embeddings", "--root", str(root), "--source", str(tmp_path / "t.parquet")]
    assert main(argv) == 0
    stage = root / "embeddings" / "features" / "precomputed"
    before = {p.relative_to(stage): p.read_bytes() for p in stage.rglob("*") if p.is_file()}
    data = (tmp_path / "t.parquet").read_bytes()
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
    cut = meta.row_group(3).column(0).file_offset  # the last row groups' pages are lost, the footer kept
    (tmp_path / "t.parquet").write_bytes(data[:cut] + data[cut + 200:])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"locdiff data ingest: error: {tmp_path / 't.parquet'}: not a readable Parquet file")
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert {p.relative_to(stage): p.read_bytes() for p in stage.rglob("*") if p.is_file()} == before


CHILD = r"""
import sys
from locdiff.data.config import load_dataset_config
from locdiff.data.ingest import ingest
m = ingest("embeddings", sys.argv[2], source=sys.argv[1], config=load_dataset_config("embeddings", shard_size=1000),
           progress=False)
assert m["count"] == int(sys.argv[3]), m["count"]
# VmHWM: this process's own peak (ru_maxrss would carry the forking pytest process's peak over through exec)
print([ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1])
"""


def _ingest_peak(tmp_path, rows: int) -> int:
    """Peak RSS (bytes) of a fresh process ingesting tmp_path/ROWS.parquet into tmp_path/rootROWS (CHILD)."""
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / f"{rows}.parquet"),
                           str(tmp_path / f"root{rows}"), str(rows)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1]) * 1024


@pytest.mark.slow
def test_the_memory_of_an_ingest_does_not_grow_with_the_table(tmp_path):
    """A table four times as long costs no more memory to ingest (the whole table was held
    several times over: as bytes, as a table, as a Python float a number, as the rows kept)."""
    from locdiff.io import write_embeddings
    from locdiff.tables import EmbeddingTable

    dim, n = 512, 12_000  # past the first batches (2,048 rows): what a reader holds at a time is reached
    peaks = []
    for rows in (n, 4 * n):
        rng = np.random.default_rng(rows)
        write_embeddings(tmp_path / f"{rows}.parquet", EmbeddingTable(
            ids=np.array([f"r{i:06d}" for i in range(rows)], dtype=object), lat=rng.uniform(-80, 80, rows),
            lon=rng.uniform(-180, 180, rows), embedding=rng.normal(size=(rows, dim)).astype(np.float32)))
        peaks.append(_ingest_peak(tmp_path, rows))
    table = 3 * n * dim * 4  # the bytes of the embeddings the longer table has more of
    print(f"peaks {peaks[0] / 2**20:.0f} MB, {peaks[1] / 2**20:.0f} MB; table {table / 2**20:.0f} MB")
    assert peaks[1] - peaks[0] < table / 4, (peaks, table)


@pytest.mark.slow
def test_the_ids_seen_are_not_held_in_memory(tmp_path):
    """Small embeddings, long ids: a table four times as long costs no more memory to ingest (the ids seen, to
    skip duplicates, were a Python set: about 120 bytes an id)."""
    import pyarrow.compute as pc

    n, dim = 50_000, 4
    peaks = []
    for rows in (n, 4 * n):
        rng = np.random.default_rng(rows)
        ids = pc.binary_join_element_wise("mp16/", pa.array([f"{i % 10_000:04d}/{i:016x}" for i in range(rows)]),
                                          ".jpg", "")
        pq.write_table(pa.table({"id": ids, "lat": rng.uniform(-80, 80, rows), "lon": rng.uniform(-180, 180, rows),
                                 "embedding": pa.array(list(rng.normal(size=(rows, dim)).astype(np.float32)),
                                                       pa.list_(pa.float32()))}),
                       tmp_path / f"{rows}.parquet", row_group_size=10_000)
        peaks.append(_ingest_peak(tmp_path, rows))
    print(f"peaks {peaks[0] / 2**20:.0f} MB, {peaks[1] / 2**20:.0f} MB")
    assert peaks[1] - peaks[0] < 3 * n * 40, peaks  # a set of the 150,000 more ids: about 20 MB (measured)
