"""The one sampling loop: DDIM from pure noise, optional classifier-free guidance.

A denoiser is any callable `denoiser(z_t, t, cond, drop_cond) -> output` with z_t (B, D), t (B,) integer
timesteps, cond (B, d) conditioning and drop_cond (B,) bool or None (True: use the null condition). The
CS-UNet (locdiff.model.csunet) is one; tests use analytic ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from locdiff.model.ddim import DDIMScheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    cond: torch.Tensor,
    scheduler: DDIMScheduler,
    num_steps: int,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    *,
    dim: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one sample per row of cond.

    Args:
        denoiser: see the module docstring.
        cond: (B, d) conditioning (repeat rows for several samples per condition).
        scheduler: a DDIM scheduler; `set_timesteps(num_steps)` is called here.
        num_steps: S, the number of DDIM steps.
        generator: seeds the initial noise (and the noise of eta > 0).
        guidance_scale: w; output = uncond + w (cond - uncond). 1 disables guidance (one network call
            per step); anything else costs two.
        dim: D, the dimension of the samples.
        noise: (B, D) the initial z_T; None draws it from `generator`. Given per row (locdiff.model.predict
            derives it from each row's content), a row's sample does not depend on the other rows.
    Returns:
        (B, D) final samples z_0.
    """
    if scheduler is None:
        raise ValueError("sample() needs a scheduler")
    b = cond.shape[0]
    device = cond.device
    scheduler.set_timesteps(num_steps)
    if noise is not None:
        if tuple(noise.shape) != (b, dim):
            raise ValueError(f"noise must have shape ({b}, {dim}); got {tuple(noise.shape)}")
        z = noise.to(device, torch.float32)
    else:
        gdev = generator.device if generator is not None else device
        z = torch.randn(b, dim, generator=generator, device=gdev, dtype=torch.float32).to(device)
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        cond2 = torch.cat([cond, cond], dim=0)
        drop2 = torch.cat(
            [torch.zeros(b, dtype=torch.bool, device=device), torch.ones(b, dtype=torch.bool, device=device)]
        )
    for t in scheduler.timesteps.tolist():
        tt = torch.full((b,), t, dtype=torch.long, device=device)
        if use_cfg:
            out = denoiser(torch.cat([z, z]), torch.cat([tt, tt]), cond2, drop2).float()
            out_c, out_u = out[:b], out[b:]
            out = out_u + guidance_scale * (out_c - out_u)
        else:
            out = denoiser(z, tt, cond, None).float()
        z = scheduler.step(out, t, z, eta=eta, generator=generator).prev_sample
    return z
