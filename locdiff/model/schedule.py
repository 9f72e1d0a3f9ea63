"""The variance-preserving forward process with a cosine schedule (Nichol & Dhariwal 2021).

q(z_t | z_0) = N(sqrt(abar_t) z_0, (1 - abar_t) I),  abar_t = f(t) / f(0),
f(t) = cos^2(((t + 1) / T + s) / (1 + s) * pi / 2),  t = 0 .. T-1,
with betas clipped at 0.999 (as diffusers' "squaredcos_cap_v2"). Never imports the network.
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """VP cosine schedule with T discrete steps.

    Attributes:
        alphas_cumprod: (T,) float64, abar_t for t = 0 .. T-1 (decreasing from ~1 to ~0).
    """

    def __init__(self, timesteps: int = 1000, *, s: float = 0.008, max_beta: float = 0.999) -> None:
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1; got {timesteps}")
        self.timesteps = int(timesteps)

        def f(t: float) -> float:
            return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - f(i + 1) / f(i), max_beta) for i in range(timesteps)], dtype=torch.float64
        )
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._device_copies: dict[str, torch.Tensor] = {}

    def _on(self, device: torch.device) -> torch.Tensor:
        """alphas_cumprod on `device`, copied there once (a copy per step would wait for the device)."""
        cached = self._device_copies.get(str(device))
        if cached is None:
            cached = self._device_copies[str(device)] = self.alphas_cumprod.to(device)
        return cached

    def coefficients(
        self, t: torch.Tensor, *, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) for integer timesteps t (any shape), on t's device."""
        if t.dtype.is_floating_point:
            raise ValueError("timesteps must be integers in [0, T)")
        # checked where it costs no device round trip (on CUDA, the index below asserts on the device
        # instead: the range check would stall the training loop on a host sync every step)
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.timesteps}); got range [{int(t.min())}, {int(t.max())}]"
            )
        ab = self._on(t.device)[t]
        return ab.sqrt().to(dtype), (1 - ab).sqrt().to(dtype)

    def add_noise(self, sample: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) noise.

        Args:
            sample: z_0, (B, D).
            noise: (B, D) standard normal.
            t: (B,) integer timesteps.
        """
        a, b = self.coefficients(t, dtype=sample.dtype)
        shape = (-1,) + (1,) * (sample.dim() - 1)
        return a.view(shape) * sample + b.view(shape) * noise

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor,
                   prediction_type: str = "sample") -> torch.Tensor:
        """The z_0 estimate from a network output at (z_t = sample, t): the output itself for x0-prediction,
        (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) for epsilon-prediction. The one place this
        conversion is written (training losses, validation and DDIM all call it).

        Args:
            model_output, sample: (B, D). t: (B,) integer timesteps.
        """
        if prediction_type == "sample":
            return model_output
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type must be 'sample' or 'epsilon'; got {prediction_type!r}")
        a, s = self.coefficients(t, dtype=sample.dtype)
        shape = (-1,) + (1,) * (sample.dim() - 1)
        return (sample - s.view(shape) * model_output) / a.view(shape).clamp_min(1e-4)
