"""Feature shards (ROOT/NAME/features/ENCODER): reading them into an EmbeddingTable, and export to the
embeddings Parquet table.

`load_features` reads whole shards in one request each and parses them in memory (the shard's sha256 is
checked against the manifest first, so a damaged shard is an error, never silently short).
"""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from locdiff.data import manifest as mf
from locdiff.data import storage
from locdiff.data.shards import (
    group_samples,
    json_member,
    parse_regular_tar,
    parse_tar_bytes,
    read_npy_header,
    stage_dir,
)
from locdiff.data.validation import ChecksumError, ShardError, sha256_bytes
from locdiff.errors import reraise_for
from locdiff.io import write_embeddings
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)


def to_float32(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16/bfloat16-stored arrays to float32 (through torch: several times faster than NumPy's
    float16 cast), into `out` when given."""

    src = torch.from_numpy(np.ascontiguousarray(a))
    if out is None:
        return src.to(torch.float32).numpy()
    torch.from_numpy(out).copy_(src)
    return out


def features_dir(path_or_root: str | tuple[str, str, str], name: str | None = None,
                 encoder: str | None = None) -> str:
    """ROOT/NAME/features/ENCODER from (root, name, encoder) (as arguments or one tuple), or the given
    folder when name is None."""
    if isinstance(path_or_root, tuple | list):
        path_or_root, name, encoder = path_or_root
    if name is None and encoder is None:
        return str(path_or_root).rstrip("/")
    if not (name and encoder):
        raise ValueError("give both name and encoder, or a features folder alone")
    return stage_dir(str(path_or_root), name, "features", encoder)


def _read_npy_block(buf: memoryview, offsets: np.ndarray, what: str) -> np.ndarray:
    """Stack equally-shaped .npy members of one tar, given as (N, 2) [data offset, size], into (N, ...)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, sizes = offsets[:, 0], offsets[:, 1]
    off0, size0 = int(starts[0]), int(sizes[0])
    f = io.BytesIO(bytes(buf[off0: off0 + min(size0, 4096)]))
    try:
        shape, fortran, dtype = read_npy_header(f)
    except ValueError as err:
        raise ShardError(f"{what}: an .npy member has a damaged header ({err}); the shard is corrupt") from None
    if dtype.hasobject:  # pickled Python objects: never loaded
        raise ShardError(f"{what}: .npy members of dtype object (pickled Python objects) are not allowed; the "
                         "shard is corrupt or crafted")
    hlen = f.tell()
    nbytes = size0 - hlen
    if (sizes != size0).any():
        raise ValueError(f"{what}: .npy members of different sizes")
    arr = np.frombuffer(buf, dtype=np.uint8)
    # every member must carry the same .npy header (dtype, shape)
    heads = arr[starts[:, None] + np.arange(hlen)]
    if not (heads == heads[0]).all():
        raise ValueError(f"{what}: .npy members of different dtype or shape")
    steps = np.diff(starts)
    if len(starts) > 1 and (steps == steps[0]).all():  # regular layout: one strided copy
        view = np.lib.stride_tricks.as_strided(arr[off0 + hlen:], shape=(len(starts), nbytes),
                                               strides=(int(steps[0]), 1))
        raw = np.ascontiguousarray(view)
    else:
        raw = np.stack([arr[s + hlen: s + hlen + nbytes] for s in starts.tolist()])
    out = raw.view(dtype).reshape((len(starts), *shape))
    return np.asfortranarray(out) if fortran else out


def read_feature_shard(data: bytes, what: str = "") -> dict[str, Any]:
    """Parse one feature shard held in memory: keys, ids, lat, lon, emb (N, d) and shdd (N, D) or None.

    Shards with a regular layout (every sample the same members and padded sizes: what the embed stage
    writes) are parsed with array operations; others member by member.
    """
    buf = memoryview(data)
    regular = parse_regular_tar(buf)
    if regular is not None:
        keys, members = regular
        if "json" not in members or "emb.npy" not in members:
            raise ValueError(f"{what}: samples lack json or emb.npy members")
        json_off = members["json"].tolist()
        emb_off = members["emb.npy"]
        shdd_off = members.get("shdd.npy", [])
    else:
        samples = group_samples(parse_tar_bytes(buf, what=what))
        keys = [k for k, _ in samples]
        try:
            json_off = [p["json"] for _, p in samples]
            emb_off = [p["emb.npy"] for _, p in samples]
            shdd_off = [p["shdd.npy"] for _, p in samples if "shdd.npy" in p]
        except KeyError as err:
            raise ValueError(f"{what}: a sample lacks its {err.args[0]} member") from None
        if shdd_off and len(shdd_off) != len(samples):
            raise ValueError(f"{what}: only some samples have shdd.npy")
    try:
        metas = json.loads(b"[" + b",".join([data[o: o + s] for o, s in json_off]) + b"]")
    except (ValueError, UnicodeDecodeError, RecursionError):  # find and name the member that does not parse
        metas = [json_member(data[o: o + s], url=what, key=k) for k, (o, s) in zip(keys, json_off, strict=True)]
    if any(not isinstance(m, dict) or "id" not in m for m in metas):
        bad = next(k for k, m in zip(keys, metas, strict=True) if not isinstance(m, dict) or "id" not in m)
        raise ShardError(f"{what}: member {bad}.json has no id; the shard is corrupt")
    return {
        "keys": keys,
        "ids": [m["id"] for m in metas],
        "lat": np.array([m.get("lat", np.nan) for m in metas], dtype=np.float64),
        "lon": np.array([m.get("lon", np.nan) for m in metas], dtype=np.float64),
        "emb": _read_npy_block(buf, emb_off, what) if len(emb_off) else None,
        "shdd": _read_npy_block(buf, shdd_off, what) if len(shdd_off) else None,
    }


def load_features(path_or_root: str | tuple[str, str, str], name: str | None = None,
                  encoder: str | None = None, *, with_shdd: bool = False,
                  progress: bool = False) -> EmbeddingTable | tuple[EmbeddingTable, np.ndarray]:
    """Read a complete features stage into an EmbeddingTable (embedding as float32).

    Args:
        path_or_root: the features folder ROOT/NAME/features/ENCODER, a (ROOT, NAME, ENCODER) tuple,
            or ROOT when name and encoder are given. Local or s3://.
        with_shdd: also return the (N, D) SHDD targets (float32); ValueError when there are none.

    Raises:
        FileNotFoundError: the stage has no manifest (not run, or not finished).
        ChecksumError: a shard differs from the sha256 in the manifest.
        ValueError: a shard's sample count differs from the manifest.
    """
    folder = features_dir(path_or_root, name, encoder)
    manifest = mf.require_manifest(folder, "embed")
    entries = mf.shard_entries(manifest, folder)
    dim = mf.embedding_dim(manifest, folder)
    total = sum(int(e["count"]) for e in entries)
    with reraise_for(mf.manifest_path(folder), what="features manifest",  # counts of 10^12 rows: named, not OOM
                     hint="its counts are wrong (re-run `locdiff data embed`) or the stage is too large to load whole"):
        emb = np.empty((total, dim), dtype=np.float32)
        lat, lon = np.empty(total), np.empty(total)
    ids: list[str] = []
    shdd_parts: list[np.ndarray] = []

    def fetch(entry: dict[str, Any]) -> tuple[str, bytes, str]:
        url = storage.join(folder, entry["shard"])
        data = mf.read_shard_bytes(url, entry)
        return url, data, sha256_bytes(data)  # both release the GIL: overlap with parsing

    row = 0
    with ThreadPoolExecutor(2) as pool:
        for entry, (url, data, digest) in tqdm(zip(entries, pool.map(fetch, entries), strict=True),
                                               total=len(entries), desc="load features", unit="shard",
                                               disable=not progress):
            if digest != entry["sha256"]:
                raise ChecksumError(f"{url}: sha256 differs from the manifest's {entry['sha256']} "
                                    "(damaged or "
                                    "rewritten shard); re-run `locdiff data embed`")
            part = read_feature_shard(data, url)
            n = len(part["ids"])
            if n != entry["count"]:
                raise ValueError(f"{url}: {n} samples, the manifest says {entry['count']}")
            if n:
                if part["emb"].shape[1:] != (dim,):
                    raise ValueError(f"{url}: embeddings of shape {part['emb'].shape[1:]}, "
                                     f"manifest dim {dim}")
                to_float32(part["emb"], out=emb[row: row + n])
                if with_shdd and part["shdd"] is not None:
                    shdd_parts.append(part["shdd"])
            ids.extend(part["ids"])
            lat[row: row + n], lon[row: row + n] = part["lat"], part["lon"]
            row += n
    table = EmbeddingTable(ids=np.array(ids, dtype=object), lat=lat, lon=lon, embedding=emb, source=folder)
    if not with_shdd:
        return table
    if not manifest.get("shdd"):
        raise ValueError(f"{folder}: no SHDD targets (run `locdiff data embed ... --degree L`)")
    shdd = (np.concatenate(shdd_parts) if shdd_parts else np.zeros((0, manifest["shdd"]["dim"]))
            ).astype(np.float32, copy=False)
    return table, shdd


def export_features(root: str, name: str, encoder: str, out: str) -> EmbeddingTable:
    """Write a features stage as the embeddings Parquet table (id, lat, lon float64, embedding
    list<float32>) at `out` (local or s3://), atomically; returns the table."""
    table = load_features(root, name, encoder)
    with storage.disk_full_is_an_error(out, hint="free some space or choose another --out"):
        write_embeddings(out, table)
    log.info("wrote %d embeddings of dimension %d to %s", len(table), table.dim, out)
    return table
