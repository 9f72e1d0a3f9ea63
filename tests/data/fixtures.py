"""Builders for the data-layer test fixtures: generated JPEGs with coordinates from the first rows of
the published test-set metadata (copied into tests/data/fixtures/*.csv), arranged the way each source
publishes them, plus corrupt variants (a truncated JPEG, latitude 123, a missing file, a damaged tar).

Run `python -m tests.data.fixtures OUT` to write the whole set to a folder and look at it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from locdiff.data import storage
from locdiff.data.shards import decode_sample, iter_shard_samples

HERE = Path(__file__).resolve().parent
ROWS = HERE / "fixtures"


def jpeg(seed: int, size: tuple[int, int] = (96, 72), quality: int = 85) -> bytes:
    """A deterministic smooth-colour JPEG (seeded), so every image has distinct bytes."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.02, 0.2, 3)
    img = np.stack([np.sin(xx * a + seed) * 100 + 128, np.cos(yy * b) * 100 + 128,
                    np.sin((xx + yy) * c) * 100 + 128], axis=-1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(seed: int, size: tuple[int, int] = (80, 60)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def with_orientation(data: bytes, orientation: int) -> bytes:
    """The same JPEG bytes with an EXIF Orientation tag added (the pixels are not re-encoded)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    segment = exif.tobytes()  # starts with b"Exif\0\0"
    app1 = b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment
    return data[:2] + app1 + data[2:]


def read_rows(name: str) -> list[dict[str, str]]:
    with open(ROWS / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)


def make_tar(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


class Expect:
    """What a correct ingest of a fixture yields: id -> (lat, lon, sha256 of the stored JPEG or None
    when the image is resized), and skipped counts per reason."""

    def __init__(self) -> None:
        self.good: dict[str, tuple[float, float, str | None]] = {}
        self.skipped: dict[str, int] = {}

    def ok(self, rid: str, lat: str | float, lon: str | float, data: bytes | None) -> None:
        self.good[rid] = (float(lat), float(lon), sha(data) if data is not None else None)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def build_im2gps3k(out: Path, base_url: str) -> Expect:
    """Metadata CSV + a zip of the images under a top folder (as published); corrupt rows: a truncated
    JPEG, latitude 123, an image missing from the zip; one large image is resized; one is a PNG."""
    rows = read_rows("im2gps3k")
    exp, files = Expect(), {}
    for i, row in enumerate(rows):
        rid = row["IMG_ID"]
        data = jpeg(100 + i)
        if i == 1:
            row["LAT"] = "123"
            exp.skip("invalid_coordinates")
        elif i == 2:
            files[f"im2gps3ktest/{rid}"] = data[: len(data) // 2]
            exp.skip("truncated")
            continue
        elif i == 3:
            exp.skip("missing_file")
            continue
        elif i == 4:
            data = jpeg(100 + i, size=(300, 200))  # larger than max_side: re-encoded
            exp.ok(rid, row["LAT"], row["LON"], None)
        elif i == 5:
            data = png(100 + i)  # not a JPEG: re-encoded
            exp.ok(rid, row["LAT"], row["LON"], None)
        else:
            exp.ok(rid, row["LAT"], row["LON"], data)
        files[f"im2gps3ktest/{rid}"] = data
    write_csv(out / "im2gps3k_places365.csv", rows)
    make_zip(out / "im2gps3ktest.zip", files)
    return exp


def build_yfcc26k(out: Path, base_url: str) -> Expect:
    """Metadata CSV + URL list (image_id,url) whose URLs point at `base_url`; a dead link (404) and a
    duplicated id."""
    rows = read_rows("yfcc26k")
    exp, urls = Expect(), []
    for i, row in enumerate(rows):
        rid = row["IMG_ID"]
        name = f"img/{i:03d}.jpg"
        data = jpeg(200 + i)
        if i == 2:
            urls.append({"image_id": rid, "url": f"{base_url}/img/gone-{i}.jpg"})
            exp.skip("missing_file")
            continue
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
        urls.append({"image_id": rid, "url": f"{base_url}/{name}"})
        exp.ok(rid, row["LAT"], row["LON"], data)
    rows.append(dict(rows[0]))  # a duplicate id: the second one is skipped
    exp.skip("duplicate_id")
    write_csv(out / "yfcc25600_places365.csv", rows)
    write_csv(out / "yfcc25600_urls.csv", urls)
    return exp


def build_yfcc4k(out: Path, base_url: str) -> Expect:
    """YFCC100M metadata with PhotoURL rewritten to `base_url`; a missing coordinate and an undecodable
    file."""
    rows = read_rows("yfcc4k")
    exp = Expect()
    for i, row in enumerate(rows):
        data = jpeg(300 + i)
        name = f"photos/{row['name']}"
        row["PhotoURL"] = f"{base_url}/{name}"
        if i == 1:
            row["lat"] = ""
            exp.skip("missing_coordinates")
        elif i == 3:
            data = b"this is not an image" * 10
            exp.skip("undecodable")
        else:
            exp.ok(row["name"], row["lat"], row["lon"], data)
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    write_csv(out / "yfcc4k.csv", rows)
    return exp


def build_mp16(out: Path, base_url: str, dead_url: str) -> Expect:
    """MP-16 layout (metadata + URL list) on rows of the YFCC26k list; a dead link and an unreachable
    host (connection refused: retried, then counted)."""
    rows = read_rows("yfcc26k")[:10]
    exp, urls = Expect(), []
    for i, row in enumerate(rows):
        rid = row["IMG_ID"]
        data = jpeg(400 + i)
        name = f"mp16img/{i:03d}.jpg"
        if i == 4:
            urls.append({"image_id": rid, "url": f"{base_url}/mp16img/missing.jpg"})
            exp.skip("missing_file")
            continue
        if i == 6:
            urls.append({"image_id": rid, "url": f"{dead_url}/x.jpg"})
            exp.skip("unreachable")
            continue
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
        urls.append({"image_id": rid, "url": f"{base_url}/{name}"})
        exp.ok(rid, row["LAT"], row["LON"], data)
    write_csv(out / "mp16_places365.csv", rows, ["IMG_ID", "AUTHOR", "LAT", "LON"])
    write_csv(out / "mp16_urls.csv", urls)
    return exp


def build_osv5m(out: Path, base_url: str) -> Expect:
    """The osv5m repo layout (test.csv, images/test/00.zip, 01.zip with ID.jpg) on yfcc4k coordinates."""
    src = read_rows("yfcc4k")
    exp, zips, rows = Expect(), [{}, {}], []
    for i, r in enumerate(src):
        rid = str(1_000_000 + i * 7919)
        data = jpeg(500 + i, size=(128, 96))
        rows.append({"id": rid, "latitude": r["lat"], "longitude": r["lon"], "country": "XX",
                     "thumb_original_url": ""})
        if i == 5:
            exp.skip("missing_file")  # in neither zip
            continue
        zips[i % 2][f"{i % 2:02d}/{rid}.jpg"] = data
        exp.ok(rid, r["lat"], r["lon"], data)
    write_csv(out / "test.csv", rows)
    for k, files in enumerate(zips):
        make_zip(out / "images" / "test" / f"{k:02d}.zip", files)
    return exp


def build_folder(out: Path, base_url: str, *, n: int = 10, damaged: bool = False,
                 archive: bool = True) -> Expect:
    """A tar (or folder) holding metadata.csv (id, lat, lon) and ID.jpg images, coordinates from the
    yfcc4k rows (cycled). `damaged` cuts the tar inside the 7th image."""
    src = read_rows("yfcc4k")
    exp, files, rows = Expect(), {}, []
    for i in range(n):
        r = src[i % len(src)]
        rid = f"img{i:04d}"
        lat = float(r["lat"]) + (i // len(src)) * 0.001
        data = jpeg(600 + i)
        rows.append({"id": rid, "lat": repr(lat), "lon": r["lon"]})
        files[f"{rid}.jpg"] = data
        exp.ok(rid, repr(lat), r["lon"], data)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "lat", "lon"])
    w.writeheader()
    w.writerows(rows)
    files = {"metadata.csv": buf.getvalue().encode(), **files}
    if not archive:
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        return exp
    make_tar(out / "folder.tar", files)
    if damaged:
        raw = (out / "folder.tar").read_bytes()
        with tarfile.open(out / "folder.tar") as t:
            cut = next(m for m in t.getmembers() if m.name == "img0006.jpg").offset_data + 100
        (out / "folder.tar").write_bytes(raw[:cut])
        for i in range(6, n):
            del exp.good[f"img{i:04d}"]
            exp.skip("damaged_archive")
    return exp


def build_gws15k(out: Path, base_url: str) -> Expect:
    """A user's folder: data.csv (id, lat, lon, file) + images/ (one listed file absent)."""
    src = read_rows("im2gps3k")
    exp, rows = Expect(), []
    for i, r in enumerate(src[:8]):
        rid = f"gws-{i}"
        data = jpeg(700 + i)
        rows.append({"id": rid, "lat": r["LAT"], "lon": r["LON"], "file": f"images/{rid}.jpg"})
        if i == 3:
            exp.skip("missing_file")
            continue
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "images" / f"{rid}.jpg").write_bytes(data)
        exp.ok(rid, r["LAT"], r["LON"], data)
    write_csv(out / "data.csv", rows)
    return exp


def build_embeddings(out: Path, base_url: str, dim: int = 12) -> tuple[Expect, np.ndarray]:
    """An embeddings Parquet (id, lat, lon, embedding list<float32>) with a bad latitude and a NaN."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = read_rows("im2gps3k")
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(len(src), dim)).astype(np.float32)
    exp = Expect()
    ids, lat, lon = [], [], []
    for i, r in enumerate(src):
        ids.append(f"e{i}")
        la = 123.0 if i == 2 else float(r["LAT"])
        lat.append(la)
        lon.append(float(r["LON"]))
        if i == 2:
            exp.skip("invalid_coordinates")
        elif i == 4:
            emb[i, 3] = np.nan
            exp.skip("invalid_embedding")
        else:
            exp.ok(f"e{i}", la, r["LON"], None)
    table = pa.table({"id": ids, "lat": pa.array(lat, pa.float64()), "lon": pa.array(lon, pa.float64()),
                      "embedding": pa.array(list(emb), pa.list_(pa.float32()))})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "emb.parquet")
    return exp, emb

def read_samples(urls: list[str]) -> list[dict]:
    """Every sample of the shards at `urls`, in order, decoded (json -> dict, .npy -> arrays)."""
    return [decode_sample(s) for url in urls for s in iter_shard_samples(url)]



def child_peak_bytes(script: str, *args: str) -> int:
    """The peak resident memory (VmHWM) of `python -c SCRIPT ARGS...` in a fresh process with one thread, from
    the last word the script prints (its VmHWM in kB)."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1]) * 1024

if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures-out")
    for name, fn in [("im2gps3k", build_im2gps3k), ("yfcc26k", build_yfcc26k), ("yfcc4k", build_yfcc4k),
                     ("osv5m", build_osv5m), ("gws15k", build_gws15k), ("folder", build_folder)]:
        fn(target / name, "http://127.0.0.1:8000/" + name)
    print(f"wrote fixtures to {os.path.abspath(target)}")


@contextlib.contextmanager
def killed_before_placing(monkeypatch, shard: str):
    """Inside: a stage's `storage.put_file_atomic` raises KeyboardInterrupt before it moves `shard` into place
    (the state a SIGKILL leaves there; the scratch file is cleared on re-run), which the block must meet;
    restored after."""
    import pytest

    real = storage.put_file_atomic

    def put(tmp, path):  # noqa: ANN001
        if path.endswith(shard):
            raise KeyboardInterrupt
        real(tmp, path)

    monkeypatch.setattr(storage, "put_file_atomic", put)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(storage, "put_file_atomic", real)
