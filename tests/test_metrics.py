"""locdiff.metrics against a hand-computed example and an independent distance formula."""

import math

import numpy as np
import pytest

from locdiff.geo import EARTH_RADIUS_KM
from locdiff.metrics import (
    THRESHOLDS_KM,
    distances_km,
    format_table,
    geo_metrics,
    geoscore,
    hits_within,
    metrics_from_distances,
)

R = EARTH_RADIUS_KM
# Truths on the equator at longitude 0 (and one pole); predictions at known great-circle angles, so each
# distance is R * angle exactly (an arc of the equator, or pole to pole).
PRED = [(0.0, 0.0), (0.0, 0.005), (0.0, 0.2), (0.0, 1.5), (0.0, 6.0), (0.0, 20.0), (0.0, 90.0), (-90.0, 0.0)]
TRUE = [(0.0, 0.0)] * 7 + [(90.0, 0.0)]
ANGLES_DEG = [0.0, 0.005, 0.2, 1.5, 6.0, 20.0, 90.0, 180.0]


def _columns():
    p, t = np.array(PRED), np.array(TRUE)
    return p[:, 0], p[:, 1], t[:, 0], t[:, 1]


def test_hand_computed_example():
    d_ref = [R * math.radians(a) for a in ANGLES_DEG]  # 0, 0.556, 22.24, 166.8, 667.2, 2224, 10008, 20015 km
    m = geo_metrics(*_columns())
    assert m["n"] == 8
    # within 1 km: 2 of 8; 25 km: 3; 200 km: 4; 750 km: 5; 2500 km: 6
    for km, count in ((1, 2), (25, 3), (200, 4), (750, 5), (2500, 6)):
        assert m[f"count_{km}km"] == count
        assert m[f"acc_{km}km"] == 100.0 * count / 8
    assert m["median_km"] == pytest.approx((d_ref[3] + d_ref[4]) / 2, rel=1e-12)
    assert m["mean_km"] == pytest.approx(sum(d_ref) / 8, rel=1e-12)
    assert m["geoscore"] == pytest.approx(sum(5000 * math.exp(-d / 1492.7) for d in d_ref) / 8, rel=1e-12)
    assert distances_km(*_columns()) == pytest.approx(d_ref, rel=1e-12, abs=1e-9)


def test_distances_match_spherical_law_of_cosines():
    rng = np.random.default_rng(0)
    lat1, lat2 = rng.uniform(-89, 89, (2, 500))
    lon1, lon2 = rng.uniform(-180, 180, (2, 500))
    p1, p2, dl = np.radians(lat1), np.radians(lat2), np.radians(lon2 - lon1)
    ref = R * np.arccos(np.clip(np.sin(p1) * np.sin(p2) + np.cos(p1) * np.cos(p2) * np.cos(dl), -1, 1))
    np.testing.assert_allclose(distances_km(lat2, lon2, lat1, lon1), ref, rtol=1e-7)


def test_threshold_is_inclusive_and_geoscore_bounds():
    m = metrics_from_distances([1.0, 25.0, 25.000001])
    assert m["count_1km"] == 1 and m["count_25km"] == 2
    assert geoscore([0.0]) == 5000.0
    assert geoscore([1492.7]) == pytest.approx(5000 / math.e)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="prediction: lat"):
        geo_metrics([91.0], [0.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="truth: lon"):
        geo_metrics([0.0], [0.0], [0.0], [float("nan")])
    with pytest.raises(ValueError, match="same length"):
        geo_metrics([0.0, 1.0], [0.0], [0.0], [0.0])


def test_format_table_shows_percent_counts_and_errors():
    text = format_table({"knn": geo_metrics(*_columns())}, title="test")
    assert "== test ==" in text
    assert "25.00 % (2)" in text and "75.00 % (6)" in text
    assert "GeoScore" in text and "median km" in text


def test_hits_within_marks_each_threshold_met():
    # one degree of latitude is 111.19 km (R = 6371.0088 km): 0 km, 20 km, 111 km, 1,001 km and 3,336 km off
    deg = np.array([0.0, 20.0 / 111.19, 1.0, 9.0, 30.0])
    h = hits_within(deg, np.zeros(5), np.zeros(5), np.zeros(5))
    assert h.dtype == np.float64 and h.shape == (5, len(THRESHOLDS_KM))
    expected = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    assert np.array_equal(h, expected)
