"""Image bytes to the stored JPEG: kept as-is when already a JPEG within the size limit, else re-encoded."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from locdiff.data.validation import RecordError, jpeg_ends, jpeg_header, open_image


@dataclass
class StoredImage:
    data: bytes  # JPEG bytes to store
    width: int
    height: int
    reencoded: bool  # False when the source bytes were kept unchanged


def prepare_image(data: bytes, *, max_side: int = 512, quality: int = 90,
                  verify: str = "header") -> StoredImage:
    """Validate image bytes and return the JPEG to store, its longest side at most `max_side`.

    A baseline/progressive JPEG in RGB or greyscale whose longest side is within `max_side` is stored
    byte for byte (validated, not decoded: see `open_image`); anything else (other formats, CMYK,
    larger images) is decoded, EXIF-rotated, resized with Lanczos and re-encoded at `quality`.

    Raises:
        RecordError: undecodable or truncated.
    """
    if verify == "header":
        # fast path: a whole (end marker present) RGB/greyscale JPEG within the limit is kept as-is
        head = jpeg_header(data)
        if head is not None and head[2] in (1, 3) and max(head[:2]) <= max_side and jpeg_ends(data):
            return StoredImage(data, head[0], head[1], False)
    im = open_image(data, verify=verify)
    if im.format == "JPEG" and im.mode in ("RGB", "L") and max(im.size) <= max_side:
        return StoredImage(data, im.width, im.height, False)
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode != "RGB":
            im = im.convert("RGB")
        if max(im.size) > max_side:
            scale = max_side / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=quality, optimize=False)
    except OSError as err:
        raise RecordError("truncated" if "truncated" in str(err) else "undecodable", str(err)) from None
    return StoredImage(out.getvalue(), im.width, im.height, True)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode stored JPEG bytes to an RGB PIL image (RecordError when undecodable)."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated" if "truncated" in str(err) else "undecodable"
        raise RecordError(reason, str(err)) from None
    return im.convert("RGB") if im.mode != "RGB" else im
