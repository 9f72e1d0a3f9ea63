"""Bad input gets a ValueError naming the argument and the value."""

import pytest
import torch

from locdiff import shdd


@pytest.mark.parametrize("lat,lon,needle", [
    (float("nan"), 0.0, "lat"), (91.0, 0.0, "lat"), (-90.5, 0.0, "lat"),
    (0.0, float("nan"), "lon"), (0.0, 400.0, "lon"), (0.0, -181.0, "lon"),
])
def test_bad_coordinates(lat, lon, needle):
    with pytest.raises(ValueError, match=needle) as err:
        shdd.encode(torch.tensor([0.0, lat]), torch.tensor([0.0, lon]), 4)
    assert "index 1" in str(err.value)


def test_bad_degree_and_length():
    with pytest.raises(ValueError, match="degree.*-1"):
        shdd.encode(0.0, 0.0, -1)
    with pytest.raises(ValueError, match="degree"):
        shdd.encode(0.0, 0.0, 2.5)
    with pytest.raises(ValueError, match=r"coeffs.*\(L\+1\)\*\*2.*10"):
        shdd.decode(torch.zeros(10))
    with pytest.raises(ValueError, match="coeffs"):
        shdd.density(torch.zeros(3, 8), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        shdd.decode(torch.full((9,), float("nan")))
    with pytest.raises(ValueError, match="same shape"):
        shdd.kl_loss(torch.zeros(2, 9), torch.zeros(3, 9))
