"""LocDiff-H (LOCDIFF.md 7): LocDiff's density and the retrieval gallery combined for fine scales.

Two modes (`hybrid.mode`):

- "poe" (the default): a product of experts over the candidates {LocDiff's answer} + the top-k retrieved
  gallery locations,
      score(x) = log clip(f_c(x) / f_c(answer), DENSITY_FLOOR, 1) + strength * log((1 - pi) K(x) + pi),
  with K the similarity-weighted kernel density of the neighbours (bandwidth h, with a street-level core) and pi the
  novelty floor (a chosen neighbour then gives way to the most similar neighbour within `snap_km`):
      pi = floor + (1 - floor) * sigmoid((threshold - s) / slope),
  near 1 when the best match is far, so the gallery's factor is flat and LocDiff's answer stands; the signal s is
  s_top or the learned one (below). Strength 0 is LocDiff, strength inf top-1 retrieval; h, strength, threshold, slope
  and floor are chosen on validation (`choose_poe`, on val and val_unseen together when a run has both): first the
  setting that loses least, at any threshold and group, against the better of the two there (beyond
  `hybrid.poe_tolerance` points), then the one whose summed accuracy beats the better of the two by 2 standard errors.
  Then the consensus override: where at least `consensus` of the next neighbours lie within CONSENSUS_KM of the most
  similar one (the gallery agrees with itself: it knows the place) and LocDiff's density there is at least
  `consensus_density` of its answer's, the most similar neighbour is the answer; both are chosen on the same key (0:
  off). Last the distinct-match override: where the most similar neighbour's similarity exceeds the second's by
  `margin` (a near-duplicate, as in Lowe's ratio test), it is the answer; chosen on the same key (inf: off). The
  novelty floor's signal s is s_top, or, where the validation key prefers it after the whole search above, the logit
  of a learned P(the most similar neighbour is within NOVELTY_RIGHT_KM of the truth): a logistic regression fitted on
  the same validation rows on per-row features of the candidates (`novelty_features`: the similarities' top, margin,
  mean gap and spread, the km from LocDiff's answer to the best match and LocDiff's density there, the neighbours
  agreeing with the best match within 25 and 100 km, and the neighbours within 100 km of the answer).
- "blend" (paper.yaml, and runs trained before the product of experts: their selection.json has no
  `hybrid_mode`): a candidate qualifies when it lies within `radius_km` of the LocDiff mode m; its score is
      weight * f_c(candidate) / f_c(m) + (1 - weight) * cosine similarity;
  the best qualifying candidate is the answer, with none the LocDiff mode. Weight 0 with an unbounded
  radius is exactly top-1 retrieval; weight and radius are chosen on validation rows (`SELECTION_GRID`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from locdiff import shdd
from locdiff.calibration import LogisticModel
from locdiff.gallery import Gallery
from locdiff.geo import haversine_km
from locdiff.metrics import distances_km, hits_within

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
    gallery: Gallery,
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
    def hits(w: float, r: float) -> np.ndarray:
        plat, plon, _ = hybrid_select(c, mode_lat, mode_lon, weight=w, radius_km=r)
        return hits_within(plat, plon, lat, lon).sum(1)

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


# -- the product of experts (issue 19 item 5) -------------------------------------------------------------
# score(x) = log clip(f_c(x) / f_c(answer), DENSITY_FLOOR, 1) + strength * log((1 - pi) * K(x) + pi)
# K: a kernel density over the retrieved neighbours (Gaussian in great-circle distance, bandwidth h, each
# neighbour weighted by a softmax of its similarity on the row's own similarity scale), peak 1;
# pi = floor + (1 - floor) * sigmoid((threshold - s) / slope), s = s_top or the learned signal: the novelty
# floor, near 1 when the best match is far, so the gallery's factor is flat and LocDiff's answer stands; `floor`
# is the share of photos taken where no neighbour is, so a neighbour outside LocDiff's density cannot outvote
# LocDiff's answer.
# Candidates: LocDiff's answer and the neighbours.
DENSITY_FLOOR = 0.05  # side lobes and ringing below 5 % of the answer's density all count the same
POE_BANDWIDTHS_KM = (5.0, 25.0, 100.0, 400.0)
POE_STRENGTHS = (0.5, 1.0, 2.0, 4.0)
POE_THRESHOLD_QUANTILES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # of the signal s on validation
POE_SLOPES = (0.02, 0.1)  # as a share of the spread (90th - 10th percentile) of s on validation
# without validation rows: every neighbour trusted (no novelty floor), a city-sized kernel
POE_FLOORS = (0.0, 0.001, 0.01, 0.1, 0.3)
# the kernel's street-level core: K = (1 - core) * Gaussian(h) + core * Gaussian(CORE_KM), so the most similar
# of several nearby neighbours keeps its own exact place instead of the cluster's centre
CORE_KM = 1.0
POE_CORES = (0.0, 0.2, 0.5)
# after the product has chosen a neighbour: the most similar neighbour within snap_km of it names the spot
# (the product finds the place, the best match within it the street); chosen on validation after the grid
POE_SNAPS_KM = (0.0, 5.0, 25.0, 100.0)
# the consensus override: the most similar neighbour is the answer where at least `consensus` of the next
# CONSENSUS_TOP - 1 neighbours lie within CONSENSUS_KM of it and LocDiff's relative density there is at least
# `consensus_density`. Unlike the similarity, which shifts between photo collections, agreement of the gallery
# with itself says the same thing everywhere (the share of top-1 answers within 25 km rises from ~10 % with
# no agreeing neighbour to 80-100 % with three or more on every benchmark world, held-out regions have
# almost none: docs/results.md)
CONSENSUS_KM = 25.0
CONSENSUS_TOP = 8
POE_CONSENSUS = (1, 2, 3, 4, 5, 6, 7)
POE_CONSENSUS_DENSITIES = (DENSITY_FLOOR, 0.1, 0.3, 0.5, 0.8)
# the distinct-match override (a margin form of Lowe's ratio test): the most similar neighbour is the answer
# where its cosine similarity exceeds the second's by at least `margin` (a near-duplicate of one gallery photo,
# e.g. a landmark); inf is off. Tried from the strictest down, so that a tie keeps the stricter one.
POE_MARGINS = (0.15, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03)
POE_DEFAULT = {"bandwidth_km": 25.0, "strength": 1.0, "threshold": float("-inf"), "slope": 1.0, "floor": 0.01,
               "core": 0.2, "snap_km": 0.0, "consensus": 0.0, "consensus_density": 1.0, "margin": float("inf")}
# bumped when choose_poe's rule changes, so that runs choose again on resume (LocDiffMethod.finalize)
SELECTION_RULE = 5
POE_ROW_CHUNK = 4096  # rows whose (candidates x neighbours) distances are held at once


@dataclass
class PoECandidates:
    """Per image: candidate 0 is LocDiff's answer, 1..k the neighbours (N, k + 1), and what the score needs."""

    lat: np.ndarray
    lon: np.ndarray
    log_density: np.ndarray  # log clip(f_c(candidate) / f_c(answer), DENSITY_FLOOR, 1)
    nb_weight: np.ndarray  # (N, k) neighbour weights, rows sum to 1
    s_top: np.ndarray  # (N,) best cosine similarity
    s_margin: np.ndarray  # (N,) best minus second-best cosine similarity (0 with one neighbour)
    s_mean: np.ndarray  # (N,) mean cosine similarity of the k neighbours
    s_std: np.ndarray  # (N,) their standard deviation

    def rows(self, index: np.ndarray) -> PoECandidates:
        """The candidates of the images `index` selects (an index array or a boolean mask)."""
        return PoECandidates(*(getattr(self, f.name)[index] for f in fields(self)))


def poe_candidates(gallery: Gallery, query: np.ndarray, mean_code: torch.Tensor, answer_lat: np.ndarray,
                   answer_lon: np.ndarray, top_k: int) -> PoECandidates:
    sim, idx = gallery.search(query, top_k)
    sim = sim.astype(np.float64)
    lat = np.concatenate([np.asarray(answer_lat, np.float64)[:, None], gallery.lat[idx]], 1)
    lon = np.concatenate([np.asarray(answer_lon, np.float64)[:, None], gallery.lon[idx]], 1)
    f = shdd.density(mean_code.double(), torch.from_numpy(lat), torch.from_numpy(lon)).numpy()
    rel = f / np.maximum(np.abs(f[:, :1]), 1e-12)
    scale = np.maximum(sim.std(1, keepdims=True), 1e-3)
    logit = (sim - sim[:, :1]) / scale
    w = np.exp(logit - logit.max(1, keepdims=True))
    margin = sim[:, 0] - sim[:, 1] if sim.shape[1] > 1 else np.zeros(len(sim))
    return PoECandidates(lat=lat, lon=lon, log_density=np.log(np.clip(rel, DENSITY_FLOOR, 1.0)),
                         nb_weight=w / w.sum(1, keepdims=True), s_top=sim[:, 0], s_margin=margin,
                         s_mean=sim.mean(1), s_std=sim.std(1))


def concat_candidates(parts: list[PoECandidates]) -> PoECandidates:
    """The rows of several candidate sets (the same top_k) as one."""
    return PoECandidates(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(PoECandidates)))


def poe_kernel(c: PoECandidates, bandwidth_km: float) -> np.ndarray:
    """K(candidate) in [0, 1], (N, k + 1): the similarity-weighted Gaussian kernel density of the neighbours."""
    out = np.empty(c.lat.shape)
    nb = slice(1, None)
    for s in range(0, len(out), POE_ROW_CHUNK):
        r = slice(s, s + POE_ROW_CHUNK)
        d = np.asarray(haversine_km(c.lat[r][:, :, None], c.lon[r][:, :, None], c.lat[r][:, None, nb],
                                    c.lon[r][:, None, nb]))
        out[r] = (np.exp(-0.5 * (d / bandwidth_km) ** 2) * c.nb_weight[r][:, None, :]).sum(2)
    return out


def _from_best(c: PoECandidates) -> np.ndarray:
    """(N, up to CONSENSUS_TOP - 1) km from the most similar neighbour to neighbours 2..CONSENSUS_TOP."""
    top = slice(2, CONSENSUS_TOP + 1)
    return np.asarray(haversine_km(c.lat[:, top], c.lon[:, top], c.lat[:, 1:2], c.lon[:, 1:2]))


def consensus_count(c: PoECandidates) -> np.ndarray:
    """(N,) how many of neighbours 2..CONSENSUS_TOP lie within CONSENSUS_KM of the most similar one."""
    return (_from_best(c) <= CONSENSUS_KM).sum(1)


# the learned novelty signal: P(the most similar neighbour is within NOVELTY_RIGHT_KM of the truth), a logistic
# regression on these per-row features (each row's own candidates only: one photo, one answer)
NOVELTY_RIGHT_KM = 25.0
NOVELTY_NEAR_KM = 100.0  # the looser agreement counts
NOVELTY_FEATURES = ("s_top", "s_margin", "s_top - s_mean", "s_std", "log1p(km from the answer to the best match)",
                    "log density at the best match", "neighbours agreeing within CONSENSUS_KM",
                    "neighbours agreeing within NOVELTY_NEAR_KM", "neighbours within NOVELTY_NEAR_KM of the answer")
NOVELTY_MIN_CLASS = 10  # validation rows needed of each outcome (best match right and wrong) to fit it


def novelty_features(c: PoECandidates) -> np.ndarray:
    """(N, len(NOVELTY_FEATURES)) per-row features of the candidates (`NOVELTY_FEATURES`)."""
    top = slice(1, CONSENSUS_TOP + 1)
    d_best = _from_best(c)
    d_answer = np.asarray(haversine_km(c.lat[:, top], c.lon[:, top], c.lat[:, :1], c.lon[:, :1]))
    return np.column_stack([c.s_top, c.s_margin, c.s_top - c.s_mean, c.s_std, np.log1p(d_answer[:, 0]),
                            c.log_density[:, 1], (d_best <= CONSENSUS_KM).sum(1), (d_best <= NOVELTY_NEAR_KM).sum(1),
                            (d_answer <= NOVELTY_NEAR_KM).sum(1)]).astype(np.float64)


def fit_novelty(c: PoECandidates, lat: np.ndarray, lon: np.ndarray, features: np.ndarray | None = None
                ) -> LogisticModel | None:
    """The learned P(best match within NOVELTY_RIGHT_KM of the truth (lat, lon)) on `novelty_features(c)` (or the
    `features` given, the same); None when the rows hold fewer than NOVELTY_MIN_CLASS of either outcome (or no
    neighbour)."""
    if c.lat.shape[1] < 2:
        return None
    right = (distances_km(c.lat[:, 1], c.lon[:, 1], lat, lon) <= NOVELTY_RIGHT_KM).astype(np.float64)
    if min(right.sum(), len(right) - right.sum()) < NOVELTY_MIN_CLASS:
        return None
    return LogisticModel.fit(novelty_features(c) if features is None else features, right)


def consensus_override(c: PoECandidates, best: np.ndarray, consensus: float, consensus_density: float,
                       count: np.ndarray | None = None) -> np.ndarray:
    """The chosen candidate index per image, with the most similar neighbour (1) where the gallery agrees with
    itself (`consensus` neighbours or more) and LocDiff's density allows it; consensus 0 is off."""
    if consensus <= 0 or c.lat.shape[1] < 2:
        return best
    count = consensus_count(c) if count is None else count
    on = (count >= consensus) & (c.log_density[:, 1] >= np.log(max(consensus_density, 1e-300)) - 1e-12)
    return np.where(on, 1, best)


def distinct_override(c: PoECandidates, best: np.ndarray, margin: float) -> np.ndarray:
    """The chosen candidate index per image, with the most similar neighbour (1) where its similarity exceeds
    the second's by at least `margin` (inf: off)."""
    if not np.isfinite(margin) or c.lat.shape[1] < 2:
        return best
    return np.where(c.s_margin >= margin, 1, best)


def poe_select(c: PoECandidates, *, bandwidth_km: float, strength: float, threshold: float, slope: float,
               floor: float, core: float, snap_km: float = 0.0, consensus: float = 0.0,
               consensus_density: float = 1.0, margin: float = float("inf"), novelty: LogisticModel | None = None,
               kernel: np.ndarray | None = None, count: np.ndarray | None = None, signal: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, used_neighbour) per image: the candidate of highest product-of-experts score (above), a
    chosen neighbour replaced by the most similar neighbour within `snap_km` of it, then the consensus and the
    distinct-match overrides; strength 0 is LocDiff's answer, strength inf top-1 retrieval. The novelty
    floor's signal is s_top, or the logit of `novelty` on `novelty_features` (threshold and slope on that
    scale). kernel, count and signal: the precomputed kernel, consensus count and signal, when known."""
    rows = np.arange(len(c.lat))
    if np.isinf(strength):  # the gallery's factor alone at bandwidth -> 0: the most similar neighbour
        return c.lat[:, 1], c.lon[:, 1], np.ones(len(rows), bool)
    k = (1 - core) * poe_kernel(c, bandwidth_km) + core * poe_kernel(c, CORE_KM) if kernel is None else kernel
    if signal is None:
        signal = c.s_top if novelty is None else novelty.logit(novelty_features(c))
    gate = 1.0 / (1.0 + np.exp(-np.clip((threshold - signal) / max(slope, 1e-9), -60, 60)))[:, None]
    pi = floor + (1.0 - floor) * gate  # the novelty floor per row
    score = c.log_density + strength * np.log(np.maximum((1 - pi) * k + pi, 1e-300))
    best = score.argmax(1)
    if snap_km > 0:
        d = np.asarray(haversine_km(c.lat[:, 1:], c.lon[:, 1:], c.lat[rows, best][:, None],
                                    c.lon[rows, best][:, None]))
        near = np.where(d <= snap_km, c.nb_weight, -1.0).argmax(1) + 1  # weights fall with the similarity rank
        best = np.where(best > 0, near, 0)
    best = consensus_override(c, best, consensus, consensus_density, count)
    best = distinct_override(c, best, margin)
    return c.lat[rows, best], c.lon[rows, best], best > 0


def choose_poe(c: PoECandidates, lat: np.ndarray, lon: np.ndarray, groups: np.ndarray | None = None, *,
               z: float = 2.0, tolerance: float = 0.5, learned_novelty: bool = True) -> dict[str, Any]:
    """The product-of-experts parameters that place the validation images best without losing anywhere.

    For every validation group (e.g. val and val_unseen) and threshold, the reference accuracy is the better
    of LocDiff's answer (strength 0) and top-1 retrieval (strength inf). A setting's shortfall is its largest
    loss against that reference (points) beyond `tolerance`; the setting with the smallest shortfall wins.
    Among equal shortfalls, the score decides: the sum of the accuracies at all thresholds (%), averaged over
    the groups so that held-out regions weigh as much as the iid rows; a grid setting beats a reference
    (LocDiff or retrieval, whichever scores higher, LocDiff on a tie) on score only when it gains more than
    `z` standard errors of the paired per-image difference, as `choose_blend` does. The whole search (grid,
    snap, overrides) runs with s_top as the novelty signal, then (with `learned_novelty`) with the learned one
    (`fit_novelty` on these rows), which is kept only when its final setting beats the first's on the key.
    Returns the parameters (`novelty`: the fitted LogisticModel, or None for s_top), their score and shortfall,
    LocDiff's and retrieval's scores."""
    n = len(lat)
    gid = np.zeros(n, np.int64) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    sizes = np.bincount(gid).astype(np.float64) if n else np.ones(1)
    weight = 1.0 / (len(sizes) * sizes[gid])  # per image: the groups' scores averaged

    def hits(prm: dict[str, Any], kern: np.ndarray | None = None, count: np.ndarray | None = None,
             signal: np.ndarray | None = None) -> np.ndarray:
        """(N, thresholds) 0/1: each image placed within each threshold."""
        plat, plon, _ = poe_select(c, **prm, kernel=kern, count=count, signal=signal)
        return hits_within(plat, plon, lat, lon)

    def by_group(h: np.ndarray) -> np.ndarray:
        """(groups, thresholds) accuracy in %."""
        return 100.0 * np.stack([h[gid == g].mean(0) for g in range(len(sizes))])

    locdiff = {"bandwidth_km": POE_BANDWIDTHS_KM[0], "strength": 0.0, "threshold": float("inf"), "slope": 1.0,
               "floor": 1.0, "core": 0.0, "snap_km": 0.0, "consensus": 0.0, "consensus_density": 1.0,
               "margin": float("inf"), "novelty": None}
    retrieval = {**locdiff, "strength": float("inf"), "threshold": float("-inf"), "floor": 0.0}
    if not n:
        return {**locdiff, "score": 0.0, "shortfall": 0.0, "locdiff_score": 0.0, "retrieval_score": 0.0}
    h_loc, h_ret = hits(locdiff), hits(retrieval)
    reference = np.maximum(by_group(h_loc), by_group(h_ret))
    s_loc, s_ret = 100.0 * float(weight @ h_loc.sum(1)), 100.0 * float(weight @ h_ret.sum(1))
    base = (h_loc if s_loc >= s_ret else h_ret).sum(1)

    def shortfall(h: np.ndarray) -> float:
        return round(max(0.0, float(np.max(reference - by_group(h))) - tolerance), 6)

    def gain(h: np.ndarray) -> float:
        """The score gain over the better reference when it exceeds z standard errors, else min(gain, 0)."""
        d = h.sum(1) - base
        g = float(weight @ d)
        dev = d - (np.bincount(gid, weights=d) / sizes)[gid]
        se = float(np.sqrt(np.sum((weight * dev) ** 2) * n / max(n - 1, 1)))
        return g if g > z * se else min(g, 0.0)

    (start, start_h), (other, other_h) = ((locdiff, h_loc), (retrieval, h_ret))[::1 if s_loc >= s_ret else -1]
    start_key = (shortfall(start_h), 0.0)
    if (key := (shortfall(other_h), -gain(other_h))) < start_key:  # the other reference: only if it loses less
        start, start_key = other, key
    sharp = poe_kernel(c, CORE_KM)
    count = consensus_count(c)

    # the novelty floor's signals: s_top, then the learned one, kept only where its whole search ends ahead
    signals: list[tuple[LogisticModel | None, np.ndarray]] = [(None, c.s_top)]
    features = novelty_features(c) if learned_novelty else None
    learned = fit_novelty(c, lat, lon, features) if learned_novelty else None
    if learned is not None:
        signals.append((learned, learned.logit(features)))
    states = [(start, start_key) for _ in signals]  # per signal: the setting kept so far and its key

    def consider(i: int, prm: dict[str, Any], kern: np.ndarray, cnt: np.ndarray | None = None) -> None:
        """Keep `prm` for signal i when it beats that signal's best so far on the key."""
        hm = hits(prm, kern, cnt, signals[i][1])
        if (key := (shortfall(hm), -gain(hm))) < states[i][1]:
            states[i] = (prm, key)

    ranges = []  # per signal: the thresholds tried and the slopes' scale (quantiles of the signal)
    for _, signal in signals:
        q10, q90 = np.quantile(signal, [0.1, 0.9])
        ranges.append((np.quantile(signal, POE_THRESHOLD_QUANTILES), max(float(q90 - q10), 1e-6)))
    for h, core in ((h, core) for h in POE_BANDWIDTHS_KM for core in POE_CORES):
        kern = (1 - core) * poe_kernel(c, h) + core * sharp  # once per kernel, for every signal
        for i, (model, _) in enumerate(signals):
            cuts, spread = ranges[i]
            for t in cuts:
                for sl in POE_SLOPES:
                    for a in POE_STRENGTHS:
                        for fl in POE_FLOORS:
                            consider(i, {**locdiff, "bandwidth_km": h, "strength": a, "threshold": float(t),
                                         "slope": sl * spread, "floor": fl, "core": core, "novelty": model}, kern)
    finals = []
    for i, (_, signal) in enumerate(signals):  # then the snap radius and the two overrides, per signal
        best, best_key = states[i]
        if 0 < best["strength"] < float("inf"):  # a product was chosen: then the snap radius, on the same key
            for snap in POE_SNAPS_KM[1:]:
                hm = hits({**best, "snap_km": snap}, signal=signal)
                key = (shortfall(hm), -float(weight @ (hm.sum(1) - base)))
                if key < best_key:
                    best, best_key = {**best, "snap_km": snap}, key
            states[i] = (best, best_key)
        if best["strength"] < float("inf"):  # the gallery's own agreement overrides where it knows the place
            kern = (1 - best["core"]) * poe_kernel(c, best["bandwidth_km"]) + best["core"] * sharp
            for m in POE_CONSENSUS:
                for rho in POE_CONSENSUS_DENSITIES:
                    consider(i, {**states[i][0], "consensus": float(m), "consensus_density": rho}, kern, count)
            for margin in POE_MARGINS:  # then a near-duplicate in the gallery, on the same key
                consider(i, {**states[i][0], "margin": margin}, kern, count)
        final = hits(states[i][0], signal=signal)
        finals.append(((shortfall(final), -gain(final)), final))
    pick = 1 if len(signals) > 1 and finals[1][0] < finals[0][0] and states[1][0]["novelty"] is not None else 0
    best, chosen = states[pick][0], finals[pick][1]
    return {**best, "score": 100.0 * float(weight @ chosen.sum(1)), "shortfall": shortfall(chosen),
            "locdiff_score": s_loc, "retrieval_score": s_ret}
