"""`knn`: cosine retrieval over the training embeddings (GeoCLIP / Img2Loc style).

k = 1 answers the location of the most similar training image. With k > 1 the answer is the retrieved
location with the most similarity-weighted support among the top k within `radius_km` ("mode"), or the
normalised weighted mean of their unit vectors ("mean"). Search is the training data's gallery
(locdiff.gallery: exact below `gallery.flat_threshold` entries, IVF above), built once per data set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from locdiff import engine, schema
from locdiff.baselines.options import KNNOptions, parse_options
from locdiff.data.datasource import DataSource
from locdiff.gallery import Gallery, GalleryConfig, gallery_for_run
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_unit, unit_to_latlon
from locdiff.methods import GeoMethod, Prediction
from locdiff.model.config import Config, config_to_dict
from locdiff.runs import RunFolder
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)


def aggregate_neighbours(sims: np.ndarray, lat: np.ndarray, lon: np.ndarray, *, how: str, radius_km: float,
                         temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, k) neighbour similarities and locations -> (lat, lon, confidence) per query."""
    w = np.exp((sims - sims[:, :1]) / temperature)  # (N, k), best neighbour weight 1
    u = latlon_to_unit(lat, lon)  # (N, k, 3)
    if how == "mean":
        m = (w[..., None] * u).sum(1)
        plat, plon = unit_to_latlon(m)
        conf = np.linalg.norm(m, axis=1) / w.sum(1)
        return plat, plon, conf
    cos_r = np.cos(radius_km / EARTH_RADIUS_KM)
    close = np.einsum("nid,njd->nij", u, u) >= cos_r  # (N, k, k)
    support = (close * w[:, None, :]).sum(2)  # (N, k)
    best = support.argmax(1)
    rows = np.arange(len(sims))
    return lat[rows, best], lon[rows, best], support[rows, best] / w.sum(1)


class KNNMethod(GeoMethod):
    """Retrieval baseline: the gallery is the training set (stored once per training data set and
    referenced by the run)."""

    name = "knn"
    trains = False

    def __init__(self, options: KNNOptions, gallery_config: GalleryConfig | None = None):
        self.options = options
        self.gallery_config = gallery_config or GalleryConfig()
        self.gallery: Gallery | None = None
        self.gallery_ref: dict[str, Any] | None = None
        self.run_dir: Path | None = None

    @classmethod
    def from_config(cls, config: Config | dict[str, Any]) -> KNNMethod:
        if not isinstance(config, dict):
            config = config_to_dict(config)
        return cls(parse_options(KNNOptions, config, "knn"),
                   schema.build(GalleryConfig, config.get("gallery") or {}, source="config", prefix="gallery"))

    def finalize(self, result: engine.Result | None, source: DataSource, val: DataSource | None, run: RunFolder,
                 *, progress: bool = True) -> dict[str, float]:
        if not source.labelled:
            raise ValueError(f"{source.location}: knn needs a labelled training table (columns lat, lon)")
        self.gallery, self.gallery_ref = gallery_for_run(source, run.path, self.gallery_config, progress=progress)
        self.run_dir = run.path
        self.save(run.path)
        return {"gallery_size": float(len(self.gallery)), **self.validation_metrics(val)}

    def save(self, run_dir: Path) -> None:
        if self.gallery_ref is None:
            raise ValueError("knn: nothing to save, the method is not fitted")
        RunFolder(run_dir).save_model({}, {"method": self.name, "gallery": self.gallery_ref,
                                           "embed_dim": int(self.gallery.dim)})

    @classmethod
    def load(cls, run_dir: Path, config: Config | dict[str, Any]) -> KNNMethod:
        _, meta = RunFolder(run_dir).load_model()
        if meta.get("method") != cls.name:
            raise ValueError(f"{run_dir}: a {meta.get('method')!r} model, not 'knn'")
        m = cls.from_config(config)
        m.gallery_ref, m.run_dir = meta["gallery"], Path(run_dir)
        return m

    def _gallery(self) -> Gallery:
        if self.gallery is None:
            self.gallery = Gallery.load(self.gallery_ref, nprobe=self.gallery_config.nprobe)
        return self.gallery

    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        """Options: k, aggregation, radius_km override the config for this call."""
        if self.gallery_ref is None:
            raise ValueError("knn: predict before fit/load")
        g = self._gallery()
        if table.dim != g.dim:
            raise ValueError(f"{table.source}: embeddings have dimension {table.dim}, the gallery has {g.dim}")
        o = self.options
        k = int(options.get("k", o.k))
        how = options.get("aggregation", o.aggregation)
        sims, idx = g.search(table.embedding, k)
        if idx.shape[1] == 1:
            return Prediction(g.lat[idx[:, 0]], g.lon[idx[:, 0]], sims[:, 0].astype(np.float64))
        plat, plon, conf = aggregate_neighbours(sims, g.lat[idx], g.lon[idx], how=how,
                                                radius_km=float(options.get("radius_km", o.radius_km)),
                                                temperature=o.temperature)
        return Prediction(np.asarray(plat, np.float64), np.asarray(plon, np.float64), conf)
