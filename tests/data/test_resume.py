"""A process killed mid-ingest and run again ends with the same manifest and shards as an uninterrupted
run, without rewriting the shards it had finished."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from locdiff.data.config import configs_dir

from .fixtures import build_folder, killed_before_placing

CLI = "import sys; from locdiff.cli import main; sys.exit(main())"


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # over 3 s: `make test` runs it, `make test-fast` does not
def test_killed_ingest_resumes_to_the_same_manifest(tmp_path, monkeypatch):
    exp = build_folder(tmp_path / "src", "", n=40, archive=False)
    configs = tmp_path / "configs"
    shutil.copytree(configs_dir() / "datasets", configs / "datasets")
    text = (configs / "datasets" / "folder.yaml").read_text().replace("shard_size: 1000", "shard_size: 4")
    (configs / "datasets" / "folder.yaml").write_text(text)
    env = {**os.environ, "LOCDIFF_CONFIGS": str(configs), "LOCDIFF_INGEST_DELAY": "0.05"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["data", "ingest", "folder", "--source", str(tmp_path / "src")]

    proc = run_cli([*args, "--root", str(killed)], env)
    images = killed / "folder" / "images"
    deadline = time.time() + 120
    while not (images / "shard-000002.tar").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "ingest made no progress"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup handlers run
    proc.wait()
    assert not (images / "manifest.json").exists()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images.glob("shard-*.tar")}
    assert 3 <= len(finished) < 10

    partial = images / ".tmp" / "shard-000009.tar.99999-deadbeef.tmp"  # as a kill inside a write leaves
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(b"half a shard")
    env.pop("LOCDIFF_INGEST_DELAY")
    for root in (killed, clean):
        proc = run_cli([*args, "--root", str(root)], env)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert f"{len(exp.good)} images in 10 shards" in out

    resumed = json.loads((images / "manifest.json").read_text())
    uninterrupted = json.loads((clean / "folder" / "images" / "manifest.json").read_text())
    assert resumed == uninterrupted
    assert resumed["count"] == 40 and resumed["skipped"] == {}
    for name, stat in finished.items():  # finished shards were not rewritten
        p = images / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat
    for s in resumed["shards"]:  # and every shard is byte-identical to the uninterrupted run's
        assert (images / s["shard"]).read_bytes() == (clean / "folder" / "images" / s["shard"]).read_bytes()
    leftovers = [p for p in images.rglob("*") if p.is_file() and (".tmp" in p.name or ".part" in p.name)]
    assert leftovers == []


def test_a_run_killed_while_rewriting_a_stage_does_not_keep_the_old_shard(tmp_path, monkeypatch):
    """An ingest with other settings rewrites the stage's shards; killed after a shard's progress record and
    before its rename, the re-run must not take the earlier ingest's shard of that name for a finished one."""
    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest

    build_folder(tmp_path / "src", "", n=12, archive=False)
    src, root = str(tmp_path / "src"), str(tmp_path / "root")
    ingest("folder", root, source=src, config=load_dataset_config("folder", shard_size=4, max_side=96),
           progress=False)
    cfg = load_dataset_config("folder", shard_size=4, max_side=48)
    with killed_before_placing(monkeypatch, "shard-000001.tar"):
        ingest("folder", root, source=src, config=cfg, progress=False)
    resumed = ingest("folder", root, source=src, config=cfg, progress=False)
    clean = ingest("folder", str(tmp_path / "clean"), source=src, config=cfg, progress=False)
    assert resumed == clean
    for s in clean["shards"]:
        assert (tmp_path / "root" / "folder" / "images" / s["shard"]).read_bytes() == \
            (tmp_path / "clean" / "folder" / "images" / s["shard"]).read_bytes(), s["shard"]


def test_an_embeddings_ingest_clears_what_a_killed_one_left(tmp_path):
    """The embeddings source (a Parquet table to feature shards) removes the partial shards of a killed run,
    as the other stages do: each kill would otherwise leave one more for good."""
    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest

    from .fixtures import build_embeddings

    build_embeddings(tmp_path / "src", "")
    stage = tmp_path / "root" / "embeddings" / "features" / "precomputed"
    partial = stage / ".tmp" / "shard-000001.tar.deadbeef.tmp"  # as a kill inside a write leaves
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a shard")
    m = ingest("embeddings", str(tmp_path / "root"), source=str(tmp_path / "src" / "emb.parquet"),
               config=load_dataset_config("embeddings", shard_size=4), progress=False)
    assert m["count"] > 4
    assert [p for p in stage.rglob("*") if p.is_file() and ".tmp" in p.name] == []


def test_a_download_removes_what_killed_downloads_of_the_file_left(served, tmp_path):
    """A download killed on the way leaves FILE.part-PID in the cache (an archive's size at most); the next
    download of that file removes those of processes that no longer run."""
    from locdiff.data.download import download_file

    root, base = served
    (root / "resume-dl.bin").write_bytes(b"x" * 1000)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"resume-dl.bin.part-{dead}").write_bytes(b"x" * 300)  # as a killed download leaves
    local, _ = download_file(f"{base}/resume-dl.bin", dest_dir=str(cache), allow_private=True, retries=0)
    assert open(local, "rb").read() == b"x" * 1000
    assert sorted(p.name for p in cache.iterdir()) == ["resume-dl.bin"]


def test_an_ingest_clears_the_partial_records_a_killed_one_left(tmp_path):
    """A kill inside the write of a progress record or of the manifest leaves its temporary sibling
    (NAME.tmp-PID-<random>); the re-run removes those of processes that no longer run."""
    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest

    build_folder(tmp_path / "src", "", n=8, archive=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    images = tmp_path / "root" / "folder" / "images"
    (images / "_progress").mkdir(parents=True)
    for left in (images / "_progress" / f"shard-000001.json.tmp-{dead}-deadbeef",
                 images / f"manifest.json.tmp-{dead}-deadbeef"):
        left.write_bytes(b"{")
    m = ingest("folder", str(tmp_path / "root"), source=str(tmp_path / "src"),
               config=load_dataset_config("folder", shard_size=4), progress=False)
    assert m["count"] == 8
    assert [p for p in images.rglob("*") if p.is_file() and ".tmp" in p.name] == []


def test_a_photo_replaced_under_its_name_is_ingested_again(tmp_path):
    """A re-run over a local folder where one photo was replaced under the same name: its shard is written again
    with the new photo (the manifest took the stage for done); the other shard is not rewritten, and a re-run
    over the unchanged folder does no work."""
    from locdiff.data.config import load_dataset_config
    from locdiff.data.ingest import ingest

    from .fixtures import jpeg, read_samples

    build_folder(tmp_path / "src", "", n=8, archive=False)
    images = tmp_path / "root" / "folder" / "images"

    def run() -> dict:
        return ingest("folder", str(tmp_path / "root"), source=str(tmp_path / "src"),
                      config=load_dataset_config("folder", shard_size=4), progress=False)

    def stats() -> dict:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images.glob("shard-*.tar")}

    def stored(rid: str) -> bytes:
        return next(s["jpg"] for s in read_samples([str(images / "shard-000001.tar")]) if s["json"]["id"] == rid)

    first = run()
    before, old = stats(), stored("img0005")
    (tmp_path / "src" / "img0005.jpg").write_bytes(jpeg(999))
    second = run()
    assert second["shards"][0] == first["shards"][0] and second["shards"][1]["sha256"] != first["shards"][1]["sha256"]
    assert stats()["shard-000000.tar"] == before["shard-000000.tar"]  # the unchanged shard stays
    assert stored("img0005") != old
    again = stats()
    assert run() == second and stats() == again  # unchanged: nothing written
