"""A full disk during ingest: the shard being written leaves no partial file, the error is one line
naming the folder (a ValueError: exit code 2 from the CLI), the finished shards stay, and a re-run
resumes to the same manifest as an uninterrupted run.

Two ways: a write that fails with ENOSPC part-way through the third shard (always runs), and a real
full disk, a 150 kB tmpfs mounted in a private mount namespace (`unshare -rm`; skipped where the
kernel or the container does not allow it)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from locdiff.data import ingest as ingest_module
from locdiff.data.config import configs_dir, load_dataset_config
from locdiff.data.ingest import ingest
from locdiff.data.storage import NoSpaceError, removed_if_failed_empty

from .fixtures import build_folder


def leftovers(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and (".tmp" in p.name or ".part" in p.name))


def test_enospc_while_writing_a_shard(tmp_path, monkeypatch):
    build_folder(tmp_path / "src", "", n=12, archive=False)
    cfg = load_dataset_config("folder", shard_size=4, max_side=128)
    root = tmp_path / "root"
    real = ingest_module.write_tar

    def fills_up_on_the_third_shard(path, samples):  # noqa: ANN001
        if "shard-000002" in os.path.basename(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 3000)  # part of the shard reached the disk
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, samples)

    monkeypatch.setattr(ingest_module, "write_tar", fills_up_on_the_third_shard)
    images = root / "folder" / "images"
    with pytest.raises(NoSpaceError) as err:
        ingest("folder", str(root), source=str(tmp_path / "src"), config=cfg, progress=False)
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"{images}: no space left on device") and "run again" in msg
    assert leftovers(root) == []  # the partial shard is gone
    assert sorted(p.name for p in images.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (images / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in images.glob("shard-*")}

    monkeypatch.setattr(ingest_module, "write_tar", real)  # space again: the re-run resumes
    m = ingest("folder", str(root), source=str(tmp_path / "src"), config=cfg, progress=False)
    clean = ingest("folder", str(tmp_path / "clean"), source=str(tmp_path / "src"), config=cfg, progress=False)
    assert m == clean and m["count"] == 12
    assert {n: (images / n).stat().st_mtime_ns for n in finished} == finished  # not rewritten


CLI = "import sys; from locdiff.cli import main; sys.exit(main())"


@pytest.mark.slow  # over 3 s: `make test` runs it, `make test-fast` does not
def test_a_real_full_disk_is_one_line_and_exit_2(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    build_folder(tmp_path / "src", "", n=40, archive=False)  # about 4 kB per image
    configs = tmp_path / "configs"
    shutil.copytree(configs_dir() / "datasets", configs / "datasets")
    text = (configs / "datasets" / "folder.yaml").read_text().replace("shard_size: 1000", "shard_size: 4")
    (configs / "datasets" / "folder.yaml").write_text(text)
    root = tmp_path / "root"
    root.mkdir()
    script = (f"mount -t tmpfs -o size=150k tmpfs {root} || exit 99; "
              f"{sys.executable} -c '{CLI}' data ingest folder --root {root} --source {tmp_path / 'src'} "
              f"2>{tmp_path / 'err.txt'}; echo rc=$?; "
              f"find {root} -type f | sort")
    env = {**os.environ, "LOCDIFF_CONFIGS": str(configs)}
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                         timeout=300).stdout
    err = [line for line in (tmp_path / "err.txt").read_text().splitlines() if "error:" in line
           or "Traceback" in line]
    images = f"{root}/folder/images"
    assert "rc=2" in out, (out, err)
    assert len(err) == 1 and err[0].startswith(f"locdiff data ingest: error: {images}: no space left on device"), err
    files = [line for line in out.splitlines() if line.startswith(str(root))]
    assert [f for f in files if ".tmp" in os.path.basename(f)] == []  # no partial file left
    shards = [f for f in files if os.path.basename(f).startswith("shard-") and f.endswith(".tar")]
    assert 1 <= len(shards) < 10 and f"{images}/manifest.json" not in files
    for shard in shards:  # every shard left behind is a finished one (its progress record exists)
        name = os.path.basename(shard).replace(".tar", ".json")
        assert f"{images}/_progress/{name}" in files


def test_a_failed_fresh_stage_leaves_no_empty_folder_and_keeps_one_with_a_file(tmp_path):
    """`removed_if_failed_empty` (locdiff/data/storage.py): folders made for a stage that failed go again when
    they hold no file; a folder that existed before, or that holds a finished file, stays."""
    stage = tmp_path / "root" / "ds" / "features" / "enc"
    with pytest.raises(RuntimeError), removed_if_failed_empty(str(stage)):
        (stage / ".tmp").mkdir(parents=True)
        raise RuntimeError("no encoder")
    assert list(tmp_path.iterdir()) == []  # root/ too: this run made it
    with pytest.raises(RuntimeError), removed_if_failed_empty(str(stage)):
        stage.mkdir(parents=True)
        (stage / "shard-000000.tar").write_bytes(b"done")
        raise RuntimeError("killed after one shard")
    assert (stage / "shard-000000.tar").read_bytes() == b"done"  # the re-run resumes from it
    with removed_if_failed_empty(str(tmp_path / "ok")):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()  # success: nothing removed
