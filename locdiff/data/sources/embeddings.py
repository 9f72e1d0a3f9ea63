"""A Parquet of precomputed embeddings in the embeddings-table format (id, lat, lon, embedding), from a
local path, an http(s) URL or an s3:// URL. It becomes a features stage directly:
ROOT/NAME/features/ENCODER (ENCODER from the config's `encoder`, default "precomputed"), float32 so the
round trip is exact. Bad rows (ids, coordinates, embeddings of the wrong length or with NaN) are skipped
and counted, not fatal; a file without the columns is."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from locdiff.data import manifest as mf
from locdiff.data import storage
from locdiff.data.config import DatasetConfig
from locdiff.data.download import download_file, private_addresses_allowed
from locdiff.data.shards import json_bytes, npy_bytes, sample_key, shard_name, stage_dir, write_tar
from locdiff.data.sources.records import SeenIds
from locdiff.data.validation import (
    ChecksumError,
    RecordError,
    SkipLog,
    SourceError,
    check_checksum,
    check_record_coordinates,
)
from locdiff.tables import embedding_numbers

log = logging.getLogger(__name__)


BATCH_VALUES = 1 << 20  # numbers of embeddings read at a time (4 MB as float32): a batch is this / dim rows
MAX_BATCH_ROWS = 4096
LENGTH_BATCH_ROWS = 1024  # rows a batch of the first pass (the embeddings' lengths), before dim is known
READ_BUFFER = 1 << 20  # bytes: a column chunk is read in buffers of this size, never whole (nor pre-buffered:
# pyarrow would hold every row group it is asked for)
HASH_BLOCK = 8 << 20


@contextlib.contextmanager
def _opened(url: str, cfg: DatasetConfig, out: str) -> Iterator[tuple[pq.ParquetFile, str]]:
    """The Parquet file at `url` opened to be read a batch at a time, and its sha256 (read in blocks, never
    whole, once; checked against the config's). A local path (or file:// URL) is read where it is; an http(s) or
    s3:// URL is downloaded first into the stage's local scratch folder, and removed after."""
    path, scratch = url.split("://", 1)[1] if url.startswith("file://") else url, None
    if storage.is_remote(url) and not url.startswith("file://"):
        # one writer per stage: the copy a killed run left is removed (and the download starts afresh)
        scratch = os.path.join(storage.local_tmp_dir(out), f"source-{hashlib.sha256(out.encode()).hexdigest()[:16]}")
        shutil.rmtree(scratch, ignore_errors=True)
    digest = None  # a download's: hashed (and checked against the config's) as it was stored
    try:
        if scratch is not None:
            try:
                path, digest = download_file(url, sha256=cfg.metadata.sha256, md5=cfg.metadata.md5,
                                             retries=cfg.retries, backoff=cfg.backoff, timeout=cfg.timeout,
                                             dest_dir=scratch, max_bytes=cfg.max_metadata_bytes,
                                             allow_private=private_addresses_allowed(cfg.allow_private_addresses))
            except ChecksumError:
                raise
            except (FileNotFoundError, ValueError) as err:
                raise SourceError(str(err) if url in str(err) else f"{url}: {err}") from None
        try:
            f = storage.open_local(path, max_bytes=cfg.max_metadata_bytes)
        except FileNotFoundError as err:
            raise SourceError(str(err) if url in str(err) else f"{url}: {err}") from None
        except storage.TooBigError as err:
            raise SourceError(f"{err} (raise max_metadata_bytes)") from None
        except PermissionError:
            raise SourceError(f"{url}: permission denied") from None
        with f:
            def blocks() -> Iterator[bytes]:
                total = 0
                while block := f.read(HASH_BLOCK):
                    total += len(block)
                    if total > cfg.max_metadata_bytes:  # grew since it was opened
                        raise SourceError(f"{url}: larger than the limit of {cfg.max_metadata_bytes:,} bytes "
                                          "(raise max_metadata_bytes)")
                    yield block

            if digest is None:  # a local file: hashed here, in blocks
                digest = check_checksum(blocks(), sha256=cfg.metadata.sha256, md5=cfg.metadata.md5, what=url)
                f.seek(0)
            try:
                pf = pq.ParquetFile(f, buffer_size=READ_BUFFER, pre_buffer=False)
            except (pa.ArrowInvalid, OSError) as err:
                raise _unreadable(url, err) from None
            yield pf, digest
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _unreadable(url: str, err: Exception) -> SourceError:
    return SourceError(f"{url}: not a readable Parquet file ({err})")


def _batches(pf: pq.ParquetFile, url: str, columns: list[str], limit: int | None,
             rows: int) -> Iterator[pa.RecordBatch]:
    """The first `limit` rows (all: None) of `columns`, `rows` at a time; a damaged file is a SourceError."""
    left = pf.metadata.num_rows if limit is None else min(int(limit), pf.metadata.num_rows)
    if left <= 0:
        return
    batches = pf.iter_batches(batch_size=rows, columns=columns, use_threads=False)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowInvalid, OSError) as err:  # only the reading here: a full disk is not the file's
            raise _unreadable(url, err) from None
        if batch is None:
            return
        batch = batch.slice(0, left)
        left -= batch.num_rows
        yield batch
        if left <= 0:
            return


def _common_length(pf: pq.ParquetFile, url: str, columns: list[str], limit: int | None) -> int:
    """The most common length of the embeddings (0 when none): the others are bad rows. Every column is read
    (and decoded) once here, so that a damaged file is refused before anything is written."""
    counts: dict[int, int] = {}  # length: rows, in the order the lengths first occur
    for batch in _batches(pf, url, columns, limit, LENGTH_BATCH_ROWS):
        col = batch.column("embedding")
        if _is_list(col.type):
            found = pc.value_counts(pc.list_value_length(col).drop_null())  # in the order of first occurrence
            lengths, rows = found.field("values").to_pylist(), found.field("counts").to_pylist()
        else:  # not lists: the lengths as Python sees them (the rows are refused below, or fail as before)
            lengths = [len(e) for e in col.to_pylist() if e is not None]
            rows = [1] * len(lengths)
        for n, k in zip(lengths, rows, strict=True):
            counts[n] = counts.get(n, 0) + k
    # ties as `max(set(all lengths), key=count)` breaks them: a set made with the lengths in the same order
    return max(set(list(counts)), key=counts.__getitem__) if counts else 0


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _embeddings(col: pa.Array) -> Callable[[int], np.ndarray]:
    """The embedding of row j of a batch's column as a float32 array (a null value NaN, a null row empty), the
    array numpy makes of the row's Python numbers: lists of float32 or float64 are converted whole (the same
    rounding), others a Python number at a time."""
    if _is_list(col.type) and (pa.types.is_float32(col.type.value_type) or pa.types.is_float64(col.type.value_type)):
        lengths = pc.list_value_length(col).fill_null(0).to_numpy()
        starts = np.concatenate([[0], np.cumsum(lengths)])
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return lambda j: flat[starts[j]: starts[j + 1]].copy()  # a copy: a shard does not keep the batch
    embs = col.to_pylist()
    return lambda j: np.asarray([np.nan if v is None else v for v in (embs[j] or [])], dtype=np.float32)


def ingest_embeddings(cfg: DatasetConfig, name: str, root: str, *, source: str | None = None,
                      limit: int | None = None) -> dict[str, Any]:
    """Write the table a batch at a time: one shard as soon as it has `shard_size` good rows. What is held
    does not grow with the table (the ids seen, to skip duplicates, are kept on disk)."""
    url = source or cfg.metadata.url
    if not url:
        raise SourceError(f"data set {name!r}: give the Parquet file with --source")
    out = stage_dir(root, name, "features", cfg.encoder)
    with storage.removed_if_failed_empty(out), _opened(url, cfg, out) as (pf, digest):  # a download's scratch
        return _write(pf, digest, cfg, name, url, out, limit)


def _write(pf: pq.ParquetFile, digest: str, cfg: DatasetConfig, name: str, url: str, out: str,
           limit: int | None) -> dict[str, Any]:
    columns = [cfg.id_column, cfg.lat_column, cfg.lon_column, "embedding"]
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise SourceError(f"{url}: no column(s) {missing}; the file has {names}")
    settings = {"shard_size": cfg.shard_size, "limit": limit, "dtype": "float32"}
    key = hashlib.sha256(json.dumps([settings, digest, mf.software_versions()]).encode()).hexdigest()[:16]
    old = mf.read_manifest(out)
    if old is not None and old.get("settings_key") == key:
        return old
    embedding_numbers(pf.metadata, url)  # before any row is decoded
    dim = _common_length(pf, url, columns, limit)
    if old is not None:
        storage.remove(mf.manifest_path(out))
    storage.makedirs(out)
    storage.clear_local_tmp(out)  # partial files of a killed run
    skips, rows, shards = SkipLog(), [], []
    total = count = 0

    def write_shard() -> None:
        sname = shard_name(len(shards))
        info = mf.shard_finished(out, sname, key)
        if info is None:
            samples = [(sample_key(count + j), {"emb.npy": npy_bytes(e),
                                                "json": json_bytes({"id": r, "lat": la, "lon": lo})})
                       for j, (r, la, lo, e) in enumerate(rows)]
            tmp = os.path.join(storage.local_tmp_dir(out), f"{sname}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                n, shard_sha = write_tar(tmp, samples)
                info = {"shard": sname, "count": n, "sha256": shard_sha, "bytes": os.path.getsize(tmp),
                        "settings_key": key, "dim": dim}
                mf.write_progress(out, sname, info)
                storage.put_file_atomic(tmp, storage.join(out, sname))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        shards.append(info)

    with SeenIds(os.path.join(storage.local_tmp_dir(out),
                              f"seen-{hashlib.sha256(out.encode()).hexdigest()[:16]}.sqlite.tmp")) as seen:
        for batch in _batches(pf, url, columns, limit, max(1, min(MAX_BATCH_ROWS, BATCH_VALUES // max(dim, 1)))):
            ids = ["" if r is None else str(r).strip() for r in batch.column(cfg.id_column).to_pylist()]
            repeated = seen.repeated(ids)
            lats = batch.column(cfg.lat_column).to_pylist()
            lons = batch.column(cfg.lon_column).to_pylist()
            embedding = _embeddings(batch.column("embedding"))
            for j, (rid, lat, lon) in enumerate(zip(ids, lats, lons, strict=True)):
                total += 1
                if not rid:
                    skips.add(f"row {total - 1}", "missing_id")
                    continue
                if repeated[j]:
                    skips.add(rid, "duplicate_id")
                    continue
                try:
                    la, lo = check_record_coordinates(lat, lon)
                except RecordError as err:
                    skips.add(rid, err.reason, err.detail)
                    continue
                arr = embedding(j)
                if arr.shape != (dim,) or not np.isfinite(arr).all():
                    what = (f"length {arr.shape[0]}, expected {dim}" if arr.shape != (dim,)
                            else "NaN or infinite values")
                    skips.add(rid, "invalid_embedding", what)
                    continue
                rows.append((rid, la, lo, arr))
                if len(rows) == cfg.shard_size:
                    write_shard()
                    count, rows = count + len(rows), []
    if rows:
        write_shard()
        count += len(rows)
    manifest = {
        "stage": "features", "dataset": name, "source_name": "embeddings",
        "source": {"metadata": {"url": url, "sha256": digest}},
        "encoder": {"name": cfg.encoder, "type": "precomputed", "model": None, "revision": None},
        "embedding": {"dim": dim, "dtype": "float32", "shape": [dim]}, "degree": None, "shdd": None,
        "settings": settings, "settings_key": key, "software": mf.software_versions(),
        "rows": total, "count": count,
        "shards": [{k: s[k] for k in ("shard", "count", "sha256", "bytes")} for s in shards],
        **skips.to_json(),
    }
    mf.write_manifest(out, manifest)
    log.info("%s: %d precomputed embeddings (dim %d), skipped %s", out, count, dim, dict(skips.counts))
    return manifest


SOURCE = None  # not a per-image source: ingest() calls ingest_embeddings for it
