"""Typed options for the baselines: the run config's `baselines.<name>` mapping -> a dataclass.

Every baseline's options class lives here (`KNNOptions`, `GeocellOptions`, ...), with ranges
(`setting(1, ge=1)`) checked by `locdiff.schema`, the one config system, so that a config is checked
without importing any baseline. `check_baselines` validates a whole
`baselines` section when the run config is loaded (so nothing is written before a bad option is found);
`parse_options` builds one baseline's options from a resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from locdiff import schema
from locdiff.errors import ConfigError
from locdiff.schema import DEVICE_EXPECT, DEVICE_PATTERN, Invalid, setting

T = TypeVar("T")


@dataclass
class MLPOptions:
    """Network and training options shared by the trained baselines."""

    hidden: int = setting(256, ge=1, le=65_536)
    depth: int = setting(2, ge=0, le=64)  # residual blocks
    dropout: float = setting(0.1, ge=0, lt=1)
    epochs: int = setting(20, ge=1, le=100_000)
    batch_size: int = setting(256, ge=1, le=1 << 20)
    lr: float = setting(1e-3, gt=0, le=10)
    weight_decay: float = setting(1e-4, ge=0, le=1e3)
    warmup_steps: int = setting(100, ge=0, le=1_000_000_000)
    seed: int = setting(0, ge=0, le=2**63 - 1)
    device: str = setting("auto", pattern=DEVICE_PATTERN, expect=DEVICE_EXPECT)  # "auto" -> cuda when available


@dataclass
class KNNOptions:
    k: int = setting(1, ge=1, le=1024)  # neighbours retrieved; 1 = top-1 retrieval
    aggregation: Literal["mode", "mean"] = "mode"  # how k > 1 neighbours become one answer
    radius_km: float = setting(100.0, gt=0, le=20_038)  # support radius of the "mode" aggregation
    temperature: float = setting(0.05, gt=0, le=1e3)  # neighbour weight exp((sim - best) / temperature)


@dataclass
class GeocellOptions(MLPOptions):
    max_cell_size: int = setting(200, ge=1, le=100_000_000)  # a cell with more training points is split in two
    label_smoothing_km: float = setting(75.0, ge=0, le=20_038)  # haversine smoothing temperature (PIGEON); 0 = one-hot
    refine: Literal["none", "retrieval"] = "none"  # retrieval: best-matching training image in the cell
    medoid_sample: int = setting(256, ge=1, le=4096)  # points per cell used to find its medoid (a square matrix)
    # locations the cells are built from (a seeded sample above this)
    max_cell_points: int = setting(1_000_000, ge=1, le=100_000_000)
    refine_top_k: int = setting(64, ge=1, le=1024)  # retrieved neighbours searched for one inside the predicted cell


@dataclass
class RegressOptions(MLPOptions):
    loss: Literal["cosine", "mse"] = "cosine"


@dataclass
class FlowOptions(MLPOptions):
    epochs: int = 40  # keeps MLPOptions' rule (>= 1)
    time_dim: int = setting(32, ge=2, le=65_536)  # sinusoidal features of t
    steps: int = setting(16, ge=1, le=100_000)  # ODE steps at sampling
    solver: Literal["heun", "euler"] = "heun"
    samples: int = setting(16, ge=1, le=1024)  # noise draws per image
    aggregation: Literal["mode", "mean"] = "mode"
    mode_radius_km: float = setting(300.0, gt=0, le=20_038)
    predict_batch: int = setting(1024, ge=1, le=1 << 20)  # images per sampling batch
    target: Literal["x1", "velocity"] = "x1"  # x1: the net predicts the clean point, v = (x1_hat - x_t)/(1-t)


# baseline name -> its options class
OPTIONS: dict[str, type] = {"knn": KNNOptions, "geocell": GeocellOptions, "regress": RegressOptions,
                            "flow": FlowOptions}


def options_class(name: str) -> type:
    """The options dataclass of baseline `name` (Invalid naming the valid baselines otherwise)."""
    if name not in OPTIONS:
        raise Invalid(str(name), f"unknown baseline; valid names here: {', '.join(OPTIONS)}")
    return OPTIONS[name]


def check_baselines(section: dict[str, Any]) -> dict[str, Any]:
    """Validate a run config's `baselines` mapping (name -> options); returns it unchanged.

    Raises Invalid with the key relative to the section, e.g. "knn.k" (the schema prefixes "baselines").
    """
    for name, options in section.items():
        cls = options_class(name)
        try:
            schema.build_at(cls, {} if options is None else options)
        except Invalid as err:
            raise err.under(str(name)) from None
    return section


def parse_options(cls: type[T], config: dict[str, Any] | None, name: str) -> T:
    """Build `cls` from config["baselines"][name], rejecting unknown keys, wrong types and values out of
    range with a ConfigError naming `baselines.NAME.KEY`."""
    baselines = (config or {}).get("baselines") or {}
    if not isinstance(baselines, dict):
        raise ConfigError("", "baselines", f"must be a mapping; got {schema.show(baselines)}")
    return schema.build(cls, baselines.get(name) or {}, prefix=f"baselines.{name}")
