"""`geocell`: classification over adaptive cells built from the training locations (PlaNet / PIGEON style).

Cells: the training points' unit vectors are split recursively at the median of their widest principal
direction (a k-d tree on the sphere) until every cell holds at most `max_cell_size` points, so cells are
small where photos are dense and large where they are sparse. Each cell is represented by its medoid (the
training point with the least summed great-circle distance to the others, on a subsample).

Training: an MLP classifier with haversine label smoothing as in PIGEON: the target for an image at x is
softmax_c(-(d(medoid_c, x) - min_c' d(medoid_c', x)) / tau_km); tau_km = 0 gives one-hot labels.
Prediction: the medoid of the most probable cell, or with `refine: retrieval` the most similar training
image inside that cell. Confidence: the top cell's probability.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from locdiff.baselines.options import MLPOptions, parse_options, resolve_device
from locdiff.baselines.trainer import ResidualMLP, batched, train_epochs
from locdiff.geo import EARTH_RADIUS_KM, haversine_km, latlon_to_unit
from locdiff.methods import GeoMethod, Prediction
from locdiff.schema import setting
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)

STATE = "geocell.pt"


@dataclass
class GeocellOptions(MLPOptions):
    max_cell_size: int = setting(200, ge=1)  # a cell with more training points is split in two
    label_smoothing_km: float = setting(75.0, ge=0)  # haversine smoothing temperature (PIGEON); 0 = one-hot
    refine: Literal["none", "retrieval"] = "none"  # retrieval: best-matching training image in the cell
    medoid_sample: int = setting(256, ge=1)  # points per cell used to find its medoid


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


class GeocellMethod(GeoMethod):
    name = "geocell"

    def __init__(self, options: GeocellOptions):
        self.options = options
        self.device = resolve_device(options.device)
        self.net: ResidualMLP | None = None
        self.cell_lat: np.ndarray | None = None  # (C,) medoid coordinates
        self.cell_lon: np.ndarray | None = None
        self.gallery: dict[str, np.ndarray] | None = None  # refine=retrieval: train rows and cells

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GeocellMethod:
        return cls(parse_options(GeocellOptions, config, "geocell"))

    def _build_net(self, dim: int, n_cells: int) -> None:
        o = self.options
        torch.manual_seed(o.seed)
        self.net = ResidualMLP(dim, n_cells, o.hidden, o.depth, o.dropout).to(self.device)

    def fit(self, train: EmbeddingTable, val: EmbeddingTable | None, run_dir: Path, *,
            progress: bool = True) -> dict[str, float]:
        if not train.labelled:
            raise ValueError(f"{train.source}: geocell needs a labelled training table (columns lat, lon)")
        o = self.options
        labels = build_cells(train.lat, train.lon, o.max_cell_size)
        n_cells = int(labels.max()) + 1
        medoids = cell_medoids(train.lat, train.lon, labels, n_cells, sample=o.medoid_sample, seed=o.seed)
        self.cell_lat, self.cell_lon = train.lat[medoids], train.lon[medoids]
        log.info("geocell: %d cells from %d training points", n_cells, len(train))
        if o.refine == "retrieval":
            self.gallery = {"embedding": train.embedding.astype(np.float32), "lat": train.lat,
                            "lon": train.lon, "label": labels}
        self._build_net(train.dim, n_cells)
        dev = self.device
        x = torch.from_numpy(train.embedding).float().to(dev)
        y = torch.from_numpy(labels).to(dev)
        u = torch.from_numpy(latlon_to_unit(train.lat, train.lon)).float().to(dev)  # (N, 3)
        cu = torch.from_numpy(latlon_to_unit(self.cell_lat, self.cell_lon)).float().to(dev)  # (C, 3)
        tau = o.label_smoothing_km

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            idx = idx.to(dev)
            logits = self.net(x[idx])  # (B, C)
            if tau <= 0:
                return torch.nn.functional.cross_entropy(logits, y[idx])
            d = torch.arccos((u[idx] @ cu.T).clamp(-1, 1)) * EARTH_RADIUS_KM  # (B, C) km
            target = torch.softmax(-(d - d.min(1, keepdim=True).values) / tau, dim=1)
            return -(target * torch.log_softmax(logits, 1)).sum(1).mean()

        metrics = train_epochs(self.net, loss_fn, len(train), o, Path(run_dir), name=self.name,
                               progress=progress)
        self.save(Path(run_dir))
        if val is not None and val.labelled:
            from locdiff.metrics import geo_metrics

            p = self.predict(val)
            metrics.update({f"val/{k}": v for k, v in geo_metrics(p.lat, p.lon, val.lat, val.lon).items()})
        metrics["cells"] = n_cells
        return metrics

    def save(self, run_dir: Path) -> None:
        if self.net is None:
            raise ValueError("geocell: nothing to save, the method is not fitted")
        run_dir = Path(run_dir)
        state = {"options": asdict(self.options), "model": self.net.state_dict(), "cell_lat": self.cell_lat,
                 "cell_lon": self.cell_lon, "gallery": self.gallery, "dim": self.net.inp.in_features}
        tmp = run_dir / (STATE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(run_dir / STATE)

    @classmethod
    def load(cls, run_dir: Path, config: dict[str, Any]) -> GeocellMethod:
        path = Path(run_dir) / STATE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no geocell model in this run directory (was it trained?)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        m = cls.from_config(config)
        m.cell_lat, m.cell_lon, m.gallery = state["cell_lat"], state["cell_lon"], state["gallery"]
        m._build_net(state["dim"], len(m.cell_lat))
        m.net.load_state_dict(state["model"])
        m.net.eval()
        return m

    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        if self.net is None:
            raise ValueError("geocell: predict before fit/load")
        if table.dim != self.net.inp.in_features:
            raise ValueError(f"{table.source}: embeddings have dimension {table.dim}, the model expects "
                             f"{self.net.inp.in_features}")
        self.net.eval()
        x = torch.from_numpy(table.embedding).float().to(self.device)
        out = batched(lambda b: torch.softmax(self.net(b), 1).max(1), x)
        conf = torch.cat([o.values for o in out]).cpu().numpy().astype(np.float64)
        cell = torch.cat([o.indices for o in out]).cpu().numpy()
        lat, lon = self.cell_lat[cell].copy(), self.cell_lon[cell].copy()
        refine = options.get("refine", self.options.refine)
        if refine == "retrieval":
            if self.gallery is None:
                raise ValueError("geocell: refine=retrieval needs a model trained with refine: retrieval")
            from locdiff.baselines.knn import normalize

            g = self.gallery
            q = normalize(table.embedding)
            ge = normalize(g["embedding"])
            order = np.argsort(g["label"], kind="stable")
            bounds = np.searchsorted(g["label"][order], np.arange(len(self.cell_lat) + 1))
            for c in np.unique(cell):  # one matrix product per predicted cell
                rows = np.flatnonzero(cell == c)
                members = order[bounds[c]:bounds[c + 1]]
                best = members[np.argmax(q[rows] @ ge[members].T, axis=1)]
                lat[rows], lon[rows] = g["lat"][best], g["lon"][best]
        return Prediction(lat.astype(np.float64), lon.astype(np.float64), conf)
