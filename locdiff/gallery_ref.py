"""Interim: the retrieval gallery of a training source (replaced by locdiff.gallery when it lands)."""

from __future__ import annotations

from typing import Any

import numpy as np

from locdiff.model.hybrid import Gallery


def gallery_for(source: Any, run: Any, *, progress: bool = False) -> tuple[Gallery, dict[str, Any]]:
    table = source.read_all()
    g = Gallery(table.embedding, table.lat, table.lon)
    path = run.file("gallery.npz")
    with open(path, "wb") as f:
        np.savez(f, embedding=table.embedding, lat=g.lat, lon=g.lon)
    return g, {"uri": str(path), "sha256": None}


def open_gallery(ref: dict[str, Any], run: Any) -> Gallery:
    with np.load(ref["uri"]) as z:
        return Gallery(z["embedding"], z["lat"], z["lon"])
