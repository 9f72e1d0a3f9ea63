"""`locdiff data inspect` checks every shard against its manifest's sha256 and names the damaged one; a
truncated shard and a corrupted JSON member are one-line ValueErrors naming the shard (and the member),
from inspect and from the readers, never a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from locdiff.cli import main
from locdiff.data.config import load_dataset_config
from locdiff.data.ingest import ingest
from locdiff.data.inspect import inspect
from locdiff.data.shards import decode_sample, iter_shard_samples
from locdiff.data.validation import ChecksumError, ShardError

from .fixtures import build_folder


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    build_folder(tmp / "src", "", n=9, archive=False)
    cfg = load_dataset_config("folder", shard_size=4, max_side=128)
    ingest("folder", str(tmp / "root"), source=str(tmp / "src"), config=cfg, progress=False)
    return tmp / "root" / "folder"


@pytest.fixture
def copy(ingested, tmp_path):
    shutil.copytree(ingested, tmp_path / "folder")
    return tmp_path / "folder"


def cli_error(args: list[str], capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_intact_folder_is_verified(ingested, capsys):
    assert main(["data", "inspect", str(ingested)]) == 0
    out = capsys.readouterr().out
    assert "images: 9 samples in 3 shards" in out and "sha256 verified against the manifest" in out


def test_a_flipped_byte_names_the_shard(copy, capsys):
    shard = copy / "images" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # inside the first image: the tar still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"shard-000001\.tar: sha256 [0-9a-f]{64} differs from the manifest"):
        inspect(str(copy))
    err = cli_error(["data", "inspect", str(copy)], capsys)
    assert "shard-000001.tar" in err and "differs from the manifest" in err
    # without verification the flip goes unseen: the check is what finds it
    assert main(["data", "inspect", str(copy), "--no-verify"]) == 0


def test_a_truncated_shard_names_the_shard(copy, capsys):
    shard = copy / "images" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    err = cli_error(["data", "inspect", str(copy)], capsys)
    assert "shard-000002.tar" in err
    err = cli_error(["data", "inspect", str(copy), "--no-verify"], capsys)
    assert "shard-000002.tar: cut short" in err and "truncated shard" in err
    with pytest.raises(ShardError, match=r"shard-000002\.tar: cut short"):
        list(iter_shard_samples(str(shard)))
    with pytest.raises(ValueError, match=r"shard-000002\.tar: cut short"):  # ShardError is a ValueError
        list(iter_shard_samples(str(shard)))


def corrupt_json_member(shard, key: str) -> None:
    """Overwrite the start of member KEY.json with bytes that are not JSON (same length: the tar
    stays well formed)."""
    data = bytearray(shard.read_bytes())
    name = f"{key}.json".encode()
    header = data.index(name)
    data[header + 512: header + 512 + 5] = b"{bad:"
    shard.write_bytes(bytes(data))


def test_a_corrupted_json_member_names_shard_and_member(copy, capsys):
    shard = copy / "images" / "shard-000000.tar"
    corrupt_json_member(shard, "000000001")
    # the manifest is made to agree, so the member itself is what is caught
    manifest = json.loads((copy / "images" / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (copy / "images" / "manifest.json").write_text(json.dumps(manifest))
    err = cli_error(["data", "inspect", str(copy)], capsys)
    assert "shard-000000.tar: member 000000001.json is not valid JSON" in err
    with pytest.raises(ShardError, match=r"shard-000000\.tar: member 000000001\.json is not valid JSON"):
        [decode_sample(s) for s in iter_shard_samples(str(shard))]


def test_a_missing_shard_and_a_broken_manifest_are_one_line(copy, capsys):
    (copy / "images" / "shard-000001.tar").unlink()
    assert "shard-000001.tar" in cli_error(["data", "inspect", str(copy)], capsys)
    (copy / "images" / "manifest.json").write_text('{"stage": "images"}')
    assert "not a stage manifest" in cli_error(["data", "inspect", str(copy)], capsys)
    (copy / "images" / "manifest.json").write_text("{not json")
    assert "manifest.json: not valid JSON" in cli_error(["data", "inspect", str(copy)], capsys)


def test_embed_reports_a_corrupted_json_member_by_name(copy, tmp_path):
    from locdiff.data.featurize import read_shard_chunks

    shard = copy / "images" / "shard-000000.tar"
    corrupt_json_member(shard, "000000002")
    job = {"images_url": str(shard), "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
           "shard": shard.name, "out": str(tmp_path / "f"), "degree": None, "storage_dtype": "float16",
           "batch_size": 4, "settings_key": "k"}
    with pytest.raises(ShardError, match=r"shard-000000\.tar: member 000000002\.json is not valid JSON"):
        list(read_shard_chunks(job, lambda images: np.zeros((len(images), 3), np.float32)))
