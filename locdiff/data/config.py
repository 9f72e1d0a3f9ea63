"""Typed configs for data sets (`configs/datasets/NAME.yaml`) and encoders (`configs/encoders/NAME.yaml`).

Unknown keys are rejected with the file and key named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The read limits of the data layer (defaults of the data set config fields of the same names, and of the
# functions that read): one home for the numbers.
MAX_IMAGE_BYTES = 50_000_000  # bytes read for one image file
# 64 Mpx takes the largest camera photos (61 Mpx full frame, 50 Mpx phones) and stops decompression bombs
# before any pixel is decoded (a 64 Mpx RGBA image is 256 MB decoded)
MAX_IMAGE_PIXELS = 64_000_000
MAX_METADATA_BYTES = 4_000_000_000  # a whole file read into memory: metadata CSV, URL list, table
MAX_ARCHIVE_BYTES = 200_000_000_000  # an image archive streamed to the download cache


def configs_dir() -> Path:
    """The `configs/` folder (env LOCDIFF_CONFIGS overrides; default: beside the package)."""
    env = os.environ.get("LOCDIFF_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


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
    # -- what may be read (untrusted sources): see the README, "Ingesting untrusted data" --
    # "optional": records without coordinates are kept (lat/lon null; folder and URL-list sources; a
    # folder without a CSV is read for every JPEG/PNG/WebP under it); "required": they are skipped
    coordinates: Literal["required", "optional"] = "required"
    allow_private_addresses: bool = False  # fetch from private/loopback/link-local hosts (own mirror)
    max_image_bytes: int = MAX_IMAGE_BYTES  # bytes read for one image; larger: skipped (too_big)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width x height; larger: skipped undecoded (too_large)
    max_metadata_bytes: int = MAX_METADATA_BYTES  # a metadata CSV, URL list or embeddings table
    max_archive_bytes: int = MAX_ARCHIVE_BYTES  # an image archive downloaded to the cache


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
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if f.type in ("int", "float") and (not isinstance(v, int | float) or isinstance(v, bool)):
            raise ValueError(f"{where}: {f.name} must be a number, got {v!r}")
        if f.type == "bool" and not isinstance(v, bool):
            raise ValueError(f"{where}: {f.name} must be true or false, got {v!r}")
        if typing.get_origin(hints[f.name]) is Literal and v not in typing.get_args(hints[f.name]):
            raise ValueError(f"{where}: {f.name} must be one of {list(typing.get_args(hints[f.name]))}, "
                             f"got {v!r}")
    return obj


def load_dataset_config(name_or_path: str, **overrides: Any) -> DatasetConfig:
    """Read configs/datasets/NAME.yaml (or a YAML path) into a DatasetConfig; overrides win."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = configs_dir() / "datasets" / f"{name_or_path}.yaml"
    if not path.exists():
        avail = sorted(p.stem for p in (configs_dir() / "datasets").glob("*.yaml"))
        raise ValueError(f"unknown data set {name_or_path!r}: no {path}; known: {avail}")
    data = yaml.safe_load(path.read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = _build(DatasetConfig, data, str(path))
    if cfg.shard_size < 1 or cfg.max_side < 16:
        raise ValueError(f"{path}: shard_size must be >= 1 and max_side >= 16")
    for key in ("max_image_bytes", "max_image_pixels", "max_metadata_bytes", "max_archive_bytes"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{path}: {key} must be >= 1, got {getattr(cfg, key)!r}")
    return cfg


def load_encoder_config(spec: str, **overrides: Any) -> EncoderConfig:
    """An encoder from configs/encoders/SPEC.yaml, a YAML path, a local model folder or a hub id.

    A local folder or hub id gets a CLIP config whose name is the folder's base name (or the hub id
    with '/' replaced by '--'), which becomes the features folder name.
    """
    path = Path(spec)
    cfg_path = configs_dir() / "encoders" / f"{spec}.yaml"
    if path.suffix in (".yaml", ".yml") and path.exists():
        cfg_path = path
    if cfg_path.exists():
        data = yaml.safe_load(cfg_path.read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return _build(EncoderConfig, data, str(cfg_path))
    if path.is_dir():
        return _build(EncoderConfig, {"name": path.resolve().name, "model": str(path.resolve()),
                                      **overrides}, spec)
    if "/" in spec and not spec.startswith(("/", ".")) and spec.count("/") == 1:
        return _build(EncoderConfig, {"name": spec.replace("/", "--"), "model": spec, **overrides}, spec)
    avail = sorted(p.stem for p in (configs_dir() / "encoders").glob("*.yaml"))
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
