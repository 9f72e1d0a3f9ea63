"""Isotonic calibration and the expected calibration error, against scikit-learn and by hand."""

from __future__ import annotations

import numpy as np
import pytest

from locdiff.calibration import IsotonicCalibrator, cross_fitted, expected_calibration_error, reliability


def test_isotonic_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.isotonic")
    rng = np.random.default_rng(0)
    score = rng.uniform(0, 1, 500)
    hit = (rng.uniform(0, 1, 500) < score**2).astype(float)
    ours = IsotonicCalibrator.fit(score, hit)
    ref = sklearn.IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(score, hit)
    grid = np.linspace(0, 1, 101)
    assert np.allclose(ours(score), ref.predict(score), atol=1e-9)  # the fitted values at the data
    assert np.all(np.diff(ours(grid)) >= -1e-12)


def test_calibration_fixes_an_overconfident_score():
    rng = np.random.default_rng(1)
    raw = rng.uniform(0, 1, 4000)
    hit = (rng.uniform(0, 1, 4000) < 0.3 * raw).astype(float)  # right 3x less often than the score says
    fitted = IsotonicCalibrator.fit(raw[:2000], hit[:2000])
    assert expected_calibration_error(raw[2000:], hit[2000:]) > 0.3
    assert expected_calibration_error(fitted(raw[2000:]), hit[2000:]) < 0.05
    assert expected_calibration_error(cross_fitted(raw, hit), hit) < 0.05


def test_json_round_trip_and_damage():
    c = IsotonicCalibrator.fit([0.1, 0.5, 0.9], [0, 1, 1])
    back = IsotonicCalibrator.from_json(c.to_json())
    assert np.array_equal(back([0.0, 0.3, 1.0]), c([0.0, 0.3, 1.0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        IsotonicCalibrator.from_json({"kind": "isotonic", "x": [0.5, 0.1], "y": [0, 1]})


def test_reliability_by_hand():
    conf = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    hit = np.array([0, 1, 1, 1, 0])
    r = reliability(conf, hit, bins=10)
    assert [b["count"] for b in r["bins"]] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    # bins: |0.5 - 0.05| * 2/5 + |0 - 0.55| * 1/5 + |1 - 0.95| * 2/5
    assert r["ece"] == pytest.approx(0.45 * 0.4 + 0.55 * 0.2 + 0.05 * 0.4)
