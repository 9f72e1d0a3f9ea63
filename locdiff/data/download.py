"""Fetching bytes from URLs and paths with retries, backoff and limits, and whole files into a local cache.

Every read has a byte limit. HTTP(S) goes through one guarded client (`fetch`, `http_exists`): the
host is resolved once, every address it resolves to must be public (global unicast) unless private
addresses are allowed, the connection goes to exactly the address that was checked (no second DNS
lookup an attacker could rebind), and each redirect is checked the same way. A refused address is
never connected to, and a failed connection reads "cannot connect" whatever the cause, so a URL list
cannot be used to probe hosts or ports.

Private addresses (loopback, RFC 1918, link-local, CGNAT, unique-local, multicast, ...) are allowed by
`allow_private_addresses: true` in a data set config, `--allow-private-addresses` on `locdiff data
ingest`, or the environment variable LOCDIFF_ALLOW_PRIVATE_ADDRESSES=1 (for a mirror on your own
network, and for the tests, whose servers listen on 127.0.0.1). s3:// URLs go to the S3 endpoint of the
environment (AWS_ENDPOINT_URL), which is the user's own setting and not checked.

The same functions serve real URLs and the tests' local HTTP and S3 servers.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable

import fsspec.asyn

from locdiff.data import storage
from locdiff.data.config import MAX_ARCHIVE_BYTES, MAX_METADATA_BYTES
from locdiff.data.validation import ChecksumError, RecordError

log = logging.getLogger(__name__)

PERMANENT_HTTP = (400, 401, 403, 404, 410, 451)  # not retried: the link is dead
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
USER_AGENT = "locdiff-data/0.1 (+https://github.com/locdiff)"
RECORD_SCHEMES = ("http", "https", "s3")  # what a URL list or URL column may hold
ALLOW_PRIVATE_ENV = "LOCDIFF_ALLOW_PRIVATE_ADDRESSES"
DEFAULT_MAX_BYTES = MAX_METADATA_BYTES  # a fetch with no limit of its own (images pass max_image_bytes)


def private_addresses_allowed(configured: bool = False) -> bool:
    """Whether private addresses may be fetched: the config/flag, or LOCDIFF_ALLOW_PRIVATE_ADDRESSES=1."""
    return bool(configured) or os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_record_url(url: str) -> str:
    """An image URL from a URL list or URL column: http(s):// or s3:// with a host/bucket, else
    RecordError("refused_url") (file://, bare paths, ftp://, data:, ...)."""
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in RECORD_SCHEMES or not parts.netloc or "\0" in url:
        shown = url if len(url) <= 200 else url[:200] + "..."
        raise RecordError("refused_url", f"{shown!r}: only http(s):// and s3:// image URLs are read")
    if storage.carries_credentials(url):  # never sent, and the message would carry them into logs
        raise RecordError("refused_url", f"a {parts.scheme}:// URL carrying credentials (user:password@host)")
    return url


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known NAT64 prefix: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible ::a.b.c.d (:: and ::1 included)
MIN_TRANSFER_RATE, transfer_deadline = storage.MIN_TRANSFER_RATE, storage.transfer_deadline  # s3 reads share them


def is_public_address(ip: str) -> bool:
    """Whether an IP address is public (global unicast); IPv4 inside IPv6 (mapped, compatible, NAT64, 6to4,
    Teredo) is judged by its IPv4 address."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr in _NAT64_LOCAL:
            return False  # a site's own NAT64 prefix: its IPv4 side is not known
        embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        inner = (addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
                 or (embedded if addr in _NAT64 or addr in _IPV4_COMPATIBLE else None))
        if inner is not None:
            addr = inner
    return bool(addr.is_global) and not addr.is_multicast


class _Unreachable(Exception):
    """A connection-level failure: retried, then reported as "unreachable" without its cause."""


def resolve(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The addresses of `host`; RecordError("refused_address") when any of them is not public and
    private addresses are not allowed (nothing is connected to)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise _Unreachable(f"cannot resolve {host!r}") from None
    ips = list(dict.fromkeys(info[4][0] for info in infos))
    if not allow_private and (not ips or not all(is_public_address(ip) for ip in ips)):
        raise RecordError("refused_address",
                          f"{host}: not a public address; private, loopback and link-local addresses are "
                          f"refused unless allowed (allow_private_addresses: true, "
                          f"--allow-private-addresses or {ALLOW_PRIVATE_ENV}=1)")
    return ips


def refused_hosts(urls: list[str], verdict: dict[tuple[str, int], RecordError | None] | None = None
                  ) -> dict[str, RecordError]:
    """For a downloader that resolves names itself (img2dataset): the URLs whose host resolves to a
    non-public address now, each with its RecordError("refused_address"). One lookup per host; this
    cannot stop a host that changes its address later (DNS rebinding) nor a redirect: the builtin
    downloader checks at connect time and on every redirect. `verdict` carries each host's lookup from one
    call to the next."""
    verdict = {} if verdict is None else verdict
    out: dict[str, RecordError] = {}
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            continue
        try:
            key = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        except ValueError:
            continue
        if key not in verdict:
            try:
                resolve(*key, allow_private=False)
                verdict[key] = None
            except RecordError as err:
                verdict[key] = err
            except _Unreachable:
                verdict[key] = None  # the downloader reports it
        if verdict[key] is not None:
            out[url] = verdict[key]  # type: ignore[assignment]
    return out


def _connect(ips: list[str], port: int, timeout: float) -> socket.socket:
    for ip in ips:
        try:
            return socket.create_connection((ip, port), timeout=timeout)
        except OSError:
            continue
    raise _Unreachable("cannot connect")


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ips = ips

    def connect(self) -> None:
        self.sock = _connect(self._ips, self.port, self.timeout)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # verifies certificates and host names; shared by threads


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is verified against the name."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=_tls_context())
        self._ips = ips

    def connect(self) -> None:
        sock = _connect(self._ips, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _open(url: str, method: str, timeout: float, allow_private: bool
          ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection, str]:
    """(response, connection, final URL) of a request, redirects followed and each one checked."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise RecordError("refused_url", f"{url}: invalid port") from None
        if scheme not in ("http", "https") or not parts.hostname:
            raise RecordError("refused_url", f"{url}: only http(s):// is fetched over HTTP")
        ips = resolve(parts.hostname, port, allow_private=allow_private)
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(parts.hostname, port, ips, timeout)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, path, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                                                "Connection": "close"})
            resp = conn.getresponse()
        except (http.client.InvalidURL, UnicodeError):
            conn.close()
            raise RecordError("refused_url", f"{url}: not a valid URL (spaces or control characters)") from None
        except BaseException:
            conn.close()
            raise
        location = resp.getheader("Location")
        if resp.status in REDIRECTS and location:
            resp.close()
            conn.close()
            url = urllib.parse.urljoin(url, location)
            continue
        return resp, conn, url
    raise RecordError("missing_file", f"{url}: more than {MAX_REDIRECTS} redirects")


class _Retry(Exception):
    """An HTTP answer worth retrying (5xx, 429, a body cut short)."""


def _http_transfer(url: str, write: Callable[[bytes], object], *, max_bytes: int, timeout: float,
                   allow_private: bool) -> None:
    start = time.monotonic()
    resp, conn, final = _open(url, "GET", timeout, allow_private)
    try:
        if resp.status in PERMANENT_HTTP:
            raise RecordError("missing_file", f"{url}: HTTP {resp.status}")
        if not 200 <= resp.status < 300:
            raise _Retry(f"HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        expected = int(length) if length and length.strip().isdigit() else None
        if expected is not None and expected > max_bytes:
            raise RecordError("too_big", f"{url}: {expected:,} bytes, above the limit of {max_bytes:,}")
        total = 0
        limit = transfer_deadline(timeout, expected if expected is not None else max_bytes)
        while True:
            left = start + limit - time.monotonic()
            if left <= 0:
                raise RecordError("unreachable", f"{url}: {total:,} bytes in {limit:.0f} s, too slow (a whole "
                                                 f"transfer may take 2 x timeout + its size at "
                                                 f"{MIN_TRANSFER_RATE // 1024} kB/s)")
            if conn.sock is not None:
                conn.sock.settimeout(min(timeout, left))
            chunk = resp.read1(min(1 << 16, max_bytes + 1 - total))  # one receive: the deadline is checked often
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise RecordError("too_big", f"{url}: more than the limit of {max_bytes:,} bytes "
                                             "(reading stopped there)")
            write(chunk)
        if expected is not None and total != expected:
            raise _Retry(f"{total} of {expected} bytes")
    finally:
        resp.close()
        conn.close()


def http_exists(url: str, *, timeout: float = 30.0, allow_private: bool = False) -> bool:
    """Whether an http(s) URL answers a HEAD request with success (the same checks as a GET)."""
    try:
        resp, conn, _ = _open(url, "HEAD", timeout, private_addresses_allowed(allow_private))
    except (_Unreachable, OSError, http.client.HTTPException):
        raise RecordError("unreachable", f"{url}: cannot connect") from None
    resp.close()
    conn.close()
    return 200 <= resp.status < 300


def _transfer(url: str, write: Callable[[bytes], object], reset: Callable[[], object], *, retries: int,
              backoff: float, timeout: float, max_bytes: int, allow_private: bool) -> None:
    """Fetch `url` into `write` with retries (calling `reset` before each new attempt)."""
    allow_private = private_addresses_allowed(allow_private)
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            reset()
        try:
            if url.startswith(("http://", "https://")):
                _http_transfer(url, write, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private)
            else:
                write(storage.read_bytes(url, max_bytes=max_bytes))
            return
        except storage.TooBigError as err:
            raise RecordError("too_big", str(err)) from None
        except FileNotFoundError as err:
            raise RecordError("missing_file", str(err) if url in str(err) else f"{url}: not found") from None
        except PermissionError:
            raise RecordError("missing_file", f"{url}: permission denied") from None
        except _Retry as err:
            last = str(err)
        except _Unreachable as err:
            last = str(err)
        except TimeoutError as err:  # an s3 read past its overall deadline says so; a socket timeout does not
            last = err.strerror.removeprefix(f"{url}: ") if err.errno == errno.ETIMEDOUT and err.strerror \
                else "cannot connect or no answer"
        except (OSError, http.client.HTTPException):
            last = "cannot connect or no answer"  # the cause is not told (no port scanning)
        if attempt < retries:
            delay = backoff * 2**attempt
            log.info("retrying %s in %.1fs (%s)", url, delay, last)
            time.sleep(delay)
    raise RecordError("unreachable", f"{url}: {last} (after {retries + 1} attempts)")


def fetch(url: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = 30.0,
          max_bytes: int = DEFAULT_MAX_BYTES, allow_private: bool = False) -> bytes:
    """The bytes at a URL (http(s), s3, file) or local path, at most `max_bytes` of them.

    Dead links (HTTP 404/410/403..., a missing file or object) raise RecordError("missing_file") at once,
    as do a refused address ("refused_address"), a scheme that is not fetched ("refused_url") and a file
    above the limit ("too_big": reading stops at the limit). Other failures (connection refused,
    timeouts, HTTP 5xx/429) are retried `retries` times with exponential backoff from `backoff` seconds,
    then raise RecordError("unreachable").
    """
    parts: list[bytes] = []
    _transfer(url, parts.append, parts.clear, retries=retries, backoff=backoff, timeout=timeout,
              max_bytes=max_bytes, allow_private=allow_private)
    return b"".join(parts)


def fetch_to_file(url: str, path: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = 30.0,
                  max_bytes: int = DEFAULT_MAX_BYTES, allow_private: bool = False) -> None:
    """`fetch` streamed into the local file `path` instead of memory (the same limits, retries and errors; an
    s3:// object is copied in blocks, without retries)."""
    with open(path, "wb") as f:
        if url.startswith(("http://", "https://")):
            def reset() -> None:
                f.seek(0)
                f.truncate()

            _transfer(url, f.write, reset, retries=retries, backoff=backoff, timeout=timeout, max_bytes=max_bytes,
                      allow_private=allow_private)
        else:
            _copy_remote(url, f, max_bytes)


def _file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, *, sha256: str | None = None, md5: str | None = None, retries: int = 3,
                  backoff: float = 0.5, timeout: float = 60.0, dest_dir: str | None = None,
                  max_bytes: int = MAX_ARCHIVE_BYTES, allow_private: bool = False) -> tuple[str, str]:
    """Download a whole file into the cache (once; a finished download is reused) and check it.

    The file is streamed to disk (never held in memory) and stops at `max_bytes`. Returns (local path,
    sha256). Local paths are returned as they are (checked, not copied).

    Raises:
        FileNotFoundError: the URL or path does not exist.
        ChecksumError: the file's sha256/md5 differs from the published one.
        ValueError: unreachable after retries, a refused address, or larger than `max_bytes`.
    """
    if not storage.is_remote(url) or url.startswith("file://"):
        path = storage.filesystem(url)[1]
        if not os.path.exists(path):
            raise FileNotFoundError(f"{url}: no such file")
        local = path
    else:
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        folder = dest_dir or os.path.join(storage.cache_dir(), "downloads", key)
        os.makedirs(folder, exist_ok=True)
        local = os.path.join(folder, os.path.basename(url.split("?", 1)[0]) or "download")
        if not os.path.exists(local):
            storage.remove_stale_temporaries(local, "part")  # what downloads killed on the way left
            part = f"{local}.part-{os.getpid()}"
            try:
                with open(part, "wb") as f, storage.disk_full_is_an_error(folder):
                    def reset() -> None:
                        f.seek(0)
                        f.truncate()

                    if url.startswith(("http://", "https://")):
                        _transfer(url, f.write, reset, retries=retries, backoff=backoff, timeout=timeout,
                                  max_bytes=max_bytes, allow_private=allow_private)
                    else:
                        _copy_remote(url, f, max_bytes)
                os.replace(part, local)
            except RecordError as err:
                if err.reason == "missing_file":
                    raise FileNotFoundError(str(err.detail)) from None
                raise ValueError(f"cannot download {url}: {err.detail}") from None
            finally:
                if os.path.exists(part):
                    os.remove(part)
    digest = storage.file_sha256(local)
    if sha256 and digest != sha256.lower():
        raise ChecksumError(f"{url}: sha256 {digest} differs from the published {sha256} "
                            f"(downloaded copy: {local}; delete it to download again)")
    if md5 and (got := _file_md5(local)) != md5.lower():
        raise ChecksumError(f"{url}: md5 {got} differs from the published {md5} ({local})")
    return local, digest


def _copy_remote(url: str, out, max_bytes: int) -> None:  # noqa: ANN001 (a binary file)
    """Stream an s3:// (or other fsspec) object into `out`, refusing one above `max_bytes`."""
    fs, p = storage.filesystem(url)
    try:
        if isinstance(fs, fsspec.asyn.AsyncFileSystem):  # s3: ranged reads under the overall deadline
            for block in storage.read_blocks(fs, p, url, max_bytes):
                out.write(block)
            return
        with fs.open(p, "rb") as f:
            size = getattr(f, "size", None)
            if size is not None and size > max_bytes:
                raise RecordError("too_big", f"{url}: {size:,} bytes, above the limit of {max_bytes:,}")
            total = 0
            while block := f.read(1 << 22):
                total += len(block)
                if total > max_bytes:
                    raise RecordError("too_big", f"{url}: more than the limit of {max_bytes:,} bytes")
                out.write(block)
    except storage.TooBigError as err:
        raise RecordError("too_big", str(err)) from None
    except FileNotFoundError:
        raise RecordError("missing_file", f"{url}: not found") from None
    except TimeoutError as err:  # the overall deadline (a full local disk stays an OSError for the caller)
        raise RecordError("unreachable", f"{url}: {err.strerror or err}") from None
