"""`geocell`: classification over adaptive cells built from the training locations (PlaNet / PIGEON style).

Cells: the training points' unit vectors (all of them, or a seeded sample of `max_cell_points`) are split
recursively at the median of their widest principal
direction (a k-d tree on the sphere) until every cell holds at most `max_cell_size` points, so cells are
small where photos are dense and large where they are sparse. Each cell is represented by its medoid (the
training point with the least summed great-circle distance to the others, on a subsample).

Training: an MLP classifier with haversine label smoothing as in PIGEON: the target for an image at x is
softmax_c(-(d(medoid_c, x) - min_c' d(medoid_c', x)) / tau_km); tau_km = 0 gives one-hot labels of the
nearest medoid's cell.
Prediction: the medoid of the most probable cell, or with `refine: retrieval` the most similar training
image (among the `refine_top_k` retrieved from the training data's gallery) whose nearest medoid is that
cell's. Confidence: the top cell's probability.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from locdiff.baselines.mlp import ResidualMLP, TrainedBaseline, batched
from locdiff.baselines.options import GeocellOptions
from locdiff.data.datasource import DataSource
from locdiff.engine import Result
from locdiff.gallery import Gallery, gallery_for_run
from locdiff.geo import EARTH_RADIUS_KM, haversine_km, latlon_to_unit
from locdiff.methods import Prediction
from locdiff.runs import RunFolder
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)


def build_cells(lat: np.ndarray, lon: np.ndarray, max_cell_size: int) -> np.ndarray:
    """Adaptive cells: (N,) int64 cell label per point, cells numbered in a deterministic order.

    A cell with more than max_cell_size points is split at the median of its points' projection on
    their principal direction (in R^3), so the two halves differ in size by at most one.
    """
    if max_cell_size < 1:
        raise ValueError(f"max_cell_size must be >= 1, got {max_cell_size}")
    u = latlon_to_unit(np.asarray(lat, np.float64), np.asarray(lon, np.float64))
    labels = np.empty(len(u), np.int64)
    stack = [np.arange(len(u))]
    cell = 0
    while stack:
        idx = stack.pop()
        if len(idx) <= max_cell_size:
            labels[idx] = cell
            cell += 1
            continue
        x = u[idx] - u[idx].mean(0)
        _, _, vt = np.linalg.svd(x.T @ x)  # 3x3: principal direction vt[0]
        order = np.argsort(x @ vt[0], kind="stable")
        half = len(idx) // 2
        stack.append(idx[order[half:]])
        stack.append(idx[order[:half]])
    return labels


def cell_medoids(lat: np.ndarray, lon: np.ndarray, labels: np.ndarray, n_cells: int, *, sample: int = 256,
                 seed: int = 0) -> np.ndarray:
    """(n_cells,) index of each cell's medoid training point (on a seeded subsample of the cell)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_cells + 1))
    medoids = np.empty(n_cells, np.int64)
    for c in range(n_cells):
        members = order[bounds[c]:bounds[c + 1]]
        if len(members) > sample:
            members = rng.choice(members, sample, replace=False)
        d = haversine_km(lat[members][:, None], lon[members][:, None], lat[members][None], lon[members][None])
        medoids[c] = members[int(np.argmin(d.sum(1)))]
    return medoids


class GeocellMethod(TrainedBaseline):
    name = "geocell"
    options_cls = GeocellOptions

    def __init__(self, options: GeocellOptions):
        super().__init__(options)
        self.cell_lat: np.ndarray | None = None  # (C,) medoid coordinates
        self.cell_lon: np.ndarray | None = None
        self._cells_unit: torch.Tensor | None = None
        self.gallery: Gallery | None = None
        self.gallery_ref: dict[str, Any] | None = None
        self.run_dir = None

    def prepare(self, source: DataSource) -> None:
        o = self.options
        lat, lon = source.locations(max_rows=o.max_cell_points, seed=o.seed)
        labels = build_cells(lat, lon, o.max_cell_size)
        n_cells = int(labels.max()) + 1
        medoids = cell_medoids(lat, lon, labels, n_cells, sample=o.medoid_sample, seed=o.seed)
        self.cell_lat, self.cell_lon = lat[medoids], lon[medoids]
        self._cells_unit = None
        log.info("geocell: %d cells from %d training locations", n_cells, len(lat))

    def cells_unit(self, device: torch.device) -> torch.Tensor:
        if self._cells_unit is None or self._cells_unit.device != device:
            self._cells_unit = torch.from_numpy(latlon_to_unit(self.cell_lat, self.cell_lon)).float().to(device)
        return self._cells_unit

    def build_net(self, embed_dim: int) -> torch.nn.Module:
        o = self.options
        return ResidualMLP(embed_dim, len(self.cell_lat), o.hidden, o.depth, o.dropout)

    def loss(self, net, batch: dict[str, Any], generator: torch.Generator):
        logits = net(batch["embedding"]).float()  # (B, C)
        u = latlon_to_unit(batch["lat"], batch["lon"]).float()  # (B, 3)
        d = torch.arccos((u @ self.cells_unit(u.device).T).clamp(-1, 1)) * EARTH_RADIUS_KM  # (B, C) km
        tau = self.options.label_smoothing_km
        if tau <= 0:
            return torch.nn.functional.cross_entropy(logits, d.argmin(1)), {}
        target = torch.softmax(-(d - d.min(1, keepdim=True).values) / tau, dim=1)
        return -(target * torch.log_softmax(logits, 1)).sum(1).mean(), {}

    def finalize(self, result: Result | None, source: DataSource, val: DataSource | None, run: RunFolder, *,
                 progress: bool = True) -> dict[str, float]:
        if self.options.refine == "retrieval":
            self.gallery, self.gallery_ref = gallery_for_run(source, run.path, progress=progress)
        metrics = super().finalize(result, source, val, run, progress=progress)
        metrics["cells"] = len(self.cell_lat)
        return metrics

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"cell_lat": torch.from_numpy(np.asarray(self.cell_lat, np.float64)),
                "cell_lon": torch.from_numpy(np.asarray(self.cell_lon, np.float64))}

    def extra_meta(self) -> dict[str, Any]:
        return {"gallery": self.gallery_ref}

    def load_extra(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.cell_lat, self.cell_lon = tensors["cell_lat"].numpy(), tensors["cell_lon"].numpy()
        self.gallery_ref = meta.get("gallery")

    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        self.check_dim(table)
        self.net.eval()
        x = torch.from_numpy(table.embedding).float().to(self.device)
        out = batched(lambda b: torch.softmax(self.net(b), 1).max(1), x)
        conf = torch.cat([o.values for o in out]).cpu().numpy().astype(np.float64)
        cell = torch.cat([o.indices for o in out]).cpu().numpy()
        lat, lon = self.cell_lat[cell].copy(), self.cell_lon[cell].copy()
        refine = options.get("refine", self.options.refine)
        if refine == "retrieval":
            if self.gallery is None:
                if not self.gallery_ref:
                    raise ValueError("geocell: refine=retrieval needs a model trained with refine: retrieval")
                self.gallery = Gallery.load(self.gallery_ref)
            sims, idx = self.gallery.search(table.embedding, self.options.refine_top_k)  # (N, k)
            glat, glon = self.gallery.lat[idx], self.gallery.lon[idx]
            gu = torch.from_numpy(latlon_to_unit(glat, glon)).float()  # (N, k, 3)
            near = (gu @ self.cells_unit(torch.device("cpu")).T).argmax(-1).numpy()  # nearest medoid (N, k)
            inside = near == cell[:, None]
            first = inside.argmax(1)
            ok = inside.any(1)
            rows = np.arange(len(cell))
            lat = np.where(ok, glat[rows, first], lat)
            lon = np.where(ok, glon[rows, first], lon)
        return Prediction(lat.astype(np.float64), lon.astype(np.float64), conf)
