"""The DDIM sampler with an analytically optimal denoiser recovers a known conditional distribution."""

import pytest
import torch

from locdiff.model.ddim import DDIMScheduler
from locdiff.model.sampler import sample
from locdiff.model.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule(1000)
MU = torch.tensor([2.0, -1.0, 1.5])  # the two modes are +MU and -MU
SIGMA = 0.1


def gmm_denoiser(z, t, cond, drop):
    """E[z0 | z_t] for z0 ~ p N(+MU, s^2) + (1-p) N(-MU, s^2), p = cond[:, 0] (1/2 where dropped)."""
    ab = SCHEDULE.alphas_cumprod[t].to(z.dtype)[:, None]
    a, var_n = ab.sqrt(), 1 - ab
    p = cond[:, :1]
    if drop is not None:
        p = torch.where(drop[:, None], torch.full_like(p, 0.5), p)
    var = a * a * SIGMA**2 + var_n  # marginal variance of z_t around a*mu_i
    logits = []
    for sign, w in ((1.0, p), (-1.0, 1 - p)):
        logits.append(
            torch.log(w.clamp_min(1e-12)) - ((z - a * sign * MU) ** 2).sum(-1, keepdim=True) / (2 * var)
        )
    post = torch.softmax(torch.cat(logits, dim=1), dim=1)  # (B, 2) component posteriors
    gain = a * SIGMA**2 / var
    means = [sign * MU + gain * (z - a * sign * MU) for sign in (1.0, -1.0)]
    return post[:, :1] * means[0] + post[:, 1:] * means[1]


def _share_positive(z):
    return ((z @ MU) > 0).float().mean().item()


@pytest.mark.parametrize("p", [0.7, 0.25])
def test_both_modes_in_the_right_proportion(p):
    n = 4000
    cond = torch.full((n, 1), p)
    z = sample(gmm_denoiser, cond, DDIMScheduler(SCHEDULE), 50, torch.Generator().manual_seed(0), dim=3)
    share = _share_positive(z)
    assert share == pytest.approx(p, abs=0.03)  # binomial sd ~0.007
    # every sample ends on one of the modes, with the mode's spread
    dist = torch.minimum((z - MU).norm(dim=1), (z + MU).norm(dim=1))
    assert dist.max().item() < 6 * SIGMA * 3**0.5
    # 50 DDIM steps shrink the spread (0.76 of it here: the ODE's discretization error, never a widening); it
    # converges to the mode's as the steps grow (0.97 at 500; the seeded mean's sd is about 0.013)
    assert 0.6 < dist.pow(2).mean().item() / (3 * SIGMA**2) < 1.0
    z = sample(gmm_denoiser, cond, DDIMScheduler(SCHEDULE), 500, torch.Generator().manual_seed(0), dim=3)
    dist = torch.minimum((z - MU).norm(dim=1), (z + MU).norm(dim=1))
    assert dist.pow(2).mean().item() == pytest.approx(3 * SIGMA**2, rel=0.05)


def test_conditional_per_row_and_seeded():
    cond = torch.cat([torch.full((2000, 1), 0.9), torch.full((2000, 1), 0.1)])
    g = torch.Generator().manual_seed(1)
    z = sample(gmm_denoiser, cond, DDIMScheduler(SCHEDULE), 25, g, dim=3)
    assert _share_positive(z[:2000]) == pytest.approx(0.9, abs=0.03)
    assert _share_positive(z[2000:]) == pytest.approx(0.1, abs=0.03)
    z2 = sample(gmm_denoiser, cond, DDIMScheduler(SCHEDULE), 25, torch.Generator().manual_seed(1), dim=3)
    assert torch.equal(z, z2)


def test_classifier_free_guidance_sharpens_toward_the_condition():
    # guidance w > 1 pushes samples toward the conditional mode beyond the plain conditional share
    cond = torch.full((3000, 1), 0.7)
    plain = sample(gmm_denoiser, cond, DDIMScheduler(SCHEDULE), 25, torch.Generator().manual_seed(2), dim=3)
    guided = sample(
        gmm_denoiser,
        cond,
        DDIMScheduler(SCHEDULE),
        25,
        torch.Generator().manual_seed(2),
        guidance_scale=3.0,
        dim=3,
    )
    assert _share_positive(guided) > _share_positive(plain) + 0.1
    unguided = sample(
        gmm_denoiser,
        cond,
        DDIMScheduler(SCHEDULE),
        25,
        torch.Generator().manual_seed(2),
        guidance_scale=1.0,
        dim=3,
    )
    assert torch.equal(unguided, plain)


def test_needs_a_scheduler():
    with pytest.raises(ValueError, match="scheduler"):
        sample(gmm_denoiser, torch.zeros(1, 1), None, 5, dim=3)
