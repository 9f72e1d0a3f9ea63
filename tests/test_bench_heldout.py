"""`bench_heldout`: the standard error of an accuracy difference over rows and over regions (cluster-robust),
against hand computations; the cross-validation of LocDiff-H's choice over regions (folds, no leakage)."""

from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import bench_heldout as bh
from locdiff.model.hybrid import PoECandidates


def test_with_one_row_per_region_the_region_se_is_the_row_se():
    d = np.random.default_rng(0).integers(-1, 2, size=300).astype(float)
    row = bh.paired_se(d)
    assert row == pytest.approx(d.std(ddof=1) / np.sqrt(300), rel=1e-12)
    assert bh.paired_se(d, np.arange(300)) == pytest.approx(row, rel=1e-12)


def test_region_se_by_hand():
    d = np.array([1.0, 1.0, 0.0, -1.0, 0.0, 0.0])
    regions = np.array(["a", "a", "b", "b", "c", "c"])
    # mean 1/6; per region sums of d - mean: a 2 - 2/6, b -1 - 2/6, c -2/6; CR1: sqrt(3/2 * sum of squares) / 6
    totals = np.array([2 - 2 / 6, -1 - 2 / 6, -2 / 6])
    assert bh.paired_se(d, regions) == pytest.approx(np.sqrt(1.5 * np.sum(totals**2)) / 6, rel=1e-12)


def test_a_difference_made_by_one_region_is_uncertain_by_region_and_not_by_row():
    """900 rows in 10 regions of 90; LocDiff-H wins all of one region's rows and ties elsewhere: by rows the
    gain of 10 points looks certain (SE 1), by regions it is one region's luck (SE 10)."""
    regions = np.repeat(np.arange(10), 90)
    d = (regions == 0).astype(float)
    assert bh.paired_se(d) == pytest.approx(0.01, abs=2e-3)
    assert bh.paired_se(d, regions) == pytest.approx(0.1, rel=1e-9)
    assert np.isnan(bh.paired_se(d, np.zeros(900)))  # one region: no estimate


def test_cells_compare_with_the_best_single_method_of_each_threshold():
    # 4 rows, 5 thresholds: knn right at 1 km on rows 0-1, LocDiff from 200 km on rows 0-3, LocDiff-H both
    t = len(bh.THRESHOLDS_KM)
    knn = np.zeros((4, t))
    knn[:2] = 1
    geocell = np.zeros((4, t))
    locdiff = np.zeros((4, t))
    locdiff[:, 2:] = 1
    h = np.maximum(knn, locdiff)
    h[3, 4] = 0  # one row lost at 2,500 km
    out = bh.cells({"knn": knn, "geocell": geocell, "LocDiff": locdiff, "LocDiff-H": h},
                   np.array([0, 0, 1, 1]), "test_unseen")
    assert [c["best"] for c in out] == ["knn", "knn", "LocDiff", "LocDiff", "LocDiff"]
    assert [c["diff"] for c in out] == [0.0, 0.0, 0.0, 0.0, -25.0]
    assert out[4]["se_rows"] == pytest.approx(100 * bh.paired_se(np.array([0, 0, 0, -1.0])))
    assert out[4]["regions"] == 2


def test_rows_go_to_the_nearest_region_centre():
    regions = [{"lat": 0.0, "lon": 0.0}, {"lat": 0.0, "lon": 179.0}]
    assert bh.nearest_region(np.array([1.0, 0.0]), np.array([1.0, -179.5]), regions).tolist() == [0, 1]


def _candidates(n: int = 90, k: int = 6, seed: int = 0):
    """Random candidates around random truths: LocDiff's answer and k neighbours a few degrees off."""
    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
    clat = lat[:, None] + rng.normal(0, 3, (n, k + 1))
    clon = lon[:, None] + rng.normal(0, 3, (n, k + 1))
    sim = np.sort(rng.uniform(0.2, 0.9, (n, k)), 1)[:, ::-1]
    w = np.exp(5 * sim)
    c = PoECandidates(clat, clon, np.log(rng.uniform(0.05, 1, (n, k + 1))), w / w.sum(1, keepdims=True),
                      sim[:, 0], sim[:, 0] - sim[:, 1], sim.mean(1), sim.std(1))
    return c, lat, lon


GROUPS = np.r_[np.zeros(60, int), np.ones(30, int)]  # 60 val rows, 30 val_unseen rows in 6 regions of 5
REGIONS = np.r_[np.full(60, -1), np.repeat(np.arange(6), 5)]


def test_region_folds_keep_each_region_whole_and_deal_evenly():
    fold = bh.region_folds(GROUPS, REGIONS, 3, np.random.default_rng(1))
    assert np.array_equal(fold, bh.region_folds(GROUPS, REGIONS, 3, np.random.default_rng(1)))
    assert sorted(np.bincount(fold[:60])) == [20, 20, 20]
    per_region = [np.unique(fold[REGIONS == r]) for r in range(6)]
    assert all(len(f) == 1 for f in per_region)
    assert sorted(np.bincount([f[0] for f in per_region], minlength=3)) == [2, 2, 2]


def test_out_of_fold_placements_never_see_their_own_truths():
    """Moving fold 0's truths onto their best gallery match changes the choice made on all the rows, but not
    where fold 0's images are placed out of fold."""
    c, lat, lon = _candidates()
    fold = bh.region_folds(GROUPS, REGIONS, 3, np.random.default_rng(1))
    f0 = fold == 0
    lat2, lon2 = lat.copy(), lon.copy()
    lat2[f0], lon2[f0] = c.lat[f0, 1], c.lon[f0, 1]
    every = np.ones(len(lat), bool)
    in_sample = bh.placed(c, lat, lon, GROUPS, every, every, tolerance=0.5)[0]
    assert (in_sample != bh.placed(c, lat2, lon2, GROUPS, every, every, tolerance=0.5)[0]).any()
    before = bh.out_of_fold(c, lat, lon, GROUPS, fold, tolerance=0.5)
    after = bh.out_of_fold(c, lat2, lon2, GROUPS, fold, tolerance=0.5)
    assert np.array_equal(before[0][f0], after[0][f0]) and np.array_equal(before[1][f0], after[1][f0])
    assert not np.array_equal(before[0][~f0], after[0][~f0])  # the other folds were chosen on the moved truths


def test_cross_validation_needs_both_validation_splits():
    val = SimpleNamespace(lat=np.zeros(10))
    assert bh.cross_validate("synth", None, {"val": val}, [], folds=3, draws=1, seed=0) == []
    assert bh.cross_validate("synth", None, {"val": val, "val_unseen": SimpleNamespace(lat=np.zeros(0))}, [],
                             folds=3, draws=1, seed=0) == []
