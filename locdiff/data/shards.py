"""WebDataset shards: the on-disk layout, a deterministic tar writer and the in-memory tar readers.

Layout under a ROOT (local folder or s3://bucket/prefix):

    ROOT/NAME/images/shard-000000.tar            KEY.jpg + KEY.json (id, lat, lon, source metadata)
    ROOT/NAME/images/manifest.json
    ROOT/NAME/features/ENCODER/shard-000000.tar  KEY.emb.npy (+ KEY.shdd.npy) + KEY.json
    ROOT/NAME/features/ENCODER/manifest.json

KEY is the record's position in the data set (`%09d`): ids may hold dots and slashes, which WebDataset
keys cannot. Tars are written byte-for-byte reproducibly (fixed mtime, owner and mode, sorted members),
so a shard written twice has the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np

from locdiff.data import storage
from locdiff.data.validation import ShardError
from locdiff.errors import UserError

SHARD_PATTERN = "shard-{:06d}.tar"


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def sample_key(index: int) -> str:
    return f"{index:09d}"


def _inside(value: str, what: str) -> str:
    """`value` as a folder name under ROOT: relative, without a '..' component or a NUL byte (a NAME or
    an encoder name never leads out of ROOT); UserError naming it otherwise."""
    text = str(value)
    parts = text.replace("\\", "/").split("/")
    if not text.strip() or "\0" in text or text.startswith(("/", "\\")) or ".." in parts or "://" in text:
        raise UserError(f"{what} {text[:200]!r}: must be a folder name under ROOT (relative, without '..'); "
                        "for a data set config of your own, put it in configs/datasets/ or give its path relative "
                        "to the current folder")
    return text


def stage_dir(root: str, name: str, stage: str, encoder: str | None = None) -> str:
    """ROOT/NAME/images or ROOT/NAME/features/ENCODER (NAME and ENCODER stay inside ROOT: UserError
    for an absolute one or one with '..')."""
    name = _inside(name, "data set name")
    if stage == "images":
        return storage.join(root, name, "images")
    if stage == "features":
        if not encoder:
            raise ValueError("the features stage needs an encoder name")
        return storage.join(root, name, "features", _inside(encoder, "encoder name"))
    raise ValueError(f"unknown stage {stage!r}; valid: 'images', 'features'")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header (mode 0444, uid/gid 0, mtime 0, no owner names) for a regular file."""
    raw = name.encode()
    prefix = b""
    if len(raw) > 100:
        prefix, _, raw = raw.rpartition(b"/")
        if len(raw) > 100 or len(prefix) > 155 or not prefix:
            raise ValueError(f"tar member name too long for ustar: {name!r}")
    h = bytearray(512)
    h[0:len(raw)] = raw
    h[100:108] = b"0000444\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[int, str]:
    """Write samples (key, {extension: bytes}) to a local uncompressed tar, reproducibly: members in
    key order then extension order, fixed owner/mode/mtime. Returns (samples written, sha256)."""
    n = 0
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        def put(b: bytes) -> None:
            digest.update(b)
            f.write(b)

        for key, parts in samples:
            for ext in sorted(parts):
                data = parts[ext]
                put(_ustar_header(f"{key}.{ext}", len(data)))
                put(data)
                pad = -len(data) % 512
                if pad:
                    put(b"\0" * pad)
            n += 1
        put(b"\0" * 1024)  # end-of-archive: two zero blocks
        f.flush()
        os.fsync(f.fileno())
    return n, digest.hexdigest()


def _split_key(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    prefix = name[: len(name) - len(base)]
    key, _, ext = base.partition(".")
    return prefix + key, ext


def parse_tar_bytes(buf: bytes | memoryview, *, what: str = "") -> list[tuple[str, int, int]]:
    """(member name, data offset, size) for every regular file of an uncompressed tar held in memory.

    Fast path for plain ustar members; anything else (long names, pax headers) goes through tarfile.
    Raises ShardError (a ValueError) naming `what` when the archive is cut short or damaged.
    """
    mv = memoryview(buf)
    out: list[tuple[str, int, int]] = []
    off, end = 0, len(mv)
    while off + 512 <= end:
        header = bytes(mv[off: off + 512])
        if header[:1] == b"\0" and header.count(0) == 512:
            return out  # end-of-archive blocks
        flag = header[156:157]
        if flag not in (b"0", b"\0") or header[257:262] != b"ustar":
            return _parse_with_tarfile(buf, what)
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode()
        except (ValueError, UnicodeDecodeError):
            raise ShardError(f"{what}: damaged tar header at byte {off}; the shard is corrupt "
                             "(re-run the stage that wrote it)") from None
        if prefix:
            name = f"{prefix}/{name}"
        if off + 512 + size > end:
            raise ShardError(f"{what}: cut short in member {name!r} (truncated shard; re-run the stage "
                             "that wrote it)")
        out.append((name, off + 512, size))
        off += 512 + (size + 511) // 512 * 512
    if off < end or not out:
        raise ShardError(f"{what}: cut short (no end-of-archive marker; truncated shard; re-run the stage "
                         "that wrote it)")
    return out


def _parse_with_tarfile(buf: bytes | memoryview, what: str) -> list[tuple[str, int, int]]:
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(buf)), mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    if m.offset_data + m.size > len(buf):
                        raise ShardError(f"{what}: cut short in member {m.name!r} (truncated shard)")
                    out.append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, EOFError, UnicodeDecodeError) as err:
        raise ShardError(f"{what}: not a readable tar ({err}); the shard is corrupt") from None
    return out


def json_member(data: bytes | memoryview, *, url: str, key: str) -> dict[str, Any]:
    """Parse a sample's json member; ShardError naming the shard and the member when it is not JSON."""
    try:
        obj = _JSON.decode(bytes(data).decode())
    except RecursionError:
        raise ShardError(f"{url}: member {key}.json is not valid JSON (nested too deeply); the shard is "
                         "corrupt") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ShardError(f"{url}: member {key}.json is not valid JSON ({err}); the shard is corrupt") from None
    if not isinstance(obj, dict):
        raise ShardError(f"{url}: member {key}.json is not a JSON object; the shard is corrupt")
    return obj


def parse_regular_tar(buf: bytes | memoryview) -> tuple[list[str], dict[str, np.ndarray]] | None:
    """Vectorised parse of a tar whose samples all have the same layout (same members, same padded
    sizes), as feature shards do: (keys, {extension: (N, 2) array of data offset, size}).

    Returns None when the layout is not regular (the caller then uses `parse_tar_bytes`). Header
    checksums are not checked: callers verify the whole shard's sha256 against its manifest.
    """
    arr = np.frombuffer(buf, dtype=np.uint8)
    first: list[tuple[str, int, int]] = []
    key0 = None
    off = 0
    while off + 512 <= len(arr):  # the first sample, member by member
        head = arr[off: off + 512].tobytes()
        if head.count(0) == 512 or head[156:157] not in (b"0", b"\0") or head[257:262] != b"ustar":
            break
        if head[345:346] != b"\0":
            return None  # prefixed (long) names: not handled here
        name = head[:100].split(b"\0", 1)[0].decode()
        key, ext = _split_key(name)
        if key0 is None:
            key0 = key
        elif key != key0:
            break
        size = int(head[124:136].rstrip(b"\0 ") or b"0", 8)
        first.append((ext, off, size))
        off += 512 + (size + 511) // 512 * 512
    stride = off
    if not first or stride == 0 or "/" in key0:
        return None
    n = (len(arr) - 1024) // stride
    if n < 1 or arr[n * stride:].any():
        return None  # not whole samples followed by zero blocks only
    klen = len(key0.encode())
    keys_view = None
    out: dict[str, np.ndarray] = {}
    for ext, rel, size in first:
        headers = np.lib.stride_tricks.as_strided(arr[rel:], shape=(n, 512), strides=(stride, 1))
        # everything but the key, the size and the checksum must be identical in every sample
        for lo, hi in ((klen, 124), (156, 512)):
            if not (headers[:, lo:hi] == headers[0, lo:hi]).all():
                return None
        digits = headers[:, 124:135].astype(np.int64) - 48
        if (digits < 0).any() or (digits > 7).any():
            return None
        sizes = digits @ (8 ** np.arange(10, -1, -1, dtype=np.int64))
        if ((sizes + 511) // 512 != (size + 511) // 512).any():
            return None
        keys = headers[:, :klen]
        if keys_view is None:
            keys_view = np.ascontiguousarray(keys)
        elif not (keys == keys_view).all():
            return None
        starts = np.arange(n, dtype=np.int64) * stride + rel + 512
        out[ext] = np.stack([starts, sizes], axis=1)
    names = keys_view.view(f"S{klen}").ravel().astype(str).tolist()  # type: ignore[union-attr]
    if len(set(names)) != n:
        return None
    return names, out


def group_samples(members: list[tuple[str, int, int]]) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Consecutive members with the same key -> (key, {extension: (offset, size)})."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    current = None
    for name, off, size in members:
        key, ext = _split_key(name)
        if current is None or current[0] != key:
            current = (key, {})
            samples.append(current)
        current[1][ext] = (off, size)
    return samples


_NPY_HEADERS: dict[bytes, tuple[int, np.dtype, tuple[int, ...], str, int]] = {}
# numpy parses an .npy header with ast.literal_eval, and CPython 3.11's AST constructor keeps its recursion
# depth in state all threads share: two loader threads parsing at once failed now and then with "SystemError:
# AST constructor recursion depth mismatch" (cpython gh-106905). One parse at a time (a header is ~128 bytes).
_NPY_HEADER_LOCK = threading.Lock()


def read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy at file `f`'s position (numpy's reader, one thread at a time);
    `f` is left after the header. ValueError for a damaged one."""
    with _NPY_HEADER_LOCK:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)


def npy_from_bytes(data: bytes) -> np.ndarray:
    """np.load of an in-memory .npy, with the parsed header cached (every sample of a shard has the
    same header, so this is a frombuffer per sample). The result is read-only."""
    magic_len = 10 if data[6:7] == b"\x01" else 12
    hlen = magic_len + int.from_bytes(data[8:magic_len], "little")
    head = data[:hlen]
    cached = _NPY_HEADERS.get(head)
    if cached is None:
        shape, fortran, dtype = read_npy_header(io.BytesIO(head))
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed in shards")
        cached = (hlen, dtype, shape, "F" if fortran else "C", math.prod(shape))
        if len(_NPY_HEADERS) < 256:
            _NPY_HEADERS[head] = cached
    hlen, dtype, shape, order, count = cached
    arr = np.frombuffer(data, dtype=dtype, offset=hlen, count=count)
    return arr if len(shape) == 1 else arr.reshape(shape, order=order)


_JSON = json.JSONDecoder()


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw WebDataset sample (extension -> bytes) to python values: json -> dict, *.npy -> arrays."""
    out: dict[str, Any] = {"__key__": sample.get("__key__"), "__url__": sample.get("__url__")}
    for ext, value in sample.items():
        if ext[:2] == "__":
            continue
        if ext == "json":
            out["json"] = json_member(value, url=str(sample.get("__url__")), key=str(sample.get("__key__")))
        elif ext[-3:] == "npy":
            try:
                out[ext[:-4] or "npy"] = npy_from_bytes(value)
            except (ValueError, IndexError, TypeError) as err:
                raise ShardError(f"{sample.get('__url__')}: member {sample.get('__key__')}.{ext} is not a "
                                 f"valid .npy ({err}); the shard is corrupt") from None
        else:
            out[ext] = value
    return out


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "__url__", extension: bytes}) of one shard, read in one request and
    parsed in memory (array-parsed when the layout is regular)."""
    data = storage.read_bytes(url)
    regular = parse_regular_tar(data)
    if regular is not None:
        keys, members = regular
        cols = [(ext, offs.tolist()) for ext, offs in members.items()]
        for i, key in enumerate(keys):
            sample: dict[str, Any] = {"__key__": key, "__url__": url}
            for ext, offs in cols:
                o, n = offs[i]
                sample[ext] = data[o: o + n]
            yield sample
        return
    for key, parts in group_samples(parse_tar_bytes(data, what=url)):
        yield {"__key__": key, "__url__": url, **{ext: data[o: o + n] for ext, (o, n) in parts.items()}}
