"""Building a retrieval gallery's faiss index from a stream of chunks, and the settings that decide it.

Index type by size (`GalleryConfig`): exact `IndexFlatIP` below `flat_threshold` entries (default
200,000); above it an inverted-file index over `nlist` lists (default the power of two nearest
2 sqrt(N)), searched over `nprobe` of them (default 32). The stored vectors are by default float16
(`ivf_fp16`: half the memory of float32, 7.2 GB instead of 14.4 GB at MP-16 scale, 4.7M x 768-d, and
the recall of exact float32 storage); `ivf_sq8` (8-bit codes, a quarter) loses some top-1 neighbours to
the quantisation (recall@1 0.95-0.97 in bench_gallery, against 0.999-1.0 for fp16); `ivf_flat` stores
float32. Not offered: HNSW (measured in `benchmarks/bench_gallery.py`: at 100k it builds ~6x slower
than IVF and holds 1.5x the flat vectors) and IVF-PQ (32 bytes a vector at 128-d: recall@1 0.36 in an
exploratory run on the same data, and minutes to train).

Building reads a stream of chunks `(embedding (n, d), lat (n,), lon (n,), ids (n,))` and never holds
more than the index itself, one chunk and the per-entry lat/lon/ids: a flat index is filled into storage
allocated once; an IVF index, given a re-iterable source (a function returning a fresh iterator), is
built in three passes: a seeded uniform sample trains the quantizer, a second pass assigns every entry to
its list so that each list is allocated at its final size, a third adds the entries (with a one-shot
iterator the first chunks train it and lists grow as entries arrive, about 1.4-1.8x the final size).
The gallery object, its search and its storage: `locdiff.gallery`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from locdiff.schema import setting
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, Sequence[str] | np.ndarray]
ChunkSource = Callable[[], Iterable[Chunk]]
# approximate index kinds -> faiss code of the stored vectors (per entry: Flat 4 bytes/dim, SQfp16 2, SQ8 1)
CODES = {"ivf_flat": "Flat", "ivf_fp16": "SQfp16", "ivf_sq8": "SQ8"}
IndexKind = Literal["flat", "ivf_flat", "ivf_fp16", "ivf_sq8"]


def faiss_module() -> Any:
    """The faiss module (imported on first use: only galleries need it)."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency of the gallery
        raise ImportError("the retrieval gallery needs faiss: pip install faiss-cpu") from None
    return faiss


@dataclass(frozen=True)
class GalleryConfig:
    """How a gallery is built (all but `nprobe`, which is a search setting, decide its bytes). The run
    config's `gallery` section."""

    index: Literal["auto", "flat", "ivf_flat", "ivf_fp16", "ivf_sq8"] = "auto"  # auto: flat below threshold
    flat_threshold: int = setting(200_000, ge=1, le=10**10)  # auto: exact flat index below this many entries
    approx: Literal["ivf_flat", "ivf_fp16", "ivf_sq8"] = "ivf_fp16"  # auto: index at or above the threshold
    nlist: int | None = setting(None, ge=1, le=1 << 24)  # IVF lists; None: the power of two nearest 2 * sqrt(count)
    nprobe: int = setting(32, ge=1, le=1 << 24)  # IVF lists searched per query (search time; recall against speed)
    train_per_list: int = setting(64, ge=1, le=100_000)  # IVF training rows per list (capped by the count)
    seed: int = setting(0, ge=0, le=2**31 - 1)  # training sample and k-means

    def kind(self, count: int) -> IndexKind:
        if self.index != "auto":
            return self.index
        return "flat" if count < self.flat_threshold else self.approx

    def build_params(self, count: int) -> dict[str, Any]:
        """Everything that decides the index's bytes for `count` entries."""
        kind = self.kind(count)
        if kind == "flat":
            return {"index": "flat", "factory": "Flat"}
        nlist = self.nlist or 2 ** max(0, round(math.log2(2 * math.sqrt(max(count, 1)))))
        nlist = max(1, min(nlist, count))
        return {"index": kind, "factory": f"IVF{nlist},{CODES[kind]}", "nlist": nlist, "seed": self.seed,
                "train_rows": min(count, nlist * self.train_per_list)}


@dataclass
class _Meta:
    """Per-entry arrays collected while building."""

    lat: np.ndarray
    lon: np.ndarray
    ids: list[np.ndarray] = field(default_factory=list)
    row: int = 0


def _check_chunk(chunk: Chunk, dim: int | None, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray]:
    """Validated (unit-norm float32 embeddings, lat, lon, ids as str) of one chunk."""
    faiss = faiss_module()
    try:
        emb, lat, lon, ids = chunk
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a chunk must be (embedding, lat, lon, ids)") from None
    emb = np.array(emb, dtype=np.float32, order="C", copy=True)  # normalised in place below
    if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
        raise ValueError(f"{where}: embeddings of shape {emb.shape}, expected (n, {dim or 'd'})")
    n = emb.shape[0]
    lat = np.asarray(lat, dtype=np.float64).reshape(-1)
    lon = np.asarray(lon, dtype=np.float64).reshape(-1)
    ids = np.asarray(ids).astype(str).reshape(-1)
    if not (len(lat) == len(lon) == len(ids) == n):
        raise ValueError(f"{where}: {n} embeddings but {len(lat)} lat, {len(lon)} lon, {len(ids)} ids")
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        raise ValueError(f"{where}: entry {int(np.argmin(finite))} has a NaN or infinite embedding")
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (lon >= -180) & (lon <= 360))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where}: entry {i} ({ids[i]}) has no valid location (lat={lat[i]}, lon={lon[i]}); "
                         "a gallery needs labelled entries")
    if n:
        faiss.normalize_L2(emb)  # zero rows stay zero
    return emb, lat, lon, ids


def _chunks(source: ChunkSource | Iterable[Chunk]) -> Iterator[Chunk]:
    return iter(source() if callable(source) else source)


def _collect_meta(meta: _Meta, lat: np.ndarray, lon: np.ndarray, ids: np.ndarray, count: int,
                  where: str) -> None:
    n = len(lat)
    if meta.row + n > count:
        raise ValueError(f"{where}: the source yields more than the {count} entries it declared")
    meta.lat[meta.row: meta.row + n] = lat
    meta.lon[meta.row: meta.row + n] = lon
    meta.ids.append(ids)
    meta.row += n


def _finish(meta: _Meta, count: int) -> None:
    if meta.row != count or not meta.ids:
        raise ValueError(f"gallery: the source yielded {meta.row} entries, it declared {count}")


def _build_flat(chunks: Iterable[Chunk], count: int, progress: bool) -> tuple[Any, _Meta]:
    """IndexFlatIP with its storage allocated once at the final size (faiss's add would grow it by
    doubling, up to 1.7x the final size)."""
    faiss = faiss_module()
    index = store = None
    meta = _Meta(np.empty(count), np.empty(count))
    with tqdm(total=count, desc="gallery (flat)", unit="entry", disable=not progress) as bar:
        for i, chunk in enumerate(chunks):
            emb, lat, lon, ids = _check_chunk(chunk, None if index is None else index.d, f"gallery chunk {i}")
            if index is None:
                dim = emb.shape[1]
                index = faiss.IndexFlatIP(dim)
                index.codes.resize(count * dim * 4)
                store = faiss.rev_swig_ptr(index.codes.data(), count * dim * 4).view(np.float32)
                store = store.reshape(count, dim)
            start = meta.row
            _collect_meta(meta, lat, lon, ids, count, f"gallery chunk {i}")
            store[start: meta.row] = emb
            bar.update(len(emb))
    _finish(meta, count)
    index.ntotal = count
    return index, meta


def _new_ivf(dim: int, params: dict[str, Any]) -> Any:
    faiss = faiss_module()
    index = faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = int(params["seed"])
    return index


def _train(index: Any, sample: np.ndarray, params: dict[str, Any]) -> None:
    log.info("training %s on %d rows", params["factory"], len(sample))
    index.train(sample)


def _build_ivf_passes(chunks: ChunkSource, count: int, params: dict[str, Any],
                      progress: bool) -> tuple[Any, _Meta]:
    """Three passes: a seeded uniform training sample; the list of every entry (so that each inverted
    list is allocated once at its final size); the entries added with those lists."""
    faiss = faiss_module()
    rng = np.random.default_rng(params["seed"])
    train_rows = int(params["train_rows"])
    pick = np.sort(rng.choice(count, size=train_rows, replace=False)) if train_rows < count else \
        np.arange(count)
    sample: np.ndarray | None = None
    dim: int | None = None
    row = got = 0
    with tqdm(total=count, desc="gallery: sample", unit="entry", disable=not progress) as bar:
        for i, chunk in enumerate(_chunks(chunks)):
            emb, _, _, _ = _check_chunk(chunk, dim, f"gallery chunk {i}")
            if sample is None:
                dim = emb.shape[1]
                sample = np.empty((train_rows, dim), np.float32)
            lo, hi = np.searchsorted(pick, [row, row + len(emb)])
            sample[got: got + hi - lo] = emb[pick[lo:hi] - row]
            got += hi - lo
            row += len(emb)
            bar.update(len(emb))
            if got == train_rows:
                break
    if sample is None or got != train_rows:
        raise ValueError(f"gallery: the source yielded {row} entries, it declared {count}")
    index = _new_ivf(dim, params)
    _train(index, sample, params)
    del sample
    ivf = faiss.extract_index_ivf(index)

    assign = np.empty(count, np.int64)
    lat_seen = np.empty(count)
    row = 0
    with tqdm(total=count, desc="gallery: assign", unit="entry", disable=not progress) as bar:
        for i, chunk in enumerate(_chunks(chunks)):
            emb, lat, _, _ = _check_chunk(chunk, dim, f"gallery chunk {i}")
            if row + len(emb) > count:
                raise ValueError(f"gallery chunk {i}: the source yields more than the {count} entries it "
                                 "declared")
            _, a = ivf.quantizer.search(emb, 1)
            assign[row: row + len(emb)] = a[:, 0]
            lat_seen[row: row + len(emb)] = lat
            row += len(emb)
            bar.update(len(emb))
    if row != count:
        raise ValueError(f"gallery: the source yielded {row} entries, it declared {count}")
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    sizes = np.bincount(assign, minlength=ivf.nlist)
    for lst, size in enumerate(sizes.tolist()):  # reserve: grow to the final size, keep the capacity
        invlists.resize(lst, size)
        invlists.resize(lst, 0)

    meta = _Meta(np.empty(count), np.empty(count))
    with tqdm(total=count, desc="gallery: add", unit="entry", disable=not progress) as bar:
        for i, chunk in enumerate(_chunks(chunks)):
            emb, lat, lon, ids = _check_chunk(chunk, dim, f"gallery chunk {i}")
            start = meta.row
            _collect_meta(meta, lat, lon, ids, count, f"gallery chunk {i}")
            if not np.array_equal(lat, lat_seen[start: meta.row], equal_nan=True):
                raise ValueError(f"gallery chunk {i}: the source yielded different rows on another pass; "
                                 "give a deterministic chunk source")
            a = np.ascontiguousarray(assign[start: meta.row])
            ivf.add_core(len(emb), faiss.swig_ptr(emb), None, faiss.swig_ptr(a))
            bar.update(len(emb))
    _finish(meta, count)
    return index, meta


def _build_ivf_stream(chunks: Iterable[Chunk], count: int, params: dict[str, Any],
                      progress: bool) -> tuple[Any, _Meta]:
    """One pass: the first `train_rows` entries train the index, then every entry is added."""
    train_rows = int(params["train_rows"])
    log.warning("gallery: a one-shot chunk stream trains the IVF index on its first %d entries (pass a "
                "function returning the chunks for a uniform sample)", train_rows)
    index = dim = None
    pending: list[np.ndarray] = []
    buffered = 0
    meta = _Meta(np.empty(count), np.empty(count))
    with tqdm(total=count, desc="gallery (ivf)", unit="entry", disable=not progress) as bar:
        for i, chunk in enumerate(chunks):
            emb, lat, lon, ids = _check_chunk(chunk, dim, f"gallery chunk {i}")
            dim = emb.shape[1]
            _collect_meta(meta, lat, lon, ids, count, f"gallery chunk {i}")
            if index is None:
                pending.append(emb)
                buffered += len(emb)
                if buffered >= train_rows or meta.row == count:
                    index = _new_ivf(dim, params)
                    held = np.concatenate(pending)
                    pending.clear()
                    _train(index, held[:train_rows], params)
                    index.add(held)
                    del held
            else:
                index.add(emb)
            bar.update(len(emb))
    _finish(meta, count)
    if index is None:  # pragma: no cover - the count check above makes this unreachable
        raise ValueError("gallery: no entries")
    return index, meta


def build_index(chunks: ChunkSource | Iterable[Chunk], count: int, params: dict[str, Any],
                progress: bool = False) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """(faiss index, lat, lon, ids) of `count` entries built as `params` (`GalleryConfig.build_params`)
    say: a flat index, an IVF index in three passes over a re-iterable source, or in one over a one-shot
    iterable."""
    if params["index"] == "flat":
        index, meta = _build_flat(_chunks(chunks), count, progress)
    elif callable(chunks):
        index, meta = _build_ivf_passes(chunks, count, params, progress)
    else:
        index, meta = _build_ivf_stream(_chunks(chunks), count, params, progress)
    return index, meta.lat, meta.lon, np.concatenate(meta.ids)


# ---------------------------------------------------------------------- chunk sources
def array_chunks(embedding: np.ndarray, lat: np.ndarray, lon: np.ndarray, ids: Sequence[str] | np.ndarray,
                 rows: int = 65536) -> Iterator[Chunk]:
    """Chunks of in-memory arrays."""
    ids = np.asarray(ids)
    for s in range(0, len(embedding), rows):
        yield embedding[s: s + rows], lat[s: s + rows], lon[s: s + rows], ids[s: s + rows]


def table_chunks(table: EmbeddingTable, rows: int = 65536) -> Iterator[Chunk]:
    """Chunks of an in-memory EmbeddingTable (labelled)."""
    if not table.labelled:
        raise ValueError(f"{table.source}: a gallery needs a labelled table (columns lat, lon)")
    return array_chunks(table.embedding, table.lat, table.lon, table.ids, rows)
