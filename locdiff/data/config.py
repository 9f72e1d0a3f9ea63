"""Typed configs for data sets (`configs/datasets/NAME.yaml`) and encoders (`configs/encoders/NAME.yaml`).

Unknown keys are rejected with the file and key named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def configs_dir() -> Path:
    """The `configs/` folder shipped with the package (env LOCDIFF_CONFIGS overrides): `locdiff.resources`."""
    from locdiff.resources import configs_dir as packaged

    return packaged()


@dataclass
class RemoteFile:
    url: str | None = None  # where the real file is published (http(s), s3, hf://)
    filename: str | None = None  # its name inside a --source folder or mirror
    sha256: str | None = None  # published checksum, when there is one; a mismatch is an error
    md5: str | None = None


@dataclass
class DatasetConfig:
    name: str
    source: str  # module under locdiff.data.sources that reads it
    split: str = "test"
    license: str = ""
    citation: str = ""
    homepage: str = ""
    notes: str = ""
    metadata: RemoteFile = field(default_factory=RemoteFile)  # the CSV of id, lat, lon (and more)
    images: RemoteFile = field(default_factory=RemoteFile)  # an archive/folder of images, if any
    id_column: str = "id"
    lat_column: str = "lat"
    lon_column: str = "lon"
    url_column: str | None = None  # per-record image URL (URL-list sources such as mp16, yfcc4k)
    url_list_id_column: str | None = None  # id column of a separate URL-list CSV (images.filename *.csv)
    path_column: str | None = None  # per-record file name inside the image folder/archive
    path_template: str = "{id}"  # file name from the id when there is no path column
    sha256_column: str | None = None  # per-record image checksum, when the source publishes one
    keep_columns: list[str] | None = None  # other CSV columns kept in KEY.json (None: all of them)
    image_prefix: str = ""  # folder inside the image location/archive that holds the files
    shard_size: int = 1000  # samples per shard (the last one may be short, skipped records shrink them)
    max_side: int = 512  # longest image side; larger images are resized, JPEGs within it kept as-is
    jpeg_quality: int = 90
    verify: Literal["header", "decode"] = "header"  # "decode" fully decodes every image (slower)
    workers: int = 16  # parallel fetches for remote per-image sources
    retries: int = 3  # extra attempts for an unreachable URL (exponential backoff)
    backoff: float = 0.5  # seconds before the first retry
    timeout: float = 30.0  # seconds per request
    downloader: Literal["auto", "builtin", "img2dataset"] = "builtin"
    img2dataset_threshold: int = 100_000  # "auto": img2dataset above this many URLs when installed
    hf_repo: str | None = None  # Hugging Face data set id (osv5m)
    hf_revision: str = "main"
    hf_images: list[str] = field(default_factory=list)  # image zips in the HF repo, in order
    encoder: str = "precomputed"  # embeddings source: the encoder folder name to write
    requires_source: bool = False  # not public: --source is mandatory (gws15k)


@dataclass
class EncoderConfig:
    name: str  # folder name under ROOT/NAME/features/
    type: Literal["clip"] = "clip"
    model: str = "openai/clip-vit-large-patch14"  # hub id or local folder (from_pretrained)
    revision: str | None = None  # pinned hub revision (commit); None for local folders
    batch_size: int = 64
    storage_dtype: Literal["float16", "float32"] = "float16"  # dtype of KEY.emb.npy
    precision: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # autocast; auto: fp16 on GPU
    normalize: bool = True  # L2-normalise embeddings (CLIP convention)
    device: str | None = None  # None: cuda when available, else cpu
    ray_batch_size: int = 256


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("metadata", "images") and cls is DatasetConfig:
            value = _build(RemoteFile, value or {}, f"{where}: {key}")
        kwargs[key] = value
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if f.type in ("int", "float") and not isinstance(v, int | float):
            raise ValueError(f"{where}: {f.name} must be a number, got {v!r}")
    return obj


def load_dataset_config(name_or_path: str, **overrides: Any) -> DatasetConfig:
    """Read configs/datasets/NAME.yaml (or a YAML path) into a DatasetConfig; overrides win."""
    from locdiff.resources import find_config, is_yaml_path, known_configs

    path = find_config("datasets", name_or_path)
    if path is None:
        where = name_or_path if is_yaml_path(name_or_path) else configs_dir() / "datasets" / f"{name_or_path}.yaml"
        raise ValueError(f"unknown data set {name_or_path!r}: no {where}; known: {known_configs('datasets')}")
    data = yaml.safe_load(path.read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = _build(DatasetConfig, data, str(path))
    if cfg.shard_size < 1 or cfg.max_side < 16:
        raise ValueError(f"{path}: shard_size must be >= 1 and max_side >= 16")
    return cfg


def load_encoder_config(spec: str, **overrides: Any) -> EncoderConfig:
    """An encoder from configs/encoders/SPEC.yaml, a YAML path, a local model folder or a hub id.

    A local folder or hub id gets a CLIP config whose name is the folder's base name (or the hub id
    with '/' replaced by '--'), which becomes the features folder name.
    """
    from locdiff.resources import find_config, known_configs

    path = Path(spec)
    cfg_path = find_config("encoders", spec)
    if cfg_path is not None:
        data = yaml.safe_load(cfg_path.read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return _build(EncoderConfig, data, str(cfg_path))
    if path.is_dir():
        return _build(EncoderConfig, {"name": path.resolve().name, "model": str(path.resolve()),
                                      **overrides}, spec)
    if "/" in spec and not spec.startswith(("/", ".")) and spec.count("/") == 1:
        return _build(EncoderConfig, {"name": spec.replace("/", "--"), "model": spec, **overrides}, spec)
    avail = known_configs("encoders")
    raise ValueError(f"unknown encoder {spec!r}: not a config in {configs_dir() / 'encoders'} ({avail}), "
                     "a local model folder or a hub id")


def encoder_folder_name(spec: str) -> str:
    """The features folder name an encoder spec maps to, without loading any model. A bare name that
    is no encoder config (such as "precomputed" for the embeddings source) is the folder name itself."""
    try:
        return load_encoder_config(spec).name
    except ValueError:
        if "/" not in spec and not spec.endswith((".yaml", ".yml")):
            return spec
        raise
