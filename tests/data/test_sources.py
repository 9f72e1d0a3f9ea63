"""Every source ingests its fixture end to end, from a real HTTP server into a local root and from a real
S3 endpoint (moto) into an s3:// root; the round trip is exact and bad records are counted by reason."""

from __future__ import annotations

import io
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locdiff.data import storage
from locdiff.data.config import load_dataset_config
from locdiff.data.features import load_features
from locdiff.data.ingest import ingest
from locdiff.data.shards import stage_dir
from locdiff.data.validation import ChecksumError, sha256_bytes
from tests.conftest import TEST_CACHE

from .fixtures import child_peak_bytes, read_samples, sha

REPO = Path(__file__).resolve().parents[2]

# where each source's --source points inside its fixture folder ("" = the folder itself)
SOURCE_PATH = {"im2gps3k": "", "yfcc26k": "", "yfcc4k": "", "mp16": "", "gws15k": "data.csv",
               "folder": "folder.tar", "osv5m": ""}


def small_config(name: str, **kw):
    # the fixtures are served on 127.0.0.1: private addresses must be allowed explicitly
    kw.setdefault("allow_private_addresses", True)
    return load_dataset_config(name, shard_size=4, max_side=128, retries=1, backoff=0.01, timeout=5, **kw)


def read_back(root: str, name: str) -> list[dict]:
    m_dir = stage_dir(root, name, "images")
    from locdiff.data.manifest import read_manifest

    m = read_manifest(m_dir)
    urls = [f"{m_dir}/{s['shard']}" for s in m["shards"]]
    return read_samples(urls)


def check_round_trip(manifest: dict, samples: list[dict], exp, max_side: int = 128) -> None:
    assert manifest["skipped"] == exp.skipped
    assert manifest["count"] == len(exp.good) == len(samples)
    assert manifest["rows"] == len(exp.good) + sum(exp.skipped.values())
    got = {s["json"]["id"]: s for s in samples}
    assert set(got) == set(exp.good)
    for rid, (lat, lon, digest) in exp.good.items():
        meta = got[rid]["json"]
        assert (meta["lat"], meta["lon"]) == (lat, lon)  # exact, not approximately
        if digest is not None:
            assert sha256_bytes(got[rid]["jpg"]) == digest  # stored byte for byte
        im = Image.open(io.BytesIO(got[rid]["jpg"]))
        assert im.format == "JPEG" and max(im.size) <= max_side
        assert [meta["width"], meta["height"]] == list(im.size)
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", ["im2gps3k", "yfcc26k", "yfcc4k", "mp16", "gws15k", "folder"])
@pytest.mark.parametrize("where", ["http-to-local", "s3-to-s3"])
def test_source_ingests_end_to_end(name, where, sources, tmp_path):
    kind = "http" if where == "http-to-local" else "s3"
    url, exp = sources[name][kind]
    root = str(tmp_path / "root") if kind == "http" else f"s3://data/{name}-{kind}"
    src = f"{url}/{SOURCE_PATH[name]}" if SOURCE_PATH[name] else url
    manifest = ingest(name, root, source=src, config=small_config(name), progress=False)
    check_round_trip(manifest, read_back(root, name), exp)
    # idempotent: a second run finds the stage complete and returns the same manifest
    assert ingest(name, root, source=src, config=small_config(name), progress=False) == manifest


def test_osv5m_through_huggingface_hub(sources, served, tmp_path, monkeypatch):
    """No --source: huggingface_hub downloads test.csv and the zips from HF_ENDPOINT (the local server
    answers like the Hub's resolve endpoint)."""
    monkeypatch.setenv("HF_ENDPOINT", served[1])
    _, exp = sources["osv5m"]["http"]
    cfg = small_config("osv5m", hf_images=["images/test/00.zip", "images/test/01.zip"])
    manifest = ingest("osv5m", str(tmp_path), config=cfg, progress=False)
    check_round_trip(manifest, read_back(str(tmp_path), "osv5m"), exp)
    assert manifest["source"]["metadata"]["url"].startswith("hf://datasets/osv5m/osv5m@main/")
    # the Hub's files went to the session's temporary cache (tests/conftest.py), never to the user's
    from huggingface_hub import constants

    cached = list(Path(constants.HF_HUB_CACHE).glob("datasets--osv5m--osv5m/snapshots/*/test.csv"))
    assert cached and Path(constants.HF_HUB_CACHE).resolve().is_relative_to(TEST_CACHE.resolve())


def test_osv5m_from_s3_mirror_into_s3(sources):
    url, exp = sources["osv5m"]["s3"]
    cfg = small_config("osv5m", hf_images=["images/test/00.zip", "images/test/01.zip"])
    root = "s3://data/osv5m-mirror"
    manifest = ingest("osv5m", root, source=url, config=cfg, progress=False)
    check_round_trip(manifest, read_back(root, "osv5m"), exp)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_embeddings_parquet_source(where, served, s3, tmp_path):
    from .fixtures import build_embeddings

    exp, emb = build_embeddings(tmp_path / "src", "")
    if where == "local":
        src, root = str(tmp_path / "src" / "emb.parquet"), str(tmp_path / "root")
    else:
        from .conftest import upload

        upload(tmp_path / "src", "s3://fixtures/emb")
        src, root = "s3://fixtures/emb/emb.parquet", "s3://data/emb"
    manifest = ingest("embeddings", root, source=src, config=small_config("embeddings"), progress=False)
    assert manifest["skipped"] == exp.skipped and manifest["count"] == len(exp.good)
    digest = sha256_bytes((tmp_path / "src" / "emb.parquet").read_bytes())
    assert manifest["source"]["metadata"] == {"url": src, "sha256": digest}
    wrong = small_config("embeddings")
    wrong.metadata.sha256 = "0" * 64  # a published checksum the table does not have: refused, local or in S3
    with pytest.raises(ChecksumError, match=rf"^{re.escape(src)}: sha256 {digest} differs from the "):
        ingest("embeddings", f"{root}-wrong", source=src, config=wrong, progress=False)
    scratch = Path(storage.local_tmp_dir(stage_dir(root, "embeddings", "features", "precomputed")))
    assert not list(scratch.glob("source-*"))  # an s3 table's local copy is removed once read
    table = load_features(root, "embeddings", "precomputed")
    keep = [i for i in range(len(emb)) if f"e{i}" in exp.good]
    assert list(table.ids) == [f"e{i}" for i in keep]
    np.testing.assert_array_equal(table.embedding, emb[keep])  # float32: exact
    np.testing.assert_array_equal(table.lat, [exp.good[f"e{i}"][0] for i in keep])
    # the CLI exports it back to an embeddings table, and inspects it
    from locdiff.cli import main
    from locdiff.io import read_embeddings

    out = f"{root}/back.parquet" if where == "s3" else str(tmp_path / "back.parquet")
    args = ["data", "export", "embeddings", "--root", root, "--encoder", "precomputed", "--out", out]
    assert main(args) == 0
    back = read_embeddings(out)
    assert list(back.ids) == list(table.ids)
    np.testing.assert_array_equal(back.embedding, emb[keep])
    assert main(["data", "inspect", f"{root}/embeddings"]) == 0


def test_test_share_on_an_embeddings_table_is_refused(tmp_path, capsys):
    # the table is copied whole: a test set would hold every training row
    from locdiff.cli import main

    from .fixtures import build_embeddings

    build_embeddings(tmp_path / "src", "")
    root = tmp_path / "root"
    argv = ["data", "ingest", "embeddings", "--root", str(root), "--source", str(tmp_path / "src" / "emb.parquet"),
            "--test-share", "0.1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("locdiff data ingest: error: --test-share: data set "
                                                   "'embeddings' (an embeddings table) is not split"), err
    assert not (root / "embeddings").exists() and not (root / "embeddings-test").exists()  # nothing written


def test_limit_takes_the_first_rows(sources, tmp_path):
    url, exp = sources["folder"]["http"]
    m = ingest("folder", str(tmp_path), source=f"{url}/folder.tar", limit=3, config=small_config("folder"),
               progress=False)
    assert m["rows"] == 3 and m["count"] == 3
    assert [s["json"]["id"] for s in read_back(str(tmp_path), "folder")] == ["img0000", "img0001", "img0002"]


def test_fixture_images_are_distinct(sources):
    _, exp = sources["im2gps3k"]["http"]
    digests = [d for _, _, d in exp.good.values() if d]
    assert len(set(digests)) == len(digests)
    assert sha(b"") != digests[0]


@pytest.mark.parametrize("name", ["im2gps3k", "yfcc26k", "mp16"])
def test_published_urls_with_checksums(name, sources, tmp_path):
    """No --source: the config's URLs (pointed at the local server) and published checksums are used,
    exactly as with the real URLs."""
    import hashlib

    url, exp = sources[name]["http"]
    folder = sources[name]["http_dir"]
    cfg = small_config(name)
    cfg.metadata.url = f"{url}/{cfg.metadata.filename}"
    cfg.metadata.sha256 = hashlib.sha256((folder / cfg.metadata.filename).read_bytes()).hexdigest()
    cfg.images.url = f"{url}/{cfg.images.filename}"
    cfg.images.sha256 = hashlib.sha256((folder / cfg.images.filename).read_bytes()).hexdigest()
    manifest = ingest(name, str(tmp_path), config=cfg, progress=False)
    check_round_trip(manifest, read_back(str(tmp_path), name), exp)
    assert manifest["source"]["metadata"] == {"url": cfg.metadata.url, "sha256": cfg.metadata.sha256}


def _moto_with_auth():
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): any key is unknown."""
    import os
    import socket
    import time

    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


def test_a_missing_bucket_or_wrong_credentials_is_one_line_naming_the_url(s3, tmp_path, capsys, monkeypatch):
    """s3fs says only "The specified bucket does not exist", "Forbidden" or "The AWS Access Key Id you provided
    does not exist in our records": every command named no path. Now one line naming the URL, exit 2."""
    from locdiff.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 24), (200, 100, 50)).save(photos / "a.jpg")
    (tmp_path / "p.csv").write_text("id,lat,lon,pred_lat,pred_lon\na,1,2,3,4\n")

    def fails(argv: list[str], url: str, why: str) -> None:
        assert main(argv) == 2
        out = capsys.readouterr().err
        lines = [ln for ln in out.splitlines() if ": error: " in ln]  # after a progress bar, maybe
        assert len(lines) == 1 and "Traceback" not in out, out
        err = lines[0]
        assert err.startswith(f"locdiff {argv[0]}") and f": error: {url}" in err, err
        assert why in err and "check the endpoint, bucket and credentials" in err, err

    fails(["data", "ingest", "folder", "--root", "s3://no-such-bucket/root", "--source", str(photos)],
          "s3://no-such-bucket/root", "not found (The specified bucket does not exist)")
    fails(["data", "ingest", "folder", "--root", str(tmp_path / "root"), "--source", "s3://no-such-bucket/photos"],
          "s3://no-such-bucket/photos", "not found (The specified bucket does not exist)")
    proc, endpoint = _moto_with_auth()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        fails(["evaluate", "--predictions", "s3://data/p.parquet"], "s3://data/p.parquet", "access denied (")
        fails(["data", "inspect", "s3://data/root/folder"], "s3://data/root/folder", "access denied (")
        fails(["data", "ingest", "folder", "--root", str(tmp_path / "root"), "--source", "s3://data/photos"],
              "s3://data/photos", "access denied (")
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_s3_output_that_cannot_be_written_fails_before_any_work(s3, tmp_path, capsys, monkeypatch):
    """`predict --out`, `locate --out` and `data ingest/embed --root` on s3:// without a bucket or access failed
    only when the work was done and written: now one line naming the URL before anything is read (here the
    run, the data and the encoder do not even exist). A writable bucket keeps no trace of the check."""
    import s3fs

    from locdiff.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 24), (200, 100, 50)).save(photos / "a.jpg")
    nothing = str(tmp_path / "missing")

    def fails(argv: list[str], url: str, why: str) -> None:
        assert main(argv) == 2
        out = capsys.readouterr().err
        lines = [ln for ln in out.splitlines() if ": error: " in ln]
        assert len(lines) == 1 and "Traceback" not in out, out
        assert f": error: {url}: {why}" in lines[0], lines[0]

    bucket, why = "s3://no-such-bucket", "not found (The specified bucket does not exist)"
    fails(["predict", "--run", nothing, "--data", nothing, "--out", f"{bucket}/p.parquet"], f"{bucket}/p.parquet", why)
    fails(["locate", str(photos), "--run", nothing, "--out", f"{bucket}/l.csv"], f"{bucket}/l.csv", why)
    fails(["data", "ingest", "folder", "--root", f"{bucket}/root", "--source", nothing], f"{bucket}/root", why)
    fails(["data", "embed", "folder", "--root", f"{bucket}/root", "--encoder", nothing], f"{bucket}/root", why)
    proc, endpoint = _moto_with_auth()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        fails(["predict", "--run", nothing, "--data", nothing, "--out", "s3://data/p.parquet"], "s3://data/p.parquet",
              "access denied (")
    finally:
        proc.terminate()
        proc.wait(10)
    monkeypatch.undo()  # the session's server, its credentials
    assert main(["predict", "--run", nothing, "--data", nothing, "--out", "s3://data/checked/p.parquet"]) == 2
    assert nothing in capsys.readouterr().err  # past the check, to the missing run
    assert s3fs.S3FileSystem(endpoint_url=s3).find("data/checked") == []


def test_an_endpoint_that_never_answers_fails_within_three_timeouts_per_request(s3, monkeypatch, capsys):
    """An S3 endpoint that accepts connections and never answers: `evaluate` of a table there tried each
    request 15 times (s3fs's 5 tries of botocore's 3), 32 s at a timeout of 1 s (16 minutes at the default
    30 s); now botocore's 3 attempts only: one line naming the URL, after 3 connections per request (each
    timed-out attempt opens a new one; counted, not timed)."""
    import socket
    import threading

    from locdiff.cli import main
    from tests.conftest import free_port

    port = free_port()
    server = socket.socket()
    server.bind(("127.0.0.1", port))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept() -> None:  # keeps every connection open, silent
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("LOCDIFF_S3_TIMEOUT", "1")
    try:
        assert main(["evaluate", "--predictions", "s3://data/silent.parquet"]) == 2
    finally:
        stop.set()
        thread.join()
        try:  # connections still waiting in the backlog were attempts too
            while True:
                held.append(server.accept()[0])
        except OSError:
            pass
        for c in held:
            c.close()
        server.close()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "/data/silent.parquet" in err, err
    assert 1 <= len(held) <= 6, len(held)  # botocore's 3 attempts a request (4 here; s3fs's retries on top: 20)


PLAN_CHILD = r"""
import sys
from locdiff.data.config import load_dataset_config
from locdiff.data.sources import make_source
plan = make_source(load_dataset_config("mp16"), sys.argv[1]).plan()
assert len(plan.records) == int(sys.argv[2]), len(plan.records)
assert sum(len(c) for c in plan.records.chunks(1000)) == len(plan.records)
# VmHWM: this process's own peak (ru_maxrss would carry the forking pytest process's peak over through exec)
print([ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1])
"""


@pytest.mark.slow
def test_planning_a_long_csv_holds_nothing_that_grows_with_its_rows(tmp_path):
    """The MP-16 plan (metadata CSV joined with its URL list), then every record read back a shard at a time:
    a CSV four times as long must not raise the peak by more than 150 bytes a row (the rows, records and
    URLs were all held at once: 1,790 bytes a row measured, then 1,260; now the CSVs are parsed a chunk at a
    time and the URL list and the records live in SQLite scratch files: about 0)."""
    n = 50_000
    peaks = []
    for rows in (n, 4 * n):
        rng, folder = random.Random(rows), tmp_path / str(rows)
        folder.mkdir()
        meta, urls = ["IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label"], ["image_id,url"]
        for _ in range(rows):
            iid = f"{rng.randrange(256):02x}/{rng.randrange(256):02x}/{rng.randrange(10**9, 10**10)}.jpg"
            meta.append(f"{iid},{rng.randrange(10**7, 10**8)}@N0{rng.randrange(10)},{rng.uniform(-80, 80):.6f},"
                        f"{rng.uniform(-180, 180):.6f},{rng.randrange(3)},{rng.randrange(16)}")
            urls.append(f"{iid},http://farm{rng.randrange(1, 10)}.staticflickr.com/{rng.randrange(1000, 9999)}/"
                        f"{rng.randrange(10**9, 10**10)}_{rng.randrange(16**9, 16**10):010x}.jpg")
        (folder / "mp16_places365.csv").write_text("\n".join(meta) + "\n")
        (folder / "mp16_urls.csv").write_text("\n".join(urls) + "\n")
        peaks.append(child_peak_bytes(PLAN_CHILD, str(folder), str(rows)))
    per_row = (peaks[1] - peaks[0]) / (3 * n)
    print(f"peaks {peaks[0] / 2**20:.0f} MB, {peaks[1] / 2**20:.0f} MB; {per_row:.0f} bytes a row")
    assert per_row < 150, (peaks, per_row)
