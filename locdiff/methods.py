"""The interface every geolocation method implements, and the registry `locdiff train/predict` use.

A method is trained by `fit` into a run folder and loaded back from it; `locdiff train --method NAME`
and `locdiff predict` work the same way for LocDiff and for every baseline.

    method = get_method("knn").from_config(cfg)   # cfg: the resolved config (a Config or its dict)
    method.fit(train, val, run_dir)               # train: a path, an EmbeddingTable or a DataSource;
                                                  # resumes from run_dir when it holds a checkpoint
    pred = method.predict(test)                   # Prediction(lat, lon, confidence)
    method = get_method(name).load(run_dir, cfg)  # the CLI reads cfg from run_dir/config.yaml

`fit` is written once, here: the method gives the engine a `Task` (its network and loss; None when there
is nothing to train, as for retrieval) and its `Settings`; the engine trains (locdiff.engine); then the
method's `finalize` does what comes after training (choices on validation, the retrieval gallery) and
saves what `load` needs. A Ray Train run (locdiff.distributed) trains the same task with the same engine;
`fit` then finds the final checkpoint and only finalizes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from locdiff import engine
from locdiff.data.datasource import DataSource, open_source
from locdiff.metrics import geo_metrics
from locdiff.model.config import METHODS, Config
from locdiff.runs import RunFolder
from locdiff.tables import EmbeddingTable

__all__ = ["METHODS", "GeoMethod", "Prediction", "get_method", "prepare_data"]

Data = str | EmbeddingTable | DataSource  # what `fit` reads: a path or URL, a table, or an open source
VALIDATION_METRIC_ROWS = 4096  # rows a baseline's final validation metrics are measured on


@dataclass
class Prediction:
    lat: np.ndarray  # (N,) float64 degrees
    lon: np.ndarray  # (N,) float64 degrees
    confidence: np.ndarray | None = None  # (N,) higher is more confident
    # (N, D) raw SHDD code of the predicted density, for methods that predict one (LocDiff): what the
    # top-k modes of `locdiff locate` are read from (locdiff.shdd.modes)
    density_code: np.ndarray | None = None


def prepare_data(train: Data, val: Data | None = None, *, val_share: float = 0.0,
                 seed: int = 0) -> tuple[DataSource, DataSource | None]:
    """(training source, validation source or None): `val` when given, else a held-out share of `train`
    (a deterministic hash of the row index; nothing is copied)."""
    source = open_source(train, labelled=True)
    if val is not None:
        vsrc = open_source(val, labelled=True)
        if vsrc.dim != source.dim:
            raise ValueError(f"{vsrc.location}: column 'embedding' has dimension {vsrc.dim}; the training data "
                             f"{source.location} has {source.dim}")
        return source, vsrc
    if val_share > 0 and source.count >= 20:
        return source.split(val_share, seed)
    return source, None


class GeoMethod(ABC):
    """A trainable image-embedding -> location predictor."""

    name: str = ""
    trains: bool = True  # False: nothing to train (retrieval), `task` returns None

    @classmethod
    @abstractmethod
    def from_config(cls, config: Config | Mapping[str, Any]) -> GeoMethod:
        """Build an untrained method from the resolved run config."""

    def task(self, source: DataSource) -> engine.Task | None:
        """The engine task (network and loss) to train on `source`; None: nothing to train."""
        return None

    def settings(self, source: DataSource) -> engine.Settings:
        """The engine settings (steps, batch, LR, ...) for `source`."""
        raise ValueError(f"{self.name} has nothing to train")

    @abstractmethod
    def finalize(self, result: engine.Result | None, source: DataSource, val: DataSource | None, run: RunFolder, *,
                 progress: bool = True) -> dict[str, float]:
        """After training (result: the engine's Result, None without a task): choices on validation,
        galleries; then save. Returns final metrics."""

    val_unseen: DataSource | None = None  # validation rows of regions absent from the training data (set by `fit`)

    def fit(self, train: Data, val: Data | None, run_dir: str | Path, *, progress: bool = True,
            val_share: float = 0.0, max_steps_this_run: int | None = None,
            val_unseen: Data | None = None) -> dict[str, float]:
        """Train into run_dir (resuming from its checkpoint) and finalize; returns final metrics.
        `val_unseen` (optional): validation rows from regions absent from `train`; methods that choose
        settings on validation may use them (LocDiff-H does)."""
        source, vsrc = prepare_data(train, val, val_share=val_share, seed=0)
        self.val_unseen = None
        if val_unseen is not None:
            self.val_unseen = prepare_data(source, val_unseen)[1]
        run = RunFolder(run_dir)
        run.create()
        task = self.task(source)
        result = None
        if task is not None:
            result = engine.train(task, source, self.settings(source), store=engine.RunStore(run), val=vsrc,
                                  progress=progress, max_steps_this_run=max_steps_this_run)
            if result.step < self.settings(source).steps:
                return dict(result.metrics)  # interrupted on purpose: nothing to finalize yet
        return self.finalize(result, source, vsrc, run, progress=progress)

    def validation_metrics(self, val: DataSource | None) -> dict[str, float]:
        """`val/<metric>` (locdiff.metrics.geo_metrics) of this method's predictions on the first
        VALIDATION_METRIC_ROWS validation rows; {} without validation rows."""
        if val is None or not val.count:
            return {}
        table = val.read_all(limit=VALIDATION_METRIC_ROWS)
        p = self.predict(table)
        return {f"val/{k}": v for k, v in geo_metrics(p.lat, p.lon, table.lat, table.lon).items()}

    @abstractmethod
    def save(self, run_dir: Path) -> None:
        """Write what `load` needs into run_dir."""

    @classmethod
    @abstractmethod
    def load(cls, run_dir: Path, config: Config | Mapping[str, Any]) -> GeoMethod:
        """Load a trained method from run_dir."""

    @abstractmethod
    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        """Predict locations for every row of table."""


def get_method(name: str) -> type[GeoMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
