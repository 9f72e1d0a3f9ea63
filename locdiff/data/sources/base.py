"""The source interface and the common case: a metadata CSV plus images in a folder, an archive or at
one URL per record."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from locdiff.data import storage
from locdiff.data.config import DatasetConfig
from locdiff.data.download import check_record_url, fetch, fetch_to_file, private_addresses_allowed
from locdiff.data.locations import FileTree, is_archive, open_location, safe_relpath
from locdiff.data.sources.records import (
    NO_META,
    Record,
    RecordSpill,
    SeenIds,
    SortedStrings,
    StringTable,
    scratch_path,
    spill_of,
)
from locdiff.data.validation import (
    RecordError,
    SkipLog,
    SourceError,
    check_checksum,
    check_record_coordinates,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CSV_CHUNK_ROWS = 20_000  # metadata rows parsed at a time


@dataclass
class Plan:
    records: RecordSpill  # on disk, read a range at a time (`RecordSpill`)
    rows: int  # rows read from the metadata (after --limit)
    skips: SkipLog  # records dropped while planning (ids, coordinates)
    provenance: dict[str, Any]  # source URLs and checksums for the manifest

    def close(self) -> None:
        """Remove the records' scratch file."""
        self.records.close()


class Source(ABC):
    """A data set's records and a way to fetch each record's image bytes."""

    parallel = False  # fetches may run in threads (remote per-image reads)

    def __init__(self, cfg: DatasetConfig, source: str | None = None) -> None:
        self.cfg = cfg
        self.source = source

    @abstractmethod
    def plan(self, limit: int | None = None) -> Plan:
        """Implemented by each concrete subclass."""

    @abstractmethod
    def fetch(self, record: Record) -> bytes:
        """Implemented by each concrete subclass."""

    def versions(self, records: list[Record]) -> list[str] | None:
        """Of each record's image, what changes when the file is replaced under its name (`FileTree.versions`);
        None where the source cannot say it cheaply."""
        return None

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass


def read_csv_chunks(data: bytes | str, what: str, *, header: bool = True, names: list[str] | None = None,
                    chunk_rows: int = CSV_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """A CSV's rows, `chunk_rows` at a time, all columns as strings (ids keep leading zeros; coordinates are
    parsed and checked per row); `data` is the CSV's bytes or a local file's path. A header without rows
    gives one empty frame (its columns)."""
    try:
        reader = pd.read_csv(io.BytesIO(data) if isinstance(data, bytes) else data, dtype=str,
                             keep_default_na=False, na_values=[], chunksize=chunk_rows,
                             header=0 if header else None, names=names, compression=None)
        with reader:
            yield from reader
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SourceError(f"{what}: not a readable CSV ({err})") from None


def require_columns(df: pd.DataFrame, columns: dict[str, str | None], what: str) -> None:
    missing = {role: col for role, col in columns.items() if col and col not in df.columns}
    if missing:
        desc = ", ".join(f"{role} column {col!r}" for role, col in missing.items())
        raise SourceError(f"{what}: no {desc}; the CSV has columns {list(df.columns)}")


def file_blocks(path: str, size: int = 8 << 20) -> Iterator[bytes]:
    """A local file's bytes in blocks (for checksums)."""
    with open(path, "rb") as f:
        while block := f.read(size):
            yield block


def plan_records(chunks: Iterable[pd.DataFrame], cfg: DatasetConfig, what: str, ref_for, limit: int | None,
                 keep_meta: bool = True, prefetch: Callable[[list[str]], None] | None = None
                 ) -> tuple[RecordSpill, int, SkipLog]:
    """Validate rows into Records (in CSV order, `chunks` of rows at a time, written to a `RecordSpill`):
    skipped rows are counted per reason, never dropped silently. `ref_for(row_dict, id) -> str` says where
    the image is; `prefetch(ids)`, when given, is told a chunk's ids before `ref_for` is asked about them.
    Neither the rows, the records nor the ids seen are held beyond one chunk.

    With `coordinates: optional` the coordinate columns may be absent and empty cells give a record
    without coordinates (lat/lon None); coordinates that are given must still be valid. Without an id
    column there, the image reference (file name or URL) is the id.
    """
    optional = cfg.coordinates == "optional"
    skips = SkipLog()
    spill = RecordSpill()
    rows = 0
    try:
        with SeenIds(scratch_path("seen.sqlite", os.path.dirname(spill.path))) as seen:
            for df in chunks:
                if rows == 0:  # the first chunk: the columns
                    present = {"id": cfg.id_column, "latitude": cfg.lat_column, "longitude": cfg.lon_column}
                    if optional:
                        present = {}
                        pair = [c for c in (cfg.lat_column, cfg.lon_column) if c in df.columns]
                        if len(pair) == 1:  # one of the two is a typo: say so rather than drop every coordinate
                            require_columns(df, {"latitude": cfg.lat_column, "longitude": cfg.lon_column}, what)
                    require_columns(df, present, what)
                    if df.empty:  # a CSV whose rows were lost would otherwise make an empty data set without a word
                        raise SourceError(f"{what}: the CSV has a header and no rows")
                    has_id = cfg.id_column in df.columns
                    has_coords = cfg.lat_column in df.columns and cfg.lon_column in df.columns
                    core = {cfg.id_column, cfg.lat_column, cfg.lon_column}
                    meta_cols = [c for c in df.columns if c not in core] if keep_meta else []
                    if cfg.keep_columns is not None:
                        meta_cols = [c for c in meta_cols if c in cfg.keep_columns]
                    columns = list(df.columns)
                if limit is not None:
                    df = df.iloc[: max(0, int(limit) - rows)]
                if df.empty:
                    if limit is not None and rows >= limit:
                        break
                    continue
                batch = []  # (CSV line, row dict, id)
                for values in df.itertuples(index=False, name=None):
                    row = dict(zip(columns, values, strict=True))
                    rows += 1
                    rid = str(row[cfg.id_column]).strip() if has_id else ""
                    if not has_id:
                        try:
                            rid = ref_for(row, "").strip()
                        except RecordError:
                            rid = ""
                    batch.append((rows + 1, row, rid))
                ids = [rid for _, _, rid in batch if rid]
                repeated = iter(seen.repeated(ids))
                if prefetch is not None:
                    prefetch(ids)
                records: list[Record] = []
                for line, row, rid in batch:
                    if not rid:
                        skips.add(f"row {line}", "missing_id", f"{what}: empty id")
                        continue
                    if next(repeated):
                        skips.add(rid, "duplicate_id", f"{what}: id seen before")
                        continue
                    lat = lon = None
                    try:
                        if has_coords:
                            lat, lon = check_record_coordinates(row[cfg.lat_column], row[cfg.lon_column])
                        elif not optional:
                            raise RecordError("missing_coordinates", "no coordinate columns")
                    except RecordError as err:
                        if not (optional and err.reason == "missing_coordinates"):
                            skips.add(rid, err.reason, err.detail)
                            continue
                        lat = lon = None
                    try:
                        ref = ref_for(row, rid)
                    except RecordError as err:
                        skips.add(rid, err.reason, err.detail)
                        continue
                    sha = row.get(cfg.sha256_column) if cfg.sha256_column else None
                    meta = {c: row[c] for c in meta_cols if row[c] != ""}
                    records.append(Record(len(spill) + len(records), rid, lat, lon, ref, meta or NO_META,
                                          sha or None))
                spill.extend(records)
    except BaseException:
        spill.close()
        raise
    return spill, rows, skips


def listing_records(paths: Iterable[str], limit: int | None) -> tuple[RecordSpill, int, SkipLog]:
    """Records without coordinates for image files listed in a folder (`paths` sorted; id = relative path)."""
    skips = SkipLog()
    rows = 0

    def records() -> Iterator[Record]:
        nonlocal rows
        n = 0
        for path in paths:
            if limit is not None and rows >= limit:
                return
            rows += 1
            try:
                ref = safe_relpath(path)
            except RecordError as err:
                skips.add(path, err.reason, err.detail)
                continue
            yield Record(n, path, None, None, ref, NO_META)
            n += 1

    spill = spill_of(records())
    return spill, rows, skips


class TabularSource(Source):
    """Metadata CSV + images (folder, archive or URL list) described by a DatasetConfig.

    With --source, the CSV and images are read from that folder, archive, http(s) base URL or s3://
    prefix (the CSV named in the config, or the only CSV there; a URL ending in .csv names the CSV
    itself, images beside it). Without it, the config's published URLs are used.
    """

    def __init__(self, cfg: DatasetConfig, source: str | None = None) -> None:
        super().__init__(cfg, source)
        self.images: FileTree | None = None
        self.urls: StringTable | None = None  # id -> URL, while planning
        self._chunk_urls: dict[str, str] = {}  # those of the chunk of rows being planned
        self._scratch_files: list[str] = []
        self.provenance: dict[str, Any] = {}
        self._source_loc: FileTree | None = None  # --source opened once (an archive is indexed once)

    # -- locating the metadata and images ------------------------------------------------------
    def _retry_kw(self) -> dict[str, Any]:
        """Retries, timeouts and limits of every read (images: max_image_bytes by default)."""
        cfg = self.cfg
        return {"retries": cfg.retries, "backoff": cfg.backoff, "timeout": cfg.timeout,
                "allow_private": private_addresses_allowed(cfg.allow_private_addresses)}

    def _location_kw(self) -> dict[str, Any]:
        return {**self._retry_kw(), "max_bytes": self.cfg.max_image_bytes,
                "max_archive_bytes": self.cfg.max_archive_bytes}

    def _scratch(self, stem: str) -> str:
        """A scratch file's path for a CSV copied here while planning (removed when the plan is made)."""
        path = scratch_path(stem)
        self._scratch_files.append(path)
        return path

    def _remove_scratch(self) -> None:
        while self._scratch_files:
            with contextlib.suppress(OSError):
                os.remove(self._scratch_files.pop())

    def _metadata(self) -> tuple[str, str, FileTree | None]:
        """(a local file holding the CSV, its URL, the location it sits in)."""
        cfg = self.cfg
        if self.source is None:
            if cfg.requires_source:
                raise SourceError(f"data set {cfg.name!r} is not public: give its folder with --source")
            if not cfg.metadata.url:
                raise SourceError(f"data set {cfg.name!r}: the config has no metadata URL; give --source")
            url, loc = cfg.metadata.url, None
            path = self._read_whole(url, "metadata.csv")
        elif self.source.split("?", 1)[0].lower().endswith(".csv"):
            url = self.source
            loc = open_location(os.path.dirname(url) if not storage.is_remote(url)
                                else url.rsplit("/", 1)[0], **self._location_kw())
            path = self._read_whole(url, "metadata.csv")
        else:
            loc = self._source_loc or open_location(self.source, **self._location_kw())
            name = cfg.metadata.filename
            if not name or not loc.exists(name):
                listed = loc.list_csv()
                if name and listed is None:
                    raise SourceError(f"{self.source}: no metadata CSV {name!r}")
                listed = listed or []
                if len(listed) != 1:
                    raise SourceError(f"{self.source}: no metadata CSV"
                                      + (f" {name!r}" if name else "")
                                      + (f"; found several: {listed}" if listed else " (no .csv file)"))
                name = listed[0]
            url = storage.join(loc.url, name) if not is_archive(loc.url) else f"{loc.url}#{name}"
            try:
                path = loc.local_file(name, self._scratch("metadata.csv"), cfg.max_metadata_bytes)
            except RecordError as err:
                raise SourceError(f"{self.source}: cannot read the metadata CSV {name!r}: {err.detail}"
                                  + (" (raise max_metadata_bytes)" if err.reason == "too_big" else "")) from None
        published = self.source is None or url.rsplit("/", 1)[-1] == cfg.metadata.filename  # the config's file
        digest = check_checksum(file_blocks(path), sha256=cfg.metadata.sha256 if published else None,
                                md5=cfg.metadata.md5 if published else None, what=url)  # one read
        self.provenance["metadata"] = {"url": url, "sha256": digest}
        return path, url, loc

    def _read_whole(self, url: str, stem: str) -> str:
        """A local file holding the file at `url` (itself when local; else a scratch copy)."""
        try:
            if not storage.is_remote(url) or url.startswith("file://"):
                path = storage.filesystem(url)[1]
                try:
                    storage.open_local(path, max_bytes=self.cfg.max_metadata_bytes).close()
                except FileNotFoundError:
                    raise RecordError("missing_file", f"{url}: not found") from None
                except storage.TooBigError as err:
                    raise RecordError("too_big", str(err)) from None
                return path
            path = self._scratch(stem)
            try:
                fetch_to_file(url, path, max_bytes=self.cfg.max_metadata_bytes, **self._retry_kw())
            except FileNotFoundError:
                raise RecordError("missing_file", f"{url}: not found") from None
            return path
        except RecordError as err:
            raise SourceError(f"cannot read {url}: {err.detail}"
                              + (" (raise max_metadata_bytes)" if err.reason == "too_big" else "")) from None

    def _images(self, loc: FileTree | None) -> tuple[FileTree | None, bool]:
        """(where images are read from, whether an image archive/folder was named explicitly)."""
        img = self.cfg.images
        if self.source is None:
            if img.url and not img.url.lower().endswith(".csv"):
                return open_location(img.url, sha256=img.sha256, md5=img.md5, **self._location_kw()), True
            return None, False
        if loc is not None and img.filename and not img.filename.lower().endswith(".csv") \
                and not is_archive(loc.url) and loc.exists(img.filename):
            return open_location(storage.join(loc.url, img.filename), sha256=img.sha256, md5=img.md5,
                                 **self._location_kw()), True
        return loc, False

    def _url_list(self, loc: FileTree | None) -> StringTable | None:
        """id -> URL from a separate URL-list CSV (config images.filename ending in .csv), if any."""
        cfg = self.cfg
        name = cfg.images.filename
        if not (name and name.lower().endswith(".csv")):
            return None
        if self.source is None:
            if not cfg.images.url:
                return None
            path, url = self._read_whole(cfg.images.url, "urls.csv"), cfg.images.url
        else:
            if loc is None:
                return None
            try:
                path = loc.local_file(name, self._scratch("urls.csv"), cfg.max_metadata_bytes)
            except RecordError as err:
                raise SourceError(f"{self.source}: cannot read the URL list {name!r}: {err.detail}") from None
            url = storage.join(loc.url, name)
        digest = check_checksum(file_blocks(path), sha256=cfg.images.sha256, md5=cfg.images.md5, what=url)  # one read
        id_col = cfg.url_list_id_column or cfg.id_column
        first = next(read_csv_chunks(path, url, chunk_rows=1))
        header = True
        if (id_col not in first.columns or cfg.url_column not in first.columns) and first.shape[1] == 2 \
                and str(first.columns[1]).startswith(("http://", "https://")):
            header = False  # a headerless two-column list: id, url
        else:
            require_columns(first, {"id": id_col, "url": cfg.url_column}, url)
        chunks = read_csv_chunks(path, url, header=header, names=None if header else [id_col, cfg.url_column])
        urls = StringTable("urls.sqlite")
        try:
            for df in chunks:
                urls.put_many(zip([str(v) for v in df[id_col]], [str(v) for v in df[cfg.url_column]], strict=True))
        except BaseException:
            urls.close()
            raise
        self.provenance["urls"] = {"url": url, "sha256": digest}
        return urls

    def _prefetch_urls(self, ids: list[str]) -> None:
        self._chunk_urls = self.urls.get_many(ids) if self.urls is not None else {}

    # -- the interface -------------------------------------------------------------------------
    def ref_for(self, row: dict[str, Any], rid: str) -> str:
        """Where a record's image is: a URL (checked: http(s):// or s3:// only) or a path inside the
        image location (checked: relative, no '..')."""
        cfg = self.cfg
        if self.urls is not None:
            url = self._chunk_urls.get(rid, "") if rid in self._chunk_urls else self.urls.get(rid, "")
            if not url:
                raise RecordError("missing_file", "no URL for this id in the URL list")
            return check_record_url(url)
        if self.images is None:
            url = str(row.get(cfg.url_column or "", "")).strip()
            if not url:
                raise RecordError("missing_file", f"empty {cfg.url_column!r}")
            return check_record_url(url)
        if cfg.path_column and row.get(cfg.path_column):
            path = str(row[cfg.path_column])
        elif not rid:
            raise RecordError("missing_id", "no id and no file name")
        else:
            path = cfg.path_template.format(id=rid)
        return safe_relpath(f"{cfg.image_prefix.strip('/')}/{path}" if cfg.image_prefix else path)

    def _photo_listing(self) -> FileTree | None:
        """The location to list photos from when coordinates are optional and --source names a folder,
        archive or s3:// prefix without any CSV (None otherwise)."""
        if (self.cfg.coordinates != "optional" and not self.cfg.exif_coordinates) or self.source is None \
                or self.source.split("?", 1)[0].lower().endswith(".csv"):
            return None
        loc = self._source_loc = open_location(self.source, **self._location_kw())
        if loc.list_csv() == [] and not (self.cfg.metadata.filename and loc.exists(self.cfg.metadata.filename)):
            return loc
        return None

    def plan(self, limit: int | None = None) -> Plan:
        listing = self._photo_listing()
        if listing is not None:
            photos = SortedStrings(listing.iter_photos() or ())  # on disk: a folder may hold millions
            try:
                if not len(photos):
                    raise SourceError(f"{self.source}: no CSV and no JPEG, PNG or WebP file")
                self.images, self.urls, self.parallel = listing, None, listing.parallel
                listed = hashlib.sha256()
                for i, p in enumerate(photos):
                    listed.update((p if not i else "\n" + p).encode("utf-8", "surrogateescape"))
                self.provenance["images"] = {"url": listing.url, "listing_sha256": listed.hexdigest()}
                for digest in listing.checksums().values():
                    self.provenance["images"]["sha256"] = digest
                records, rows, skips = listing_records(photos, limit)
            finally:
                photos.close()
            log.info("%s: no CSV; %d photos%s", listing.url, len(records),
                     ", each labelled by its GPS tag" if self.cfg.exif_coordinates else " without coordinates")
            return Plan(records, rows, skips, dict(self.provenance))
        try:
            path, url, loc = self._metadata()
            first = next(read_csv_chunks(path, url, chunk_rows=1))
            if self.urls is not None:
                self.urls.close()
            self.urls = self._url_list(loc)
            self.images = None
            if self.urls is None:
                images, explicit = self._images(loc)
                url_mode = bool(self.cfg.url_column and self.cfg.url_column in first.columns and not explicit
                                and not (images is not None and is_archive(images.url)))
                if not url_mode:
                    if images is None:
                        raise SourceError(f"data set {self.cfg.name!r}: no image archive or URL column "
                                          f"({self.cfg.url_column!r}) in {url}; give --source")
                    self.images = images
                    self.provenance["images"] = {"url": images.url}
                    for digest in images.checksums().values():
                        self.provenance["images"]["sha256"] = digest
            self.parallel = self.images is None or self.images.parallel
            records, rows, skips = plan_records(read_csv_chunks(path, url), self.cfg, url, self.ref_for, limit,
                                                prefetch=self._prefetch_urls)
        finally:
            self._chunk_urls = {}
            self._remove_scratch()
            if self.urls is not None:  # the records hold their URLs now
                self.urls.close()
                self.urls = None
        if rows and not len(records):
            log.error("%s: none of the %d rows is usable: %s", url, rows, dict(skips.counts))
        return Plan(records, rows, skips, dict(self.provenance))

    def versions(self, records: list[Record]) -> list[str] | None:
        return None if self.images is None else self.images.versions([r.ref for r in records])

    def fetch(self, record: Record) -> bytes:
        if self.images is None:
            return fetch(check_record_url(record.ref), max_bytes=self.cfg.max_image_bytes, **self._retry_kw())
        return self.images.read(record.ref)
