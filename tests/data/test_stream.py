"""The batch stream: every row exactly once per epoch on every rank split, the same batches after a resume,
a held-out share disjoint from training, and the one reader for shards, tables and in-memory data."""

from __future__ import annotations

import numpy as np
import pytest

from locdiff.data.stream import BatchStream, TableSource, open_source, read_table
from locdiff.io import write_embeddings
from locdiff.tables import EmbeddingTable


def _table(n=1000, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return EmbeddingTable(ids=np.array([f"r{i:05d}" for i in range(n)], dtype=object),
                          lat=rng.uniform(-80, 80, n), lon=rng.uniform(-180, 180, n),
                          embedding=rng.normal(size=(n, d)).astype(np.float32), source="mem")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 1,000 rows as an in-memory table, a Parquet file with 7 row groups, and 9 feature shards."""
    import pyarrow.parquet as pq

    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest
    from locdiff.io import embedding_table_to_arrow

    t = _table()
    root = tmp_path_factory.mktemp("stream")
    pq.write_table(embedding_table_to_arrow(t), root / "t.parquet", row_group_size=150)
    cfg = load_dataset_config("embeddings", shard_size=120)
    ingest("feat", str(root), source=str(root / "t.parquet"), config=cfg, progress=False)
    return {"memory": TableSource(t, piece_rows=128), "parquet": open_source(str(root / "t.parquet")),
            "shards": open_source(str(root / "feat" / "features" / cfg.encoder)), "table": t}


@pytest.mark.parametrize("kind", ["memory", "parquet", "shards"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch(sources, kind, world):
    src = sources[kind]
    streams = [BatchStream(src, 64, rank=r, world_size=world, seed=5, window_rows=200) for r in range(world)]
    steps = streams[0].steps_per_epoch
    assert all(s.steps_per_epoch == steps for s in streams) and steps == int(np.ceil(1000 / (64 * world)))
    for epoch in range(2):
        seen = []
        for s in streams:
            it = s.batches(epoch * steps)
            for _ in range(steps):
                b = next(it)
                assert 0 < len(b) <= 64 + 64  # balanced: close to the per-rank batch
                seen += list(b.ids)
            it.close()
        assert len(seen) == 1000 and set(seen) == set(sources["table"].ids)
    # the order differs between epochs (reshuffled), but is the same for the same seed
    a = next(BatchStream(src, 64, seed=5).batches(0)).ids
    b = next(BatchStream(src, 64, seed=5).batches(steps * 1)).ids
    assert list(a) == list(next(BatchStream(src, 64, seed=5).batches(0)).ids)
    assert list(a) != list(b)


@pytest.mark.parametrize("kind", ["parquet", "shards"])
def test_resume_at_any_step_gives_the_same_batches(sources, kind):
    src = sources[kind]
    ref_it = BatchStream(src, 50, rank=1, world_size=2, seed=1, window_rows=130).batches(0)
    ref = [list(next(ref_it).ids) for _ in range(30)]  # crosses an epoch boundary (10 steps per epoch)
    for start in (0, 3, 9, 10, 17):
        s = BatchStream(src, 50, rank=1, world_size=2, seed=1, window_rows=130)
        it = s.batches(start)
        got = [list(next(it).ids) for _ in range(30 - start)]
        assert got == ref[start:], start
        pos = s.position(start)
        assert pos["epoch"] == start // 10 and pos["batch"] == start % 10 and pos["window"] is not None


def test_rows_match_the_table(sources):
    t = sources["table"]
    for kind in ("parquet", "shards"):
        b = next(BatchStream(sources[kind], 100, seed=0).batches(0))
        idx = np.array([int(i[1:]) for i in b.ids])
        np.testing.assert_allclose(b.emb, t.embedding[idx], rtol=1e-3, atol=1e-3)  # shards store float16
        np.testing.assert_array_equal(b.lat, t.lat[idx])


def test_holdout_is_disjoint_deterministic_and_streams(sources):
    src = sources["parquet"]
    tr, va = src.split(0.1, seed=3)
    assert tr.count + va.count == 1000 and 60 < va.count < 140
    tr2, va2 = src.split(0.1, seed=3)
    val_ids = set(va.read_all().ids)
    assert val_ids == set(va2.read_all().ids)
    seen = []
    s = BatchStream(tr, 64, seed=0)
    it = s.batches(0)
    for _ in range(s.steps_per_epoch):
        seen += list(next(it).ids)
    assert len(seen) == tr.count and not (set(seen) & val_ids)
    assert tr.identity() != va.identity() != src.identity()


def test_one_reader_for_everything(sources, tmp_path):
    t = sources["table"]
    for kind in ("parquet", "shards"):
        got = sources[kind].read_all()
        assert list(got.ids) == list(t.ids)
    write_embeddings(tmp_path / "x.parquet", t)
    assert len(read_table(str(tmp_path / "x.parquet"))) == 1000
    mean, std = sources["memory"].embedding_stats(max_rows=10_000)
    np.testing.assert_allclose(mean, t.embedding.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, t.embedding.std(0, ddof=1), rtol=1e-4)


def test_a_table_in_s3_reads_whole_as_its_local_copy(s3, tmp_path):
    """`read_table` of an s3:// file or folder (several files and row groups, its embedding column read batch
    by batch) gives the arrays of the local copy, and `read_embeddings` names a bad row in the URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from locdiff.io import embedding_table_to_arrow, read_embeddings

    from .conftest import upload

    t = _table(300)
    local = tmp_path / "tab"
    local.mkdir()
    at = embedding_table_to_arrow(t)
    for i, (a, b) in enumerate([(0, 120), (120, 300)]):
        pq.write_table(at.slice(a, b - a), local / f"part-{i}.parquet", row_group_size=50)
    emb = at.column("embedding").to_pylist()
    emb[170][2] = float("nan")
    pq.write_table(at.set_column(3, "embedding", pa.array(emb, pa.list_(pa.float64()))), tmp_path / "bad.parquet")
    upload(local, "s3://data/stream-tab")
    upload(tmp_path, "s3://data/stream-bad")
    for sub in ("", "/part-1.parquet"):
        got, want = read_table(f"s3://data/stream-tab{sub}"), read_table(str(local) + sub)
        assert list(got.ids) == list(want.ids) and got.embedding.tobytes() == want.embedding.tobytes()
    assert len(got) == 180 and read_table("s3://data/stream-tab").embedding.tobytes() == t.embedding.tobytes()
    with pytest.raises(ValueError, match=r"^s3://data/stream-bad/bad.parquet: column 'embedding', row 170: "
                                         r"element 2 of the embedding is nan"):
        read_embeddings("s3://data/stream-bad/bad.parquet")


def test_too_few_rows_for_the_workers_is_a_clear_error():
    src = TableSource(_table(n=3))
    with pytest.raises(ValueError, match="too few for 4 workers"):
        BatchStream(src, 2, rank=0, world_size=4).plan(0)


@pytest.mark.parametrize("kind", ["parquet", "shards"])
def test_several_loader_threads_give_the_same_batches(sources, kind):
    """train.loader_threads: windows read by a pool of threads arrive in order, the same batches as one
    thread reading ahead, from the start and from a resumed step."""
    src = sources[kind]
    for start in (0, 7):
        one = BatchStream(src, 40, seed=3, window_rows=90).batches(start)
        pool = BatchStream(src, 40, seed=3, window_rows=90, workers=3).batches(start)
        for _ in range(60):  # more than two epochs
            assert list(next(one).ids) == list(next(pool).ids)
        pool.close()


def test_npy_headers_are_parsed_one_thread_at_a_time(sources):
    """numpy parses an .npy header with ast.literal_eval, which CPython 3.11 cannot run in two threads at once
    (now and then "SystemError: AST constructor recursion depth mismatch", seen in the loader-threads test
    above, cpython gh-106905): both readers of .npy members, a sample's and a feature shard's, wait for one
    lock."""
    import io
    import threading

    from locdiff.data import shards
    from locdiff.data.features import read_feature_shard

    with open(sources["shards"].pieces[0].url, "rb") as f:
        shard = f.read()
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 7, 11), np.float32))  # a header no other test has parsed (they are cached)
    member = buf.getvalue()
    for read in (lambda: shards.npy_from_bytes(member), lambda: read_feature_shard(shard, "shard")):
        done = threading.Event()
        reader = threading.Thread(target=lambda read=read: (read(), done.set()), daemon=True)
        with shards._NPY_HEADER_LOCK:
            reader.start()
            assert not done.wait(0.5)  # parsing waits while another thread parses
        reader.join(10)
        assert done.is_set()


@pytest.mark.parametrize("fixed", [True, False])
def test_a_folder_of_tables_of_two_widths_names_both_files(tmp_path, fixed):
    """A folder of Parquet files is one table: files of different embedding widths (two encoders) are refused
    naming both files and widths, before any training (numpy's broadcast error before)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from locdiff.io import embedding_table_to_arrow

    for name, d in (("a.parquet", 8), ("b.parquet", 6)):
        at = embedding_table_to_arrow(_table(n=20, d=d))
        if not fixed:  # a list of floats of any length: the width shows only when the rows are read
            at = at.set_column(at.schema.get_field_index("embedding"), "embedding",
                               at["embedding"].cast(pa.list_(pa.float32())))
        pq.write_table(at, tmp_path / name)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'b.parquet'}: embeddings of width 6, but "
                                         rf"{tmp_path / 'a.parquet'} has 8"):
        open_source(str(tmp_path)).read_all()  # what training reads


def test_a_table_written_by_the_project_streams_a_piece_at_a_time(tmp_path):
    """`write_embeddings` (synth, export, the benchmarks) writes row groups a reader can hold: reading the first
    piece of a table three pieces long holds about that piece, not the whole table (one row group, as pyarrow's
    default of 2^20 rows made it, is held whole: 3 GiB a group at 768-d)."""
    import pyarrow as pa

    from locdiff.data.stream import PIECE_ROWS
    from locdiff.io import ROW_GROUP_ROWS

    assert ROW_GROUP_ROWS <= PIECE_ROWS
    write_embeddings(tmp_path / "t.parquet", _table(3 * ROW_GROUP_ROWS, d=16))
    src = open_source(str(tmp_path / "t.parquet"))
    before = pa.total_allocated_bytes()
    rows = src.read(src.pieces[0])
    held = pa.total_allocated_bytes() - before
    assert len(rows) == ROW_GROUP_ROWS and len(src.pieces) == 3
    assert held < 1.5 * ROW_GROUP_ROWS * (16 * 4 + 8 + 8 + 6 + 4), held  # floats, lat, lon, id and its offset
