"""The data layer: sources -> validated WebDataset shards -> embeddings and SHDD targets, on a local
folder or S3. Entry points: `ingest`, `embed`, `load_features`, `export_features`, `ShardDataset`."""

from locdiff.data.features import export_features, load_features
from locdiff.data.shards import ShardDataset, stage_dir

__all__ = ["ShardDataset", "export_features", "load_features", "stage_dir", "ingest", "embed"]


def __getattr__(name: str):  # heavy stages imported on first use
    if name == "ingest":
        from locdiff.data.ingest import ingest

        return ingest
    if name == "embed":
        from locdiff.data.featurize import embed

        return embed
    raise AttributeError(name)
