"""Evaluating predictions of one table: predict, score, plot and calibrate. Shared by `locdiff evaluate`
(a predictions file) and the pipeline's evaluate stage (a trained method on a test set).

- `evaluate_table`: a method's predictions of a labelled table, written to a folder with the metrics,
  the world map, the error CDF and, when the method gives a confidence, its calibration (the expected
  calibration error of the probability of lying within the method's confidence radius);
- `metrics_by_method`: the metrics of a predictions file, per method when it holds several;
- `draw_plots`: the world map of predictions against truths and the error CDF;
- `accuracy_markdown`: the accuracy table of several test sets as Markdown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from locdiff import plots
from locdiff.calibration import reliability
from locdiff.io import PredictionTable, write_predictions
from locdiff.methods import Prediction
from locdiff.metrics import ACCURACY_KEYS, THRESHOLDS_KM, distances_km, geo_metrics, metrics_from_distances
from locdiff.runs import write_json_atomic
from locdiff.tables import EmbeddingTable

WORLD_MAP, ERROR_CDF, RELIABILITY, CALIBRATION = "worldmap.png", "error_cdf.png", "reliability.png", "calibration.json"


@dataclass
class Evaluation:
    """What `evaluate_table` wrote: the metrics, the predictions (a DataFrame in the predictions table
    format), the plots by name and the other files (the calibration JSON)."""

    metrics: dict[str, float]
    predictions: pd.DataFrame
    plots: dict[str, Path]
    files: list[Path] = field(default_factory=list)


def draw_plots(out: Path, pred_lat: Any, pred_lon: Any, lat: Any, lon: Any, *, label: str, title: str = "",
               cdf_title: str | None = None, world_map: str = WORLD_MAP, error_cdf: str = ERROR_CDF
               ) -> dict[str, Path]:
    """World map of predictions against truths and the error CDF (curve `label`), as PNGs in out."""
    paths = {"worldmap": Path(out) / world_map, "error_cdf": Path(out) / error_cdf}
    plots.world_map(paths["worldmap"], pred_lat, pred_lon, lat, lon, title=title)
    plots.error_cdf(paths["error_cdf"], {label: distances_km(pred_lat, pred_lon, lat, lon)},
                    title=title if cdf_title is None else cdf_title)
    return paths


# rows predicted at a time (`predict_in_chunks`): what a method holds per row beyond the answer (LocDiff's density
# code, D floats a row: 4.4 kB at degree 32, and its decoding's temporaries) is held for one chunk, not the whole
# table (degree 32, 80,000 rows of 256-d, 2-core CPU: peak 1.39 GB in chunks of 8,192, 1.35 GB of 32,768,
# 3.6-4.5 GB of 65,536, 3.55 GB in one pass)
PREDICT_ROWS = 8_192


def predict_in_chunks(predictor: Any, table: EmbeddingTable, /, **options: Any) -> Prediction:
    """`predictor.predict(table, **options)`'s answers and confidence (a trained GeoMethod), PREDICT_ROWS rows at a
    time (a row's answer does not depend on the other rows of its chunk); nothing else of a chunk's prediction is
    kept."""
    n = len(table)
    lat, lon, conf = np.empty(n), np.empty(n), np.full(n, np.nan)
    has_conf = False
    for s in range(0, n, PREDICT_ROWS):
        rows = slice(s, s + PREDICT_ROWS)
        part = EmbeddingTable(ids=table.ids[rows], embedding=table.embedding[rows], source=table.source,
                              lat=None if table.lat is None else table.lat[rows],
                              lon=None if table.lon is None else table.lon[rows])
        pred = predictor.predict(part, **options)
        lat[rows], lon[rows] = pred.lat, pred.lon
        if pred.confidence is not None:
            conf[rows], has_conf = pred.confidence, True
        del pred  # its density codes: one chunk's only
    return Prediction(lat, lon, conf if has_conf else None)


def evaluate_table(method: Any, table: EmbeddingTable, out: Path, *, name: str, title: str = "",
                   predict_options: Mapping[str, Any] | None = None) -> Evaluation:
    """Predict the labelled `table` with `method` (a trained `locdiff.methods.GeoMethod`), score it and
    write out/{predictions.parquet, worldmap.png, error_cdf.png} and, when the method gives a confidence
    and has a confidence radius, out/{reliability.png, calibration.json} (the metrics then hold `ece` and
    `confidence_radius_km`). `name` labels the predictions (the method column)."""
    if not table.labelled:
        raise ValueError(f"{table.source}: evaluation needs lat/lon")
    pred = predict_in_chunks(method, table, **dict(predict_options or {}))
    metrics = geo_metrics(pred.lat, pred.lon, table.lat, table.lon)
    radius = float(getattr(method, "confidence_radius_km", 0.0) or 0.0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.parquet", table.ids, table.lat, table.lon, pred.lat, pred.lon,
                      method=name, confidence=pred.confidence)
    df = pd.DataFrame({"id": table.ids.astype(str), "lat": table.lat, "lon": table.lon,
                       "pred_lat": pred.lat, "pred_lon": pred.lon, "method": name})
    if pred.confidence is not None:
        df["confidence"] = pred.confidence
    drawn = draw_plots(out, pred.lat, pred.lon, table.lat, table.lon, label=name if len(df) else "model",
                       title=title)
    files: list[Path] = []
    if pred.confidence is not None and radius > 0:
        hit = distances_km(pred.lat, pred.lon, table.lat, table.lon) <= radius
        rel = reliability(pred.confidence, hit)
        metrics["ece"] = rel["ece"]
        metrics["confidence_radius_km"] = radius
        write_json_atomic(out / CALIBRATION, {"radius_km": radius, **rel})
        files.append(out / CALIBRATION)
        drawn["reliability"] = plots.reliability_plot(out / RELIABILITY, rel,
                                                      title=f"{title}: within {radius:g} km")
    return Evaluation(metrics=metrics, predictions=df, plots=drawn, files=files)


def metrics_by_method(pred: PredictionTable) -> tuple[str, dict[str, dict[str, float]], np.ndarray]:
    """(name, {method or name: metrics}, distances in km) of a labelled predictions table: one row per
    method when it holds several, and the row `name` over all of them (the method's name when there is
    one, else "all")."""
    d = distances_km(pred.pred_lat, pred.pred_lon, pred.lat, pred.lon)
    rows: dict[str, dict[str, float]] = {}
    if pred.method is not None and len(set(pred.method)) > 1:
        for method in sorted(set(pred.method)):
            rows[method] = metrics_from_distances(d[pred.method == method])
    name = str(pred.method[0]) if pred.method is not None and len(set(pred.method)) == 1 else "all"
    rows[name] = metrics_from_distances(d)
    return name, rows, d


def accuracy_markdown(results: Mapping[str, Mapping[str, float]], *, title: str = "") -> str:
    """The accuracy table (percent with two decimals, median km, GeoScore) as Markdown."""
    head = ["data set", "n"] + [f"{t:g} km" for t in THRESHOLDS_KM] + ["median km", "GeoScore"]
    lines = [f"### {title}" if title else "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for name, m in results.items():
        cells = [name, str(int(m.get("n", 0)))] + [f"{m[key]:.2f} %" for key in ACCURACY_KEYS]
        cells += [f"{m['median_km']:,.0f}", f"{m['geoscore']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line) + "\n"
