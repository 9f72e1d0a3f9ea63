"""Typed options for the baselines: the run config's `baselines.<name>` mapping -> a dataclass."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

T = TypeVar("T")


@dataclass
class MLPOptions:
    """Network and training options shared by the trained baselines."""

    hidden: int = 256
    depth: int = 2  # residual blocks
    dropout: float = 0.1
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda when available


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            options = ", ".join(map(repr, typing.get_args(tp)))
            raise ValueError(f"{where}: must be one of {options}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: must be a number; got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: must be an integer; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string; got {value!r}")
        return value
    return value


def parse_options(cls: type[T], config: dict[str, Any] | None, name: str) -> T:
    """Build `cls` from config["baselines"][name], rejecting unknown keys and wrong types."""
    section = ((config or {}).get("baselines") or {}).get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"baselines.{name}: must be a mapping of options; got {section!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in section.items():
        if key not in names:
            raise ValueError(f"baselines.{name}.{key}: unknown key; valid keys here: {', '.join(names)}")
        kwargs[key] = _check(value, hints[key], f"baselines.{name}.{key}")
    return cls(**kwargs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
