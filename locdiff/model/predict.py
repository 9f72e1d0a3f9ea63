"""Prediction: K DDIM samples per image, decoded by mode seeking, aggregated two ways.

- "mean": the decoded mode of the mean of the K sampled codes (a kernel density of the samples);
- "support": the sample whose decoded location has the most other samples within a radius (ties broken
  by the density of the mean code there).
Both are computed; the run stores which one validation preferred. The confidence of an image is the
share of its K samples within the radius of the answer.

One photo, one answer: the starting noise of an image's K samples is drawn on the CPU from its own
generator, seeded by `row_seeds` (the run's seed and the image's own embedding), and the answers are
decoded in float64. A row's answer does not depend on the other rows, its position, the batch size, the
number of workers or the entry point (beyond float64 rounding in the decoder: millimetres).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

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


NOISE_BITS = 32  # sign bits of random projections that seed a row's noise


@lru_cache(maxsize=8)
def _projections(dim: int) -> np.ndarray:
    """(NOISE_BITS, dim) fixed Gaussian directions, the same in every run and process."""
    return np.random.default_rng(0x10CD1FF).standard_normal((NOISE_BITS, dim))


def row_seeds(emb: np.ndarray, seed: int, mean: np.ndarray, std: np.ndarray) -> list[int]:
    """The noise seed of each image, from the run's seed and the image's own embedding: sha256 of
    "locdiff-noise:<seed>:" and the NOISE_BITS signs of fixed random projections of the standardised
    embedding (emb - mean) / std, first 8 bytes little-endian, 63 bits. Signs, not the embedding's bytes:
    the same photo embedded in another batch (float32 rounding) keeps its seed unless one of its
    projections lies within rounding of zero."""
    e = (np.asarray(emb, np.float64) - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    bits = np.packbits(e @ _projections(e.shape[1]).T > 0, axis=1)  # (N, NOISE_BITS / 8)
    head = f"locdiff-noise:{int(seed)}:".encode()
    return [int.from_bytes(hashlib.sha256(head + row.tobytes()).digest()[:8], "little") & (2**63 - 1)
            for row in bits]


def row_noise(seeds: list[int], samples: int, dim: int) -> torch.Tensor:
    """The initial noise of K samples per image, (N, K, D) float32 on the CPU: row i is N(0, I) drawn
    from a CPU generator seeded with seeds[i] (the same numbers on every device)."""
    out = torch.empty(len(seeds), samples, dim, dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for i, s in enumerate(seeds):
        g.manual_seed(s)
        out[i] = torch.randn(samples, dim, generator=g, dtype=torch.float32)
    return out


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
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """K z-space samples per embedding: (N, d) -> (N, K, D). `noise` (N, K, D): the initial noise (see
    row_noise); None draws it from `generator` (then a row's samples depend on the batch)."""
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

    z0 = noise.reshape(n * samples, model.dim) if noise is not None else None
    z = sample(denoiser, cond, scheduler, steps, generator, w, dim=model.dim, noise=z0)
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
    """Sample, decode and aggregate for every embedding (rows of emb), in batches of images; each image's
    noise comes from `seed` and its own embedding (row_seeds)."""
    pc = config.predict
    k = pc.samples if samples is None else samples
    s = pc.steps if steps is None else steps
    if k < 1 or s < 1:
        raise ValueError(f"samples and steps must be >= 1; got samples={k}, steps={s}")
    emb = torch.as_tensor(np.array(emb, dtype=np.float32))  # a writable copy
    mean_e, std_e = (model.emb_mean.double().cpu().numpy(), model.emb_std.double().cpu().numpy())
    # per batch, the parts of each LocDiffOutput field
    outs: dict[str, list[torch.Tensor]] = {f.name: [] for f in dataclasses.fields(LocDiffOutput)}
    # images x samples per chunk bounded, and the (n, K, K) support vote to 4 M pairs
    bs = max(1, min(pc.batch_size, config.limits.max_codes_per_chunk // k, (1 << 22) // (k * k)))
    for i in tqdm(range(0, emb.shape[0], bs), disable=not progress, desc="predict"):
        part = emb[i : i + bs]
        z = sample_codes(model, part, config, samples=k, steps=s, guidance_scale=guidance_scale,
                         noise=row_noise(row_seeds(part.numpy(), seed, mean_e, std_e), k, model.dim)
                         ).float()  # (n, K, D)
        codes = shdd.SHDD(config.shdd.degree).from_z(z).cpu()
        n = codes.shape[0]
        mean = codes.mean(1)  # (n, D)
        # the answers are decoded in float64: a float32 decode moves by up to ~100 m with the batch's
        # composition (vectorised math, matrix-product blocking); float64 keeps that under a centimetre
        mlat, mlon, mval = shdd.decode(mean.double(), candidates=pc.decode_candidates,
                                       smoothing=pc.decode_smoothing)
        if k == 1:  # the one sample is the mean: its vote and the "support" answer are the mean's mode
            lat, lon = mlat[:, None], mlon[:, None]
        else:
            # Each sample only votes (support radius of hundreds of km): the grid maximum plus one Newton
            # step is plenty and ~15x cheaper than a full decode; the answers are decoded fully below. In float64
            # too, so that no vote crosses the support radius with the batch's composition.
            lat, lon, _ = shdd.decode(codes.double(), candidates=1, iterations=1,
                                      smoothing=pc.decode_smoothing)  # (n, K)
        sup = _support(lat, lon, pc.support_radius_km)  # (n, K)
        dens = shdd.density(mean.double(), lat.double(), lon.double())  # (n, K), tie-break
        score = sup.double() + 0.5 * torch.sigmoid(dens / dens.abs().amax(1, keepdim=True).clamp_min(1e-12))
        best = score.argmax(1)
        rows = torch.arange(n)
        if k == 1:
            sl, so = mlat, mlon
        else:
            sl, so, _ = shdd.decode(codes[rows, best].double(), candidates=pc.decode_candidates,
                                    smoothing=pc.decode_smoothing)
        dm = haversine_km(mlat[:, None].double(), mlon[:, None].double(), lat.double(), lon.double())
        for name, part in (("mean_lat", mlat), ("mean_lon", mlon), ("mean_value", mval), ("support_lat", sl),
                           ("support_lon", so), ("support_conf", sup[rows, best].double() / k),
                           ("mean_conf", (dm <= pc.support_radius_km).double().mean(1)), ("mean_code", mean)):
            outs[name].append(part)

    def cat(name: str) -> np.ndarray:
        return torch.cat(outs[name]).double().numpy() if outs[name] else np.zeros(0)

    d = shdd.SHDD(config.shdd.degree).dimension
    codes_parts = outs.pop("mean_code")
    mean_code = torch.cat(codes_parts) if codes_parts else torch.zeros(0, d)
    return LocDiffOutput(**{name: cat(name) for name in outs}, mean_code=mean_code)
