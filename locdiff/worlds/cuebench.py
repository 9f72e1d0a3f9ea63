"""A geolocation benchmark whose "photos" carry discrete cues of different strengths: `locdiff cuebench --out DIR`.

`locdiff synth` and `locdiff realbench` embed a photo as a smooth function of where it was taken. Real
photos are not like that: a licence plate or a language names a country (and, nearly as well, its
neighbours), a shop sign a region or a city, a famous landmark its exact spot, vegetation and light only a
climate band, and a plate of food or a living room nothing at all. Here the "image embedding" (unit norm,
`dim` wide, float32) of a photo at x is a weighted sum of unit random vectors, one per cue:

    country    v_c = normalise(sqrt(1 - s) r_c + sqrt(s) normalise(r_c + sum of r_d over c's land
               neighbours d)): neighbouring countries share most of their cue (s = `neighbour_share`);
               shown with probability `country_presence`, and in `confuse_frac` of the photos that
               show it, a random land neighbour's cue is shown instead (GeoNames' borders)
    region     one vector per first-level division (GeoNames admin1), shown with `region_presence`
    city       one vector per city, shown with `city_presence`, fading as exp(-d / `city_fade_km`)
               with the distance d from the city's centre
    landmark   photos of a famous landmark: one near-unique vector per landmark, weight `landmark_weight`
    biome      smooth in |latitude| (prototypes every `biome_band_deg`, linearly interpolated; the same in
               both hemispheres and at every longitude) plus one vector per continent
    no geography  `photo_mix[2]` of the photos (indoor, food) are one of `n_scenes` scene vectors: their
               embedding is independent of where they were taken

Country, region and city are those of the nearest gazetteer city (locdiff.gazetteer: cities and their
GeoNames country code, admin1 code, continent and land neighbours); beyond `land_km` from any city only
the biome is shown (open sea, wilderness). The geographic part is scaled by a per-photo strength
(uniform in `strength`), normalised, and Gaussian noise of norm `noise` is added before renormalising.

Locations and held-out regions are those of realbench (locdiff.worlds.realbench.RealBenchWorld with the same
seed and settings): population-weighted cities, local / regional / land-ish / anywhere photos, 45 held-out
disks of 40 km (the first third `val_unseen`, the rest `test_unseen`, no train/val/test point within
radius + margin). Landmark photos are within 300 m of one of `n_landmarks` famous landmarks (drawn from
realbench's landmarks with probability proportional to their city's weight), chosen with Zipf popularity
(rank ** -`landmark_zipf`).

Writes DIR/<split>.parquet (the embeddings format), DIR/labels/<split>.parquet (per row: kind, country,
the country cue shown, whether region and city cues were shown, landmark), DIR/labels/landmarks.parquet
and DIR/cuebench.json. Everything
is a function of the seed, so the same seed gives byte-identical files. See README "The cue benchmark".
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial import cKDTree

from locdiff.errors import UserError
from locdiff.gazetteer import cities, divisions
from locdiff.geo import EARTH_RADIUS_KM, destination, latlon_to_unit
from locdiff.io import _write_atomic, write_embeddings
from locdiff.schema import check_ranges, setting
from locdiff.tables import EmbeddingTable
from locdiff.worlds.realbench import (
    PROBE_MIN_KM,
    RealBenchConfig,
    RealBenchWorld,
    TwoPlaceProbe,
    mix_two_places,
    probe_rng,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "val_unseen", "test", "test_unseen")
KINDS = ("landmark", "place", "nogeo")
LANDMARK_RADIUS_KM = 0.3  # a landmark photo is within this of its landmark
MAX_SPLIT_FLOATS = 1 << 28  # rows x dim of one split (1 GiB of float32; a split is built in memory)


@dataclass
class CueBenchConfig:
    seed: int = 0
    n_train: int = setting(60_000, ge=1)
    n_val: int = setting(2_000, ge=0)
    n_val_unseen: int = setting(1_000, ge=0)
    n_test: int = setting(3_000, ge=0)
    n_test_unseen: int = setting(2_000, ge=0)
    dim: int = setting(256, ge=16, le=4096)
    photo_mix: tuple[float, float, float] = setting((0.15, 0.65, 0.20), ge=0)  # landmark, place, no geography
    # where the "place" photos are: realbench's local, regional, land-ish and anywhere shares
    place_mix: tuple[float, float, float, float] = setting((0.40, 0.35, 0.20, 0.05), ge=0)
    n_landmarks: int = setting(3_000, ge=1)
    landmark_zipf: float = setting(1.0, ge=0)
    n_regions: int = setting(45, ge=2)  # held-out disks (realbench's rule); a third val_unseen, the rest test_unseen
    region_radius_km: float = setting(40.0, gt=0)
    region_margin_km: float = setting(25.0, ge=0)
    country_weight: float = setting(1.0, ge=0)
    country_presence: float = setting(0.85, ge=0, le=1)
    neighbour_share: float = setting(0.7, ge=0, le=1)
    confuse_frac: float = setting(0.2, ge=0, le=1)
    region_weight: float = setting(0.8, ge=0)
    region_presence: float = setting(0.6, ge=0, le=1)
    city_weight: float = setting(0.8, ge=0)
    city_presence: float = setting(0.5, ge=0, le=1)
    city_fade_km: float = setting(30.0, gt=0)
    landmark_weight: float = setting(2.0, ge=0)
    biome_weight: float = setting(0.7, ge=0)
    biome_band_deg: float = setting(12.0, gt=0, le=90)
    continent_weight: float = setting(0.5, ge=0)
    land_km: float = setting(300.0, ge=0)
    n_scenes: int = setting(64, ge=1)
    strength: tuple[float, float] = setting((0.5, 1.5), ge=0)  # per-photo scale of the geographic cues
    noise: float = setting(1.0, ge=0)  # norm of the Gaussian noise added to the unit signal

    def __post_init__(self) -> None:
        check_ranges(self, "cuebench")
        self.photo_mix = tuple(float(v) for v in self.photo_mix)  # type: ignore[assignment]
        self.place_mix = tuple(float(v) for v in self.place_mix)  # type: ignore[assignment]
        self.strength = tuple(float(v) for v in self.strength)  # type: ignore[assignment]
        if len(self.photo_mix) != 3 or sum(self.photo_mix) <= 0:
            raise UserError("cuebench: photo_mix needs three non-negative shares (landmark, place, no "
                            "geography) with a positive sum")
        if len(self.place_mix) != 4 or sum(self.place_mix) <= 0:
            raise UserError("cuebench: place_mix needs four non-negative shares with a positive sum")
        if len(self.strength) != 2 or self.strength[0] > self.strength[1]:
            raise UserError("cuebench: strength needs (low, high) with low <= high")
        for split, n in self.sizes().items():
            if n * self.dim > MAX_SPLIT_FLOATS:
                raise UserError(f"cuebench: {split}: {n:,} rows x {self.dim} dimensions is over the "
                                f"{MAX_SPLIT_FLOATS:,} values one split may hold; make fewer rows or a smaller dim")

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "val_unseen": self.n_val_unseen, "test": self.n_test,
                "test_unseen": self.n_test_unseen}

    def places(self) -> RealBenchConfig:
        """The realbench settings that draw the locations and the held-out regions."""
        return RealBenchConfig(seed=self.seed, location_mix=(0.0, *self.place_mix), n_regions=self.n_regions,
                               region_radius_km=self.region_radius_km, region_margin_km=self.region_margin_km)


@dataclass
class CueSplit:
    """One split: the table and, per row, what its embedding shows."""

    table: EmbeddingTable
    kind: np.ndarray  # (N,) object: "landmark", "place" or "nogeo"
    country: np.ndarray  # (N,) object: the country code of the nearest gazetteer city
    country_shown: np.ndarray  # (N,) object: the country whose cue the embedding carries ("" for none)
    region_shown: np.ndarray  # (N,) bool
    city_shown: np.ndarray  # (N,) bool
    landmark: np.ndarray  # (N,) int64: index into the world's landmarks, -1 for other photos

    def labels(self) -> pa.Table:
        return pa.table({"id": pa.array(self.table.ids.astype(str)), "kind": pa.array(self.kind.astype(str)),
                         "country": pa.array(self.country.astype(str)),
                         "country_shown": pa.array(self.country_shown.astype(str)),
                         "region_shown": pa.array(self.region_shown), "city_shown": pa.array(self.city_shown),
                         "landmark": pa.array(self.landmark, pa.int64())})


def _unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class CueWorld:
    """The geography and cue vectors of one seed."""

    def __init__(self, cfg: CueBenchConfig):
        self.cfg = cfg
        self.places = RealBenchWorld(cfg.places())
        c, div = cities(), divisions()
        self.city_lat, self.city_lon = c.lat, c.lon
        self._tree = cKDTree(latlon_to_unit(c.lat, c.lon))
        self.codes = sorted(set(div.country_code) | set(div.continent))
        code_index = {code: i for i, code in enumerate(self.codes)}
        self.city_country = np.array([code_index[k] for k in div.country_code], np.int64)
        self.region_names, self.city_region = np.unique(div.admin1.astype(str), return_inverse=True)
        self.continents = sorted({div.continent.get(k, "") for k in self.codes})
        self.country_continent = np.array([self.continents.index(div.continent.get(k, "")) for k in self.codes])
        self.neighbours = [np.array(sorted(code_index[n] for n in div.neighbours.get(k, ()) if n in code_index),
                                    np.int64) for k in self.codes]
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 100]))
        d = cfg.dim
        own = _unit_vectors(rng, len(self.codes), d)
        shared = _normalise(np.stack([own[i] + own[nb].sum(0) for i, nb in enumerate(self.neighbours)]))
        s = cfg.neighbour_share
        self.country_vec = _normalise(math.sqrt(1 - s) * own + math.sqrt(s) * shared).astype(np.float32)
        self.region_vec = _unit_vectors(rng, len(self.region_names), d)
        self.city_vec = _unit_vectors(rng, len(c.lat), d)
        self.continent_vec = _unit_vectors(rng, len(self.continents), d)
        self.biome_vec = _unit_vectors(rng, int(math.ceil(90 / cfg.biome_band_deg)) + 1, d)
        self.scene_vec = _unit_vectors(rng, cfg.n_scenes, d)
        # famous landmarks: realbench's (3 per city), drawn by their city's weight, Zipf popularity by draw
        p = np.repeat(self.places.weight, self.places.cfg.landmarks_per_city)
        n_lm = min(cfg.n_landmarks, len(p))
        pick = rng.choice(len(p), size=n_lm, replace=False, p=p / p.sum())
        self.lm_lat, self.lm_lon = self.places.lm_lat[pick], self.places.lm_lon[pick]
        self.lm_city = pick // self.places.cfg.landmarks_per_city
        self.lm_popularity = (np.arange(n_lm) + 1.0) ** -cfg.landmark_zipf
        self.landmark_vec = _unit_vectors(rng, n_lm, d)
        # which landmarks each split group may use: all of a landmark's photos must be kept by that group
        dist = self.places.region_distance(self.lm_lat, self.lm_lon)
        r, m = cfg.region_radius_km, cfg.region_margin_km
        group = self.places.region_group
        self.lm_group = [dist.min(1) > r + m + LANDMARK_RADIUS_KM,
                         *[(dist[:, group == g] <= r - LANDMARK_RADIUS_KM).any(1) for g in (1, 2)]]

    def nearest_city(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of the nearest gazetteer city, its distance in km) for each point."""
        chord, idx = self._tree.query(latlon_to_unit(lat, lon))
        return np.asarray(idx, np.int64), 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord) / 2, 0, 1))

    def sample(self, n: int, rng: np.random.Generator, group: int) -> tuple[np.ndarray, ...]:
        """(lat, lon, kind index, landmark index or -1) of n photos of a split group (0 iid, 1/2 held out)."""
        cfg = self.cfg
        kind = rng.choice(3, size=n, p=np.asarray(cfg.photo_mix) / sum(cfg.photo_mix))
        avail = np.flatnonzero(self.lm_group[group])
        if not len(avail):
            log.info("cuebench: no landmark in split group %d; its landmark photos become place photos", group)
            kind[kind == 0] = 1
        lat, lon = np.zeros(n), np.zeros(n)
        landmark = np.full(n, -1, np.int64)
        at_lm = np.flatnonzero(kind == 0)
        if len(at_lm):
            w = self.lm_popularity[avail]
            landmark[at_lm] = avail[rng.choice(len(avail), size=len(at_lm), p=w / w.sum())]
            lat[at_lm], lon[at_lm] = destination(
                self.lm_lat[landmark[at_lm]], self.lm_lon[landmark[at_lm]],
                rng.uniform(0.0, LANDMARK_RADIUS_KM, len(at_lm)), rng.uniform(0, 2 * np.pi, len(at_lm)))
        rest = np.flatnonzero(kind != 0)  # place and no-geography photos are taken where people are
        lat[rest], lon[rest] = self.places.sample_locations(len(rest), rng, group)
        return lat, lon, kind, landmark

    def embed(self, lat: np.ndarray, lon: np.ndarray, kind: np.ndarray, landmark: np.ndarray,
              rng: np.random.Generator, noise_norm: float | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(N, dim) unit float32 embeddings and what each shows (see the module docstring); `noise_norm`
        replaces the config's `noise` (0: the unit cue signal alone; the draws are the same)."""
        cfg = self.cfg
        noise_norm = cfg.noise if noise_norm is None else noise_norm
        n = len(lat)
        city, d_city = self.nearest_city(lat, lon)
        country = self.city_country[city]
        geo = kind != 2
        land = geo & (d_city <= cfg.land_km)
        # draws in a fixed order, each for every row (so a row's cues do not depend on other rows' kinds)
        u_country, u_confuse, u_region, u_city = rng.random((4, n))
        u_neighbour = rng.random(n)
        strength = rng.uniform(*cfg.strength, n)
        scene = rng.integers(0, cfg.n_scenes, n)
        noise = rng.standard_normal((n, cfg.dim), dtype=np.float32)
        shown = np.where(land & (u_country < cfg.country_presence), country, -1)
        confused = np.flatnonzero((shown >= 0) & (u_confuse < cfg.confuse_frac))
        own = shown[confused]
        for c in np.unique(own):
            nb = self.neighbours[c]
            rows = confused[own == c]
            if len(nb):
                shown[rows] = nb[np.minimum((u_neighbour[rows] * len(nb)).astype(np.int64), len(nb) - 1)]
        region = land & (u_region < cfg.region_presence)
        city_on = geo & (u_city < cfg.city_presence)
        x = np.abs(lat) / cfg.biome_band_deg
        b = np.minimum(np.floor(x).astype(np.int64), len(self.biome_vec) - 2)
        f = (x - b)[:, None].astype(np.float32)
        e = np.zeros((n, cfg.dim), np.float32)
        e += cfg.biome_weight * _normalise((1 - f) * self.biome_vec[b] + f * self.biome_vec[b + 1])
        e += cfg.continent_weight * land[:, None] * self.continent_vec[self.country_continent[country]]
        e += cfg.country_weight * (shown >= 0)[:, None] * self.country_vec[np.maximum(shown, 0)]
        e += cfg.region_weight * region[:, None] * self.region_vec[self.city_region[city]]
        fade = np.exp(-d_city / cfg.city_fade_km).astype(np.float32)
        e += (cfg.city_weight * city_on * fade)[:, None] * self.city_vec[city]
        e += cfg.landmark_weight * (landmark >= 0)[:, None] * self.landmark_vec[np.maximum(landmark, 0)]
        e *= strength[:, None].astype(np.float32)
        e[~geo] = self.scene_vec[scene[~geo]]
        e = _normalise(e) + noise * np.float32(noise_norm / math.sqrt(cfg.dim))
        e = _normalise(e).astype(np.float32)
        codes = np.array(self.codes + [""], dtype=object)
        return e, {"country": codes[country], "country_shown": codes[shown], "region_shown": region,
                   "city_shown": city_on}

    def describe(self) -> dict[str, Any]:
        """What the JSON records about the world (besides the config)."""
        div = divisions()
        return {"countries": len(set(div.country_code)), "first_level_divisions": len(self.region_names),
                "cities": len(self.city_lat), "continents": [c for c in self.continents if c],
                "regions": self.places.regions(), "landmarks": len(self.lm_lat)}

    def landmarks(self) -> pa.Table:
        """The famous landmarks (row i is landmark i of the labels) and the splits that photograph them."""
        names = ("train,val,test", "val_unseen", "test_unseen")
        splits = [next((names[g] for g in range(3) if self.lm_group[g][i]), "none") for i in range(len(self.lm_lat))]
        return pa.table({"landmark": pa.array(np.arange(len(self.lm_lat)), pa.int64()), "lat": self.lm_lat,
                         "lon": self.lm_lon, "city": pa.array(self.lm_city, pa.int64()),
                         "popularity": self.lm_popularity, "splits": pa.array(splits)})


def make_split(world: CueWorld, split: str, n: int | None = None) -> CueSplit:
    """One split (ids `<split>-0000000`, ...); n defaults to the config's size."""
    if split not in SPLITS:
        raise UserError(f"cuebench: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    cfg = world.cfg
    n = cfg.sizes()[split] if n is None else n
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1000 + SPLITS.index(split)]))
    group = {"val_unseen": 1, "test_unseen": 2}.get(split, 0)
    lat, lon, kind, landmark = world.sample(n, rng, group)
    emb, shows = world.embed(lat, lon, kind, landmark, rng)
    ids = np.array([f"{split}-{i:07d}" for i in range(n)], dtype=object)
    table = EmbeddingTable(ids=ids, lat=lat, lon=lon, embedding=emb, source=f"cuebench:{split}")
    return CueSplit(table=table, kind=np.array(KINDS, dtype=object)[kind], landmark=landmark, **shows)


def two_place_probe(world: CueWorld, n: int, seed: int = 0, min_km: float = PROBE_MIN_KM) -> TwoPlaceProbe:
    """n probe photos, each the equal-weight mix of the cue signals (no noise) of two place photos at least
    min_km apart (drawn like photos, outside the held-out regions), plus the world's noise. A function of
    the world's seed and `seed` (realbench.two_place_probe's rule on this world's cues)."""
    rng = probe_rng(world.cfg.seed, seed)
    a_lat, a_lon, b_lat, b_lon = world.places.place_pairs(n, rng, min_km)
    place, no_landmark = np.full(2 * n, KINDS.index("place")), np.full(2 * n, -1)
    e, _ = world.embed(np.concatenate([a_lat, b_lat]), np.concatenate([a_lon, b_lon]), place, no_landmark, rng,
                       noise_norm=0.0)
    return TwoPlaceProbe(mix_two_places(e[:n], e[n:], rng, world.cfg.noise), a_lat, a_lon, b_lat, b_lon)


def read_labels(path: str | Path) -> dict[str, np.ndarray]:
    """The per-row labels of a written split (DIR/labels/<split>.parquet) as arrays by column."""
    t = pq.read_table(path)
    return {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}


def write_benchmark(out_dir: str | Path, cfg: CueBenchConfig) -> dict[str, Path]:
    """Write DIR/<split>.parquet and DIR/labels/<split>.parquet for every split of non-zero size and
    DIR/cuebench.json (the config, the world, the split files and sizes). Returns split -> table path."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    world = CueWorld(cfg)
    paths, rows = {}, {}
    for split, n in cfg.sizes().items():
        if n <= 0:
            continue
        s = make_split(world, split, n)
        paths[split] = out / f"{split}.parquet"
        write_embeddings(paths[split], s.table)
        labels = s.labels()
        _write_atomic(out / "labels" / f"{split}.parquet", lambda p, fs, t=labels: pq.write_table(t, p, filesystem=fs))
        rows[split] = len(s.table)
        log.info("cuebench: wrote %s (%d rows, dim %d)", paths[split], len(s.table), s.table.dim)
    landmarks = world.landmarks()
    _write_atomic(out / "labels" / "landmarks.parquet", lambda p, fs: pq.write_table(landmarks, p, filesystem=fs))
    meta = {"benchmark": "cuebench", "config": asdict(cfg), "world": world.describe(), "kinds": list(KINDS),
            "landmarks": "labels/landmarks.parquet",
            "splits": {s: {"file": p.name, "labels": f"labels/{p.name}", "rows": rows[s]} for s, p in paths.items()}}
    text = json.dumps(meta, indent=2) + "\n"
    _write_atomic(out / "cuebench.json", lambda p, fs: Path(p).write_text(text))
    log.info("cuebench: %d splits in %.1f s", len(paths), time.perf_counter() - t0)
    return paths


def make_benchmark(cfg: CueBenchConfig) -> dict[str, CueSplit]:
    """All splits of non-zero size, in memory."""
    world = CueWorld(cfg)
    return {s: make_split(world, s, n) for s, n in cfg.sizes().items() if n > 0}


__all__ = ["CueBenchConfig", "CueWorld", "CueSplit", "make_split", "make_benchmark", "write_benchmark",
           "read_labels", "two_place_probe", "SPLITS", "KINDS"]
