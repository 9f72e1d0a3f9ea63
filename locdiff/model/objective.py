"""LocDiff's training objective as an engine task: the CS-UNet and the x0-prediction diffusion loss.

One step (LOCDIFF.md 5): z0 = SHDD code of the true location * scale (read from the feature shards when
they store codes of the config's degree, else encoded on the device); t ~ U[min_train_timestep, T);
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps; the network predicts z0 (or eps, converted to z0 by the
schedule); the loss is SHDD-KL, MSE in z-space, or both (`train.objective`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from locdiff import shdd
from locdiff.engine import Settings, Task
from locdiff.errors import ConfigError, CorruptFileError, UserError
from locdiff.metrics import geo_metrics
from locdiff.model.config import Config
from locdiff.model.csunet import CSUNet, csunet_flops
from locdiff.model.schedule import NoiseSchedule
from locdiff.tables import MAX_EMBED_DIM


def build_model(config: Config, embed_dim: int, *, weights: Mapping[str, torch.Tensor] | None = None,
                source: str = "the config") -> CSUNet:
    """The CS-UNet for codes of degree config.shdd.degree and embeddings of size embed_dim.

    Before anything is allocated (`model_shapes`): embed_dim must be at most MAX_EMBED_DIM, the parameters
    at most `limits.max_parameters`, and `weights` (a state dict about to be loaded, when given) must have
    exactly the model's tensor names and shapes; a UserError naming `source` otherwise."""
    shapes = model_shapes(config, embed_dim, source=source)
    if weights is not None:
        check_weights(shapes, weights, source)
    abar = NoiseSchedule(config.diffusion.timesteps).alphas_cumprod
    return CSUNet(shdd.SHDD(config.shdd.degree).dimension, embed_dim, config.network, abar)


def model_shapes(config: Config, embed_dim: int, *, source: str = "the config") -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the CS-UNet `build_model` makes, built on the meta device (no memory), after
    the size checks of `build_model`."""
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int | np.integer) \
            or not 1 <= embed_dim <= MAX_EMBED_DIM:
        raise UserError(f"{source}: embedding dimension {embed_dim!r} is outside [1, {MAX_EMBED_DIM}]; "
                        "embed the images with a supported encoder")
    embed_dim = int(embed_dim)
    with torch.device("meta"):
        abar = NoiseSchedule(config.diffusion.timesteps).alphas_cumprod
        model = CSUNet(shdd.SHDD(config.shdd.degree).dimension, embed_dim, config.network, abar)
    count = sum(p.numel() for p in model.parameters())
    budget = config.limits.max_parameters
    if count > budget:
        raise ConfigError(source, "limits.max_parameters",
                          f"the denoiser would have {count:,} parameters (widths {config.network.widths}, degree "
                          f"{config.shdd.degree}, {embed_dim}-d embeddings), above the budget of {budget:,}; "
                          "choose a smaller network or raise limits.max_parameters on a larger machine")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights(shapes: dict[str, tuple[int, ...]], weights: Mapping[str, torch.Tensor], source: str) -> None:
    """CorruptFileError naming `source` unless `weights` has exactly these tensor names and shapes."""
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got == shapes:
        return
    missing, extra = sorted(set(shapes) - set(got)), sorted(set(got) - set(shapes))
    wrong = [k for k in shapes if k in got and got[k] != shapes[k]]
    detail = (f"tensor {wrong[0]} is {list(got[wrong[0]])}, the config makes {list(shapes[wrong[0]])}" if wrong
              else f"missing tensors {missing[:3]}" if missing else f"unexpected tensors {extra[:3]}")
    raise CorruptFileError(source, f"{source}: the model weights do not fit its config ({detail}); the run "
                           "folder is damaged: train again into a new --out")


def encode_targets(lat: Any, lon: Any, degree: int, *, chunk: int = 8192, checked: bool = False) -> torch.Tensor:
    """z_0 = SHDD(degree).to_z(encode(lat, lon)) as float32, (N, D), on the device of lat; chunked (`checked`:
    the coordinates were validated on the host, see `shdd.encode`)."""
    lat_t = torch.as_tensor(lat if isinstance(lat, torch.Tensor) else np.asarray(lat, dtype=np.float64))
    lon_t = torch.as_tensor(lon if isinstance(lon, torch.Tensor) else np.asarray(lon, dtype=np.float64))
    code = shdd.SHDD(degree)
    parts = [code.to_z(code.encode(lat_t[i:i + chunk].float(), lon_t[i:i + chunk].float(), checked=checked))
             for i in range(0, lat_t.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, code.dimension, device=lat_t.device)


def diffusion_loss(pred: torch.Tensor, z0: torch.Tensor, config: Config, weight: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective on z-space codes (B, D): "kl", "mse" or "kl+mse"; returns the loss and its parts
    (detached 0-d tensors: nothing is read back from the device here).

    KL is SHDD-KL on raw codes (`SHDD.from_z`); MSE is per coefficient in z-space (unit-variance targets).
    `weight` (B,) 0/1: the mean over the rows where it is 1 (a mask without a boolean index, which would
    read the mask back from the device).
    """
    obj, tc = config.train.objective, config.train
    terms = obj.split("+")
    parts: dict[str, torch.Tensor] = {}
    loss = pred.new_zeros(())

    def mean(rows: torch.Tensor) -> torch.Tensor:
        return rows.mean() if weight is None else (rows * weight).sum() / weight.sum().clamp_min(1)

    if "kl" in terms:
        code = shdd.SHDD(config.shdd.degree)
        kl = mean(shdd.kl_loss(code.from_z(pred), code.from_z(z0), tau=config.shdd.kl_tau,
                               grid_size=config.shdd.kl_grid_size, reduction="none"))
        loss = loss + tc.kl_weight * kl
        parts["kl"] = kl.detach()
    if "mse" in terms:
        mse = mean(shdd.mse_loss(pred, z0, reduction="none"))
        loss = loss + tc.mse_weight * mse
        parts["mse"] = mse.detach()
    if not parts:
        raise ValueError(f"train.objective must be 'kl', 'mse' or 'kl+mse'; got {obj!r}")
    return loss, parts


class LocDiffTask(Task):
    """The CS-UNet denoiser and its diffusion loss, for the engine."""

    name = "locdiff"

    def __init__(self, config: Config, shdd_degree_stored: int | None = None) -> None:
        self.config = config
        self.schedule = NoiseSchedule(config.diffusion.timesteps)
        # codes stored in the shards are used when their degree is the config's
        self.use_stored = shdd_degree_stored == config.shdd.degree

    def describe(self) -> dict[str, Any]:
        n = self.config.network
        return {"task": self.name, "degree": self.config.shdd.degree, "widths": list(n.widths),
                "blocks_per_level": n.blocks_per_level, "cond_dim": n.cond_dim, "time_dim": n.time_dim,
                # the mixture's components only when there are several: checkpoints of one still resume
                "head": [n.head_width, n.head_depth] + ([n.head_components] if n.head_components > 1 else [])}

    def build(self, embed_dim: int, stats: tuple[np.ndarray, np.ndarray]) -> nn.Module:
        model = build_model(self.config, embed_dim)
        model.set_embedding_stats(torch.as_tensor(stats[0]), torch.as_tensor(stats[1]))
        return model

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.use_stored and "shdd" in batch:
            return shdd.SHDD(self.config.shdd.degree).to_z(batch["shdd"].float())
        return encode_targets(batch["lat"], batch["lon"], self.config.shdd.degree,
                              checked=bool(batch.get("coordinates_checked")))

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.config.diffusion
        emb = batch["embedding"]
        z0 = self.targets(batch)
        b, device = z0.shape[0], z0.device
        gdev = generator.device
        t = torch.randint(d.min_train_timestep, self.schedule.timesteps, (b,), generator=generator,
                          device=gdev).to(device)
        noise = torch.randn(z0.shape, generator=generator, device=gdev).to(device)
        drop = None
        if d.cond_drop_prob > 0 and model.training:
            drop = (torch.rand(b, generator=generator, device=gdev) < d.cond_drop_prob).to(device)
        zt = self.schedule.add_noise(z0, noise, t)
        w = self.config.train.prior_weight if self.config.network.head_width > 0 else 0.0
        if w > 0:
            out, mu = model(zt, t, emb, drop, return_prior=True)
        else:
            out = model(zt, t, emb, drop)
        x0 = self.schedule.predict_x0(out.float(), zt, t, d.prediction)
        loss, parts = diffusion_loss(x0, z0, self.config)
        if w > 0:
            keep = (~drop).float() if drop is not None else None  # mu of a dropped condition is the null vector
            prior, _ = diffusion_loss(mu.float(), z0, self.config, keep)
            loss = loss + w * prior
            parts["prior"] = prior.detach()
        return loss, parts

    def flops_per_sample(self, model: nn.Module) -> float:
        """Training FLOPs of one sample: the CS-UNet's matrix products (forward, and twice that backward)
        plus SHDD-KL's grid products (prediction: forward and backward; target: forward)."""
        flops = 3 * csunet_flops(model)
        if "kl" in self.config.train.objective.split("+"):
            d = shdd.SHDD(self.config.shdd.degree).dimension
            g = self.config.shdd.kl_grid_size or 8 * (self.config.shdd.degree + 1) ** 2
            heads = 2 if self.config.train.prior_weight > 0 and self.config.network.head_width > 0 else 1
            flops += heads * 3 * 2 * d * g  # (B, D) x (D, G): prediction forward + backward, target forward
        return float(flops)

    @torch.no_grad()
    def validation_metrics(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
        """Accuracy of one sample, one DDIM step (z0 predicted from pure noise at t = T - 1: the network's
        posterior-mean code), decoded by mode seeking as `predict` decodes it, on at most 1,024 held-out
        rows: the learning curve at every checkpoint, cheap enough to log."""
        if "lat" not in batch:
            return {}
        emb = batch["embedding"][:1024]
        g = torch.Generator(device=emb.device).manual_seed(0)
        z = torch.randn(len(emb), shdd.SHDD(self.config.shdd.degree).dimension, generator=g, device=emb.device)
        t = torch.full((len(emb),), self.schedule.timesteps - 1, dtype=torch.long, device=emb.device)
        x0 = self.schedule.predict_x0(model(z, t, emb, None).float(), z, t, self.config.diffusion.prediction)
        lat, lon, _ = shdd.decode(shdd.SHDD(self.config.shdd.degree).from_z(x0).cpu(), candidates=1, iterations=2,
                                  smoothing=self.config.predict.decode_smoothing)
        m = geo_metrics(lat.double().numpy(), lon.double().numpy(), batch["lat"][:1024].cpu().numpy(),
                        batch["lon"][:1024].cpu().numpy())
        return {f"onestep_{k}": v for k, v in m.items() if k.startswith("acc_") or k == "median_km"}


def engine_settings(config: Config) -> Settings:
    """The engine's settings from the run config's `train` section."""
    tc = config.train
    return Settings(steps=tc.steps, batch_size=tc.batch_size, lr=tc.lr, min_lr_ratio=tc.min_lr_ratio,
                    warmup_steps=tc.warmup_steps, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip,
                    ema_decay=tc.ema_decay, checkpoint_every=tc.checkpoint_every, log_every=tc.log_every,
                    seed=tc.seed, amp=tc.amp, device=tc.device, loader_threads=tc.loader_threads,
                    threads=tc.threads, peak_tflops=tc.peak_tflops)
