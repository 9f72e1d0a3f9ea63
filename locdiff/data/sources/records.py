"""A record (one photo of a data set's metadata) and a plan's records on disk: an SQLite file in the local
scratch folder, written once in CSV order and read back a range at a time, so that what planning and
ingesting hold does not grow with the data set (MP-16: 4.7M records, some 4 GB as Python objects).

`RecordSpill` is a read-only sequence of `Record`s once written (`len`, iteration, `spill[i]`, `spill[a:b]`);
`StringTable` a str -> str mapping (a URL list, img2dataset's index); `SortedStrings` a folder's listing in
sorted order. Each is an SQLite file named `STEM.tmp-PID-RANDOM` in `storage.cache_dir()/tmp`; a run killed
while it held one leaves it there until the next one of the same stem is made (only those of processes that
no longer run are removed). `close()` removes it; so does garbage collection of one nobody closed.
`SeenIds` (the ids seen so far, for duplicates) is one at a path its caller names.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, overload

from locdiff.data import storage

NO_META: dict[str, Any] = {}  # shared by every record without other columns (read, never changed)


@dataclass(slots=True)  # a page of them is held at a time; no __dict__ each
class Record:
    index: int  # position among the valid records: decides the shard and the sample key
    id: str
    lat: float | None  # None only when the data set's coordinates are optional (unlabelled photos)
    lon: float | None
    ref: str  # the image: a path inside the image location, or a URL
    meta: dict[str, Any] = field(default_factory=dict)  # other CSV columns, kept in KEY.json
    sha256: str | None = None  # published checksum of the image bytes, when the source has one


PAGE = 4096  # records read back in one query


def scratch_path(stem: str, folder: str | None = None) -> str:
    """A scratch file's path, `STEM.tmp-PID-RANDOM` in `folder` (default `storage.cache_dir()/tmp`); those a
    killed run left under the same stem are removed first (only those of processes that no longer run)."""
    folder = folder or os.path.join(storage.cache_dir(), "tmp")
    os.makedirs(folder, exist_ok=True)
    storage.remove_stale_temporaries(os.path.join(folder, stem))
    return os.path.join(folder, f"{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: str) -> None:
    for p in (path, f"{path}-journal"):
        with contextlib.suppress(OSError):
            os.remove(p)


def _open_scratch_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=OFF")  # a scratch file: nothing to recover after a crash
    db.execute("PRAGMA synchronous=OFF")
    return db


def _close_scratch_db(db: sqlite3.Connection, path: str) -> None:
    db.close()
    _remove(path)


@contextlib.contextmanager
def _disk_full(path: str) -> Iterator[None]:
    """SQLite's full disk as an OSError (ENOSPC) naming the file, as a full disk is anywhere else."""
    try:
        yield
    except sqlite3.OperationalError as err:
        if err.sqlite_errorcode != sqlite3.SQLITE_FULL:
            raise
        raise OSError(errno.ENOSPC, "No space left on device", path) from None


class SeenIds:
    """The ids seen so far, for skipping duplicates: on disk (an SQLite table keyed by the id, at `path`), so that
    what is held does not grow with the data set; asked and told a batch at a time. The file starts empty (the
    one a killed run left is removed) and is removed when closed."""

    CHUNK = 500  # ids in one query (SQLite's limit on parameters is 999 in older builds)

    def __init__(self, path: str) -> None:
        self.path = path
        _remove(path)
        self._db = _open_scratch_db(path)
        with _disk_full(path):
            self._db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY) WITHOUT ROWID")

    def repeated(self, ids: list[str]) -> list[bool]:
        """Of each of `ids`, whether it came before (in an earlier batch or earlier in this one); all are then
        seen."""
        batch = list(dict.fromkeys(ids))
        before: set[str] = set()
        with _disk_full(self.path):
            for i in range(0, len(batch), self.CHUNK):
                chunk = batch[i: i + self.CHUNK]
                query = f"SELECT id FROM seen WHERE id IN ({','.join('?' * len(chunk))})"
                before.update(row[0] for row in self._db.execute(query, chunk))
            self._db.executemany("INSERT INTO seen VALUES (?)", [(i,) for i in batch if i not in before])
            self._db.commit()
        now: set[str] = set()
        out = []
        for i in ids:
            out.append(i in before or i in now)
            now.add(i)
        return out

    def close(self) -> None:
        _close_scratch_db(self._db, self.path)

    def __enter__(self) -> SeenIds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StringTable:
    """A str -> str mapping on disk (a URL list, a downloader's index): an SQLite table in a scratch file,
    removed when closed. A key put again keeps its last value. Rows are appended as they come and indexed on
    the first lookup (four times faster than keeping a keyed table sorted while loading)."""

    CHUNK = 500  # keys in one query (SQLite's limit on parameters is 999 in older builds)

    def __init__(self, stem: str, folder: str | None = None) -> None:
        self.path = scratch_path(stem, folder)
        self._db = _open_scratch_db(self.path)
        self._finalizer = weakref.finalize(self, _close_scratch_db, self._db, self.path)
        self._indexed = False
        with _disk_full(self.path):
            self._db.execute("CREATE TABLE kv (k TEXT, v TEXT)")  # rowid: the order they were put in

    def put_many(self, pairs: Iterable[tuple[str, str]]) -> None:
        with _disk_full(self.path):
            self._db.executemany("INSERT INTO kv VALUES (?, ?)", pairs)
            self._db.commit()

    def _index(self) -> None:
        if not self._indexed:
            with _disk_full(self.path):
                self._db.execute("CREATE INDEX kv_k ON kv (k)")
            self._indexed = True

    def get(self, key: str, default: str | None = None) -> str | None:
        self._index()
        row = self._db.execute("SELECT v FROM kv WHERE k = ? ORDER BY rowid DESC LIMIT 1", (key,)).fetchone()
        return default if row is None else row[0]

    def get_many(self, keys: list[str]) -> dict[str, str]:
        """The value of each of `keys` that is in the table (the others are left out)."""
        self._index()
        out: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), self.CHUNK):
            chunk = unique[i: i + self.CHUNK]
            out.update(self._db.execute(f"SELECT k, v FROM kv WHERE k IN ({','.join('?' * len(chunk))}) "
                                        "ORDER BY rowid", chunk))  # the last put wins
        return out

    def close(self) -> None:
        self._finalizer()


class SortedStrings:
    """Strings sorted on disk (a folder's photo paths): an SQLite table in a scratch file, iterated in code
    point order (as `sorted` orders them) as often as needed, a page at a time; removed when closed. Names
    that are not valid UTF-8 (kept by the OS as surrogate escapes) sort by their bytes."""

    def __init__(self, strings: Iterable[str], folder: str | None = None) -> None:
        self.path = scratch_path("sorted.sqlite", folder)
        self._db = _open_scratch_db(self.path)
        self._finalizer = weakref.finalize(self, _close_scratch_db, self._db, self.path)
        self._len = 0
        try:
            with _disk_full(self.path):
                self._db.execute("CREATE TABLE s (v BLOB)")
                batch: list[tuple[bytes]] = []
                for v in strings:
                    batch.append((v.encode("utf-8", "surrogateescape"),))
                    if len(batch) >= PAGE:
                        self._add(batch)
                        batch = []
                self._add(batch)
                self._db.execute("CREATE INDEX s_v ON s (v)")  # UTF-8 bytes sort as their code points
        except BaseException:
            self.close()
            raise

    def _add(self, batch: list[tuple[bytes]]) -> None:
        self._db.executemany("INSERT INTO s VALUES (?)", batch)
        self._db.commit()
        self._len += len(batch)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        last: bytes | None = None
        while True:
            query = "SELECT v FROM s ORDER BY v LIMIT ?" if last is None else \
                "SELECT v FROM s WHERE v > ? ORDER BY v LIMIT ?"
            page = [r[0] for r in self._db.execute(query, (PAGE,) if last is None else (last, PAGE))]
            yield from (v.decode("utf-8", "surrogateescape") for v in page)
            if len(page) < PAGE:
                return
            last = page[-1]

    def close(self) -> None:
        self._finalizer()


class RecordSpill:
    """Records appended in index order (0, 1, 2, ...) and read back by index range."""

    def __init__(self, folder: str | None = None) -> None:
        self.path = scratch_path("plan.sqlite", folder)
        self._db = _open_scratch_db(self.path)
        self._finalizer = weakref.finalize(self, _close_scratch_db, self._db, self.path)
        self._len = 0
        with _disk_full(self.path):
            self._db.execute("CREATE TABLE records (i INTEGER PRIMARY KEY, id TEXT, lat REAL, lon REAL, ref TEXT, "
                             "meta TEXT, sha256 TEXT)")

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RecordSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extend(self, records: Iterable[Record]) -> None:
        """Append records; their `index` must continue the sequence (the next is `len(self)`)."""
        rows = []
        for r in records:
            if r.index != self._len + len(rows):
                raise ValueError(f"record {r.id!r}: index {r.index}, expected {self._len + len(rows)}")
            rows.append((r.index, r.id, r.lat, r.lon, r.ref,
                         json.dumps(r.meta, ensure_ascii=False) if r.meta else None, r.sha256))
        with _disk_full(self.path):
            self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.commit()
        self._len += len(rows)

    def __len__(self) -> int:
        return self._len

    def _range(self, start: int, stop: int) -> list[Record]:
        rows = self._db.execute("SELECT i, id, lat, lon, ref, meta, sha256 FROM records WHERE i >= ? AND i < ? "
                                "ORDER BY i", (start, stop))
        return [Record(i, rid, lat, lon, ref, json.loads(meta) if meta else NO_META, sha)
                for i, rid, lat, lon, ref, meta, sha in rows]

    @overload
    def __getitem__(self, key: int) -> Record: ...

    @overload
    def __getitem__(self, key: slice) -> list[Record]: ...

    def __getitem__(self, key: int | slice) -> Record | list[Record]:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            if step != 1:
                raise ValueError("a RecordSpill is read in ranges (step 1)")
            return self._range(start, stop) if stop > start else []
        i = key + self._len if key < 0 else key
        if not 0 <= i < self._len:
            raise IndexError(key)
        return self._range(i, i + 1)[0]

    def __iter__(self) -> Iterator[Record]:
        for start in range(0, self._len, PAGE):
            yield from self._range(start, start + PAGE)

    def chunks(self, size: int) -> Iterator[list[Record]]:
        """The records in consecutive lists of `size` (the last may be shorter)."""
        for start in range(0, self._len, size):
            yield self._range(start, start + size)

    def filtered(self, keep: Callable[[Record], bool], folder: str | None = None) -> RecordSpill:
        """A new spill with the records `keep` accepts, numbered again from 0 (this one stays)."""
        out = RecordSpill(folder or os.path.dirname(self.path))
        try:
            for page in self.chunks(PAGE):
                kept = [r for r in page if keep(r)]
                out.extend(Record(len(out) + j, r.id, r.lat, r.lon, r.ref, r.meta, r.sha256)
                           for j, r in enumerate(kept))
        except BaseException:
            out.close()
            raise
        return out


def spill_of(records: Iterable[Record], folder: str | None = None) -> RecordSpill:
    """A spill holding `records` (already numbered 0, 1, ...)."""
    out = RecordSpill(folder)
    batch: list[Record] = []
    try:
        for r in records:
            batch.append(r)
            if len(batch) >= PAGE:
                out.extend(batch)
                batch = []
        out.extend(batch)
    except BaseException:
        out.close()
        raise
    return out


__all__ = ["NO_META", "Record", "RecordSpill", "SeenIds", "SortedStrings", "StringTable", "scratch_path",
           "spill_of"]
