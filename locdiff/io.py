"""Reading and writing the two stable table formats (README "Formats").

- Embeddings table: Parquet, columns `id` (string), `lat`, `lon` (float64 degrees; optional for unlabelled
  data) and `embedding` (fixed-size or variable list of float32, the same length in every row).
  A folder of Parquet files (the data layer's feature shards) is read as one table, files in name order.
- Predictions table: Parquet or CSV by extension, columns `id`, `lat`, `lon` (truth; optional),
  `pred_lat`, `pred_lon` and optional `method`, `confidence`.

Everything is columnar (pyarrow / NumPy); there is no Python loop over rows, so millions of rows are fine.
Bad input raises ValueError naming the file, the column and the first bad row.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from locdiff.data import storage
from locdiff.errors import UserError, reraise_for
from locdiff.tables import EmbeddingTable, embedding_leaves, embedding_numbers

MAX_EMBED_ABS = 1e6  # an embedding's elements (image features are unit-scale; larger overflow the network)
# rows of one Parquet row group that `write_embeddings` writes: a reader (training's stream) holds a row group
# whole, and pyarrow's default (2^20 rows: 3 GiB at 768-d) would make that grow with the table
ROW_GROUP_ROWS = 65_536
# rows of a predictions table (`read_predictions`: evaluate) read whole, checked from the Parquet metadata before
# a row is read (about 230 bytes of memory a row: 3.9 GB); a few MB of repeated rows could hold billions
MAX_PREDICTION_ROWS = 1 << 24
# numbers of the embedding column converted at a time by `read_embeddings` (2 MB of float32): its peak is the
# embeddings once plus a few such batches
STREAM_FLOATS = 1 << 19

PathLike = str | os.PathLike


def _is_remote(path: PathLike) -> bool:
    return "://" in str(path)


def filesystem_of(path: PathLike):
    """(fsspec filesystem or None, path string): fsspec for URLs such as s3://, None for local paths."""
    if not _is_remote(path):
        return None, str(path)
    return storage.filesystem(str(path))  # s3: the configured endpoint and per-request timeouts


def _first_bad(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


class RowError(ValueError):
    """A bad value in one row of a table: `PATH: column COLUMN, row ROW: WHAT` (row 0 is the first data row)."""

    def __init__(self, path: PathLike, column: str, row: int, what: str) -> None:
        self.path, self.column, self.row, self.what = str(path), column, int(row), what
        super().__init__(f"{path}: column {column!r}, row {row}: {what}")

    def moved(self, path: PathLike, first_row: int) -> RowError:
        """The same error for rows that start at `first_row` of file `path` (a slice of a larger table)."""
        return RowError(path, self.column, first_row + self.row, self.what)


def _bad(path: PathLike, column: str, row: int, what: str) -> RowError:
    return RowError(path, column, row, what)


def _read_parquet(path: PathLike, max_rows: int | None = None) -> pa.Table:
    """The whole table at `path` (a file or a folder of them); more than `max_rows` rows or a row group of too many
    embedding numbers (`embedding_numbers`), found from the metadata before any row is read, is a UserError."""
    fs, p = filesystem_of(path)
    if fs is None:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{path}: no such file or folder")
        if os.path.isdir(p):
            files = sorted(str(f) for f in Path(p).rglob("*.parquet"))
            if not files:
                raise ValueError(f"{path}: folder holds no .parquet files")
            try:
                _check_rows(path, files, None, max_rows)
                return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
            except (pa.ArrowInvalid, OSError) as err:
                raise ValueError(f"{path}: cannot read the Parquet files as one table: {err}") from err
    else:
        with storage.named(str(path)):  # s3fs: "Forbidden", naming nothing
            if not fs.exists(p):
                raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        remote_folder = fs is not None and fs.isdir(p)
        _check_rows(path, sorted(f for f in fs.find(p) if f.endswith(".parquet")) if remote_folder else [p], fs,
                    max_rows)
        return pq.read_table(p, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file: {err}") from err


def _check_rows(path: PathLike, files: list[str], fs: Any, max_rows: int | None) -> None:
    """Refuse Parquet `files` (of the table at `path`) holding more than `max_rows` rows (None: any number) or a
    row group of too many embedding numbers (`embedding_numbers`), from their metadata."""
    rows = 0
    for f in files:
        if fs is None and not os.path.isfile(f):
            continue  # a FIFO would block opening it; pyarrow's reader refuses it unread
        meta = pq.ParquetFile(f if fs is None else fs.open(f, "rb")).metadata
        rows += meta.num_rows
        embedding_numbers(meta, f)  # before any is decoded
    if max_rows is not None and rows > max_rows:
        raise UserError(f"{path}: {rows:,} rows, above the {max_rows:,} a table read whole may hold; split it "
                        "into smaller tables")


def _column(table: pa.Table, name: str, path: PathLike) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ValueError(f"{path}: missing column {name!r} (columns: {', '.join(table.column_names)})")
    if table.column_names.count(name) > 1:
        raise ValueError(f"{path}: column {name!r} appears {table.column_names.count(name)} times; keep one")
    return table.column(name)


def _ids(col: pa.ChunkedArray, path: PathLike, *, unique: bool = True) -> np.ndarray:
    if col.null_count:
        raise _bad(path, "id", _first_bad(col.is_null().to_numpy(zero_copy_only=False)), "id is null")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        if pa.types.is_integer(col.type):
            col = pc.cast(col, pa.string())
        else:
            raise ValueError(f"{path}: column 'id' must be strings, got {col.type}")
    ids = col.to_numpy(zero_copy_only=False).astype(object)
    if unique and len(ids):

        dup = pd.Index(ids).duplicated()
        if dup.any():
            row = _first_bad(dup)
            first = int(np.flatnonzero(ids == ids[row])[0])
            raise _bad(path, "id", row, f"duplicate id {ids[row]!r} (first seen at row {first})")
    return ids


def _float_column(col: pa.ChunkedArray, name: str, path: PathLike) -> np.ndarray:
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise ValueError(f"{path}: column {name!r} must be numeric (float64 degrees), got {col.type}")
    if col.null_count:
        raise _bad(path, name, _first_bad(col.is_null().to_numpy(zero_copy_only=False)), "value is null")
    return col.to_numpy().astype(np.float64, copy=False)


def _check_coords(lat: np.ndarray, lon: np.ndarray, path: PathLike, names: tuple[str, str] = ("lat", "lon")):
    for name, arr, lo, hi in ((names[0], lat, -90.0, 90.0), (names[1], lon, -180.0, 360.0)):
        bad = ~np.isfinite(arr) | (arr < lo) | (arr > hi)
        if bad.any():
            row = _first_bad(bad)
            raise _bad(path, name, row, f"{float(arr[row])!r} is not a finite number in [{lo:g}, {hi:g}] degrees")


def first_bad_embedding(emb: np.ndarray) -> tuple[int, str] | None:
    """(row, why) of the first row of embeddings (N, d) that cannot be located: NaN or inf, or an element beyond
    +-MAX_EMBED_ABS (an image encoder's features are unit-scale; such values overflow the network); None when
    every row can. The one check of the table reader, the Python API and the served model (row by row)."""
    finite = np.isfinite(emb)
    big = np.abs(np.where(finite, emb, 0)) > MAX_EMBED_ABS
    rows = np.flatnonzero(~finite.all(axis=1) | big.any(axis=1))
    if not len(rows):
        return None
    row = int(rows[0])
    if not finite[row].all():
        col = int(np.argmax(~finite[row]))
        return row, f"element {col} of the embedding is {float(emb[row, col])!r} (NaN or infinite)"
    col = int(np.argmax(big[row]))
    return row, f"element {col} of the embedding is {float(emb[row, col]):g}, beyond +-{MAX_EMBED_ABS:g}"


def _embeddings(col: pa.ChunkedArray, path: PathLike) -> np.ndarray:
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise ValueError(f"{path}: column 'embedding' must be a list of float32, got {t}")
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise ValueError(f"{path}: column 'embedding' must hold floats, got {t}")
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(arr)
    if arr.null_count:
        raise _bad(path, "embedding", _first_bad(arr.is_null().to_numpy(zero_copy_only=False)),
                   "embedding is null")
    if n == 0:
        dim = t.list_size if pa.types.is_fixed_size_list(t) else 0
        return np.zeros((0, dim), np.float32)
    lengths = pc.list_value_length(arr).to_numpy()
    if (lengths != lengths[0]).any():
        row = _first_bad(lengths != lengths[0])
        raise _bad(path, "embedding", row,
                   f"embedding has length {lengths[row]}, but row 0 has {lengths[0]} (all rows must match)")
    dim = int(lengths[0])
    if dim == 0:
        raise _bad(path, "embedding", 0, "embedding is empty")
    values = arr.flatten()  # respects offsets/slices
    if values.null_count:
        flat = _first_bad(values.is_null().to_numpy(zero_copy_only=False))
        raise _bad(path, "embedding", flat // dim, f"element {flat % dim} of the embedding is null")
    # checked before the cast to float32: a float64 beyond float32's range would overflow with a RuntimeWarning
    emb = values.to_numpy(zero_copy_only=False).reshape(n, dim)
    if (bad := first_bad_embedding(emb)) is not None:
        raise _bad(path, "embedding", *bad)
    return emb.astype(np.float32, copy=False)


def embedding_table_from_arrow(table: pa.Table, source: PathLike = "<table>", *,
                               labelled: bool | None = None) -> EmbeddingTable:
    """Validate an Arrow table in the embeddings format and return it as an EmbeddingTable.

    Args:
        table: columns `id`, `embedding` and (optionally) `lat`, `lon`.
        source: the file it came from, named in error messages.
        labelled: True to require `lat`/`lon`, False to ignore them, None to read them when present.
    """
    return _embedding_table(table, source, labelled,
                            lambda: _embeddings(_column(table, "embedding", source), source))


def _embedding_table(table: pa.Table, source: PathLike, labelled: bool | None, embeddings) -> EmbeddingTable:
    """`embedding_table_from_arrow` with the embeddings from `embeddings()`, called after the other columns'
    checks (their errors come first)."""
    ids = _ids(_column(table, "id", source), source)
    has = [c in table.column_names for c in ("lat", "lon")]
    if labelled is True or (labelled is None and any(has)):
        lat = _float_column(_column(table, "lat", source), "lat", source)
        lon = _float_column(_column(table, "lon", source), "lon", source)
        _check_coords(lat, lon, source)
    else:
        lat = lon = None
    emb = embeddings()
    return EmbeddingTable(ids=ids, lat=lat, lon=lon, embedding=emb, source=str(source))


def read_embeddings(path: PathLike, *, labelled: bool | None = None) -> EmbeddingTable:
    """Read and validate an embeddings table (a Parquet file, a folder of them, or an fsspec URL).

    Raises:
        FileNotFoundError: path does not exist.
        ValueError: naming the file, column and first bad row, for a missing column, embeddings of
            different lengths, NaN/inf or null in an embedding, coordinates NaN or out of range,
            duplicate or null ids.

    The embedding column is read batch by batch into one float32 array (`_stream_embeddings`): the peak is
    about the embeddings once (an Arrow table of them, converted whole, held them about 5 times).
    """
    files = _plain_parquet_files(path)
    if files is None:  # missing, unreadable or not one plain table: the whole-table reader names the problem
        return embedding_table_from_arrow(_read_parquet(path), path, labelled=labelled)
    fs, names = files
    with contextlib.ExitStack() as stack:
        try:
            opened = [stack.enter_context(pq.ParquetFile(f if fs is None else stack.enter_context(fs.open(f, "rb")),
                                                         buffer_size=1 << 20, pre_buffer=False)) for f in names]
            schemas = [pf.schema_arrow for pf in opened]
            if not all(_streamable(s, schemas[0]) for s in schemas):
                opened = None
            else:  # every column but the embedding, read whole and joined as `_read_parquet` joins the files
                for f, pf in zip(names, opened, strict=True):
                    embedding_numbers(pf.metadata, f)  # before any is decoded
                others = pa.concat_tables([pf.read(columns=[c for c in s.names if c != "embedding"])
                                           for pf, s in zip(opened, schemas, strict=True)],
                                          promote_options="permissive")
        except (pa.ArrowException, OSError):  # not Parquet, or files that do not join
            opened = None
        if opened is not None:
            try:
                return _embedding_table(others, path, labelled,
                                        lambda: _stream_embeddings(opened, schemas[0].field("embedding").type, path))
            except (pa.ArrowException, OSError):  # a corrupt page: the whole-table reader's message
                pass
    return embedding_table_from_arrow(_read_parquet(path), path, labelled=labelled)


def _plain_parquet_files(path: PathLike) -> tuple[Any, list[str]] | None:
    """(filesystem or None, the Parquet files of the table at `path` in reading order), or None for anything
    `_read_parquet` reads otherwise or refuses: a missing path, an empty folder, a folder holding other files
    (remote) or special files (local)."""
    fs, p = filesystem_of(path)
    try:
        if fs is None:
            if not os.path.isdir(p):
                return (None, [p]) if os.path.isfile(p) else None
            files = sorted(str(f) for f in Path(p).rglob("*.parquet"))
            return (None, files) if files and all(os.path.isfile(f) for f in files) else None
        if not fs.exists(p):
            return None
        if not fs.isdir(p):
            return fs, [p]
        files = sorted(fs.find(p))  # the dataset `pq.read_table` reads: every file, in name order
        plain = all(f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith((".", "_")) for f in files)
        return (fs, files) if files and plain else None
    except OSError:
        return None


def _streamable(schema: pa.Schema, first: pa.Schema) -> bool:
    """Whether a file of this schema is read column by column: unique names, an id and a list-of-numbers
    embedding of the first file's type (anything else: the whole-table reader's message)."""
    names = schema.names
    if len(set(names)) != len(names) or "id" not in names or "embedding" not in names:
        return False
    t = schema.field("embedding").type
    return ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))
            and t == first.field("embedding").type)


def _stream_embeddings(files: list[pq.ParquetFile], t: pa.DataType, path: PathLike) -> np.ndarray:
    """The embedding column of `files` (one table, type `t`) as one float32 (N, d) array, N from the metadata,
    filled batch by batch (of about STREAM_FLOATS numbers). The checks are `_embeddings`' over the whole
    column: the first bad row of the first check (in its order) that any row fails."""
    n = sum(pf.metadata.num_rows for pf in files)
    if n == 0:
        return np.zeros((0, t.list_size if pa.types.is_fixed_size_list(t) else 0), np.float32)
    first: dict[int, RowError] = {}  # check (0 null row, 1 length, 2 empty, 3 null element, 4 value) -> first bad
    out = None
    dim = -1
    row = 0
    for pf in files:
        for batch in pf.iter_batches(batch_size=_batch_rows(pf), columns=["embedding"], use_threads=False):
            arr = batch.column(0)
            k = len(arr)
            if not k:
                continue
            if arr.null_count:  # nothing comes before it
                raise _bad(path, "embedding", row + _first_bad(arr.is_null().to_numpy(zero_copy_only=False)),
                           "embedding is null")
            lengths = pc.list_value_length(arr).to_numpy()
            if dim < 0:
                dim = int(lengths[0])
                if dim == 0:
                    first[2] = _bad(path, "embedding", 0, "embedding is empty")
            if 1 not in first and (lengths != dim).any():
                r = _first_bad(lengths != dim)
                first[1] = _bad(path, "embedding", row + r,
                                f"embedding has length {lengths[r]}, but row 0 has {dim} (all rows must match)")
            if not first.keys() & {1, 2, 3}:
                values = arr.flatten()  # respects offsets/slices; zero-copy
                if values.null_count:
                    flat = _first_bad(values.is_null().to_numpy(zero_copy_only=False))
                    first[3] = _bad(path, "embedding", row + flat // dim, f"element {flat % dim} of the embedding "
                                    "is null")
                elif not first:
                    emb = values.to_numpy(zero_copy_only=False).reshape(k, dim)
                    if (bad := first_bad_embedding(emb)) is not None:
                        first[4] = _bad(path, "embedding", row + bad[0], bad[1])
                    else:
                        if out is None:
                            out = np.empty((n, dim), np.float32)
                        out[row:row + k] = emb  # the cast to float32, as `_embeddings`' astype
            row += k
    if first:
        raise first[min(first)]
    return out


def _batch_rows(pf: pq.ParquetFile) -> int:
    """Rows of a batch of about STREAM_FLOATS numbers of the embedding column (from the metadata)."""
    meta = pf.metadata
    leaves = embedding_leaves(meta)
    values = sum(meta.row_group(g).column(i).num_values for g in range(meta.num_row_groups) for i in leaves)
    return max(1, min(ROW_GROUP_ROWS, STREAM_FLOATS * max(meta.num_rows, 1) // max(values, 1)))


def embedding_table_to_arrow(table: EmbeddingTable) -> pa.Table:
    emb = np.ascontiguousarray(table.embedding, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embedding must be (N, d), got shape {emb.shape}")
    n, d = emb.shape
    if len(table.ids) != n:
        raise ValueError(f"{len(table.ids)} ids but {n} embeddings")
    cols: dict[str, pa.Array] = {"id": pa.array(np.asarray(table.ids).astype(str), pa.string())}
    if table.lat is not None and table.lon is not None:
        cols["lat"] = pa.array(np.asarray(table.lat, np.float64))
        cols["lon"] = pa.array(np.asarray(table.lon, np.float64))
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)
    return pa.table(cols)


def _write_atomic(path: PathLike, write) -> None:
    """Write to a temporary sibling and rename, so an interrupted write never leaves a half file."""
    fs, p = filesystem_of(path)
    if fs is not None:
        write(p, fs)
        return
    if os.path.isdir(p):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if _special(p):  # /dev/stdout, a FIFO: written in place, never replaced by a regular file
        with reraise_for(path, what="table", writing=True):
            write(p, None)
        return
    Path(p).parent.mkdir(parents=True, exist_ok=True)
    storage.remove_stale_temporaries(p)
    tmp = f"{p}.tmp-{os.getpid()}"
    try:
        write(tmp, None)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_file_atomic(path: PathLike, data: bytes | str) -> None:
    """Write a whole output file (JSON, an image) so that `path` either holds all of it or is left as it
    was; a full disk is a DiskFullError naming `path`, and no partial or temporary file stays."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    data = data.encode() if isinstance(data, str) else data
    with reraise_for(path, what="output", writing=True):
        if _special(path):  # /dev/stdout, a FIFO: written in place, never replaced by a regular file
            with open(path, "wb") as f:
                f.write(data)
        else:
            storage.remove_stale_temporaries(str(path))
            storage.write_bytes_atomic(str(path), data)


def _special(path: PathLike) -> bool:
    """Whether a local path exists and is not a regular file (a device, a FIFO, a socket)."""
    p = os.fspath(path)
    return "://" not in str(p) and os.path.exists(p) and not os.path.isfile(p)


def finite_or_none(obj: Any) -> Any:
    """`obj` with NaN and infinities (in dicts, lists and tuples) as None: JSON null, not bare NaN."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any, **kw: Any) -> str:
    """Valid JSON for `obj` (non-finite numbers as null; anything else non-finite is refused)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kw)


def write_embeddings(path: PathLike, table: EmbeddingTable) -> None:
    """Write an embeddings table as Parquet (embedding as a fixed-size list of float32), in row groups of at
    most ROW_GROUP_ROWS rows."""
    at = embedding_table_to_arrow(table)
    _write_atomic(path, lambda p, fs: pq.write_table(at, p, filesystem=fs, row_group_size=ROW_GROUP_ROWS))


@dataclass
class PredictionTable:
    ids: np.ndarray  # (N,) object array of str
    lat: np.ndarray | None  # (N,) truth, float64 degrees; None for unlabelled data
    lon: np.ndarray | None
    pred_lat: np.ndarray  # (N,) float64 degrees
    pred_lon: np.ndarray
    method: np.ndarray | None = None  # (N,) object array of str
    confidence: np.ndarray | None = None  # (N,) float64
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return self.lat is not None and self.lon is not None


def _fmt(path: PathLike) -> str:
    suffix = str(path).lower().rsplit(".", 1)[-1] if "." in str(path) else ""
    if suffix in ("parquet", "pq"):
        return "parquet"
    if suffix == "csv":
        return "csv"
    raise ValueError(f"{path}: predictions file must end in .parquet or .csv")


def write_predictions(path: PathLike, ids: Any, lat: Any, lon: Any, pred_lat: Any, pred_lon: Any,
                      method: str | Any | None = None, confidence: Any | None = None,
                      extra: dict[str, Any] | None = None) -> None:
    """Write a predictions table (Parquet or CSV by extension). lat/lon (truth) may be None.

    `extra`: more columns (name -> N values), after the standard ones (e.g. `locdiff locate`'s place
    names and top-k modes); their names must not be those of the standard columns."""
    kind = _fmt(path)
    ids = np.asarray(ids).astype(str)
    n = len(ids)
    cols: dict[str, pa.Array] = {"id": pa.array(ids, pa.string())}
    if (lat is None) != (lon is None):
        raise ValueError(f"{path}: give both lat and lon (the truth) or neither")
    named = {"lat": lat, "lon": lon, "pred_lat": pred_lat, "pred_lon": pred_lon, "confidence": confidence}
    for name, values in named.items():
        if values is None:
            continue
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(arr) != n:
            raise ValueError(f"{path}: column {name!r} has {len(arr)} values for {n} ids")
        cols[name] = pa.array(arr)
    _check_coords(cols["pred_lat"].to_numpy(), cols["pred_lon"].to_numpy(), path, ("pred_lat", "pred_lon"))
    if method is not None:
        m = np.full(n, method, dtype=object) if isinstance(method, str) else np.asarray(method).astype(str)
        if len(m) != n:
            raise ValueError(f"{path}: column 'method' has {len(m)} values for {n} ids")
        cols["method"] = pa.array(m, pa.string())
    order = [c for c in ("id", "lat", "lon", "pred_lat", "pred_lon", "method", "confidence") if c in cols]
    for name, values in (extra or {}).items():
        if name in order or name in named:
            raise ValueError(f"{path}: extra column {name!r} is a standard column")
        arr = pa.array(list(values))
        if len(arr) != n:
            raise ValueError(f"{path}: column {name!r} has {len(arr)} values for {n} ids")
        cols[name] = arr
        order.append(name)
    at = pa.table({c: cols[c] for c in order})
    with reraise_for(path, what="table", writing=True):  # a full disk: one line naming the predictions file
        _write_predictions(path, kind, at)


def _write_predictions(path: PathLike, kind: str, at: pa.Table) -> None:
    if kind == "parquet":
        _write_atomic(path, lambda p, fs: pq.write_table(at, p, filesystem=fs))
    else:

        def w(p, fs):
            if fs is None:
                pcsv.write_csv(at, p)
            else:
                with fs.open(p, "wb") as f:
                    pcsv.write_csv(at, f)
        _write_atomic(path, w)


def read_predictions(path: PathLike) -> PredictionTable:
    """Read and validate a predictions table (Parquet or CSV by extension)."""
    kind = _fmt(path)
    if kind == "parquet":
        table = _read_parquet(path, max_rows=MAX_PREDICTION_ROWS)
    else:

        fs, p = filesystem_of(path)
        if fs is None and not os.path.exists(p):
            raise FileNotFoundError(f"{path}: no such file")
        if fs is None and os.path.isdir(p):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if fs is None and not os.path.isfile(p):  # a FIFO would block the reader, a device never end
            raise FileNotFoundError(f"{path}: not a regular file")
        opts = pcsv.ConvertOptions(column_types={"id": pa.string(), "method": pa.string()})

        def read(threads: bool = True) -> pa.Table:
            ro = pcsv.ReadOptions(use_threads=threads)
            if fs is None:
                return pcsv.read_csv(p, read_options=ro, convert_options=opts)
            with fs.open(p, "rb") as f:
                return pcsv.read_csv(f, read_options=ro, convert_options=opts)

        try:
            table = read()
        except pa.ArrowInvalid:
            try:  # once more in one thread, where pyarrow's message has the row number ("Row #3: ...")
                read(threads=False)
            except pa.ArrowInvalid as err1:
                err = err1
            except Exception:  # noqa: BLE001 - keep the first error
                pass
            raise ValueError(f"{path}: not a readable CSV predictions file: {err}") from err
    ids = _ids(_column(table, "id", path), path, unique=False)
    pred_lat = _float_column(_column(table, "pred_lat", path), "pred_lat", path)
    pred_lon = _float_column(_column(table, "pred_lon", path), "pred_lon", path)
    _check_coords(pred_lat, pred_lon, path, ("pred_lat", "pred_lon"))
    lat = lon = None
    if "lat" in table.column_names or "lon" in table.column_names:
        lat = _float_column(_column(table, "lat", path), "lat", path)
        lon = _float_column(_column(table, "lon", path), "lon", path)
        _check_coords(lat, lon, path)
    method = confidence = None
    if "method" in table.column_names:
        col = table.column("method")
        if col.null_count:  # the metrics group rows by method
            raise _bad(path, "method", _first_bad(col.is_null().to_numpy(zero_copy_only=False)), "method is null")
        method = col.to_numpy(zero_copy_only=False).astype(object)
    if "confidence" in table.column_names:
        c = table.column("confidence")
        confidence = (c.to_numpy(zero_copy_only=False).astype(np.float64) if pa.types.is_floating(c.type)
                      or pa.types.is_integer(c.type) or c.null_count == len(c) else None)
        if confidence is None:
            raise ValueError(f"{path}: column 'confidence' must be numeric, got {c.type}")
    return PredictionTable(ids=ids, lat=lat, lon=lon, pred_lat=pred_lat, pred_lon=pred_lon, method=method,
                           confidence=confidence, source=str(path))


__all__ = ["RowError", "read_embeddings", "write_embeddings", "embedding_table_from_arrow", "embedding_table_to_arrow",
           "PredictionTable", "write_predictions", "read_predictions"]
