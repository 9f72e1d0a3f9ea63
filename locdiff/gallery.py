"""The retrieval gallery: a faiss index over a training set's embeddings, stored once per data set.

LocDiff-H and the knn baseline retrieve the training entries most similar to a query embedding. The
gallery holds the L2-normalised embeddings in a faiss index (cosine similarity = inner product) and the
entries' lat/lon (float64) and ids, addressable by the indices `search` returns. How the index is built
from a stream of chunks, and the settings that decide it (`GalleryConfig`): `locdiff.gallery_build`.

On disk (a local folder or an s3:// prefix, through `locdiff.data.storage`):

    LOCATION/gallery.json            count, dim, index type and parameters, the data source's identity,
                                     and the path, size and sha256 of every file below; written last
    LOCATION/data-<12 hex digits>/   one folder per build (a unique name: concurrent builders never
        index.faiss                  write the same file; whichever gallery.json lands last wins, and it
        lat.npy, lon.npy             names a complete folder)
        ids.npy                      fixed-width unicode, no pickle

A gallery is complete exactly when gallery.json exists. `save` returns a reference
`{"uri": LOCATION, "sha256": <sha256 of gallery.json>}` that a run stores instead of a copy;
`Gallery.load(uri, sha256)` verifies gallery.json against it and every file against gallery.json before
deserialising anything. `get_or_build` reuses a complete gallery built from the same source identity with
the same build settings, else builds and saves one; `gallery_for(source)` does it all for a features
folder (ROOT/NAME/features/ENCODER, gallery in its `gallery/` subfolder) or an embeddings Parquet table
(`T.parquet`, gallery in the sibling folder `T.gallery/`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fsspec.asyn
import numpy as np

from locdiff.data import storage
from locdiff.data.datasource import DataSource, ParquetSource, ShardSource, open_source
from locdiff.gallery_build import (
    Chunk,
    ChunkSource,
    GalleryConfig,
    array_chunks,
    build_index,
    faiss_module,
    table_chunks,
)
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)

GALLERY_JSON = "gallery.json"
FORMAT_VERSION = 1
MAX_GALLERY_JSON_BYTES = 16 << 20
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"  # in the names of a save's scratch folder
FILES = {"index": "index.faiss", "lat": "lat.npy", "lon": "lon.npy", "ids": "ids.npy"}


def _strip(path: str) -> str:
    return path.rstrip("/")


class Gallery:
    """A faiss index over unit-norm embeddings plus the entries' lat, lon and ids."""

    def __init__(self, index: Any, lat: np.ndarray, lon: np.ndarray, ids: np.ndarray | None = None, *,
                 info: dict[str, Any] | None = None, nprobe: int | None = None,
                 ids_loader: Callable[[], np.ndarray] | None = None, reference: dict[str, str] | None = None):
        self.index = index
        self.lat = np.asarray(lat, dtype=np.float64)
        self.lon = np.asarray(lon, dtype=np.float64)
        self._ids = None if ids is None else np.asarray(ids)
        self._ids_loader = ids_loader
        self.info: dict[str, Any] = dict(info or {})
        self._reference = dict(reference) if reference else None
        if index.ntotal != len(self.lat) or len(self.lat) != len(self.lon):
            raise ValueError(f"gallery: index holds {index.ntotal} entries, lat {len(self.lat)}, "
                             f"lon {len(self.lon)}")
        self._ivf = faiss_module().try_extract_index_ivf(index)  # None for a flat index
        self.nprobe = int(nprobe or self.info.get("search", {}).get("nprobe") or GalleryConfig.nprobe)

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def kind(self) -> str:
        return str(self.info.get("build", {}).get("index") or ("flat" if self._ivf is None else "ivf"))

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = max(1, int(value))
        if self._ivf is not None:
            self._ivf.nprobe = min(self._nprobe, self._ivf.nlist)

    @property
    def ids(self) -> np.ndarray:
        """(M,) str ids; read (and verified) on first use when the gallery was loaded."""
        if self._ids is None:
            if self._ids_loader is None:
                raise ValueError("gallery: no ids")
            self._ids = self._ids_loader()
            if len(self._ids) != len(self):
                raise ValueError(f"gallery: {len(self._ids)} ids for {len(self)} entries")
        return self._ids

    def reference(self) -> dict[str, str] | None:
        """{"uri", "sha256"} of the stored gallery this one was saved to or loaded from, else None."""
        return dict(self._reference) if self._reference else None

    # ------------------------------------------------------------------ search
    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cosine similarity: (similarity (N, k) float32, index (N, k) int64), best first.

        Exact for a flat index. For an IVF index the similarities come from the stored codes (fp16:
        within about 1e-3 of the exact cosine, SQ8 about 1e-2), and rows that `nprobe` lists cannot fill
        are searched again with more lists, so every returned index is a valid entry.
        """
        faiss = faiss_module()
        q = np.array(query, dtype=np.float32, order="C", copy=True)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query embeddings of shape {q.shape}, the gallery has dimension {self.dim}")
        finite = np.isfinite(q).all(axis=1)
        if not finite.all():
            raise ValueError(f"query {int(np.argmin(finite))} has a NaN or infinite embedding")
        k = min(int(k), len(self))
        if k < 1 or len(q) == 0:
            return np.zeros((len(q), max(k, 0)), np.float32), np.zeros((len(q), max(k, 0)), np.int64)
        faiss.normalize_L2(q)
        sim, idx = self.index.search(q, k)
        if self._ivf is not None:
            missing = np.flatnonzero((idx < 0).any(axis=1))
            nprobe = self._ivf.nprobe
            while len(missing) and nprobe < self._ivf.nlist:
                nprobe = min(self._ivf.nlist, nprobe * 4)
                params = faiss.SearchParametersIVF(nprobe=nprobe)
                s2, i2 = self.index.search(q[missing], k, params=params)
                sim[missing], idx[missing] = s2, i2
                missing = missing[(i2 < 0).any(axis=1)]
        return sim.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_arrays(cls, embedding: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                    ids: Sequence[str] | np.ndarray | None = None, *, config: GalleryConfig | None = None,
                    chunk_rows: int = 65536, source: dict[str, Any] | None = None) -> Gallery:
        """A gallery of in-memory arrays (built through the same chunked path)."""
        embedding = np.asarray(embedding)
        n = len(embedding)
        ids = np.arange(n).astype(str) if ids is None else np.asarray(ids)
        return cls.build(lambda: array_chunks(embedding, lat, lon, ids, chunk_rows), count=n, config=config,
                         source=source)

    @classmethod
    def build(cls, chunks: ChunkSource | Iterable[Chunk], *, count: int | None = None,
              config: GalleryConfig | None = None, source: dict[str, Any] | None = None,
              progress: bool = False) -> Gallery:
        """Build from chunks (embedding (n, d), lat (n,), lon (n,), ids (n,)).

        Args:
            chunks: a function returning a fresh iterator of chunks (needed for the uniform training
                sample and exact list allocation of an IVF index; it must yield the same rows each
                call), or a one-shot iterable.
            count: the number of entries (from the manifest or the Parquet metadata); a mismatch is a
                ValueError. When None, a re-iterable source is counted in one extra pass.
            source: the data's identity, recorded in gallery.json (see `source_identity`).
        """
        config = config or GalleryConfig()
        if count is None:
            if not callable(chunks):
                raise ValueError("gallery: a one-shot chunk iterator needs count=")
            count = sum(len(c[0]) for c in chunks())
        if count < 1:
            raise ValueError("gallery: the source has no entries")
        params = config.build_params(count)
        log.info("building a %s gallery of %d entries (%s)", params["index"], count, params["factory"])
        index, lat, lon, ids = build_index(chunks, count, params, progress)
        info = {"count": count, "dim": int(index.d), "build": params, "search": {"nprobe": config.nprobe},
                "source": source or {}}
        return cls(index, lat, lon, ids, info=info, nprobe=config.nprobe)

    # ------------------------------------------------------------------ storage
    def save(self, location: str) -> dict[str, str]:
        """Write the gallery to a local folder or s3:// prefix; gallery.json last. Returns the reference
        {"uri": location, "sha256": <sha256 of gallery.json>}."""
        faiss = faiss_module()
        location = _strip(str(location))
        data_dir = f"data-{uuid.uuid4().hex[:12]}"
        # This save's own scratch folder: a shared one could be removed by a concurrent builder that
        # finished first (seen: faiss could not open its file for writing).
        if storage.is_remote(location):
            scratch_parent = storage.local_tmp_dir(location)
        else:
            os.makedirs(location, exist_ok=True)
            scratch_parent = location
            _remove_killed_saves(location)
        # named by this host and process until gallery.json is written: a save killed on the way is known by it
        tmp_root = tempfile.mkdtemp(prefix=f".tmp-{data_dir}-{_HOST}-{os.getpid()}-", dir=scratch_parent)
        files: dict[str, dict[str, Any]] = {}

        def put(key: str, write: Callable[[str], None]) -> None:
            tmp = os.path.join(tmp_root, f"{FILES[key]}.tmp")
            try:
                write(tmp)
                files[key] = {"path": f"{data_dir}/{FILES[key]}", "bytes": os.path.getsize(tmp),
                              "sha256": storage.file_sha256(tmp)}
                storage.put_file_atomic(tmp, storage.join(location, data_dir, FILES[key]))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

        try:
            put("index", lambda p: faiss.write_index(self.index, p))  # streamed to the file, no second copy
            for key, arr in (("lat", self.lat), ("lon", self.lon), ("ids", self.ids)):
                put(key, lambda p, a=arr: _save_npy(p, a))
            meta = dict(self.info)
            meta.update({"format_version": FORMAT_VERSION, "count": len(self), "dim": self.dim,
                         "files": files, "software": _software()})
            meta.setdefault("search", {})["nprobe"] = self.nprobe
            data = _dumps(meta)
            storage.write_bytes_atomic(storage.join(location, GALLERY_JSON), data)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
        ref = {"uri": location, "sha256": hashlib.sha256(data).hexdigest()}
        self.info, self._reference = meta, ref
        log.info("saved the %s gallery of %d entries to %s", self.kind, len(self), location)
        return ref

    @classmethod
    def load(cls, uri: str | dict[str, str], sha256: str | None = None, *, nprobe: int | None = None,
             progress: bool = False) -> Gallery:
        """Load a saved gallery (a location, or a reference dict from `save`), verifying gallery.json
        against `sha256` when given and every file against gallery.json before deserialising it.

        Raises:
            FileNotFoundError: no gallery.json at the location (no complete gallery there).
            ValueError: one line naming the file whose size or sha256 differs, or a malformed gallery.json.
        """
        faiss = faiss_module()
        if isinstance(uri, dict):
            uri, sha256 = uri["uri"], sha256 or uri.get("sha256")
        location = _strip(str(uri))
        meta, digest = _read_gallery_json(location)
        gj = storage.join(location, GALLERY_JSON)
        if sha256 and digest != sha256.lower():
            raise ValueError(f"{gj}: sha256 {digest} differs from the recorded {sha256} (the gallery was "
                             "rebuilt or changed); rebuild it or train the run again")
        files = meta["files"]
        with _fetched(location, files["index"]) as path:
            try:
                # memory-mapped: the stored vectors stay in the file (page cache) instead of a copy the size of
                # the gallery, and a crafted file claiming more bytes than it holds is refused unallocated
                index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
            except RuntimeError as err:  # a file faiss cannot parse (it checks the index type first)
                raise ValueError(f"{storage.join(location, files['index']['path'])}: not a readable faiss index "
                                 f"({str(err).splitlines()[0][-160:]}); rebuild the gallery") from None
        if index.ntotal != meta["count"] or index.d != meta["dim"]:
            raise ValueError(f"{storage.join(location, files['index']['path'])}: {index.ntotal} entries of "
                             f"dimension {index.d}, gallery.json says {meta['count']} of {meta['dim']}")
        lat = _load_npy(location, files["lat"], (meta["count"],), "f")
        lon = _load_npy(location, files["lon"], (meta["count"],), "f")
        ref = {"uri": location, "sha256": digest}
        return cls(index, lat, lon, info=meta, nprobe=nprobe, reference=ref,
                   ids_loader=lambda: _load_npy(location, files["ids"], (meta["count"],), "U"))


def gallery_location(source: DataSource, fallback: str | None = None) -> str:
    """Canonical gallery location of a training source (locdiff.data.datasource): FEATURES/gallery for a
    features folder, T.gallery beside a Parquet table T.parquet (or a folder T of them), `fallback` (the
    run folder's gallery/) for an in-memory table. A held-out view gets its own subfolder: the gallery
    holds training rows only, never the validation rows chosen on."""
    if isinstance(source, ShardSource):
        loc = storage.join(source.location, "gallery")
    elif isinstance(source, ParquetSource):
        base = _strip(source.location)
        loc = (base[: -len(".parquet")] if base.endswith(".parquet") else base.rstrip("/")) + ".gallery"
    elif fallback is not None:
        loc = fallback
    else:
        raise ValueError(f"{source.location}: an in-memory table needs a gallery location")
    h = source.holdout
    if h is not None:
        loc = storage.join(loc, f"{h.keep}-share{h.share:g}-seed{h.seed}")
    return loc


def get_or_build(source_identity: dict[str, Any], location: str, chunks_fn: ChunkSource, *,
                 count: int | None = None, config: GalleryConfig | None = None,
                 progress: bool = False) -> tuple[Gallery, dict[str, str]]:
    """The complete gallery at `location` when it was built from `source_identity` with `config`'s build
    settings, else a new one built from `chunks_fn()` and saved there. Returns (gallery, reference).

    Concurrent callers do not corrupt each other: each writes its own data folder and gallery.json
    last; the last one written is the gallery. A gallery replaced for a changed source has its data
    folder removed after the new gallery.json is written.
    """
    config = config or GalleryConfig()
    location = _strip(str(location))
    stale: dict[str, Any] | None = None
    try:
        meta, _ = _read_gallery_json(location)
    except FileNotFoundError:
        meta = None
    except ValueError as err:
        log.warning("%s; rebuilding the gallery", err)
        meta = None
    if meta is not None:
        want = config.build_params(meta["count"])
        if meta.get("source") == source_identity and meta.get("build") == want and \
                (count is None or count == meta["count"]):
            try:
                g = Gallery.load(location, nprobe=config.nprobe, progress=progress)
                log.info("reusing the gallery at %s", location)
                return g, g.reference() or {}
            except ValueError as err:
                log.warning("%s; rebuilding the gallery", err)
        else:
            stale = meta
            log.info("the gallery at %s was built from another source or with other settings; rebuilding",
                     location)
    g = Gallery.build(chunks_fn, count=count, config=config, source=source_identity, progress=progress)
    ref = g.save(location)
    if stale is not None:
        old = {posixpath.dirname(f["path"]) for f in stale.get("files", {}).values()}
        new = {posixpath.dirname(f["path"]) for f in g.info["files"].values()}
        for d in old - new:
            if _safe_relpath(d):
                storage.remove(storage.join(location, d))
    return g, ref


def _writable(location: str) -> bool:
    if storage.is_remote(location):
        return True
    parent = location
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip("/")) or "."
    return os.access(parent, os.W_OK)


def gallery_for(data: str | EmbeddingTable | DataSource, config: GalleryConfig | None = None, *,
                location: str | None = None, fallback: str | None = None,
                progress: bool = False) -> tuple[Gallery, dict[str, str]]:
    """The gallery of a training data set (anything `locdiff.data.datasource.open_source` opens, a held-out
    view included), built once and reused while its content and build settings are the same. Stored
    at `gallery_location` (or `fallback`, e.g. the run folder, when that place is not writable)."""
    source = open_source(data, labelled=True)
    loc = location or gallery_location(source, fallback)
    if location is None and fallback is not None and not _writable(loc):
        log.warning("%s is not writable; the gallery goes to %s", loc, fallback)
        loc = fallback

    def chunks() -> Iterator[Chunk]:
        for rows in source.iter_rows():
            yield rows.emb, rows.lat, rows.lon, rows.ids.astype(str)

    return get_or_build(source.identity(), loc, chunks, count=source.count, config=config, progress=progress)


def gallery_for_run(data: str | EmbeddingTable | DataSource, run_dir: str | os.PathLike,
                    config: GalleryConfig | None = None, *, progress: bool = False) -> tuple[Gallery, dict[str, str]]:
    """`gallery_for` for a run that records the gallery in its model.json: the gallery is built or reused at
    `gallery_location` (the run folder's gallery/ when that is not writable), and a gallery on remote storage
    (s3://) is also saved into the run folder's gallery/, because a run's references stay on local disk
    (`locdiff.runs.resolve_reference` refuses every URL scheme). The reference's uri is relative to the run
    folder when the gallery lies inside it (the run can be moved), else an absolute local path."""
    root = os.path.abspath(os.fspath(run_dir))
    inside = os.path.join(root, "gallery")
    g, ref = gallery_for(data, config, fallback=inside, progress=progress)
    if storage.is_remote(ref["uri"]):
        log.info("the gallery at %s is remote; the run keeps a copy in %s", ref["uri"], inside)
        ref = g.save(inside)
        keep = {posixpath.dirname(f["path"]) for f in g.info["files"].values()}
        for name in os.listdir(inside):  # the copies of earlier finalizes of this run (a resume)
            if name.startswith("data-") and name not in keep:
                shutil.rmtree(os.path.join(inside, name), ignore_errors=True)
    uri = os.path.abspath(ref["uri"])
    if os.path.commonpath([uri, root]) == root:
        uri = os.path.relpath(uri, root)
    return g, {**ref, "uri": uri}


# ---------------------------------------------------------------------- file helpers
def _remove_killed_saves(location: str) -> None:
    """Remove what saves killed on the way left in a local gallery folder: their scratch folder (which names
    this host and a process that no longer runs) and their data folder, unless gallery.json names it. Each
    kill would otherwise leave a partial or unreferenced index (the data set's size) for good."""
    named: set[str] | None = None
    for name in sorted(os.listdir(location)):
        m = re.fullmatch(r"\.tmp-(data-[0-9a-f]{12})-(.+)-(\d+)-[^-]*", name)
        if m is None or m.group(2) != _HOST or storage.process_running(int(m.group(3))):
            continue
        if named is None:
            try:
                named = {posixpath.dirname(f["path"]) for f in _read_gallery_json(location)[0]["files"].values()}
            except (FileNotFoundError, ValueError):
                named = set()
        if m.group(1) not in named:
            shutil.rmtree(os.path.join(location, m.group(1)), ignore_errors=True)
        shutil.rmtree(os.path.join(location, name), ignore_errors=True)


def _dumps(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _software() -> dict[str, str]:
    faiss = faiss_module()
    return {"faiss": str(faiss.__version__), "numpy": np.__version__}


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


def _safe_relpath(p: str) -> bool:
    return bool(p) and not p.startswith("/") and "\\" not in p and \
        all(part not in ("", ".", "..") for part in p.split("/"))


def _read_gallery_json(location: str) -> tuple[dict[str, Any], str]:
    """(parsed gallery.json, its sha256); FileNotFoundError when absent, ValueError when malformed."""
    path = storage.join(location, GALLERY_JSON)
    fs, p = storage.filesystem(path)
    try:
        size = fs.size(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no gallery here (gallery.json is written last; build it first)") \
            from None
    if size is not None and size > MAX_GALLERY_JSON_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than a gallery.json holds; not a gallery")
    data = storage.read_bytes(path)
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rebuild the gallery") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a gallery of format version {FORMAT_VERSION}; rebuild the gallery")
    files = meta.get("files")
    try:
        ok = all(isinstance(files[k]["path"], str) and _safe_relpath(files[k]["path"]) and
                 isinstance(files[k]["sha256"], str) and int(files[k]["bytes"]) >= 0 for k in FILES)
        ok = ok and int(meta["count"]) > 0 and int(meta["dim"]) > 0
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: files, count or dim missing or malformed; rebuild the gallery")
    return meta, hashlib.sha256(data).hexdigest()


def _verify_size(path: str, actual: int, entry: dict[str, Any]) -> None:
    if actual != int(entry["bytes"]):
        raise ValueError(f"{path}: {actual} bytes, gallery.json records {entry['bytes']} (truncated or "
                         "replaced); rebuild the gallery")


def _verify_digest(path: str, digest: str, entry: dict[str, Any]) -> None:
    if digest != entry["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} differs from gallery.json's {entry['sha256']} (damaged or "
                         "replaced); rebuild the gallery")


class _fetched:
    """Context manager: a verified local path of a gallery file (remote files are downloaded to a
    temporary file, removed on exit)."""

    def __init__(self, location: str, entry: dict[str, Any]):
        self.url = storage.join(location, entry["path"])
        self.entry = entry
        self.tmp: str | None = None

    def __enter__(self) -> str:
        if storage.is_remote(self.url) and not self.url.startswith("file://"):
            fs, p = storage.filesystem(self.url)
            try:
                size = int(fs.size(p))
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.url}: no such file (the gallery is incomplete); rebuild the "
                                        "gallery") from None
            _verify_size(self.url, size, self.entry)
            tmp_dir = storage.local_tmp_dir(self.url)
            self.tmp = os.path.join(tmp_dir, f"gallery-{uuid.uuid4().hex[:12]}.tmp")
            if isinstance(fs, fsspec.asyn.AsyncFileSystem):  # s3: ranged reads under the overall deadline
                with open(self.tmp, "wb") as f:
                    for block in storage.read_blocks(fs, p, self.url):
                        f.write(block)
            else:
                fs.get_file(p, self.tmp)
            local = self.tmp
        else:
            local = self.url.split("://", 1)[1] if self.url.startswith("file://") else self.url
            if not os.path.isfile(local):
                raise FileNotFoundError(f"{self.url}: no such file (the gallery is incomplete); rebuild the "
                                        "gallery")
        _verify_size(self.url, os.path.getsize(local), self.entry)
        _verify_digest(self.url, storage.file_sha256(local), self.entry)
        return local

    def __exit__(self, *exc: object) -> None:
        if self.tmp and os.path.exists(self.tmp):
            os.remove(self.tmp)


def _load_npy(location: str, entry: dict[str, Any], shape: tuple[int, ...], kind: str) -> np.ndarray:
    url = storage.join(location, entry["path"])
    fs, p = storage.filesystem(url)
    try:
        size = int(fs.size(p))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file (the gallery is incomplete); rebuild the gallery") \
            from None
    _verify_size(url, size, entry)
    data = storage.read_bytes(url)
    _verify_size(url, len(data), entry)
    _verify_digest(url, hashlib.sha256(data).hexdigest(), entry)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{url}: not a readable .npy array ({err}); rebuild the gallery") from None
    if arr.shape != shape or arr.dtype.kind != kind:
        raise ValueError(f"{url}: {arr.dtype} array of shape {arr.shape}, expected {shape} of kind {kind!r}; "
                         "rebuild the gallery")
    return arr


__all__ = ["Chunk", "ChunkSource", "Gallery", "GalleryConfig", "array_chunks", "gallery_for", "gallery_for_run",
           "gallery_location", "get_or_build", "table_chunks"]
