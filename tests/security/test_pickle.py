"""No file the project reads from a run folder or a storage root can run code: each file is replaced by
one carrying a pickle payload (a `__reduce__` that would create a marker file), or by a crafted file of
the right name in another format, and the command that reads it either refuses it (exit code 2, one
line naming the file) or never opens it. The marker never appears.

Files covered: checkpoint.pt (train resumes it; a Ray Train checkpoint directory, read by
`RayStore.restore`), model.safetensors and model.json (predict), the retrieval gallery (LocDiff-H),
config.yaml (a YAML tag that would call a function), the legacy model.pt, feature shards (an .npy member
of object dtype) and a features manifest, and the MLflow model (tensors, JSON and YAML: no pickle)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from locdiff.cli import main
from locdiff.errors import UserError
from tests.faults.helpers import World, build_world, changes, gallery_file, reseal_gallery, snapshot

MARKER = "pwned-marker"


class Payload:
    """Unpickling this creates the marker file (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def _payload_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint with every expected key, one of which unpickles to the payload."""
    torch.save({"task": {"task": "locdiff"}, "model": {"w": torch.zeros(2)}, "optimizer": Payload(marker),
                "lr_scheduler": {}, "step": 2, "rng": {}}, path)


def _assert_refused(argv: list[str], culprit: Path, marker: Path, capsys, watch: list[Path]) -> str:
    before = snapshot(*watch)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f": error: {culprit}: " in err, err
    assert changes(before, snapshot(*watch)) == {"changed": [], "removed": [], "added": []}
    return err


def _predict(run: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--no-progress", *extra]


def test_the_payload_runs_when_unpickled(tmp_path):
    """The payload is real: a plain unpickle (what the project never does) creates the marker."""
    marker = tmp_path / MARKER
    pickle.loads(pickle.dumps(Payload(marker)))  # noqa: S301 - the control experiment
    assert marker.exists()


def test_a_checkpoint_payload_is_refused_on_resume(world, tmp_path, capsys):
    run = world.copy_run(tmp_path / "run")
    marker = tmp_path / MARKER
    _payload_checkpoint(run / "checkpoint.pt", marker)
    err = _assert_refused(world.train_argv(run, "train.steps=6"), run / "checkpoint.pt", marker, capsys,
                          [tmp_path])
    assert "refused to unpickle" in err


def test_predict_never_opens_the_checkpoint(world, tmp_path, capsys):
    run = world.copy_run(tmp_path / "run")
    marker = tmp_path / MARKER
    _payload_checkpoint(run / "checkpoint.pt", marker)
    torch.save(Payload(marker), run / "model.pt")  # the layout before safetensors: ignored
    assert main(_predict(run, world.test, tmp_path / "p.csv")) == 0
    assert not marker.exists() and (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_model_file_that_is_a_pickle_is_refused(world, tmp_path, capsys, kind):
    run = world.copy_run(tmp_path / "run")
    marker = tmp_path / MARKER
    weights = run / "model.safetensors"
    if kind == "torch":
        torch.save({"w": Payload(marker)}, weights)
    else:
        weights.write_bytes(pickle.dumps(Payload(marker)))
    err = _assert_refused(_predict(run, world.test, tmp_path / "p.csv"), weights, marker, capsys, [tmp_path])
    assert "cannot read the model weights" in err


def test_a_model_description_cannot_name_code(world, tmp_path, capsys):
    """model.json is JSON: a pickled payload in it is text; a non-JSON file is refused."""
    run = world.copy_run(tmp_path / "run")
    marker = tmp_path / MARKER
    (run / "model.json").write_bytes(pickle.dumps(Payload(marker)))
    _assert_refused(_predict(run, world.test, tmp_path / "p.csv"), run / "model.json", marker, capsys, [tmp_path])


@pytest.mark.parametrize("kind", ["lat-object-array", "ids-object-array", "index-pickle"])
def test_a_gallery_payload_is_refused(world, tmp_path, capsys, kind):
    """A retrieval gallery (locdiff.gallery: gallery.json, index.faiss, lat/lon/ids .npy) crafted together
    with the run's model.json, so that every checksum agrees: an .npy of pickled objects or a pickle in
    place of the faiss index is refused, naming the file, and runs nothing."""
    run = world.copy_run(tmp_path / "run")
    marker = tmp_path / MARKER
    gallery = world.copy_gallery(run, tmp_path / "gallery")
    key = {"lat-object-array": "lat", "ids-object-array": "ids", "index-pickle": "index"}[kind]
    target = gallery_file(gallery, key)
    if kind == "index-pickle":
        target.write_bytes(pickle.dumps(Payload(marker)))
    else:
        n = json.loads((gallery / "gallery.json").read_text())["count"]
        with open(target, "wb") as f:
            np.save(f, np.array([Payload(marker)] * n, dtype=object), allow_pickle=True)
    reseal_gallery(run, gallery, key)
    assert not marker.exists()
    argv = _predict(run, world.test, tmp_path / "p.csv", "--method", "locdiff-h")
    if kind == "ids-object-array":  # ids are read only when asked for: prediction never opens them
        assert main(argv) == 0 and not marker.exists()
        return
    _assert_refused(argv, target, marker, capsys, [tmp_path])


def test_a_gallery_index_claiming_gigabytes_is_refused_without_allocating_them(world, tmp_path, capsys):
    """A crafted index.faiss of 600 bytes whose stored vectors claim 3 GiB (faiss allocated and zeroed that
    much before finding the file short: a claim near the machine's memory was an out-of-memory kill) is
    refused in one line naming the file, in a process that stays small."""
    import struct
    import subprocess
    import sys

    import faiss

    run = world.copy_run(tmp_path / "run")
    gallery = world.copy_gallery(run, tmp_path / "gallery")
    dim = json.loads((gallery / "gallery.json").read_text())["dim"]
    flat = faiss.IndexFlatIP(dim)
    flat.add(np.ones((1, dim), np.float32))
    data = bytes(faiss.serialize_index(flat))
    at = len(data) - 4 * dim - 8  # the element count of the stored vectors, before them
    assert struct.unpack("<Q", data[at:at + 8]) == (dim,)
    target = gallery_file(gallery, "index")
    target.write_bytes(data[:at] + struct.pack("<Q", 3 << 30 >> 2) + data[at + 8:])
    reseal_gallery(run, gallery, "index")
    argv = _predict(run, world.test, tmp_path / "p.csv", "--method", "locdiff-h")
    # the child's own peak: VmHWM belongs to its address space (ru_maxrss would carry over the forking pytest
    # process's peak through exec, about 2 GB late in the suite)
    code = ("import re, sys\nfrom pathlib import Path\nfrom locdiff.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    rc, peak_kb = map(int, proc.stdout.split()[-2:])
    err = proc.stderr.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(target) in err[0], proc.stderr
    assert peak_kb < (1 << 30) // 1024, peak_kb  # under 1 GiB


def test_a_yaml_tag_in_the_run_config_runs_nothing(world, tmp_path, capsys):
    run = world.copy_run(tmp_path / "run")
    marker = tmp_path / MARKER
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(f"x: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:"
                                     f"pathlib.Path [{str(marker)!r}]]\n" + text)
    for argv in (_predict(run, world.test, tmp_path / "p.csv"), world.train_argv(run, "train.steps=6")):
        err = _assert_refused(argv, run / "config.yaml", marker, capsys, [tmp_path])
        assert "not valid YAML" in err


def _features(world: World, tmp: Path) -> Path:
    shutil.copytree(world.features_root, tmp / "root")
    return tmp / "root" / "emb" / "features" / "precomputed"


def _replace_member(shard: Path, name: str, data: bytes) -> None:
    """Rewrite a shard with member `name` replaced by `data` (a valid tar, listed in the manifest)."""
    import hashlib

    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m.name, data if m.name == name else tar.extractfile(m).read()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, b in members:
            info = tarfile.TarInfo(n)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    shard.write_bytes(buf.getvalue())
    manifest = shard.parent / "manifest.json"
    m = json.loads(manifest.read_text())
    for e in m["shards"]:
        if e["shard"] == shard.name:
            e["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
            e["bytes"] = len(buf.getvalue())
    manifest.write_text(json.dumps(m))


def test_a_shard_member_of_object_dtype_is_refused(world, tmp_path, capsys):
    stage = _features(world, tmp_path)
    marker = tmp_path / MARKER
    shard = stage / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        first = next(m.name for m in tar.getmembers() if m.name.endswith(".emb.npy"))
    npy = io.BytesIO()
    np.save(npy, np.array([Payload(marker)] * 128, dtype=object), allow_pickle=True)
    _replace_member(shard, first, npy.getvalue())
    for argv in (world.train_argv(tmp_path / "run", data=stage),
                 ["data", "export", "emb", "--root", str(tmp_path / "root"), "--encoder", "precomputed",
                  "--out", str(tmp_path / "out.parquet")],
                 ["data", "inspect", str(tmp_path / "root" / "emb")]):  # issue 21: the same check as training
        err = _assert_refused(argv, shard, marker, capsys, [tmp_path])
        assert "pickled Python objects" in err


def test_a_features_manifest_is_json_only(world, tmp_path, capsys):
    stage = _features(world, tmp_path)
    marker = tmp_path / MARKER
    (stage / "manifest.json").write_bytes(pickle.dumps(Payload(marker)))
    _assert_refused(world.train_argv(tmp_path / "run", data=stage), stage / "manifest.json", marker, capsys,
                    [tmp_path])
    _assert_refused(["data", "inspect", str(tmp_path / "root" / "emb")], stage / "manifest.json", marker, capsys,
                    [tmp_path])


def test_a_ray_checkpoint_payload_is_refused(tmp_path):
    """What a Ray Train worker resumes from (a checkpoint directory in the storage root, possibly S3):
    read by RayStore.restore with weights only, named."""
    from ray.train import Checkpoint

    from locdiff.distributed import RayStore
    from locdiff.errors import CorruptFileError

    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    marker = tmp_path / MARKER
    _payload_checkpoint(folder / "checkpoint.pt", marker)
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(CorruptFileError) as err:
        RayStore(0, {}).restore(Checkpoint.from_directory(str(folder)))
    assert not marker.exists()
    assert str(err.value).startswith(f"{folder / 'checkpoint.pt'}: cannot read the checkpoint: it holds pickled "
                                     "objects that are not plain tensors (refused to unpickle them)")
    # a well-formed one is read (the same function, so the refusal is not a broken reader)
    torch.save({"task": {}, "model": {}, "optimizer": {}, "lr_scheduler": {}, "step": 1, "rng": {}},
               folder / "checkpoint.pt")
    state = RayStore(0, {}).restore(Checkpoint.from_directory(str(folder)))
    assert state["step"] == 1


def test_no_unsafe_loader_in_the_project():
    """Every deserializer the project calls on files is a safe one (a grep: a new call site must use
    weights_only=True, allow_pickle=False, safetensors, JSON or yaml.safe_load)."""
    import re

    root = Path(__file__).resolve().parents[2]
    unsafe = re.compile(r"pickle\.loads?\(|cloudpickle|joblib|dill\.|yaml\.(unsafe_)?load\(|marshal\.loads?|"
                        r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|read_pickle|torch\.jit\.load|"
                        r"serialization_format=\"pickle\"")
    hits = []
    for path in [*root.glob("locdiff/**/*.py"), *root.glob("flows/**/*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if unsafe.search(line):
                hits.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    torch_loads = [f"{p.relative_to(root)}" for p in root.glob("locdiff/**/*.py")
                   if "torch.load(" in p.read_text() and p.name != "errors.py"]
    assert hits == []
    assert torch_loads == ["locdiff/runs.py"]  # the one reader, with weights_only=True


def test_an_encoder_folder_with_pickled_weights_is_refused(tmp_path):
    """A local model folder (`--encoder PATH`) whose weights are a pickle (pytorch_model.bin) is refused:
    the encoder loads safetensors only."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from locdiff.data.config import load_encoder_config
    from locdiff.embed import make_encoder

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=8)
    folder = tmp_path / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    assert make_encoder(load_encoder_config(str(folder))).dim == 8  # the safetensors folder loads
    marker = tmp_path / MARKER
    (folder / "model.safetensors").unlink()
    torch.save({"vision_model.embeddings.patch_embedding.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"encoder .*tiny-clip.*model\.safetensors"):  # named, one line
        make_encoder(load_encoder_config(str(folder)))
    assert not marker.exists()
