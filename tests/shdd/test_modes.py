"""Modes of an SHDD density and the mass around them, against known mixtures and a brute-force integral."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from locdiff import shdd
from locdiff.geo import haversine_km
from locdiff.shdd.basis import spherical_harmonics
from locdiff.shdd.modes import SMOOTHING, density_modes, mass_within

PLACES = [(48.85, 2.35, 0.5), (40.71, -74.0, 0.3), (-33.87, 151.21, 0.2)]  # Paris, New York, Sydney


def mixture(points, degree):
    return sum(w * shdd.encode(torch.tensor(la, dtype=torch.float64), torch.tensor(lo, dtype=torch.float64), degree)
               for la, lo, w in points)


@pytest.mark.parametrize("degree", [16, 32])
def test_modes_of_a_mixture_are_its_points_with_their_weights(degree):
    # the probabilities are the L/3 density's mass: at degree 16 the L/4 density's would be off by 0.056
    code = mixture(PLACES, degree)[None]
    m = density_modes(code, top_k=5)
    assert m.count()[0] == 3  # no spurious mode from the truncation's ringing
    for j, (la, lo, w) in enumerate(PLACES):  # heaviest first
        assert haversine_km(m.lat[0, j], m.lon[0, j], la, lo) < 1500.0 / degree  # the others ring a little
        assert m.probability[0, j] == pytest.approx(w, abs=0.04)
    assert np.nansum(m.probability[0]) <= 1.0 + 1e-9


def test_top_k_is_ordered_distinct_and_sums_to_at_most_one():
    rng = np.random.default_rng(0)
    codes = []
    for _ in range(12):  # random mixtures of 1 to 8 points, some close together
        n = int(rng.integers(1, 9))
        lat, lon = rng.uniform(-70, 70, n), rng.uniform(-180, 180, n)
        w = rng.dirichlet(np.ones(n))
        codes.append(mixture(zip(lat, lon, w, strict=True), 24))
    m = density_modes(torch.stack(codes), top_k=4)
    assert m.lat.shape == (12, 4)
    for i in range(12):
        k = m.count()[i]
        p = m.probability[i, :k]
        assert k >= 1 and np.all(np.isnan(m.probability[i, k:]))
        assert np.all(np.diff(p) <= 1e-12) and p.sum() <= 1.0 + 1e-9 and np.all(p > 0)
        for a in range(k):
            for b in range(a + 1, k):
                assert haversine_km(m.lat[i, a], m.lon[i, a], m.lat[i, b], m.lon[i, b]) >= 100.0


def test_a_codes_modes_do_not_depend_on_top_k_or_the_other_codes():
    """One photo, one answer, its top-k modes included: a code's modes are the same (to 1e-6 degrees) for
    top_k 1 or 5, alone, among others or in reverse order (the refinement ran in float32 once: its rounding
    depended on how many points were refined at once, and moved modes by hundreds of metres)."""
    rng = np.random.default_rng(1)
    codes = []
    for _ in range(48):  # the mean of K = 4 samples' codes, float32 as `predict` gives them
        lat, lon = rng.uniform(-60, 60) + rng.normal(0, 5, 4), rng.uniform(-170, 170) + rng.normal(0, 8, 4)
        codes.append(mixture(zip(lat, lon, np.full(4, 0.25), strict=True), 16))
    codes = torch.stack(codes).float().numpy()
    ref = density_modes(codes, top_k=5)
    for got, rows, k in ((density_modes(codes, top_k=1), slice(None), 1),
                         (density_modes(codes[7:8], top_k=5), slice(7, 8), 5),
                         (density_modes(codes[::-1].copy(), top_k=5), slice(None, None, -1), 5)):
        for name in ("lat", "lon", "probability"):
            np.testing.assert_allclose(getattr(got, name), getattr(ref, name)[rows, :k], atol=1e-6, err_msg=name)


def test_close_points_are_one_mode():
    code = mixture([(10.0, 20.0, 0.5), (10.3, 20.3, 0.5)], 64)[None]  # ~46 km apart: one peak at L = 64
    m = density_modes(code, top_k=3, min_separation_km=100.0)
    assert m.count()[0] == 1 and m.probability[0, 0] == pytest.approx(1.0, abs=0.02)
    assert haversine_km(m.lat[0, 0], m.lon[0, 0], 10.15, 20.15) < 30.0


def test_smoothing_trades_resolution_for_fewer_ringing_modes():
    """Two places 10 degrees of longitude apart (~1,100 km) at L = 32: the lightly tapered code (width L) has
    them as two modes of about half the mass each, plus ringing; the default taper (L/4) has one mode between them."""
    code = mixture([(10.0, 20.0, 0.5), (10.0, 30.0, 0.5)], 32)[None]
    sharp = density_modes(code, top_k=3, min_separation_km=50.0, smoothing=1.0)
    assert sorted(np.round(sharp.lon[0, :2])) == [20.0, 30.0] and np.all(sharp.probability[0, :2] > 0.4)
    smooth = density_modes(code, top_k=3, min_separation_km=50.0)
    assert smooth.count()[0] == 1
    assert haversine_km(smooth.lat[0, 0], smooth.lon[0, 0], 10.0, 25.0) < 50.0
    assert smooth.probability[0, 0] == pytest.approx(1.0, abs=1e-9)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="smoothing"):
            density_modes(code, smoothing=bad)


def test_mass_within_matches_a_brute_force_integral():
    """The share of the (tapered, l = 0 dropped, positive part of the) density within a radius, against
    an integral over 400,000 points of a Fibonacci lattice (equal areas) computed from the basis."""
    degree = 12
    code = mixture(PLACES, degree)
    n = 400_000
    i = torch.arange(n, dtype=torch.float64) + 0.5
    lat = torch.rad2deg(torch.asin(1 - 2 * i / n))
    lon = torch.rad2deg(torch.remainder(math.pi * (3 - math.sqrt(5)) * i, 2 * math.pi)) - 180
    l = torch.cat([torch.full((2 * k + 1,), float(k), dtype=torch.float64) for k in range(degree + 1)])
    taper = torch.exp(-l * (l + 1) / (2 * (degree / SMOOTHING) ** 2))
    taper[0] = 0.0
    f = (spherical_harmonics(lat, lon, degree) @ (code * taper)).clamp_min(0).numpy()
    for la, lo, _ in PLACES:
        for radius in (1500.0, 3000.0):
            inside = haversine_km(lat.numpy(), lon.numpy(), la, lo) <= radius
            expected = f[inside].sum() / f.sum()
            got = mass_within(code[None], np.array([la]), np.array([lo]), radius)[0]
            assert got == pytest.approx(expected, abs=0.02), (la, lo, radius)


def test_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        density_modes(torch.zeros(1, 16), top_k=0)
    with pytest.raises(ValueError, match=r"\(L\+1\)\*\*2"):
        density_modes(torch.zeros(1, 15))
