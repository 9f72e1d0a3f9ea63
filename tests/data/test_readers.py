"""`locdiff data inspect` reads back the shards it is pointed at, local (over HTTP) and on S3."""

from __future__ import annotations

import pytest

from locdiff.cli import main
from locdiff.data import storage
from locdiff.data.config import load_dataset_config
from locdiff.data.ingest import ingest
from locdiff.data.manifest import read_manifest
from locdiff.data.shards import stage_dir


@pytest.fixture(scope="module", params=["local", "s3"])
def shards(request, sources, tmp_path_factory):
    kind = "http" if request.param == "local" else "s3"
    url, exp = sources["folder"][kind]
    root = str(tmp_path_factory.mktemp("readers")) if kind == "http" else "s3://data/readers"
    cfg = load_dataset_config("folder", shard_size=3, max_side=128, allow_private_addresses=True)
    ingest("folder", root, source=f"{url}/folder.tar", config=cfg, progress=False)
    d = stage_dir(root, "folder", "images")
    return [f"{d}/{s['shard']}" for s in read_manifest(d)["shards"]], set(exp.good), root


def test_inspect_reads_the_root_it_was_given(shards, capsys):
    _, expected, root = shards
    assert main(["data", "inspect", f"{root}/folder"]) == 0
    out = capsys.readouterr().out
    assert f"images: {len(expected)} samples in 4 shards" in out
    assert storage.read_bytes(f"{root}/folder/locations.png")[:4] == b"\x89PNG"
