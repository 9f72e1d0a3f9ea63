"""Synthetic geotagged photos and a synthetic image encoder, for the demo and the tests: no download.

- `write_photos(out, n)`: n small JPEGs at places drawn from the gazetteer's cities (weighted by
  population), whose colours and stripes vary smoothly with the location (so even a random encoder
  sees nearby places as similar), plus `metadata.csv` (id, lat, lon) in the layout of the `folder`
  data set source. Seeded: the same arguments give the same bytes.
- `tiny_clip(path)`: a randomly initialised CLIP (a 2-layer 32-wide vision tower on 32x32 pixels,
  16-d embeddings) built from a transformers config and saved with `save_pretrained`, so that
  `locdiff data embed --encoder PATH` and `locdiff locate` run the real CLIP code path on it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from locdiff.data.exif import with_gps
from locdiff.gazetteer import cities
from locdiff.geo import EARTH_RADIUS_KM, latlon_to_unit, unit_to_latlon

TINY_CLIP_DIM = 16


def photo(lat: float, lon: float, seed: int, size: tuple[int, int] = (64, 48), quality: int = 90) -> bytes:
    """JPEG bytes of a picture whose colours and stripes are smooth functions of (lat, lon), with noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) / max(w, h)
    la, lo = np.deg2rad(lat), np.deg2rad(lon)
    freq = 2.0 + 10.0 * abs(np.sin(la))
    angle = lo
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    base = np.array([np.sin(lo), np.sin(2 * la), np.cos(lo + la)])
    img = 128 + 90 * base[None, None, :] + 30 * stripes[..., None] * np.array([1.0, -0.5, 0.3])
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_places(n: int, seed: int = 0, jitter_km: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """n (lat, lon) near the gazetteer's cities, drawn by population, jittered by about jitter_km."""
    c = cities()
    rng = np.random.default_rng(seed)
    p = c.population / c.population.sum()
    idx = rng.choice(len(p), size=n, p=p)
    v = latlon_to_unit(c.lat[idx], c.lon[idx]) + rng.normal(0, jitter_km / EARTH_RADIUS_KM, (n, 3))
    lat, lon = unit_to_latlon(v / np.linalg.norm(v, axis=1, keepdims=True))
    return np.round(lat, 6), np.round(lon, 6)


def write_photos(out: str | Path, n: int, *, seed: int = 0, prefix: str = "photo", metadata: bool = True,
                 gps: bool = False) -> Path:
    """Write n photos OUT/PREFIX-00000.jpg ... and OUT/metadata.csv (id, lat, lon; left out with
    metadata=False: unlabelled photos); gps=True writes each photo's place into its EXIF GPS tag, as a
    phone does. Returns OUT."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lat, lon = sample_places(n, seed)
    rows = []
    for i in range(n):
        rid = f"{prefix}-{i:05d}"
        data = photo(float(lat[i]), float(lon[i]), seed * 1_000_003 + i)
        (out / f"{rid}.jpg").write_bytes(with_gps(data, float(lat[i]), float(lon[i])) if gps else data)
        rows.append({"id": rid, "lat": repr(float(lat[i])), "lon": repr(float(lon[i]))})
    if metadata:
        with open(out / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "lat", "lon"])
            w.writeheader()
            w.writerows(rows)
    return out


def tiny_clip(path: str | Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised tiny CLIP (model and image processor) to path; returns path. Skipped
    when path already holds one."""
    import transformers  # heavy: only here

    hf_logging = transformers.utils.logging
    CLIPConfig, CLIPModel = transformers.CLIPConfig, transformers.CLIPModel
    try:  # transformers >= 5: the PIL backend by name (CLIPImageProcessor warns that it falls back to it)
        CLIPImageProcessor = transformers.CLIPImageProcessorPil
    except (AttributeError, ImportError):
        CLIPImageProcessor = transformers.CLIPImageProcessor

    path = Path(path)
    if (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file():
        return path
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one tiny file: no "Writing model shards" bar
    try:
        config = CLIPConfig(
            # bos/eos ids inside the tiny vocabulary (the defaults, 49406/49407, are CLIP's: a warning each)
            text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "vocab_size": 99, "max_position_embeddings": 16,
                         "bos_token_id": 97, "eos_token_id": 98, "pad_token_id": 1},
            vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
            projection_dim=TINY_CLIP_DIM,
        )
        CLIPModel(config).save_pretrained(path)
    finally:
        torch.random.set_rng_state(state)
        if bars:
            hf_logging.enable_progress_bar()
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
