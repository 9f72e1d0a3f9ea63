"""The Ray Data path of the embedding stage (actor pool, half a CPU per actor on this CPU machine) gives
the same feature shards as the in-process path."""

from __future__ import annotations

import tempfile

import pytest

from locdiff.data.featurize import embed
from locdiff.data.manifest import read_manifest

from .test_embed import ingested, tiny_clip  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_ray_backend_matches_local(tiny_clip, ingested, tmp_path):  # noqa: F811
    import shutil

    ray = pytest.importorskip("ray")
    root, _ = ingested
    local = embed("folder", str(root), str(tiny_clip), degree=2, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(root / "folder" / "images", copy / "folder" / "images")
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False)
    try:
        remote = embed("folder", str(copy), str(tiny_clip), degree=2, backend="ray", progress=False)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert remote["shards"] == local["shards"]  # byte-identical shards (same sha256)
    assert read_manifest(str(copy / "folder" / "features" / "tiny-clip")) == remote
