"""Prediction: K DDIM samples per image, decoded by mode seeking, aggregated two ways.

- "mean": the decoded mode of the mean of the K sampled codes (a kernel density of the samples);
- "support": the sample whose decoded location has the most other samples within a radius (ties broken
  by the density of the mean code there).
Both are computed; the run stores which one validation preferred. The confidence of an image is the
share of its K samples within the radius of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from locdiff import shdd
from locdiff.geo import haversine_km
from locdiff.model.config import Config
from locdiff.model.ddim import DDIMScheduler
from locdiff.model.sampler import sample
from locdiff.model.schedule import NoiseSchedule


@dataclass
class LocDiffOutput:
    """Per image (N,) arrays, degrees; mean_code is the (N, D) raw SHDD mean code (for LocDiff-H)."""

    mean_lat: np.ndarray
    mean_lon: np.ndarray
    mean_value: np.ndarray  # f_c of the mean code at its mode
    support_lat: np.ndarray
    support_lon: np.ndarray
    support_conf: np.ndarray  # share of the K samples within the radius of the "support" answer
    mean_conf: np.ndarray  # share of the K samples within the radius of the "mean" answer
    mean_code: torch.Tensor

    def choose(self, aggregation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, confidence) of one aggregation: "mean" or "support"."""
        if aggregation == "mean":
            return self.mean_lat, self.mean_lon, self.mean_conf
        if aggregation == "support":
            return self.support_lat, self.support_lon, self.support_conf
        raise ValueError(f"aggregation must be 'mean' or 'support'; got {aggregation!r}")


@torch.no_grad()
def sample_codes(
    model: nn.Module,
    emb: torch.Tensor,
    config: Config,
    *,
    samples: int,
    steps: int,
    generator: torch.Generator | None = None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """K z-space samples per embedding: (N, d) -> (N, K, D)."""
    model.eval()
    device = next(model.parameters()).device
    n = emb.shape[0]
    scheduler = DDIMScheduler(NoiseSchedule(config.diffusion.timesteps), config.diffusion.prediction)
    cond = emb.to(device, torch.float32).repeat_interleave(samples, dim=0)  # (N*K, d)
    w = config.diffusion.guidance_scale if guidance_scale is None else guidance_scale
    use_amp = config.train.amp and device.type == "cuda"

    def denoiser(z, t, c, drop):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            return model(z, t, c, drop)

    z = sample(denoiser, cond, scheduler, steps, generator, w, dim=model.dim)
    return z.reshape(n, samples, -1)


def _support(lat: torch.Tensor, lon: torch.Tensor, radius_km: float) -> torch.Tensor:
    """(N, K) decoded samples -> (N, K) how many samples of the same image lie within radius_km."""
    d = haversine_km(
        lat[:, :, None].double(), lon[:, :, None].double(), lat[:, None, :].double(), lon[:, None, :].double()
    )  # (N, K, K)
    return (d <= radius_km).sum(-1)


@torch.no_grad()
def locdiff_predict(
    model: nn.Module,
    emb: np.ndarray | torch.Tensor,
    config: Config,
    *,
    samples: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    progress: bool = False,
) -> LocDiffOutput:
    """Sample, decode and aggregate for every embedding (rows of emb), in batches of images."""
    from tqdm.auto import tqdm

    pc = config.predict
    k = pc.samples if samples is None else samples
    s = pc.steps if steps is None else steps
    if k < 1 or s < 1:
        raise ValueError(f"samples and steps must be >= 1; got samples={k}, steps={s}")
    emb = torch.as_tensor(np.array(emb, dtype=np.float32))  # a writable copy
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    outs: dict[str, list] = {key: [] for key in ("ml", "mo", "mv", "sl", "so", "sc", "mc", "code")}
    # images x samples per chunk bounded, and the (n, K, K) support vote to 4 M pairs
    bs = max(1, min(pc.batch_size, config.limits.max_codes_per_chunk // k, (1 << 22) // (k * k)))
    for i in tqdm(range(0, emb.shape[0], bs), disable=not progress, desc="predict"):
        z = sample_codes(
            model, emb[i : i + bs], config, samples=k, steps=s, generator=g, guidance_scale=guidance_scale
        ).float()  # (n, K, D)
        codes = (z / shdd.SCALE).cpu()
        n = codes.shape[0]
        mean = codes.mean(1)  # (n, D)
        mlat, mlon, mval = shdd.decode(mean, candidates=pc.decode_candidates, smoothing=pc.decode_smoothing)
        if k == 1:  # the one sample is the mean: its vote and the "support" answer are the mean's mode
            lat, lon = mlat[:, None], mlon[:, None]
        else:
            # Each sample only votes (support radius of hundreds of km): the grid maximum plus one Newton
            # step is plenty and ~15x cheaper than a full decode; the answers are decoded fully below.
            lat, lon, _ = shdd.decode(codes, candidates=1, iterations=1, smoothing=pc.decode_smoothing)  # (n, K)
        sup = _support(lat, lon, pc.support_radius_km)  # (n, K)
        dens = shdd.density(mean.double(), lat.double(), lon.double())  # (n, K), tie-break
        score = sup.double() + 0.5 * torch.sigmoid(dens / dens.abs().amax(1, keepdim=True).clamp_min(1e-12))
        best = score.argmax(1)
        rows = torch.arange(n)
        if k == 1:
            sl, so = mlat, mlon
        else:
            sl, so, _ = shdd.decode(codes[rows, best], candidates=pc.decode_candidates, smoothing=pc.decode_smoothing)
        dm = haversine_km(mlat[:, None].double(), mlon[:, None].double(), lat.double(), lon.double())
        outs["ml"].append(mlat)
        outs["mo"].append(mlon)
        outs["mv"].append(mval)
        outs["sl"].append(sl)
        outs["so"].append(so)
        outs["sc"].append(sup[rows, best].double() / k)
        outs["mc"].append((dm <= pc.support_radius_km).double().mean(1))
        outs["code"].append(mean)

    def cat(key: str) -> np.ndarray:
        return torch.cat(outs[key]).double().numpy() if outs[key] else np.zeros(0)

    d = shdd.num_coefficients(config.shdd.degree)
    return LocDiffOutput(
        mean_lat=cat("ml"),
        mean_lon=cat("mo"),
        mean_value=cat("mv"),
        support_lat=cat("sl"),
        support_lon=cat("so"),
        support_conf=cat("sc"),
        mean_conf=cat("mc"),
        mean_code=torch.cat(outs["code"]) if outs["code"] else torch.zeros(0, d),
    )
