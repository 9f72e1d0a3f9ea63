"""What a run is made of, defined once: the data sets (`DataSet`, shared by the Prefect flows' parameters
and the library) and the one description of a training (`RunSpec`).

A `RunSpec` is built once at the boundary (`locdiff train`, the pipeline's stages and flows): the model
config resolved and validated, the data opened and identified, the completion key computed and the run
folder chosen. Everything below it (`locdiff.training.run`, the MLflow run, Ray Train) takes the spec and
never resolves the config or computes the key again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from locdiff.data.config import DatasetConfig, encoder_folder_name, load_dataset_config
from locdiff.data.stream import DataSource
from locdiff.methods import prepare_data
from locdiff.model.config import Config, config_to_dict, load_config
from locdiff.resources import model_config_path
from locdiff.runs import absolute_location, completion_key, local_run_dir

DATASET_KEYS = ("name", "source", "path", "encoder", "limit")

# A URL whose authority carries user:password@ (or user@): storage.carries_credentials as a JSON Schema pattern.
CREDENTIALS_URL = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@"
# A path or URL given as a flow parameter. Prefect keeps a flow run's parameters in its database and shows
# them in its UI, so the parameter schema refuses a URL carrying credentials: the Prefect API checks a
# deployment run against it (enforce_parameter_schema, on by default) and refuses the run before creating
# it. (A flow function called directly is recorded first; its stages then refuse such URLs.)
Location = Annotated[str, WithJsonSchema({
    "type": "string", "not": {"pattern": CREDENTIALS_URL},
    "description": "a path or URL, without user:password@ (credentials come from the environment)"})]


class DataSet(BaseModel):
    """A data set: its folder/metric name, its config (configs/datasets/SOURCE.yaml) and source path.

    name: the folder under ROOT (ROOT/NAME/...) and the metric prefix (NAME/acc_1km ...).
    source: the data set config (configs/datasets/SOURCE.yaml): im2gps3k, yfcc4k, mp16, folder,
        embeddings, ...; defaults to name.
    path: --source PATH_OR_URL for sources that need one (folder, embeddings, gws15k).
    encoder: the image encoder for the embed stage (ignored for precomputed embeddings).
    limit: only the first N metadata rows.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # ROOT/NAME and the metric prefix NAME/acc_1km ...
    source: str | None = None  # data set config; default: name
    path: Location | None = None  # --source PATH_OR_URL (folder, embeddings, gws15k)
    encoder: str = "clip-vit-l14"  # image encoder of the embed stage
    limit: int | None = Field(default=None, ge=0)  # first N metadata rows only

    @classmethod
    def parse(cls, obj: Any) -> DataSet:
        """A DataSet from a DataSet, a name, or a mapping with 'name' (ValueError naming unknown keys)."""
        if isinstance(obj, DataSet):
            return obj
        if isinstance(obj, BaseModel):
            obj = obj.model_dump()
        if isinstance(obj, str):
            return cls(name=obj)
        if not isinstance(obj, Mapping) or "name" not in obj:
            raise ValueError(f"a data set must be a name or a mapping with 'name'; got {obj!r}")
        unknown = set(obj) - set(DATASET_KEYS)
        if unknown:
            raise ValueError(f"data set {obj.get('name')!r}: unknown key(s) {sorted(unknown)}; valid: "
                             + ", ".join(DATASET_KEYS))
        return cls(**obj)

    @property
    def config_name(self) -> str:
        return self.source or self.name

    def dataset_config(self) -> DatasetConfig:
        return load_dataset_config(self.config_name)

    def features_encoder(self) -> str:
        """The features folder name: the source's own encoder for precomputed embeddings."""
        cfg = self.dataset_config()
        if cfg.source == "embeddings":
            return cfg.encoder
        return encoder_folder_name(self.encoder)


def resolve_config(name: str, *, degree: int | None = None, overrides: list[str] | None = None) -> Config:
    """The typed model config of configs/model/NAME.yaml (or a YAML path) with `shdd.degree` and
    `--set`-style overrides; ValueError naming the fix for an unknown name or a bad override."""
    sets = list(overrides or [])
    if degree is not None:
        sets.append(f"shdd.degree={int(degree)}")
    return load_config(model_config_path(name), overrides=sets)


@dataclass(frozen=True)
class RunSpec:
    """One training, described once (see the module docstring).

    config: the resolved, validated model config; config_name: where it came from (a name or a path).
    train, val, val_unseen: the data as absolute paths or URLs (or in-memory tables); without `val` a
        share of the training rows is held out (train.val_share); `val_unseen` (validation rows from
        regions absent from `train`) is used by LocDiff-H's fit.
    encoder: the encoder that made a table's embeddings (a features folder's manifest says it itself).
    data: the data identities; key: the completion key (config and data); run_dir: the run folder.
    names: the pipeline's data set names by role ("train", "val", "val_unseen"), for tracking.
    source, val_source: the opened training and validation streams (not part of the identity).
    """

    config: Config
    config_name: str
    train: Any
    val: Any
    val_unseen: Any
    encoder: str | None
    data: Mapping[str, Any]
    key: str
    run_dir: Path | None
    names: Mapping[str, str | None] = field(default_factory=dict)
    source: DataSource | None = field(default=None, compare=False, repr=False)
    val_source: DataSource | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, config: Config, train: Any, run_dir: str | Path | None = None, *, val: Any = None,
              val_unseen: Any = None, encoder: str | None = None, config_name: str | None = None,
              names: Mapping[str, str | None] | None = None) -> RunSpec:
        """Open the data (holding out a validation share when there is no `val`), identify it and compute
        the completion key."""
        run_dir = local_run_dir(run_dir) if run_dir is not None else None  # before the data is opened
        train, val = absolute_location(train), absolute_location(val)  # recorded: found again from anywhere
        source, vsrc = prepare_data(train, val, val_share=config.train.val_share, seed=config.train.seed)
        data: dict[str, Any] = {"train": source.identity(), "val": vsrc.identity() if vsrc is not None else None}
        if val_unseen is not None:  # only then: the completion keys of runs without it stay as they were
            val_unseen = absolute_location(val_unseen)
            data["val_unseen"] = prepare_data(source, val_unseen)[1].identity()
        return cls(config=config, config_name=config_name or config.method, train=train, val=val,
                   val_unseen=val_unseen, encoder=encoder, data=data,
                   key=completion_key(config_to_dict(config), data),
                   run_dir=run_dir, names=dict(names or {}),
                   source=source, val_source=vsrc)

    def at(self, run_dir: str | Path) -> RunSpec:
        """The same run in the run folder `run_dir`."""
        return dataclasses.replace(self, run_dir=local_run_dir(run_dir))

    @property
    def resolved(self) -> dict[str, Any]:
        """The config as the run folder and MLflow record it (a plain dict)."""
        return config_to_dict(self.config)
