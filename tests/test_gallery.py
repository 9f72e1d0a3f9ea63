"""The retrieval gallery (locdiff.gallery): exact and approximate search against a NumPy reference,
storage round trips (local folder and S3 through a moto server on 127.0.0.1), checksum failures,
reuse and rebuild by get_or_build, and the canonical locations of features folders and Parquet tables."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import faiss
import numpy as np
import pytest

from locdiff.gallery import (
    Gallery,
    GalleryConfig,
    array_chunks,
    gallery_for,
    gallery_location,
    get_or_build,
    table_chunks,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int, *, seed: int, latent: int = 8, clusters: int = 60):
    """Embeddings of low intrinsic dimension (clusters in a latent space, projected to d), not unit norm,
    with locations and ids."""
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(latent, d)) / np.sqrt(latent)
    centres = rng.normal(size=(clusters, latent))

    def draw(m: int, r: np.random.Generator) -> np.ndarray:
        z = centres[r.integers(0, clusters, m)] + 0.35 * r.normal(size=(m, latent))
        x = z @ proj + 0.05 * r.normal(size=(m, d))
        return (x * r.uniform(0.5, 3.0, (m, 1))).astype(np.float32)  # arbitrary norms

    emb = draw(n, rng)
    lat, lon = rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)
    ids = np.array([f"img-{i:06d}" for i in range(n)])
    queries = draw(300, np.random.default_rng(seed + 1))
    return emb, lat, lon, ids, queries


def exact_topk(query: np.ndarray, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force in float64: (similarity, index) of the top k, and the full similarity matrix."""
    q = query.astype(np.float64)
    g = emb.astype(np.float64)
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, idx, 1), idx, sim


def recall(idx: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / ref.shape[1] for a, b in zip(idx, ref, strict=True)]))


def chunk_source(emb, lat, lon, ids, rows=700, calls=None):
    def chunks():
        if calls is not None:
            calls.append(1)
        return array_chunks(emb, lat, lon, ids, rows)
    return chunks


# ---------------------------------------------------------------------- search
def test_flat_search_equals_brute_force_numpy():
    emb, lat, lon, ids, q = clustered(3000, 24, seed=0)
    g = Gallery.build(chunk_source(emb, lat, lon, ids), count=len(emb))  # 3000 < threshold: flat
    assert g.kind == "flat" and len(g) == 3000 and g.dim == 24
    sim, idx = g.search(q, 10)
    ref_sim, ref_idx, full = exact_topk(q, emb, 11)
    assert sim.dtype == np.float32 and idx.dtype == np.int64 and sim.shape == idx.shape == (300, 10)
    # the order is defined where no two of the top 11 are within float32 rounding of each other
    distinct = (-np.diff(ref_sim, axis=1) > 1e-6).all(axis=1)
    assert distinct.sum() >= 280
    np.testing.assert_array_equal(idx[distinct], ref_idx[distinct, :10])
    np.testing.assert_allclose(sim, ref_sim[:, :10], rtol=0, atol=1e-6)  # every row, ties or not
    assert (np.diff(sim, axis=1) <= 0).all()  # best first
    np.testing.assert_array_equal(g.lat[idx], lat[idx])
    np.testing.assert_array_equal(g.lon[idx], lon[idx])
    np.testing.assert_array_equal(g.ids[idx], ids[idx])
    # k above the gallery size is clipped; a one-shot iterator builds the same flat index
    small = Gallery.build(array_chunks(emb[:5], lat[:5], lon[:5], ids[:5], 2), count=5)
    s, i = small.search(q[:3], 10)
    assert i.shape == (3, 5)
    np.testing.assert_array_equal(np.sort(i, axis=1), np.tile(np.arange(5), (3, 1)))


@pytest.mark.parametrize("kind", ["ivf_sq8", "ivf_fp16", "ivf_flat"])
def test_approximate_index_recall_against_exact(kind):
    emb, lat, lon, ids, q = clustered(20_000, 32, seed=1)
    cfg = GalleryConfig(flat_threshold=5_000, approx=kind)
    g = Gallery.build(chunk_source(emb, lat, lon, ids, rows=3_000), count=len(emb), config=cfg)
    assert g.kind == kind and len(g) == 20_000
    assert g.info["build"]["factory"].startswith("IVF")
    _, ref_idx, full = exact_topk(q, emb, 10)
    sim, idx = g.search(q, 10)
    assert recall(idx, ref_idx) >= 0.95
    # the similarities are those of the returned entries, to the precision of the stored codes, and a
    # missed best entry is one whose similarity the codes cannot tell from the one returned
    tol = {"ivf_sq8": 1e-2, "ivf_fp16": 1e-3, "ivf_flat": 1e-5}[kind]
    np.testing.assert_allclose(sim, np.take_along_axis(full, idx, 1), atol=tol)
    best = full[np.arange(len(q)), ref_idx[:, 0]]
    assert (best - full[np.arange(len(q)), idx[:, 0]]).max() <= tol
    np.testing.assert_array_equal(g.lat[idx[:, 0]], lat[idx[:, 0]])


def test_ivf_from_a_one_shot_stream_and_short_lists_are_filled():
    emb, lat, lon, ids, q = clustered(12_000, 16, seed=2)
    cfg = GalleryConfig(flat_threshold=1_000, nlist=64)
    g = Gallery.build(array_chunks(emb, lat, lon, ids, 2_500), count=len(emb), config=cfg)  # head sample
    _, ref_idx, _ = exact_topk(q, emb, 10)
    g.nprobe = 8
    assert recall(g.search(q, 10)[1], ref_idx) >= 0.95
    # nprobe=1 cannot hold 1,000 neighbours in one list of ~190: every row is still filled with entries
    g.nprobe = 1
    sim, idx = g.search(q[:20], 1000)
    assert (idx >= 0).all() and (idx < len(g)).all()
    assert all(len(np.unique(row)) == 1000 for row in idx)
    assert (np.diff(sim, axis=1) <= 1e-6).all()


def test_search_rejects_bad_queries():
    emb, lat, lon, ids, q = clustered(300, 8, seed=3)
    g = Gallery.from_arrays(emb, lat, lon, ids)
    with pytest.raises(ValueError, match="dimension 8"):
        g.search(q[:, :6], 3)
    q = q.copy()
    q[4, 1] = np.nan
    with pytest.raises(ValueError, match="query 4 has a NaN"):
        g.search(q, 3)


def test_build_rejects_bad_chunks_and_counts():
    emb, lat, lon, ids, _ = clustered(500, 8, seed=3)
    with pytest.raises(ValueError, match="yielded 500 entries, it declared 600"):
        Gallery.build(chunk_source(emb, lat, lon, ids), count=600)
    with pytest.raises(ValueError, match="more than the 400 entries"):
        Gallery.build(chunk_source(emb, lat, lon, ids), count=400)
    bad = lat.copy()
    bad[123] = np.nan
    with pytest.raises(ValueError, match=r"entry 123 \(img-000123\) has no valid location"):
        Gallery.build(chunk_source(emb, bad, lon, ids, rows=1000), count=500)
    nan = emb.copy()
    nan[7, 2] = np.inf
    with pytest.raises(ValueError, match="entry 7 has a NaN or infinite embedding"):
        Gallery.build(chunk_source(nan, lat, lon, ids), count=500)
    with pytest.raises(ValueError, match="needs count="):
        Gallery.build(array_chunks(emb, lat, lon, ids))
    # a non-deterministic source is caught on the IVF build's later pass
    rng = np.random.default_rng(0)

    def shuffled():
        p = rng.permutation(500)
        return array_chunks(emb[p], lat[p], lon[p], ids[p], 100)
    with pytest.raises(ValueError, match="different rows on another pass"):
        Gallery.build(shuffled, count=500, config=GalleryConfig(index="ivf_flat", nlist=4))


# ---------------------------------------------------------------------- storage
@pytest.fixture(scope="module")
def small():
    emb, lat, lon, ids, q = clustered(6_000, 16, seed=4)
    g = Gallery.build(chunk_source(emb, lat, lon, ids, rows=1000), count=len(emb),
                      config=GalleryConfig(flat_threshold=2_000, nlist=32),
                      source={"kind": "test", "version": 1})
    return g, q


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(moto_s3, tmp_path_factory):
    """The session's S3 endpoint (moto server on 127.0.0.1) with a bucket "galleries"; yields its endpoint."""
    from tests.conftest import make_bucket

    os.environ.setdefault("LOCDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
    make_bucket(moto_s3, "galleries")
    return moto_s3


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "gallery")
    request.getfixturevalue("s3")
    return f"s3://galleries/{request.node.name.replace('[', '-').rstrip(']')}/{time.time_ns()}"


def _fs(path: str):
    from locdiff.data import storage

    return storage.filesystem(path)


def test_save_load_round_trip(small, location):
    import hashlib

    from locdiff.data import storage

    g, q = small
    ref = g.save(location)
    assert ref["uri"] == location.rstrip("/")
    data = storage.read_bytes(storage.join(location, "gallery.json"))
    assert hashlib.sha256(data).hexdigest() == ref["sha256"]
    meta = json.loads(data)
    assert meta["count"] == 6000 and meta["dim"] == 16 and meta["build"]["index"] == "ivf_fp16"
    assert meta["source"] == {"kind": "test", "version": 1}
    assert set(meta["files"]) == {"index", "lat", "lon", "ids"}
    for f in meta["files"].values():  # every file recorded with its size and sha256, under one folder
        blob = storage.read_bytes(storage.join(location, f["path"]))
        assert len(blob) == f["bytes"] and hashlib.sha256(blob).hexdigest() == f["sha256"]
    assert len({os.path.dirname(f["path"]) for f in meta["files"].values()}) == 1

    h = Gallery.load(ref)  # the reference dict, as a run stores it
    assert h.kind == g.kind and len(h) == len(g) and h.nprobe == g.nprobe and h.reference() == ref
    s1, i1 = g.search(q, 10)
    s2, i2 = h.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(h.lat, g.lat)
    np.testing.assert_array_equal(h.lon, g.lon)
    np.testing.assert_array_equal(h.ids, g.ids)
    assert h.ids.dtype.kind == "U"
    assert Gallery.load(location, ref["sha256"], nprobe=4).nprobe == 4


def _corrupt(path: str, how: str) -> None:
    fs, p = _fs(path)
    data = fs.cat_file(p)
    if how == "flip":
        data = data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:]
    else:
        data = data[: len(data) // 2]
    fs.pipe_file(p, data)


@pytest.mark.parametrize("target,how", [("index", "flip"), ("lat", "truncate"), ("lon", "flip")])
def test_damaged_file_is_one_line_value_error_naming_it(small, location, target, how):
    from locdiff.data import storage

    g, _ = small
    ref = g.save(location)
    meta = json.loads(storage.read_bytes(storage.join(location, "gallery.json")))
    path = storage.join(location, meta["files"][target]["path"])
    _corrupt(path, how)
    with pytest.raises(ValueError) as err:
        Gallery.load(ref)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(path)
    assert ("sha256" in msg) if how == "flip" else ("bytes" in msg)


def test_ids_are_verified_when_read(small, tmp_path):
    from locdiff.data import storage

    g, _ = small
    loc = str(tmp_path / "g")
    g.save(loc)
    meta = json.loads(storage.read_bytes(storage.join(loc, "gallery.json")))
    h = Gallery.load(loc)
    _corrupt(storage.join(loc, meta["files"]["ids"]["path"]), "flip")
    with pytest.raises(ValueError, match=r"ids\.npy: sha256 .* differs from gallery\.json"):
        _ = h.ids


def test_reference_mismatch_and_missing_gallery(small, tmp_path):
    g, _ = small
    loc = str(tmp_path / "g")
    ref = g.save(loc)
    with pytest.raises(ValueError, match=r"gallery\.json: sha256 .* differs from the recorded"):
        Gallery.load(loc, "0" * 64)
    g.save(loc)  # saved again: a new data folder, a new gallery.json
    assert Gallery.load(loc).reference()["sha256"] != ref["sha256"]
    with pytest.raises(ValueError, match="differs from the recorded"):
        Gallery.load(ref)  # the run's reference names the gallery it was trained with
    with pytest.raises(FileNotFoundError, match="no gallery here"):
        Gallery.load(str(tmp_path / "nothing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "gallery.json").write_text('{"format_version": 1, "files": {"index": '
                                                   '{"path": "../../etc/passwd"}}}')
    with pytest.raises(ValueError, match="malformed"):
        Gallery.load(str(tmp_path / "bad"))


# ---------------------------------------------------------------------- get_or_build
def test_get_or_build_reuses_and_rebuilds(location):
    from locdiff.data import storage

    emb, lat, lon, ids, q = clustered(4_000, 16, seed=5)
    cfg = GalleryConfig(flat_threshold=1_000, nlist=16)
    calls: list[int] = []
    src = chunk_source(emb, lat, lon, ids, rows=900, calls=calls)
    g1, ref1 = get_or_build({"manifest_sha256": "aaa"}, location, src, count=4000, config=cfg)
    assert calls and g1.kind == "ivf_fp16"
    n_calls = len(calls)
    g2, ref2 = get_or_build({"manifest_sha256": "aaa"}, location, src, count=4000, config=cfg)
    assert len(calls) == n_calls and ref2 == ref1  # reused: the source was not read
    np.testing.assert_array_equal(g2.search(q, 5)[1], g1.search(q, 5)[1])
    # a search setting is not a build setting
    g3, ref3 = get_or_build({"manifest_sha256": "aaa"}, location, src, count=4000,
                            config=GalleryConfig(flat_threshold=1_000, nlist=16, nprobe=2))
    assert ref3 == ref1 and g3.nprobe == 2 and len(calls) == n_calls
    # a changed source identity rebuilds, and the replaced build's files are removed
    old = json.loads(storage.read_bytes(storage.join(location, "gallery.json")))
    emb2 = emb[::-1].copy()
    g4, ref4 = get_or_build({"manifest_sha256": "bbb"}, location,
                            chunk_source(emb2, lat[::-1], lon[::-1], ids[::-1], calls=calls), count=4000,
                            config=cfg)
    assert len(calls) > n_calls and ref4["sha256"] != ref1["sha256"]
    assert g4.info["source"] == {"manifest_sha256": "bbb"}
    assert not storage.exists(storage.join(location, old["files"]["index"]["path"]))
    _, ref_idx, _ = exact_topk(q, emb2, 10)
    assert recall(Gallery.load(ref4).search(q, 10)[1], ref_idx) >= 0.95
    # changed build settings rebuild too
    n_calls = len(calls)
    g5, _ = get_or_build({"manifest_sha256": "bbb"}, location,
                         chunk_source(emb2, lat[::-1], lon[::-1], ids[::-1], calls=calls), count=4000,
                         config=GalleryConfig(index="flat"))
    assert g5.kind == "flat" and len(calls) > n_calls


def test_damaged_gallery_is_rebuilt_by_get_or_build(tmp_path):
    from locdiff.data import storage

    emb, lat, lon, ids, _ = clustered(800, 8, seed=6)
    loc = str(tmp_path / "g")
    _, ref = get_or_build({"id": 1}, loc, chunk_source(emb, lat, lon, ids), count=800)
    meta = json.loads(storage.read_bytes(storage.join(loc, "gallery.json")))
    _corrupt(storage.join(loc, meta["files"]["index"]["path"]), "flip")
    g, ref2 = get_or_build({"id": 1}, loc, chunk_source(emb, lat, lon, ids), count=800)
    assert ref2["sha256"] != ref["sha256"] and len(Gallery.load(ref2)) == 800


def test_concurrent_builders_leave_one_complete_gallery(tmp_path):
    emb, lat, lon, ids, q = clustered(5_000, 16, seed=7)
    loc = str(tmp_path / "g")
    cfg = GalleryConfig(flat_threshold=1_000, nlist=16)
    results, errors = [], []

    def build():
        try:
            results.append(get_or_build({"id": "same"}, loc, chunk_source(emb, lat, lon, ids, rows=500),
                                        count=5000, config=cfg))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    final = Gallery.load(loc)  # verifies every file against the gallery.json that won
    assert final.reference()["sha256"] in {ref["sha256"] for _, ref in results}
    _, ref_idx, _ = exact_topk(q, emb, 10)
    assert recall(final.search(q, 10)[1], ref_idx) >= 0.95
    assert not [p for p in (tmp_path / "g").rglob("*.tmp*")]  # no temporary files left


KILLED_SAVE = """
import os, sys
import numpy as np
from locdiff.data import storage
from locdiff.gallery import Gallery
real = storage.put_file_atomic
def dies(tmp, path):
    real(tmp, path)
    if path.endswith("lat.npy"):
        os._exit(9)  # killed there: no cleanup runs
storage.put_file_atomic = dies
rng = np.random.default_rng(0)
Gallery.from_arrays(rng.normal(size=(200, 8)), rng.uniform(-60, 60, 200), rng.uniform(-180, 180, 200)).save(sys.argv[1])
"""


def test_a_save_removes_what_a_killed_save_left(tmp_path):
    """A save killed after two of its four files leaves its scratch folder and a partial data folder; the next
    save removes both (each kill would leave one more index for good), and keeps a running saver's."""
    import re
    import subprocess
    import sys

    loc = tmp_path / "g"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(loc)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    left = sorted(p.name for p in loc.iterdir())
    assert len(left) == 2 and left[0].startswith(".tmp-data-") and left[1].startswith("data-"), left
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    running = loc / f".tmp-data-0123456789ab-{host}-1-abcd1234"  # this host's pid 1, which always runs
    running.mkdir()
    (loc / "data-0123456789ab").mkdir()
    emb, lat, lon, ids, _ = clustered(300, 8, seed=1)
    ref = Gallery.from_arrays(emb, lat, lon, ids).save(str(loc))
    named = {os.path.dirname(f["path"]) for f in json.loads((loc / "gallery.json").read_text())["files"].values()}
    assert sorted(p.name for p in loc.iterdir()) == sorted([running.name, "data-0123456789ab", *named,
                                                            "gallery.json"])
    assert len(Gallery.load(ref)) == 300


# ---------------------------------------------------------------------- data sources
def test_gallery_for_a_parquet_table(tmp_path):
    from locdiff.io import write_embeddings
    from locdiff.tables import EmbeddingTable

    emb, lat, lon, ids, q = clustered(1_500, 12, seed=8)
    path = str(tmp_path / "train.parquet")
    write_embeddings(path, EmbeddingTable(ids=ids.astype(object), lat=lat, lon=lon, embedding=emb))
    from locdiff.data.stream import open_source

    assert gallery_location(open_source(path)) == str(tmp_path / "train.gallery")
    g, ref = gallery_for(path)
    assert ref["uri"] == str(tmp_path / "train.gallery") and g.info["source"]["kind"] == "table"
    sim, idx = g.search(q, 5)
    _, ref_idx, _ = exact_topk(q, emb, 5)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(g.ids[idx[:, 0]], ids[ref_idx[:, 0]])
    assert gallery_for(path)[1] == ref  # unchanged table: reused
    write_embeddings(path, EmbeddingTable(ids=ids.astype(object), lat=lat, lon=lon, embedding=emb[::-1].copy()))
    g2, ref2 = gallery_for(path)  # rewritten table: rebuilt
    assert ref2["sha256"] != ref["sha256"]
    np.testing.assert_array_equal(g2.search(q, 5)[1], len(emb) - 1 - ref_idx)


def test_gallery_for_a_features_folder(tmp_path):
    from locdiff.data import manifest as mf
    from locdiff.data.features import load_features
    from locdiff.data.shards import json_bytes, npy_bytes, sample_key, shard_name, write_tar

    emb, lat, lon, ids, q = clustered(1_200, 12, seed=9)
    emb16 = emb.astype(np.float16)
    folder = tmp_path / "root" / "train" / "features" / "tiny"
    folder.mkdir(parents=True)
    shards = []
    for k, start in enumerate(range(0, 1200, 500)):
        rows = range(start, min(start + 500, 1200))
        path = folder / shard_name(k)
        _, digest = write_tar(str(path), ((sample_key(i), {
            "emb.npy": npy_bytes(emb16[i]),
            "json": json_bytes({"id": str(ids[i]), "lat": float(lat[i]), "lon": float(lon[i])})}) for i in rows))
        shards.append({"shard": path.name, "count": len(rows), "sha256": digest, "bytes": path.stat().st_size})
    mf.write_manifest(str(folder), {"stage": "features", "count": 1200, "shdd": None, "shards": shards,
                                    "embedding": {"dim": 12, "dtype": "float16"}})
    from locdiff.data.stream import open_source

    assert gallery_location(open_source(str(folder))) == str(folder / "gallery")
    ident = open_source(str(folder)).identity()
    assert ident["kind"] == "features" and len(ident["sha256"]) == 64
    g, ref = gallery_for(str(folder))
    assert ref["uri"] == str(folder / "gallery")
    table = load_features(str(folder))  # the project's reader: the same entries, in the same order
    np.testing.assert_array_equal(g.ids, table.ids.astype(str))
    np.testing.assert_array_equal(g.lat, table.lat)
    _, ref_idx, _ = exact_topk(q, table.embedding, 5)
    np.testing.assert_array_equal(g.search(q, 5)[1], ref_idx)
    assert load_features(str(folder)).embedding.shape == (1200, 12)  # the gallery folder does not disturb it
    # a damaged shard is named, not silently skipped
    data = (folder / shard_name(1)).read_bytes()
    mid = len(data) // 2
    (folder / shard_name(1)).write_bytes(data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1:])
    with pytest.raises(ValueError, match=r"shard-000001\.tar: sha256 differs"):
        gallery_for(str(folder), GalleryConfig(index="ivf_flat", nlist=4))


def test_in_memory_table_and_held_out_views(tmp_path):
    """A table with no file behind it is named by its content; a held-out view gets its own gallery of
    training rows only (never the validation rows that LocDiff-H's blend is chosen on)."""
    from locdiff.data.stream import TableSource
    from locdiff.tables import EmbeddingTable

    emb, lat, lon, ids, q = clustered(900, 8, seed=10)
    table = EmbeddingTable(ids=ids.astype(object), lat=lat, lon=lon, embedding=emb)
    same = EmbeddingTable(ids=ids.astype(object), lat=lat.copy(), lon=lon.copy(), embedding=emb.copy())
    moved = EmbeddingTable(ids=ids.astype(object), lat=np.where(np.arange(900) == 5, 0.0, lat), lon=lon,
                           embedding=emb)
    ident = TableSource(table).identity
    assert ident() == TableSource(same).identity() != TableSource(moved).identity()
    loc = str(tmp_path / "g")
    g, ref = gallery_for(table, location=loc)
    assert gallery_for(same, location=loc)[1] == ref
    assert get_or_build(ident(), loc, lambda: table_chunks(table, 200), count=900)[1] == ref
    _, ref_idx, _ = exact_topk(q, emb, 3)
    np.testing.assert_array_equal(g.search(q, 3)[1], ref_idx)
    train, val = TableSource(table).split(0.1, seed=1)
    assert gallery_location(train, fallback=loc) == f"{loc}/train-share0.1-seed1"
    gt, _ = gallery_for(train, fallback=loc)
    assert len(gt) == train.count and not set(gt.ids) & set(val.read_all().ids.astype(str))
    with pytest.raises(ValueError, match="labelled"):
        table_chunks(EmbeddingTable(ids=ids.astype(object), lat=None, lon=None, embedding=emb))
