"""Evaluating one table (locdiff.evaluation): the metrics against an independent haversine, the files
written, the calibration, and the per-method table of a predictions file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from locdiff.evaluation import accuracy_markdown, evaluate_table, metrics_by_method
from locdiff.io import read_predictions, write_predictions
from locdiff.methods import Prediction
from locdiff.tables import EmbeddingTable


def _haversine_km(lat1, lon1, lat2, lon2):
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0088 * np.arcsin(np.sqrt(a))


class Shifted:
    """A trained method stand-in: answers the truth moved `shift` degrees north, with a confidence."""

    confidence_radius_km = 500.0

    def __init__(self, truth: EmbeddingTable, shift: np.ndarray, confidence: np.ndarray):
        self.truth, self.shift, self.confidence = truth, shift, confidence

    def predict(self, table, **options):
        assert options == {"samples": 3}
        return Prediction(lat=table.lat + self.shift, lon=table.lon.copy(), confidence=self.confidence)


def test_evaluate_table_scores_writes_and_calibrates(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)
    table = EmbeddingTable(np.array([f"i{i}" for i in range(n)], object), lat, lon,
                           rng.normal(size=(n, 4)).astype(np.float32), "toy")
    shift = np.where(np.arange(n) % 2 == 0, 0.0, 10.0)  # half exact, half about 1112 km off
    confidence = np.where(shift == 0, 0.9, 0.2)
    out = tmp_path / "eval"
    result = evaluate_table(Shifted(table, shift, confidence), table, out, name="toy", title="toy on t",
                            predict_options={"samples": 3})
    d = _haversine_km(lat + shift, lon, lat, lon)
    assert result.metrics["acc_1km"] == pytest.approx(100 * np.mean(d <= 1))
    assert result.metrics["acc_750km"] == pytest.approx(50.0)
    assert result.metrics["median_km"] == pytest.approx(np.median(d), rel=1e-3)
    # calibration: the confidence is the probability of lying within 500 km (0.9 for hits, 0.2 for misses)
    assert result.metrics["confidence_radius_km"] == 500.0
    assert result.metrics["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.2)
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["radius_km"] == 500.0 and calib["ece"] == pytest.approx(result.metrics["ece"])
    assert {p.name for p in result.plots.values()} == {"worldmap.png", "error_cdf.png", "reliability.png"}
    assert all(p.stat().st_size > 0 for p in result.plots.values())
    written = read_predictions(out / "predictions.parquet")
    assert list(written.ids) == list(table.ids) and np.allclose(written.pred_lat, lat + shift)
    assert list(result.predictions["method"].unique()) == ["toy"]


def test_evaluation_needs_truth(tmp_path):
    table = EmbeddingTable(np.array(["a"], object), None, None, np.zeros((1, 4), np.float32), "unlabelled")
    with pytest.raises(ValueError, match="unlabelled: evaluation needs lat/lon"):
        evaluate_table(None, table, tmp_path, name="x")


def test_metrics_by_method_and_the_markdown_table(tmp_path):
    lat, lon = np.array([0.0, 10.0, 20.0, 30.0]), np.array([0.0, 0.0, 0.0, 0.0])
    pred_lat = lat + np.array([0.0, 1.0, 0.0, 5.0])
    path = tmp_path / "p.parquet"
    write_predictions(path, ["a", "b", "c", "d"], lat, lon, pred_lat, lon, method=np.array(["x", "x", "y", "y"]))
    name, rows, d = metrics_by_method(read_predictions(path))
    assert name == "all" and set(rows) == {"x", "y", "all"}
    assert np.allclose(d, _haversine_km(pred_lat, lon, lat, lon))
    assert rows["x"]["acc_1km"] == pytest.approx(50.0) and rows["y"]["acc_1km"] == pytest.approx(50.0)
    assert rows["all"]["acc_200km"] == pytest.approx(75.0)
    table = accuracy_markdown({"t": {"n": 4, **rows["all"]}}, title="T")
    assert table.splitlines()[0] == "### T" and "| t | 4 | 50.00 % |" in table
