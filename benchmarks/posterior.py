"""What sampling the posterior adds over the mean code (issue 19, item 4), shared by bench_sampling and
bench_model.

- **Two-place probe.** Probe "photos" made to look like two places at least `PROBE_MIN_KM` apart (each
  benchmark world's `two_place_probe`: the equal-weight mix of two places' noise-free embeddings plus the
  world's noise). A method *names both places* when one of its top-2 answers lies within `radius_km`
  (`NAME_RADIUS_KM` by default, a parameter of every function and of the benchmarks' command lines) of one
  place and the other within it of the other place (`names_both`). The top-2 answers are
  - *mean code*: the two heaviest modes of the density of a code (locdiff.shdd.modes.density_modes), for
    the one-step code (K = 1, S = 1: the network's estimate of E[code | image]) and for the mean of the K
    sampled codes (a kernel density of the samples);
  - *samples*: the centres of the two largest clusters of the K decoded samples (`sample_clusters`);
  - *retrieval*: the nearest gallery neighbour and the nearest one more than `radius_km` from it
    (`retrieval_two_places`).
- **Calibration** (`calibration`). For an answer, the confidence that the truth lies within R (the run's
  `predict.confidence_radius_km`, raised to the decoder grid's spacing as locdiff.shdd.modes.mass_within
  does) is either the share of the K samples within R of it (*samples*) or the mass of the code's density
  within R of it (*mean code*). Reported: the ECE of the raw score and of its 2-fold cross-fitted isotonic
  map (locdiff.calibration), and the NLL of the truth: -ln q, where q is the predicted probability that the
  photo lies within R of where it was really taken (share of samples, or mass of the density, there),
  mixed with `UNIFORM_SHARE` of the uniform distribution on the sphere so that a miss costs a finite amount.
- **Accuracy without the gallery**: LocDiff's own answers (no retrieval), at 1 and 25 km among the others.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locdiff import shdd
from locdiff.calibration import cross_fitted, expected_calibration_error
from locdiff.geo import EARTH_RADIUS_KM, haversine_km
from locdiff.metrics import ACCURACY_KEYS as METRIC_ACCURACY_KEYS
from locdiff.metrics import geo_metrics
from locdiff.model.config import Config
from locdiff.model.predict import sample_codes
from locdiff.shdd.grid import equiangular_grid
from locdiff.shdd.modes import density_modes, mass_within
from locdiff.worlds import cuebench, realbench, synth
from locdiff.worlds.realbench import PROBE_MIN_KM, TwoPlaceProbe

NAME_RADIUS_KM = 750.0  # a top-2 answer names a place when it lies within this of it
UNIFORM_SHARE = 0.01  # share of the uniform distribution mixed into the NLL's predicted probability
SAMPLED = (16, 20)  # the sampled setting (K samples, S DDIM steps) the probe and the calibration use
RETRIEVED = 64  # gallery neighbours searched for retrieval's two best distinct places
ACCURACY_KEYS = (*METRIC_ACCURACY_KEYS, "median_km")

__all__ = ["probe_maker", "PROBE_MIN_KM", "NAME_RADIUS_KM", "UNIFORM_SHARE", "SAMPLED", "Draws", "draw", "names_both",
           "names_one", "sample_clusters", "retrieval_two_places", "probe_scores", "top2_answers", "run_probe",
           "calibration", "confidence_radius", "run_calibration"]


# ---------------------------------------------------------------------------------------------------------
# Scoring the top-2 answers


def _within(lat: np.ndarray, lon: np.ndarray, plat: np.ndarray, plon: np.ndarray, radius_km: float) -> np.ndarray:
    """(N, k) whether answer j of row i lies within radius_km of the row's place (NaN answers: False)."""
    d = np.asarray(haversine_km(lat, lon, np.asarray(plat, np.float64)[:, None], np.asarray(plon, np.float64)[:, None]))
    return np.nan_to_num(d, nan=np.inf) <= radius_km


def names_both(lat: Any, lon: Any, a_lat: Any, a_lon: Any, b_lat: Any, b_lon: Any,
               radius_km: float = NAME_RADIUS_KM) -> np.ndarray:
    """(N,) bool: the first two answers of each row (lat, lon of shape (N, k >= 2), best first, NaN for a
    missing answer) name both places: one is within radius_km of place a and the other within it of b."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if lat.ndim != 2 or lat.shape != lon.shape:
        raise ValueError(f"answers must be (N, k) arrays of the same shape; got {lat.shape} and {lon.shape}")
    if lat.shape[1] < 2:
        return np.zeros(len(lat), bool)
    near_a = _within(lat[:, :2], lon[:, :2], a_lat, a_lon, radius_km)
    near_b = _within(lat[:, :2], lon[:, :2], b_lat, b_lon, radius_km)
    return (near_a[:, 0] & near_b[:, 1]) | (near_a[:, 1] & near_b[:, 0])


def names_one(lat: Any, lon: Any, a_lat: Any, a_lon: Any, b_lat: Any, b_lon: Any,
              radius_km: float = NAME_RADIUS_KM) -> np.ndarray:
    """(N,) bool: at least one of the first two answers is within radius_km of place a or of place b."""
    lat, lon = np.asarray(lat, np.float64)[:, :2], np.asarray(lon, np.float64)[:, :2]
    return (_within(lat, lon, a_lat, a_lon, radius_km) | _within(lat, lon, b_lat, b_lon, radius_km)).any(1)


def sample_clusters(lat: Any, lon: Any, radius_km: float = NAME_RADIUS_KM, top_k: int = 2
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top_k clusters of each row's K decoded samples (lat, lon of shape (N, K)), greedily: the sample
    with the most not-yet-clustered samples within radius_km (itself included; ties to the first) is a
    cluster's centre, and those samples its members; repeat on the rest. Returns the centres' lat, lon and
    the members' share of K, each (N, top_k), largest first; NaN where fewer clusters exist."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    n, k = lat.shape
    near = np.asarray(haversine_km(lat[:, :, None], lon[:, :, None], lat[:, None, :], lon[:, None, :])) <= radius_km
    free = np.ones((n, k), bool)
    rows = np.arange(n)
    out = [np.full((n, top_k), np.nan) for _ in range(3)]
    for j in range(top_k):
        support = np.where(free, (near & free[:, None, :]).sum(2), -1)  # (N, K)
        best = support.argmax(1)
        ok = support[rows, best] > 0
        out[0][ok, j], out[1][ok, j] = lat[rows[ok], best[ok]], lon[rows[ok], best[ok]]
        out[2][ok, j] = support[rows[ok], best[ok]] / k
        free[ok] &= ~near[rows[ok], best[ok]]
    return out[0], out[1], out[2]


def retrieval_two_places(lat: Any, lon: Any, radius_km: float = NAME_RADIUS_KM) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval's two best distinct places from each row's neighbours (lat, lon of shape (N, k), nearest
    first): the nearest, and the nearest one more than radius_km from it (NaN when none is). (N, 2) each."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    far = np.asarray(haversine_km(lat, lon, lat[:, :1], lon[:, :1])) > radius_km  # (N, k)
    rows = np.arange(len(lat))
    second = far.argmax(1)
    has = far[rows, second]
    s_lat = np.where(has, lat[rows, second], np.nan)
    s_lon = np.where(has, lon[rows, second], np.nan)
    return np.stack([lat[:, 0], s_lat], 1), np.stack([lon[:, 0], s_lon], 1)


# ---------------------------------------------------------------------------------------------------------
# Samples


@dataclass
class Draws:
    """K samples per image: the mean of the raw SHDD codes (N, D) and each sample's decoded place (N, K)."""

    mean_code: torch.Tensor
    lat: np.ndarray
    lon: np.ndarray


@torch.no_grad()
def draw(model: torch.nn.Module, emb: np.ndarray, config: Config, *, samples: int, steps: int, seed: int = 0,
         batch_size: int | None = None) -> Draws:
    """K DDIM samples of S steps per embedding (locdiff.model.predict.sample_codes, one generator seeded
    with `seed`), each decoded as predict decodes its votes (the grid maximum and one Newton step)."""
    pc = config.predict
    bs = max(1, batch_size or pc.batch_size)
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    emb_t = torch.as_tensor(np.array(emb, dtype=np.float32))
    means, lats, lons = [], [], []
    for i in range(0, len(emb_t), bs):
        z = sample_codes(model, emb_t[i:i + bs], config, samples=samples, steps=steps, generator=g)
        codes = shdd.SHDD(config.shdd.degree).from_z(z.float()).cpu()
        la, lo, _ = shdd.decode(codes, candidates=1, iterations=1, smoothing=pc.decode_smoothing)
        means.append(codes.mean(1))
        lats.append(la.double().numpy())
        lons.append(lo.double().numpy())
    d = shdd.num_coefficients(config.shdd.degree)
    return Draws(torch.cat(means) if means else torch.zeros(0, d),
                 np.concatenate(lats) if lats else np.zeros((0, samples)),
                 np.concatenate(lons) if lons else np.zeros((0, samples)))


# ---------------------------------------------------------------------------------------------------------
# The probe's table


def probe_maker(folder: str | Path) -> Callable[[int, int], TwoPlaceProbe] | None:
    """The two-place probes of the benchmark written into a folder, as `make(n, seed)`: the world is
    rebuilt from the folder's cuebench.json, realbench.json or synth.json (its recorded config); None when
    the folder has none of them."""
    folder = Path(folder)
    for name, build in (("cuebench", lambda c: (cuebench.CueWorld(cuebench.CueBenchConfig(**c)), cuebench)),
                        ("realbench", lambda c: (realbench.RealBenchWorld(realbench.RealBenchConfig(**c)), realbench)),
                        ("synth", lambda c: (synth.SynthWorld(synth.SynthConfig(**c)), synth))):
        path = folder / f"{name}.json"
        if path.is_file():
            config = json.loads(path.read_text())["config"]
            world, module = build({k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
            return lambda n, seed: module.two_place_probe(world, n, seed)
    return None


def probe_scores(answers: dict[str, tuple[np.ndarray, np.ndarray]], a_lat: Any, a_lon: Any, b_lat: Any,
                 b_lon: Any, radius_km: float = NAME_RADIUS_KM) -> list[dict[str, Any]]:
    """One row per method (name -> its top-2 answers' lat, lon (N, 2)): % of probes whose top-2 answers name
    both places, % that name at least one, % with a second answer at all."""
    rows = []
    for name, (lat, lon) in answers.items():
        lat = np.asarray(lat, np.float64)
        rows.append({"method": name, "probes": len(lat), "radius_km": radius_km,
                     "names_both_%": float(names_both(lat, lon, a_lat, a_lon, b_lat, b_lon, radius_km).mean() * 100),
                     "names_one_%": float(names_one(lat, lon, a_lat, a_lon, b_lat, b_lon, radius_km).mean() * 100),
                     "has_second_%": float(np.isfinite(lat[:, 1]).mean() * 100)})
    return rows


def top2_answers(one_step_code: torch.Tensor, sampled: Draws, retrieved_lat: np.ndarray, retrieved_lon: np.ndarray,
                 radius_km: float = NAME_RADIUS_KM) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The top-2 answers of every method the probe compares (module docstring); modes of one code closer
    than radius_km are one mode, as clusters are."""
    k, s = SAMPLED
    m1 = density_modes(one_step_code, 2, min_separation_km=radius_km)
    ms = density_modes(sampled.mean_code, 2, min_separation_km=radius_km)
    c_lat, c_lon, _ = sample_clusters(sampled.lat, sampled.lon, radius_km)
    r_lat, r_lon = retrieval_two_places(retrieved_lat, retrieved_lon, radius_km)
    return {"mean code, one-step (K=1 S=1)": (m1.lat, m1.lon),
            f"mean of samples' codes (K={k} S={s})": (ms.lat, ms.lon),
            f"sample clusters (K={k} S={s})": (c_lat, c_lon),
            "retrieval, two best distinct places": (r_lat, r_lon)}


# ---------------------------------------------------------------------------------------------------------
# Calibration


def confidence_radius(radius_km: float, degree: int) -> float:
    """The radius the confidences refer to: radius_km, raised to the decoder grid's spacing (as mass_within)."""
    n_lat, _ = equiangular_grid(degree)
    return max(float(radius_km), math.pi * EARTH_RADIUS_KM / n_lat)


def _share_within(lat: np.ndarray, lon: np.ndarray, plat: Any, plon: Any, radius_km: float) -> np.ndarray:
    return _within(lat, lon, plat, plon, radius_km).mean(1)


def _scores(conf: np.ndarray, at_truth: np.ndarray, hit: np.ndarray, radius_km: float,
            uniform_share: float) -> dict[str, float]:
    cap = (1 - math.cos(radius_km / EARTH_RADIUS_KM)) / 2  # share of the sphere within radius_km of a point
    q = (1 - uniform_share) * np.clip(at_truth, 0.0, 1.0) + uniform_share * cap
    return {"mean_confidence": float(np.mean(conf)), "hit_rate": float(np.mean(hit)),
            "ece_raw": expected_calibration_error(conf, hit),
            "ece_calibrated": expected_calibration_error(cross_fitted(conf, hit), hit),
            "nll_truth": float(np.mean(-np.log(q)))}


def calibration(answer_lat: Any, answer_lon: Any, truth_lat: Any, truth_lon: Any, *, code: torch.Tensor,
                radius_km: float, samples: Draws | None = None, uniform_share: float = UNIFORM_SHARE
                ) -> dict[str, dict[str, float]]:
    """ECE and NLL (module docstring) of the mean code's confidence and, given the samples the answer came
    from, of the samples' confidence, for answers (N,) of images whose truth is (truth_lat, truth_lon)."""
    r = confidence_radius(radius_km, shdd.SHDD.from_dim(code.shape[1]).degree)
    answer_lat, answer_lon, truth_lat, truth_lon = (np.array(v, np.float64) for v in (answer_lat, answer_lon,
                                                                                     truth_lat, truth_lon))
    hit = (np.asarray(haversine_km(answer_lat, answer_lon, truth_lat, truth_lon)) <= r).astype(np.float64)
    out = {"mean code": {"radius_km": r, **_scores(mass_within(code, answer_lat, answer_lon, r),
                                                   mass_within(code, truth_lat, truth_lon, r), hit, r, uniform_share)}}
    if samples is not None:
        out["samples"] = {"radius_km": r, **_scores(_share_within(samples.lat, samples.lon, answer_lat, answer_lon, r),
                                                    _share_within(samples.lat, samples.lon, truth_lat, truth_lon, r),
                                                    hit, r, uniform_share)}
    return out


# ---------------------------------------------------------------------------------------------------------
# What the two benchmark scripts run


def run_probe(model: torch.nn.Module, config: Config, probe: TwoPlaceProbe, gallery: Any, *,
              radius_km: float = NAME_RADIUS_KM, seed: int = 0) -> list[dict[str, Any]]:
    """The probe's table (`probe_scores`) for a trained denoiser, its config and a retrieval gallery
    (locdiff.gallery.Gallery over the training rows)."""
    k, s = SAMPLED
    one = draw(model, probe.embedding, config, samples=1, steps=1, seed=seed)
    sampled = draw(model, probe.embedding, config, samples=k, steps=s, seed=seed)
    _, idx = gallery.search(probe.embedding, RETRIEVED)
    answers = top2_answers(one.mean_code, sampled, gallery.lat[idx], gallery.lon[idx], radius_km)
    return probe_scores(answers, probe.a_lat, probe.a_lon, probe.b_lat, probe.b_lon, radius_km)


def run_calibration(model: torch.nn.Module, config: Config, emb: np.ndarray, lat: np.ndarray, lon: np.ndarray, *,
                    seed: int = 0) -> list[dict[str, Any]]:
    """For labelled images: per setting (one-step; K x S samples) and answer (the decoded mode of the mean
    code, as predict's "mean"; for the samples also the centre of their largest cluster within the support
    radius), the accuracy at 1 and 25 km without any gallery (of the mean code's mode only: a cluster's
    centre is decoded as a vote) and the calibration of each confidence (`calibration`) at the config's
    `predict.confidence_radius_km`."""
    pc = config.predict
    k, s = SAMPLED
    rows = []
    for label, kk, ss in (("one-step (K=1 S=1)", 1, 1), (f"sampled (K={k} S={s})", k, s)):
        d = draw(model, emb, config, samples=kk, steps=ss, seed=seed)
        m_lat, m_lon, _ = shdd.decode(d.mean_code, candidates=pc.decode_candidates, smoothing=pc.decode_smoothing)
        answers = {"mode of the mean code": (m_lat.double().numpy(), m_lon.double().numpy())}
        if kk > 1:
            c_lat, c_lon, _ = sample_clusters(d.lat, d.lon, pc.support_radius_km, top_k=1)
            answers["largest sample cluster"] = (c_lat[:, 0], c_lon[:, 0])
        for answer, (a_lat, a_lon) in answers.items():
            acc = geo_metrics(a_lat, a_lon, lat, lon)
            cal = calibration(a_lat, a_lon, lat, lon, code=d.mean_code, radius_km=pc.confidence_radius_km,
                              samples=d if kk > 1 else None)
            for conf, c in cal.items():
                # a cluster's centre is a sample decoded as a vote (to a few km): no 1 / 25-km figures
                fine = {key: acc[key] if answer == "mode of the mean code" else None for key in ACCURACY_KEYS[:2]}
                rows.append({"setting": label, "answer": answer, "confidence": conf, **fine, **c})
    return rows
