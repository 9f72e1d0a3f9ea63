"""A full disk during `locdiff train`, `data ingest` and `data export`, on real small tmpfs mounts in a
private mount namespace (`unshare -rm`; skipped where the kernel or the container does not allow it).

Each command fails with exit code 2 and one line saying the disk is full and where; no partial or
temporary file is left; what was finished before stays: the run's checkpoint at step 2 (the write of the
step-4 one is what fills the disk) loads and resumes to a complete run, the finished shards resume to the
manifest of a clean ingest. The three commands run in one process (imports once) that is started in the
namespace; their stderr goes to a file each (fd 2 redirected, so log records and the report both land
there)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from locdiff.cli import main

from .helpers import REPO, World

DRIVER = r"""
import json, os, shutil, sys
from locdiff.cli import main
results = {}
for name, argv, folder, copy in json.loads(sys.argv[1]):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(2)
    with open(os.path.join(sys.argv[2], name + ".err"), "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            rc = main(argv)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
    shutil.copytree(folder, copy)  # the tmpfs is gone when the namespace ends
    results[name] = rc
print(json.dumps(results))
"""


def _can_mount(tmp: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp}"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def _kib(n: float) -> int:
    return int(math.ceil(n / 4096)) * 4  # whole pages


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and (".tmp" in p.name or ".part" in p.name))


@pytest.mark.slow  # over 3 s: `make test` runs it, `make test-fast` does not
def test_a_full_disk_is_one_line_and_keeps_what_was_finished(world: World, tmp_path):
    why = _can_mount(tmp_path)
    if why:
        pytest.skip(why)
    mounts = {name: tmp_path / f"tmpfs-{name}" for name in ("train", "ingest", "export")}
    for m in mounts.values():
        m.mkdir()
    stage = world.features_root / "emb" / "features" / "precomputed"
    shards = sorted(stage.glob("shard-*.tar"))
    ckpt = (world.run / "checkpoint.pt").stat().st_size
    sizes = {  # room for the first checkpoint (or shard, or nothing) and half of the next
        "train": _kib(1.5 * ckpt + 64 * 1024),
        "ingest": _kib(shards[0].stat().st_size + 0.5 * shards[1].stat().st_size + 16 * 1024),
        "export": 16,
    }
    configs = tmp_path / "configs"  # the `emb` data set: the embeddings source with 20 rows a shard
    (configs / "datasets").mkdir(parents=True)
    (configs / "datasets" / "emb.yaml").write_text(
        (REPO / "configs" / "datasets" / "embeddings.yaml").read_text().replace("name: embeddings", "name: emb")
        .replace("shard_size: 10000", "shard_size: 20"))
    run = mounts["train"] / "run"
    out = mounts["export"] / "emb.parquet"
    jobs = [
        ("train", world.train_argv(run), str(mounts["train"]), str(tmp_path / "after-train")),
        ("ingest", ["data", "ingest", "emb", "--root", str(mounts["ingest"]), "--source", str(world.test)],
         str(mounts["ingest"]), str(tmp_path / "after-ingest")),
        ("export", ["data", "export", "emb", "--root", str(world.features_root), "--encoder", "precomputed",
                    "--out", str(out)], str(mounts["export"]), str(tmp_path / "after-export")),
    ]
    mount = "; ".join(f"mount -t tmpfs -o size={sizes[n]}k tmpfs {m} || exit 99" for n, m in mounts.items())
    script = f"{mount}; exec {sys.executable} -c \"$DRIVER\" '{json.dumps(jobs)}' {tmp_path}"
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "DRIVER": DRIVER,
           "LOCDIFF_CONFIGS": str(configs)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rcs = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = {}
    for name in rcs:
        text = (tmp_path / f"{name}.err").read_text()
        assert "Traceback" not in text, text
        lines = [ln for ln in text.splitlines() if "error:" in ln]
        assert len(lines) == 1 and text.endswith(lines[0] + "\n"), text  # one report, the last line
        errors[name] = lines[0]
    assert rcs == {"train": 2, "ingest": 2, "export": 2}, errors

    # train: the step-4 checkpoint did not fit; the step-2 one is intact, and resumes on a disk with room
    assert errors["train"] == (f"locdiff train: error: disk full while writing {run / 'checkpoint.pt'}: "
                               "free space or choose another --out")
    after = tmp_path / "after-train" / "run"
    assert _leftovers(tmp_path / "after-train") == []
    assert sorted(p.name for p in after.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]
    from locdiff.runs import load_state

    assert int(load_state(after / "checkpoint.pt")["step"]) == 2
    argv = world.train_argv(after)
    assert main(argv) == 0
    record = json.loads((after / "run.json").read_text())
    assert record["complete"] and record["step"] == 4

    # ingest: finished shards stay (each with its progress record); the re-run completes as a clean one would
    images = mounts["ingest"] / "emb" / "features" / "precomputed"
    assert errors["ingest"].startswith(f"locdiff data ingest: error: {images}: no space left on device"), errors
    copy = tmp_path / "after-ingest"
    assert _leftovers(copy) == []
    left = sorted(p.name for p in (copy / "emb" / "features" / "precomputed").glob("shard-*.tar"))
    assert left == ["shard-000000.tar"] and not (copy / "emb" / "features" / "precomputed" / "manifest.json").exists()
    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest

    again = ingest("emb", str(copy), source=str(world.test), config=load_dataset_config("embeddings", shard_size=20),
                   progress=False)
    clean = json.loads((stage / "manifest.json").read_text())
    assert again["shards"] == clean["shards"]

    # export: no partial Parquet file
    assert errors["export"].startswith(f"locdiff data export: error: {out}: no space left on device"), errors
    assert list((tmp_path / "after-export").iterdir()) == []


@pytest.mark.slow
def test_outputs_on_a_full_disk_name_the_file_and_leave_nothing(world: World, tmp_path):
    """Issue 21 item 4: `evaluate --json`, `evaluate --plots`, `shdd plot --out` (the same writer as `locate
    --map`) and `predict --out` on a full disk: exit code 2, one line naming the file, and no 0-byte,
    partial or temporary file (each tmpfs is filled up before the command)."""
    why = _can_mount(tmp_path)
    if why:
        pytest.skip(why)
    preds = tmp_path / "preds.parquet"
    assert main(["predict", "--run", str(world.run), "--data", str(world.test), "--out", str(preds),
                 "--no-progress"]) == 0
    names = ("json", "plots", "shdd", "table")
    mounts = {name: tmp_path / f"tmpfs-{name}" for name in names}
    for m in mounts.values():
        m.mkdir()
    outs = {"json": mounts["json"] / "metrics.json", "plots": mounts["plots"] / "map.png",
            "shdd": mounts["shdd"] / "kernel.png", "table": mounts["table"] / "p.parquet"}
    jobs = [
        ("json", ["evaluate", "--predictions", str(preds), "--json", str(outs["json"])]),
        ("plots", ["evaluate", "--predictions", str(preds), "--plots", str(mounts["plots"])]),
        ("shdd", ["shdd", "plot", "--lat", "10", "--lon", "20", "--degree", "8", "--out", str(outs["shdd"])]),
        ("table", ["predict", "--run", str(world.run), "--data", str(world.test), "--out", str(outs["table"]),
                   "--no-progress"]),
    ]
    jobs = [(n, argv, str(mounts[n]), str(tmp_path / f"after-{n}")) for n, argv in jobs]
    fill = "; ".join(f"mount -t tmpfs -o size=64k tmpfs {m} || exit 99; "
                     f"dd if=/dev/zero of={m}/filler bs=4096 2>/dev/null; true" for m in mounts.values())
    script = f"{fill}; exec {sys.executable} -c \"$DRIVER\" '{json.dumps(jobs)}' {tmp_path}"
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "DRIVER": DRIVER,
           "MPLBACKEND": "Agg"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rcs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rcs == {n: 2 for n in names}, rcs
    for name in names:
        text = (tmp_path / f"{name}.err").read_text()
        assert "Traceback" not in text and "unexpected" not in text, text
        lines = [ln for ln in text.splitlines() if "error:" in ln]
        assert len(lines) == 1 and text.endswith(lines[0] + "\n"), text
        assert f"error: disk full while writing {outs[name]}: free space or choose another --out" in lines[0], text
        left = sorted(p.name for p in (tmp_path / f"after-{name}").rglob("*") if p.is_file())
        assert left == ["filler"], (name, left)  # the output is absent: not 0 bytes, not half, no temporary
