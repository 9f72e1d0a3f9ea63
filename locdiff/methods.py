"""The interface every geolocation method implements, and the registry `locdiff train/predict` use.

A method is trained by `fit` into a run directory and loaded back from it; `locdiff train --method NAME`
and `locdiff predict` work the same way for LocDiff and for every baseline.

    method = get_method("knn").from_config(cfg)   # cfg: the resolved config dict of the run
    method.fit(train, val, run_dir)               # resumes from run_dir when it holds a checkpoint
    pred = method.predict(test)                   # Prediction(lat, lon, confidence)
    method = get_method(name).load(run_dir, cfg)  # the CLI reads cfg from run_dir/config.yaml
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from locdiff.tables import EmbeddingTable

# name -> "module:Class"; modules are imported on first use.
METHODS: dict[str, str] = {
    "locdiff": "locdiff.model.method:LocDiffMethod",
    "knn": "locdiff.baselines.knn:KNNMethod",
    "geocell": "locdiff.baselines.geocell:GeocellMethod",
    "regress": "locdiff.baselines.regress:RegressMethod",
    "flow": "locdiff.baselines.flow:FlowMethod",
}


@dataclass
class Prediction:
    lat: np.ndarray  # (N,) float64 degrees
    lon: np.ndarray  # (N,) float64 degrees
    confidence: np.ndarray | None = None  # (N,) higher is more confident


class GeoMethod(ABC):
    """A trainable image-embedding -> location predictor."""

    name: str = ""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> GeoMethod:
        """Build an untrained method from the resolved run config."""

    @abstractmethod
    def fit(self, train: EmbeddingTable, val: EmbeddingTable | None, run_dir: Path, *,
            progress: bool = True) -> dict[str, float]:
        """Train, writing checkpoints into run_dir (resuming from them); return final metrics."""

    @abstractmethod
    def save(self, run_dir: Path) -> None:
        """Write what `load` needs into run_dir."""

    @classmethod
    @abstractmethod
    def load(cls, run_dir: Path, config: dict[str, Any]) -> GeoMethod:
        """Load a trained method from run_dir."""

    @abstractmethod
    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        """Predict locations for every row of table."""


def get_method(name: str) -> type[GeoMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
