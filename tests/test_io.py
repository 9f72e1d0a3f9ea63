"""The embeddings and predictions formats: round trips and every bad-input case."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from locdiff.io import read_embeddings, read_predictions, write_embeddings, write_predictions
from locdiff.tables import EmbeddingTable


def _table(n=5, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return EmbeddingTable(ids=np.array([f"img{i}" for i in range(n)], dtype=object),
                          lat=rng.uniform(-80, 80, n), lon=rng.uniform(-180, 180, n),
                          embedding=rng.normal(size=(n, d)).astype(np.float32))


def _write_raw(path, **cols):
    pq.write_table(pa.table(cols), path)
    return path


def _good_cols(n=5, d=4):
    t = _table(n, d)
    return {"id": pa.array(list(t.ids)), "lat": pa.array(t.lat), "lon": pa.array(t.lon),
            "embedding": pa.array([list(map(float, e)) for e in t.embedding], pa.list_(pa.float32()))}


def test_round_trip_fixed_size(tmp_path):
    t = _table()
    write_embeddings(tmp_path / "e.parquet", t)
    assert pq.read_schema(tmp_path / "e.parquet").field("embedding").type == pa.list_(pa.float32(), 4)
    r = read_embeddings(tmp_path / "e.parquet")
    assert list(r.ids) == list(t.ids) and r.labelled
    np.testing.assert_array_equal(r.embedding, t.embedding)
    np.testing.assert_array_equal(r.lat, t.lat)
    assert r.source.endswith("e.parquet")


def test_variable_list_and_unlabelled_and_folder(tmp_path):
    cols = _good_cols()
    _write_raw(tmp_path / "v.parquet", **cols)
    assert read_embeddings(tmp_path / "v.parquet").embedding.shape == (5, 4)
    del cols["lat"], cols["lon"]
    _write_raw(tmp_path / "u.parquet", **cols)
    u = read_embeddings(tmp_path / "u.parquet")
    assert not u.labelled and u.lat is None
    with pytest.raises(ValueError, match=r"u\.parquet: missing column 'lat'"):
        read_embeddings(tmp_path / "u.parquet", labelled=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_embeddings(shards / "a.parquet", _table(3, seed=1))
    t2 = _table(3, seed=2)
    t2.ids = np.array(["x0", "x1", "x2"], dtype=object)
    write_embeddings(shards / "b.parquet", t2)
    assert len(read_embeddings(shards)) == 6


@pytest.mark.parametrize("drop", ["id", "embedding", "lon"])
def test_missing_column(tmp_path, drop):
    cols = _good_cols()
    del cols[drop]
    path = _write_raw(tmp_path / "m.parquet", **cols)
    with pytest.raises(ValueError, match=rf"m\.parquet: missing column '{drop}'"):
        read_embeddings(path)


def test_embeddings_of_different_lengths(tmp_path):
    cols = _good_cols()
    emb = cols["embedding"].to_pylist()
    emb[3] = emb[3][:2]
    cols["embedding"] = pa.array(emb, pa.list_(pa.float32()))
    path = _write_raw(tmp_path / "len.parquet", **cols)
    with pytest.raises(ValueError, match=r"len\.parquet: column 'embedding', row 3: embedding has length 2, "
                                         r"but row 0 has 4"):
        read_embeddings(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_embedding(tmp_path, bad):
    cols = _good_cols()
    emb = cols["embedding"].to_pylist()
    emb[2][1] = bad
    cols["embedding"] = pa.array(emb, pa.list_(pa.float32()))
    path = _write_raw(tmp_path / "nan.parquet", **cols)
    with pytest.raises(ValueError, match=r"nan\.parquet: column 'embedding', row 2: element 1 .*NaN or inf"):
        read_embeddings(path)


def test_null_embedding(tmp_path):
    cols = _good_cols()
    emb = cols["embedding"].to_pylist()
    emb[4] = None
    cols["embedding"] = pa.array(emb, pa.list_(pa.float32()))
    with pytest.raises(ValueError, match=r"column 'embedding', row 4: embedding is null"):
        read_embeddings(_write_raw(tmp_path / "null.parquet", **cols))


@pytest.mark.parametrize("column,value",
                         [("lat", 91.0), ("lat", float("nan")), ("lon", -200.0), ("lon", 400.0)])
def test_coordinates_out_of_range(tmp_path, column, value):
    cols = _good_cols()
    v = cols[column].to_pylist()
    v[1] = value
    cols[column] = pa.array(v, pa.float64())
    path = _write_raw(tmp_path / "c.parquet", **cols)
    with pytest.raises(ValueError, match=rf"c\.parquet: column '{column}', row 1: .*not a finite number"):
        read_embeddings(path)


def test_duplicate_ids(tmp_path):
    cols = _good_cols()
    ids = cols["id"].to_pylist()
    ids[4] = ids[1]
    cols["id"] = pa.array(ids)
    path = _write_raw(tmp_path / "dup.parquet", **cols)
    with pytest.raises(ValueError, match=r"dup\.parquet: column 'id', row 4: duplicate id 'img1' "
                                         r"\(first seen at row 1\)"):
        read_embeddings(path)


def test_not_parquet_and_missing_file(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: not a readable Parquet file"):
        read_embeddings(tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_embeddings(tmp_path / "nope.parquet")


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_predictions_round_trip(tmp_path, ext):
    path = tmp_path / f"p.{ext}"
    ids = ["a", "b", "c"]
    write_predictions(path, ids, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [1.5, 2.5, 3.5], [4.5, 5.5, 6.5],
                      method="knn", confidence=[0.1, 0.2, 0.3])
    p = read_predictions(path)
    assert list(p.ids) == ids and list(p.method) == ["knn"] * 3
    np.testing.assert_array_equal(p.pred_lon, [4.5, 5.5, 6.5])
    np.testing.assert_array_equal(p.confidence, [0.1, 0.2, 0.3])
    write_predictions(path, ids, None, None, [1.5, 2.5, 3.5], [4.5, 5.5, 6.5])
    q = read_predictions(path)
    assert not q.labelled and q.method is None and q.confidence is None


def test_predictions_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"p\.txt: predictions file must end in \.parquet or \.csv"):
        write_predictions(tmp_path / "p.txt", ["a"], None, None, [0.0], [0.0])
    with pytest.raises(ValueError, match=r"column 'pred_lat', row 1"):
        write_predictions(tmp_path / "p.csv", ["a", "b"], None, None, [0.0, 95.0], [0.0, 0.0])
    assert not (tmp_path / "p.csv").exists()
    (tmp_path / "q.csv").write_text("id,lat,lon,pred_lat\na,1,2,3\n")
    with pytest.raises(ValueError, match=r"q\.csv: missing column 'pred_lon'"):
        read_predictions(tmp_path / "q.csv")
    (tmp_path / "r.csv").write_text("id,lat,lon,pred_lat,pred_lon\na,1,2,3,4\nb,100,2,3,4\n")
    with pytest.raises(ValueError, match=r"r\.csv: column 'lat', row 1"):
        read_predictions(tmp_path / "r.csv")


def test_a_write_removes_the_temporary_files_of_killed_writers_only(tmp_path):
    """A process killed inside an output write leaves its temporary sibling (PATH.tmp-PID...); the next write
    of that output removes those of processes that no longer run, and keeps a running writer's."""
    import subprocess
    import sys

    from locdiff.io import write_file_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    table, png = tmp_path / "p.parquet", tmp_path / "map.png"
    for killed in (f"{table}.tmp-{dead}", f"{png}.tmp-{dead}-0badc0de"):  # as a kill inside a write leaves
        (tmp_path / killed).write_bytes(b"half")
    running = tmp_path / "p.parquet.tmp-1"  # pid 1 always runs
    running.write_bytes(b"being written")
    write_predictions(table, ["a"], None, None, [1.0], [2.0])
    write_file_atomic(png, b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png", "p.parquet", "p.parquet.tmp-1"]


def _reference(files):
    """The embeddings as a plain whole-table read gives them (the reader before the batched one)."""
    col = pa.concat_tables([pq.read_table(f) for f in files]).column("embedding").combine_chunks()
    n = len(col)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.float32)


@pytest.mark.parametrize("kind", ["fixed32", "list32", "list64", "large64"])
@pytest.mark.parametrize("folder", [False, True])
def test_the_batched_reader_gives_the_whole_table_byte_for_byte(tmp_path, monkeypatch, kind, folder):
    """The embedding column is read in batches (here of 5 rows) into one array across row groups (of 7 rows)
    and files: the same bytes as a whole-table read, for fixed-size and variable lists of float32 and float64."""
    import locdiff.io

    monkeypatch.setattr(locdiff.io, "STREAM_FLOATS", 40)
    value = pa.float32() if kind.endswith("32") else pa.float64()
    typ = {"fixed32": pa.list_(value, 8), "list32": pa.list_(value), "list64": pa.list_(value),
           "large64": pa.large_list(value)}[kind]
    rng = np.random.default_rng(1)
    files = []
    for i, n in enumerate([23, 9, 16] if folder else [23]):
        emb = rng.normal(size=(n, 8)).astype(np.float64)
        cols = {"id": pa.array([f"f{i}r{r}" for r in range(n)]), "lat": pa.array(rng.uniform(-80, 80, n)),
                "lon": pa.array(rng.uniform(-180, 180, n)), "embedding": pa.array(list(emb), typ)}
        files.append(tmp_path / "t" / f"part{i}.parquet")
        files[-1].parent.mkdir(exist_ok=True)
        pq.write_table(pa.table(cols), files[-1], row_group_size=7)
    t = read_embeddings(tmp_path / "t" if folder else files[0])
    ref = _reference(files)
    assert t.embedding.dtype == np.float32 and t.embedding.shape == ref.shape
    assert t.embedding.tobytes() == ref.tobytes()
    whole = pa.concat_tables([pq.read_table(f) for f in files])
    assert list(t.ids) == whole.column("id").to_pylist()
    np.testing.assert_array_equal(t.lat, whole.column("lat").to_numpy())


@pytest.mark.parametrize("first,later,problem", [
    ("nan", "null_element", "row 30: element 2 of the embedding is null"),
    ("nan", "short", "row 30: embedding has length 3, but row 0 has 8"),
    ("short", "null_row", "row 30: embedding is null"),
    ("big", "nan", "row 3: element 2 of the embedding is 1e+07, beyond"),
])
def test_the_batched_reader_names_the_row_the_whole_table_check_named(tmp_path, monkeypatch, first, later, problem):
    """A bad row in a later batch (and row group) of a kind checked first is the one named, as when the column
    was checked whole."""
    import locdiff.io

    monkeypatch.setattr(locdiff.io, "STREAM_FLOATS", 40)
    emb = np.random.default_rng(2).normal(size=(40, 8)).tolist()
    for row, what in ((3, first), (30, later)):
        if what == "null_row":
            emb[row] = None
        elif what == "short":
            emb[row] = emb[row][:3]
        else:
            emb[row][2] = {"nan": float("nan"), "big": 1e7, "null_element": None}[what]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(40)], "embedding": pa.array(emb, pa.list_(pa.float64()))}),
                   path, row_group_size=16)
    with pytest.raises(ValueError, match=rf"bad\.parquet: column 'embedding', {re.escape(problem)}"):
        read_embeddings(path)


MEMORY_DRIVER = r"""
import sys
from pathlib import Path
from locdiff.io import read_embeddings
def kb(field):
    return int(next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                    if ln.startswith(field + ":")).split()[1])
rss = kb("VmRSS")
t = read_embeddings(sys.argv[1])
print(t.embedding.nbytes // 1000, kb("VmHWM") - rss)
"""


def test_reading_a_table_whole_peaks_near_its_embeddings_once(tmp_path):
    """100,000 x 512 float32 (205 MB of embeddings) once peaked at about 1 GB above the process (the Arrow table
    of them, the combined chunks and the checks' temporaries); read batch by batch into one array the peak is
    the embeddings once plus a few MB. Measured in a fresh process: VmHWM above its resident size before."""
    import subprocess
    import sys

    from tests.faults.helpers import REPO

    n, d = 50_000, 512
    path = tmp_path / "big.parquet"
    emb = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    write_embeddings(path, EmbeddingTable(ids=np.array([f"r{i}" for i in range(n)], object), lat=np.zeros(n),
                                          lon=np.zeros(n), embedding=emb))
    del emb
    proc = subprocess.run([sys.executable, "-c", MEMORY_DRIVER, str(path)], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    emb_kb, peak_kb = map(int, proc.stdout.split())
    assert emb_kb == n * d * 4 // 1000
    assert peak_kb < 2.5 * emb_kb, (peak_kb, emb_kb)
