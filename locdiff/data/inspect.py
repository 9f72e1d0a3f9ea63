"""`locdiff data inspect ROOT/NAME`: what a data set folder holds (stages, counts, skipped per reason,
a few samples) and a PNG map of its locations. Every shard is checked against the sha256 in its
manifest and parsed; a damaged one is a ValueError naming the shard (and the member)."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from locdiff.data import manifest as mf
from locdiff.data import storage
from locdiff.data.features import read_feature_shard
from locdiff.data.shards import group_samples, json_member, parse_tar_bytes
from locdiff.data.validation import ChecksumError, sha256_bytes
from locdiff.io import write_file_atomic

log = logging.getLogger(__name__)


def _stages(folder: str) -> list[tuple[str, str]]:
    """(label, stage folder) of every stage under ROOT/NAME."""
    out = [("images", storage.join(folder, "images"))]
    fs, p = storage.filesystem(storage.join(folder, "features"))
    try:
        with storage.named(storage.join(folder, "features")):
            encoders = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=True)
                              if e["type"] == "directory")
    except (FileNotFoundError, NotADirectoryError):
        encoders = []
    out += [(f"features/{e}", storage.join(folder, "features", e)) for e in encoders]
    return out


def _shard_entries(m: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    return mf.shard_entries(m, stage)


def read_shard(url: str, entry: dict[str, Any], *, verify: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """(key, json member) of every sample of one shard, checked against its manifest entry.

    Raises:
        FileNotFoundError: the shard is missing.
        ChecksumError: its sha256 differs from the manifest (a flipped byte, a rewritten file).
        ShardError: cut short, or a member that does not parse (named).
        ValueError: its sample count differs from the manifest.
    """
    data = mf.read_shard_bytes(url, entry)
    if verify:
        digest = sha256_bytes(data)
        if digest != entry["sha256"]:
            raise ChecksumError(f"{url}: sha256 {digest} differs from the manifest's {entry['sha256']} "
                                "(damaged or rewritten shard); re-run the stage that wrote it")
    buf = memoryview(data)
    out = []
    arrays = False
    for key, parts in group_samples(parse_tar_bytes(buf, what=url)):
        if "json" not in parts:
            raise ValueError(f"{url}: sample {key} has no json member; the shard is corrupt")
        o, n = parts["json"]
        out.append((key, json_member(buf[o: o + n], url=url, key=key)))
        arrays = arrays or any(ext.endswith("npy") for ext in parts)
    if arrays:  # a features shard: parsed as training parses it (an object-dtype .npy is refused as there)
        read_feature_shard(data, what=url)
    if len(out) != entry["count"]:
        raise ValueError(f"{url}: {len(out)} samples, the manifest says {entry['count']}")
    return out


def inspect(folder: str, *, samples: int = 3, map_png: str | None = None, verify: bool = True,
            progress: bool = False) -> dict[str, Any]:
    """Summarise ROOT/NAME and draw its locations to `map_png` (default ROOT/NAME/locations.png).

    Every shard of every stage is read, checked against its manifest's sha256 (unless verify=False)
    and parsed.

    Raises:
        FileNotFoundError: no stage under the folder has a manifest, or a listed shard is missing.
        ValueError (ChecksumError, ShardError): a damaged shard, named with its member.
    """
    folder = str(folder).rstrip("/")
    report: dict[str, Any] = {"folder": folder, "stages": {}}
    lat: list[float] = []
    lon: list[float] = []
    unlabelled = 0
    map_from = None  # the map shows the first completed stage (images when there is one)
    for label, stage in _stages(folder):
        m = mf.read_manifest(stage)
        if m is None:
            continue
        entries = _shard_entries(m, stage)
        entry = {"count": m["count"], "shards": len(entries), "skipped": m.get("skipped", {}),
                 "bytes": sum(e["bytes"] for e in entries), "verified": verify}
        if m.get("stage") == "features":
            entry["embedding"] = m.get("embedding")
            entry["shdd"] = m.get("shdd")
            entry["encoder"] = m.get("encoder") or {}
        if m.get("coordinates") == "optional":
            entry["unlabelled"] = int(m.get("unlabelled", 0))
        shown = []
        map_from = map_from or label
        for e in tqdm(entries, desc=f"check {label}", unit="shard", disable=not progress):
            url = storage.join(stage, e["shard"])
            if not verify and label != map_from and len(shown) >= samples:
                continue
            for key, meta in read_shard(url, e, verify=verify):
                located = meta.get("lat") is not None and meta.get("lon") is not None
                if len(shown) < samples:
                    shown.append({"key": key, "id": meta.get("id"), "lat": meta.get("lat"),
                                  "lon": meta.get("lon"),
                                  **({"size": [meta["width"], meta["height"]]} if "width" in meta else {})})
                if label == map_from:
                    if located:
                        try:
                            lat.append(float(meta["lat"]))
                            lon.append(float(meta["lon"]))
                        except (TypeError, ValueError):
                            raise ValueError(f"{url}: member {key}.json has a lat/lon that is not a "
                                             "number; the shard is corrupt") from None
                    else:
                        unlabelled += 1
        entry["samples"] = shown
        report["stages"][label] = entry
    if not report["stages"]:
        raise FileNotFoundError(f"{folder}: no completed stage (no images/manifest.json nor "
                                "features/*/manifest.json)")
    target = map_png or storage.join(folder, "locations.png")
    write_file_atomic(target, _map_png(np.array(lat), np.array(lon), folder))  # a full disk names the file
    report["map"] = target
    report["located"] = len(lat)
    report["unlabelled"] = unlabelled
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
                         f"embedding {(e['embedding'] or {}).get('dim')}-d {(e['embedding'] or {}).get('dtype')}; shdd "
                         + (f"degree {e['shdd']['degree']} ({e['shdd']['dim']}-d)"
                            if e.get("shdd") else "none"))
        skipped = e["skipped"]
        listed = ", ".join(f"{k} {v}" for k, v in skipped.items())
        lines.append("    skipped: " + (listed or "none"))
        if "unlabelled" in e:
            lines.append(f"    coordinates optional: {e['unlabelled']} without coordinates")
        lines.append("    shards: " + ("sha256 verified against the manifest" if e.get("verified")
                                       else "not verified (--no-verify)"))
        for s in e["samples"]:
            lines.append(f"    sample {json.dumps(s)}")
    lines.append(f"  map of {report['located']} locations: {report['map']}"
                 + (f" ({report['unlabelled']} without coordinates)" if report.get("unlabelled") else ""))
    return "\n".join(lines)
