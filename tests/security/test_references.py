"""References stay inside (issue 21 item 3): what a run's or model's files name (model.json `gallery.uri`,
run.json `encoder.model`) resolves only inside that folder or to a local path recorded at training time; a URL
of any scheme written there is never fetched (a real HTTP server and a real S3 endpoint, moto, on 127.0.0.1 count
the requests they receive: zero), and a run trained on s3:// data keeps its gallery inside the run folder. A
relative `--train` is recorded as an absolute location, so LocDiff-H works from another folder. The address
check judges NAT64 and IPv4-compatible/mapped addresses by their IPv4 address, and a download that drips
bytes is cut at its overall deadline."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from locdiff.cli import main
from locdiff.data import storage
from locdiff.data.download import fetch, is_public_address
from locdiff.data.validation import RecordError
from locdiff.errors import UserError
from tests.faults.helpers import World, build_world, changes, snapshot


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


class _Counting(http.server.BaseHTTPRequestHandler):
    """Answers every request with a small body and counts it (the test's witness of 'never fetched')."""

    requests: list[str] = []  # noqa: RUF012 - shared by the handler instances of one server

    def _answer(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        body = b'{"files": {}}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer  # noqa: N815

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server():
    _Counting.requests = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", _Counting.requests
    finally:
        srv.shutdown()
        srv.server_close()


def _predict_h(run: Path, data: Path, out: Path) -> list[str]:
    return ["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--method", "locdiff-h",
            "--no-progress"]


@pytest.mark.parametrize("uri", ["{url}/gallery", "ftp://127.0.0.1:1/gallery", "memory://gallery",
                                 "file:///etc", "../outside", "gallery/../../outside"])
def test_a_gallery_reference_that_leaves_the_run_is_never_followed(world, tmp_path, capsys, http_server, uri):
    url, requests = http_server
    run = world.copy_run(tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    meta["gallery"] = {**meta["gallery"], "uri": uri.format(url=url)}
    (run / "model.json").write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    rc = main(_predict_h(run, world.test, tmp_path / "p.csv"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unexpected" not in err, err
    assert f"{run / 'model.json'}: gallery.uri: " in err
    assert "not accepted from a run folder" in err or "leads out of" in err, err
    assert requests == []  # the server saw nothing: no HEAD, no GET
    assert changes(before, snapshot(tmp_path)) == {"changed": [], "removed": [], "added": []}


def test_an_encoder_reference_that_is_a_url_is_never_fetched(world, tmp_path, http_server):
    from locdiff import Geolocator

    url, requests = http_server
    run = world.copy_run(tmp_path / "run")
    record = json.loads((run / "run.json").read_text())
    for model in (f"{url}/openai/clip", "hf://openai/clip", "../../elsewhere"):
        record["encoder"] = {**(record.get("encoder") or {}), "name": "x", "model": model}
        (run / "run.json").write_text(json.dumps(record))
        g = Geolocator.load(run)
        with pytest.raises(UserError, match=r"run\.json encoder\.model: .*(not accepted from a run folder|leads out)"):
            g.encoder_config()
    assert requests == []


def test_the_same_references_inside_the_run_and_local_paths_still_work(world, tmp_path):
    """A gallery copied into the run folder (a packaged model) and one at a recorded absolute path."""
    from locdiff.model.locdiff_method import LocDiffMethod
    from locdiff.runs import RunFolder, resolve_reference

    run = world.copy_run(tmp_path / "run")
    world.copy_gallery(run, run / "gallery")
    meta = json.loads((run / "model.json").read_text())
    meta["gallery"]["uri"] = "gallery"
    (run / "model.json").write_text(json.dumps(meta))
    assert main(_predict_h(run, world.test, tmp_path / "inside.csv")) == 0
    m = LocDiffMethod.load(run, RunFolder(run).read_config())
    assert m.gallery_ref["uri"] == str((run / "gallery").resolve())
    for url in ("s3://bucket/gallery", "S3://bucket/gallery", "s3a://bucket/gallery", "gs://bucket/gallery"):
        with pytest.raises(UserError, match=r"^x: .* is not accepted from a run folder"):
            resolve_reference(run, url, "x")
    assert resolve_reference(run, "openai/clip-vit-large-patch14", "x", hub_id=True) == "openai/clip-vit-large-patch14"
    assert resolve_reference(run, "/abs/tiny-clip", "x", hub_id=True) == "/abs/tiny-clip"


def test_a_relative_train_path_is_recorded_absolute(world, tmp_path, monkeypatch):
    """Issue 20 item 3: `locdiff train --train data/x.parquet` (relative, as the README writes it), then
    `predict --method locdiff-h` from another folder finds the gallery beside the table."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(world.train, work / "data" / "train.parquet")
    monkeypatch.chdir(work)
    assert main(world.train_argv(Path("run"), data=Path("data/train.parquet"))) == 0
    uri = json.loads((work / "run" / "model.json").read_text())["gallery"]["uri"]
    assert uri.startswith(str(work / "data" / "train.gallery") + "/"), uri  # absolute, beside the table
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(_predict_h(work / "run", world.test, Path("p.csv"))) == 0
    assert (elsewhere / "p.csv").is_file()


@pytest.mark.parametrize("ip,public", [
    ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254 (cloud metadata)
    ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
    ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
    ("64:ff9b:1::a00:1", False),  # local-use NAT64 prefix
    ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
    ("::a00:1", False),  # IPv4-compatible 10.0.0.1
    ("::ffff:127.0.0.1", False),  # IPv4-mapped
    ("::ffff:8.8.8.8", True),
    ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
    ("8.8.8.8", True),
    ("::1", False),
    ("::", False),
])
def test_the_address_check_sees_ipv4_inside_ipv6(ip, public):
    assert is_public_address(ip) is public


class _Drip(http.server.BaseHTTPRequestHandler):
    """Announces 40 bytes and sends one every 0.2 s (a server that holds a download open)."""

    sent: list[int] = []  # noqa: RUF012

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        for _ in range(40):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return
            type(self).sent.append(1)
            time.sleep(0.2)

    def log_message(self, *args) -> None:
        pass


def test_a_download_that_drips_is_cut_at_its_deadline():
    """40 bytes at 5 bytes/s with a 0.5 s timeout: no single read waits 0.5 s, but the whole transfer may
    take only 2 x 0.5 s + its size at 64 kB/s, so it stops long before the 40th byte."""
    _Drip.sent = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RecordError) as err:
            fetch(f"http://127.0.0.1:{srv.server_address[1]}/slow.jpg", timeout=0.5, retries=0,
                  allow_private=True)
    finally:
        srv.shutdown()
        srv.server_close()
    assert err.value.reason == "unreachable" and "too slow" in str(err.value.detail), err.value
    assert len(_Drip.sent) < 40


def test_private_addresses_are_refused_before_connecting():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(RecordError) as err:
            fetch(f"http://127.0.0.1:{port}/x.jpg", timeout=1, retries=0)
        assert err.value.reason == "refused_address"
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.accept()  # nothing connected


@pytest.fixture
def recording_s3(tmp_path, monkeypatch):
    """A moto S3 server of the test's own on 127.0.0.1 that records every request it receives (moto's
    recorder, into a file under tmp_path); yields (endpoint, count of recorded requests)."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port, make_bucket

    port, rec = free_port(), tmp_path / "moto-requests.jsonl"
    env = {**os.environ, "MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(rec)}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "moto_server did not start"
                time.sleep(0.1)
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(storage, "_S3_ENDPOINT", endpoint)  # over any endpoint an earlier test chose
        make_bucket(endpoint, "galleries")
        yield endpoint, lambda: len(rec.read_text().splitlines()) if rec.exists() else 0
    finally:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # no filesystem made here outlives this server
        proc.terminate()
        proc.wait(10)


@pytest.mark.s3
def test_an_s3_reference_in_a_run_file_is_never_fetched(world, tmp_path, capsys, recording_s3):
    """A complete, valid gallery on a live S3 endpoint, named by s3:// in model.json (and an s3:// encoder in
    run.json): the run is refused with one line naming the file and key, and the endpoint receives nothing."""
    import s3fs

    from locdiff import Geolocator
    from locdiff.gallery import Gallery

    endpoint, recorded = recording_s3
    run = world.copy_run(tmp_path / "run")
    gallery = world.copy_gallery(run, tmp_path / "gallery")
    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).put(str(gallery), "galleries/g", recursive=True)
    url = "s3://galleries/g"
    assert len(Gallery.load(url)) > 0 and recorded() > 0  # the witness works: a direct load is seen
    meta = json.loads((run / "model.json").read_text())
    meta["gallery"]["uri"] = url
    (run / "model.json").write_text(json.dumps(meta))
    record = json.loads((run / "run.json").read_text())
    record["encoder"] = {**(record.get("encoder") or {}), "name": "x", "model": "s3://galleries/encoder"}
    (run / "run.json").write_text(json.dumps(record))
    before, files = recorded(), snapshot(tmp_path / "run")
    capsys.readouterr()
    rc = main(_predict_h(run, world.test, tmp_path / "p.csv"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unexpected" not in err, err
    assert f"{run / 'model.json'}: gallery.uri: 's3://galleries/g' is not accepted" in err, err
    assert changes(files, snapshot(tmp_path / "run")) == {"changed": [], "removed": [], "added": []}
    assert not (tmp_path / "p.csv").exists()
    meta["gallery"]["uri"] = str(gallery)  # the gallery local again: the encoder reference is judged next
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"run\.json encoder\.model: 's3://galleries/encoder' is not accepted"):
        Geolocator.load(run).encoder_config()
    assert recorded() == before  # not one request: no HEAD, no GET, no listing


@pytest.mark.s3
def test_a_run_trained_on_s3_data_keeps_its_gallery_inside(world, tmp_path, recording_s3, monkeypatch):
    """Training on an s3:// table builds (or reuses) the gallery beside it in S3 and keeps a copy in the run
    folder; model.json names that copy relatively, so the moved run predicts with LocDiff-H without S3."""
    import s3fs

    endpoint, _ = recording_s3
    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).put(str(world.train),
                                                                            "galleries/data/train.parquet")
    run = tmp_path / "run"
    assert main(world.train_argv(run, data="s3://galleries/data/train.parquet")) == 0
    uri = json.loads((run / "model.json").read_text())["gallery"]["uri"]
    assert uri == "gallery" and (run / "gallery" / "gallery.json").is_file(), uri
    assert main(world.train_argv(run, "train.steps=6", data="s3://galleries/data/train.parquet")) == 0  # a resume
    assert len(list((run / "gallery").glob("data-*"))) == 1  # the earlier copy is not left behind
    shared = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).find("galleries/data/train.gallery")
    assert any(f.endswith("/gallery.json") for f in shared), shared  # the shared one beside the table is built
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    monkeypatch.setattr(storage, "_S3_ENDPOINT", "http://127.0.0.1:9")  # no S3 from here on: a request would fail
    assert main(_predict_h(moved, world.test, tmp_path / "p.csv")) == 0
    assert (tmp_path / "p.csv").is_file()


class _SlowS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint for one 40-byte object that answers HEAD at once and sends the body at 5 bytes/s: no
    single read waits long, only the whole transfer is slow (records what it sent)."""

    body = bytes(range(40))
    sent: list[int] = []  # noqa: RUF012 - shared by the handler instances of one server
    delay = 0.2  # seconds between two bytes
    protocol_version = "HTTP/1.1"

    def _headers(self, status: int, length: int, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(length), "ETag": '"0123456789abcdef0123456789abcdef"',
                     "Last-Modified": "Sun, 06 Dec 2026 00:00:00 GMT", "Content-Type": "binary/octet-stream",
                     **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        self._headers(200, len(self.body))

    def do_GET(self) -> None:  # noqa: N802
        lo, hi = 0, len(self.body) - 1
        if (rng := self.headers.get("Range", "")).startswith("bytes="):
            a, b = rng[6:].split("-")
            lo, hi = int(a), min(int(b or hi), hi)
        self._headers(206, hi - lo + 1, {"Content-Range": f"bytes {lo}-{hi}/{len(self.body)}"})
        try:
            for i in range(lo, hi + 1):
                self.wfile.write(self.body[i:i + 1])
                self.wfile.flush()
                type(self).sent.append(i)
                time.sleep(self.delay)
        except OSError:
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_an_s3_read_that_drips_is_cut_at_its_deadline(monkeypatch, tmp_path):
    """The same deadline for s3:// reads (shards, images, archives, galleries): with LOCDIFF_S3_TIMEOUT=0.5
    a 40-byte object sent at 5 bytes/s (8 s in all) is cut at 2 x 0.5 s + its size at 64 kB/s, for a read
    (fetch), a download into the cache (download_file) and a gallery file (Gallery.load)."""
    from locdiff.data.download import download_file

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "LOCDIFF_S3_TIMEOUT": "0.5",
                 "LOCDIFF_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowS3)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setattr(storage, "_S3_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.setattr(storage, "_S3_TIMEOUT", None)  # LOCDIFF_S3_TIMEOUT decides
    try:
        _SlowS3.sent = []
        with pytest.raises(RecordError) as err:
            fetch("s3://bucket/slow.jpg", timeout=0.5, retries=0)
        assert err.value.reason == "unreachable" and "too slow" in str(err.value.detail), err.value
        assert 0 < len(_SlowS3.sent) < 40
        _SlowS3.sent = []
        with pytest.raises(ValueError, match=r"cannot download s3://bucket/slow\.tar: .*too slow"):
            download_file("s3://bucket/slow.tar", retries=0)
        assert 0 < len(_SlowS3.sent) < 40 and not list((tmp_path / "cache").rglob("slow.tar*"))
        monkeypatch.setattr(_SlowS3, "delay", 0.0)  # the witness: the same object, sent at once, is read whole
        assert storage.read_bytes("s3://bucket/slow.jpg") == _SlowS3.body
        monkeypatch.setenv("LOCDIFF_S3_TIMEOUT", "-1")
        with pytest.raises(UserError, match="LOCDIFF_S3_TIMEOUT: must be a number of seconds"):
            storage.read_bytes("s3://bucket/slow.jpg")
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_model_is_not_packaged_with_a_url_for_its_gallery(world, tmp_path):
    """Packaging (register / the served model's folder) refuses a run whose model.json names its gallery by
    URL, naming the file and key; a gallery inside the run is copied and named relatively."""
    from locdiff.inference.pyfunc import stage

    run = world.copy_run(tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    uri = meta["gallery"]["uri"]
    meta["gallery"]["uri"] = "s3://bucket/g"
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"model\.json: gallery\.uri: 's3://bucket/g' is not accepted"):
        stage(run, tmp_path / "model")
    meta["gallery"]["uri"] = uri
    (run / "model.json").write_text(json.dumps(meta))
    out = stage(run, tmp_path / "model2")
    assert json.loads((out / "model.json").read_text())["gallery"]["uri"] == "gallery"
    assert (out / "gallery" / "gallery.json").is_file()
