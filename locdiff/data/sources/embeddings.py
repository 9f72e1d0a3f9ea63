"""A Parquet of precomputed embeddings in the embeddings-table format (id, lat, lon, embedding), from a
local path, an http(s) URL or an s3:// URL. It becomes a features stage directly:
ROOT/NAME/features/ENCODER (ENCODER from the config's `encoder`, default "precomputed"), float32 so the
round trip is exact. Bad rows (ids, coordinates, embeddings of the wrong length or with NaN) are skipped
and counted, not fatal; a file without the columns is."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from locdiff.data import manifest as mf
from locdiff.data import storage
from locdiff.data.config import DatasetConfig
from locdiff.data.download import fetch, private_addresses_allowed
from locdiff.data.shards import json_bytes, npy_bytes, sample_key, shard_name, stage_dir, write_tar
from locdiff.data.validation import (
    RecordError,
    SkipLog,
    SourceError,
    check_checksum,
    check_record_coordinates,
)

log = logging.getLogger(__name__)


def _read_table(url: str, cfg: DatasetConfig) -> tuple[pa.Table, str]:
    try:
        data = fetch(url, retries=cfg.retries, backoff=cfg.backoff, timeout=cfg.timeout,
                     max_bytes=cfg.max_metadata_bytes,
                     allow_private=private_addresses_allowed(cfg.allow_private_addresses))
    except RecordError as err:
        raise SourceError(f"{url}: {err.detail}"
                          + (" (raise max_metadata_bytes)" if err.reason == "too_big" else "")) from None
    digest = check_checksum(data, sha256=cfg.metadata.sha256, md5=cfg.metadata.md5, what=url)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise SourceError(f"{url}: not a readable Parquet file ({err})") from None
    return table, digest


def ingest_embeddings(cfg: DatasetConfig, name: str, root: str, *, source: str | None = None,
                      limit: int | None = None) -> dict[str, Any]:
    url = source or cfg.metadata.url
    if not url:
        raise SourceError(f"data set {name!r}: give the Parquet file with --source")
    table, digest = _read_table(url, cfg)
    cols = {cfg.id_column: "id", cfg.lat_column: "lat", cfg.lon_column: "lon", "embedding": "embedding"}
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise SourceError(f"{url}: no column(s) {missing}; the file has {table.column_names}")
    if limit is not None:
        table = table.slice(0, int(limit))
    ids = table.column(cfg.id_column).to_pylist()
    lats = table.column(cfg.lat_column).to_pylist()
    lons = table.column(cfg.lon_column).to_pylist()
    embs = table.column("embedding").to_pylist()
    dims = [len(e) for e in embs if e is not None]
    dim = max(set(dims), key=dims.count) if dims else 0  # the common length; others are bad rows
    skips, seen, rows = SkipLog(), set(), []
    for rid, lat, lon, emb in zip(ids, lats, lons, embs, strict=True):
        rid = "" if rid is None else str(rid).strip()
        if not rid:
            skips.add(f"row {len(rows) + skips.total}", "missing_id")
            continue
        if rid in seen:
            skips.add(rid, "duplicate_id")
            continue
        seen.add(rid)
        try:
            la, lo = check_record_coordinates(lat, lon)
        except RecordError as err:
            skips.add(rid, err.reason, err.detail)
            continue
        arr = np.asarray([np.nan if v is None else v for v in (emb or [])], dtype=np.float32)
        if arr.shape != (dim,) or not np.isfinite(arr).all():
            what = (f"length {arr.shape[0]}, expected {dim}" if arr.shape != (dim,)
                    else "NaN or infinite values")
            skips.add(rid, "invalid_embedding", what)
            continue
        rows.append((rid, la, lo, arr))
    out = stage_dir(root, name, "features", cfg.encoder)
    settings = {"shard_size": cfg.shard_size, "limit": limit, "dtype": "float32"}
    key = hashlib.sha256(json.dumps([settings, digest, mf.software_versions()]).encode()).hexdigest()[:16]
    old = mf.read_manifest(out)
    if old is not None and old.get("settings_key") == key:
        return old
    if old is not None:
        storage.remove(mf.manifest_path(out))
    storage.makedirs(out)
    storage.clear_local_tmp(out)  # partial files of a killed run
    shards = []
    for k, start in enumerate(range(0, len(rows), cfg.shard_size)):
        sname = shard_name(k)
        info = mf.shard_finished(out, sname, key)
        if info is None:
            samples = [(sample_key(start + j), {"emb.npy": npy_bytes(e),
                                                "json": json_bytes({"id": r, "lat": la, "lon": lo})})
                       for j, (r, la, lo, e) in enumerate(rows[start: start + cfg.shard_size])]
            tmp = os.path.join(storage.local_tmp_dir(out), f"{sname}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                count, shard_sha = write_tar(tmp, samples)
                info = {"shard": sname, "count": count, "sha256": shard_sha, "bytes": os.path.getsize(tmp),
                        "settings_key": key, "dim": dim}
                mf.write_progress(out, sname, info)
                storage.put_file_atomic(tmp, storage.join(out, sname))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        shards.append(info)
    manifest = {
        "stage": "features", "dataset": name, "source_name": "embeddings",
        "source": {"metadata": {"url": url, "sha256": digest}},
        "encoder": {"name": cfg.encoder, "type": "precomputed", "model": None, "revision": None},
        "embedding": {"dim": dim, "dtype": "float32", "shape": [dim]}, "degree": None, "shdd": None,
        "settings": settings, "settings_key": key, "software": mf.software_versions(),
        "rows": len(ids), "count": len(rows),
        "shards": [{k: s[k] for k in ("shard", "count", "sha256", "bytes")} for s in shards],
        **skips.to_json(),
    }
    mf.write_manifest(out, manifest)
    log.info("%s: %d precomputed embeddings (dim %d), skipped %s", out, len(rows), dim, dict(skips.counts))
    return manifest


SOURCE = None  # not a per-image source: ingest() calls ingest_embeddings for it
