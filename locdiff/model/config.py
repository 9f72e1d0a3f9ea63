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
from locdiff.baselines.options import check_baselines
from locdiff.errors import ConfigError
from locdiff.gallery_build import GalleryConfig
from locdiff.schema import DEVICE_EXPECT, DEVICE_PATTERN, Invalid, setting

Objective = Literal["kl", "mse", "kl+mse"]

# Upper bounds of the config's numbers (checked before any work; the README's "Limits" lists them). They stop
# values that can only be typos or attacks (10^20 steps, a width of 10^9); what a large machine may need beyond
# the CPU defaults is a setting of the `limits` section instead (LimitsConfig).
MAX_WIDTH = 65_536  # a layer's width (widths, cond_dim, time_dim, head_width)
MAX_LEVELS = 16  # U-Net levels (len(widths))
MAX_DEPTH = 64  # blocks_per_level, head_depth
MAX_GRID = 1 << 22  # SHDD-KL grid points
MAX_TIMESTEPS = 100_000  # diffusion.timesteps, predict.steps
MAX_STEPS = 1_000_000_000  # training steps (and the step counts tied to them)
MAX_BATCH = 1 << 24  # the hard ceiling of limits.max_batch_size
MAX_SAMPLES = 1024  # K samples per image (the support vote compares K x K pairs per image)
MAX_TOP_K = 1024  # LocDiff-H gallery candidates per image
MAX_ROWS = 100_000_000  # rows a config may ask to read at once (train.val_samples)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
HALF_EARTH_KM = 20_038.0  # the largest distance on the sphere
Aggregation = Literal["auto", "mean", "support"]

# Every method `method:` may name: name -> "module:Class", imported on first use by the registry
# (locdiff.methods.get_method); the config checks names against it without importing any method.
METHODS: dict[str, str] = {
    "locdiff": "locdiff.model.locdiff_method:LocDiffMethod",
    "knn": "locdiff.baselines.knn:KNNMethod",
    "geocell": "locdiff.baselines.geocell:GeocellMethod",
    "regress": "locdiff.baselines.regress:RegressMethod",
    "flow": "locdiff.baselines.flow:FlowMethod",
}


def _method_name(name: str) -> str:
    if name not in METHODS:
        raise Invalid("", f"must be one of {', '.join(map(repr, METHODS))}; got {schema.show(name)}")
    return name


@dataclass
class SHDDConfig:
    # L; D = (L+1)^2. Sets the finest scale the code can express (see LOCDIFF.md 2)
    degree: int = setting(32, ge=1, le=512)
    kl_tau: float | None = setting(None, gt=0, le=1e6)  # SHDD-KL temperature; None -> locdiff.shdd.default_tau(L)
    kl_grid_size: int | None = setting(None, ge=1, le=MAX_GRID)  # SHDD-KL grid points; None -> 8 (L+1)^2 (shdd default)


@dataclass
class NetworkConfig:
    # encoder widths, top to bottom
    widths: list[int] = setting(default_factory=lambda: [512, 256, 128], ge=1, le=MAX_WIDTH, min_len=1,
                                 max_len=MAX_LEVELS)
    blocks_per_level: int = setting(1, ge=1, le=MAX_DEPTH)  # sine residual blocks per level (encoder and decoder)
    omega_0: float = setting(1.0, gt=0, le=1e4)  # sine frequency of the input layer (SIREN's 30 is for 2-3 coordinates)
    # frequency of the hidden sine layers (SIREN init scales weights by it)
    omega_hidden: float = setting(1.0, gt=0, le=1e4)
    dropout: float = setting(0.1, ge=0, lt=1)
    # conditioning vector: image-embedding MLP + sinusoidal timestep embedding
    cond_dim: int = setting(256, ge=1, le=MAX_WIDTH)
    time_dim: int = setting(128, ge=1, le=MAX_WIDTH)  # sinusoidal timestep features
    # The prior head: a residual MLP (width, depth, dropout) from the image embedding to the code's
    # conditional mean mu(e). The denoiser's output is a_t z_t + (1 - a_t^2) mu(e) + U-Net(z_t, t, e): the
    # Gaussian-optimal z0 estimate plus a learned residual (the multi-modal part). 0 disables it (the plain
    # CS-UNet of the paper; the measured difference: docs/results.md).
    head_width: int = setting(512, ge=0, le=MAX_WIDTH)
    head_depth: int = setting(3, ge=0, le=MAX_DEPTH)
    head_dropout: float = setting(0.1, ge=0, lt=1)
    # M > 1: the head gives M component codes c_i(e), weights and variances s_i^2, and the skeleton is the
    # exact posterior mean of z0 ~ sum_i w_i N(c_i, s_i^2 I) instead of one N(mu, I) (a multimodal
    # denoiser before the U-Net adds anything); 1 is the single Gaussian (runs trained before load as they were)
    head_components: int = setting(1, ge=1, le=64)
    # Training-time Gaussian noise on the standardised image embedding (in its standard deviations), drawn
    # afresh for the conditioning MLP and the prior head; none at evaluation. A regulariser for the
    # condition: without it the validation SHDD-KL stops falling after ~1,500 steps while the training
    # one keeps falling. 0 = none (base.yaml sets it; the figures: docs/results.md).
    embedding_noise: float = setting(0.0, ge=0, le=1e3)


@dataclass
class DiffusionConfig:
    timesteps: int = setting(1000, ge=1, le=MAX_TIMESTEPS)  # T of the VP cosine schedule
    prediction: Literal["sample", "epsilon"] = "sample"  # the network predicts z0 (design 5)
    cond_drop_prob: float = setting(0.0, ge=0, lt=1)  # classifier-free guidance training: condition dropped with this p
    guidance_scale: float = setting(1.0, ge=0, le=1e3)  # w at sampling; 1 = no guidance
    # training timesteps are drawn from [min_train_timestep, T); T - 1 trains the network as a one-step
    # regressor (its input is then always pure noise): the no-diffusion ablation, sampled with S = 1
    min_train_timestep: int = setting(0, ge=0, le=MAX_TIMESTEPS)  # < timesteps (checked by Config.validate)


@dataclass
class TrainConfig:
    objective: Objective = "kl+mse"  # KL alone is blind to l = 0 and the scale (LOCDIFF.md 4)
    kl_weight: float = setting(1.0, ge=0, le=1e6)
    mse_weight: float = setting(1.0, ge=0, le=1e6)  # on z-space MSE per coefficient (unit variance targets)
    # the prior head's own loss (the same objective on mu(e) against z0), so that it learns the conditional
    # mean from every sample, not only through the (1 - a_t^2) share of the denoiser's output; 0 disables
    prior_weight: float = setting(1.0, ge=0, le=1e6)
    steps: int = setting(2000, ge=1, le=MAX_STEPS)
    batch_size: int = setting(256, ge=1, le=MAX_BATCH)  # and <= limits.max_batch_size
    lr: float = setting(1e-3, gt=0, le=10)
    min_lr_ratio: float = setting(0.05, ge=0, le=1)  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = setting(100, ge=0, le=MAX_STEPS)
    weight_decay: float = setting(0.0, ge=0, le=1e3)
    grad_clip: float = setting(1.0, ge=0, le=1e6)  # max gradient norm; 0 disables
    ema_decay: float = setting(0.999, ge=0, lt=1)
    checkpoint_every: int = setting(500, ge=1, le=MAX_STEPS)
    log_every: int = setting(50, ge=1, le=MAX_STEPS)
    seed: int = setting(0, ge=0, le=MAX_SEED)
    amp: bool = True  # bfloat16 autocast, used only on CUDA
    device: str = setting("auto", pattern=DEVICE_PATTERN, expect=DEVICE_EXPECT)  # "auto" -> cuda when available
    # validation images used to choose the aggregation and LocDiff-H weight
    val_samples: int = setting(512, ge=1, le=MAX_ROWS)
    val_share: float = setting(0.02, ge=0, lt=1)  # without a validation set: this share of training is held out
    # CPU threads reading and decoding the training windows per worker: raise it when a GPU waits for data
    loader_threads: int = setting(1, ge=1, le=64)
    # torch CPU threads of the training maths per worker; 0: OMP_NUM_THREADS, else the usable CPUs minus loader_threads
    threads: int = setting(0, ge=0, le=1024)
    peak_tflops: float = setting(0.0, ge=0, le=1e5)  # the device's peak for the MFU; 0: looked up by the GPU's name

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
    samples: int = setting(16, ge=1, le=MAX_SAMPLES)  # K samples per image
    steps: int = setting(50, ge=1, le=MAX_TIMESTEPS)  # and <= diffusion.timesteps  # S DDIM steps
    aggregation: Aggregation = "auto"  # auto -> chosen on validation during training (default mean)
    support_radius_km: float = setting(500.0, gt=0, le=HALF_EARTH_KM)  # radius for the "most support" aggregation
    # the confidence of an answer is the calibrated probability that the truth lies within this radius
    confidence_radius_km: float = setting(200.0, gt=0, le=HALF_EARTH_KM)
    batch_size: int = setting(256, ge=1, le=MAX_BATCH)  # images per sampling batch (<= limits.max_batch_size)
    decode_candidates: int = setting(3, ge=1, le=64)  # local maxima refined by shdd.decode
    # 0: the answer is the argmax of f_c; s > 0: the peak is chosen on f_c smoothed by a Gaussian taper of
    # width L / s in degree (the peak with the most mass near it) and placed by Newton ascent on raw f_c
    decode_smoothing: float = setting(3.0, ge=0, le=1e3)

    @property
    def inference(self) -> str:
        """What prediction runs, in words: "one-step" (one sample of one DDIM step from pure noise, the
        network's z0 estimate: a regressor into SHDD space) or "sampled (K=16, S=50)"."""
        return "one-step" if self.samples == 1 and self.steps == 1 else f"sampled (K={self.samples}, S={self.steps})"


@dataclass
class HybridConfig:
    # poe: LocDiff's clipped density times a kernel density of the neighbours with a novelty floor
    # (locdiff.model.hybrid); blend: the weighted sum within a radius (runs trained before have no mode)
    mode: Literal["poe", "blend"] = "poe"
    top_k: int = setting(32, ge=1, le=MAX_TOP_K)  # gallery candidates per image
    # blend: candidates farther than this from the LocDiff mode do not qualify
    radius_km: float = setting(1000.0, gt=0, le=HALF_EARTH_KM)
    # blend: score = weight * f_c(candidate)/f_c(mode) + (1 - weight) * cosine similarity
    weight: float = setting(0.5, ge=0, le=1)
    tune_on_val: bool = True  # choose the mode's parameters on validation during training
    # poe: the accuracy (points) LocDiff-H may give away at any threshold and validation group against the
    # better of LocDiff and retrieval there; settings within it are preferred, then the larger summed gain
    poe_tolerance: float = setting(0.5, ge=0, le=100)


@dataclass
class LimitsConfig:
    """Budgets checked before anything is allocated (a ConfigError names the setting to raise). The defaults
    fit a CPU machine with a few GB of memory; raise them for a large GPU (`--set limits.max_parameters=...`).
    Not part of a run's identity: changing them never retrains or refuses to resume a run."""

    # the denoiser's parameters (4 bytes each; training holds ~4 copies: weights, gradients, AdamW moments)
    max_parameters: int = setting(200_000_000, ge=1, le=100_000_000_000)
    max_batch_size: int = setting(65_536, ge=1, le=MAX_BATCH)  # train.batch_size and predict.batch_size
    # predict: images x samples drawn at once (a batch of images is split into chunks of at most this many)
    max_codes_per_chunk: int = setting(65_536, ge=1, le=1 << 26)
    # SHDD-KL's numbers held at once (4 bytes each): its grid basis, G points x D coefficients, and a batch's
    # logits, batch_size x G (paper.yaml: 1.8e8)
    max_kl_grid_numbers: int = setting(1 << 28, ge=1, le=1 << 40)
    max_request_rows: int = setting(1024, ge=1, le=1 << 20)  # rows in one request to the served model
    max_request_images: int = setting(64, ge=1, le=1 << 16)  # photos in one request (each is decoded)
    # pixels of all the photos of one request, read from their headers before any is decoded (4 photos of 64 Mpx)
    max_request_pixels: int = setting(256_000_000, ge=1, le=1 << 40)


@dataclass
class Config:
    method: str = setting("locdiff", check=_method_name)  # a name of METHODS
    shdd: SHDDConfig = field(default_factory=SHDDConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)  # the retrieval index (locdiff.gallery_build)
    baselines: dict[str, Any] = setting(default_factory=dict, check=check_baselines)  # baseline name -> its options
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # memory budgets (not part of a run's identity)

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
        for section in ("train", "predict"):
            size = getattr(self, section).batch_size
            if size > self.limits.max_batch_size:
                raise Invalid(f"{section}.batch_size", f"must be <= limits.max_batch_size "
                              f"({self.limits.max_batch_size}; raise it for a large GPU); got {size}")
        if "kl" in self.train.objective.split("+"):
            d = (self.shdd.degree + 1) ** 2
            g = self.shdd.kl_grid_size or 8 * d  # the default of locdiff.shdd.kl_loss
            numbers = g * (d + self.train.batch_size)
            if numbers > self.limits.max_kl_grid_numbers:
                raise Invalid("shdd.kl_grid_size", f"SHDD-KL would hold {numbers:,} numbers ({g:,} grid points x "
                              f"({d:,} coefficients of degree {self.shdd.degree} + a batch of "
                              f"{self.train.batch_size})), above limits.max_kl_grid_numbers "
                              f"({self.limits.max_kl_grid_numbers:,}); set a smaller grid or degree, or raise "
                              "the limit on a larger machine; got " + schema.show(self.shdd.kl_grid_size))
        if self.network.head_width > 0 and self.diffusion.prediction != "sample":
            raise Invalid("network.head_width", "the prior head needs diffusion.prediction: sample (it adds to the "
                          "z0 estimate); set network.head_width: 0 for epsilon-prediction")


def check_predict_options(cfg: Config, *, samples: Any = None, steps: Any = None, seed: Any = None,
                          flags: bool = False) -> None:
    """Values given to one prediction (CLI flags, Python arguments) under the config's rules: samples and
    steps within predict.samples' and predict.steps' bounds, steps <= diffusion.timesteps, seed within
    train.seed's. ConfigError "--samples: must be ..." (flags=True) or "samples: must be ..."; None is unset."""
    rules = {"samples": (PredictConfig, samples), "steps": (PredictConfig, steps), "seed": (TrainConfig, seed)}
    for name, (cls, value) in rules.items():
        if value is None:
            continue
        where = f"--{name}" if flags else name
        try:
            schema.coerce(value, int, schema.spec_of(cls, name))
        except Invalid as err:
            raise ConfigError(where, "", err.problem) from None
        if name == "steps" and value > cfg.diffusion.timesteps:
            raise ConfigError(where, "", f"must be <= diffusion.timesteps of the run ({cfg.diffusion.timesteps}); "
                              f"got {value}")


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
