"""`locdiff data inspect ROOT/NAME`: what a data set folder holds (stages, counts, skipped per reason,
a few samples) and a PNG map of its locations."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np

from locdiff.data import manifest as mf
from locdiff.data import storage
from locdiff.data.shards import ShardDataset

log = logging.getLogger(__name__)


def _stages(folder: str) -> list[tuple[str, str]]:
    """(label, stage folder) of every stage under ROOT/NAME."""
    out = [("images", storage.join(folder, "images"))]
    fs, p = storage.filesystem(storage.join(folder, "features"))
    try:
        encoders = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=True)
                          if e["type"] == "directory")
    except FileNotFoundError:
        encoders = []
    out += [(f"features/{e}", storage.join(folder, "features", e)) for e in encoders]
    return out


def inspect(folder: str, *, samples: int = 3, map_png: str | None = None) -> dict[str, Any]:
    """Summarise ROOT/NAME and draw its locations to `map_png` (default ROOT/NAME/locations.png).

    Raises:
        FileNotFoundError: no stage under the folder has a manifest.
    """
    folder = str(folder).rstrip("/")
    report: dict[str, Any] = {"folder": folder, "stages": {}}
    lat: list[float] = []
    lon: list[float] = []
    map_from = None  # the map shows the first completed stage (images when there is one)
    for label, stage in _stages(folder):
        m = mf.read_manifest(stage)
        if m is None:
            continue
        entry = {"count": m["count"], "shards": len(m["shards"]), "skipped": m.get("skipped", {}),
                 "bytes": sum(s.get("bytes", 0) for s in m["shards"])}
        if m["stage"] == "features":
            entry["embedding"] = m["embedding"]
            entry["shdd"] = m.get("shdd")
            entry["encoder"] = m["encoder"]
        shown = []
        urls = [storage.join(stage, s["shard"]) for s in m["shards"]]
        map_from = map_from or label
        if label != map_from:
            urls = urls[:1]  # samples only
        for sample in ShardDataset(urls, rank=0, world_size=1):
            meta = sample["json"]
            if len(shown) < samples:
                shown.append({"key": sample["__key__"], "id": meta["id"],
                              "lat": meta["lat"], "lon": meta["lon"],
                              **({"size": [meta["width"], meta["height"]]} if "width" in meta else {})})
            if label == map_from:
                lat.append(float(meta["lat"]))
                lon.append(float(meta["lon"]))
        entry["samples"] = shown
        report["stages"][label] = entry
    if not report["stages"]:
        raise FileNotFoundError(f"{folder}: no completed stage (no images/manifest.json nor "
                                "features/*/manifest.json)")
    target = map_png or storage.join(folder, "locations.png")
    storage.write_bytes_atomic(target, _map_png(np.array(lat), np.array(lon), folder))
    report["map"] = target
    report["located"] = len(lat)
    return report


def _map_png(lat: np.ndarray, lon: np.ndarray, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=100)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.grid(True, lw=0.3, alpha=0.6)
    lon = ((lon + 180) % 360) - 180
    ax.scatter(lon, lat, s=max(1.0, 30 / np.sqrt(max(len(lat), 1))), c="tab:red", alpha=0.6, lw=0)
    ax.set_xlabel("longitude (degrees)")
    ax.set_ylabel("latitude (degrees)")
    ax.set_title(f"{title}: {len(lat)} locations")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['folder']}"]
    for label, e in report["stages"].items():
        lines.append(f"  {label}: {e['count']} samples in {e['shards']} shards ({e['bytes'] / 1e6:.1f} MB)")
        if "embedding" in e:
            lines.append(f"    encoder {e['encoder'].get('model')} rev {e['encoder'].get('revision')}; "
                         f"embedding {e['embedding']['dim']}-d {e['embedding']['dtype']}; shdd "
                         + (f"degree {e['shdd']['degree']} ({e['shdd']['dim']}-d)"
                            if e.get("shdd") else "none"))
        skipped = e["skipped"]
        listed = ", ".join(f"{k} {v}" for k, v in skipped.items())
        lines.append("    skipped: " + (listed or "none"))
        for s in e["samples"]:
            lines.append(f"    sample {json.dumps(s)}")
    lines.append(f"  map of {report['located']} locations: {report['map']}")
    return "\n".join(lines)
