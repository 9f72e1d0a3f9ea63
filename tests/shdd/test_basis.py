"""The SH basis against scipy, by quadrature and by the addition theorem."""

import math

import numpy as np
import pytest
import torch
from scipy.special import eval_legendre, sph_harm_y

from locdiff import shdd
from locdiff.geo import latlon_to_unit, random_points
from locdiff.shdd.basis import spherical_harmonics


def scipy_real_sh(lat, lon, L):
    """Real orthonormal harmonics from scipy's complex sph_harm_y: sqrt2 (-1)^m Re / Im."""
    th, ph = np.deg2rad(90 - lat), np.deg2rad(lon)
    out = np.zeros((len(lat), (L + 1) ** 2))
    for l in range(L + 1):
        for m in range(-l, l + 1):
            c = sph_harm_y(l, abs(m), th, ph)
            if m == 0:
                v = c.real
            elif m > 0:
                v = math.sqrt(2) * (-1) ** m * c.real
            else:
                v = math.sqrt(2) * (-1) ** m * c.imag
            out[:, l * l + l + m] = v
    return out


def test_matches_scipy_float64_to_1e10():
    lat, lon = random_points(40, seed=3)
    special = torch.tensor([[90, 0], [-90, 0], [89.9999, 10], [-89.9999, -10], [0, 180], [0, -180],
                            [10, 179.99999], [-10, -179.99999], [45, 0]], dtype=torch.float64)
    lat = torch.cat([lat, special[:, 0]])
    lon = torch.cat([lon, special[:, 1]])
    ours = shdd.encode(lat, lon, 64).numpy()
    ref = scipy_real_sh(lat.numpy(), lon.numpy(), 64)
    assert np.abs(ours - ref).max() < 1e-10


def test_float32_close_to_float64():
    lat, lon = random_points(200, seed=4)
    y64 = shdd.encode(lat, lon, 64)
    y32 = shdd.encode(lat.float(), lon.float(), 64)
    assert y32.dtype == torch.float32
    assert (y32.double() - y64).abs().max() < 1e-3


def test_orthonormal_by_quadrature():
    # Gauss-Legendre in cos(theta) x uniform in phi integrates degree <= 2L exactly
    L = 24
    x, w = np.polynomial.legendre.leggauss(L + 1)
    n_phi = 2 * L + 2
    phi = np.arange(n_phi) * 360.0 / n_phi - 180
    lat = np.rad2deg(np.arcsin(x))
    la, lo = np.meshgrid(lat, phi, indexing="ij")
    weights = np.repeat(w, n_phi) * (2 * np.pi / n_phi)
    y = shdd.encode(torch.tensor(la.ravel()), torch.tensor(lo.ravel()), L).numpy()
    gram = (y * weights[:, None]).T @ y
    assert np.abs(gram - np.eye((L + 1) ** 2)).max() < 1e-12


@pytest.mark.parametrize("L", [1, 64, 256, 512])
def test_addition_theorem_float64(L):
    lat, lon = random_points(12, seed=L)
    lat2, lon2 = random_points(12, seed=L + 1)
    # points near and at the poles, and near each other
    lat[:3] = torch.tensor([90.0, -89.99999, 89.9])
    lat2[:3] = torch.tensor([89.99, -90.0, 89.9])
    lon2[2] = lon[2] + 1e-4
    ya = spherical_harmonics(lat, lon, L)
    yb = spherical_harmonics(lat2, lon2, L)
    assert torch.isfinite(ya).all() and torch.isfinite(yb).all()
    cosg = (latlon_to_unit(lat, lon) * latlon_to_unit(lat2, lon2)).sum(-1).clamp(-1, 1).numpy()
    for l in range(L + 1):
        s = (ya[:, l * l:(l + 1) ** 2] * yb[:, l * l:(l + 1) ** 2]).sum(-1).numpy()
        ref = (2 * l + 1) / (4 * np.pi) * eval_legendre(l, cosg)
        assert np.abs(s - ref).max() < 1e-9, l
        # same point: sum_m Y_lm(x)^2 = (2l+1)/(4 pi) exactly, also at the poles (no underflow loss)
        s2 = (ya[:, l * l:(l + 1) ** 2] ** 2).sum(-1).numpy()
        assert np.abs(s2 - (2 * l + 1) / (4 * np.pi)).max() < 1e-9, l


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_code_norm(dtype):
    lat, lon = random_points(300, seed=5, dtype=dtype)
    for L in (0, 3, 32, 128):
        y = shdd.encode(lat, lon, L)
        n2 = (y.double() ** 2).sum(-1)
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        assert torch.allclose(n2, torch.full_like(n2, (L + 1) ** 2 / (4 * math.pi)), rtol=tol)


def test_fast_and_differentiable_paths_agree_and_gradcheck():
    lat, lon = random_points(30, seed=6)
    fast = spherical_harmonics(lat, lon, 20)
    slow = spherical_harmonics(lat.clone().requires_grad_(), lon, 20)
    assert torch.allclose(fast, slow.detach(), atol=1e-13)
    la = lat[:4].clone().requires_grad_()
    lo = lon[:4].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: spherical_harmonics(a, b, 6), (la, lo))


def test_batched_shapes():
    lat = torch.zeros(2, 3, 4)
    assert shdd.encode(lat, lat, 5).shape == (2, 3, 4, 36)
    assert shdd.encode(10.0, 20.0, 2).shape == (9,)
