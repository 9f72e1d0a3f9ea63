import math

import pytest
import torch

from locdiff.model.ddim import DDIMScheduler
from locdiff.model.schedule import NoiseSchedule


def test_cosine_schedule_matches_closed_form():
    s = NoiseSchedule(1000)
    ab = s.alphas_cumprod
    assert ab.shape == (1000,)
    assert torch.all(ab[1:] < ab[:-1])
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):  # away from the clipped end the product telescopes to f(t+1)/f(0)
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert ab[-1] < 1e-4


def test_add_noise_statistics():
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(0)
    z0 = torch.ones(20000, 4)
    t = torch.full((20000,), 500)
    zt = s.add_noise(z0, torch.randn(z0.shape, generator=g), t)
    a = s.alphas_cumprod[500].sqrt().item()
    assert zt.mean().item() == pytest.approx(a, abs=0.02)
    assert zt.std().item() == pytest.approx(math.sqrt(1 - a * a), abs=0.02)
    with pytest.raises(ValueError, match="timesteps must lie"):
        s.add_noise(z0[:1], z0[:1], torch.tensor([1000]))


def test_ddim_timesteps_and_errors():
    d = DDIMScheduler(NoiseSchedule(1000))
    with pytest.raises(ValueError, match="set_timesteps"):
        d.step(torch.zeros(1, 2), 999, torch.zeros(1, 2))
    d.set_timesteps(50)
    ts = d.timesteps.tolist()
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19
    assert all(a - b == 20 for a, b in zip(ts, ts[1:], strict=False))
    with pytest.raises(ValueError, match="num_inference_steps"):
        d.set_timesteps(0)
    with pytest.raises(ValueError, match="not one of"):
        d.step(torch.zeros(1, 2), 998, torch.zeros(1, 2))


def test_ddim_with_the_true_x0_returns_it():
    # If the model always predicts the true z0, deterministic DDIM ends exactly at z0 from any start.
    d = DDIMScheduler(NoiseSchedule(1000))
    d.set_timesteps(10)
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    for t in d.timesteps.tolist():
        out = d.step(x0, t, z)
        assert torch.equal(out.pred_original_sample, x0)
        z = out.prev_sample
    assert torch.allclose(z, x0, atol=1e-5)


def test_epsilon_and_sample_predictions_agree():
    sched = NoiseSchedule(1000)
    a, b = DDIMScheduler(sched, "sample"), DDIMScheduler(sched, "epsilon")
    a.set_timesteps(20)
    b.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    t = a.timesteps[3].item()
    ab = sched.alphas_cumprod[t].item()
    eps = (z - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    assert torch.allclose(a.step(x0, t, z).prev_sample, b.step(eps, t, z).prev_sample, atol=1e-5)
