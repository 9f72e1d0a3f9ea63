"""Spherical-harmonics Dirac-delta (SHDD) location codes: encode, decode (mode seeking), density and the
SHDD-KL loss. Degrees in, degrees out; tensors or arrays in, tensors out.

The code of a point x is the vector of real orthonormal spherical harmonics at x, truncated at degree
L: shdd(x) = [Y_k(x)], k = l*l + l + m, D = (L+1)^2. The function it represents,
f(y) = sum_k shdd(x)_k Y_k(y), is a zonal kernel peaked at x; |shdd(x)|^2 = D / (4 pi).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from locdiff.geo import check_coordinates
from locdiff.shdd.basis import degree_from_dim, num_coefficients, spherical_harmonics
from locdiff.shdd.decode import decode
from locdiff.shdd.grid import fibonacci_lattice
from locdiff.shdd.loss import default_tau, kl_loss, mse_loss

SCALE = math.sqrt(4 * math.pi)  # z0 = encode(x) * SCALE has unit variance per coefficient over the sphere


def _as_float_tensor(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} must be real numbers; got dtype {t.dtype}")
        t = t.to(torch.float64)
    return t


def _check_degree(degree: Any) -> int:
    if isinstance(degree, bool) or not isinstance(degree, int | torch.SymInt) or int(degree) < 0:
        raise ValueError(f"degree must be an integer >= 0; got {degree!r}")
    return int(degree)


def encode(lat: Any, lon: Any, degree: int, *, checked: bool = False) -> torch.Tensor:
    """SHDD code of points given in degrees: (...) -> (..., (degree+1)**2). Differentiable.

    float64 inputs (and Python/NumPy floats) give float64; float32 gives float32. `checked=True`: the
    caller has validated the coordinates on the host (the training loop does, before the copy to the
    device), so a device tensor is not read back here (that would be a host sync per step).
    """
    degree = _check_degree(degree)
    lat_t, lon_t = _as_float_tensor(lat, "lat"), _as_float_tensor(lon, "lon")
    if not checked:
        check_coordinates(lat_t, lon_t)
    return spherical_harmonics(lat_t, lon_t, degree)


def density(coeffs: torch.Tensor, lat: Any, lon: Any) -> torch.Tensor:
    """f_c(y) = sum_k c_k Y_k(y) at points y.

    Args:
        coeffs: (D,) or (B..., D).
        lat, lon: points in degrees. With coeffs (D,), any shape S -> result S. With coeffs (B..., D),
            either shape (B...) (one point per vector) or (B..., P) (P points per vector).
    """
    coeffs = torch.as_tensor(coeffs)
    degree = degree_from_dim(coeffs.shape[-1])
    lat_t, lon_t = _as_float_tensor(lat, "lat"), _as_float_tensor(lon, "lon")
    check_coordinates(lat_t, lon_t)
    y = spherical_harmonics(lat_t.to(coeffs.dtype), lon_t.to(coeffs.dtype), degree)
    if coeffs.dim() > 1 and lat_t.dim() == coeffs.dim():
        return torch.einsum("...pd,...d->...p", y, coeffs)
    return (y * coeffs).sum(-1)


__all__ = [
    "SCALE", "encode", "decode", "density", "kl_loss", "mse_loss", "default_tau", "spherical_harmonics",
    "degree_from_dim", "num_coefficients", "fibonacci_lattice",
]
