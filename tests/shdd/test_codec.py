"""The SHDD codec object gives exactly (bit for bit) what the module functions give, and refuses codes of
another degree in one line."""

import math

import numpy as np
import pytest
import torch

from locdiff import shdd
from locdiff.shdd import SHDD
from locdiff.shdd.basis import spherical_harmonics


def _points(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return (torch.tensor(rng.uniform(-90, 90, n)), torch.tensor(rng.uniform(-180, 180, n)))


@pytest.mark.parametrize("degree", [0, 1, 7, 24])
def test_dimension_and_from_dim(degree):
    code = SHDD(degree)
    assert code.dimension == (degree + 1) ** 2 == shdd.num_coefficients(degree)
    assert SHDD.from_dim(code.dimension) == code
    assert SHDD.from_dim(code.dimension).degree == shdd.degree_from_dim(code.dimension) == degree


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_numbers_as_the_functions(dtype):
    lat, lon = _points(64)
    lat, lon = lat.to(dtype), lon.to(dtype)
    code = SHDD(12)
    c = code.encode(lat, lon)
    # independent of the shdd front end: the basis itself
    assert torch.equal(c, spherical_harmonics(lat, lon, 12))
    assert torch.equal(c, shdd.encode(lat, lon, 12))
    got, want = code.decode(c, smoothing=3.0), shdd.decode(c, smoothing=3.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(code.density(c, lat, lon), shdd.density(c, lat, lon))


def test_scale_round_trip_matches_the_constant():
    assert SHDD.scale == shdd.SCALE == pytest.approx(math.sqrt(4 * math.pi))
    lat, lon = _points(32, seed=1)
    code = SHDD(9)
    c = code.encode(lat.float(), lon.float())
    z = code.to_z(c)
    assert torch.equal(z, c * shdd.SCALE)
    assert torch.equal(code.from_z(z), z / shdd.SCALE)
    # unit variance per coefficient over the sphere (what the scale is for), on an even lattice
    glat, glon = shdd.fibonacci_lattice(20000)
    zz = code.to_z(code.encode(glat, glon))
    assert float((zz ** 2).mean()) == pytest.approx(1.0, rel=1e-3)


def test_gradients_flow_through_the_codec():
    lat, lon = _points(4, seed=2)
    lat.requires_grad_(True)
    SHDD(5).to_z(SHDD(5).encode(lat, lon)).sum().backward()
    assert lat.grad is not None and torch.isfinite(lat.grad).all()


def test_bad_degree_and_wrong_length():
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="degree"):
            SHDD(bad)
    with pytest.raises(ValueError, match=r"coeffs.*\(L\+1\)\*\*2.*10"):
        SHDD.from_dim(10)
    with pytest.raises(ValueError, match="pred"):
        SHDD.from_dim(0, name="pred")
    code = SHDD(3)
    with pytest.raises(ValueError, match="degree 3 have 16 coefficients; got 9"):
        code.decode(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="z: codes of degree 3"):
        code.from_z(torch.zeros(25))
    with pytest.raises(ValueError, match="got a scalar"):
        code.to_z(torch.tensor(1.0))
    with pytest.raises(ValueError, match="coeffs"):
        code.density(torch.zeros(3, 8), torch.zeros(3), torch.zeros(3))
