"""`regress`: an MLP from the image embedding to the location's unit vector.

Loss `cosine` (1 - cos of the great-circle angle between the normalised output and the truth) or `mse`
(squared chord length in R^3, whose minimiser is the conditional mean; its norm then measures how
concentrated the answer is). The prediction is the normalised output; the confidence is the output's norm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from locdiff.baselines.options import MLPOptions, parse_options, resolve_device
from locdiff.baselines.trainer import ResidualMLP, batched, train_epochs
from locdiff.geo import latlon_to_unit, unit_to_latlon
from locdiff.methods import GeoMethod, Prediction
from locdiff.tables import EmbeddingTable

STATE = "regress.pt"


@dataclass
class RegressOptions(MLPOptions):
    loss: Literal["cosine", "mse"] = "cosine"


class RegressMethod(GeoMethod):
    name = "regress"

    def __init__(self, options: RegressOptions):
        self.options = options
        self.device = resolve_device(options.device)
        self.net: ResidualMLP | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RegressMethod:
        return cls(parse_options(RegressOptions, config, "regress"))

    def _build_net(self, dim: int) -> None:
        o = self.options
        torch.manual_seed(o.seed)
        self.net = ResidualMLP(dim, 3, o.hidden, o.depth, o.dropout).to(self.device)

    def fit(self, train: EmbeddingTable, val: EmbeddingTable | None, run_dir: Path, *,
            progress: bool = True) -> dict[str, float]:
        if not train.labelled:
            raise ValueError(f"{train.source}: regress needs a labelled training table (columns lat, lon)")
        self._build_net(train.dim)
        dev = self.device
        x = torch.from_numpy(train.embedding).float().to(dev)
        u = torch.from_numpy(latlon_to_unit(train.lat, train.lon)).float().to(dev)
        use_mse = self.options.loss == "mse"

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            idx = idx.to(dev)
            out = self.net(x[idx])  # (B, 3)
            if use_mse:
                return ((out - u[idx]) ** 2).sum(1).mean()
            return (1 - torch.nn.functional.cosine_similarity(out, u[idx], dim=1)).mean()

        metrics = train_epochs(self.net, loss_fn, len(train), self.options, Path(run_dir), name=self.name,
                               progress=progress)
        self.save(Path(run_dir))
        if val is not None and val.labelled:
            from locdiff.metrics import geo_metrics

            p = self.predict(val)
            metrics.update({f"val/{k}": v for k, v in geo_metrics(p.lat, p.lon, val.lat, val.lon).items()})
        return metrics

    def save(self, run_dir: Path) -> None:
        if self.net is None:
            raise ValueError("regress: nothing to save, the method is not fitted")
        tmp = Path(run_dir) / (STATE + ".tmp")
        torch.save({"options": asdict(self.options), "model": self.net.state_dict(),
                    "dim": self.net.inp.in_features}, tmp)
        tmp.replace(Path(run_dir) / STATE)

    @classmethod
    def load(cls, run_dir: Path, config: dict[str, Any]) -> RegressMethod:
        path = Path(run_dir) / STATE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no regress model in this run directory (was it trained?)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        m = cls.from_config(config)
        m._build_net(state["dim"])
        m.net.load_state_dict(state["model"])
        m.net.eval()
        return m

    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        if self.net is None:
            raise ValueError("regress: predict before fit/load")
        if table.dim != self.net.inp.in_features:
            raise ValueError(f"{table.source}: embeddings have dimension {table.dim}, the model expects "
                             f"{self.net.inp.in_features}")
        self.net.eval()
        x = torch.from_numpy(table.embedding).float().to(self.device)
        out = torch.cat(batched(self.net, x)).double().cpu().numpy()  # (N, 3)
        lat, lon = unit_to_latlon(out)
        return Prediction(lat, lon, np.linalg.norm(out, axis=1))
