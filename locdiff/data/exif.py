"""A photo's own GPS tag: the EXIF GPSInfo IFD read with Pillow (header only, nothing decoded).

`gps_coordinates` gives (lat, lon) in degrees, None when the photo carries no position, and raises
`ExifError` (one line, a ValueError) for a tag that is there but cannot be a position: a reference other
than N/S or E/W, a value that is not three finite numbers, minutes or seconds over 60, a latitude over
90 or a longitude over 180. (0, 0) is taken as "no fix" (what many cameras write without one). Whatever
Pillow raises on a damaged EXIF block is an ExifError too, and so is a warning it gives while skipping the
GPS tag or one of the GPS block's entries, or while cutting the main directory short before a GPS tag was
met (Pillow mostly warns and skips rather than raises; a damaged tag that is not about GPS, a maker note,
leaves the GPS answer alone): a bad tag is counted or reported on one line, never a traceback, and Pillow's
warning itself never reaches the user. The EXIF block of a JPEG is at most 64 KiB (one APP1 segment), so
reading it is bounded.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

from PIL import Image

from locdiff.geo import haversine_km

GPS_IFD = 0x8825  # ExifTags.IFD.GPSInfo
LAT_REF, LAT, LON_REF, LON = 1, 2, 3, 4  # GPSLatitudeRef, GPSLatitude, GPSLongitudeRef, GPSLongitude
DISAGREE_KM = 1.0  # a metadata position this far from the photo's own tag is counted as a disagreement
_GPS_TAG = re.compile(rf"\btag {GPS_IFD}\b")  # Pillow's "... Skipping tag 34853" about IFD0's GPS pointer
_WATCH = threading.Lock()  # the warnings module's state is global: one EXIF read watches it at a time
T = TypeVar("T")


class ExifError(ValueError):
    """A GPS tag that is present but unusable (its message is one line)."""


def _watched(read: Callable[[], T]) -> tuple[T, list[str]]:
    """read()'s result and the warnings this thread got meanwhile (Pillow warns and skips a damaged tag);
    another thread's warnings go where they went before."""
    me, mine = threading.get_ident(), []
    with _WATCH, warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if threading.get_ident() == me:
                mine.append(" ".join(str(message).split())[:200])
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.filterwarnings("always", category=UserWarning, module=r"PIL\.")  # not once per message
        return read(), mine


def _degrees(value: object, what: str) -> float:
    try:
        parts = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ExifError(f"GPS {what} {value!r} is not three numbers ({err})") from None
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts):
        raise ExifError(f"GPS {what} {tuple(parts)} is not degrees, minutes, seconds")
    d, m, s = parts
    if m >= 60 or s > 60:  # some writers round seconds up to 60
        raise ExifError(f"GPS {what} {tuple(parts)}: minutes or seconds out of range")
    return d + m / 60 + s / 3600


def _ref(value: object, allowed: str, what: str) -> str:
    ref = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    ref = ref.strip("\x00 ").upper()
    if ref not in allowed:
        raise ExifError(f"GPS {what} reference {ref!r} is not one of {', '.join(allowed)}")
    return ref


def gps_from_exif(exif: Image.Exif) -> tuple[float, float] | None:
    """(lat, lon) of an Exif object's GPSInfo IFD; None without a position; ExifError when malformed."""
    try:
        gps, warned = _watched(lambda: exif.get_ifd(GPS_IFD))
    except Exception as err:  # noqa: BLE001 - Pillow's IFD reader on damaged bytes
        raise ExifError(f"unreadable GPS block ({type(err).__name__})") from None
    if warned:  # an entry of the GPS block skipped
        raise ExifError(f"unreadable GPS block ({warned[0]})")
    if not gps or LAT not in gps or LON not in gps:
        return None
    lat = _degrees(gps[LAT], "latitude")
    lon = _degrees(gps[LON], "longitude")
    if _ref(gps.get(LAT_REF, "N"), "NS", "latitude") == "S":
        lat = -lat
    if _ref(gps.get(LON_REF, "E"), "EW", "longitude") == "W":
        lon = -lon
    if abs(lat) > 90 or abs(lon) > 180:
        raise ExifError(f"GPS position ({lat:.6g}, {lon:.6g}) is off the globe")
    if lat == 0 and lon == 0:
        return None
    return lat, lon


def gps_coordinates(image: bytes | str | os.PathLike | Image.Image) -> tuple[float, float] | None:
    """(lat, lon) of a photo's GPS tag (image bytes, a local path or a PIL image); None without one.

    Raises:
        ExifError: a GPS tag that is present but unusable, or an EXIF block Pillow cannot read.
    """
    def read() -> Image.Exif:
        if isinstance(image, Image.Image):
            raw = image.info.get("exif")
            if not isinstance(raw, bytes):
                return image.getexif()
            exif = Image.Exif()  # read afresh: what Pillow warned when the image's own was read is gone
            exif.load(raw)
            return exif
        with Image.open(io.BytesIO(bytes(image)) if isinstance(image, bytes | bytearray | memoryview)
                        else image) as im:
            return im.getexif()

    try:
        exif, warned = _watched(read)
    except OSError:
        return None  # not an image at all: the decoder says so where the pixels are read
    except Exception as err:  # noqa: BLE001 - Pillow on a crafted header
        raise ExifError(f"unreadable EXIF ({type(err).__name__})") from None
    if skipped := [w for w in warned if _GPS_TAG.search(w)]:  # the pointer to the GPS block skipped
        raise ExifError(f"unreadable GPS block ({skipped[0]})")
    if GPS_IFD not in exif and (cut := [w for w in warned if w.startswith("Corrupt EXIF data")]):
        raise ExifError(f"unreadable EXIF ({cut[0]})")  # the directory ends before a GPS pointer was met
    return gps_from_exif(exif)


def gps_or_none(image: bytes | str | os.PathLike | Image.Image) -> tuple[tuple[float, float] | None, str | None]:
    """(position or None, the ExifError's message or None): for callers that count bad tags."""
    try:
        return gps_coordinates(image), None
    except ExifError as err:
        return None, str(err)


def distance_km(a: tuple[float, float] | None, lat: float, lon: float) -> float:
    """Great-circle distance from a GPS tag to (lat, lon); NaN when there is no tag."""
    if a is None or not (math.isfinite(lat) and math.isfinite(lon)):
        return float("nan")
    return float(haversine_km(a[0], a[1], lat, lon))


def gps_exif(lat: float, lon: float) -> Image.Exif:
    """An Exif object carrying (lat, lon) as a GPS tag (degrees, minutes, seconds): for writing tagged
    photos (tests, synthetic data)."""
    exif = Image.Exif()

    def dms(x: float) -> tuple[float, float, float]:
        x = abs(x)
        d = int(x)
        m = int((x - d) * 60)
        return float(d), float(m), round((x - d - m / 60) * 3600, 4)

    exif[GPS_IFD] = {LAT_REF: "N" if lat >= 0 else "S", LAT: dms(lat), LON_REF: "E" if lon >= 0 else "W",
                     LON: dms(lon)}
    return exif


def with_gps(jpeg: bytes, lat: float, lon: float) -> bytes:
    """The same JPEG bytes with an EXIF segment carrying (lat, lon) as a GPS tag (the pixels are not
    re-encoded): for writing tagged photos (the demo's, tests)."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    segment = gps_exif(lat, lon).tobytes()  # starts with b"Exif\0\0"
    return jpeg[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + jpeg[2:]
