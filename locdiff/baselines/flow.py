"""`flow`: conditional flow matching directly on the coordinates (PLONK style).

The location is its unit vector x1 in R^3. Training (rectified flow / conditional OT path): x0 ~ N(0, I),
t ~ U(0, 1), x_t = (1 - t) x0 + t x1, and an MLP regresses either the velocity x1 - x0 (`target:
velocity`) or the clean point x1 (`target: x1`, the default: the velocity is then (x1_hat - x_t) / (1 - t);
same path and sampler, a loss reweighted towards late t, which trains faster on small data).
Sampling integrates dx/dt = v from t = 0 to 1 with `steps` Heun (or Euler) steps for `samples` noise draws
per image; each end point is projected to the sphere. The answer is the sample with the most other samples
within `mode_radius_km` ("mode") or the normalised mean ("mean"); the confidence is the fraction of
samples supporting the answer (mode) or the mean resultant length (mean).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from locdiff.baselines.options import MLPOptions, parse_options, resolve_device
from locdiff.baselines.trainer import train_epochs
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_unit, unit_to_latlon
from locdiff.methods import GeoMethod, Prediction
from locdiff.schema import setting
from locdiff.tables import EmbeddingTable

STATE = "flow.pt"


@dataclass
class FlowOptions(MLPOptions):
    epochs: int = 40  # keeps MLPOptions' rule (>= 1)
    time_dim: int = setting(32, ge=2)  # sinusoidal features of t
    steps: int = setting(16, ge=1)  # ODE steps at sampling
    solver: Literal["heun", "euler"] = "heun"
    samples: int = setting(16, ge=1)  # noise draws per image
    aggregation: Literal["mode", "mean"] = "mode"
    mode_radius_km: float = setting(300.0, gt=0)
    predict_batch: int = setting(1024, ge=1)  # images per sampling batch
    target: Literal["x1", "velocity"] = "x1"  # x1: the net predicts the clean point, v = (x1_hat - x_t)/(1-t)


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


class FlowMethod(GeoMethod):
    name = "flow"

    def __init__(self, options: FlowOptions):
        self.options = options
        self.device = resolve_device(options.device)
        self.net: VelocityNet | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FlowMethod:
        return cls(parse_options(FlowOptions, config, "flow"))

    def _build_net(self, dim: int) -> None:
        torch.manual_seed(self.options.seed)
        self.net = VelocityNet(dim, self.options).to(self.device)

    def fit(self, train: EmbeddingTable, val: EmbeddingTable | None, run_dir: Path, *,
            progress: bool = True) -> dict[str, float]:
        if not train.labelled:
            raise ValueError(f"{train.source}: flow needs a labelled training table (columns lat, lon)")
        self._build_net(train.dim)
        dev = self.device
        x = torch.from_numpy(train.embedding).float().to(dev)
        u = torch.from_numpy(latlon_to_unit(train.lat, train.lon)).float().to(dev)
        x1_target = self.options.target == "x1"

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            idx = idx.to(dev)
            x1 = u[idx]
            x0 = torch.randn_like(x1)  # seeded per epoch by train_epochs
            t = torch.rand(len(idx), device=dev)
            xt = (1 - t[:, None]) * x0 + t[:, None] * x1
            out = self.net(xt, t, x[idx])
            target = x1 if x1_target else x1 - x0
            return ((out - target) ** 2).sum(1).mean()

        metrics = train_epochs(self.net, loss_fn, len(train), self.options, Path(run_dir), name=self.name,
                               progress=progress)
        self.save(Path(run_dir))
        if val is not None and val.labelled:
            from locdiff.metrics import geo_metrics

            p = self.predict(val)
            metrics.update({f"val/{k}": v for k, v in geo_metrics(p.lat, p.lon, val.lat, val.lon).items()})
        return metrics

    def save(self, run_dir: Path) -> None:
        if self.net is None:
            raise ValueError("flow: nothing to save, the method is not fitted")
        tmp = Path(run_dir) / (STATE + ".tmp")
        torch.save({"options": asdict(self.options), "model": self.net.state_dict(),
                    "dim": self.net.emb_dim}, tmp)
        tmp.replace(Path(run_dir) / STATE)

    @classmethod
    def load(cls, run_dir: Path, config: dict[str, Any]) -> FlowMethod:
        path = Path(run_dir) / STATE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no flow model in this run directory (was it trained?)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        m = cls.from_config(config)
        m._build_net(state["dim"])
        m.net.load_state_dict(state["model"])
        m.net.eval()
        return m

    @torch.no_grad()
    def sample(self, emb: torch.Tensor, samples: int, steps: int, generator: torch.Generator) -> torch.Tensor:
        """emb (B, d) -> unit vectors (B, samples, 3) by integrating the learned ODE."""
        B = emb.shape[0]
        e = self.net.condition(emb).repeat_interleave(samples, 0)  # (B*K, hidden)
        x = torch.randn(B * samples, 3, generator=generator).to(emb.device)
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
        if self.net is None:
            raise ValueError("flow: predict before fit/load")
        if table.dim != self.net.emb_dim:
            raise ValueError(f"{table.source}: embeddings have dimension {table.dim}, the model expects "
                             f"{self.net.emb_dim}")
        o = self.options
        K = int(options.get("samples", o.samples))
        S = int(options.get("steps", o.steps))
        how = options.get("aggregation", o.aggregation)
        gen = torch.Generator().manual_seed(int(options.get("seed", o.seed)))
        cos_r = math.cos(o.mode_radius_km / EARTH_RADIUS_KM)
        self.net.eval()
        x = torch.from_numpy(table.embedding).float().to(self.device)
        units, confs = [], []
        for s in range(0, len(x), o.predict_batch):
            u = self.sample(x[s:s + o.predict_batch], K, S, gen).double()  # (B, K, 3)
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
