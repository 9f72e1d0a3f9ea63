"""Grids on the sphere used by the decoder and the SHDD-KL loss."""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def fibonacci_lattice(n: int, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """n quasi-uniform points (equal-area cells), as (lat, lon) in degrees."""
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    golden = math.pi * (3.0 - math.sqrt(5.0))
    lon = torch.rad2deg(torch.remainder(golden * i, 2 * math.pi)) - 180.0
    lat = torch.rad2deg(torch.asin(z))
    return lat.to(dtype), lon.to(dtype)


@lru_cache(maxsize=16)
def equiangular_grid(degree: int) -> tuple[int, int]:
    """(n_lat, n_lon) of the decoder's grid for a degree: spacing pi/(2L+2), finer than the main lobe
    of the kernel (radius ~3.8/L), so the best node always lies inside the lobe of the best mode."""
    n_lat = 2 * degree + 2
    return n_lat, 2 * n_lat
