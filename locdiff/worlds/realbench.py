"""A realistic geolocation benchmark from a real learned geographic representation: `locdiff realbench --out DIR`.

The "image embedding" of a photo taken at x is built from the pretrained location encoder of GeoCLIP
(Vivanco Cepeda et al., NeurIPS 2023) that the `geoclip==1.3.0` package ships with its weights (512-d;
nothing is downloaded):

    e = normalise(G(x))                              G: GeoCLIP's LocationEncoder
    e = normalise((1 - w) e + w normalise(G(y)))     with probability `lookalike_frac`: y a far-away city at
                                                     a similar absolute latitude, w ~ U(lookalike_weight)
    e = normalise(e + noise / sqrt(512) * N(0, I_512))

so retrieval is neither trivial (noise, and look-alikes that pull an image towards another continent)
nor hopeless (the encoder's embeddings of nearby places are close).

Locations are drawn like a photo collection: the gazetteer's cities (locdiff.gazetteer) weighted by
population ** `population_exponent`; a photo is within 300 m of one of the city's landmarks (fixed points
a few km from its centre), a few km from the centre (`local_km`), tens of km (`regional_km`), up to
`landish_km` around a city drawn uniformly (land-ish scatter), or anywhere on the sphere, in the
proportions `location_mix`. `n_regions` held-out disks of `region_radius_km` around
population-weighted cities are kept out of train/val/test (no point within radius + `region_margin_km`);
the first third feed `val_unseen`, the rest `test_unseen`. The `im2gps3k` and `yfcc26k` splits use the
real locations of those public test sets (locdiff/testsets/locations.npz; YFCC26k subsampled to
`n_yfcc`, the same subsample for every seed).

Everything is a function of the seed (a "world" seed for the held-out regions, a seed per split), so the
same seed gives byte-identical tables. See README "The realistic benchmark" for what it is not.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from locdiff.errors import UserError
from locdiff.gazetteer import cities
from locdiff.geo import destination, haversine_km, near_any, unit_to_latlon
from locdiff.io import json_text, write_embeddings, write_file_atomic
from locdiff.runs import load_state
from locdiff.schema import check_ranges, setting
from locdiff.tables import MAX_GENERATED_ROWS, EmbeddingTable

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "val_unseen", "test", "test_unseen", "im2gps3k", "yfcc26k")
TESTSETS = Path(__file__).resolve().parents[1] / "testsets" / "locations.npz"
YFCC26K_SUBSAMPLE_SEED = 26_000  # the YFCC26k subsample does not depend on the benchmark's seed
ENCODE_THREADS = 2  # fixed, so that the float32 encoder gives the same bits on every run of a machine
ENCODE_BATCH = 4096
GEOCLIP_INSTALL = "pip install --no-deps geoclip==1.3.0 geopy geographiclib"
PROBE_MIN_KM = 3_000.0  # the two places of a two-place probe are at least this far apart
PROBE_STREAM = 999  # the probes' seed stream, SeedSequence([seed, PROBE_STREAM, probe seed]), is no split's


@dataclass
class RealBenchConfig:
    seed: int = setting(0, ge=0, le=2**63 - 1)
    n_train: int = setting(60_000, ge=1, le=MAX_GENERATED_ROWS)
    n_val: int = setting(2_000, ge=0, le=MAX_GENERATED_ROWS)
    n_val_unseen: int = setting(1_000, ge=0, le=MAX_GENERATED_ROWS)
    n_test: int = setting(3_000, ge=0, le=MAX_GENERATED_ROWS)
    n_test_unseen: int = setting(2_000, ge=0, le=MAX_GENERATED_ROWS)
    n_yfcc: int = setting(4_000, ge=0, le=25_600)  # rows of the yfcc26k split: a fixed subsample of its 25,600; 0 = all
    population_exponent: float = 0.5  # city weight = population ** this (sub-linear)
    # shares of photos at a landmark, local, regional, land-ish, anywhere (see the module docstring)
    location_mix: tuple[float, float, float, float, float] = (0.30, 0.35, 0.25, 0.08, 0.02)
    landmarks_per_city: int = 3  # fixed points a few km from each city centre; photos within 300 m of one
    local_km: float = 3.0  # median distance of a "local" photo from its city centre (log-normal)
    regional_km: float = 25.0  # median distance of a "regional" photo (log-normal)
    landish_km: float = 150.0  # land-ish scatter: uniform in area within this of a uniformly drawn city
    n_regions: int = setting(45, ge=2, le=1000)  # held-out disks; a third for val_unseen, the rest for test_unseen
    region_radius_km: float = 40.0
    region_margin_km: float = 25.0  # no train/val/test point within radius + margin of a held-out centre
    region_separation_km: float = 300.0  # minimum distance between two held-out centres
    lookalike_frac: float = setting(0.3, ge=0, le=1)  # share of images blended with a look-alike place
    lookalike_weight: tuple[float, float] = (0.2, 0.7)  # blend weight w of the look-alike, uniform
    lookalike_band_deg: float = 3.0  # the look-alike's absolute latitude is within this of the photo's
    lookalike_min_km: float = 1_500.0  # and it is at least this far away
    # norm of the Gaussian noise added to the unit embedding (before renormalising); what top-1 kNN gets
    # with the defaults: docs/results.md
    noise: float = setting(1.65, ge=0, le=1e3)

    def __post_init__(self) -> None:
        check_ranges(self, "realbench")
        self.location_mix = tuple(float(v) for v in self.location_mix)  # type: ignore[assignment]
        self.lookalike_weight = tuple(float(v) for v in self.lookalike_weight)  # type: ignore[assignment]

    def sizes(self) -> dict[str, int]:
        """Rows per split (im2gps3k and yfcc26k as packaged)."""
        yfcc = len(testset_locations("yfcc26k")[0])
        return {"train": self.n_train, "val": self.n_val, "val_unseen": self.n_val_unseen, "test": self.n_test,
                "test_unseen": self.n_test_unseen, "im2gps3k": len(testset_locations("im2gps3k")[0]),
                "yfcc26k": min(self.n_yfcc, yfcc) if self.n_yfcc else yfcc}


# ---------------------------------------------------------------------------------------------------------
# The packaged test-set locations


@cache
def _testsets() -> dict[str, np.ndarray]:
    with np.load(TESTSETS, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def testset_locations(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) float64 degrees of a public test set as packaged: "im2gps3k" or "yfcc26k" (all rows)."""
    z = _testsets()
    if f"{name}_lat" not in z:
        raise UserError(f"realbench: no packaged test set {name!r}; choose im2gps3k or yfcc26k")
    return z[f"{name}_lat"].astype(np.float64), z[f"{name}_lon"].astype(np.float64)


def pack_testset_locations(im2gps3k_csv: str | Path, yfcc25600_csv: str | Path, out: str | Path) -> Path:
    """Write the LAT/LON columns of the two published CSVs (GeoEstimation's *_places365.csv) as float32
    to `out` (how locdiff/testsets/locations.npz was made)."""
    arrays = {}
    for name, csv in (("im2gps3k", im2gps3k_csv), ("yfcc26k", yfcc25600_csv)):
        df = pd.read_csv(csv, usecols=["LAT", "LON"])
        arrays[f"{name}_lat"] = df["LAT"].to_numpy(np.float32)
        arrays[f"{name}_lon"] = df["LON"].to_numpy(np.float32)
    np.savez_compressed(out, **arrays)
    return Path(out)


# ---------------------------------------------------------------------------------------------------------
# The encoder


class GeoClipLocationEncoder:
    """GeoCLIP's pretrained LocationEncoder (geoclip 1.3.0), weights read from the package with
    `runs.load_state` (weights_only=True); `(lat, lon) -> (N, 512)` unit-norm float32. Nothing is downloaded:
    the module is built without its own loader and the packaged state dict is loaded strictly."""

    name = "geoclip-1.3.0/LocationEncoder"
    dim = 512

    def __init__(self) -> None:
        try:
            from transformers.utils import logging as hf_logging  # geoclip imports transformers' CLIP

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # its "requires torchvision, falling back" note
        except ImportError:
            hf_logging = None
        try:
            import geoclip.model.location_encoder  # binds geoclip (heavy, optional: only here)
        except ImportError as err:
            raise UserError(f"realbench needs the GeoCLIP package and its pretrained location encoder "
                            f"({err}); install it with `{GEOCLIP_INSTALL}`") from err
        finally:
            if hf_logging is not None:
                hf_logging.set_verbosity(verbosity)
        try:
            self.version = version("geoclip")
        except PackageNotFoundError:
            self.version = "unknown"
        package = Path(geoclip.__file__).resolve().parent
        self.weights = package / "model" / "weights" / "location_encoder_weights.pth"
        if not self.weights.is_file():
            raise UserError(f"{self.weights}: GeoCLIP's location encoder weights are missing; reinstall it "
                            f"with `{GEOCLIP_INSTALL}`")
        state = load_state(self.weights, "cpu", what="GeoCLIP location encoder weights",
                           hint=f"reinstall: {GEOCLIP_INSTALL}")
        self.sha256 = hashlib.sha256(self.weights.read_bytes()).hexdigest()
        with torch.random.fork_rng(devices=[]):  # the constructor samples (then overwritten) RFF matrices
            model = geoclip.model.location_encoder.LocationEncoder(from_pretrained=False)
        model.load_state_dict(state, strict=True)
        self.model = model.eval()

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "package": f"geoclip=={self.version}",
                "weights": "geoclip/model/weights/location_encoder_weights.pth", "sha256": self.sha256,
                "dim": self.dim}

    def __call__(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.stack([lat, lon], 1).astype(np.float32))
        out = np.empty((len(x), self.dim), np.float32)
        threads = torch.get_num_threads()
        torch.set_num_threads(ENCODE_THREADS)
        try:
            with torch.no_grad():
                for s in range(0, len(x), ENCODE_BATCH):
                    e = self.model(x[s:s + ENCODE_BATCH])
                    out[s:s + ENCODE_BATCH] = torch.nn.functional.normalize(e, dim=1).numpy()
        finally:
            torch.set_num_threads(threads)
        return out


@lru_cache(maxsize=1)
def location_encoder() -> GeoClipLocationEncoder:
    """The encoder, loaded once per process (the `geoclip` import takes a few seconds)."""
    return GeoClipLocationEncoder()


# ---------------------------------------------------------------------------------------------------------
# The world: cities, held-out regions, look-alikes


class RealBenchWorld:
    """The geography of one seed: city weights, held-out regions, latitude bands for look-alikes."""

    def __init__(self, cfg: RealBenchConfig):
        self.cfg = cfg
        c = cities()
        self.lat, self.lon = c.lat, c.lon
        self.weight = c.population ** cfg.population_exponent
        self.weight = self.weight / self.weight.sum()
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
        L = cfg.landmarks_per_city
        self.lm_lat, self.lm_lon = destination(
            np.repeat(self.lat, L), np.repeat(self.lon, L),
            np.minimum(rng.lognormal(math.log(2.0), 0.7, len(self.lat) * L), 15.0),
            rng.uniform(0, 2 * np.pi, len(self.lat) * L))
        self._pick_regions(rng)
        # Look-alike candidates by absolute latitude band (both hemispheres): the cities of the band, or of
        # the nearest band that has cities; population-weighted.
        band = np.floor(np.abs(self.lat) / cfg.lookalike_band_deg).astype(int)
        self.bands: list[tuple[np.ndarray, np.ndarray]] = []
        for b in range(int(90 // cfg.lookalike_band_deg) + 1):
            cand = np.flatnonzero(band == band[np.argmin(np.abs(band - b))])
            self.bands.append((cand, self.weight[cand] / self.weight[cand].sum()))

    def _pick_regions(self, rng: np.random.Generator) -> None:
        cfg = self.cfg
        order = rng.choice(len(self.lat), size=min(len(self.lat), 20 * cfg.n_regions), replace=False,
                           p=self.weight)
        centres: list[int] = []
        for c in order:
            if len(centres) == cfg.n_regions:
                break
            if near_any(self.lat, self.lon, c, centres, cfg.region_separation_km):
                continue
            centres.append(int(c))
        if len(centres) < cfg.n_regions:
            raise UserError(f"realbench: could only place {len(centres)} of {cfg.n_regions} held-out regions "
                            f"{cfg.region_separation_km:g} km apart; lower n_regions")
        self.region_lat, self.region_lon = self.lat[centres], self.lon[centres]
        self.region_group = np.where(np.arange(cfg.n_regions) < cfg.n_regions // 3, 1, 2)  # 1 val, 2 test

    def region_distance(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(N, R) great-circle distance (km) of each point to each held-out centre."""
        return haversine_km(lat[:, None], lon[:, None], self.region_lat[None], self.region_lon[None])

    def _keep(self, lat: np.ndarray, lon: np.ndarray, group: int) -> np.ndarray:
        d = self.region_distance(lat, lon)
        cfg = self.cfg
        if group == 0:
            return (d > cfg.region_radius_km + cfg.region_margin_km).all(1)
        return (d[:, self.region_group == group] <= cfg.region_radius_km).any(1)

    def sample_locations(self, n: int, rng: np.random.Generator, group: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """n photo locations outside the held-out regions (group 0) or inside those of group 1 or 2."""
        cfg = self.cfg
        near = self._keep(self.lat, self.lon, group)  # the cities drawn: those whose centre is kept
        p = self.weight * near
        p = p / p.sum()
        uniform = near / near.sum()
        mix = np.asarray(cfg.location_mix) / sum(cfg.location_mix)
        lats, lons, have = [], [], 0
        while have < n:
            m = int((n - have) * 1.3) + 64
            kind = rng.choice(5, size=m, p=mix)
            city = np.where(kind == 3, rng.choice(len(p), size=m, p=uniform), rng.choice(len(p), size=m, p=p))
            lm = city * cfg.landmarks_per_city + rng.integers(0, cfg.landmarks_per_city, m)
            base_lat = np.where(kind == 0, self.lm_lat[lm], self.lat[city])
            base_lon = np.where(kind == 0, self.lm_lon[lm], self.lon[city])
            dist = np.select(
                [kind == 0, kind == 1, kind == 2],
                [rng.uniform(0.0, 0.3, m),
                 np.minimum(rng.lognormal(math.log(cfg.local_km), 0.8, m), 10 * cfg.local_km),
                 np.minimum(rng.lognormal(math.log(cfg.regional_km), 0.6, m), 6 * cfg.regional_km)],
                cfg.landish_km * np.sqrt(rng.uniform(0.0, 1.0, m)))  # land-ish: uniform in area
            lat, lon = destination(base_lat, base_lon, dist, rng.uniform(0, 2 * np.pi, m))
            anywhere = kind == 4  # uniform on the sphere
            if anywhere.any():
                lat[anywhere], lon[anywhere] = unit_to_latlon(_unit_normal(rng, int(anywhere.sum())))
            keep = self._keep(lat, lon, group)
            lats.append(lat[keep])
            lons.append(lon[keep])
            have += int(keep.sum())
        return np.concatenate(lats)[:n], np.concatenate(lons)[:n]

    def lookalikes(self, lat: np.ndarray, lon: np.ndarray, rng: np.random.Generator,
                   tries: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """For each point, a population-weighted city in the same absolute-latitude band at least
        `lookalike_min_km` away (or, after `tries` draws, the last one drawn)."""
        cfg = self.cfg
        band = np.floor(np.abs(lat) / cfg.lookalike_band_deg).astype(int)
        out = np.zeros(len(lat), dtype=int)
        todo = np.ones(len(lat), bool)
        for _ in range(tries):
            for b in np.unique(band[todo]):
                rows = np.flatnonzero(todo & (band == b))
                cand, w = self.bands[b]
                out[rows] = cand[rng.choice(len(cand), size=len(rows), p=w)]
            todo &= haversine_km(lat, lon, self.lat[out], self.lon[out]) < cfg.lookalike_min_km
            if not todo.any():
                break
        return self.lat[out], self.lon[out]

    def place_pairs(self, n: int, rng: np.random.Generator, min_km: float = PROBE_MIN_KM,
                    tries: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """n pairs of photo locations (as `sample_locations`, outside the held-out regions) at least min_km
        apart: (a_lat, a_lon, b_lat, b_lon); the second place is drawn again until it is far enough."""
        a_lat, a_lon = self.sample_locations(n, rng)
        b_lat, b_lon = self.sample_locations(n, rng)
        for _ in range(tries):
            close = np.flatnonzero(haversine_km(a_lat, a_lon, b_lat, b_lon) < min_km)
            if not len(close):
                return a_lat, a_lon, b_lat, b_lon
            b_lat[close], b_lon[close] = self.sample_locations(len(close), rng)
        raise UserError(f"realbench: could not draw two places {min_km:g} km apart in {tries} tries; "
                        "lower the distance")

    def regions(self) -> list[dict[str, Any]]:
        return [{"lat": float(a), "lon": float(o), "radius_km": self.cfg.region_radius_km,
                 "split": "val_unseen" if g == 1 else "test_unseen"}
                for a, o, g in zip(self.region_lat, self.region_lon, self.region_group, strict=True)]


def _unit_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# Splits


def embed(world: RealBenchWorld, lat: np.ndarray, lon: np.ndarray, rng: np.random.Generator,
          encoder: GeoClipLocationEncoder | None = None) -> np.ndarray:
    """Image embeddings (N, 512) float32, unit norm, of photos taken at (lat, lon); see the module doc."""
    cfg = world.cfg
    encoder = encoder or location_encoder()
    n = len(lat)
    alike = rng.random(n) < cfg.lookalike_frac
    w = rng.uniform(*cfg.lookalike_weight, n).astype(np.float32)[alike, None]
    a_lat, a_lon = world.lookalikes(lat[alike], lon[alike], rng)
    noise = rng.standard_normal((n, encoder.dim), dtype=np.float32) * np.float32(cfg.noise / math.sqrt(encoder.dim))
    e = encoder(np.concatenate([lat, a_lat]), np.concatenate([lon, a_lon]))
    out, e_alike = e[:n], e[n:]
    out[alike] = (1 - w) * out[alike] + w * e_alike
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    out += noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def make_split(world: RealBenchWorld, split: str, n: int | None = None,
               encoder: GeoClipLocationEncoder | None = None) -> EmbeddingTable:
    """One split as an EmbeddingTable (ids `<split>-0000000`, ...); n defaults to the config's size."""
    if split not in SPLITS:
        raise UserError(f"realbench: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    cfg = world.cfg
    n = cfg.sizes()[split] if n is None else n
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1 + SPLITS.index(split)]))
    if split in ("im2gps3k", "yfcc26k"):
        lat, lon = testset_locations(split)
        if n < len(lat):
            pick = np.random.default_rng(YFCC26K_SUBSAMPLE_SEED).permutation(len(lat))[:n]
            lat, lon = lat[np.sort(pick)], lon[np.sort(pick)]
    else:
        group = {"val_unseen": 1, "test_unseen": 2}.get(split, 0)
        lat, lon = world.sample_locations(n, rng, group)
    emb = embed(world, lat, lon, rng, encoder)
    ids = np.array([f"{split}-{i:07d}" for i in range(len(lat))], dtype=object)
    return EmbeddingTable(ids=ids, lat=lat, lon=lon, embedding=emb, source=f"realbench:{split}")


@dataclass
class TwoPlaceProbe:
    """Probe "photos" that look like two far-apart places at once, one row per pair of places (degrees)."""

    embedding: np.ndarray  # (N, dim) float32, unit norm
    a_lat: np.ndarray
    a_lon: np.ndarray
    b_lat: np.ndarray
    b_lon: np.ndarray

    def table(self, source: str = "two-place probe") -> EmbeddingTable:
        """The probes as an EmbeddingTable whose location is the first place (ids `probe-0000000`, ...)."""
        ids = np.array([f"probe-{i:07d}" for i in range(len(self.a_lat))], dtype=object)
        return EmbeddingTable(ids=ids, lat=self.a_lat, lon=self.a_lon, embedding=self.embedding, source=source)


def probe_rng(world_seed: int, seed: int) -> np.random.Generator:
    """The random stream of the two-place probes of a benchmark seed (apart from every split's)."""
    return np.random.default_rng(np.random.SeedSequence([world_seed, PROBE_STREAM, seed]))


def mix_two_places(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """normalise(normalise(normalise(a) + normalise(b)) + noise / sqrt(dim) * N(0, I)) by rows, float32: an
    equal-weight mix of two places' signals plus Gaussian noise of norm about `noise` (the world's noise,
    added to a unit signal as every realbench and cuebench split does)."""
    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    eps = rng.standard_normal(a.shape, dtype=np.float32) * np.float32(noise / math.sqrt(a.shape[1]))
    return unit(unit(unit(a) + unit(b)) + eps).astype(np.float32)


def two_place_probe(world: RealBenchWorld, n: int, seed: int = 0, min_km: float = PROBE_MIN_KM,
                    encoder: GeoClipLocationEncoder | None = None) -> TwoPlaceProbe:
    """n probe photos, each the equal-weight mix of the location-encoder embeddings of two places at least
    min_km apart (drawn like photos, outside the held-out regions), plus the world's noise. A function of
    the world's seed and `seed`."""
    encoder = encoder or location_encoder()
    rng = probe_rng(world.cfg.seed, seed)
    a_lat, a_lon, b_lat, b_lon = world.place_pairs(n, rng, min_km)
    e = encoder(np.concatenate([a_lat, b_lat]), np.concatenate([a_lon, b_lon]))
    return TwoPlaceProbe(mix_two_places(e[:n], e[n:], rng, world.cfg.noise), a_lat, a_lon, b_lat, b_lon)


def write_benchmark(out_dir: str | Path, cfg: RealBenchConfig) -> dict[str, Path]:
    """Write DIR/<split>.parquet for every split of non-zero size and DIR/realbench.json (the config, the
    encoder and its weights' sha256, the held-out regions, the split files and sizes). Returns split -> path."""
    t0 = time.perf_counter()
    encoder = location_encoder()  # first: a missing geoclip fails before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = RealBenchWorld(cfg)
    paths, rows = {}, {}
    for split, n in cfg.sizes().items():
        if n <= 0:
            continue
        table = make_split(world, split, n, encoder)
        paths[split] = out / f"{split}.parquet"
        write_embeddings(paths[split], table)
        rows[split] = len(table)
        log.info("realbench: wrote %s (%d rows, dim %d)", paths[split], len(table), table.dim)
    meta = {"benchmark": "realbench", "config": asdict(cfg), "encoder": encoder.record(),
            "testsets": "locdiff/testsets/locations.npz (see its README: Im2GPS3k and YFCC26k locations)",
            "yfcc26k_subsample_seed": YFCC26K_SUBSAMPLE_SEED, "regions": world.regions(),
            "splits": {s: {"file": p.name, "rows": rows[s]} for s, p in paths.items()}}
    write_file_atomic(out / "realbench.json", json_text(meta, indent=2) + "\n")
    log.info("realbench: %d splits in %.1f s", len(paths), time.perf_counter() - t0)
    return paths


def make_benchmark(cfg: RealBenchConfig) -> dict[str, EmbeddingTable]:
    """All splits of non-zero size, in memory."""
    world = RealBenchWorld(cfg)
    return {s: make_split(world, s, n) for s, n in cfg.sizes().items() if n > 0}


__all__ = ["RealBenchConfig", "RealBenchWorld", "GeoClipLocationEncoder", "location_encoder", "make_split",
           "make_benchmark", "write_benchmark", "testset_locations", "pack_testset_locations", "SPLITS",
           "TwoPlaceProbe", "two_place_probe", "PROBE_MIN_KM"]
