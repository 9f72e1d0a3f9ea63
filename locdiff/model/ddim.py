"""DDIM (Song et al. 2021) as a scheduler that never sees the network; the sampler owns the loop.

scheduler = DDIMScheduler(NoiseSchedule(1000))
scheduler.set_timesteps(50)
for t in scheduler.timesteps:
    x0 = denoiser(z, t, cond)
    z = scheduler.step(x0, t, z).prev_sample
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from locdiff.model.schedule import NoiseSchedule


@dataclass
class DDIMSchedulerOutput:
    prev_sample: torch.Tensor  # z_{t_prev}, (B, D)
    pred_original_sample: torch.Tensor  # the z_0 estimate used for the step, (B, D)


class DDIMScheduler:
    """Deterministic (eta = 0 by default) DDIM steps over a NoiseSchedule.

    Args:
        schedule: the training noise schedule.
        prediction_type: what the model outputs: "sample" (z_0) or "epsilon".
    """

    def __init__(
        self, schedule: NoiseSchedule, prediction_type: Literal["sample", "epsilon"] = "sample"
    ) -> None:
        if prediction_type not in ("sample", "epsilon"):
            raise ValueError(f"prediction_type must be 'sample' or 'epsilon'; got {prediction_type!r}")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose S timesteps, "trailing" spacing: T-1, T-1-T/S, ..., down to about T/S - 1.

        Trailing spacing starts from t = T-1 (pure noise), which leading spacing does not.
        """
        T = self.schedule.timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}]; got {num_inference_steps}")
        ts = torch.round(torch.arange(T, 0, -T / num_inference_steps, dtype=torch.float64)) - 1
        self.timesteps = ts.to(torch.long)[:num_inference_steps]
        self.num_inference_steps = num_inference_steps

    def _prev(self, t: int) -> int:
        ts = self.timesteps.tolist()
        i = ts.index(t)
        return ts[i + 1] if i + 1 < len(ts) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> DDIMSchedulerOutput:
        """One reverse step z_t -> z_{t_prev} (DDIM eq. 12).

        Args:
            model_output: (B, D) the network output at (sample, t): z_0 or epsilon.
            timestep: the current t, one of `self.timesteps`.
            sample: z_t, (B, D).
            eta: 0 is deterministic DDIM; 1 is DDPM-like. Noise needs `generator` for reproducibility.
        """
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        t = int(timestep)
        if t not in self.timesteps.tolist():
            raise ValueError(f"timestep {t} is not one of the scheduled timesteps")
        prev_t = self._prev(t)
        ac = self.schedule.alphas_cumprod
        # 1. abar at t and at the previous step (abar = 1 past the end: the clean sample)
        ab_t = float(ac[t])
        ab_prev = float(ac[prev_t]) if prev_t >= 0 else 1.0
        # 2. z_0 and epsilon estimates from the model output (the schedule owns the conversion)
        tt = torch.full(sample.shape[:1], t, dtype=torch.long, device=sample.device)
        x0 = self.schedule.predict_x0(model_output, sample, tt, self.prediction_type)
        eps = model_output if self.prediction_type == "epsilon" else (sample - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
        # 3. sigma_t (eq. 16) and the direction pointing to z_t
        var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        sigma = eta * max(var, 0.0) ** 0.5
        direction = max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
        # 4. z_{t_prev} = sqrt(abar_prev) z_0 + direction (+ sigma noise)
        prev = ab_prev**0.5 * x0 + direction
        if sigma > 0:
            gdev = generator.device if generator is not None else sample.device
            noise = torch.randn(sample.shape, generator=generator, device=gdev, dtype=sample.dtype)
            prev = prev + sigma * noise.to(sample.device)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
