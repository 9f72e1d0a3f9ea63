"""The two stable table formats (see README "Formats"): embeddings and predictions.

- Embeddings table: Parquet with columns `id` (string), `lat`, `lon` (float64, degrees) and `embedding`
  (a fixed-size or variable list of float32, the same dimension in every row).
- Predictions table: Parquet or CSV by extension, columns `id`, `lat`, `lon` (truth; absent for
  unlabelled data), `pred_lat`, `pred_lon`, optional `method`, `confidence`.

`EmbeddingTable` is the in-memory form every method trains and predicts on; the data layer's feature
shards are read into the same type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_EMBED_DIM = 65_536  # the widest embedding a table may hold (CLIP's are 512-1280); wider is refused unread
MAX_GENERATED_ROWS = 10_000_000  # rows per split of a generated benchmark (`locdiff synth`, `locdiff realbench`)



@dataclass
class EmbeddingTable:
    ids: np.ndarray  # (N,) object array of str
    lat: np.ndarray | None  # (N,) float64 degrees; None for unlabelled data
    lon: np.ndarray | None  # (N,) float64 degrees
    embedding: np.ndarray  # (N, d) float32
    source: str = ""  # file or folder it came from, for error messages

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    @property
    def labelled(self) -> bool:
        return self.lat is not None and self.lon is not None
