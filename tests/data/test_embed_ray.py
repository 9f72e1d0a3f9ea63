"""The Ray Data runner of the embedding stage (decode tasks, one tiny CLIP per actor, half a CPU each on
this CPU machine) writes the same features as the in-process runner, resumes from finished shards and
raises a damaged shard's error as itself. One local Ray serves the whole session."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from locdiff.data.config import load_dataset_config, load_encoder_config
from locdiff.data.features import load_features
from locdiff.data.featurize import embed
from locdiff.data.ingest import ingest
from locdiff.data.manifest import read_manifest
from locdiff.data.validation import ChecksumError

from .fixtures import build_folder
from .test_embed import tiny_clip  # noqa: F401 (fixture)

N_IMAGES = 10  # in shards of 4: 4, 4, 2 samples


@pytest.fixture(scope="module")
def images_root(tmp_path_factory):
    """ROOT with the images stage of a 10-image folder data set, 3 shards."""
    src = tmp_path_factory.mktemp("src")
    exp = build_folder(src, "", n=N_IMAGES, archive=False)
    root = tmp_path_factory.mktemp("images")
    ingest("folder", str(root), source=str(src), progress=False,
           config=load_dataset_config("folder", shard_size=4, max_side=128))
    return root, exp


def copy_images(root, dest):
    shutil.copytree(root / "folder" / "images", dest / "folder" / "images")
    return dest


def encoder(model_dir):
    """The tiny CLIP in batches of 3: shards of 4 become chunks of 3 + 1 (and 2 for the last shard)."""
    return dataclasses.replace(load_encoder_config(str(model_dir)), batch_size=3)


def test_ray_runner_writes_the_local_runners_features(tiny_clip, images_root, tmp_path, ray_local):  # noqa: F811
    root, exp = images_root
    local_root, ray_root = copy_images(root, tmp_path / "local"), copy_images(root, tmp_path / "ray")
    local = embed("folder", str(local_root), encoder(tiny_clip), degree=2, runner="local", progress=False)
    remote = embed("folder", str(ray_root), encoder(tiny_clip), degree=2, runner="ray", progress=False)

    assert remote["count"] == local["count"] == N_IMAGES
    assert [(s["shard"], s["count"]) for s in remote["shards"]] == [(s["shard"], s["count"])
                                                                   for s in local["shards"]]
    same = {k: v for k, v in local.items() if k != "shards"}
    assert {k: v for k, v in remote.items() if k != "shards"} == same  # settings key, dims, skips ...
    assert read_manifest(str(ray_root / "folder" / "features" / "tiny-clip")) == remote

    want, want_shdd = load_features(str(local_root), "folder", "tiny-clip", with_shdd=True)
    got, got_shdd = load_features(str(ray_root), "folder", "tiny-clip", with_shdd=True)
    assert list(got.ids) == list(want.ids) and set(got.ids) == set(exp.good)
    np.testing.assert_array_equal(got.lat, want.lat)
    np.testing.assert_array_equal(got.lon, want.lon)
    np.testing.assert_allclose(got.embedding, want.embedding, atol=1e-3)  # float16 storage
    np.testing.assert_array_equal(got_shdd, want_shdd)
    assert np.abs(got.embedding).sum() > 0


def test_ray_rerun_embeds_only_unfinished_shards(tiny_clip, images_root, tmp_path, ray_local):  # noqa: F811
    root, _ = images_root
    ray_root = copy_images(root, tmp_path / "ray")
    first = embed("folder", str(ray_root), encoder(tiny_clip), runner="ray", progress=False)
    features = ray_root / "folder" / "features" / "tiny-clip"
    # as a run killed before its last shard leaves it: no manifest, one shard missing
    (features / "manifest.json").unlink()
    (features / "shard-000001.tar").unlink()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in features.glob("shard-*.tar")}
    assert sorted(kept) == ["shard-000000.tar", "shard-000002.tar"]

    again = embed("folder", str(ray_root), encoder(tiny_clip), runner="ray", progress=False)
    assert again == first
    for name, stat in kept.items():  # finished shards were not rewritten
        p = features / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat
    assert (features / "shard-000001.tar").exists()


def test_ray_runner_raises_a_damaged_shard_as_a_checksum_error(tiny_clip, images_root, tmp_path,  # noqa: F811
                                                               ray_local):
    root, _ = images_root
    ray_root = copy_images(root, tmp_path / "ray")
    shard = ray_root / "folder" / "images" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"shard-000001\.tar: sha256 .* differs from the images manifest"):
        embed("folder", str(ray_root), encoder(tiny_clip), runner="ray", progress=False)
    assert read_manifest(str(ray_root / "folder" / "features" / "tiny-clip")) is None
