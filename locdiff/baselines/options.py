"""Typed options for the baselines: the run config's `baselines.<name>` mapping -> a dataclass.

Each baseline declares its options class beside its code (`KNNOptions` in knn.py, ...), with ranges
(`setting(1, ge=1)`) checked by `locdiff.schema`, the one config system. `check_baselines` validates a whole
`baselines` section when the run config is loaded (so nothing is written before a bad option is found);
`parse_options` builds one baseline's options from a resolved config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from locdiff import schema
from locdiff.errors import ConfigError
from locdiff.schema import DEVICE_EXPECT, DEVICE_PATTERN, Invalid, setting

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# baseline name -> "module:OptionsClass"; the module is imported when a config names the baseline.
OPTIONS: dict[str, str] = {
    "knn": "locdiff.baselines.knn:KNNOptions",
    "geocell": "locdiff.baselines.geocell:GeocellOptions",
    "regress": "locdiff.baselines.regress:RegressOptions",
    "flow": "locdiff.baselines.flow:FlowOptions",
}


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


def options_class(name: str) -> type:
    """The options dataclass of baseline `name` (Invalid naming the valid baselines otherwise)."""
    if name not in OPTIONS:
        raise Invalid(str(name), f"unknown baseline; valid names here: {', '.join(OPTIONS)}")
    module, cls = OPTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


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


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
