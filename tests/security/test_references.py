"""References stay inside (issue 21 item 3): what a run's or model's files name (model.json `gallery.uri`,
run.json `encoder.model`) resolves only inside that folder, to a local path recorded at training time or to
the project's s3:// storage; a URL written there is never fetched (a real HTTP server on 127.0.0.1 counts the
requests it receives: zero). A relative `--train` is recorded as an absolute location, so LocDiff-H works from
another folder. The address check judges NAT64 and IPv4-compatible/mapped addresses by their IPv4 address,
and a download that drips bytes is cut at its overall deadline."""

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
    from locdiff.model.method import LocDiffMethod
    from locdiff.runs import RunFolder, resolve_reference

    run = world.copy_run(tmp_path / "run")
    world.copy_gallery(run, run / "gallery")
    meta = json.loads((run / "model.json").read_text())
    meta["gallery"]["uri"] = "gallery"
    (run / "model.json").write_text(json.dumps(meta))
    assert main(_predict_h(run, world.test, tmp_path / "inside.csv")) == 0
    m = LocDiffMethod.load(run, RunFolder(run).read_config())
    assert m.gallery_ref["uri"] == str((run / "gallery").resolve())
    assert resolve_reference(run, "s3://bucket/gallery", "x") == "s3://bucket/gallery"
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
