"""One preprocessing for ingest, embed and locate (`load_rgb`): EXIF orientation applied whether the
ingest kept a JPEG byte for byte or re-encoded it, the pixel limit enforced from the header, clear
RecordErrors for what cannot be used. The reference for orientation is NumPy's rot90 of the decoded
pixels (EXIF orientation 6: the stored pixels are shown turned 90 degrees clockwise)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from locdiff.data.config import load_dataset_config
from locdiff.data.images import load_rgb, prepare_image
from locdiff.data.ingest import ingest
from locdiff.data.manifest import read_manifest
from locdiff.data.shards import stage_dir
from locdiff.data.validation import RecordError, sha256_bytes

from .fixtures import jpeg, png, read_samples, with_orientation, write_csv


def pixels(data: bytes) -> np.ndarray:
    """Decoded pixels as stored, ignoring EXIF (the independent reference)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def rotated() -> tuple[bytes, np.ndarray]:
    """A 96 x 72 JPEG tagged Orientation=6, and the upright pixels it stands for (72 wide, 96 high)."""
    raw = jpeg(11, size=(96, 72))
    return with_orientation(raw, 6), np.rot90(pixels(raw), k=-1)


def test_orientation_is_applied_from_bytes_path_and_pil(rotated, tmp_path):
    data, upright = rotated
    assert Image.open(io.BytesIO(data)).size == (96, 72)  # as stored: landscape
    (tmp_path / "a.jpg").write_bytes(data)
    for src in (data, str(tmp_path / "a.jpg"), tmp_path / "a.jpg", Image.open(io.BytesIO(data))):
        im = load_rgb(src)
        assert im.mode == "RGB" and im.size == (72, 96)
        np.testing.assert_array_equal(np.asarray(im), upright)  # exact: same decoder, then a rotation


@pytest.mark.parametrize("orientation,k,flip", [(1, 0, False), (3, 2, False), (6, -1, False), (8, 1, False),
                                                (2, 0, True)])
def test_every_orientation_matches_numpy(orientation, k, flip):
    raw = jpeg(12, size=(40, 24))
    want = np.rot90(pixels(raw), k=k)
    want = want[:, ::-1] if flip else want
    np.testing.assert_array_equal(np.asarray(load_rgb(with_orientation(raw, orientation))), want)


def test_kept_and_reencoded_copies_are_seen_the_same_way(rotated):
    """The ingest keeps a small JPEG byte for byte (EXIF and all) and re-encodes a larger one (rotated,
    EXIF dropped); what the encoder sees of either is the same upright picture."""
    data, upright = rotated
    kept = prepare_image(data, max_side=128)
    assert not kept.reencoded and kept.data == data
    small = prepare_image(data, max_side=48)  # forces the re-encoded path
    assert small.reencoded and (small.width, small.height) == (36, 48)  # portrait: upright
    assert 0x0112 not in Image.open(io.BytesIO(small.data)).getexif()  # not rotated a second time
    seen_kept, seen_small = load_rgb(kept.data), load_rgb(small.data)
    np.testing.assert_array_equal(np.asarray(seen_kept), upright)
    ref = np.asarray(Image.fromarray(upright).resize((36, 48), Image.Resampling.LANCZOS), dtype=np.float32)
    assert seen_small.size == (36, 48)
    assert np.abs(np.asarray(seen_small, dtype=np.float32) - ref).mean() < 6  # JPEG loss only
    # and the same as locating the photo directly at the data set's max_side
    assert load_rgb(data, max_side=48).size == (36, 48)


def test_large_jpeg_is_resized_to_max_side_after_orientation():
    raw = with_orientation(jpeg(13, size=(400, 300)), 6)
    im = load_rgb(raw, max_side=100)
    assert im.size == (75, 100)
    ref = np.asarray(load_rgb(raw).resize((75, 100), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(np.asarray(im, dtype=np.float32) - ref).mean() < 6  # decoded at reduced scale first


def test_ingest_then_read_back_applies_orientation_once(rotated, tmp_path):
    data, upright = rotated
    src = tmp_path / "src"
    src.mkdir()
    (src / "exif.jpg").write_bytes(data)
    (src / "plain.png").write_bytes(png(3))
    write_csv(src / "metadata.csv", [{"id": "exif.jpg", "lat": "1", "lon": "2"},
                                     {"id": "plain.png", "lat": "3", "lon": "4"}])
    for max_side, kept in ((128, True), (48, False)):
        root = tmp_path / f"root{max_side}"
        cfg = load_dataset_config("folder", max_side=max_side)
        ingest("folder", str(root), source=str(src), config=cfg, progress=False)
        d = stage_dir(str(root), "folder", "images")
        samples = {s["json"]["id"]: s for s in read_samples(
            [f"{d}/{e['shard']}" for e in read_manifest(d)["shards"]])}
        stored = samples["exif.jpg"]["jpg"]
        assert (sha256_bytes(stored) == sha256_bytes(data)) is kept
        w, h = load_rgb(stored).size
        assert h > w  # upright either way


def test_pixel_limit_and_errors_are_record_errors(tmp_path):
    big = jpeg(14, size=(300, 200))
    with pytest.raises(RecordError) as err:
        load_rgb(big, max_pixels=50_000)
    assert err.value.reason == "too_large" and "300 x 200" in str(err.value)
    with pytest.raises(RecordError) as err:
        load_rgb(Image.new("RGB", (300, 200)), max_pixels=50_000)
    assert err.value.reason == "too_large"
    with pytest.raises(RecordError) as err:
        prepare_image(big, max_side=512, max_pixels=50_000)
    assert err.value.reason == "too_large"
    cases = {"missing_file": str(tmp_path / "nope.jpg"), "undecodable": b"not an image at all",
             "truncated": big[: len(big) // 2], "refused_url": "http://example.org/a.jpg"}
    for reason, src in cases.items():
        with pytest.raises(RecordError) as err:
            load_rgb(src)
        assert err.value.reason == reason, (reason, err.value)
    (tmp_path / "big.jpg").write_bytes(big)
    with pytest.raises(RecordError) as err:
        load_rgb(tmp_path / "big.jpg", max_bytes=1000)
    assert err.value.reason == "too_big"


def test_modes_are_converted_to_rgb():
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        im = Image.new(mode, (10, 8))
        buf = io.BytesIO()
        im.save(buf, format="TIFF")
        assert load_rgb(buf.getvalue()).mode == "RGB"
        assert load_rgb(im).mode == "RGB"


def test_an_image_over_pils_bomb_limit_is_a_row_error_without_a_warning(tmp_path):
    """A 10,000 x 10,000 PNG (100 Mpx, 97 kB of zeros) is too_large, and PIL's DecompressionBombWarning does not
    reach stderr (`locate` printed it as two extra lines). In a fresh interpreter: pytest resets the warning
    filters a program runs with."""
    import subprocess
    import sys

    path = tmp_path / "big.png"
    Image.new("L", (10_000, 10_000)).save(path)
    code = ("from locdiff.data.images import load_rgb\nfrom locdiff.data.validation import RecordError\n"
            f"try:\n    load_rgb({str(path)!r})\nexcept RecordError as err:\n    print(err.reason)\n"
            "    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == "too_large", proc
    assert proc.stderr == "", proc.stderr
    # in the project's terms: the limit is max_image_pixels (64 Mpx), not PIL's guard (twice that)
    assert "100 Mpx is above the limit of 64 Mpx (max_image_pixels)" in proc.stdout, proc.stdout
    assert "128000000" not in proc.stdout


@pytest.mark.parametrize("image", [None, 5, 10**12, [1, 2, 3], 2.5], ids=["None", "5", "1e12", "list", "float"])
def test_what_is_neither_a_path_bytes_nor_an_image_is_a_row_error(image):
    """`Geolocator.locate([None])` raised TypeError, and `locate([10**12])` asked for a terabyte of zeros
    (bytes(10**12)): anything other than a path, bytes or a PIL image is an undecodable record."""
    with pytest.raises(RecordError) as err:
        load_rgb(image)
    assert err.value.reason == "undecodable" and type(image).__name__ in str(err.value)
