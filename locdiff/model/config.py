"""Typed run configuration: YAML -> nested dataclasses, unknown keys rejected, `--set key=value` overrides.

    cfg = load_config("configs/model/base.yaml", overrides=["train.steps=500", "network.dropout=0.2"])
    save_config(cfg, run_dir / "config.yaml")          # the resolved config of the run
    cfg = config_from_dict(yaml.safe_load(...))          # e.g. from a run directory

Every section is a dataclass whose fields declare their ranges (`setting(..., ge=1)`); the checks live in
`locdiff.schema`, the one config system. A bad value is a ConfigError (a ValueError) naming the file and the
key path: `configs/model/base.yaml: train.steps: must be an integer >= 1; got -5`, or `--set train.steps: ...`
when an override set it; an unknown key lists the valid keys. The `baselines` section maps a baseline name to
its options, checked against that baseline's options class (`locdiff.baselines.options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from locdiff import schema
from locdiff.gallery import GalleryConfig
from locdiff.schema import DEVICE_EXPECT, DEVICE_PATTERN, Invalid, setting

Objective = Literal["kl", "mse", "kl+mse"]
Aggregation = Literal["auto", "mean", "support"]


def _method_name(name: str) -> str:
    from locdiff.methods import METHODS

    if name not in METHODS:
        raise Invalid("", f"must be one of {', '.join(map(repr, METHODS))}; got {schema.show(name)}")
    return name


def _baselines(section: dict[str, Any]) -> dict[str, Any]:
    from locdiff.baselines.options import check_baselines

    return check_baselines(section)


@dataclass
class SHDDConfig:
    # L; D = (L+1)^2. Sets the finest scale the code can express (see LOCDIFF.md 2)
    degree: int = setting(32, ge=1, le=512)
    kl_tau: float | None = setting(None, gt=0)  # SHDD-KL temperature; None -> locdiff.shdd.default_tau(L)
    kl_grid_size: int | None = setting(None, ge=1)  # SHDD-KL grid points; None -> 8 (L+1)^2 (shdd default)


@dataclass
class NetworkConfig:
    # encoder widths, top to bottom
    widths: list[int] = setting(default_factory=lambda: [512, 256, 128], ge=1, min_len=1)
    blocks_per_level: int = setting(1, ge=1)  # sine residual blocks per level (encoder and decoder)
    omega_0: float = setting(1.0, gt=0)  # sine frequency of the input layer (SIREN's 30 is for 2-3 coordinates)
    omega_hidden: float = setting(1.0, gt=0)  # frequency of the hidden sine layers (SIREN init scales weights by it)
    dropout: float = setting(0.1, ge=0, lt=1)
    cond_dim: int = setting(256, ge=1)  # conditioning vector: image-embedding MLP + sinusoidal timestep embedding
    time_dim: int = setting(128, ge=1)  # sinusoidal timestep features
    # The prior head: a residual MLP (width, depth, dropout) from the image embedding to the code's
    # conditional mean mu(e). The denoiser's output is a_t z_t + (1 - a_t^2) mu(e) + U-Net(z_t, t, e): the
    # Gaussian-optimal z0 estimate plus a learned residual (the multi-modal part). 0 disables it (the plain
    # CS-UNet of the paper; the measured difference: docs/results.md).
    head_width: int = setting(512, ge=0)
    head_depth: int = setting(3, ge=0)
    head_dropout: float = setting(0.1, ge=0, lt=1)
    # M > 1: the head gives M component codes c_i(e), weights and variances s_i^2, and the skeleton is the
    # exact posterior mean of z0 ~ sum_i w_i N(c_i, s_i^2 I) instead of one N(mu, I) (a multimodal
    # denoiser before the U-Net adds anything); 1 is the single Gaussian (runs trained before load as they were)
    head_components: int = setting(1, ge=1, le=64)
    # Training-time Gaussian noise on the standardised image embedding (in its standard deviations), drawn
    # afresh for the conditioning MLP and the prior head; none at evaluation. A regulariser for the
    # condition: without it the validation SHDD-KL stops falling after ~1,500 steps while the training
    # one keeps falling. 0 = none (base.yaml sets it; the figures: docs/results.md).
    embedding_noise: float = setting(0.0, ge=0)


@dataclass
class DiffusionConfig:
    timesteps: int = setting(1000, ge=1)  # T of the VP cosine schedule
    prediction: Literal["sample", "epsilon"] = "sample"  # the network predicts z0 (design 5)
    cond_drop_prob: float = setting(0.0, ge=0, lt=1)  # classifier-free guidance training: condition dropped with this p
    guidance_scale: float = setting(1.0, ge=0)  # w at sampling; 1 = no guidance
    # training timesteps are drawn from [min_train_timestep, T); T - 1 trains the network as a one-step
    # regressor (its input is then always pure noise): the no-diffusion ablation, sampled with S = 1
    min_train_timestep: int = setting(0, ge=0)  # < timesteps (checked by Config.validate)


@dataclass
class TrainConfig:
    objective: Objective = "kl+mse"  # KL alone is blind to l = 0 and the scale (LOCDIFF.md 4)
    kl_weight: float = setting(1.0, ge=0)
    mse_weight: float = setting(1.0, ge=0)  # on z-space MSE per coefficient (unit variance targets)
    # the prior head's own loss (the same objective on mu(e) against z0), so that it learns the conditional
    # mean from every sample, not only through the (1 - a_t^2) share of the denoiser's output; 0 disables
    prior_weight: float = setting(1.0, ge=0)
    steps: int = setting(2000, ge=1)
    batch_size: int = setting(256, ge=1)
    lr: float = setting(1e-3, gt=0)
    min_lr_ratio: float = setting(0.05, ge=0, le=1)  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = setting(100, ge=0)
    weight_decay: float = setting(0.0, ge=0)
    grad_clip: float = setting(1.0, ge=0)  # max gradient norm; 0 disables
    ema_decay: float = setting(0.999, ge=0, lt=1)
    checkpoint_every: int = setting(500, ge=1)
    log_every: int = setting(50, ge=1)
    seed: int = setting(0, ge=0)
    amp: bool = True  # bfloat16 autocast, used only on CUDA
    device: str = setting("auto", pattern=DEVICE_PATTERN, expect=DEVICE_EXPECT)  # "auto" -> cuda when available
    val_samples: int = setting(512, ge=1)  # validation images used to choose the aggregation and LocDiff-H weight
    val_share: float = setting(0.02, ge=0, lt=1)  # without a validation set: this share of training is held out

    def validate(self) -> None:
        """The objective's loss terms must carry a positive weight (otherwise nothing is trained)."""
        if self.objective == "kl+mse":
            if self.kl_weight == 0 and self.mse_weight == 0:
                raise Invalid("kl_weight", "must be > 0 when mse_weight is 0 (objective 'kl+mse'); got 0")
            return
        name = "kl_weight" if self.objective == "kl" else "mse_weight"
        if getattr(self, name) == 0:
            raise Invalid(name, f"must be > 0 for objective {self.objective!r}; got 0")


@dataclass
class PredictConfig:
    samples: int = setting(16, ge=1)  # K samples per image
    steps: int = setting(50, ge=1)  # S DDIM steps
    aggregation: Aggregation = "auto"  # auto -> chosen on validation during training (default mean)
    support_radius_km: float = setting(500.0, gt=0)  # radius for the "most support" aggregation
    # the confidence of an answer is the calibrated probability that the truth lies within this radius
    confidence_radius_km: float = setting(200.0, gt=0)
    batch_size: int = setting(256, ge=1)  # images per sampling batch
    decode_candidates: int = setting(3, ge=1)  # local maxima refined by shdd.decode
    # 0: the answer is the argmax of f_c; s > 0: the peak is chosen on f_c smoothed by a Gaussian taper of
    # width L / s in degree (the peak with the most mass near it) and placed by Newton ascent on raw f_c
    decode_smoothing: float = setting(3.0, ge=0)


@dataclass
class HybridConfig:
    top_k: int = setting(32, ge=1)  # gallery candidates per image
    radius_km: float = setting(1000.0, gt=0)  # candidates farther than this from the LocDiff mode do not qualify
    # score = weight * f_c(candidate)/f_c(mode) + (1 - weight) * cosine similarity
    weight: float = setting(0.5, ge=0, le=1)
    tune_on_val: bool = True  # choose weight and radius on validation during training


@dataclass
class Config:
    method: str = setting("locdiff", check=_method_name)  # a name of locdiff.methods.METHODS
    shdd: SHDDConfig = field(default_factory=SHDDConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)  # the retrieval index (locdiff.gallery)
    baselines: dict[str, Any] = setting(default_factory=dict, check=_baselines)  # baseline name -> its options

    def validate(self) -> None:
        """Rules between sections: training timesteps and sampling steps fit in the schedule's T."""
        t = self.diffusion.timesteps
        if self.diffusion.min_train_timestep >= t:
            raise Invalid("diffusion.min_train_timestep",
                          f"must be < diffusion.timesteps ({t}); got {self.diffusion.min_train_timestep}")
        if self.predict.steps > t:
            raise Invalid("predict.steps", f"must be <= diffusion.timesteps ({t}); got {self.predict.steps}")
        if self.network.head_components > 1 and self.network.head_width == 0:
            raise Invalid("network.head_components", "needs the prior head (network.head_width > 0); got "
                          f"{self.network.head_components} components with head_width 0")
        if self.network.head_width > 0 and self.diffusion.prediction != "sample":
            raise Invalid("network.head_width", "the prior head needs diffusion.prediction: sample (it adds to the "
                          "z0 estimate); set network.head_width: 0 for epsilon-prediction")


def config_from_dict(data: dict[str, Any] | None, *, source: str = "config") -> Config:
    """Validate a nested mapping into a Config. `source` prefixes error messages (e.g. the file name)."""
    return schema.build(Config, data or {}, source=source)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested mapping (values parsed as YAML scalars/lists).

    Key paths are checked against the dataclasses (under `baselines`, when the config is built), so a typo
    is a ConfigError naming the override. Values are checked when the config is built.
    """
    return schema.apply_overrides(Config, data, overrides)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None -> defaults), apply overrides, validate everything; writes nothing."""
    data = schema.read_yaml(path) if path is not None else {}
    return schema.load(Config, data, source=str(path) if path is not None else "config", overrides=overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    schema.dump_yaml(config_to_dict(cfg), path)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config mapping saved in a run directory, validated (ConfigError naming the file)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: not a run directory (no config.yaml); train with `locdiff train`"
        )
    data = schema.read_yaml(path)
    config_from_dict(data, source=str(path))
    return data
