"""`knn`: cosine retrieval over the training embeddings (GeoCLIP / Img2Loc style).

k = 1 answers the location of the most similar training image. With k > 1 the answer is the retrieved
location with the most similarity-weighted support among the top k within `radius_km` ("mode"), or the
normalised weighted mean of their unit vectors ("mean"). Search is exact: chunked matrix products in
torch, or faiss's flat inner-product index when faiss is installed (`backend: auto`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from locdiff.baselines.options import parse_options, resolve_device
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_unit, unit_to_latlon
from locdiff.methods import GeoMethod, Prediction
from locdiff.schema import DEVICE_EXPECT, DEVICE_PATTERN, setting
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)



@dataclass
class KNNOptions:
    k: int = setting(1, ge=1)  # neighbours retrieved; 1 = top-1 retrieval
    aggregation: Literal["mode", "mean"] = "mode"  # how k > 1 neighbours become one answer
    radius_km: float = setting(100.0, gt=0)  # support radius of the "mode" aggregation
    temperature: float = setting(0.05, gt=0)  # neighbour weight exp((sim - best) / temperature)
    backend: Literal["auto", "torch", "faiss"] = "auto"  # auto: faiss when installed, else torch
    chunk: int = setting(4096, ge=1)  # queries per matrix product (torch backend)
    device: str = setting("auto", pattern=DEVICE_PATTERN, expect=DEVICE_EXPECT)


def normalize(x: np.ndarray | torch.Tensor) -> Any:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.normalize(x.float(), dim=-1)
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _faiss():
    try:
        import faiss  # optional
    except ImportError:
        return None
    return faiss


def cosine_topk(query: np.ndarray, gallery: np.ndarray, k: int, *, backend: str = "auto", chunk: int = 4096,
                device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine similarity search.

    Args:
        query: (N, d) float32, gallery: (M, d) float32; both are L2-normalised here.
        k: neighbours per query (clipped to M).
    Returns:
        (similarities (N, k) float32, indices (N, k) int64), best first.
    """
    k = min(k, len(gallery))
    q, g = normalize(query), normalize(gallery)
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ValueError("knn backend 'faiss' requested but faiss is not installed; use backend: torch")
    if faiss is not None:
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(np.ascontiguousarray(g))
        sims, idx = index.search(np.ascontiguousarray(q), k)
        return sims.astype(np.float32), idx.astype(np.int64)
    dev = resolve_device(device)
    gt = torch.from_numpy(g).to(dev)
    sims_out = np.empty((len(q), k), np.float32)
    idx_out = np.empty((len(q), k), np.int64)
    with torch.no_grad():
        for s in range(0, len(q), chunk):
            qt = torch.from_numpy(q[s:s + chunk]).to(dev)
            sim, ix = torch.topk(qt @ gt.T, k, dim=1)  # (B, M) -> (B, k)
            sims_out[s:s + chunk] = sim.cpu().numpy()
            idx_out[s:s + chunk] = ix.cpu().numpy()
    return sims_out, idx_out


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

    def __init__(self, options: KNNOptions):
        self.options = options
        self.gallery: Any = None
        self.gallery_ref: dict[str, Any] | None = None
        self.run_dir: Path | None = None

    @classmethod
    def from_config(cls, config: Any) -> KNNMethod:
        if not isinstance(config, dict):
            from locdiff.model.config import config_to_dict

            config = config_to_dict(config)
        return cls(parse_options(KNNOptions, config, "knn"))

    def finalize(self, result: Any, source: Any, val: Any, run: Any, *, progress: bool = True
                 ) -> dict[str, float]:
        from locdiff.gallery_ref import gallery_for

        if not source.labelled:
            raise ValueError(f"{source.location}: knn needs a labelled training table (columns lat, lon)")
        self.gallery, self.gallery_ref = gallery_for(source, run, progress=progress)
        self.run_dir = run.path
        self.save(run.path)
        out: dict[str, float] = {"gallery_size": float(len(self.gallery))}
        if val is not None and val.count:
            from locdiff.metrics import geo_metrics

            table = val.read_all(limit=4096)
            p = self.predict(table)
            out.update({f"val/{k}": v for k, v in geo_metrics(p.lat, p.lon, table.lat, table.lon).items()})
        return out

    def save(self, run_dir: Path) -> None:
        if self.gallery_ref is None:
            raise ValueError("knn: nothing to save, the method is not fitted")
        from locdiff.runs import RunFolder

        RunFolder(run_dir).save_model({}, {"method": self.name, "gallery": self.gallery_ref,
                                           "embed_dim": int(self.gallery.embedding.shape[1])})

    @classmethod
    def load(cls, run_dir: Path, config: Any) -> KNNMethod:
        from locdiff.runs import RunFolder

        _, meta = RunFolder(run_dir).load_model()
        if meta.get("method") != cls.name:
            raise ValueError(f"{run_dir}: a {meta.get('method')!r} model, not 'knn'")
        m = cls.from_config(config)
        m.gallery_ref, m.run_dir = meta["gallery"], Path(run_dir)
        return m

    def _gallery(self) -> Any:
        if self.gallery is None:
            from locdiff.gallery_ref import open_gallery

            self.gallery = open_gallery(self.gallery_ref, self.run_dir)
        return self.gallery

    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        """Options: k, aggregation, radius_km override the config for this call."""
        if self.gallery_ref is None:
            raise ValueError("knn: predict before fit/load")
        g = self._gallery()
        if table.dim != g.embedding.shape[1]:
            raise ValueError(f"{table.source}: embeddings have dimension {table.dim}, the gallery has "
                             f"{g.embedding.shape[1]}")
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
