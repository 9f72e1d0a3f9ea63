"""Images: the one preprocessing every path shares, and the stored JPEG of the ingest stage.

`load_rgb` turns image bytes, a file path or a PIL image into the RGB image an encoder sees: header
read first and the pixel limit enforced before anything is decoded, EXIF orientation applied, converted
to RGB, optionally resized to `max_side`. The ingest stage stores `load_rgb(data, max_side=...)`
re-encoded as JPEG, except JPEGs already within `max_side`, which it keeps byte for byte (EXIF and
all); the embed stage and photo location (`locdiff locate`) call `load_rgb` on what they read, so a
stored JPEG with an EXIF orientation tag is embedded rotated exactly as its re-encoded copy would be.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

from PIL import Image, ImageOps

from locdiff.data import storage
from locdiff.data.config import MAX_IMAGE_BYTES
from locdiff.data.validation import (
    DEFAULT_MAX_PIXELS,
    RecordError,
    check_pixels,
    jpeg_ends,
    jpeg_header,
    open_header,
    open_image,
    pil_bomb,
)

DEFAULT_MAX_IMAGE_BYTES = MAX_IMAGE_BYTES


@dataclass
class StoredImage:
    data: bytes  # JPEG bytes to store
    width: int
    height: int
    reencoded: bool  # False when the source bytes were kept unchanged


def _decode_error(err: Exception, max_pixels: int | None = None) -> RecordError:
    if isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return pil_bomb(err, max_pixels)
    return RecordError("truncated" if "truncated" in str(err) else "undecodable", str(err) or
                       type(err).__name__)


def load_rgb(image: bytes | str | os.PathLike | Image.Image, *, max_side: int | None = None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS,
             max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Image.Image:
    """The RGB image an encoder sees, from image bytes, a local file path or a PIL image.

    The same steps for every caller (ingest, embed, locate): the pixel count is checked from the
    header before any decoding; the EXIF orientation is applied; the image is converted to RGB; when
    `max_side` is given, an image whose longest side is larger is resized to it (Lanczos; JPEGs are
    decoded at a reduced scale first, so a large photo never takes its full size in memory).

    Args:
        image: JPEG/PNG/WebP/... bytes, a local path (or file:// URL), or a PIL image.
        max_side: longest side of the result; None keeps the size (after orientation).
        max_pixels: pixel limit (width x height of the file); None for no limit.
        max_bytes: byte limit of a file or of the bytes given.

    Raises:
        RecordError: missing_file, too_big (file above max_bytes), too_large (above max_pixels),
            undecodable or truncated; never any other exception for bad image data.
    """
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:  # as open_header refuses a file of no pixels
            raise RecordError("undecodable", f"image size {image.size}")
        check_pixels(image.size, max_pixels)
        im = image
    else:
        if isinstance(image, str | os.PathLike):
            path = str(image)
            if storage.is_remote(path) and not path.startswith("file://"):
                raise RecordError("refused_url", f"{path}: load_rgb reads local files only; fetch URLs "
                                                 "with locdiff.data.download.fetch")
            try:
                data = storage.read_bytes(path, max_bytes=max_bytes)
            except FileNotFoundError as err:
                raise RecordError("missing_file", str(err)) from None
            except storage.TooBigError as err:
                raise RecordError("too_big", str(err)) from None
            except OSError as err:
                raise RecordError("missing_file", f"{path}: {err.strerror or err}") from None
        elif isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image)
            if max_bytes is not None and len(data) > max_bytes:
                raise RecordError("too_big", f"{len(data):,} bytes, above the limit of {max_bytes:,} bytes")
        else:  # bytes(None) fails, bytes(10**12) allocates a terabyte of zeros
            raise RecordError("undecodable", f"not an image: a {type(image).__name__} (give a path, image bytes "
                                             "or a PIL image)")
        im = open_header(data, max_pixels=max_pixels)
    try:
        orientation = im.getexif().get(0x0112, 1)
        swapped = orientation in (5, 6, 7, 8)  # orientations that turn it by 90 degrees
        w, h = (im.height, im.width) if swapped else im.size  # the size after orientation
        if max_side is not None and im.format == "JPEG" and max(w, h) > max_side:
            scale = max_side / max(w, h)
            # decode at the smallest 1/2, 1/4 or 1/8 scale that is still at least the target size
            im.draft("RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))
        im.load()
        # an upright file's image is used as decoded (exif_transpose would copy it: 10 % of a photo's
        # preparation); the caller's own PIL image is still never returned itself
        if orientation != 1 or im is image:
            im = ImageOps.exif_transpose(im)
        if im.mode != "RGB":
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise _decode_error(err, max_pixels) from None
    if max_side is not None and max(w, h) > max_side:
        # the target size comes from the file's size (not the draft's), so it does not depend on it
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return im


def prepare_image(data: bytes, *, max_side: int = 512, quality: int = 90, verify: str = "header",
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> StoredImage:
    """Validate image bytes and return the JPEG to store, its longest side at most `max_side`.

    A baseline/progressive JPEG in RGB or greyscale whose longest side is within `max_side` is stored
    byte for byte (validated, not decoded: see `open_image`; its EXIF orientation is applied when it is
    read back through `load_rgb`); anything else (other formats, CMYK, larger images) becomes
    `load_rgb(data, max_side=max_side)` re-encoded at `quality`. Images above `max_pixels` are refused
    from their header, never decoded.

    Raises:
        RecordError: undecodable, truncated or too_large.
    """
    if verify == "header":
        # fast path: a whole (end marker present) RGB/greyscale JPEG within the limit is kept as-is
        head = jpeg_header(data)
        if head is not None and head[2] in (1, 3) and max(head[:2]) <= max_side and jpeg_ends(data):
            check_pixels(head[:2], max_pixels)
            return StoredImage(data, head[0], head[1], False)
    im = open_image(data, verify=verify, max_pixels=max_pixels)
    if im.format == "JPEG" and im.mode in ("RGB", "L") and max(im.size) <= max_side:
        return StoredImage(data, im.width, im.height, False)
    rgb = load_rgb(data, max_side=max_side, max_pixels=max_pixels)
    out = io.BytesIO()
    try:
        rgb.save(out, format="JPEG", quality=quality, optimize=False)
    except (OSError, ValueError) as err:
        raise _decode_error(err) from None
    return StoredImage(out.getvalue(), rgb.width, rgb.height, True)
