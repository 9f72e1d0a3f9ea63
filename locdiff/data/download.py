"""Fetching bytes from URLs and paths with retries and backoff, and whole files into a local cache.

The same functions serve real URLs and the tests' local HTTP and S3 servers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.error
import urllib.request

from locdiff.data import storage
from locdiff.data.validation import ChecksumError, RecordError

log = logging.getLogger(__name__)

PERMANENT_HTTP = (400, 401, 403, 404, 410, 451)  # not retried: the link is dead
USER_AGENT = "locdiff-data/0.1 (+https://github.com/locdiff)"


def _http_get(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http(s) only, checked)
        return resp.read()


def fetch(url: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = 30.0) -> bytes:
    """The bytes at a URL (http(s), s3, file) or local path.

    Dead links (HTTP 404/410/403..., a missing file or object) raise RecordError("missing_file") at once;
    other failures (connection refused, timeouts, HTTP 5xx/429) are retried `retries` times with
    exponential backoff from `backoff` seconds, then raise RecordError("unreachable").
    """
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            if url.startswith(("http://", "https://")):
                return _http_get(url, timeout)
            return storage.read_bytes(url)
        except urllib.error.HTTPError as err:
            if err.code in PERMANENT_HTTP:
                raise RecordError("missing_file", f"{url}: HTTP {err.code}") from None
            last = err
        except FileNotFoundError:
            raise RecordError("missing_file", f"{url}: not found") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            last = err
        if attempt < retries:
            delay = backoff * 2**attempt
            log.info("retrying %s in %.1fs (%s)", url, delay, last)
            time.sleep(delay)
    raise RecordError("unreachable", f"{url}: {last} (after {retries + 1} attempts)")


def cache_dir() -> str:
    d = os.environ.get("LOCDIFF_CACHE", os.path.expanduser("~/.cache/locdiff"))
    os.makedirs(d, exist_ok=True)
    return d


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, *, sha256: str | None = None, md5: str | None = None, retries: int = 3,
                  backoff: float = 0.5, timeout: float = 60.0,
                  dest_dir: str | None = None) -> tuple[str, str]:
    """Download a whole file into the cache (once; a finished download is reused) and check it.

    Returns (local path, sha256). Local paths are returned as they are (checked, not copied).

    Raises:
        FileNotFoundError: the URL or path does not exist.
        ChecksumError: the file's sha256/md5 differs from the published one.
        ValueError: unreachable after retries.
    """
    if not storage.is_remote(url) or url.startswith("file://"):
        path = storage.filesystem(url)[1]
        if not os.path.exists(path):
            raise FileNotFoundError(f"{url}: no such file")
        local = path
    else:
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        folder = dest_dir or os.path.join(cache_dir(), "downloads", key)
        os.makedirs(folder, exist_ok=True)
        local = os.path.join(folder, os.path.basename(url.split("?", 1)[0]) or "download")
        if not os.path.exists(local):
            part = f"{local}.part-{os.getpid()}"
            try:
                data = fetch(url, retries=retries, backoff=backoff, timeout=timeout)
            except RecordError as err:
                if err.reason == "missing_file":
                    raise FileNotFoundError(str(err.detail)) from None
                raise ValueError(f"cannot download {url}: {err.detail}") from None
            with open(part, "wb") as f:
                f.write(data)
            os.replace(part, local)
    digest = file_sha256(local)
    if sha256 and digest != sha256.lower():
        raise ChecksumError(f"{url}: sha256 {digest} differs from the published {sha256} "
                            f"(downloaded copy: {local}; delete it to download again)")
    if md5 and _file_md5(local) != md5.lower():
        raise ChecksumError(f"{url}: md5 {_file_md5(local)} differs from the published {md5} ({local})")
    return local, digest
