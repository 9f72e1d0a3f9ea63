"""Validation of records and images: what is skipped, why, and what is fatal.

One bad record never stops a stage: it is skipped, logged with its id and reason, and counted per reason
in the stage's manifest. A whole source that is wrong (no CSV, no coordinate columns, a published
checksum that does not match) raises an error naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from locdiff.data.config import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

# The pixel limit of every image the data layer opens (max_image_pixels in a data set config). PIL's own
# guard is set to the same value, so it warns only for images above it (which are refused anyway) and
# refuses those above twice it at open; a larger max_pixels given to a function raises PIL's guard to it.
DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
# PIL's bomb warning (between its limit and twice it) is raised: a row's too_large, not two lines on stderr
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# the reasons a record can be skipped for (keys of the manifest's "skipped")
REASONS = (
    "missing_id", "duplicate_id", "missing_coordinates", "invalid_coordinates",
    "missing_file", "unreachable", "damaged_archive", "undecodable", "truncated",
    "checksum_mismatch", "invalid_embedding",
    "outside_source",  # a file reference that is absolute, has '..' or a symlink leading out of the source
    "refused_url",  # an image URL that is not http(s):// or s3:// (file://, a bare path, ...)
    "refused_address",  # a host that resolves to a private, loopback, link-local... address (or redirects to one)
    "too_big",  # more bytes than the per-file limit (max_image_bytes): reading stopped at the limit
    "too_large",  # more pixels than the limit (max_image_pixels): never decoded (decompression bombs)
    "no_coordinates",  # a photo listed without a metadata file that carries no (usable) GPS tag either
)
EXAMPLES_PER_REASON = 20  # ids kept per reason in the manifest (all are logged)


class SourceError(ValueError):
    """A whole source is unusable (no CSV, missing columns, unreadable archive)."""


class ChecksumError(ValueError):
    """A file's checksum differs from the published or recorded one."""


class ShardError(ValueError):
    """A shard that cannot be read: cut short, a damaged tar header or a member that does not parse.
    The message is one line naming the shard (and the member)."""


class RecordError(Exception):
    """One record cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class SkipLog:
    """Counts of skipped records per reason, with the first few ids of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, record_id: str, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES_PER_REASON:
            ex.append(str(record_id))
        log.warning("skipped %r: %s%s", record_id, reason, f" ({detail})" if detail else "")

    def merge(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        for reason, n in counts.items():
            self.counts[reason] += int(n)
            ex = self.examples.setdefault(reason, [])
            ex.extend(examples.get(reason, [])[: max(0, EXAMPLES_PER_REASON - len(ex))])

    def to_json(self) -> dict[str, Any]:
        return {"skipped": {k: int(self.counts[k]) for k in sorted(self.counts)},
                "skipped_examples": {k: self.examples[k] for k in sorted(self.examples)}}

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))


# a coordinate as CSV files write one: ASCII digits (Python's float() also reads "1_0" as 10 and other scripts'
# digits, "١" as 1), with the words float() knows for infinity and NaN (refused later as invalid or missing)
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|infinity|nan)\s*",
                     re.ASCII | re.IGNORECASE)


def parse_coordinate(value: Any) -> float | None:
    """A float from a CSV cell, None when empty or not a number (`_NUMBER`)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and not _NUMBER.fullmatch(value):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def check_record_coordinates(lat: Any, lon: Any) -> tuple[float, float]:
    """(lat, lon) as floats, or RecordError: missing_coordinates / invalid_coordinates."""
    la, lo = parse_coordinate(lat), parse_coordinate(lon)
    if la is None or lo is None:
        raise RecordError("missing_coordinates", f"lat={lat!r}, lon={lon!r}")
    if not (math.isfinite(la) and math.isfinite(lo)) or not -90 <= la <= 90 or not -180 <= lo <= 360:
        raise RecordError("invalid_coordinates",
                          f"lat={la!r} must be in [-90, 90] and lon={lo!r} in [-180, 360] degrees")
    return la, lo


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_checksum(data: bytes | Iterable[bytes], *, sha256: str | None = None, md5: str | None = None,
                   what: str = "") -> str:
    """The sha256 of `data` (bytes, or a file's blocks in order: never joined); ChecksumError when it differs
    from a given sha256 or md5."""
    h, h5 = hashlib.sha256(), hashlib.md5() if md5 else None
    for block in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
        h.update(block)
        if h5 is not None:
            h5.update(block)
    digest = h.hexdigest()
    if sha256 and digest != sha256.lower():
        raise ChecksumError(f"{what}: sha256 {digest} differs from the expected {sha256}")
    if md5 and h5 is not None and h5.hexdigest() != md5.lower():
        raise ChecksumError(f"{what}: md5 {h5.hexdigest()} differs from the expected {md5}")
    return digest


def check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    """RecordError("too_large") when an image of `size` (width, height) has more than `max_pixels`."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise RecordError("too_large", f"{w} x {h} pixels ({w * h / 1e6:.0f} Mpx) is above the limit of "
                                       f"{max_pixels / 1e6:g} Mpx (max_image_pixels)")


def pil_bomb(err: Exception, max_pixels: int | None = None) -> RecordError:
    """RecordError("too_large") for what PIL's decompression-bomb guard refused, in the project's terms: PIL's
    own message quotes its limit (twice Image.MAX_IMAGE_PIXELS), not max_image_pixels."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(found.group(1)) / 1e6:.0f} Mpx" if found else "the image"
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    return RecordError("too_large", f"{size} is above the limit of {limit / 1e6:g} Mpx (max_image_pixels)")


def _raise_pil_limit(max_pixels: int | None) -> None:
    """Let PIL open what our own limit allows (its guard refuses above twice MAX_IMAGE_PIXELS)."""
    if Image.MAX_IMAGE_PIXELS is not None and (max_pixels is None or max_pixels > Image.MAX_IMAGE_PIXELS):
        Image.MAX_IMAGE_PIXELS = max_pixels


_IMAGE_STARTS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # a JPEG's SOI and first marker, PNG's signature


def open_header(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes reading the header only, and check the pixel count before anything is decoded.

    Raises:
        RecordError: truncated (empty, or a JPEG or PNG beginning cut before its header ends), undecodable
            (not an image), too_large (above `max_pixels`, including what PIL's decompression-bomb guard
            refuses).
    """
    if not data:
        raise RecordError("truncated", "empty file")
    _raise_pil_limit(max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
        im.size  # noqa: B018 (parses the header)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise pil_bomb(err, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # a JPEG or PNG beginning that Pillow cannot identify, or whose header it ran out of, is a cut file
        if (isinstance(err, UnidentifiedImageError) and bytes(data[:8]).startswith(_IMAGE_STARTS)
                or isinstance(err, OSError) and "truncated" in str(err).lower()):
            raise RecordError("truncated", f"cut short: {err}") from None
        raise RecordError("undecodable", f"not an image: {err}") from None
    if im.width < 1 or im.height < 1:
        raise RecordError("undecodable", f"image size {im.size}")
    check_pixels(im.size, max_pixels)
    return im


def open_image(data: bytes, *, verify: str = "header", max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> Image.Image:
    """Open image bytes and check they are a whole image within the pixel limit.

    The header is read first and an image above `max_pixels` is refused (too_large) before any pixel
    is decoded. verify="header" then checks, for JPEG, the end-of-image marker (a cut file lacks it)
    without decoding the pixels; "decode" decodes the whole image (at reduced scale for JPEG).

    Raises:
        RecordError: undecodable, truncated or too_large.
    """
    im = open_header(data, max_pixels=max_pixels)
    # a JPEG without its end-of-image marker is usually cut short: decode it to find out
    if verify == "decode" or im.format != "JPEG" or not jpeg_ends(data):
        try:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        except OSError as err:
            reason = "truncated" if "truncated" in str(err) else "undecodable"
            raise RecordError(reason, str(err)) from None
        except (SyntaxError, ValueError, EOFError) as err:
            raise RecordError("undecodable", str(err)) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise pil_bomb(err, max_pixels) from None
        im = Image.open(io.BytesIO(data))  # fresh handle (draft changed the decoder scale)
    return im


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, or None when the bytes are not a
    well-formed JPEG up to its start of frame. Reads the marker segments only (microseconds)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        length = int.from_bytes(data[i + 2: i + 4], "big")
        if length < 2:
            return None
        if marker in _SOF:
            if length < 8 or i + 10 > n:
                return None
            h = int.from_bytes(data[i + 5: i + 7], "big")
            w = int.from_bytes(data[i + 7: i + 9], "big")
            return (w, h, data[i + 9]) if w and h else None
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            return None
        i += 2 + length
    return None


def jpeg_ends(data: bytes) -> bool:
    # EOI (FF D9), possibly followed by a little padding/trailer that some cameras append
    return data[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
