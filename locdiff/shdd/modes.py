"""The modes of an SHDD density and the probability mass around them (top-k answers, confidence).

The density of a code c is taken as p(y) proportional to max(f_c(y) - c_0 Y_0, 0): f_c without its
l = 0 term (a constant the decoder ignores and the SHDD-KL objective leaves free), clipped at zero (the
truncated series rings below zero far from its peaks), normalised over the sphere. For the mean of K
sampled codes, f_c is the average of K kernels peaked at the samples, so p is a kernel density of the
samples and the mass around a mode is about the share of samples there.

`density_modes` finds the distinct local maxima of a smoother version of p, p4 (the Gaussian taper of
width L / MODE_SMOOTHING = L/4 in degree instead of L/3), and their probabilities under p:
1. p4 and p on the decoder's equiangular grid (`decode.grid_values`), cell areas proportional to
   sin(colatitude);
2. every grid node climbs to its largest 3x3 neighbour of p4 (longitude wraps; ties go to the smaller
   index, so the climb ends) until it reaches a local maximum: the maximum's *basin*;
3. a mode's probability is the mass of p in its basin (over the mass of the whole sphere);
4. the heaviest basins' maxima are refined by Newton ascent (`decode.refine`) on p4's code, maxima closer
   than `min_separation_km` are merged (their masses added to the heavier one), and the top k are
   returned, heaviest first. Basins are disjoint, so the probabilities sum to at most 1.
On the validation two-place probes of all three benchmark worlds, p4's modes named both places of a photo
more often than p's (docs/results.md); the mass stays p's, the confidence score saved calibrations map.

`mass_within` is the mass of p within a radius of given points: the raw score the confidence is
calibrated from (locdiff.calibration). Radii below the grid spacing are raised to it (the grid cannot
resolve less; the calibration maps the score to the observed frequency anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from locdiff.geo import EARTH_RADIUS_KM, haversine_km, latlon_to_unit, unit_to_latlon
from locdiff.shdd.codec import SHDD
from locdiff.shdd.decode import gaussian_taper, grid_values, refine
from locdiff.shdd.grid import equiangular_grid

# The density is smoothed by a Gaussian taper of width L / SMOOTHING in degree: the sharp truncation at
# L rings (Gibbs), and the positive part of that ringing would otherwise hold most of the mass at large L.
SMOOTHING = 3.0
# The taper the modes are found and placed on (`density_modes`; chosen on validation probes, module docstring)
MODE_SMOOTHING = 4.0


@dataclass
class DensityModes:
    """Per code (N rows), the top k modes, heaviest first; slots without a mode hold NaN."""

    lat: np.ndarray  # (N, k) degrees
    lon: np.ndarray  # (N, k) degrees
    probability: np.ndarray  # (N, k) share of the density's mass in the mode's basin

    def count(self) -> np.ndarray:
        """Modes found per row (N,)."""
        return np.isfinite(self.probability).sum(1)


@lru_cache(maxsize=8)
def _neighbours(n_lat: int, n_lon: int) -> torch.Tensor:
    """(9, n_lat * n_lon) flat indices of each node's 3x3 neighbourhood (itself included): longitude
    wraps, latitude is clamped at the polar rows."""
    i = torch.arange(n_lat)[:, None].expand(n_lat, n_lon)
    j = torch.arange(n_lon)[None, :].expand(n_lat, n_lon)
    out = []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            out.append(((i + di).clamp(0, n_lat - 1) * n_lon + (j + dj) % n_lon).reshape(-1))
    return torch.stack(out)


@lru_cache(maxsize=8)
def _cell_weights(degree: int) -> torch.Tensor:
    """(n_lat * n_lon,) float64 solid angle of each decoder-grid cell (they sum to 4 pi)."""
    n_lat, n_lon = equiangular_grid(degree)
    theta = (torch.arange(n_lat, dtype=torch.float64) + 0.5) * math.pi / n_lat
    w = torch.sin(theta) * (math.pi / n_lat) * (2 * math.pi / n_lon)
    w = w * (4 * math.pi / (w.sum() * n_lon))  # exact total: the midpoint rule is off by O(1/n^2)
    return w[:, None].expand(n_lat, n_lon).reshape(-1).contiguous()


@lru_cache(maxsize=16)
def _taper(degree: int, smoothing: float = SMOOTHING) -> torch.Tensor:
    """(D,) Gaussian damping exp(-l(l+1) / (2 (L/smoothing)^2)) per coefficient, l = 0 set to 0."""
    w = gaussian_taper(degree, smoothing).clone()
    w[0] = 0.0
    return w


def _tapered(coeffs: torch.Tensor, smoothing: float = SMOOTHING) -> torch.Tensor:
    """(B, D) float64 code damped to width L / smoothing, without its l = 0 term."""
    return coeffs.to(torch.float64) * _taper(SHDD.from_dim(coeffs.shape[1]).degree, smoothing)


def _density_grid(tapered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, n) f of a tapered code (`_tapered`) on the grid, node latitudes and longitudes (n,)."""
    values, glat, glon = grid_values(tapered)
    b, n_lat, n_lon = values.shape
    lat = glat[:, None].expand(n_lat, n_lon).reshape(-1)
    lon = glon[None, :].expand(n_lat, n_lon).reshape(-1)
    return values.reshape(b, -1), lat, lon


def _basins(values: torch.Tensor, n_lat: int, n_lon: int) -> torch.Tensor:
    """(B, n) the flat index of the local maximum each grid node climbs to.

    Nodes are ordered by value, ties broken by index (a tiny index-proportional offset), so every climb
    strictly ascends one total order and ends; pointer jumping then halves every path per round."""
    b, n = values.shape
    nb = _neighbours(n_lat, n_lon).to(values.device)  # (9, n)
    scale = values.abs().amax(1, keepdim=True).clamp_min(1e-300)
    key = values - scale * (1e-9 / n) * torch.arange(n, dtype=values.dtype, device=values.device)
    best, parent = key, torch.arange(n, device=values.device).expand(b, n)
    for t in range(nb.shape[0]):  # running maximum over the 9 neighbours (contiguous passes)
        v = key[:, nb[t]]
        up = v > best
        best, parent = torch.where(up, v, best), torch.where(up, nb[t], parent)
    for _ in range(n):  # never more than n rounds; in practice about log2(longest path)
        nxt = parent.gather(1, parent)
        if torch.equal(nxt, parent):
            break
        parent = nxt
    return parent


@torch.no_grad()
def density_modes(coeffs: torch.Tensor | np.ndarray, top_k: int = 5, *, min_separation_km: float = 100.0,
                  min_probability: float = 1e-3, smoothing: float = MODE_SMOOTHING,
                  batch_size: int = 64) -> DensityModes:
    """The k heaviest distinct modes of the density of each code (see the module docstring).

    Args:
        coeffs: (N, D) raw SHDD codes (e.g. the mean of the sampled codes).
        top_k: modes per code.
        min_separation_km: modes closer than this are one mode.
        min_probability: lighter modes are left out (NaN slots).
        smoothing: the modes are found and placed on the code tapered to width L / smoothing.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    if not (math.isfinite(smoothing) and smoothing > 0):
        raise ValueError(f"smoothing must be a finite number > 0; got {smoothing}")
    coeffs = torch.as_tensor(coeffs)
    if coeffs.dim() != 2:
        raise ValueError(f"coeffs must be (N, D); got shape {tuple(coeffs.shape)}")
    degree = SHDD.from_dim(coeffs.shape[1]).degree
    n_lat, n_lon = equiangular_grid(degree)
    weights = _cell_weights(degree)
    out_lat, out_lon, out_p = [], [], []
    for s in range(0, coeffs.shape[0], batch_size):
        c = _tapered(coeffs[s:s + batch_size], float(smoothing))  # the modes are found and placed on it
        values, glat, glon = _density_grid(c)
        b, n = values.shape
        mass = _density_grid(_tapered(coeffs[s:s + batch_size]))[0].clamp_min(0) * weights  # mass_within's
        total = mass.sum(1, keepdim=True).clamp_min(1e-300)
        basin_mass = torch.zeros_like(mass).scatter_add_(1, _basins(values, n_lat, n_lon), mass)
        m = min(n, 4 * top_k + 4)  # candidates: merging folds some into heavier ones
        cand_mass, cand = basin_mass.topk(m, dim=1)
        prob = (cand_mass / total).numpy()
        prob[prob < min_probability] = np.nan
        # merge on the grid nodes, refine the k kept maxima on the smoothed code, merge again
        lat, lon, prob = _merge(glat[cand].numpy(), glon[cand].numpy(), prob, top_k, min_separation_km)
        rows, cols = np.nonzero(np.isfinite(prob))
        if rows.size:
            # in float64 (c's dtype): in float32 a mode moved by up to ~400 m with top_k, the other rows of
            # the batch and their order (rounding that depends on the number of points refined at once);
            # float64 leaves under 1e-8 degrees, for 1.3-1.6x this step's time (L = 32 and 64, 256 codes)
            start = latlon_to_unit(torch.from_numpy(lat[rows, cols]), torch.from_numpy(lon[rows, cols]))
            refined, _ = refine(c[torch.from_numpy(rows)], start, degree)
            la, lo = unit_to_latlon(refined)
            lat[rows, cols], lon[rows, cols] = la.numpy(), lo.numpy()
            lat, lon, prob = _merge(lat, lon, prob, top_k, min_separation_km)
        out_lat.append(lat)
        out_lon.append(lon)
        out_p.append(prob)
    if not out_lat:
        empty = np.zeros((0, top_k))
        return DensityModes(empty, empty.copy(), empty.copy())
    return DensityModes(np.concatenate(out_lat), np.concatenate(out_lon), np.concatenate(out_p))


def _merge(lat: np.ndarray, lon: np.ndarray, prob: np.ndarray, k: int, min_km: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy merge of candidates (heaviest first) closer than min_km; the top k, heaviest first."""
    b, m = prob.shape
    keep_lat = np.full((b, m), np.nan)
    keep_lon = np.full((b, m), np.nan)
    keep_p = np.full((b, m), np.nan)
    used = np.zeros(b, dtype=int)
    rows = np.arange(b)
    for j in range(m):
        ok = np.isfinite(prob[:, j])
        if not ok.any():
            continue
        d = haversine_km(lat[:, j:j + 1], lon[:, j:j + 1], keep_lat, keep_lon)  # (b, m), NaN for empty slots
        d = np.where(np.isfinite(d), d, np.inf)
        near = d.argmin(1)
        close = ok & (d[rows, near] < min_km)
        keep_p[rows[close], near[close]] += prob[close, j]
        new = ok & ~close
        slot = used[new]
        keep_lat[rows[new], slot] = lat[new, j]
        keep_lon[rows[new], slot] = lon[new, j]
        keep_p[rows[new], slot] = prob[new, j]
        used[new] += 1
    order = np.argsort(-np.nan_to_num(keep_p, nan=-1.0), axis=1, kind="stable")[:, :k]
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    la, lo, pr = take(keep_lat), take(keep_lon), take(keep_p)
    if pr.shape[1] < k:  # fewer candidates than k (a tiny grid)
        pad = np.full((b, k - pr.shape[1]), np.nan)
        la, lo, pr = (np.concatenate([a, pad], 1) for a in (la, lo, pr))
    return la, lo, pr


@torch.no_grad()
def mass_within(coeffs: torch.Tensor | np.ndarray, lat: np.ndarray, lon: np.ndarray, radius_km: float, *,
                batch_size: int = 256) -> np.ndarray:
    """(N,) share of each code's density within radius_km of its point (lat[i], lon[i]); radii below
    the decoder grid's spacing (pi R / (2L + 2)) are raised to it."""
    coeffs = torch.as_tensor(coeffs)
    degree = SHDD.from_dim(coeffs.shape[1]).degree
    n_lat, _ = equiangular_grid(degree)
    radius = max(float(radius_km), math.pi * EARTH_RADIUS_KM / n_lat)
    weights = _cell_weights(degree)
    lat = np.asarray(lat, np.float64)
    lon = np.asarray(lon, np.float64)
    out = []
    for s in range(0, coeffs.shape[0], batch_size):
        values, glat, glon = _density_grid(_tapered(coeffs[s:s + batch_size]))
        mass = values.clamp_min(0) * weights
        d = haversine_km(torch.from_numpy(lat[s:s + batch_size, None]), torch.from_numpy(lon[s:s + batch_size, None]),
                         glat[None], glon[None])
        inside = (mass * (d <= radius)).sum(1)
        out.append((inside / mass.sum(1).clamp_min(1e-300)).numpy())
    return np.concatenate(out) if out else np.zeros(0)
