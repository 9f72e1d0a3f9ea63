"""A read-only "folder" of files: a local folder, an archive (zip, tar, tar.gz; local or downloaded from
a URL), an http(s) base URL or an s3:// prefix. Sources read their CSV and images through it, so real
URLs and the tests' local servers go through the same code.

A location reads only inside itself: a relative path that is absolute, holds '..' or a URL, or (in a
local folder) resolves through a symlink to a file outside the folder is refused as "outside_source"
and never opened. Every read has a byte limit.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import tarfile
import threading
import urllib.parse
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from locdiff.data import storage
from locdiff.data.config import MAX_ARCHIVE_BYTES
from locdiff.data.download import (
    DEFAULT_MAX_BYTES,
    download_file,
    fetch,
    fetch_to_file,
    http_exists,
    private_addresses_allowed,
    resolve,
)
from locdiff.data.validation import RecordError, SourceError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(path: str) -> bool:
    return path.split("?", 1)[0].lower().endswith(ARCHIVE_SUFFIXES)


PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # what a folder without a CSV is read for
_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relpath(relpath: str) -> str:
    """A file reference inside a source, normalised to 'a/b/c.jpg'; RecordError("outside_source") for
    one that is empty, absolute (/x, C:\\x, \\\\host), a URL (x://), or has a '..' component (also when
    percent-encoded), or holds a NUL byte."""
    ref = str(relpath).strip()
    shown = ref if len(ref) <= 200 else ref[:200] + "..."
    if not ref or "\0" in ref:
        raise RecordError("outside_source", f"{shown!r}: not a file name")
    if ref.startswith(("/", "\\")) or _DRIVE.match(ref) or "://" in ref:
        raise RecordError("outside_source", f"{shown!r}: absolute paths and URLs are not read from a "
                                            "folder source (give paths relative to it)")
    parts = [p for p in re.split(r"[/\\]", ref) if p not in ("", ".")]
    decoded = [p for p in re.split(r"[/\\]", urllib.parse.unquote(ref)) if p]
    if ".." in parts or ".." in decoded or not parts:
        raise RecordError("outside_source", f"{shown!r}: '..' leads out of the source")
    return "/".join(parts)


class FileTree(ABC):
    """Files addressed by relative path."""

    parallel = False  # whether reads may run in many threads at once
    url = ""

    @abstractmethod
    def read(self, relpath: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes (at most `max_bytes`, default the location's image limit): RecordError
        missing_file, outside_source, too_big, unreachable..."""

    @abstractmethod
    def exists(self, relpath: str) -> bool:
        """Implemented by each concrete subclass."""

    def list_csv(self) -> list[str] | None:
        """Top-level .csv names, or None when the location cannot be listed (http)."""
        return None

    def list_photos(self) -> list[str] | None:
        """Relative paths of every JPEG/PNG/WebP file under the location (sorted; hidden files and
        folders left out), or None when it cannot be listed (http)."""
        return None

    def local_file(self, relpath: str, dest: str, max_bytes: int) -> str:
        """A local file holding `relpath`'s bytes (at most `max_bytes`; the same errors as `read`): the file
        itself where the location is a local folder, else a copy written to `dest`."""
        data = self.read(relpath, max_bytes=max_bytes)
        with open(dest, "wb") as f:
            f.write(data)
        return dest

    def iter_photos(self) -> Iterator[str] | None:
        """`list_photos` in any order, one at a time where the location can list that way (a local folder)."""
        found = self.list_photos()
        return None if found is None else iter(found)

    def checksums(self) -> dict[str, str]:
        """sha256 of the files this location was made from (archives), for the manifest."""
        return {}

    def versions(self, relpaths: list[str]) -> list[str] | None:
        """Of each file, what changes when it is replaced under its name ("SIZE:MTIME_NS" of a local file,
        "missing"); None where the location cannot say it cheaply."""
        return None


class FolderLocation(FileTree):
    """A local folder, an http(s) base URL or an s3:// prefix."""

    def __init__(self, url: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = 30.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, allow_private: bool = False) -> None:
        self.url = url.rstrip("/") or url
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.max_bytes, self.allow_private = max_bytes, allow_private
        is_local = not storage.is_remote(url) or url.startswith("file://")
        self.parallel = not is_local
        self.local = os.path.realpath(storage.filesystem(url)[1]) if is_local else None

    def _local_path(self, relpath: str) -> str:
        """The real path of a file inside the local folder; outside_source when a symlink leads out."""
        assert self.local is not None
        full = os.path.realpath(os.path.join(self.local, safe_relpath(relpath)))
        if full != self.local and not full.startswith(self.local.rstrip(os.sep) + os.sep):
            raise RecordError("outside_source", f"{relpath}: a symlink leads out of {self.url}")
        return full

    def _url(self, relpath: str) -> str:
        return storage.join(self.url, safe_relpath(relpath))

    def read(self, relpath: str, max_bytes: int | None = None) -> bytes:
        limit = self.max_bytes if max_bytes is None else max_bytes
        if self.local is None:
            return fetch(self._url(relpath), retries=self.retries, backoff=self.backoff, timeout=self.timeout,
                         max_bytes=limit, allow_private=self.allow_private)
        path = self._local_path(relpath)
        try:
            return storage.read_local(path, max_bytes=limit, follow_symlinks=False)
        except FileNotFoundError as err:
            raise RecordError("missing_file", f"{relpath} in {self.url}: {err}") from None
        except storage.TooBigError as err:
            raise RecordError("too_big", str(err)) from None
        except OSError as err:
            if err.errno == errno.ELOOP:  # a symlink put in place after the check
                raise RecordError("outside_source", f"{relpath}: a symlink in {self.url}") from None
            raise RecordError("missing_file", f"{relpath} in {self.url}: {err.strerror or err}") from None

    def local_file(self, relpath: str, dest: str, max_bytes: int) -> str:
        if self.local is None:
            try:
                fetch_to_file(self._url(relpath), dest, retries=self.retries, backoff=self.backoff,
                              timeout=self.timeout, max_bytes=max_bytes, allow_private=self.allow_private)
            except FileNotFoundError as err:
                raise RecordError("missing_file", f"{relpath} in {self.url}: {err}") from None
            return dest
        path = self._local_path(relpath)
        try:
            storage.open_local(path, max_bytes=max_bytes, follow_symlinks=False).close()
        except FileNotFoundError as err:
            raise RecordError("missing_file", f"{relpath} in {self.url}: {err}") from None
        except storage.TooBigError as err:
            raise RecordError("too_big", str(err)) from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RecordError("outside_source", f"{relpath}: a symlink in {self.url}") from None
            raise RecordError("missing_file", f"{relpath} in {self.url}: {err.strerror or err}") from None
        return path

    def exists(self, relpath: str) -> bool:
        try:
            if self.local is not None:
                return os.path.isfile(self._local_path(relpath))
            if self.url.startswith(("http://", "https://")):
                return http_exists(self._url(relpath), timeout=self.timeout, allow_private=self.allow_private)
            return storage.exists(self._url(relpath))
        except RecordError:
            return False

    def versions(self, relpaths: list[str]) -> list[str] | None:
        if self.local is None:
            return None
        out = []
        for relpath in relpaths:
            try:
                st = os.stat(os.path.join(self.local, safe_relpath(relpath)))
                out.append(f"{st.st_size}:{st.st_mtime_ns}")
            except (OSError, RecordError):  # read (and refused or skipped) later
                out.append("missing")
        return out

    def list_csv(self) -> list[str] | None:
        if self.url.startswith(("http://", "https://")):
            return None
        return [n for n in storage.list_files(self.local or self.url) if n.lower().endswith(".csv")]

    def list_photos(self) -> list[str] | None:
        found = self.iter_photos()
        return None if found is None else sorted(found)

    def iter_photos(self) -> Iterator[str] | None:
        if self.url.startswith(("http://", "https://")):
            return None
        return (f for f in self._walk() if f.lower().endswith(PHOTO_EXTENSIONS)
                and not any(part.startswith(".") for part in f.split("/")))

    def _walk(self) -> Iterator[str]:
        if self.local is not None:
            for dirpath, dirnames, filenames in os.walk(self.local):  # symlinked folders not entered
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = os.path.relpath(dirpath, self.local)
                yield from (n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}" for n in filenames)
        else:
            fs, p = storage.filesystem(self.url)
            with storage.named(self.url):
                found = fs.find(p)  # s3fs lists a prefix whole
            yield from (f[len(p):].lstrip("/") for f in found)


class ArchiveLocation(FileTree):
    """A zip or tar archive (downloaded first when remote). A damaged tar is indexed up to the damage;
    the records past it are skipped as "damaged_archive"."""

    def __init__(self, url: str, *, sha256: str | None = None, md5: str | None = None, retries: int = 3,
                 backoff: float = 0.5, timeout: float = 60.0, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_archive_bytes: int = MAX_ARCHIVE_BYTES, allow_private: bool = False) -> None:
        self.url = url
        self.max_bytes = max_bytes
        try:
            self.path, self.sha256 = download_file(url, sha256=sha256, md5=md5, retries=retries,
                                                   backoff=backoff, timeout=timeout, max_bytes=max_archive_bytes,
                                                   allow_private=allow_private)
        except FileNotFoundError as err:
            raise SourceError(f"archive {url}: not found ({err})") from None
        self._lock = threading.Lock()
        self.damaged = ""
        self._names: dict[str, object] = {}
        self._members: list[str] = []  # member names as stored, in archive order
        if self.path.lower().endswith(".zip"):
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as err:
                raise SourceError(f"archive {url}: not a readable zip ({err})") from None
            self._tar = None
            for info in self._zip.infolist():
                if not info.is_dir():
                    self._index(info.filename, info)
        else:
            self._zip = None
            try:
                self._tar = tarfile.open(self.path, mode="r:*")
            except (tarfile.TarError, OSError, EOFError) as err:
                raise SourceError(f"archive {url}: not a readable tar ({err})") from None
            try:
                for member in self._tar:
                    if member.isfile():
                        self._index(member.name, member)
            except (tarfile.TarError, OSError, EOFError) as err:
                self.damaged = str(err) or type(err).__name__
                log.error("archive %s is damaged after %d members: %s", url, len(self._names), self.damaged)

    def _index(self, name: str, info: object) -> None:
        while name.startswith("./"):
            name = name[2:]
        name = name.lstrip("/")
        self._members.append(name)
        self._names.setdefault(name, info)
        if "/" in name:  # also reachable without a top-level folder (im2gps3ktest/x.jpg -> x.jpg)
            self._names.setdefault(name.split("/", 1)[1], info)

    def exists(self, relpath: str) -> bool:
        try:
            return safe_relpath(relpath) in self._names
        except RecordError:
            return False

    def list_csv(self) -> list[str] | None:
        return sorted(n for n in self._names if n.lower().endswith(".csv") and "/" not in n)

    def list_photos(self) -> list[str] | None:
        return sorted({n for n in self._members if n.lower().endswith(PHOTO_EXTENSIONS)
                       and ".." not in n.split("/") and not any(p.startswith(".") for p in n.split("/"))})

    def _copy(self, relpath: str, limit: int, write: Callable[[bytes], object]) -> None:
        """A member's bytes into `write`, in blocks: missing_file, damaged_archive, too_big (above `limit`)."""
        info = self._names.get(safe_relpath(relpath))
        if info is None:
            if self.damaged:
                raise RecordError("damaged_archive", f"{relpath} not in {self.url} (archive damaged: "
                                                     f"{self.damaged})")
            raise RecordError("missing_file", f"{relpath} not in {self.url}")
        size = info.file_size if isinstance(info, zipfile.ZipInfo) else info.size  # type: ignore[attr-defined]
        if size > limit:
            raise RecordError("too_big", f"{relpath} in {self.url}: {size:,} bytes, above the limit of {limit:,}")
        copied = 0
        with self._lock:
            try:
                f = self._zip.open(info) if self._zip is not None else \
                    self._tar.extractfile(info)  # type: ignore[union-attr,arg-type]
                with f or io.BytesIO() as src:  # the zip's CRC is checked at the end of the member
                    while copied <= size and (block := src.read(1 << 22)):
                        copied += len(block)
                        write(block)
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
                raise RecordError("damaged_archive", f"{relpath} in {self.url}: {err}") from None
        if copied != size:
            raise RecordError("damaged_archive", f"{relpath} in {self.url}: {copied} of {size} bytes")

    def read(self, relpath: str, max_bytes: int | None = None) -> bytes:
        parts: list[bytes] = []
        self._copy(relpath, self.max_bytes if max_bytes is None else max_bytes, parts.append)
        return b"".join(parts)

    def local_file(self, relpath: str, dest: str, max_bytes: int) -> str:
        """The member copied to `dest` in blocks (never held whole)."""
        with open(dest, "wb") as out:
            self._copy(relpath, max_bytes, out.write)
        return dest

    def checksums(self) -> dict[str, str]:
        return {self.url: self.sha256}


def open_location(url: str, *, sha256: str | None = None, md5: str | None = None, retries: int = 3,
                  backoff: float = 0.5, timeout: float = 30.0, max_bytes: int = DEFAULT_MAX_BYTES,
                  max_archive_bytes: int = MAX_ARCHIVE_BYTES, allow_private: bool = False) -> FileTree:
    """A FileTree for a folder, archive, http(s) base URL or s3:// prefix (archives are downloaded).
    `max_bytes` is the default limit of one read (an image); `max_archive_bytes` of a downloaded archive.

    Raises:
        SourceError: no such folder or archive, or an http(s) host whose address is refused.
    """
    if url.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            if not parts.hostname:
                raise ValueError("no host")
            resolve(parts.hostname, port, allow_private=private_addresses_allowed(allow_private))
        except RecordError as err:
            raise SourceError(f"{url}: {err.detail}") from None
        except Exception:  # unresolvable now: the reads report it, with retries
            pass
    if is_archive(url):
        return ArchiveLocation(url, sha256=sha256, md5=md5, retries=retries, backoff=backoff,
                               timeout=max(timeout, 60.0), max_bytes=max_bytes,
                               max_archive_bytes=max_archive_bytes, allow_private=allow_private)
    if (not storage.is_remote(url) or url.startswith("file://")) and not os.path.isdir(storage.filesystem(url)[1]):
        raise SourceError(f"{url}: no such folder or archive")
    return FolderLocation(url, retries=retries, backoff=backoff, timeout=timeout, max_bytes=max_bytes,
                          allow_private=allow_private)
