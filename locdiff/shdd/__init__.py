"""Spherical-harmonics Dirac-delta (SHDD) location codes: encode, decode (mode seeking), density and the
SHDD-KL loss. Degrees in, degrees out; tensors or arrays in, tensors out. `SHDD(degree)` is the codec
object (locdiff.shdd.codec): the same functions with the degree held once, and the z-space `scale`.

The code of a point x is the vector of real orthonormal spherical harmonics at x, truncated at degree
L: shdd(x) = [Y_k(x)], k = l*l + l + m, D = (L+1)^2. The function it represents,
f(y) = sum_k shdd(x)_k Y_k(y), is a zonal kernel peaked at x; |shdd(x)|^2 = D / (4 pi).
"""

from __future__ import annotations

from locdiff.shdd.basis import degree_from_dim, num_coefficients, spherical_harmonics
from locdiff.shdd.codec import SCALE, SHDD, density, encode
from locdiff.shdd.decode import decode
from locdiff.shdd.grid import fibonacci_lattice
from locdiff.shdd.loss import default_tau, kl_loss, mse_loss

__all__ = [
    "SHDD", "SCALE", "encode", "decode", "density", "kl_loss", "mse_loss", "default_tau", "spherical_harmonics",
    "degree_from_dim", "num_coefficients", "fibonacci_lattice",
]
