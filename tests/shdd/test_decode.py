"""decode(encode(x)) round trips, mixtures, noise, density and the losses."""

import pytest
import torch

from locdiff import shdd
from locdiff.geo import haversine_km, random_points


def _points(n, dtype, seed):
    lat, lon = random_points(n, seed=seed, dtype=dtype)
    lat[:4] = torch.tensor([90.0, -90.0, 89.999, -89.9], dtype=dtype)
    lon[4:8] = torch.tensor([180.0, -180.0, 179.9999, -179.9999], dtype=dtype)
    lat[8:10] = torch.tensor([0.0, 0.0], dtype=dtype)
    return lat, lon


@pytest.mark.parametrize("L", [4, 8, 16, *(pytest.param(L, marks=pytest.mark.slow) for L in (32, 64, 128))])
@pytest.mark.parametrize("dtype,tol_km", [(torch.float64, 0.1), (torch.float32, 1.0)])
def test_roundtrip(L, dtype, tol_km):
    n = {64: 2_000, 128: 400}.get(L, 10_000)  # the decode grid grows with L: fewer points keep it quick
    lat, lon = _points(n, dtype, seed=L)
    la, lo, val = shdd.decode(shdd.encode(lat, lon, L))
    assert la.dtype == dtype and la.shape == (n,)
    d = haversine_km(lat.double(), lon.double(), la.double(), lo.double())
    assert d.max().item() < tol_km
    peak = (L + 1) ** 2 / (4 * torch.pi)
    assert torch.allclose(val.double(), torch.full((n,), peak, dtype=torch.float64), rtol=1e-3)


def test_sum_of_two_far_places_decodes_to_one_of_them():
    L = 32
    a = (48.85, 2.35)  # Paris
    b = (-33.87, 151.21)  # Sydney
    c = shdd.encode(torch.tensor([a[0], b[0]]), torch.tensor([a[1], b[1]]), L).sum(0)
    lat, lon, _ = shdd.decode(c)
    da = haversine_km(lat, lon, torch.tensor(a[0]), torch.tensor(a[1]))
    db = haversine_km(lat, lon, torch.tensor(b[0]), torch.tensor(b[1]))
    # the other kernel's side lobes tilt the sum slightly, so the mode of the sum sits a few km from
    # the place (the kernel is ~430 km wide at L = 32); it must not land between the two
    assert min(da.item(), db.item()) < 10.0
    # a heavier weight on b picks b
    c2 = shdd.encode(torch.tensor(a[0]), torch.tensor(a[1]), L) + 1.2 * shdd.encode(
        torch.tensor(b[0]), torch.tensor(b[1]), L)
    lat, lon, _ = shdd.decode(c2)
    assert haversine_km(lat, lon, torch.tensor(b[0]), torch.tensor(b[1])).item() < 10.0


def _sharp_and_broad(L=32):
    """One delta at Paris (weight 1) and six of weight 0.3 on a 400 km ring around a point in Australia:
    the single peak is the higher one, the ring holds more mass."""
    import math

    centre = (-25.0, 135.0)
    d = math.degrees(400.0 / 6371.0)
    lat = [48.85] + [centre[0] + d * math.cos(2 * math.pi * k / 6) for k in range(6)]
    lon = [2.35] + [centre[1] + d * math.sin(2 * math.pi * k / 6) / math.cos(math.radians(centre[0]))
                    for k in range(6)]
    codes = shdd.encode(torch.tensor(lat, dtype=torch.float64), torch.tensor(lon, dtype=torch.float64), L)
    weights = torch.tensor([1.0] + [0.3] * 6, dtype=torch.float64)
    return (weights[:, None] * codes).sum(0), (48.85, 2.35), centre


def test_smoothed_decode_picks_the_peak_with_more_mass_and_places_it_on_the_raw_code():
    from locdiff.shdd.grid import fibonacci_lattice

    code, sharp, broad = _sharp_and_broad()
    # the reference, independent of the decoder: f_c on a dense lattice; the highest point is at the single
    # delta, but the mass of f_c within 1,000 km is larger around the ring
    glat, glon = fibonacci_lattice(200_000)
    f = shdd.density(code, glat, glon)
    top = f.argmax()  # the lattice spacing is ~50 km
    assert haversine_km(glat[top], glon[top], torch.tensor(sharp[0]), torch.tensor(sharp[1])).item() < 50.0

    def mass(p):
        near = haversine_km(glat, glon, torch.tensor(p[0]), torch.tensor(p[1])) <= 1000.0
        return f[near].sum().item()

    assert mass(broad) > 1.5 * mass(sharp)

    lat, lon, val = shdd.decode(code)  # the plain argmax: the sharp peak
    assert haversine_km(lat, lon, torch.tensor(sharp[0]), torch.tensor(sharp[1])).item() < 10.0
    lat, lon, val = shdd.decode(code, smoothing=3.0)  # the peak with more mass around it
    assert haversine_km(lat, lon, torch.tensor(broad[0]), torch.tensor(broad[1])).item() < 100.0
    # ... placed on the raw code: the value returned is raw f_c there, and no point 2 km away is higher
    assert torch.allclose(val, shdd.density(code, lat, lon), rtol=1e-9)
    step = 2.0 / 111.0
    around = shdd.density(code, torch.stack([lat + step, lat - step, lat, lat]),
                          torch.stack([lon, lon, lon + step, lon - step]))
    assert (around <= val).all()


@pytest.mark.parametrize("L", [8, 32])
def test_smoothed_decode_keeps_a_single_place_exact(L):
    lat, lon = _points(2_000, torch.float64, seed=L)
    la, lo, val = shdd.decode(shdd.encode(lat, lon, L), smoothing=3.0)
    assert haversine_km(lat, lon, la, lo).max().item() < 0.1
    assert torch.allclose(val, torch.full_like(val, (L + 1) ** 2 / (4 * torch.pi)), rtol=1e-3)
    with pytest.raises(ValueError, match="smoothing"):
        shdd.decode(shdd.encode(lat[:2], lon[:2], L), smoothing=-1.0)
    # batch shapes are kept, and an empty batch gives empty results
    la2, _, _ = shdd.decode(shdd.encode(lat[:6], lon[:6], L).reshape(2, 3, -1), smoothing=3.0)
    assert la2.shape == (2, 3)
    assert shdd.decode(torch.zeros(0, (L + 1) ** 2, dtype=torch.float64), smoothing=3.0)[0].shape == (0,)


def test_noise_degrades_gracefully():
    L = 32
    g = torch.Generator().manual_seed(0)
    lat, lon = random_points(400, seed=9)
    code = shdd.encode(lat, lon, L)
    rms = code.pow(2).mean().sqrt()
    medians = []
    for sigma in [0.0, 0.1, 0.2, 0.4, 0.8]:
        noisy = code + sigma * rms * torch.randn(code.shape, generator=g, dtype=code.dtype)
        la, lo, _ = shdd.decode(noisy)
        medians.append(haversine_km(lat, lon, la, lo).median().item())
    # the error grows with the noise ...
    assert all(b >= a for a, b in zip(medians, medians[1:], strict=False))
    # ... without jumping: small noise gives small errors (well inside the ~430 km kernel)
    assert medians[0] < 0.1 and medians[1] < 50 and medians[2] < 100


def test_density_shapes_and_peak():
    L = 16
    c = shdd.encode(torch.tensor([10.0, -20.0]), torch.tensor([30.0, 40.0]), L)  # (2, D)
    one = shdd.density(c, torch.tensor([10.0, -20.0]), torch.tensor([30.0, 40.0]))
    assert one.shape == (2,)
    assert torch.allclose(one, torch.full((2,), (L + 1) ** 2 / (4 * torch.pi), dtype=c.dtype))
    many = shdd.density(c, torch.zeros(2, 5), torch.zeros(2, 5))
    assert many.shape == (2, 5)
    grid = shdd.density(c[0], torch.zeros(3, 4), torch.zeros(3, 4))
    assert grid.shape == (3, 4)


def test_kl_loss_properties():
    L = 8
    lat, lon = random_points(6, seed=1)
    target = shdd.encode(lat, lon, L)
    assert shdd.kl_loss(target, target).abs().item() < 1e-12
    g = torch.Generator().manual_seed(1)
    pred = target + torch.randn(target.shape, generator=g, dtype=torch.float64)
    assert shdd.kl_loss(pred, target, reduction="none").min().item() >= 0
    p = pred[:2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: shdd.kl_loss(x, target[:2], grid_size=200), (p,))
    # a prediction moving towards its target: the loss falls monotonically
    losses = []
    for frac in [1.0, 0.5, 0.25, 0.1, 0.0]:
        code = shdd.encode(torch.tensor(lat[0] + frac * 20 if lat[0] < 60 else lat[0] - frac * 20),
                           lon[0], L)
        losses.append(shdd.kl_loss(code, target[0]).item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 1e-12


def test_mse_loss():
    a = torch.zeros(3, 9)
    b = torch.ones(3, 9)
    assert shdd.mse_loss(a, b).item() == 1.0
    assert shdd.mse_loss(a, b, reduction="none").shape == (3,)
