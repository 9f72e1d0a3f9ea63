"""The SHDD codec of one degree: `SHDD(L)` (or `SHDD.from_dim(D)`) encodes points, decodes and evaluates
codes of D = (L+1)^2 coefficients, and moves codes to and from the diffusion's z-space (`scale`).

The module functions `encode`, `density` (and `decode`, `locdiff.shdd.decode`) take the degree as an
int or read it from the code's length; the codec is the same numerics with the degree held once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from locdiff.geo import check_coordinates
from locdiff.shdd.basis import degree_from_dim, num_coefficients, spherical_harmonics
from locdiff.shdd.decode import decode

SCALE = math.sqrt(4 * math.pi)  # z0 = encode(x) * SCALE has unit variance per coefficient over the sphere
# the basis at one code's points is built this many bytes at a time (a whole map at degree 64: a 9 GB basis)
DENSITY_BLOCK_BYTES = 64 << 20


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
    degree = SHDD.from_dim(coeffs.shape[-1]).degree
    lat_t, lon_t = _as_float_tensor(lat, "lat"), _as_float_tensor(lon, "lon")
    check_coordinates(lat_t, lon_t)
    if coeffs.dim() == 1:  # one code at many points (a map): the basis a block of points at a time
        la, lo = torch.broadcast_tensors(lat_t.to(coeffs.dtype), lon_t.to(coeffs.dtype))
        block = max(1, DENSITY_BLOCK_BYTES // (coeffs.shape[-1] * coeffs.element_size()))
        flat_la, flat_lo = la.reshape(-1), lo.reshape(-1)
        parts = [spherical_harmonics(flat_la[i:i + block], flat_lo[i:i + block], degree) @ coeffs
                 for i in range(0, flat_la.numel(), block)]
        return (torch.cat(parts) if parts else flat_la.new_zeros(0)).reshape(la.shape)
    y = spherical_harmonics(lat_t.to(coeffs.dtype), lon_t.to(coeffs.dtype), degree)
    if coeffs.dim() > 1 and lat_t.dim() == coeffs.dim():
        return torch.einsum("...pd,...d->...p", y, coeffs)
    return (y * coeffs).sum(-1)


@dataclass(frozen=True)
class SHDD:
    """SHDD codes of degree `degree` (L >= 0): `dimension` = (L+1)^2 coefficients per point.

        code = SHDD(16)
        z = code.to_z(code.encode(lat, lon))      # the diffusion's targets, unit variance per coefficient
        lat, lon, value = code.decode(code.from_z(z))
    """

    degree: int
    scale: ClassVar[float] = SCALE  # z = code * scale (unit variance per coefficient over the sphere)

    def __post_init__(self) -> None:
        object.__setattr__(self, "degree", _check_degree(self.degree))

    @classmethod
    def from_dim(cls, dim: int, *, name: str = "coeffs") -> SHDD:
        """The codec whose codes have `dim` coefficients; ValueError (naming `name`) when dim is not (L+1)^2."""
        return cls(degree_from_dim(dim, name=name))

    @property
    def dimension(self) -> int:
        """D = (L+1)^2."""
        return num_coefficients(self.degree)

    def _check(self, coeffs: Any, name: str = "coeffs") -> torch.Tensor:
        t = torch.as_tensor(coeffs)
        if t.dim() == 0 or t.shape[-1] != self.dimension:
            got = t.shape[-1] if t.dim() else "a scalar"
            raise ValueError(f"{name}: codes of degree {self.degree} have {self.dimension} coefficients; got {got}")
        return t

    def encode(self, lat: Any, lon: Any, *, checked: bool = False) -> torch.Tensor:
        """`encode(lat, lon, self.degree)`: (...) -> (..., D)."""
        return encode(lat, lon, self.degree, checked=checked)

    def decode(self, coeffs: Any, **options: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`locdiff.shdd.decode` of codes (..., D) of this degree (options: candidates, iterations, smoothing, ...)."""
        return decode(self._check(coeffs), **options)

    def density(self, coeffs: Any, lat: Any, lon: Any) -> torch.Tensor:
        """`density(coeffs, lat, lon)` of codes (..., D) of this degree."""
        return density(self._check(coeffs), lat, lon)

    def to_z(self, code: torch.Tensor) -> torch.Tensor:
        """Code -> z-space (code * scale), where the diffusion runs."""
        return self._check(code, "code") * self.scale

    def from_z(self, z: torch.Tensor) -> torch.Tensor:
        """z-space -> code (z / scale)."""
        return self._check(z, "z") / self.scale
