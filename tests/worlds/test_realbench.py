"""`locdiff realbench`: the same seed gives the same bytes, the splits and their columns, held-out regions
absent from train/val/test, the real test-set locations, retrieval far better than chance but not perfect,
no download, and one line when geoclip is missing."""

import json
import socket
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("geoclip")

from locdiff.cli import main  # noqa: E402
from locdiff.geo import haversine_km  # noqa: E402
from locdiff.io import read_embeddings  # noqa: E402
from locdiff.worlds.realbench import (  # noqa: E402
    YFCC26K_SUBSAMPLE_SEED,
    GeoClipLocationEncoder,
    RealBenchConfig,
    RealBenchWorld,
    location_encoder,
    make_split,
)
from locdiff.worlds.realbench import testset_locations as packaged  # noqa: E402 (not collected as a test)

SIZES = {"train": 500, "val": 60, "val_unseen": 40, "test": 150, "test_unseen": 80, "im2gps3k": 2997,
         "yfcc26k": 200}
ARGS = ["--n-train", "500", "--n-val", "60", "--n-val-unseen", "40", "--n-test", "150", "--n-test-unseen", "80",
        "--n-yfcc", "200"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The small benchmark written twice by the CLI with seed 0."""
    out = {}
    for name in ("a", "b"):
        d = tmp_path_factory.mktemp(f"realbench_{name}")
        assert main(["realbench", "--out", str(d), "--seed", "0", *ARGS]) == 0
        out[name] = d
    return out


def _seed1(split: str):
    world = RealBenchWorld(RealBenchConfig(seed=1, n_train=500, n_test=150, n_yfcc=200))
    return make_split(world, split)


def test_same_seed_same_bytes_other_seed_other_data(bench):
    files = sorted(p.name for p in bench["a"].iterdir())
    assert files == sorted([f"{s}.parquet" for s in SIZES] + ["realbench.json"])
    for name in files:
        assert (bench["a"] / name).read_bytes() == (bench["b"] / name).read_bytes(), name
    for split in ("train", "yfcc26k"):  # seed 1: other locations (train) and other embeddings (both)
        a, c = read_embeddings(bench["a"] / f"{split}.parquet"), _seed1(split)
        assert not np.array_equal(a.embedding, c.embedding), split
        assert np.array_equal(a.lat, c.lat) == (split == "yfcc26k"), split


def test_splits_columns_and_dimensions(bench):
    meta = json.loads((bench["a"] / "realbench.json").read_text())
    assert meta["config"]["seed"] == 0 and meta["encoder"]["dim"] == 512
    assert len(meta["encoder"]["sha256"]) == 64 and meta["encoder"]["package"] == "geoclip==1.3.0"
    for split, n in SIZES.items():
        path = bench["a"] / f"{split}.parquet"
        assert meta["splits"][split] == {"file": path.name, "rows": n}
        schema = pq.read_schema(path)
        assert schema.names == ["id", "lat", "lon", "embedding"]
        assert str(schema.field("embedding").type.value_type) == "float"  # float32
        t = read_embeddings(path)
        assert len(t) == n and t.dim == 512 and t.ids[0] == f"{split}-0000000"
        np.testing.assert_allclose(np.linalg.norm(t.embedding, axis=1), 1.0, atol=1e-5)


def test_held_out_regions_absent_from_train_val_test(bench):
    meta = json.loads((bench["a"] / "realbench.json").read_text())
    cfg = meta["config"]
    regions = meta["regions"]
    assert len(regions) == cfg["n_regions"]
    lat_r = np.array([r["lat"] for r in regions])
    lon_r = np.array([r["lon"] for r in regions])
    group = np.array([r["split"] for r in regions])
    assert {"val_unseen", "test_unseen"} == set(group)

    def dist(split):
        t = read_embeddings(bench["a"] / f"{split}.parquet")
        return haversine_km(t.lat[:, None], t.lon[:, None], lat_r[None], lon_r[None])

    for split in ("train", "val", "test"):
        assert dist(split).min() > cfg["region_radius_km"] + cfg["region_margin_km"], split
    for split in ("val_unseen", "test_unseen"):
        d = dist(split)
        assert (d[:, group == split].min(1) <= cfg["region_radius_km"]).all(), split
        assert d[:, group != split].min() > cfg["region_radius_km"], split  # not in the other split's regions


def test_testset_locations_are_the_packaged_ones(bench):
    lat, lon = packaged("im2gps3k")
    assert len(lat) == 2997 and len(packaged("yfcc26k")[0]) == 25_600
    t = read_embeddings(bench["a"] / "im2gps3k.parquet")
    np.testing.assert_array_equal(t.lat, lat)
    np.testing.assert_array_equal(t.lon, lon)
    # yfcc26k: a subsample of the packaged rows, in their order, the same for every seed
    ylat, ylon = packaged("yfcc26k")
    y = read_embeddings(bench["a"] / "yfcc26k.parquet")
    rows = np.sort(np.random.default_rng(YFCC26K_SUBSAMPLE_SEED).permutation(len(ylat))[:len(y)])
    np.testing.assert_array_equal(y.lat, ylat[rows])
    np.testing.assert_array_equal(y.lon, ylon[rows])
    np.testing.assert_array_equal(_seed1("yfcc26k").lat, y.lat)


def test_retrieval_far_better_than_chance_but_not_perfect(bench):
    train = read_embeddings(bench["a"] / "train.parquet")
    test = read_embeddings(bench["a"] / "test.parquet")
    nn = (test.embedding @ train.embedding.T).argmax(1)
    d = haversine_km(test.lat, test.lon, train.lat[nn], train.lon[nn])
    rand = haversine_km(test.lat, test.lon, train.lat[np.arange(len(test)) % len(train)],
                        train.lon[np.arange(len(test)) % len(train)])
    assert np.median(d) < 0.25 * np.median(rand)
    assert np.mean(d <= 750) > np.mean(rand <= 750) + 0.3
    assert np.mean(d <= 25) < 0.9


def test_encoder_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the location encoder tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    enc = GeoClipLocationEncoder()
    e = enc(np.array([48.85, -33.87]), np.array([2.35, 151.21]))
    assert e.shape == (2, 512) and e.dtype == np.float32
    assert float(e[0] @ e[1]) < 0.9  # Paris and Sydney are not alike


def test_missing_geoclip_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "geoclip", None)  # `import geoclip` raises ImportError
    location_encoder.cache_clear()
    try:
        assert main(["realbench", "--out", str(tmp_path / "x"), "--n-train", "10"]) == 2
    finally:
        location_encoder.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("locdiff realbench: error:")
    assert "pip install --no-deps geoclip==1.3.0 geopy geographiclib" in err[0]


def test_bad_size_is_one_line(tmp_path, capsys):
    assert main(["realbench", "--out", str(tmp_path), "--n-train", "0"]) == 2
    assert "realbench: n_train: must be in [1, 10000000]; got 0" in capsys.readouterr().err
