"""Where data lives: a ROOT that is a local folder or `s3://bucket/prefix`, read and written through fsspec.

One setting decides the S3 endpoint (MinIO, moto, or AWS itself): `set_s3_endpoint(url)` or the
environment variable `AWS_ENDPOINT_URL`. Credentials come from the usual AWS environment/config chain.

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object is written
with a single PUT, so it exists only once complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO
from urllib.parse import urlsplit

import fsspec
import fsspec.asyn
import fsspec.exceptions

from locdiff.errors import UserError

log = logging.getLogger(__name__)

_S3_ENDPOINT: str | None = None
_S3_TIMEOUT: float | None = None
DEFAULT_S3_TIMEOUT = 30.0  # seconds: connecting, and waiting for the next bytes of an answer
MAX_S3_TIMEOUT = 3600.0
MIN_TRANSFER_RATE = 64 * 1024  # bytes/s: a whole transfer must finish within 2 timeouts + its size at this rate
BLOCK = 8 << 20  # bytes of one ranged read of a remote object: the deadline is checked between blocks


def transfer_deadline(timeout: float, size: int) -> float:
    """Seconds a whole transfer of `size` bytes may take (a server that drips bytes is cut off there)."""
    return 2 * timeout + size / MIN_TRANSFER_RATE


class TooBigError(ValueError):
    """A file larger than the byte limit of the read (reading stopped at the limit)."""


class NoSpaceError(OSError, UserError):
    """The disk (or quota) filled up while writing a stage; the message names the folder (a UserError:
    the CLI and the flows report the message as it is)."""

    def __str__(self) -> str:
        return str(self.strerror)


RESUME_HINT = "free some space or use another --root, then run again: finished shards are kept and the run resumes"


@contextlib.contextmanager
def disk_full_is_an_error(folder: str, hint: str = RESUME_HINT) -> Iterator[None]:
    """Turn a full disk or quota (ENOSPC, EDQUOT) while writing under `folder` into a NoSpaceError:
    one line naming the folder and what to do (`hint`). The caller's own cleanup (temporary files) has run."""
    try:
        yield
    except NoSpaceError:
        raise
    except OSError as err:
        text = str(err)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in text \
                and "Disk quota exceeded" not in text:  # pyarrow's OSErrors carry no errno
            raise
        where = f" (writing {err.filename})" if err.filename else ""
        raise NoSpaceError(err.errno or errno.ENOSPC, f"{folder}: no space left on device{where}; {hint}") from None


def set_s3_endpoint(url: str | None) -> None:
    """Use this endpoint for every s3:// path (None: fall back to AWS_ENDPOINT_URL, then AWS)."""
    global _S3_ENDPOINT
    _S3_ENDPOINT = url


def s3_endpoint() -> str | None:
    return _S3_ENDPOINT or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def set_s3_timeout(seconds: float | None) -> None:
    """Seconds an s3:// request may wait to connect or for the next bytes of an answer (None: the environment
    variable LOCDIFF_S3_TIMEOUT, else 30). A whole read of N bytes may take `transfer_deadline(timeout, N)`."""
    global _S3_TIMEOUT
    if seconds is not None and not 0 < float(seconds) <= MAX_S3_TIMEOUT:
        raise UserError(f"S3 timeout: must be in (0, {MAX_S3_TIMEOUT:g}] seconds; got {seconds}")
    _S3_TIMEOUT = None if seconds is None else float(seconds)


def s3_timeout() -> float:
    """The s3:// timeout in seconds (`set_s3_timeout`, LOCDIFF_S3_TIMEOUT, else 30)."""
    if _S3_TIMEOUT is not None:
        return _S3_TIMEOUT
    raw = os.environ.get("LOCDIFF_S3_TIMEOUT")
    if not raw:
        return DEFAULT_S3_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_S3_TIMEOUT:
        raise UserError(f"LOCDIFF_S3_TIMEOUT: must be a number of seconds in (0, {MAX_S3_TIMEOUT:g}]; got {raw!r}")
    return value


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def carries_credentials(url: str | os.PathLike) -> bool:
    """Whether a URL carries user:password@ (or user@) before its host."""
    if not is_remote(url):
        return False
    try:
        return "@" in urlsplit(str(url)).netloc
    except ValueError:
        return "@" in str(url).split("://", 1)[1].split("/", 1)[0]


def check_no_credentials(url: str | os.PathLike | None, what: str) -> None:
    """Refuse a URL that carries credentials (user:password@host): they are never sent (http(s) reads are
    anonymous; s3:// uses the AWS credential chain) and would be kept in manifests, logs and messages. The
    message names `what` and the scheme, never the URL."""
    if url is not None and carries_credentials(url):
        scheme = str(url).split("://", 1)[0]
        raise UserError(f"{what}: the {scheme}:// URL carries credentials (user:password@host), refused: they "
                        "would be kept in manifests, run records and logs and are never sent; give the URL without "
                        "them (s3:// reads its credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                        "~/.aws)")


def filesystem(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a URL (s3://, http(s)://, file://)."""
    path = str(path)
    protocol = path.split("://", 1)[0] if is_remote(path) else "file"
    if carries_credentials(path):  # s3: read as a bucket name; every reader's messages would repeat them
        netloc, _, rest = path.split("://", 1)[1].partition("/")
        check_no_credentials(path, f"{protocol}://{netloc.rsplit('@', 1)[-1]}/{rest}")
    if protocol in ("s3", "s3a"):
        endpoint, timeout = s3_endpoint(), s3_timeout()
        # no listings cache: shards written a moment ago (by this or another process) must be seen; every request
        # bounded (connect, each read); whole reads are bounded by `read_bytes`' deadline
        fs = fsspec.filesystem("s3", use_listings_cache=False,
                               config_kwargs={"connect_timeout": timeout, "read_timeout": timeout,
                                              "retries": {"max_attempts": 3}},
                               **({"endpoint_url": endpoint} if endpoint else {}))
        # botocore's 3 attempts only: s3fs's own 5 tries on top made an endpoint that never answers cost 15
        # timeouts per request (a read of a table: 64 s at a timeout of 2 s, 16 minutes at the default 30 s)
        fs.retries = 1
        return fs, path.split("://", 1)[1].rstrip("/")
    if protocol == "file":
        local = path.split("://", 1)[1] if path.startswith("file://") else path
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(local))
    return fsspec.core.url_to_fs(path)


def join(root: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/'."""
    root = str(root)
    if not is_remote(root):
        return os.path.join(root, *parts)
    return posixpath.join(root.rstrip("/"), *parts)


@contextlib.contextmanager
def named(path: str) -> Iterator[None]:
    """An OSError that names no file names `path`: s3fs says only "Forbidden", "The AWS Access Key Id you
    provided does not exist in our records" or "The specified bucket does not exist"."""
    try:
        yield
    except (FileNotFoundError, PermissionError) as err:
        if err.filename is None and str(path) not in str(err):
            err.filename = str(path)
        raise


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    with named(path):
        return bool(fs.exists(p))


def _too_big(path: str, max_bytes: int) -> TooBigError:
    return TooBigError(f"{path}: larger than the limit of {max_bytes:,} bytes")


def open_local(path: str, *, max_bytes: int | None = None, follow_symlinks: bool = True) -> IO[bytes]:
    """A local regular file opened for reading, when it holds at most `max_bytes` (TooBigError past that;
    a reader of it in blocks checks the bytes it reads too: the file may grow).

    Devices, FIFOs, sockets and folders are refused as FileNotFoundError ("not a regular file"): a
    read never blocks on a pipe nor runs on forever (/dev/zero). With follow_symlinks=False a symlink
    as the last component is refused with OSError(ELOOP).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path}: no such file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # checked before fdopen, which names a folder by its descriptor number
        os.close(fd)
        raise FileNotFoundError(f"{path}: not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        os.close(fd)
        raise _too_big(path, max_bytes)
    return os.fdopen(fd, "rb")


def read_local(path: str, *, max_bytes: int | None = None, follow_symlinks: bool = True) -> bytes:
    """A local regular file's bytes, at most `max_bytes` of them (TooBigError past that); what `open_local`
    refuses is refused."""
    with open_local(path, max_bytes=max_bytes, follow_symlinks=follow_symlinks) as f:
        if max_bytes is None:
            return f.read()
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise _too_big(path, max_bytes)
    return data


def read_bytes(path: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a local path or URL; TooBigError when there are more than `max_bytes`."""
    if not is_remote(path) or path.startswith("file://"):  # local: no fsspec overhead per file
        local = path.split("://", 1)[1] if path.startswith("file://") else path
        return read_local(local, max_bytes=max_bytes)
    fs, p = filesystem(path)
    try:
        with named(path):
            if not isinstance(fs, fsspec.asyn.AsyncFileSystem):
                if max_bytes is None:
                    return fs.cat_file(p)
                with fs.open(p, "rb") as f:
                    size = getattr(f, "size", None)
                    if size is not None and size > max_bytes:
                        raise _too_big(path, max_bytes)
                    data = f.read(max_bytes + 1)
            else:
                data = b"".join(read_blocks(fs, p, path, max_bytes))
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{path}: no such file") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_big(path, max_bytes)
    return data


def read_blocks(fs: fsspec.AbstractFileSystem, p: str, path: str, max_bytes: int | None = None) -> Iterator[bytes]:
    """The bytes of a remote object (an async fsspec filesystem: s3) in ranged reads of BLOCK bytes, under an
    overall deadline of `transfer_deadline(s3_timeout(), size)` seconds from the start: each request is
    cancelled at what is left of it (TimeoutError naming `path`). TooBigError above `max_bytes`."""
    timeout = s3_timeout()
    start = time.monotonic()
    deadline = 2 * timeout  # the size first; then the whole transfer's

    def expired() -> TimeoutError:
        return TimeoutError(errno.ETIMEDOUT, f"{path}: not read within {deadline:.1f} s (a whole transfer may take "
                            f"2 x {timeout:g} s + its size at {MIN_TRANSFER_RATE // 1024} kB/s; too slow)")

    def left() -> float:
        remaining = deadline - (time.monotonic() - start)
        if remaining <= 0:
            raise expired()
        return remaining

    try:
        size = int(fs.size(p, timeout=left()))
    except fsspec.exceptions.FSTimeoutError:
        raise expired() from None
    if max_bytes is not None and size > max_bytes:
        raise _too_big(path, max_bytes)
    deadline = transfer_deadline(timeout, size)
    at = 0
    while at < size:
        end = min(at + BLOCK, size)
        try:
            block = fs.cat_file(p, start=at, end=end, timeout=left())
        except fsspec.exceptions.FSTimeoutError:
            raise expired() from None
        if not block:
            raise TimeoutError(errno.EIO, f"{path}: the object ended at {at:,} of {size:,} bytes")
        at += len(block)
        yield block


def open_file(path: str, mode: str = "rb") -> IO[bytes]:
    fs, p = filesystem(path)
    return fs.open(p, mode)


def file_sha256(path: str | os.PathLike, block: int = 8 << 20) -> str:
    """sha256 of a file's bytes (a local path or a URL), read in blocks."""
    h = hashlib.sha256()
    with (open_file(str(path)) if is_remote(path) else open(path, "rb")) as f:
        while b := f.read(block):
            h.update(b)
    return h.hexdigest()


def list_files(path: str) -> list[str]:
    """Names (not paths) of the files directly inside a folder; [] when it does not exist."""
    if not is_remote(path):
        try:
            return sorted(e.name for e in os.scandir(path) if _is_file(e))
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, p = filesystem(path)
    try:
        with named(path):
            entries = fs.ls(p, detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")


def _is_file(entry: os.DirEntry[str]) -> bool:
    """A regular file (or a symlink to one); False for a symlink loop (is_file raises ELOOP)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def removed_if_failed_empty(path: str) -> Iterator[None]:
    """Around a stage writing the local folder `path`: when the block fails and `path` did not exist before it,
    the folders made for it are removed again if they hold no file, so that a failed fresh run leaves nothing
    behind. A folder holding any file (a finished shard: the re-run resumes from it) stays as it is."""
    made = None  # the highest folder of `path` that does not exist yet
    p = os.path.abspath(path)
    while not is_remote(path) and not os.path.lexists(p) and os.path.dirname(p) != p:
        made, p = p, os.path.dirname(p)
    try:
        yield
    except BaseException:
        if made is not None and os.path.isdir(made) and not os.path.islink(made) and not any(
                files or any(os.path.islink(os.path.join(d, x)) for x in dirs) for d, dirs, files in os.walk(made)):
            shutil.rmtree(made, ignore_errors=True)
        raise


def remove_stale_temporaries(path: str, tag: str = "tmp") -> None:
    """Remove the temporary siblings of a local file (`PATH.tmp-PID`, `PATH.tmp-PID-<random>`; `tag` "part" for
    downloads) that a process killed inside its write left, so that each kill does not leave one more for
    good. Only those of a process that no longer runs: a concurrent writer's file stays."""
    folder, name = os.path.split(os.path.abspath(path))
    _remove_killed_writers(folder, lambda n: n[len(name):] if n.startswith(f"{name}.{tag}-") else None)


def _remove_killed_writers(folder: str, marked: Callable[[str], str | None]) -> None:
    """Remove the files of `folder` whose name `marked` maps to a temporary file's mark (`.tmp-PID...`,
    `.part-PID...`; None for other files) when process PID no longer runs."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for n in names:
        mark = marked(n)
        pid = mark.split("-", 2)[1] if mark is not None and mark.count("-") else ""
        if pid.isascii() and pid.isdigit() and not process_running(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, n))


def process_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (True when that cannot be told: its file is kept)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or not a process id at all
        return True
    return True


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write `data` so that `path` either does not exist or holds all of it."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, p = filesystem(path)
    with named(path):
        fs.pipe_file(p, data)  # one PUT (or a multipart upload completed at the end): all or nothing


def check_writable(path: str, what: str, *, folder: bool = False) -> None:
    """Before any work: an OSError naming `path` (`named`) where the URL `path` (of `what`, e.g. "--out") cannot
    be written (no bucket, no permission, wrong credentials), found by writing a zero-byte object beside it
    (inside it for a `folder`) and removing it. A local path or file:// URL: nothing here (its folder is made,
    or refused, where it is written)."""
    if not is_remote(path) or path.split("://", 1)[0] not in ("s3", "s3a"):
        return
    check_no_credentials(path, what)
    fs, p = filesystem(path)
    parent = p if folder or "/" not in p else posixpath.dirname(p)
    probe = f"{parent}/.locdiff-write-check-{uuid.uuid4().hex[:8]}"
    with named(path):
        fs.pipe_file(probe, b"")
    try:
        fs.rm_file(probe)
    except OSError as err:  # allowed to write, not to delete: a zero-byte object stays
        log.warning("%s: cannot remove the write check %s (%s)", path, probe, err)


def put_file_atomic(local_tmp: str, path: str) -> None:
    """Move a finished local temporary file to `path` (rename locally, upload-then-delete for URLs)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.replace(local_tmp, path)
        return
    fs, p = filesystem(path)
    with named(path):
        fs.put_file(local_tmp, p)  # the object appears only when the upload completes
    os.remove(local_tmp)


def remove(path: str) -> None:
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def cache_dir() -> str:
    """The data layer's local cache (downloads, scratch files of remote roots): LOCDIFF_CACHE, else
    ~/.cache/locdiff; made when missing."""
    d = os.environ.get("LOCDIFF_CACHE", os.path.expanduser("~/.cache/locdiff"))
    os.makedirs(d, exist_ok=True)
    return d


def local_tmp_dir(root: str) -> str:
    """A local scratch folder for files on their way to `root` (beside it when it is local)."""
    d = os.path.join(root, ".tmp") if not is_remote(root) else os.path.join(cache_dir(), "tmp")
    os.makedirs(d, exist_ok=True)
    return d


def clear_local_tmp(root: str) -> None:
    """Remove partial files a killed run left in `root`'s local scratch folder (one writer per stage)."""
    if is_remote(root):
        return
    d = os.path.join(root, ".tmp")
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if name.endswith(".tmp"):
            os.remove(os.path.join(d, name))
    for folder in (root, os.path.join(root, "_progress")):  # `write_bytes_atomic`'s of the manifest, progress records
        _remove_killed_writers(folder, lambda n: ".tmp-" + n.rsplit(".tmp-", 1)[1] if ".tmp-" in n else None)
