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
from typing import Any

import numpy as np

from locdiff.errors import UserError

MAX_EMBED_DIM = 65_536  # the widest embedding a table may hold (CLIP's are 512-1280); wider is refused unread
MAX_GENERATED_ROWS = 10_000_000  # rows per split of a generated benchmark (`locdiff synth`, `locdiff realbench`)


def embedding_leaves(meta: Any) -> list[int]:
    """The indices of the leaf columns of the `embedding` column in Parquet metadata `meta` (pq.FileMetaData)."""
    return [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == "embedding"]


def embedding_numbers(meta: Any, path: str) -> int:
    """The numbers the `embedding` column of the Parquet file at `path` holds, from its footer (`meta`,
    pq.FileMetaData) alone: every reader of a user's embeddings calls this before it decodes any (a few KB of
    repeated zeros can decode to billions). A fixed-size list wider than MAX_EMBED_DIM, or a row group holding
    more than its rows x MAX_EMBED_DIM numbers, is a UserError naming the file (and the row group)."""
    schema = meta.schema.to_arrow_schema()
    if schema.get_field_index("embedding") >= 0:  # -1: absent or twice (the reader names that)
        size = getattr(schema.field("embedding").type, "list_size", -1)
        if size > MAX_EMBED_DIM:
            raise UserError(f"{path}: embeddings of dimension {size:,}, above the limit of {MAX_EMBED_DIM:,}; "
                            "embed the images with a supported encoder")
    leaves = embedding_leaves(meta)
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        values = sum(group.column(i).num_values for i in leaves)
        if values > group.num_rows * MAX_EMBED_DIM:
            raise UserError(f"{path}: row group {g} holds {values:,} embedding numbers in {group.num_rows:,} rows, "
                            f"above the limit of {MAX_EMBED_DIM:,} a row; embed the images with a supported encoder")
        total += values
    return total



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
