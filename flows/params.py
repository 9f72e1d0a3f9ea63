"""Typed flow parameters (shown as a form in the Prefect UI)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DataSet(BaseModel):
    """A data set: its folder/metric name, its config (configs/datasets/SOURCE.yaml) and source path."""

    model_config = ConfigDict(extra="forbid")

    name: str  # ROOT/NAME and the metric prefix NAME/acc_1km ...
    source: str | None = None  # data set config; default: name
    path: str | None = None  # --source PATH_OR_URL (folder, embeddings, gws15k)
    encoder: str = "clip-vit-l14"  # image encoder of the embed stage
    limit: int | None = None  # first N metadata rows only
