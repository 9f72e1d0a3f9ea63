"""What the fault and security tests share: one tiny trained run, small tables and a features stage
(built once per module), and the check that a failed command left every earlier file as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from locdiff.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "model" / "tiny.yaml"
# The tiny config shortened to seconds: 4 steps, a checkpoint at step 2 and 4, cheap prediction.
FAST = ["train.steps=4", "train.checkpoint_every=2", "train.batch_size=32", "train.warmup_steps=1",
        "train.val_samples=16", "predict.samples=2", "predict.steps=2", "hybrid.tune_on_val=false"]


def sets(*overrides: str) -> list[str]:
    """`--set K=V` arguments: FAST, then `overrides` (a later one wins)."""
    out: list[str] = []
    for o in (*FAST, *overrides):
        out += ["--set", o]
    return out


@dataclass
class World:
    """Inputs shared (read-only) by the cases; a case copies what it damages."""

    base: Path
    train: Path  # embeddings table, 128-d, labelled
    test: Path  # embeddings table, 128-d
    train64: Path  # the same kind of table with 64-d embeddings
    run: Path  # a complete LocDiff run trained on `train` with TINY + FAST
    features_root: Path  # ROOT with ROOT/emb/features/precomputed (3 shards of `test`)

    def train_argv(self, out: Path, *extra: str, data: Path | None = None) -> list[str]:
        return ["train", "--config", str(TINY), "--train", str(data or self.train), "--out", str(out),
                "--no-progress", *sets(*extra)]

    def copy_run(self, dest: Path) -> Path:
        shutil.copytree(self.run, dest)
        return dest

    def copy_gallery(self, run: Path, dest: Path) -> Path:
        """Copy the retrieval gallery the run references (locdiff.gallery: gallery.json and its data folder)
        to `dest` and point the run's model.json at the copy; returns `dest`."""
        meta = json.loads((run / "model.json").read_text())
        shutil.copytree(meta["gallery"]["uri"], dest)
        meta["gallery"]["uri"] = str(dest)
        (run / "model.json").write_text(json.dumps(meta))
        return dest


def gallery_file(gallery: Path, key: str) -> Path:
    """The file of a gallery's `key` (index, lat, lon, ids), as its gallery.json names it."""
    return gallery / json.loads((gallery / "gallery.json").read_text())["files"][key]["path"]


def reseal_gallery(run: Path, gallery: Path, key: str) -> None:
    """Record a changed gallery file in gallery.json, and the new gallery.json in the run's model.json, as
    whoever crafted both would (so the change is not caught by a checksum)."""
    meta = json.loads((gallery / "gallery.json").read_text())
    data = gallery_file(gallery, key).read_bytes()
    meta["files"][key].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    text = json.dumps(meta).encode()
    (gallery / "gallery.json").write_bytes(text)
    model = json.loads((run / "model.json").read_text())
    model["gallery"]["sha256"] = hashlib.sha256(text).hexdigest()
    (run / "model.json").write_text(json.dumps(model))


def build_world(base: Path) -> World:
    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    d128 = write_benchmark(base / "d128", SynthConfig(n_train=300, n_test=60, n_unseen=10, dim=128, seed=0))
    d64 = write_benchmark(base / "d64", SynthConfig(n_train=100, n_test=10, n_unseen=10, dim=64, seed=1))
    world = World(base=base, train=d128["train"], test=d128["test"], train64=d64["train"], run=base / "run",
                  features_root=base / "root")
    assert main(world.train_argv(world.run)) == 0
    cfg = load_dataset_config("embeddings", shard_size=20)
    ingest("emb", str(world.features_root), source=str(world.test), config=cfg, progress=False)
    return world


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (a missing folder holds nothing)."""
    out = {}
    for folder in folders:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """Files changed, removed and added between two snapshots (all empty: nothing was touched)."""
    return {"changed": sorted(p for p in before if p in after and after[p] != before[p]),
            "removed": sorted(p for p in before if p not in after),
            "added": sorted(p for p in after if p not in before)}


def command_of(argv: list[str]) -> str:
    """The command an error line names: `data ACTION`, else the first word."""
    return f"{argv[0]} {argv[1]}" if argv[0] == "data" else argv[0]


def assert_one_line_fault(argv: list[str], culprits: list[str], folders: list[Path], capsys) -> None:
    """`locdiff ARGV` fails with exit code 2 and ONE stderr line `locdiff COMMAND: error: ...` naming every
    culprit, never as an unexpected error, and leaves every file under `folders` as it was."""
    before = snapshot(*folders)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"locdiff {command_of(argv)}: error: "), lines[0]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    assert "unexpected" not in lines[0], lines[0]  # a user-caused fault is never reported as a bug
    assert changes(before, snapshot(*folders)) == {"changed": [], "removed": [], "added": []}


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
