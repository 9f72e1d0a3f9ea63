"""Typed run configuration: YAML -> nested dataclasses, unknown keys rejected, `--set key=value` overrides.

    cfg = load_config("configs/model/base.yaml", overrides=["train.steps=500", "network.dropout=0.2"])
    save_config(cfg, run_dir / "config.yaml")          # the resolved config of the run
    cfg = config_from_dict(yaml.safe_load(...))          # e.g. from a run directory

Every section is a dataclass; a key that is not a field is a ValueError naming the file and the key path
with the valid keys. Values are type-checked against the field annotations (int, float, bool, str,
Literal, lists, optional). The `baselines` section is a free mapping (baseline name -> options) that the
baseline methods validate themselves.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Objective = Literal["kl", "mse", "kl+mse"]
Aggregation = Literal["auto", "mean", "support"]


@dataclass
class SHDDConfig:
    degree: int = 32  # L; D = (L+1)^2. Sets the finest scale the code can express (see LOCDIFF.md 2)
    kl_tau: float | None = None  # SHDD-KL temperature; None -> locdiff.shdd.default_tau(L)
    kl_grid_size: int | None = None  # SHDD-KL grid points; None -> 8 (L+1)^2 (shdd default)


@dataclass
class NetworkConfig:
    widths: list[int] = field(default_factory=lambda: [512, 256, 128])  # encoder widths, top to bottom
    blocks_per_level: int = 1  # sine residual blocks per level (encoder and decoder)
    omega_0: float = 30.0  # SIREN frequency of the input layer
    omega_hidden: float = 1.0  # frequency of the hidden sine layers (SIREN init scales weights by it)
    dropout: float = 0.1
    cond_dim: int = 256  # conditioning vector: image-embedding MLP + sinusoidal timestep embedding
    time_dim: int = 128  # sinusoidal timestep features


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T of the VP cosine schedule
    prediction: Literal["sample", "epsilon"] = "sample"  # the network predicts z0 (design 5)
    cond_drop_prob: float = 0.0  # classifier-free guidance training: condition dropped with this p
    guidance_scale: float = 1.0  # w at sampling; 1 = no guidance
    # training timesteps are drawn from [min_train_timestep, T); T - 1 trains the network as a one-step
    # regressor (its input is then always pure noise): the no-diffusion ablation, sampled with S = 1
    min_train_timestep: int = 0


@dataclass
class TrainConfig:
    objective: Objective = "kl+mse"  # KL alone is blind to l = 0 and the scale (LOCDIFF.md 4)
    kl_weight: float = 1.0
    mse_weight: float = 1.0  # on z-space MSE per coefficient (unit variance targets)
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    amp: bool = True  # bfloat16 autocast, used only on CUDA
    device: str = "auto"  # "auto" -> cuda when available
    val_samples: int = 512  # validation images used to choose the aggregation and LocDiff-H weight
    val_share: float = 0.02  # without a validation set, this share of the training rows is held out


@dataclass
class PredictConfig:
    samples: int = 16  # K samples per image
    steps: int = 50  # S DDIM steps
    aggregation: Aggregation = "auto"  # auto -> chosen on validation during training (default mean)
    support_radius_km: float = 500.0  # radius for the "most support" aggregation and the confidence
    batch_size: int = 256  # images per sampling batch
    decode_candidates: int = 3


@dataclass
class HybridConfig:
    top_k: int = 32  # gallery candidates per image
    radius_km: float = 1000.0  # candidates farther than this from the LocDiff mode do not qualify
    weight: float = 0.5  # score = weight * f_c(candidate)/f_c(mode) + (1 - weight) * cosine similarity
    tune_on_val: bool = True  # choose weight and radius on validation during training


@dataclass
class Config:
    method: str = "locdiff"
    shdd: SHDDConfig = field(default_factory=SHDDConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    baselines: dict[str, Any] = field(default_factory=dict)  # baseline name -> its options


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check value against annotation tp; ints are accepted for floats. ValueError naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(
                f"{where}: must be one of {', '.join(map(repr, typing.get_args(tp)))}; got {value!r}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(
            errors[0]
            if len(errors) == 1
            else f"{where}: {value!r} matches none of {' | '.join(_type_name(a) for a in args)}"
        )
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: must be a list; got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: must be a mapping; got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}: must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}"
                f"; got {value!r}"
            )
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string; got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # a bug in this module, not bad input


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where and not where.endswith(":") else where
        raise ValueError(f"{prefix}{unknown[0]}: unknown key; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where and not where.endswith(":") else f"{where}{name}"
        kwargs[name] = _coerce(value, hints[name], path)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None, *, source: str = "config") -> Config:
    """Validate a nested mapping into a Config. `source` prefixes error messages (e.g. the file name)."""
    cfg = _build(Config, data or {}, f"{source}: ")
    d = cfg.diffusion
    if not 0 <= d.min_train_timestep < d.timesteps:
        raise ValueError(f"{source}: diffusion.min_train_timestep must be in [0, diffusion.timesteps - 1 = "
                         f"{d.timesteps - 1}]; got {d.min_train_timestep}")
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested mapping (values parsed as YAML scalars/lists).

    Key paths are checked against the dataclasses (except under `baselines`), so a typo is an error.
    """
    data = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. train.steps=500")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: cannot parse the value: {err}") from None
        parts = key.split(".")
        cls: Any = Config
        node = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if cls is not None:
                names = [f.name for f in dataclasses.fields(cls)]
                if part not in names:
                    raise ValueError(
                        f"--set {key}: unknown key {part!r}; valid keys here: {', '.join(names)}"
                    )
                tp = typing.get_type_hints(cls)[part]
                cls = tp if dataclasses.is_dataclass(tp) else None
            if last:
                node[part] = value
            else:
                child = node.get(part)
                child = dict(child) if isinstance(child, dict) else {}
                node[part] = child
                node = child
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None -> defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping; got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    return config_from_dict(data, source=source)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config mapping saved in a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: not a run directory (no config.yaml); train with `locdiff train`"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return data
