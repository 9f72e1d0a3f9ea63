"""Coordinates on the sphere: degrees, radians, unit vectors, haversine distances and validation.

The one place for these conversions. Latitude and longitude are in degrees at every public
interface; unit vectors are (x, y, z) with z towards the north pole and x towards (0, 0).
Works on torch tensors and NumPy arrays alike (the result has the type of the input).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

EARTH_RADIUS_KM = 6371.0088  # IUGG mean Earth radius


def _lib(x: Any):
    return torch if isinstance(x, torch.Tensor) else np


def check_coordinates(lat: Any, lon: Any, *, name: str = "") -> None:
    """Raise ValueError naming the argument and the first bad value if lat/lon are NaN or out of range.

    Latitude must lie in [-90, 90] and longitude in [-180, 360] (both [-180, 180] and [0, 360]
    conventions are accepted).
    """
    prefix = f"{name}: " if name else ""
    for arg, values, lo, hi in (("lat", lat, -90.0, 90.0), ("lon", lon, -180.0, 360.0)):
        arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{prefix}{arg} must be numeric, got dtype {arr.dtype}")
        bad = ~np.isfinite(arr) | (arr < lo) | (arr > hi)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            where = f" at index {idx[0] if len(idx) == 1 else idx}" if arr.ndim else ""
            raise ValueError(
                f"{prefix}{arg} must be a finite number in [{lo:g}, {hi:g}] degrees; "
                f"got {arr[idx] if arr.ndim else arr.item()!r}{where}"
            )


def latlon_to_unit(lat: Any, lon: Any) -> Any:
    """Degrees -> unit vectors of shape (..., 3)."""
    lib = _lib(lat)
    la, lo = lib.deg2rad(lat), lib.deg2rad(lon)
    c = lib.cos(la)
    if lib is torch:
        return torch.stack([c * torch.cos(lo), c * torch.sin(lo), torch.sin(la)], dim=-1)
    return np.stack([c * np.cos(lo), c * np.sin(lo), np.sin(la)], axis=-1)


def unit_to_latlon(v: Any) -> tuple[Any, Any]:
    """Unit vectors (..., 3) -> (lat, lon) in degrees, lon in [-180, 180]. Need not be normalised."""
    lib = _lib(v)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    if lib is torch:
        lat = torch.rad2deg(torch.atan2(z, torch.hypot(x, y)))
        lon = torch.rad2deg(torch.atan2(y, x))
    else:
        lat = np.rad2deg(np.arctan2(z, np.hypot(x, y)))
        lon = np.rad2deg(np.arctan2(y, x))
    return lat, lon


def wrap_lon(lon: Any) -> Any:
    """Wrap longitudes to [-180, 180)."""
    return (lon + 180.0) % 360.0 - 180.0


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any, radius: float = EARTH_RADIUS_KM) -> Any:
    """Great-circle distance in km between points given in degrees (broadcasting)."""
    lib = _lib(lat1) if not isinstance(lat2, torch.Tensor) else torch
    if lib is torch:
        lat1, lon1, lat2, lon2 = (torch.as_tensor(a, dtype=torch.float64) if not isinstance(a, torch.Tensor)
                                  else a for a in (lat1, lon1, lat2, lon2))
    p1, p2 = lib.deg2rad(lat1), lib.deg2rad(lat2)
    dp = p2 - p1
    dl = lib.deg2rad(lon2) - lib.deg2rad(lon1)
    a = lib.sin(dp / 2) ** 2 + lib.cos(p1) * lib.cos(p2) * lib.sin(dl / 2) ** 2
    a = lib.clip(a, 0.0, 1.0)
    return 2 * radius * lib.arcsin(lib.sqrt(a))


def near_any(lat: np.ndarray, lon: np.ndarray, i: int, others: list[int], km: float) -> bool:
    """Whether point i of (lat, lon) lies within `km` of any of the points `others` (none: False)."""
    return bool(others) and float(np.min(haversine_km(lat[i], lon[i], lat[others], lon[others]))) < km


def destination(lat: np.ndarray, lon: np.ndarray, dist_km: np.ndarray, bearing: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Points dist_km away from (lat, lon) along the given bearing (radians from north)."""
    x = latlon_to_unit(lat, lon)  # (N, 3)
    la, lo = np.deg2rad(lat), np.deg2rad(lon)
    north = np.stack([-np.sin(la) * np.cos(lo), -np.sin(la) * np.sin(lo), np.cos(la)], -1)
    east = np.stack([-np.sin(lo), np.cos(lo), np.zeros_like(lo)], -1)
    d = (dist_km / EARTH_RADIUS_KM)[:, None]
    b = bearing[:, None]
    y = np.cos(d) * x + np.sin(d) * (np.cos(b) * north + np.sin(b) * east)
    return unit_to_latlon(y)


def km_to_rad(km: float) -> float:
    return km / EARTH_RADIUS_KM


def rad_to_km(rad: float) -> float:
    return rad * EARTH_RADIUS_KM


def random_points(n: int, *, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """n points uniform on the sphere (lat, lon in degrees), seeded."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    lon = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    lat = torch.rad2deg(torch.asin(z))
    return lat.to(dtype), lon.to(dtype)


__all__ = [
    "EARTH_RADIUS_KM", "check_coordinates", "latlon_to_unit", "unit_to_latlon", "wrap_lon",
    "haversine_km", "km_to_rad", "rad_to_km", "random_points",
]
