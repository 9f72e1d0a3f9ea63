"""A read-only "folder" of files: a local folder, an archive (zip, tar, tar.gz; local or downloaded from
a URL), an http(s) base URL or an s3:// prefix. Sources read their CSV and images through it, so real
URLs and the tests' local servers go through the same code.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
import zipfile
from abc import ABC, abstractmethod

from locdiff.data import storage
from locdiff.data.download import download_file, fetch
from locdiff.data.validation import RecordError, SourceError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(path: str) -> bool:
    return path.split("?", 1)[0].lower().endswith(ARCHIVE_SUFFIXES)


def http_exists(url: str, timeout: float = 30.0) -> bool:
    """Whether an http(s) URL answers a HEAD request with success."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout):  # noqa: S310
            return True
    except urllib.error.HTTPError:
        return False
    except (urllib.error.URLError, OSError) as err:
        raise RecordError("unreachable", f"{url}: {err}") from None


class Location(ABC):
    """Files addressed by relative path."""

    parallel = False  # whether reads may run in many threads at once
    url = ""

    @abstractmethod
    def read(self, relpath: str) -> bytes:
        """Implemented by each concrete subclass."""

    @abstractmethod
    def exists(self, relpath: str) -> bool:
        """Implemented by each concrete subclass."""

    def list_csv(self) -> list[str] | None:
        """Top-level .csv names, or None when the location cannot be listed (http)."""
        return None

    def checksums(self) -> dict[str, str]:
        """sha256 of the files this location was made from (archives), for the manifest."""
        return {}


class FolderLocation(Location):
    """A local folder, an http(s) base URL or an s3:// prefix."""

    def __init__(self, url: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.parallel = storage.is_remote(url)

    def _url(self, relpath: str) -> str:
        return storage.join(self.url, relpath) if not relpath.startswith(("http://", "https://", "s3://")) \
            else relpath

    def read(self, relpath: str) -> bytes:
        return fetch(self._url(relpath), retries=self.retries, backoff=self.backoff, timeout=self.timeout)

    def exists(self, relpath: str) -> bool:
        try:
            if self.url.startswith(("http://", "https://")):
                return http_exists(self._url(relpath), timeout=self.timeout)
            return storage.exists(self._url(relpath))
        except RecordError:
            return False

    def list_csv(self) -> list[str] | None:
        if self.url.startswith(("http://", "https://")):
            return None
        return [n for n in storage.list_files(self.url) if n.lower().endswith(".csv")]


class ArchiveLocation(Location):
    """A zip or tar archive (downloaded first when remote). A damaged tar is indexed up to the damage;
    the records past it are skipped as "damaged_archive"."""

    def __init__(self, url: str, *, sha256: str | None = None, md5: str | None = None, retries: int = 3,
                 backoff: float = 0.5, timeout: float = 60.0) -> None:
        self.url = url
        try:
            self.path, self.sha256 = download_file(url, sha256=sha256, md5=md5, retries=retries,
                                                   backoff=backoff, timeout=timeout)
        except FileNotFoundError as err:
            raise SourceError(f"archive {url}: not found ({err})") from None
        self._lock = threading.Lock()
        self.damaged = ""
        self._names: dict[str, object] = {}
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
        name = name.lstrip("./")
        self._names.setdefault(name, info)
        if "/" in name:  # also reachable without a top-level folder (im2gps3ktest/x.jpg -> x.jpg)
            self._names.setdefault(name.split("/", 1)[1], info)

    def exists(self, relpath: str) -> bool:
        return relpath.lstrip("./") in self._names

    def list_csv(self) -> list[str] | None:
        return sorted(n for n in self._names if n.lower().endswith(".csv") and "/" not in n)

    def read(self, relpath: str) -> bytes:
        info = self._names.get(relpath.lstrip("./"))
        if info is None:
            if self.damaged:
                raise RecordError("damaged_archive", f"{relpath} not in {self.url} (archive damaged: "
                                                     f"{self.damaged})")
            raise RecordError("missing_file", f"{relpath} not in {self.url}")
        with self._lock:
            try:
                if self._zip is not None:
                    return self._zip.read(info)  # type: ignore[arg-type]
                f = self._tar.extractfile(info)  # type: ignore[union-attr,arg-type]
                data = f.read() if f is not None else b""
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
                raise RecordError("damaged_archive", f"{relpath} in {self.url}: {err}") from None
        if len(data) != info.size:  # type: ignore[attr-defined]
            raise RecordError("damaged_archive", f"{relpath} in {self.url}: {len(data)} of "
                                                 f"{info.size} bytes")  # type: ignore[attr-defined]
        return data

    def checksums(self) -> dict[str, str]:
        return {self.url: self.sha256}


def open_location(url: str, *, sha256: str | None = None, md5: str | None = None, retries: int = 3,
                  backoff: float = 0.5, timeout: float = 30.0) -> Location:
    """A Location for a folder, archive, http(s) base URL or s3:// prefix (archives are downloaded)."""
    if is_archive(url):
        return ArchiveLocation(url, sha256=sha256, md5=md5, retries=retries, backoff=backoff,
                               timeout=max(timeout, 60.0))
    if not storage.is_remote(url) and not os.path.isdir(url):
        raise SourceError(f"{url}: no such folder or archive")
    return FolderLocation(url, retries=retries, backoff=backoff, timeout=timeout)
