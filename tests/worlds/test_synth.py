"""The synthetic benchmark: determinism, splits, held-out regions, and that the embedding carries signal."""

import json

import numpy as np
import pytest
import torch

from locdiff.cli import main
from locdiff.geo import haversine_km
from locdiff.io import read_embeddings
from locdiff.metrics import geo_metrics
from locdiff.worlds.synth import SynthConfig, SynthWorld, make_benchmark

CFG = SynthConfig(n_train=4000, n_test=600, n_unseen=400, dim=64, seed=3)


@pytest.fixture(scope="module")
def bench():
    return make_benchmark(CFG)


def _min_dist_km(a, b):
    d = haversine_km(a.lat[:, None], a.lon[:, None], b.lat[None], b.lon[None])
    return d.min(1)


def test_deterministic_and_seeded(bench):
    again = make_benchmark(CFG)
    for split in ("train", "test", "test_unseen"):
        np.testing.assert_array_equal(again[split].embedding, bench[split].embedding)
        np.testing.assert_array_equal(again[split].lat, bench[split].lat)
    other = make_benchmark(SynthConfig(n_train=200, n_test=10, n_unseen=10, dim=64, seed=4))
    assert not np.allclose(other["train"].lat[:50], bench["train"].lat[:50])


def test_splits_shapes_and_norms(bench):
    assert set(bench) == {"train", "test", "test_unseen"}
    for split, n in (("train", 4000), ("test", 600), ("test_unseen", 400)):
        t = bench[split]
        assert t.embedding.shape == (n, 64) and t.embedding.dtype == np.float32
        assert len(set(t.ids)) == n
        np.testing.assert_allclose(np.linalg.norm(t.embedding, axis=1), 1.0, rtol=1e-5)


def test_unseen_regions_are_far_from_every_train_point(bench):
    world = SynthWorld(CFG)
    unseen, train, test = bench["test_unseen"], bench["train"], bench["test"]
    assert (world.region_distance(unseen.lat, unseen.lon) < 0).any(1).all()  # inside a held-out disk
    assert (world.region_distance(train.lat, train.lon) > CFG.margin_km).all()
    assert (world.region_distance(test.lat, test.lon) > CFG.margin_km).all()
    d = _min_dist_km(unseen, train)
    assert d.min() >= CFG.margin_km
    assert np.median(d) > 300.0


def test_locations_are_clustered_like_photos(bench):
    # Many photos share a city: the nearest other training photo is usually within a few tens of km,
    # far closer than for uniform points on the sphere (~150 km for 4000 points).
    t = bench["train"]
    sub = slice(0, 1000)
    d = haversine_km(t.lat[sub, None], t.lon[sub, None], t.lat[None], t.lon[None])
    d[np.arange(1000), np.arange(1000)] = np.inf
    assert np.median(d.min(1)) < 30.0


def test_embedding_carries_signal_and_unseen_is_harder(bench):
    train = bench["train"]
    rng = np.random.default_rng(0)
    res = {}
    for split in ("test", "test_unseen"):
        t = bench[split]
        nn_idx = (torch.from_numpy(t.embedding) @ torch.from_numpy(train.embedding).T).argmax(1).numpy()
        res[split] = geo_metrics(train.lat[nn_idx], train.lon[nn_idx], t.lat, t.lon)
        chance = rng.integers(0, len(train), len(t))
        res[split + "_chance"] = geo_metrics(train.lat[chance], train.lon[chance], t.lat, t.lon)
    assert res["test"]["acc_750km"] > res["test_chance"]["acc_750km"] + 40
    assert res["test"]["acc_25km"] > 5.0
    assert res["test"]["median_km"] < res["test_chance"]["median_km"] / 5
    assert res["test_unseen"]["acc_750km"] < res["test"]["acc_750km"] - 10
    assert res["test_unseen"]["acc_200km"] == 0.0  # no train point within the margin
    assert res["test_unseen"]["acc_2500km"] > res["test_unseen_chance"]["acc_2500km"] + 30  # coarse signal


def test_cli_writes_three_parquet_splits(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path), "--n-train", "300", "--n-test", "50", "--n-unseen", "40",
               "--seed", "1", "--dim", "32"])
    assert rc == 0
    for split, n in (("train", 300), ("test", 50), ("test_unseen", 40)):
        t = read_embeddings(tmp_path / f"{split}.parquet")
        assert len(t) == n and t.dim == 32 and t.labelled
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert len(meta["regions"]) == 6 and meta["config"]["seed"] == 1
    assert "train:" in capsys.readouterr().out


def test_bad_config():
    with pytest.raises(ValueError, match="n_train"):
        SynthConfig(n_train=0)


def test_ensure_benchmark_writes_once_and_completes_a_partial_folder(tmp_path):
    """What the train-locdiff deployment runs first (its `synth` parameter): the benchmark is written when
    absent, left alone when complete, and written again when a split is missing."""
    from locdiff.worlds.synth import SynthConfig, ensure_benchmark, write_benchmark

    cfg = SynthConfig(n_train=200, n_test=30, n_unseen=10, dim=16)
    out = tmp_path / "synth"
    assert ensure_benchmark(out, cfg) is True
    ref = tmp_path / "ref"
    write_benchmark(ref, cfg)
    for split in ("train", "test", "test_unseen"):
        assert (out / f"{split}.parquet").read_bytes() == (ref / f"{split}.parquet").read_bytes()
    stamp = (out / "train.parquet").stat().st_mtime_ns
    assert ensure_benchmark(out, cfg) is False and (out / "train.parquet").stat().st_mtime_ns == stamp
    (out / "test.parquet").unlink()
    assert ensure_benchmark(out, cfg) is True and (out / "test.parquet").is_file()
