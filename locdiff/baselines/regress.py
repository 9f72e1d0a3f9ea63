"""`regress`: an MLP from the image embedding to the location's unit vector.

Loss `cosine` (1 - cos of the great-circle angle between the normalised output and the truth) or `mse`
(squared chord length in R^3, whose minimiser is the conditional mean; its norm then measures how
concentrated the answer is). The prediction is the normalised output; the confidence is the output's norm.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from locdiff.baselines.mlp import ResidualMLP, TrainedBaseline, batched
from locdiff.baselines.options import RegressOptions
from locdiff.geo import latlon_to_unit, unit_to_latlon
from locdiff.methods import Prediction
from locdiff.tables import EmbeddingTable


class RegressMethod(TrainedBaseline):
    name = "regress"
    options_cls = RegressOptions

    def build_net(self, embed_dim: int) -> torch.nn.Module:
        o = self.options
        return ResidualMLP(embed_dim, 3, o.hidden, o.depth, o.dropout)

    def loss(self, net, batch: dict[str, Any], generator: torch.Generator):
        out = net(batch["embedding"]).float()  # (B, 3)
        u = latlon_to_unit(batch["lat"], batch["lon"]).float()
        if self.options.loss == "mse":
            return ((out - u) ** 2).sum(1).mean(), {}
        return (1 - torch.nn.functional.cosine_similarity(out, u, dim=1)).mean(), {}

    def predict(self, table: EmbeddingTable, **options: Any) -> Prediction:
        self.check_dim(table)
        x = torch.from_numpy(table.embedding).float().to(self.device)
        out = torch.cat(batched(self.net, x)).double().cpu().numpy()  # (N, 3)
        lat, lon = unit_to_latlon(out)
        return Prediction(lat, lon, np.linalg.norm(out, axis=1))
