"""Reading shards back split across DataLoader workers and nodes: every sample exactly once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from locdiff.data import ShardDataset, stage_dir
from locdiff.data.config import load_dataset_config
from locdiff.data.ingest import ingest
from locdiff.data.manifest import read_manifest
from locdiff.data.shards import split_shards


def key_of(sample: dict) -> str:
    return sample["json"]["id"]


def ids_read(urls: list[str], *, rank: int, world_size: int, workers: int) -> list[str]:
    ds = ShardDataset(urls, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=key_of)
    return list(loader)


@pytest.fixture(scope="module", params=["local", "s3"])
def shards(request, sources, tmp_path_factory):
    kind = "http" if request.param == "local" else "s3"
    url, exp = sources["folder"][kind]
    root = str(tmp_path_factory.mktemp("readers")) if kind == "http" else "s3://data/readers"
    cfg = load_dataset_config("folder", shard_size=3, max_side=128, allow_private_addresses=True)
    ingest("folder", root, source=f"{url}/folder.tar", config=cfg, progress=False)
    d = stage_dir(root, "folder", "images")
    return [f"{d}/{s['shard']}" for s in read_manifest(d)["shards"]], set(exp.good), root


def test_two_workers_read_every_sample_once(shards):
    urls, expected, _ = shards
    assert len(urls) == 4
    got = ids_read(urls, rank=0, world_size=1, workers=2)
    assert Counter(got) == Counter(expected)  # nothing lost, nothing repeated


def test_two_nodes_with_two_workers_each_partition_the_data(shards):
    urls, expected, _ = shards
    parts = [ids_read(urls, rank=r, world_size=2, workers=2) for r in range(2)]
    assert set(parts[0]).isdisjoint(parts[1])
    assert Counter(parts[0] + parts[1]) == Counter(expected)
    assert all(parts)


def test_split_shards_covers_each_shard_once():
    urls = [f"s{i}" for i in range(11)]
    got = [u for r in range(3) for w in range(2)
           for u in split_shards(urls, rank=r, world_size=3, worker=w, num_workers=2)]
    assert sorted(got) == sorted(urls)
    with pytest.raises(ValueError, match="rank 2"):
        ShardDataset(urls, rank=2, world_size=2).my_shards()


def test_inspect_reads_the_root_it_was_given(shards, capsys):
    from locdiff.cli import main
    from locdiff.data import storage

    _, expected, root = shards
    assert main(["data", "inspect", f"{root}/folder"]) == 0
    out = capsys.readouterr().out
    assert f"images: {len(expected)} samples in 4 shards" in out
    assert storage.read_bytes(f"{root}/folder/locations.png")[:4] == b"\x89PNG"


def test_fast_and_webdataset_readers_agree(shards):
    urls, expected, _ = shards
    fast = list(ShardDataset(urls, rank=0, world_size=1))
    slow = list(ShardDataset(urls, rank=0, world_size=1, reader="webdataset"))
    assert [s["__key__"] for s in fast] == [s["__key__"] for s in slow]
    assert all(a["jpg"] == b["jpg"] and a["json"] == b["json"] for a, b in zip(fast, slow, strict=True))
    assert {s["json"]["id"] for s in fast} == expected


@pytest.mark.parametrize("long_id", [False, True])
def test_feature_shard_parsers_agree_with_the_arrays_written(tmp_path, long_id):
    """The array-parsed (regular layout) and member-by-member (irregular: one json > 512 bytes) paths
    both give back exactly what was written."""
    import numpy as np

    from locdiff.data.features import read_feature_shard
    from locdiff.data.shards import json_bytes, npy_bytes, parse_regular_tar, sample_key, write_tar

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(7, 5)).astype(np.float16)
    shdd = rng.normal(size=(7, 4)).astype(np.float32)
    ids = [f"id{i}" + ("x" * 600 if long_id and i == 3 else "") for i in range(7)]
    path = tmp_path / "s.tar"
    write_tar(str(path), [(sample_key(i), {"emb.npy": npy_bytes(emb[i]), "shdd.npy": npy_bytes(shdd[i]),
                                           "json": json_bytes({"id": ids[i], "lat": i * 1.5, "lon": -i})})
                          for i in range(7)])
    data = path.read_bytes()
    assert (parse_regular_tar(data) is None) == long_id
    got = read_feature_shard(data, str(path))
    assert got["ids"] == ids and got["keys"] == [sample_key(i) for i in range(7)]
    np.testing.assert_array_equal(got["emb"], emb)
    np.testing.assert_array_equal(got["shdd"], shdd)
    np.testing.assert_array_equal(got["lat"], np.arange(7) * 1.5)
    import tarfile

    with tarfile.open(path) as t:  # a standard tar reader agrees on the members
        assert [m.name for m in t.getmembers()][:3] == ["000000000.emb.npy", "000000000.json",
                                                        "000000000.shdd.npy"]
