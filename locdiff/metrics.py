"""Geolocation metrics: accuracy within 1/25/200/750/2500 km, median and mean error, GeoScore.

The one implementation every command, flow and benchmark uses. Distances are great-circle
(`locdiff.geo.haversine_km`, sphere of radius 6371.0088 km), computed in float64.

    m = geo_metrics(pred_lat, pred_lon, lat, lon)
    m["acc_25km"]   # percent of images within 25 km
    m["count_25km"] # how many images that is
    print(format_table({"locdiff": m}))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from locdiff.geo import check_coordinates, haversine_km

THRESHOLDS_KM: tuple[float, ...] = (1.0, 25.0, 200.0, 750.0, 2500.0)
GEOSCORE_SCALE_KM = 1492.7  # GeoGuessr: 5000 * exp(-d / 1492.7 km)
GEOSCORE_MAX = 5000.0


def _km_key(km: float) -> str:
    return f"{km:g}km"


ACCURACY_KEYS = tuple(f"acc_{_km_key(t)}" for t in THRESHOLDS_KM)  # "acc_1km" ... "acc_2500km", as geo_metrics


def distances_km(pred_lat: ArrayLike, pred_lon: ArrayLike, lat: ArrayLike, lon: ArrayLike) -> np.ndarray:
    """Great-circle error in km (float64, shape (N,)) after validating both sets of coordinates."""
    arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in (pred_lat, pred_lon, lat, lon)]
    n = {a.shape[0] for a in arrays}
    if len(n) != 1:
        raise ValueError(f"pred_lat, pred_lon, lat, lon must have the same length; got "
                         f"{[a.shape[0] for a in arrays]}")
    check_coordinates(arrays[0], arrays[1], name="prediction")
    check_coordinates(arrays[2], arrays[3], name="truth")
    return np.asarray(haversine_km(arrays[0], arrays[1], arrays[2], arrays[3]), dtype=np.float64)


def hits_within(pred_lat: ArrayLike, pred_lon: ArrayLike, lat: ArrayLike, lon: ArrayLike,
                thresholds: Sequence[float] = THRESHOLDS_KM) -> np.ndarray:
    """(N, thresholds) float 0/1: whether each prediction lies within each threshold of its truth."""
    return (distances_km(pred_lat, pred_lon, lat, lon)[:, None] <= np.asarray(thresholds)).astype(np.float64)


def geoscore(dist_km: ArrayLike) -> float:
    """Mean GeoScore, 5000 * exp(-d / 1492.7 km), over the given distances."""
    d = np.asarray(dist_km, dtype=np.float64)
    return float(np.mean(GEOSCORE_MAX * np.exp(-d / GEOSCORE_SCALE_KM))) if d.size else float("nan")


def metrics_from_distances(dist_km: ArrayLike, thresholds: Sequence[float] = THRESHOLDS_KM) -> dict[str, float]:
    """Metrics from precomputed errors in km.

    Returns a flat dict (ready to log): `n`, `acc_<T>km` (percent), `count_<T>km` (images within T km),
    `median_km`, `mean_km`, `geoscore`. With no rows, accuracies and errors are NaN.
    """
    d = np.asarray(dist_km, dtype=np.float64).reshape(-1)
    n = int(d.size)
    out: dict[str, float] = {"n": n}
    for t in thresholds:
        count = int(np.count_nonzero(d <= t))
        out[f"acc_{_km_key(t)}"] = 100.0 * count / n if n else float("nan")
        out[f"count_{_km_key(t)}"] = count
    out["median_km"] = float(np.median(d)) if n else float("nan")
    out["mean_km"] = float(np.mean(d)) if n else float("nan")
    out["geoscore"] = geoscore(d)
    return out


def geo_metrics(pred_lat: ArrayLike, pred_lon: ArrayLike, lat: ArrayLike, lon: ArrayLike,
                thresholds: Sequence[float] = THRESHOLDS_KM) -> dict[str, float]:
    """Accuracy at each threshold (percent and count), median/mean error in km and GeoScore."""
    return metrics_from_distances(distances_km(pred_lat, pred_lon, lat, lon), thresholds)


def prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """`{"acc_1km": ...}` -> `{"<prefix>/acc_1km": ...}`: the data set's name as prefix, for logging."""
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def _thresholds_of(metrics: Mapping[str, Any]) -> list[str]:
    return [k.removeprefix("acc_") for k in metrics if k.startswith("acc_")]


def format_table(rows: Mapping[str, Mapping[str, Any]], *, title: str = "") -> str:
    """A plain-text table, one row per name: n, accuracy (percent, two decimals) with the count in
    brackets at each threshold, median and mean error in km and GeoScore."""
    if not rows:
        return ""
    first = next(iter(rows.values()))
    keys = _thresholds_of(first)
    header = ["", "n", *(f"{k.replace('km', ' km')}" for k in keys), "median km", "mean km", "GeoScore"]
    body = []
    for name, m in rows.items():
        cells = [str(name), f"{int(m['n']):d}"]
        for k in keys:
            acc, count = m.get(f"acc_{k}"), m.get(f"count_{k}")
            if acc is None or (isinstance(acc, float) and np.isnan(acc)):
                cells.append("-")
            else:
                cells.append(f"{acc:.2f} % ({int(count)})" if count is not None else f"{acc:.2f} %")
        for k in ("median_km", "mean_km"):
            v = m.get(k)
            cells.append("-" if v is None or np.isnan(v) else f"{v:,.1f}")
        g = m.get("geoscore")
        cells.append("-" if g is None or np.isnan(g) else f"{g:,.1f}")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    def line(cells: list[str]) -> str:  # name left-aligned, numbers right-aligned
        return "  ".join(c.rjust(w) if i else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    lines = [f"== {title} =="] if title else []
    lines += [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)]
    return "\n".join(lines)


__all__ = ["THRESHOLDS_KM", "GEOSCORE_SCALE_KM", "distances_km", "geoscore", "metrics_from_distances",
           "geo_metrics", "prefixed", "format_table"]
