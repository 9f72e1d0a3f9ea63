"""`flow`: conditional flow matching directly on the coordinates (PLONK style).

The location is its unit vector x1 in R^3. Training (rectified flow / conditional OT path): x0 ~ N(0, I),
t ~ U(0, 1), x_t = (1 - t) x0 + t x1, and an MLP regresses either the velocity x1 - x0 (`target:
velocity`) or the clean point x1 (`target: x1`, the default: the velocity is then (x1_hat - x_t) / (1 - t);
same path and sampler, a loss reweighted towards late t, which trains faster on small data).
Sampling integrates dx/dt = v from t = 0 to 1 with `steps` Heun (or Euler) steps for `samples` noise draws
per image; each end point is projected to the sphere. The answer is the sample with the most other samples
within `mode_radius_km` ("mode") or the normalised mean ("mean"); the confidence is the fraction of
samples supporting the answer (mode) or the mean resultant length (mean). An image's noise is seeded by the
seed and its own embedding (`locdiff.model.predict.row_seeds`), so its answer does not depend on the other
images, their order or the batch size; images x samples integrated at once are bounded by CHUNK_POINTS.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from locdiff.baselines.mlp import TrainedBaseline
from locdiff.baselines.options import FlowOptions
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_unit, unit_to_latlon
from locdiff.methods import Prediction
from locdiff.model.predict import row_noise, row_seeds
from locdiff.tables import EmbeddingTable

CHUNK_POINTS = 65_536  # images x samples integrated at once (predict_batch is cut to fit)


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) in [0, 1] -> (B, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0, math.log(1000.0), half, device=t.device))
    a = t[:, None] * freqs[None] * math.pi
    return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


class VelocityNet(nn.Module):
    """v(x_t, t, embedding): the embedding's projection is computed once per image and reused at every
    ODE step (sampling evaluates the net samples x steps times per image)."""

    def __init__(self, emb_dim: int, o: FlowOptions):
        super().__init__()
        self.emb_dim, self.time_dim = emb_dim, o.time_dim
        self.cond = nn.Sequential(nn.Linear(emb_dim, o.hidden), nn.GELU(), nn.Linear(o.hidden, o.hidden))
        self.inp = nn.Linear(3 + o.time_dim, o.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(o.hidden), nn.Linear(o.hidden, o.hidden), nn.GELU(),
                          nn.Dropout(o.dropout), nn.Linear(o.hidden, o.hidden))
            for _ in range(o.depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(o.hidden), nn.Linear(o.hidden, 3))

    def condition(self, emb: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, hidden)
        return self.cond(emb)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, 3), t (B,), cond (B, hidden) -> velocity (B, 3)."""
        h = self.inp(torch.cat([x, time_features(t, self.time_dim)], dim=1)) + cond
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, t, self.condition(emb))


class FlowMethod(TrainedBaseline):
    name = "flow"
    options_cls = FlowOptions

    def build_net(self, embed_dim: int) -> nn.Module:
        return VelocityNet(embed_dim, self.options)

    def loss(self, net, batch: dict[str, Any], generator: torch.Generator):
        x1 = latlon_to_unit(batch["lat"], batch["lon"]).float()
        g = generator.device
        x0 = torch.randn(x1.shape, generator=generator, device=g).to(x1.device)
        t = torch.rand(len(x1), generator=generator, device=g).to(x1.device)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        out = net(xt, t, batch["embedding"]).float()
        target = x1 if self.options.target == "x1" else x1 - x0
        return ((out - target) ** 2).sum(1).mean(), {}

    @torch.no_grad()
    def sample(self, emb: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
        """emb (B, d) and the initial noise (B, samples, 3) -> unit vectors (B, samples, 3) by integrating the
        learned ODE."""
        B, samples = noise.shape[:2]
        e = self.net.condition(emb).repeat_interleave(samples, 0)  # (B*K, hidden)
        x = noise.reshape(B * samples, 3).to(emb.device)
        dt = 1.0 / steps

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.net.velocity(x, t, e)
            if self.options.target == "velocity":
                return out
            return (out - x) / (1 - t).clamp_min(dt / 2)[:, None]  # x1-prediction -> velocity

        for i in range(steps):
            t = torch.full((len(x),), i * dt, device=emb.device)
            v = velocity(x, t)
            if self.options.solver == "heun" and i < steps - 1:  # Heun needs v at t + dt < 1
                x = x + dt * 0.5 * (v + velocity(x + dt * v, t + dt))
            else:
                x = x + dt * v
        return torch.nn.functional.normalize(x, dim=1).view(B, samples, 3)

    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        """Options: samples, steps, aggregation, seed override the config for this call."""
        self.check_dim(table)
        o = self.options
        K = int(options.get("samples", o.samples))
        S = int(options.get("steps", o.steps))
        how = options.get("aggregation", o.aggregation)
        seed = int(options.get("seed", o.seed))
        cos_r = math.cos(o.mode_radius_km / EARTH_RADIUS_KM)
        self.net.eval()
        x = torch.from_numpy(table.embedding).float().to(self.device)
        zero, one = np.zeros(x.shape[1]), np.ones(x.shape[1])
        batch = max(1, min(o.predict_batch, CHUNK_POINTS // K))
        units, confs = [], []
        for s in range(0, len(x), batch):
            part = x[s:s + batch]
            noise = row_noise(row_seeds(table.embedding[s:s + batch], seed, zero, one), K, 3)
            u = self.sample(part, S, noise).double()  # (B, K, 3)
            if how == "mean":
                m = u.mean(1)
                conf = m.norm(dim=1)
            else:
                support = ((u @ u.transpose(1, 2)) >= cos_r).double().sum(2)  # (B, K)
                best = support.argmax(1)
                m = u[torch.arange(len(u)), best]
                conf = support.max(1).values / K
            units.append(m.cpu())
            confs.append(conf.cpu())
        lat, lon = unit_to_latlon(torch.cat(units).numpy())
        return Prediction(lat, lon, torch.cat(confs).numpy())
