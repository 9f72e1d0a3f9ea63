"""One module per data source; `make_source(cfg, source)` picks the one a data set's config names."""

from __future__ import annotations

import importlib

from locdiff.data.config import DatasetConfig
from locdiff.data.sources.base import Plan, Record, Source, TabularSource

SOURCES = ("im2gps3k", "yfcc4k", "yfcc26k", "mp16", "osv5m", "gws15k", "folder", "embeddings")


def make_source(cfg: DatasetConfig, source: str | None = None) -> Source:
    """The Source object for a data set config (`cfg.source` names the module)."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data set {cfg.name!r}: unknown source {cfg.source!r}; valid: {list(SOURCES)}")
    module = importlib.import_module(f"locdiff.data.sources.{cfg.source}")
    return module.SOURCE(cfg, source)


__all__ = ["SOURCES", "Plan", "Record", "Source", "TabularSource", "make_source"]
