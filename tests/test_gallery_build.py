"""Building a gallery's faiss index from chunks (locdiff.gallery_build); the stored gallery: test_gallery.py."""

from __future__ import annotations

import numpy as np
import pytest

from locdiff.gallery_build import GalleryConfig, array_chunks, build_index


def test_the_config_picks_the_index_by_size():
    cfg = GalleryConfig(flat_threshold=1000)
    assert cfg.build_params(999) == {"index": "flat", "factory": "Flat"}
    p = cfg.build_params(10_000)
    # 2 sqrt(10,000) = 200, whose nearest power of two (in log2) is 256; 64 training rows per list
    assert p["index"] == "ivf_fp16" and p["nlist"] == 256 and p["factory"] == "IVF256,SQfp16"
    assert p["train_rows"] == 10_000  # 256 * 64 = 16,384 rows asked, capped by the count
    assert GalleryConfig(index="ivf_sq8", nlist=8).build_params(50)["factory"] == "IVF8,SQ8"


@pytest.mark.parametrize("reiterable", [True, False])
def test_a_flat_index_finds_the_exact_cosine_neighbours(reiterable):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    lat, lon = rng.uniform(-90, 90, 300), rng.uniform(-180, 180, 300)
    ids = np.array([f"e{i}" for i in range(300)])
    chunks = (lambda: array_chunks(emb, lat, lon, ids, 64)) if reiterable else array_chunks(emb, lat, lon, ids, 64)
    index, glat, glon, gids = build_index(chunks, 300, GalleryConfig().build_params(300))
    np.testing.assert_array_equal(glat, lat)
    np.testing.assert_array_equal(glon, lon)
    assert list(gids) == list(ids)
    query = rng.normal(size=(20, 16)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    _, idx = index.search(query, 1)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_array_equal(idx[:, 0], np.argmax(query @ unit.T, axis=1))  # the numpy reference


def test_a_source_that_yields_fewer_entries_than_declared_is_refused():
    emb = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="yielded 10 entries, it declared 12"):
        build_index(lambda: array_chunks(emb, np.zeros(10), np.zeros(10), np.arange(10).astype(str)), 12,
                    GalleryConfig().build_params(12))
