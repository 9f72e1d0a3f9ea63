"""LocDiff-H's overrides (locdiff.model.hybrid): where the gallery's best matches agree with each other (consensus)
or the best match stands far above the second (a distinct match), the most similar one is the answer; elsewhere
the product of experts (here LocDiff's answer) stands. And its learned novelty signal, where the similarity's top
alone cannot tell known places from unknown ones. Checked on hand-built candidate sets with distances from a
float64 haversine."""

import numpy as np

from locdiff.calibration import LogisticModel
from locdiff.geo import haversine_km
from locdiff.metrics import THRESHOLDS_KM
from locdiff.model.hybrid import (
    CONSENSUS_KM,
    CONSENSUS_TOP,
    DENSITY_FLOOR,
    NOVELTY_FEATURES,
    NOVELTY_NEAR_KM,
    POE_DEFAULT,
    POE_MARGINS,
    PoECandidates,
    choose_poe,
    consensus_count,
    fit_novelty,
    novelty_features,
    poe_select,
)

KM_PER_DEG = 111.195  # haversine's km per degree of latitude (R = 6371 km)


def _candidates(lat: np.ndarray, lon: np.ndarray, *, density: float | np.ndarray = 0.9,
                top_weight: float = 0.9, margin: float | np.ndarray = 0.0) -> PoECandidates:
    """Rows of candidates: column 0 LocDiff's answer, 1.. the neighbours in similarity order; the most similar
    neighbour holds `top_weight` of the kernel's weight, so the kernel alone cannot tell a cluster from a lone
    match."""
    n, k1 = lat.shape
    dens = np.broadcast_to(np.asarray(density, np.float64), (n,))
    log_density = np.zeros((n, k1))
    log_density[:, 1:] = np.log(np.clip(dens, DENSITY_FLOOR, 1.0))[:, None]
    w = np.full((n, k1 - 1), (1 - top_weight) / (k1 - 2))
    w[:, 0] = top_weight
    return PoECandidates(lat=lat, lon=lon, log_density=log_density, nb_weight=w, s_top=np.full(n, 0.5),
                         s_margin=np.broadcast_to(np.asarray(margin, np.float64), (n,)).copy(),
                         s_mean=np.full(n, 0.3), s_std=np.full(n, 0.1))


def test_consensus_count_counts_the_neighbours_near_the_best_match():
    # the best match at (10, 20); the next seven at 0.05, 0.1, 0.2, 0.3, 1, 5 and 20 degrees north of it
    offsets = np.array([0.05, 0.1, 0.2, 0.3, 1.0, 5.0, 20.0])
    lat = np.concatenate([[[0.0, 10.0]], [10.0 + offsets]], 1)
    lon = np.full_like(lat, 20.0)
    expected = int((offsets * KM_PER_DEG <= CONSENSUS_KM).sum())  # 0.05 / 0.1 / 0.2 degrees: 5.6 / 11 / 22 km
    assert expected == 3
    one = PoECandidates(lat, lon, np.zeros(lat.shape), np.ones((1, 8)) / 8, *np.ones((1, 1)), *np.zeros((3, 1)))
    assert consensus_count(one) == [3]
    # only neighbours 2..CONSENSUS_TOP count: one more close neighbour beyond them changes nothing
    lat2, lon2 = np.concatenate([lat, [[10.01]]], 1), np.concatenate([lon, [[20.0]]], 1)
    assert lat2.shape[1] == CONSENSUS_TOP + 2
    more = PoECandidates(lat2, lon2, np.zeros(lat2.shape), np.ones((1, 9)) / 9, *np.ones((1, 1)), *np.zeros((3, 1)))
    assert consensus_count(more) == [3]


def _frame(n: int, seed: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                         np.ndarray]:
    """rng, the truths (n,), candidate arrays (n, CONSENSUS_TOP + 1) with column 0, LocDiff's answer, 100 km
    north of the truth, and the first half of the rows marked `known`."""
    rng = np.random.default_rng(seed)
    tlat, tlon = rng.uniform(-50, 50, n), rng.uniform(-150, 150, n)
    lat, lon = np.empty((n, CONSENSUS_TOP + 1)), np.empty((n, CONSENSUS_TOP + 1))
    lat[:, 0], lon[:, 0] = tlat + 100 / KM_PER_DEG, tlon
    return rng, tlat, tlon, lat, lon, np.arange(n) < n // 2


def _two_groups(n: int, seed: int) -> tuple[PoECandidates, np.ndarray, np.ndarray]:
    """Half the rows: the gallery knows the place (eight neighbours within 3 km of the truth); the other half:
    the best match lies 2,000 km away and the rest scatter. LocDiff's answer is 100 km from the truth, and its
    density is high at every neighbour, so only the gallery's agreement separates the halves."""
    rng, tlat, tlon, lat, lon, known = _frame(n, seed)
    k = CONSENSUS_TOP
    lat[known, 1:] = tlat[known, None] + rng.uniform(-1, 1, (known.sum(), k)) / KM_PER_DEG
    lon[known, 1:] = tlon[known, None]
    far = ~known
    lat[far, 1] = tlat[far] - 2000 / KM_PER_DEG
    lon[far, 1] = tlon[far]
    lat[far, 2:] = np.clip(tlat[far, None] + rng.uniform(-30, 30, (far.sum(), k - 1)), -89, 89)
    lon[far, 2:] = tlon[far, None] + rng.uniform(-60, 60, (far.sum(), k - 1))
    return _candidates(lat, lon), tlat, tlon


def _acc(lat, lon, tlat, tlon) -> np.ndarray:
    d = np.asarray(haversine_km(lat, lon, tlat, tlon))
    return 100.0 * (d[:, None] <= np.asarray(THRESHOLDS_KM)).mean(0)


def _on_a_fresh_draw(draw: tuple[PoECandidates, np.ndarray, np.ndarray], got: dict[str, float]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy (%) at each threshold of the chosen setting, of LocDiff's answer and of top-1 retrieval."""
    test, lat_t, lon_t = draw
    h = _acc(*poe_select(test, **{k: got[k] for k in POE_DEFAULT}, novelty=got["novelty"])[:2], lat_t, lon_t)
    return h, _acc(test.lat[:, 0], test.lon[:, 0], lat_t, lon_t), _acc(test.lat[:, 1], test.lon[:, 1], lat_t, lon_t)


def test_the_override_takes_the_best_match_only_where_the_gallery_agrees():
    c, tlat, tlon = _two_groups(200, seed=0)
    off = {"bandwidth_km": 25.0, "strength": 0.0, "threshold": float("inf"), "slope": 1.0, "floor": 1.0,
           "core": 0.0, "snap_km": 0.0}
    lat, lon, used = poe_select(c, **off)  # strength 0: LocDiff's answer everywhere
    assert not used.any()
    lat, lon, used = poe_select(c, **off, consensus=3, consensus_density=0.5)
    known = np.arange(200) < 100
    np.testing.assert_array_equal(used, known)
    np.testing.assert_array_equal(lat[known], c.lat[known, 1])
    np.testing.assert_array_equal(lat[~known], c.lat[~known, 0])
    # LocDiff's density below consensus_density at the best match: the override does not apply
    low = _candidates(c.lat, c.lon, density=0.2)
    assert not poe_select(low, **off, consensus=3, consensus_density=0.5)[2].any()
    assert poe_select(low, **off, consensus=3, consensus_density=0.1)[2].sum() == 100


def test_choose_poe_chooses_the_override_where_only_agreement_separates():
    """Validation and test drawn alike: retrieval wins at 1 / 25 km on the known half and loses 200 km on the
    other; LocDiff the reverse. The chosen rule must do both, which only the override can (the kernel's weight sits
    on the best match in both halves and the similarity is the same everywhere), or the learned novelty signal,
    which sees the same agreement among its features."""
    c, tlat, tlon = _two_groups(400, seed=1)
    fresh = _two_groups(400, seed=2)
    got = choose_poe(c, tlat, tlon, learned_novelty=False)
    assert got["consensus"] >= 1 and got["novelty"] is None and got["shortfall"] == 0.0, got
    h, loc, ret = _on_a_fresh_draw(fresh, got)
    assert ret[1] == 50.0 and loc[1] == 0.0 and loc[2] == 100.0 and ret[2] == 50.0  # the setting as built
    np.testing.assert_allclose(h, np.maximum(loc, ret))  # the best of both at every threshold
    got = choose_poe(c, tlat, tlon)  # with the learned signal too: it ties at best, and a tie keeps s_top
    assert got["novelty"] is None and got["consensus"] >= 1, got
    np.testing.assert_allclose(_on_a_fresh_draw(fresh, got)[0], np.maximum(loc, ret))


def _lone_matches(n: int, seed: int) -> tuple[PoECandidates, np.ndarray, np.ndarray]:
    """No neighbour agrees with another anywhere. Half the rows: the best match is at the truth (0.5 km) and its
    similarity exceeds the second's by 0.2; the other half: the best match lies 2,000 km away, 0.01 above the
    second. LocDiff's answer is 100 km from the truth with a high density at every neighbour, so only the
    similarity margin separates the halves."""
    rng, tlat, tlon, lat, lon, known = _frame(n, seed)
    k = CONSENSUS_TOP
    lat[:, 1] = np.where(known, tlat + 0.5 / KM_PER_DEG, tlat - 2000 / KM_PER_DEG)
    lon[:, 1] = tlon
    lat[:, 2:] = np.clip(tlat[:, None] + rng.uniform(-30, 30, (n, k - 1)), -89, 89)
    lon[:, 2:] = tlon[:, None] + rng.uniform(-60, 60, (n, k - 1))
    return _candidates(lat, lon, margin=np.where(known, 0.2, 0.01)), tlat, tlon


def test_the_distinct_match_override_takes_the_best_match_only_far_above_the_second():
    c, _, _ = _lone_matches(100, seed=3)
    off = {"bandwidth_km": 25.0, "strength": 0.0, "threshold": float("inf"), "slope": 1.0, "floor": 1.0,
           "core": 0.0, "snap_km": 0.0}
    assert not poe_select(c, **off)[2].any()  # margin inf (the default): off
    assert not poe_select(c, **off, consensus=1, consensus_density=DENSITY_FLOOR)[2].any()  # nobody agrees
    lat, _, used = poe_select(c, **off, margin=0.1)
    known = np.arange(100) < 50
    np.testing.assert_array_equal(used, known)
    np.testing.assert_array_equal(lat, np.where(known, c.lat[:, 1], c.lat[:, 0]))
    assert poe_select(c, **off, margin=0.2)[2].sum() == 50  # at the margin itself: taken
    assert not poe_select(c, **off, margin=0.21)[2].any()


def test_choose_poe_chooses_the_margin_where_only_the_margin_separates():
    c, tlat, tlon = _lone_matches(400, seed=4)
    fresh = _lone_matches(400, seed=5)
    got = choose_poe(c, tlat, tlon, learned_novelty=False)
    assert got["margin"] in POE_MARGINS and got["shortfall"] == 0.0, got
    h, loc, ret = _on_a_fresh_draw(fresh, got)
    assert ret[0] == 50.0 and loc[1] == 0.0 and loc[2] == 100.0 and ret[2] == 50.0  # the setting as built
    np.testing.assert_allclose(h, np.maximum(loc, ret))  # the best of both at every threshold
    got = choose_poe(c, tlat, tlon)  # with the learned signal (the margin is one of its features): a tie keeps s_top
    assert got["novelty"] is None and got["margin"] in POE_MARGINS, got
    np.testing.assert_allclose(_on_a_fresh_draw(fresh, got)[0], np.maximum(loc, ret))


def test_novelty_features_by_hand():
    # on the meridian, in degrees north: LocDiff's answer at 0, the best match at 1, the next seven neighbours
    # (2..CONSENSUS_TOP) at 1.1, 1.5, 3, 0.5, 41, 42, 43, and a ninth at 0.6, beyond CONSENSUS_TOP, which must not
    # count (it lies within 100 km of both the best match and the answer); similarities 0.9, 0.7, then 0.5
    lat = np.array([[0.0, 1.0, 1.1, 1.5, 3.0, 0.5, 41.0, 42.0, 43.0, 0.6]])
    lon = np.zeros_like(lat)
    sim = np.array([0.9, 0.7, *[0.5] * 7])
    c = PoECandidates(lat, lon, np.log(np.full(lat.shape, 0.25)), np.ones((1, 9)) / 9, sim[:1], sim[:1] - sim[1:2],
                      np.array([sim.mean()]), np.array([sim.std()]))
    assert CONSENSUS_TOP == 8 and NOVELTY_NEAR_KM == 100.0 and CONSENSUS_KM == 25.0
    # km from the best match: 11, 56, 222, 56, ...; from the answer: 111 (the best), 122, 167, 334, 56, ...
    expected = [0.9, 0.2, 0.9 - sim.mean(), sim.std(), np.log1p(KM_PER_DEG), np.log(0.25), 1, 3, 1]
    f = novelty_features(c)[0]
    assert f.shape == (len(NOVELTY_FEATURES),)
    np.testing.assert_allclose(f, expected, rtol=1e-4)


def _spread_only(n: int, seed: int) -> tuple[PoECandidates, np.ndarray, np.ndarray]:
    """As `_lone_matches`, but the best match's similarity and margin are the same everywhere (0.5, 0): on the
    known half the best match stands out from the rest (mean 0.3), on the other half all k look alike (mean
    0.49); no neighbour agrees with another. Only signals s_top cannot give separate the halves."""
    c, tlat, tlon = _lone_matches(n, seed)
    known = np.arange(n) < n // 2
    c.s_margin[:] = 0.0
    c.s_mean = np.where(known, 0.3, 0.49)
    c.s_std = np.where(known, 0.1, 0.01)
    return c, tlat, tlon


def test_choose_poe_learns_the_novelty_signal_where_the_top_similarity_cannot_tell():
    c, tlat, tlon = _spread_only(400, seed=6)
    fresh = _spread_only(400, seed=7)
    plain = choose_poe(c, tlat, tlon, learned_novelty=False)
    assert plain["novelty"] is None and plain["shortfall"] > 0  # s_top, margin and agreement: no way to do both
    got = choose_poe(c, tlat, tlon)
    assert isinstance(got["novelty"], LogisticModel) and got["shortfall"] == 0.0, got
    h, loc, ret = _on_a_fresh_draw(fresh, got)
    assert ret[0] == 50.0 and loc[1] == 0.0 and loc[2] == 100.0 and ret[2] == 50.0  # the setting as built
    np.testing.assert_allclose(h, np.maximum(loc, ret))  # the best of both at every threshold
    # the model is fitted to P(best match within 25 km): right on the known half, wrong on the other
    p = got["novelty"](novelty_features(fresh[0]))
    assert p[:200].min() > 0.9 and p[200:].max() < 0.1


def test_no_novelty_model_without_both_outcomes():
    c, tlat, tlon = _spread_only(400, seed=8)
    assert fit_novelty(c, tlat, tlon) is not None
    few = np.arange(400) < 9  # the best match right on 9 rows: fewer than NOVELTY_MIN_CLASS (10)
    assert fit_novelty(c, np.where(few, tlat, tlat + 1.0), tlon) is None
    assert fit_novelty(c, np.where(np.arange(400) < 10, tlat, tlat + 1.0), tlon) is not None
    assert fit_novelty(c, tlat + 1.0, tlon) is None  # the best match is never right: nothing to learn
