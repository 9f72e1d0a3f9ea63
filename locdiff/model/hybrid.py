"""LocDiff-H (LOCDIFF.md 7): LocDiff's density re-ranks retrieved gallery locations for fine scales.

For an image with LocDiff mean code c and mode m: retrieve the top-k gallery entries by cosine
similarity of the embeddings; a candidate qualifies when it lies within `radius_km` of m; its score is
    weight * f_c(candidate) / f_c(m) + (1 - weight) * cosine similarity.
The best qualifying candidate is the answer; with none, the LocDiff mode is.

It holds the retrieval gallery, so it can never need to be worse than retrieval: weight 0 with an
unbounded radius (`radius_km` = inf) is exactly top-1 retrieval, and the weight and radius are chosen on
validation rows (`SELECTION_GRID`), so where the diffusion density is unreliable the choice falls back
to the neighbours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from locdiff import shdd
from locdiff.geo import haversine_km

log = logging.getLogger(__name__)

# (weights, radii in km) tried on validation; weight 0 with radius inf is plain top-1 retrieval
# (radii descending and weights ascending: a tie goes to the setting closest to plain retrieval)
SELECTION_GRID = ((0.0, 0.01, 0.03, 0.1, 0.25, 0.5, 0.75, 1.0), (float("inf"), 2500.0, 1000.0, 500.0, 250.0, 100.0))


@dataclass
class HybridCandidates:
    """Per-image top-k candidates with what the score needs; lets validation try several settings."""

    lat: np.ndarray  # (N, k)
    lon: np.ndarray
    sim: np.ndarray  # cosine similarity (N, k)
    rel_density: np.ndarray  # f_c(candidate) / f_c(mode) (N, k)
    dist_to_mode: np.ndarray  # km (N, k)


def hybrid_candidates(
    gallery: Any,
    query: np.ndarray,
    mean_code: torch.Tensor,
    mode_lat: np.ndarray,
    mode_lon: np.ndarray,
    mode_value: np.ndarray,
    top_k: int,
) -> HybridCandidates:
    sim, idx = gallery.search(query, top_k)
    clat, clon = gallery.lat[idx], gallery.lon[idx]
    f = shdd.density(mean_code.double(), torch.from_numpy(clat), torch.from_numpy(clon)).numpy()  # (N, k)
    peak = np.maximum(np.abs(np.asarray(mode_value, dtype=np.float64)), 1e-12)[:, None]
    dist = np.asarray(haversine_km(clat, clon, np.asarray(mode_lat)[:, None], np.asarray(mode_lon)[:, None]))
    return HybridCandidates(
        lat=clat, lon=clon, sim=sim.astype(np.float64), rel_density=f / peak, dist_to_mode=dist
    )


def hybrid_select(
    c: HybridCandidates, mode_lat: np.ndarray, mode_lon: np.ndarray, *, weight: float, radius_km: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, used_candidate) per image; falls back to the mode when no candidate qualifies."""
    score = weight * c.rel_density + (1 - weight) * c.sim
    score = np.where(c.dist_to_mode <= radius_km, score, -np.inf)
    best = score.argmax(1)
    rows = np.arange(score.shape[0])
    ok = np.isfinite(score[rows, best])
    lat = np.where(ok, c.lat[rows, best], mode_lat)
    lon = np.where(ok, c.lon[rows, best], mode_lon)
    return lat, lon, ok


def choose_blend(c: HybridCandidates, mode_lat: np.ndarray, mode_lon: np.ndarray, lat: np.ndarray,
                 lon: np.ndarray, *, z: float = 2.0) -> dict[str, float]:
    """The weight and radius of `SELECTION_GRID` that place validation images best, but only when they beat
    plain retrieval (weight 0, radius inf) by more than `z` standard errors of the paired per-image
    difference (thresholds met, 0..5): chance gains on a few hundred rows do not move LocDiff-H away
    from retrieval. Returns weight, radius and the scores (sum of accuracies in %) of both."""
    from locdiff.metrics import THRESHOLDS_KM, distances_km

    thresholds = np.asarray(THRESHOLDS_KM)

    def hits(w: float, r: float) -> np.ndarray:
        plat, plon, _ = hybrid_select(c, mode_lat, mode_lon, weight=w, radius_km=r)
        return (distances_km(plat, plon, lat, lon)[:, None] <= thresholds).sum(1).astype(np.float64)

    base = hits(0.0, float("inf"))
    n = len(base)
    best = {"weight": 0.0, "radius_km": float("inf"), "gain": 0.0}
    weights, radii = SELECTION_GRID
    for w in weights:
        for r in radii:
            d = hits(w, r) - base
            gain = float(d.mean()) if n else 0.0
            se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else np.inf
            if gain > best["gain"] and gain > z * se:
                best = {"weight": w, "radius_km": r, "gain": gain}
    return {"weight": best["weight"], "radius_km": best["radius_km"],
            "score": 100.0 * (base.mean() + best["gain"]) if n else 0.0,
            "retrieval_score": 100.0 * base.mean() if n else 0.0}
