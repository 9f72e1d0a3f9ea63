"""Labelled embeddings read piece by piece: the one reader of training and prediction data.

A *source* is what a user names: a feature-shard folder (ROOT/NAME/features/ENCODER, with its
manifest), an embeddings Parquet file or folder (local or s3://), or an in-memory EmbeddingTable. It is
read in *pieces* (a shard, a Parquet row group, or a row range of either), never as a whole unless asked
(`read_all`, for prediction and small tables). `open_source` opens any of them; `locdiff.data.stream`
turns a source into training batches.

A held-out validation share is a deterministic function of the row's global index (`split`), so the
training stream and the validation rows never overlap and are the same on every rank and every re-run.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from locdiff.data import manifest as mf
from locdiff.data import storage
from locdiff.data.features import read_feature_shard, to_float32
from locdiff.data.validation import ChecksumError, sha256_bytes
from locdiff.errors import UserError
from locdiff.hashing import stable_hash
from locdiff.io import RowError, embedding_table_from_arrow, filesystem_of, read_embeddings
from locdiff.tables import MAX_EMBED_DIM, EmbeddingTable, embedding_numbers

log = logging.getLogger(__name__)

PIECE_ROWS = 65_536  # larger shards / row groups are cut into row ranges of at most this many rows
WIDTH_ROWS = 16  # rows of a variable-size table decoded to learn its embeddings' width
MAX_READ_FLOATS = 1 << 28  # rows x dim of a table read whole (`read_table`: prediction inputs): 1 GiB of float32


@dataclass(frozen=True)
class Piece:
    """A unit of reading: rows [start, stop) of one shard / row group (`unit`), at global row `offset`."""

    url: str
    unit: int  # Parquet row group index; -1 for a shard or an in-memory table
    start: int
    stop: int
    offset: int  # global index of the piece's first row
    sha256: str | None = None  # of the whole shard (checked when read)
    bytes: int = 0  # of the whole shard as its manifest records (a larger file is refused unread); 0: unknown

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Rows:
    """A chunk of rows: ids (n,), lat/lon (n,) float64 or None, emb (n, d) float32, shdd (n, D) or None,
    index (n,) int64 global row indices."""

    ids: np.ndarray
    lat: np.ndarray | None
    lon: np.ndarray | None
    emb: np.ndarray
    shdd: np.ndarray | None
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray | slice) -> Rows:
        return Rows(self.ids[idx], None if self.lat is None else self.lat[idx],
                    None if self.lon is None else self.lon[idx], self.emb[idx],
                    None if self.shdd is None else self.shdd[idx], self.index[idx])

    @staticmethod
    def concat(parts: list[Rows], dim: int) -> Rows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Rows(np.zeros(0, object), np.zeros(0), np.zeros(0), np.zeros((0, dim), np.float32), None,
                        np.zeros(0, np.int64))
        cat = np.concatenate
        return Rows(cat([p.ids for p in parts]),
                    None if parts[0].lat is None else cat([p.lat for p in parts]),
                    None if parts[0].lon is None else cat([p.lon for p in parts]),
                    cat([p.emb for p in parts]),
                    None if any(p.shdd is None for p in parts) else cat([p.shdd for p in parts]),
                    cat([p.index for p in parts]))


def _mix(index: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (index, seed): a fixed pseudo-random uint64 per row."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Holdout:
    """Rows whose hash falls below `share` are validation rows (`keep="val"`), the rest training."""

    share: float
    seed: int = 0
    keep: str = "train"

    def mask(self, index: np.ndarray) -> np.ndarray:
        is_val = (_mix(index, self.seed) % np.uint64(1_000_000)) < np.uint64(round(self.share * 1_000_000))
        return is_val if self.keep == "val" else ~is_val


class DataSource(ABC):
    """Labelled (or unlabelled) embeddings readable piece by piece. Subclasses implement `_read_unit`
    and `identity`."""

    location: str = ""
    kind: str = ""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.dim: int = 0
        self.labelled: bool = True
        self.shdd_degree: int | None = None
        self.manifest: dict[str, Any] | None = None
        self.holdout: Holdout | None = None
        self._counts: dict[Piece, int] = {}

    # -- what it is ------------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Rows of this view (after the hold-out filter)."""
        return int(sum(self.rows_in(p) for p in self.pieces))

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What identifies the data for the completion key of a run (content, not path)."""

    def rows_in(self, piece: Piece) -> int:
        if self.holdout is None:
            return piece.rows
        if piece not in self._counts:
            idx = np.arange(piece.offset, piece.offset + piece.rows, dtype=np.int64)
            self._counts[piece] = int(self.holdout.mask(idx).sum())
        return self._counts[piece]

    def split(self, share: float, seed: int = 0) -> tuple[DataSource, DataSource]:
        """(training view, validation view) holding out `share` of the rows by a hash of their index."""
        if not 0 < share < 1:
            raise ValueError(f"validation share must be in (0, 1); got {share}")
        train, val = self._view(Holdout(share, seed, "train")), self._view(Holdout(share, seed, "val"))
        return train, val

    def _view(self, holdout: Holdout) -> DataSource:
        view = copy.copy(self)
        view.holdout = holdout
        view._counts = {}
        return view

    def describe(self) -> str:
        share = f", {self.holdout.keep} share of a {self.holdout.share:g} hold-out" if self.holdout else ""
        return f"{self.location} ({self.kind}{share})"

    # -- reading ---------------------------------------------------------------------------------------------
    @abstractmethod
    def _read_unit(self, piece: Piece) -> Rows:
        """All rows of the piece (before the hold-out filter)."""

    def read(self, piece: Piece) -> Rows:
        """The piece's rows (after the hold-out filter), embeddings as float32."""
        rows = self._read_unit(piece)
        if len(rows) != piece.rows:
            raise ValueError(f"{piece.url}: {len(rows)} rows, expected {piece.rows} (the data changed while "
                             "reading; re-run the stage that wrote it)")
        if self.holdout is not None:
            rows = rows.take(self.holdout.mask(rows.index))
        return rows

    def iter_rows(self, pieces: list[Piece] | None = None) -> Iterator[Rows]:
        for piece in self.pieces if pieces is None else pieces:
            rows = self.read(piece)
            if len(rows):
                yield rows

    def read_all(self, limit: int | None = None) -> EmbeddingTable:
        """The rows as one EmbeddingTable (for prediction and small tables); at most `limit` rows, read
        in order."""
        parts, n = [], 0
        for rows in self.iter_rows():
            parts.append(rows)
            n += len(rows)
            if limit is not None and n >= limit:
                break
        r = Rows.concat(parts, self.dim)
        if limit is not None:
            r = r.take(slice(0, limit))
        return EmbeddingTable(ids=r.ids.astype(object), lat=r.lat if self.labelled else None,
                              lon=r.lon if self.labelled else None, embedding=r.emb, source=self.location)

    def embedding_stats(self, max_rows: int = 65_536, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std per dimension from up to max_rows rows of seeded pieces (float64 sums): what the
        model standardises embeddings with. Bounded memory; every rank computes the same numbers."""
        order = np.random.default_rng(seed).permutation(len(self.pieces))
        s1 = np.zeros(self.dim)
        s2 = np.zeros(self.dim)
        n = 0
        for i in order:
            rows = self.read(self.pieces[int(i)])
            if not len(rows):
                continue
            e = rows.emb[: max_rows - n].astype(np.float64)
            s1 += e.sum(0)
            s2 += (e * e).sum(0)
            n += len(e)
            if n >= max_rows:
                break
        if n == 0:
            raise ValueError(f"{self.describe()}: no rows")
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0) * n / max(n - 1, 1)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def locations(self, max_rows: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """lat, lon of every row (or of a seeded subsample of about max_rows rows): 16 bytes a row."""
        if not self.labelled:
            raise ValueError(f"{self.describe()}: no lat/lon")
        keep = 1.0 if max_rows is None or self.count <= max_rows else max_rows / self.count
        lats, lons = [], []
        for rows in self.iter_rows():
            if keep < 1.0:
                sel = (_mix(rows.index, seed + 17) % np.uint64(1 << 30)) < np.uint64(int(keep * (1 << 30)))
                rows = rows.take(sel)
            lats.append(rows.lat)
            lons.append(rows.lon)
        return (np.concatenate(lats) if lats else np.zeros(0)), (np.concatenate(lons) if lons else np.zeros(0))


def _cut(url: str, unit: int, n: int, offset: int, sha256: str | None, max_rows: int, size: int = 0) -> list[Piece]:
    out, start = [], 0
    while start < n:
        stop = min(n, start + max_rows)
        out.append(Piece(url, unit, start, stop, offset + start, sha256, size))
        start = stop
    return out


class ShardSource(DataSource):
    """A complete features stage (ROOT/NAME/features/ENCODER): its manifest lists the shards."""

    kind = "feature shards"

    def __init__(self, folder: str, *, piece_rows: int = PIECE_ROWS) -> None:
        super().__init__()
        self.location = str(folder).rstrip("/")
        self.manifest = mf.require_manifest(self.location, "embed")
        self.dim = mf.embedding_dim(self.manifest, self.location)
        self.shdd_degree = (self.manifest.get("shdd") or {}).get("degree")
        offset = 0
        for entry in mf.shard_entries(self.manifest, self.location):
            n = entry["count"]
            url = storage.join(self.location, entry["shard"])
            self.pieces += _cut(url, -1, n, offset, entry["sha256"], piece_rows, entry["bytes"])
            offset += n
        self._cache: tuple[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        m = self.manifest
        content = [[s["sha256"], s["count"]] for s in m["shards"]]
        return {"kind": "features", "sha256": stable_hash([content, m.get("encoder"), m.get("shdd")]),
                "count": m["count"], "holdout": None if self.holdout is None else vars(self.holdout)}

    def _shard(self, piece: Piece) -> dict[str, Any]:
        """The parsed shard (the last one is cached: a shard cut into pieces is read once)."""
        with self._lock:
            if self._cache is not None and self._cache[0] == piece.url:
                return self._cache[1]
        data = mf.read_shard_bytes(piece.url, {"bytes": piece.bytes})
        if piece.sha256 and sha256_bytes(data) != piece.sha256:
            raise ChecksumError(f"{piece.url}: sha256 differs from the manifest's (damaged or rewritten shard); "
                                "re-run `locdiff data embed`")
        parsed = read_feature_shard(data, piece.url)
        with self._lock:
            self._cache = (piece.url, parsed)
        return parsed

    def _read_unit(self, piece: Piece) -> Rows:
        part = self._shard(piece)
        sl = slice(piece.start, piece.stop)
        emb = part["emb"][sl] if part["emb"] is not None else np.zeros((0, self.dim), np.float32)
        if emb.shape[1:] != (self.dim,):
            raise ValueError(f"{piece.url}: embeddings of shape {emb.shape[1:]}, the manifest says {self.dim}")
        shdd = part["shdd"][sl] if part["shdd"] is not None else None
        return Rows(np.asarray(part["ids"][sl], dtype=object), part["lat"][sl], part["lon"][sl],
                    to_float32(emb), None if shdd is None else shdd.astype(np.float32, copy=False),
                    np.arange(piece.offset, piece.offset + piece.rows, dtype=np.int64))


class ParquetSource(DataSource):
    """An embeddings table (README "Formats"): one Parquet file or a folder of them, local or fsspec URL.
    Pieces are row groups (cut into row ranges when large); each is validated as it is read."""

    kind = "embeddings table"

    def __init__(self, path: str, *, labelled: bool | None = None, piece_rows: int = PIECE_ROWS) -> None:
        super().__init__()
        self.location = str(path)
        fs, p = filesystem_of(path)
        self._fs = fs
        if fs is None:
            local = Path(p)
            if not local.exists():
                raise FileNotFoundError(f"{path}: no such file or folder")
            files = sorted(str(f) for f in local.rglob("*.parquet") if f.is_file()) if local.is_dir() else [str(local)]
            if not local.is_dir() and not local.is_file():  # a FIFO would block the reader, a device never end
                raise ValueError(f"{path}: not a regular file or folder")
        else:
            if not fs.exists(p):
                raise FileNotFoundError(f"{path}: no such file or folder")
            files = sorted(f for f in fs.find(p) if f.endswith(".parquet")) if fs.isdir(p) else [p]
        if not files:
            raise ValueError(f"{path}: folder holds no .parquet files")
        offset = 0
        self._files: list[tuple[str, Any]] = []
        self._group_rows: dict[tuple[str, int], int] = {}
        names = None
        width: tuple[str, int] | None = None  # the first file with a fixed-size embedding: (file, width)
        self.values = 0  # numbers in the embedding column, from the metadata
        for f in files:
            try:
                meta = pq.ParquetFile(f if fs is None else fs.open(f, "rb")).metadata
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a non-Parquet file
                raise ValueError(f"{f}: not a readable Parquet file: {err}") from None
            schema = meta.schema.to_arrow_schema()
            names = schema.names
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{f}: column {twice[0]!r} appears {names.count(twice[0])} times; keep one")
            if "embedding" not in names or "id" not in names:
                raise ValueError(f"{f}: missing column {'id' if 'id' not in names else 'embedding'!r} "
                                 f"(columns: {', '.join(names)})")
            self.values += embedding_numbers(meta, f)  # before any row group is decoded
            size = getattr(schema.field("embedding").type, "list_size", -1)
            if size > 0 and width is not None and size != width[1]:  # the rows of all files are one table
                raise ValueError(f"{f}: embeddings of width {size}, but {width[0]} has {width[1]}; the files of "
                                 f"{path} must all have one embedding width (one encoder)")
            if size > 0 and width is None:
                width = (f, size)
            in_file = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                self.pieces += _cut(f, g, n, offset, None, piece_rows)
                self._group_rows[(f, g)] = in_file  # the group's first row in its file (for messages)
                offset += n
                in_file += n
            self._files.append((f, meta))
        has = {"lat", "lon"} <= set(names or [])
        if labelled and not has:
            raise ValueError(f"{path}: missing column {'lat' if 'lat' not in names else 'lon'!r} (columns: "
                             f"{', '.join(names)})")
        self.labelled = has if labelled is None else bool(labelled)
        self._cache: tuple[tuple[str, int], Any] | None = None
        if width is not None:
            self._dim_from, self.dim = width
        else:  # variable-size lists: the first row's length (every read checks every row's)
            width = self._first_width(self.pieces[0]) if self.pieces else None
            first = self._read_unit(self.pieces[0]) if self.pieces and width is None else None
            self._dim_from = self.pieces[0].url if self.pieces else self.location
            self.dim = width if width is not None else first.emb.shape[1] if first is not None else 0

    def _first_width(self, piece: Piece) -> int | None:
        """The length of the piece's first embedding, decoding WIDTH_ROWS rows only, not the row group; None
        where they show none (a null or empty first row, a type not a list, an unreadable file: the full
        read names the problem)."""
        try:
            with pq.ParquetFile(piece.url if self._fs is None else self._fs.open(piece.url, "rb"),
                                buffer_size=1 << 20, pre_buffer=False) as pf:  # the column chunk not read whole
                batch = next(pf.iter_batches(batch_size=WIDTH_ROWS, row_groups=[piece.unit], columns=["embedding"],
                                             use_threads=False), None)
        except Exception:  # noqa: BLE001 - pyarrow raises several types; `_read_unit` names the file
            return None
        col = None if batch is None else batch.column(0)
        if col is None or not len(col) or not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) \
                or not (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)):
            return None
        width = pc.list_value_length(col)[0].as_py()
        return width or None

    def identity(self) -> dict[str, Any]:
        """Content hash of the files (streamed; a 100 MB table takes well under a second)."""
        h = hashlib.sha256()
        for f, _ in self._files:
            opener = open(f, "rb") if self._fs is None else self._fs.open(f, "rb")  # noqa: SIM115
            with opener as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(block)
        return {"kind": "table", "sha256": h.hexdigest(), "count": sum(p.rows for p in self.pieces),
                "holdout": None if self.holdout is None else vars(self.holdout)}

    def _read_unit(self, piece: Piece) -> Rows:
        key = (piece.url, piece.unit)
        if self._cache is not None and self._cache[0] == key:
            table = self._cache[1]
        else:
            cols = ["id", "embedding"] + (["lat", "lon"] if self.labelled else [])
            try:
                pf = pq.ParquetFile(piece.url if self._fs is None else self._fs.open(piece.url, "rb"))
                table = pf.read_row_group(piece.unit, columns=cols)
            except Exception as err:  # noqa: BLE001 - name the file, whatever pyarrow raised
                raise ValueError(f"{piece.url}: cannot read row group {piece.unit}: {err}") from None
            self._cache = (key, table)
        try:
            t = embedding_table_from_arrow(table.slice(piece.start, piece.rows), piece.url,
                                           labelled=True if self.labelled else False)
        except RowError as err:  # name the row by its place in the file, not in this slice
            raise err.moved(piece.url, self._group_rows.get((piece.url, piece.unit), 0) + piece.start) from None
        if self.dim and t.embedding.shape[1] != self.dim:  # variable-size lists: the width shows when read
            raise ValueError(f"{piece.url}: embeddings of width {t.embedding.shape[1]}, but {self._dim_from} has "
                             f"{self.dim}; the files of {self.location} must all have one embedding width (one "
                             "encoder)")
        return Rows(t.ids, t.lat, t.lon, t.embedding, None,
                    np.arange(piece.offset, piece.offset + piece.rows, dtype=np.int64))


class TableSource(DataSource):
    """An in-memory EmbeddingTable read in row ranges (tests, benchmarks, the Python API)."""

    kind = "in-memory table"

    def __init__(self, table: EmbeddingTable, *, piece_rows: int = 8192) -> None:
        super().__init__()
        self.table = table
        self.location = table.source or "<table>"
        self.dim = table.dim
        self.labelled = table.labelled
        self.pieces = _cut(self.location, -1, len(table), 0, None, piece_rows)

    def identity(self) -> dict[str, Any]:
        h = hashlib.sha256(np.ascontiguousarray(self.table.embedding).tobytes())
        if self.table.labelled:
            h.update(np.ascontiguousarray(self.table.lat, np.float64).tobytes())
            h.update(np.ascontiguousarray(self.table.lon, np.float64).tobytes())
        h.update("\n".join(map(str, self.table.ids)).encode())
        return {"kind": "table", "sha256": h.hexdigest(), "count": len(self.table),
                "holdout": None if self.holdout is None else vars(self.holdout)}

    def _read_unit(self, piece: Piece) -> Rows:
        t, sl = self.table, slice(piece.start, piece.stop)
        return Rows(np.asarray(t.ids[sl], dtype=object), None if t.lat is None else t.lat[sl],
                    None if t.lon is None else t.lon[sl], np.asarray(t.embedding[sl], dtype=np.float32), None,
                    np.arange(piece.offset, piece.offset + piece.rows, dtype=np.int64))


def open_source(data: str | EmbeddingTable | DataSource, *, labelled: bool | None = None) -> DataSource:
    """The one entry point: a features folder (has manifest.json), a Parquet file/folder, an s3:// or other
    fsspec URL of either, an EmbeddingTable, or a source (returned as is)."""
    if isinstance(data, DataSource):
        src: DataSource = data
    elif isinstance(data, EmbeddingTable):
        src = TableSource(data)
    else:
        path = str(data)
        if not path.endswith(".parquet") and storage.exists(mf.manifest_path(path)):
            src = ShardSource(path)
        else:
            src = ParquetSource(path, labelled=labelled)
    if labelled and not src.labelled:
        raise ValueError(f"{src.location}: training needs lat and lon")
    if src.dim > MAX_EMBED_DIM:
        raise UserError(f"{src.location}: embeddings of dimension {src.dim:,}, above the limit of {MAX_EMBED_DIM:,}; "
                        "embed the images with a supported encoder")
    return src


def read_table(data: str | EmbeddingTable, *, labelled: bool | None = None) -> EmbeddingTable:
    """The whole source as one table (prediction inputs, small data)."""
    if isinstance(data, EmbeddingTable):
        return data
    src = open_source(data, labelled=labelled)
    if src.count * max(src.dim, 1) > MAX_READ_FLOATS:  # from the metadata, before any row is read
        raise UserError(f"{src.location}: {src.count:,} rows of {src.dim:,} floats, above the {MAX_READ_FLOATS:,} "
                        "a table read whole may hold; split it into smaller tables")
    if isinstance(src, ParquetSource) and src.values > MAX_READ_FLOATS:  # rows of lists longer than the first's
        raise UserError(f"{src.location}: {src.count:,} rows holding {src.values:,} embedding numbers, above the "
                        f"{MAX_READ_FLOATS:,} a table read whole may hold; split it into smaller tables")
    if isinstance(src, ParquetSource):  # the full reader also checks ids across the whole file
        return read_embeddings(data, labelled=labelled)
    return src.read_all()
