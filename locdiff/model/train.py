"""Training: the loss, one optimisation step as a plain function, EMA, and a single-process loop.

`train_step(model, batch, optimizer, config, ...)` is what the Ray Train workers call unchanged: it
works on a bare CSUNet and on one wrapped in DistributedDataParallel (it only calls the wrapper and
reads `parameters()`; module attributes are reached through `unwrap`). `fit(...)` is the single-process
loop used by `locdiff train`: seeded, tqdm progress with the loss, a checkpoint every N steps to
RUN_DIR/checkpoint.pt (model, EMA, optimizer, LR schedule, step, RNG states), resume from it, and a
metrics log RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from locdiff import shdd
from locdiff.model.config import Config, config_to_dict
from locdiff.model.csunet import CSUNet, unwrap
from locdiff.model.schedule import NoiseSchedule
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: Config, embed_dim: int) -> CSUNet:
    """The CS-UNet for codes of degree config.shdd.degree and embeddings of size embed_dim."""
    return CSUNet(shdd.num_coefficients(config.shdd.degree), embed_dim, config.network)


def encode_targets(lat: Any, lon: Any, degree: int, *, chunk: int = 8192) -> torch.Tensor:
    """z_0 = shdd.encode(lat, lon) * SCALE as float32, (N, D); chunked to bound memory."""
    lat_t = torch.as_tensor(np.array(lat, dtype=np.float64))
    lon_t = torch.as_tensor(np.array(lon, dtype=np.float64))
    parts = [
        shdd.encode(lat_t[i : i + chunk].float(), lon_t[i : i + chunk].float(), degree) * shdd.SCALE
        for i in range(0, lat_t.shape[0], chunk)
    ]
    d = shdd.num_coefficients(degree)
    return torch.cat(parts) if parts else torch.zeros(0, d)


def diffusion_loss(
    pred: torch.Tensor, z0: torch.Tensor, config: Config
) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective on z-space codes (B, D): "kl", "mse" or "kl+mse".

    KL is SHDD-KL on raw codes (z / SCALE); MSE is per coefficient in z-space (unit-variance targets).
    Returns the loss and its parts as floats.
    """
    obj, tc = config.train.objective, config.train
    parts: dict[str, float] = {}
    loss = pred.new_zeros(())
    if "kl" in obj.split("+"):
        kl = shdd.kl_loss(
            pred / shdd.SCALE, z0 / shdd.SCALE, tau=config.shdd.kl_tau, grid_size=config.shdd.kl_grid_size
        )
        loss = loss + tc.kl_weight * kl
        parts["kl"] = float(kl.detach())
    if "mse" in obj.split("+"):
        mse = shdd.mse_loss(pred, z0)
        loss = loss + tc.mse_weight * mse
        parts["mse"] = float(mse.detach())
    if not parts:
        raise ValueError(f"train.objective must be 'kl', 'mse' or 'kl+mse'; got {obj!r}")
    return loss, parts


class EMA:
    """Exponential moving average of a model's weights (buffers copied), with the usual warm-up."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        src = unwrap(model)
        for e, p in zip(self.module.parameters(), src.parameters(), strict=True):
            e.lerp_(p.detach().to(e.dtype), 1 - d)
        for e, b in zip(self.module.buffers(), src.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]


def lr_lambda(config: Config):
    """Linear warm-up then cosine decay to min_lr_ratio, as a LambdaLR factor of the step."""
    tc = config.train

    def factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / max(1, tc.warmup_steps)
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    config: Config,
    *,
    schedule: NoiseSchedule | None = None,
    generator: torch.Generator | None = None,
    ema: EMA | None = None,
    lr_scheduler: Any = None,
) -> dict[str, float]:
    """One optimisation step of the x0-prediction diffusion objective.

    Args:
        model: a CSUNet, possibly wrapped in DistributedDataParallel.
        batch: "embedding" (B, d) and either "z0" (B, D, z-space codes) or "lat"/"lon" (B,) degrees.
        optimizer: over model.parameters().
        config: the run config (objective, weights, clipping, CFG drop rate, AMP).
        schedule: the noise schedule (default: config.diffusion.timesteps, cosine).
        generator: draws timesteps, noise and condition dropout (on the model's device).
        ema: updated after the step when given.
        lr_scheduler: stepped after the optimizer when given.
    Returns:
        {"loss": ..., "kl": ..., "mse": ..., "grad_norm": ...} as floats.
    """
    device = next(model.parameters()).device
    schedule = schedule or NoiseSchedule(config.diffusion.timesteps)
    emb = batch["embedding"].to(device, torch.float32, non_blocking=True)
    if "z0" in batch:
        z0 = batch["z0"].to(device, torch.float32, non_blocking=True)
    else:
        z0 = encode_targets(batch["lat"].cpu().numpy(), batch["lon"].cpu().numpy(), config.shdd.degree).to(
            device
        )
    b = z0.shape[0]
    gdev = generator.device if generator is not None else device
    t = torch.randint(config.diffusion.min_train_timestep, schedule.timesteps, (b,), generator=generator,
                      device=gdev).to(device)
    noise = torch.randn(z0.shape, generator=generator, device=gdev).to(device)
    drop = None
    if config.diffusion.cond_drop_prob > 0:
        drop = (torch.rand(b, generator=generator, device=gdev) < config.diffusion.cond_drop_prob).to(device)
    zt = schedule.add_noise(z0, noise, t)
    model.train()
    use_amp = config.train.amp and device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = model(zt, t, emb, drop)
    out = out.float()
    if config.diffusion.prediction == "epsilon":  # losses are on the z_0 estimate either way
        a, s = schedule.coefficients(t)
        out = (zt - s[:, None] * out) / a[:, None].clamp_min(1e-4)
    loss, parts = diffusion_loss(out, z0, config)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {float(loss)}; lower train.lr or check the inputs")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gn = 0.0
    if config.train.grad_clip > 0:
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip))
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    if ema is not None:
        ema.update(model)
    return {"loss": float(loss.detach()), **parts, "grad_norm": gn}


@dataclass
class FitResult:
    model: CSUNet  # the EMA weights, in eval mode
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(k + "\n" for k in keep))


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def load_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - a truncated file should say so clearly
        raise ValueError(
            f"{path}: cannot read the checkpoint ({err}); delete it to train from scratch"
        ) from None


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    emb: torch.Tensor,
    z0: torch.Tensor,
    config: Config,
    *,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, float]:
    """The objective on held-out data with fixed timesteps and noise (comparable across runs)."""
    model.eval()
    device = next(model.parameters()).device
    schedule = NoiseSchedule(config.diffusion.timesteps)
    g = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    n = 0
    for i in range(0, emb.shape[0], batch_size):
        e, z = emb[i : i + batch_size].to(device), z0[i : i + batch_size].to(device)
        t_lo = config.diffusion.min_train_timestep
        t = torch.randint(t_lo, schedule.timesteps, (z.shape[0],), generator=g).to(device)
        zt = schedule.add_noise(z, torch.randn(z.shape, generator=g).to(device), t)
        out = model(zt, t, e).float()
        loss, parts = diffusion_loss(out, z, config)
        for k, v in {"loss": float(loss), **parts}.items():
            totals[k] = totals.get(k, 0.0) + v * z.shape[0]
        n += z.shape[0]
    return {f"val_{k}": v / max(n, 1) for k, v in totals.items()}


def fit(
    config: Config,
    train: EmbeddingTable,
    val: EmbeddingTable | None,
    run_dir: str | Path,
    *,
    progress: bool = True,
    max_steps_this_run: int | None = None,
) -> FitResult:
    """Train LocDiff's denoiser, resuming from run_dir/checkpoint.pt when it exists.

    Args:
        config: the resolved run config.
        train, val: labelled embedding tables (val optional: validation loss at the end).
        run_dir: where checkpoint.pt and metrics.jsonl go.
        progress: show a tqdm bar with the loss.
        max_steps_this_run: stop (with a checkpoint) after this many steps, as an interruption would.
    Returns:
        FitResult with the EMA model.
    """
    from tqdm.auto import tqdm

    if not train.labelled:
        raise ValueError(f"{train.source or 'training table'}: training needs lat and lon")
    if len(train) == 0:
        raise ValueError(f"{train.source or 'training table'}: no rows")
    tc = config.train
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    generator = torch.Generator(device=device).manual_seed(tc.seed + 1)

    emb_all = torch.as_tensor(np.array(train.embedding, dtype=np.float32))  # a writable copy
    model = build_model(config, emb_all.shape[1])
    model.set_embedding_stats(emb_all.mean(0), emb_all.std(0))
    model.to(device)
    optimizer = make_optimizer(model, config)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    ema = EMA(model, tc.ema_decay)
    schedule = NoiseSchedule(config.diffusion.timesteps)

    step = 0
    ckpt = load_checkpoint(run_dir, map_location=device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        step = int(ckpt["step"])
        _set_rng_state(ckpt["rng"], generator)
        _truncate_metrics(run_dir / METRICS, step)
        log.info("resuming from %s at step %d", run_dir / CHECKPOINT, step)
    else:
        _truncate_metrics(run_dir / METRICS, 0)  # a log without a checkpoint is stale

    def save_checkpoint() -> None:
        _atomic_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(),
                "step": step,
                "rng": _rng_state(generator),
                "config": config_to_dict(config),
                "dim": model.dim,
                "embed_dim": model.embed_dim,
            },
            run_dir / CHECKPOINT,
        )

    n = len(train)
    bs = min(tc.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    z0_all = None
    if n * model.dim * 4 <= (1 << 30):  # precompute the targets when they fit in 1 GiB
        z0_all = encode_targets(train.lat, train.lon, config.shdd.degree)
    lat_all = torch.as_tensor(np.array(train.lat, dtype=np.float64))
    lon_all = torch.as_tensor(np.array(train.lon, dtype=np.float64))

    end = tc.steps if max_steps_this_run is None else min(tc.steps, step + max_steps_this_run)
    metrics_file = (run_dir / METRICS).open("a")
    window: dict[str, list[float]] = {}
    t_start = time.perf_counter()
    perm_epoch, perm = -1, None
    last: dict[str, float] = {}
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    try:
        while step < end:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = _epoch_perm(n, tc.seed, epoch), epoch
            idx = perm[pos * bs : (pos + 1) * bs]
            batch = {"embedding": emb_all[idx]}
            if z0_all is not None:
                batch["z0"] = z0_all[idx]
            else:
                batch["lat"], batch["lon"] = lat_all[idx], lon_all[idx]
            out = train_step(
                model,
                batch,
                optimizer,
                config,
                schedule=schedule,
                generator=generator,
                ema=ema,
                lr_scheduler=lr_sched,
            )
            step += 1
            for k, v in out.items():
                window.setdefault(k, []).append(v)
            bar.update(1)
            if step % max(1, tc.log_every) == 0 or step == tc.steps:
                last = {k: float(np.mean(v)) for k, v in window.items()}
                window = {}
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                rec = {
                    "step": step,
                    **last,
                    "lr": lr_sched.get_last_lr()[0],
                    "elapsed_s": round(time.perf_counter() - t_start, 3),
                }
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            if step % max(1, tc.checkpoint_every) == 0 or step == end:
                save_checkpoint()
    finally:
        bar.close()
        metrics_file.close()
    if ckpt is None or step != int(ckpt["step"]):
        save_checkpoint()  # (already saved at `end`; kept for an empty loop on a fresh run)
    trained = ckpt is None or step != int(ckpt["step"])
    final = dict(last)
    if val is not None and val.labelled and len(val) and step >= tc.steps:
        nv = min(len(val), 4096)
        ve = torch.as_tensor(np.array(val.embedding[:nv], dtype=np.float32))
        vz = encode_targets(val.lat[:nv], val.lon[:nv], config.shdd.degree)
        if ve.shape[1] != emb_all.shape[1]:
            raise ValueError(
                f"{val.source or 'validation table'}: embedding dimension {ve.shape[1]} differs "
                f"from the training data's {emb_all.shape[1]}"
            )
        final.update(validation_loss(ema.module, ve, vz, config, seed=tc.seed))
        if trained:
            with (run_dir / METRICS).open("a") as f:
                f.write(
                    json.dumps({"step": step, **{k: v for k, v in final.items() if k.startswith("val_")}})
                    + "\n"
                )
    return FitResult(model=ema.module.eval(), step=step, metrics=final)
