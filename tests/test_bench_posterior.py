"""benchmarks/posterior.py (what sampling adds; issue 19 item 4): the two-place probes of the benchmark worlds
(two places at least 3,000 km apart, the same for the same seed) and the scoring of top-2 answers,
clusters, retrieval's two distinct places and the NLL, against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from benchmarks.posterior import (
    PROBE_MIN_KM,
    UNIFORM_SHARE,
    Draws,
    calibration,
    names_both,
    names_one,
    probe_maker,
    probe_scores,
    retrieval_two_places,
    sample_clusters,
)
from locdiff import shdd
from locdiff.geo import EARTH_RADIUS_KM, haversine_km
from locdiff.shdd.modes import density_modes, mass_within
from locdiff.worlds import cuebench, synth

A, B = (0.0, 0.0), (0.0, 60.0)  # 6,672 km apart on the equator; 1 degree of longitude there is 111.2 km
NAN = math.nan


def _rows(pairs):
    """[(lat1, lon1, lat2, lon2), ...] -> (lat, lon) arrays of shape (N, 2)."""
    a = np.array(pairs, dtype=np.float64)
    return a[:, [0, 2]], a[:, [1, 3]]


def _places(n):
    return np.full(n, A[0]), np.full(n, A[1]), np.full(n, B[0]), np.full(n, B[1])


def test_names_both_against_hand_computed_cases():
    lat, lon = _rows([
        (0, 1, 0, 59),     # 111 km from A, 111 km from B: both
        (0, 59, 0, 1),     # the same, the other order: both
        (0, 1, 0, 2),      # two answers near A: only A
        (0, 1, NAN, NAN),  # no second answer
        (0, 8, 0, 60),     # 890 km from A (over 750), on B: only B
        (0, 30, 0, 30),    # halfway: neither
    ])
    got = names_both(lat, lon, *_places(6), radius_km=750.0)
    assert got.tolist() == [True, True, False, False, False, False]
    assert names_one(lat, lon, *_places(6), radius_km=750.0).tolist() == [True, True, True, True, True, False]
    # a larger radius takes in the answer 890 km from A
    assert names_both(lat, lon, *_places(6), radius_km=1000.0).tolist() == [True, True, False, False, True, False]
    # only the first two answers count
    lat3 = np.array([[0.0, 0.0, 0.0]])
    lon3 = np.array([[1.0, 2.0, 59.0]])
    assert not names_both(lat3, lon3, *_places(1))[0]
    rows = probe_scores({"m": (lat, lon)}, *_places(6), radius_km=750.0)
    assert rows[0]["names_both_%"] == pytest.approx(200 / 6) and rows[0]["has_second_%"] == pytest.approx(500 / 6)


def test_sample_clusters_by_hand():
    lat = np.zeros((1, 5))
    lon = np.array([[0.0, 1.0, 2.0, 60.0, 61.0]])  # three near A, two near B
    c_lat, c_lon, share = sample_clusters(lat, lon, 750.0, top_k=3)
    # samples 0, 1 and 2 each have 3 within 750 km: the first wins; then sample 3 (2 members); then none
    assert c_lon[0, :2].tolist() == [0.0, 60.0] and np.isnan(c_lon[0, 2])
    assert share[0, :2].tolist() == [0.6, 0.4] and np.isnan(share[0, 2])
    assert names_both(c_lat, c_lon, *_places(1))[0]
    # all samples at one place: a single cluster, so the top 2 cannot name both places
    c_lat, c_lon, share = sample_clusters(np.zeros((1, 4)), np.array([[0.0, 1.0, 2.0, 3.0]]), 750.0)
    assert share[0, 0] == 1.0 and np.isnan(share[0, 1]) and not names_both(c_lat, c_lon, *_places(1))[0]


def test_retrieval_two_distinct_places_by_hand():
    lat = np.zeros((2, 4))
    lon = np.array([[0.0, 1.0, 30.0, 60.0],   # the nearest, then the first one over 750 km away: 30 degrees
                    [0.0, 1.0, 2.0, 3.0]])    # all within 750 km of the nearest: no second place
    r_lat, r_lon = retrieval_two_places(lat, lon, 750.0)
    assert r_lon[0].tolist() == [0.0, 30.0]
    assert r_lon[1, 0] == 0.0 and np.isnan(r_lon[1, 1]) and np.isnan(r_lat[1, 1])


def test_the_modes_of_a_two_place_code_name_both_places():
    degree = 16
    two = (shdd.encode(torch.tensor([A[0], B[0]]), torch.tensor([A[1], B[1]]), degree)).mean(0, keepdim=True)
    one = shdd.encode(torch.tensor([A[0]]), torch.tensor([A[1]]), degree)
    for code, want in ((two, True), (one, False)):
        m = density_modes(code.double(), 2, min_separation_km=750.0)
        assert names_both(m.lat, m.lon, *_places(1))[0] == want


def test_calibration_nll_and_ece_by_hand():
    degree = 16
    truth_lat, truth_lon = np.zeros(2), np.array([0.0, 60.0])
    code = shdd.encode(torch.zeros(2), torch.zeros(2), degree).double()  # both codes say A
    # the samples of row 0 are all at its truth; those of row 1 all 30 degrees (3,336 km) from its truth
    samples = Draws(code, np.zeros((2, 4)), np.array([[0.0] * 4, [30.0] * 4]))
    answer_lat, answer_lon = np.zeros(2), np.array([0.0, 30.0])
    out = calibration(answer_lat, answer_lon, truth_lat, truth_lon, code=code, radius_km=200.0, samples=samples)
    r = out["samples"]["radius_km"]
    assert r == pytest.approx(max(200.0, math.pi * EARTH_RADIUS_KM / 34))  # degree 16: the grid has 34 rows
    cap = (1 - math.cos(r / EARTH_RADIUS_KM)) / 2
    s = out["samples"]
    # both rows are confident (share 1 near the answer); row 0 is right, row 1 wrong
    assert s["mean_confidence"] == 1.0 and s["hit_rate"] == 0.5 and s["ece_raw"] == pytest.approx(0.5)
    want = (-math.log((1 - UNIFORM_SHARE) + UNIFORM_SHARE * cap) - math.log(UNIFORM_SHARE * cap)) / 2
    assert s["nll_truth"] == pytest.approx(want)
    # the mean code's mass is all around A: some near row 0's truth, none near row 1's (on B)
    mass = mass_within(code, truth_lat, truth_lon, r)
    assert mass[0] > 0.05 and mass[1] < 1e-6  # the density (tapered to width L/3 in degree) is wide
    m = out["mean code"]
    want = np.mean(-np.log((1 - UNIFORM_SHARE) * mass + UNIFORM_SHARE * cap))
    assert m["nll_truth"] == pytest.approx(want)
    # the confidence is the mass near the answer: row 0 answers A (the same mass as at its truth), row 1
    # answers 3,336 km from A (a little: at degree 16 the density is thousands of km wide)
    conf = mass_within(code, answer_lat, answer_lon, r)
    assert conf[0] == pytest.approx(mass[0]) and conf[1] < 0.01
    assert m["hit_rate"] == 0.5 and m["mean_confidence"] == pytest.approx(conf.mean())


def _check_probe(make, min_km=PROBE_MIN_KM):
    p, again, other = make(0, min_km), make(0, min_km), make(1, min_km)
    d = np.asarray(haversine_km(p.a_lat, p.a_lon, p.b_lat, p.b_lon))
    assert d.min() >= min_km
    assert np.array_equal(p.embedding, again.embedding) and np.array_equal(p.b_lon, again.b_lon)
    assert not np.array_equal(p.a_lat, other.a_lat)
    assert p.embedding.dtype == np.float32 and np.allclose(np.linalg.norm(p.embedding, axis=1), 1, atol=1e-5)
    t = p.table()
    assert len(t) == len(p.a_lat) and np.array_equal(t.lat, p.a_lat)
    return p


def test_synth_two_place_probe():
    world = synth.SynthWorld(synth.SynthConfig(n_train=100, n_test=10, n_unseen=10, dim=32))
    _check_probe(lambda seed, km: synth.two_place_probe(world, 300, seed, km))
    p = _check_probe(lambda seed, km: synth.two_place_probe(world, 100, seed, km), min_km=8_000.0)
    assert len(p.a_lat) == 100


def test_cuebench_two_place_probe_mixes_both_places_cues():
    world = cuebench.CueWorld(cuebench.CueBenchConfig(dim=64, noise=0.0))
    p = _check_probe(lambda seed, km: cuebench.two_place_probe(world, 200, seed, km))
    # without noise the probe is exactly the mix of the two places' cue signals: equally close to both
    n = len(p.a_lat)
    rng = np.random.default_rng(0)
    place, none = np.full(n, 1), np.full(n, -1)
    ea, _ = world.embed(p.a_lat, p.a_lon, place, none, rng)
    eb, _ = world.embed(p.b_lat, p.b_lon, place, none, rng)
    # it shares the cues of both places (the cues shown are drawn per photo) far more than those of a
    # random other probe's place
    for e in (ea, eb):
        assert np.median((p.embedding * e).sum(1)) > 0.3
        assert np.median((p.embedding * np.roll(e, 1, axis=0)).sum(1)) < 0.2


@pytest.mark.slow
def test_realbench_two_place_probe():
    pytest.importorskip("geoclip")
    from locdiff.worlds import realbench

    world = realbench.RealBenchWorld(realbench.RealBenchConfig(n_train=10))
    _check_probe(lambda seed, km: realbench.two_place_probe(world, 100, seed, km))


def test_probe_maker_rebuilds_the_world_of_a_written_benchmark(tmp_path):
    cfg = synth.SynthConfig(n_train=50, n_test=10, n_unseen=10, dim=16, seed=3)
    synth.write_benchmark(tmp_path / "synth", cfg)
    make = probe_maker(tmp_path / "synth")
    want = synth.two_place_probe(synth.SynthWorld(cfg), 50, 1)
    got = make(50, 1)
    assert np.array_equal(got.embedding, want.embedding) and np.array_equal(got.b_lat, want.b_lat)
    assert probe_maker(tmp_path) is None  # no benchmark JSON there
