"""Typed configs for data sets (`configs/datasets/NAME.yaml`) and encoders (`configs/encoders/NAME.yaml`).

Validated by `locdiff.schema` (the one config system): unknown keys are rejected with the file and key
named, so a typo never silently falls back to a default, and every number is checked against its range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from locdiff import schema
from locdiff.resources import configs_dir, find_config, is_yaml_path, known_configs
from locdiff.schema import DEVICE_EXPECT, DEVICE_PATTERN, setting

# The read limits of the data layer (defaults of the data set config fields of the same names, and of the
# functions that read): one home for the numbers.
MAX_IMAGE_BYTES = 50_000_000  # bytes read for one image file
# 64 Mpx takes the largest camera photos (61 Mpx full frame, 50 Mpx phones) and stops decompression bombs
# before any pixel is decoded (a 64 Mpx RGBA image is 256 MB decoded)
MAX_IMAGE_PIXELS = 64_000_000
MAX_METADATA_BYTES = 4_000_000_000  # a metadata CSV, URL list (parsed from disk a chunk at a time) or table
MAX_ARCHIVE_BYTES = 200_000_000_000  # an image archive streamed to the download cache
MAX_SHARD_SIZE = 100_000  # samples per shard (a shard is written from memory)


@dataclass
class RemoteFile:
    url: str | None = None  # where the real file is published (http(s), s3, hf://)
    filename: str | None = None  # its name inside a --source folder or mirror
    # published checksum, when there is one; a mismatch is an error
    sha256: str | None = setting(None, pattern=r"[0-9a-fA-F]{64}", expect="64 hex digits")
    md5: str | None = setting(None, pattern=r"[0-9a-fA-F]{32}", expect="32 hex digits")


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
    # samples per shard (the last one may be short, skipped records shrink them)
    shard_size: int = setting(1000, ge=1, le=MAX_SHARD_SIZE)
    # longest image side; larger images are resized, JPEGs within it kept as-is
    max_side: int = setting(512, ge=16, le=16_384)
    jpeg_quality: int = setting(90, ge=1, le=100)
    verify: Literal["header", "decode"] = "header"  # "decode" fully decodes every image (slower)
    workers: int = setting(16, ge=1, le=1024)  # parallel fetches for remote per-image sources
    retries: int = setting(3, ge=0, le=100)  # extra attempts for an unreachable URL (exponential backoff)
    backoff: float = setting(0.5, ge=0, le=3600)  # seconds before the first retry
    timeout: float = setting(30.0, gt=0, le=3600)  # seconds per request (connect, each read)
    downloader: Literal["auto", "builtin", "img2dataset"] = "builtin"
    # "auto": img2dataset above this many URLs when installed
    img2dataset_threshold: int = setting(100_000, ge=0, le=10**12)
    hf_repo: str | None = None  # Hugging Face data set id (osv5m)
    hf_revision: str = "main"
    hf_images: list[str] = field(default_factory=list)  # image zips in the HF repo, in order
    encoder: str = "precomputed"  # embeddings source: the encoder folder name to write
    requires_source: bool = False  # not public: --source is mandatory (gws15k)
    # -- what may be read (untrusted sources): see the README, "Ingesting untrusted data" --
    # "optional": records without coordinates are kept (lat/lon null; folder and URL-list sources; a
    # folder without a CSV is read for every JPEG/PNG/WebP under it); "required": they are skipped
    coordinates: Literal["required", "optional"] = "required"
    # read each photo's EXIF GPS tag: the label of a photo the metadata gives no coordinates for (a folder
    # without a CSV is then read for every photo under it); where both exist the metadata wins and
    # disagreements over 1 km are counted (manifest `exif`)
    exif_coordinates: bool = False
    allow_private_addresses: bool = False  # fetch from private/loopback/link-local hosts (own mirror)
    # bytes read for one image; larger: skipped (too_big)
    max_image_bytes: int = setting(MAX_IMAGE_BYTES, ge=1, le=1 << 32)
    # width x height; larger: skipped undecoded (too_large)
    max_image_pixels: int = setting(MAX_IMAGE_PIXELS, ge=1, le=1 << 32)
    # a metadata CSV, URL list or embeddings table
    max_metadata_bytes: int = setting(MAX_METADATA_BYTES, ge=1, le=1 << 40)
    max_archive_bytes: int = setting(MAX_ARCHIVE_BYTES, ge=1, le=1 << 50)  # an image archive downloaded to the cache


@dataclass
class EncoderConfig:
    name: str  # folder name under ROOT/NAME/features/
    type: Literal["clip"] = "clip"
    model: str = "openai/clip-vit-large-patch14"  # hub id or local folder (from_pretrained)
    revision: str | None = None  # pinned hub revision (commit); None for local folders
    batch_size: int = setting(64, ge=1, le=4096)
    storage_dtype: Literal["float16", "float32"] = "float16"  # dtype of KEY.emb.npy
    precision: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # autocast; auto: fp16 on GPU
    normalize: bool = True  # L2-normalise embeddings (CLIP convention)
    dim: int | None = setting(None, ge=1, le=1 << 16)  # the width of its embeddings, where the config states it
    # None: cuda when available, else cpu
    device: str | None = setting(None, pattern=DEVICE_PATTERN, expect=DEVICE_EXPECT)
    ray_batch_size: int = setting(256, ge=1, le=65_536)


def _build(cls: type, data: Any, where: str) -> Any:
    """Validate a mapping into `cls` (locdiff.schema): ConfigError "WHERE: KEY: PROBLEM"."""
    return schema.build(cls, data, source=where)


def load_dataset_config(name_or_path: str, **overrides: Any) -> DatasetConfig:
    """Read configs/datasets/NAME.yaml (or a YAML path) into a DatasetConfig; overrides win."""
    path = find_config("datasets", name_or_path)
    if path is None:
        where = name_or_path if is_yaml_path(name_or_path) else configs_dir() / "datasets" / f"{name_or_path}.yaml"
        raise ValueError(f"unknown data set {name_or_path!r}: no {where}; known: {known_configs('datasets')}")
    data = schema.read_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _build(DatasetConfig, data, str(path))


def load_encoder_config(spec: str, **overrides: Any) -> EncoderConfig:
    """An encoder from configs/encoders/SPEC.yaml, a YAML path, a local model folder or a hub id.

    A local folder or hub id gets a CLIP config whose name is the folder's base name (or the hub id
    with '/' replaced by '--'), which becomes the features folder name.
    """
    path = Path(spec)
    cfg_path = find_config("encoders", spec)
    if cfg_path is not None:
        data = schema.read_yaml(cfg_path)
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
