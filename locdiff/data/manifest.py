"""manifest.json per stage, and the per-shard progress records a stage resumes from.

A stage writes each shard under a temporary name and renames it (a single PUT on S3), after recording
the shard's count, sha256 and skipped records in `_progress/shard-NNNNNN.json`. A shard is finished when
both exist; a re-run skips finished shards and redoes the rest, which come out identical because records
are assigned to shards deterministically. The manifest is written last and atomically, so a stage is
complete exactly when its manifest exists. Manifests hold no timestamps or paths of the run, so an
interrupted-then-resumed stage ends with the same manifest as an uninterrupted one.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from locdiff.data import storage
from locdiff.errors import one_line
from locdiff.tables import MAX_EMBED_DIM

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def manifest_path(stage_dir: str) -> str:
    return storage.join(stage_dir, MANIFEST)


def progress_path(stage_dir: str, shard: str) -> str:
    return storage.join(stage_dir, "_progress", shard.replace(".tar", ".json"))


def software_versions() -> dict[str, str]:
    """Versions of the packages that decide the bytes a stage writes."""

    out = {}
    for pkg in ("locdiff", "webdataset", "pillow", "numpy", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists shards: a few MB for the largest data sets


def dumps(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_manifest(stage_dir: str, manifest: dict[str, Any]) -> str:
    """Write ROOT/.../manifest.json atomically (adding format_version to `manifest`); returns its path."""
    manifest["format_version"] = FORMAT_VERSION
    path = manifest_path(stage_dir)
    storage.write_bytes_atomic(path, dumps(manifest))
    return path


def read_manifest(stage_dir: str) -> dict[str, Any] | None:
    """The stage's manifest, or None when the stage has not completed."""
    path = manifest_path(stage_dir)
    try:
        data = storage.read_bytes(path, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply); re-run the stage that wrote it") from None
    except (ValueError, UnicodeDecodeError) as err:  # ValueError: also an integer of more than 4,300 digits
        raise ValueError(f"{path}: not valid JSON ({one_line(str(err), 200)}); re-run the stage that wrote "
                         "it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: not a stage manifest (no list of shards); re-run the stage that wrote it")
    return manifest


def shard_entries(manifest: dict[str, Any], stage_dir: str) -> list[dict[str, Any]]:
    """The manifest's shards as {shard, count, sha256, bytes}, checked: a shard name is a plain file name
    in the stage folder (no '/', '..': a crafted manifest cannot make a reader leave the folder), the
    numbers are integers. ValueError naming the manifest otherwise."""
    path = manifest_path(stage_dir)
    try:
        entries = [{"shard": e["shard"], "count": int(e["count"]), "sha256": str(e["sha256"]),
                    "bytes": int(e.get("bytes", 0))} for e in manifest["shards"]]
        int(manifest["count"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a stage manifest (missing or bad field {err}); re-run the stage") from None
    for e in entries:
        name = e["shard"]
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..") or e["count"] < 0:
            raise ValueError(f"{path}: bad shard entry {name!r}; re-run the stage")
    return entries


def read_shard_bytes(url: str, entry: dict[str, Any]) -> bytes:
    """The bytes of the shard of a manifest `entry` (from `shard_entries`), read only up to the size its manifest
    records: a larger file (a damaged or replaced shard, a sparse file of gigabytes) is refused by its size before
    it is read into memory. The caller checks the sha256."""
    expected = entry.get("bytes") or None  # manifests record it; 0 or absent: no size to check against
    try:
        return storage.read_bytes(url, max_bytes=expected)
    except storage.TooBigError:
        raise ValueError(f"{url}: larger than the {expected:,} bytes the manifest records (damaged or rewritten "
                         "shard); re-run the stage that wrote it") from None


def embedding_dim(manifest: dict[str, Any], stage_dir: str) -> int:
    """The embedding dimension a features manifest records (ValueError naming it when it has none)."""
    try:
        dim = manifest["embedding"]["dim"]
    except (KeyError, TypeError):
        dim = None
    if type(dim) is not int or dim < 1:
        raise ValueError(f"{manifest_path(stage_dir)}: not a features manifest (no embedding dimension); "
                         "re-run the embed stage")
    if dim > MAX_EMBED_DIM:  # before any array of that width is allocated
        raise ValueError(f"{manifest_path(stage_dir)}: embedding dimension {dim:,}, above the limit of "
                         f"{MAX_EMBED_DIM:,}; re-run the embed stage")
    return dim


def require_manifest(stage_dir: str, what: str) -> dict[str, Any]:
    m = read_manifest(stage_dir)
    if m is None:
        raise FileNotFoundError(f"{manifest_path(stage_dir)}: no manifest; the {what} stage has not "
                                "completed (run it first)")
    return m


def write_progress(stage_dir: str, shard: str, info: dict[str, Any]) -> None:
    """Record a shard about to be put in place. An older file of its name (from a run with other settings)
    goes first: a run killed between the record and the rename must not leave the record beside the old
    shard, which the re-run would take for a finished one."""
    storage.remove(storage.join(stage_dir, shard))
    storage.write_bytes_atomic(progress_path(stage_dir, shard), dumps(info))


def read_progress(stage_dir: str, shard: str) -> dict[str, Any] | None:
    try:
        info = json.loads(storage.read_bytes(progress_path(stage_dir, shard), max_bytes=MAX_MANIFEST_BYTES))
    except (FileNotFoundError, ValueError, RecursionError):  # missing, damaged or too large: written again
        return None
    return info if isinstance(info, dict) else None


def shard_finished(stage_dir: str, shard: str, settings_key: str) -> dict[str, Any] | None:
    """The progress record of a finished shard written with the same settings, else None."""
    info = read_progress(stage_dir, shard)
    if info is None or info.get("settings_key") != settings_key:
        return None
    return info if storage.exists(storage.join(stage_dir, shard)) else None
