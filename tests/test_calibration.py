"""Isotonic calibration, the logistic model and the expected calibration error, against scikit-learn and by hand."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from locdiff.calibration import (
    IsotonicCalibrator,
    LogisticModel,
    cross_fitted,
    expected_calibration_error,
    reliability,
)


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


def _logistic_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features on different scales and offsets (one constant); outcomes from a known logistic law."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) * [1.0, 3.0, 0.1, 0.0] + [0.0, 5.0, 1.0, 7.0]
    p = 1 / (1 + np.exp(-(1.5 * x[:, 0] - 0.5 * (x[:, 1] - 5) + 1.0)))
    return x, (rng.uniform(0, 1, n) < p).astype(float)


def test_logistic_model_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    x, y = _logistic_data(3000, seed=2)
    ours = LogisticModel.fit(x, y)
    z = preprocessing.StandardScaler().fit_transform(x)
    ref = linear_model.LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(ours.coef, ref.coef_[0], atol=1e-5)
    np.testing.assert_allclose(ours.intercept, ref.intercept_[0], atol=1e-5)
    np.testing.assert_allclose(ours(x), ref.predict_proba(z)[:, 1], atol=1e-5)
    assert ours.coef[3] == 0.0 and ours.n == 3000  # a constant feature carries nothing (and does not divide by 0)


def test_logistic_model_recovers_a_known_law_and_round_trips():
    x, y = _logistic_data(100_000, seed=3)
    m = LogisticModel.fit(x, y)
    # on the raw scale coef / scale = (1.5, -0.5, 0) (the L2 penalty is negligible at this size); the third in
    # standard deviations, its raw standard error being 0.07
    np.testing.assert_allclose((m.coef / m.scale)[:2], [1.5, -0.5], atol=0.05)
    assert abs(m.coef[2]) < 0.03
    again = LogisticModel.from_json(json.loads(json.dumps(m.to_json())))
    np.testing.assert_array_equal(again.logit(x[:100]), m.logit(x[:100]))


@pytest.mark.parametrize("bad,why", [({"kind": "isotonic"}, "unknown model kind 'isotonic'"),
                                     ({"kind": "logistic", "mean": [0], "scale": [1], "coef": [1, 2], "intercept": 0},
                                      "lists of one length"),
                                     ({"kind": "logistic", "mean": [0], "scale": [0], "coef": [1], "intercept": 0},
                                      "scale > 0"),
                                     ({"kind": "logistic", "mean": [0], "scale": [1], "coef": [1], "intercept": "nan"},
                                      "intercept must be a number"),
                                     ({"kind": "logistic", "mean": [0], "scale": [1], "coef": [1]},
                                      "intercept must be a number")])
def test_a_damaged_logistic_model_is_refused(bad, why):
    with pytest.raises(ValueError, match=re.escape(why)):  # ValueError, as from_json says: not a KeyError
        LogisticModel.from_json(bad)


def test_logistic_model_needs_both_outcomes_and_finite_features():
    x, y = _logistic_data(100, seed=4)
    with pytest.raises(ValueError, match="both classes"):
        LogisticModel.fit(x, np.ones(100))
    with pytest.raises(ValueError, match="finite"):
        LogisticModel.fit(np.where(np.arange(100)[:, None] == 3, np.nan, x), y)
