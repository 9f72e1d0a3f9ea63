"""Ingest reads only what it is meant to: each attack of issue 12 on `data ingest folder`, reproduced and
shown refused. File references stay inside the source (`..`, absolute paths, symlinks out); URL lists
hold only http(s):// and s3:// URLs on public addresses unless the option allows private ones (a real
HTTP server on 127.0.0.1 sees no request without it); endless streams stop at the byte limit;
decompression bombs are counted as too_large and the ingest completes with the good images.

"Never read" is shown with a Python audit hook that records every file the process opens, and "no
request" with the HTTP server's own log of the requests it received.
"""

from __future__ import annotations

import csv
import errno
import functools
import http.server
import io
import socket
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locdiff.cli import main
from locdiff.data.config import load_dataset_config
from locdiff.data.ingest import ingest
from locdiff.data.manifest import read_manifest
from locdiff.data.shards import decode_sample, iter_shard_samples, stage_dir
from locdiff.data.validation import SourceError

# -- helpers ----------------------------------------------------------------------------------------

def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, *, bits: int = 8, colour: int = 2, rows: bool = False) -> bytes:
    """A PNG whose header declares width x height. rows=False: a few bytes of pixel data only (a
    74-byte bomb); rows=True: every (all-zero) row, compressed: a real, valid image of that size."""
    head = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bits, colour,
                                                                    0, 0, 0))
    if not rows:
        return head + png_chunk(b"IDAT", zlib.compress(b"\0" * 8)) + png_chunk(b"IEND", b"")
    per_row = 1 + (width * bits * (3 if colour == 2 else 1) + 7) // 8
    comp = zlib.compressobj(9)
    row = b"\0" * per_row
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return head + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def cfg(**kw):
    return load_dataset_config("folder", **{"shard_size": 4, "max_side": 128, "retries": 0, "backoff": 0.01,
                                            "timeout": 2, **kw})


def stored(root: Path) -> list[dict]:
    d = stage_dir(str(root), "folder", "images")
    m = read_manifest(d)
    return [decode_sample(s) for sh in m["shards"] for s in iter_shard_samples(f"{d}/{sh['shard']}")]


class OpenedFiles:
    """Every path this process opens while active (a sys.addaudithook: hooks cannot be removed, so it
    is installed once and switched on per test)."""

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event == "open" and args and isinstance(args[0], str | bytes):
            self.paths.append(args[0] if isinstance(args[0], str) else args[0].decode(errors="replace"))

    def under(self, folder: Path | str) -> list[str]:
        folder = str(folder)
        return [p for p in self.paths if p == folder or p.startswith(folder.rstrip("/") + "/")]


@pytest.fixture(scope="session")
def _opened_files() -> OpenedFiles:
    return OpenedFiles()


@pytest.fixture
def opened(_opened_files):
    _opened_files.paths.clear()
    _opened_files.active = True
    yield _opened_files
    _opened_files.active = False


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus /endless (zeros forever, no Content-Length) and /redirect?to=URL; every
    request line is recorded on the server."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/endless"):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            block = b"\0" * 65536
            try:
                while True:
                    self.wfile.write(block)
            except OSError:
                return
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.end_headers()
            return
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        super().do_HEAD()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1: (served folder, base URL, list of request paths it received)."""
    root = tmp_path_factory.mktemp("served")
    (root / "img.jpg").write_bytes(jpeg(1))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RecordingHandler,
                                                                              directory=str(root)))
    srv.daemon_threads = True
    srv.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}", srv.requests  # type: ignore[attr-defined]
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv("LOCDIFF_ALLOW_PRIVATE_ADDRESSES", raising=False)


# -- reads outside the source -----------------------------------------------------------------------

def test_file_column_cannot_leave_the_folder(tmp_path, opened):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = jpeg(99)
    (outside / "secret.jpg").write_bytes(secret)
    (outside / "x.jpg").write_bytes(secret)
    src = tmp_path / "deep" / "src"
    (src / "sub").mkdir(parents=True)
    (src / "ok.jpg").write_bytes(jpeg(1))
    (src / "link.jpg").symlink_to(outside / "secret.jpg")  # a symlink out of the folder
    (src / "linkdir").symlink_to(outside, target_is_directory=True)  # a folder symlink out of it
    (src / "inner.jpg").symlink_to(src / "ok.jpg")  # a symlink that stays inside: allowed
    rows = [
        {"id": "ok", "lat": "1", "lon": "2", "file": "ok.jpg"},
        {"id": "dotdot", "lat": "1", "lon": "2", "file": "../../x.jpg"},
        {"id": "dotdot-sub", "lat": "1", "lon": "2", "file": "sub/../../../outside/secret.jpg"},
        {"id": "dotdot-encoded", "lat": "1", "lon": "2", "file": "%2e%2e/%2e%2e/outside/secret.jpg"},
        {"id": "absolute", "lat": "1", "lon": "2", "file": str(outside / "secret.jpg")},
        {"id": "file-url", "lat": "1", "lon": "2", "file": f"file://{outside / 'secret.jpg'}"},
        {"id": "symlink", "lat": "1", "lon": "2", "file": "link.jpg"},
        {"id": "symlinked-dir", "lat": "1", "lon": "2", "file": "linkdir/secret.jpg"},
        {"id": "inner-link", "lat": "1", "lon": "2", "file": "inner.jpg"},
    ]
    write_csv(src / "metadata.csv", rows)
    opened.paths.clear()  # from here on: the ingest's own opens
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(), progress=False)

    assert m["skipped"] == {"outside_source": 7}
    assert sorted(m["skipped_examples"]["outside_source"]) == sorted(
        ["dotdot", "dotdot-sub", "dotdot-encoded", "absolute", "file-url", "symlink", "symlinked-dir"])
    assert m["count"] == 2 and [s["json"]["id"] for s in stored(tmp_path / "root")] == ["ok", "inner-link"]
    assert opened.under(outside) == []  # no file outside the source was ever opened
    assert opened.under(src / "ok.jpg")  # (the hook does see the reads that are allowed)


def test_file_column_in_an_archive_is_resolved_inside_it(tmp_path):
    import tarfile

    (tmp_path / "secret.jpg").write_bytes(jpeg(99))
    rows = [{"id": "ok", "lat": "1", "lon": "2", "file": "ok.jpg"},
            {"id": "dotdot", "lat": "1", "lon": "2", "file": "../secret.jpg"},
            {"id": "absolute", "lat": "1", "lon": "2", "file": str(tmp_path / "secret.jpg")}]
    write_csv(tmp_path / "metadata.csv", rows)
    with tarfile.open(tmp_path / "src.tar", "w") as t:
        t.add(tmp_path / "metadata.csv", "metadata.csv")
        info = tarfile.TarInfo("ok.jpg")
        data = jpeg(1)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    m = ingest("folder", str(tmp_path / "root"), source=str(tmp_path / "src.tar"), config=cfg(), progress=False)
    assert m["skipped"] == {"outside_source": 2} and m["count"] == 1


@pytest.mark.parametrize("labelled", [True, False], ids=["csv", "unlabelled"])
def test_a_symlink_loop_in_the_folder_is_skipped_not_fatal(tmp_path, labelled):
    """A symlink loop beside the photos stopped the whole ingest ("Too many levels of symbolic links", from
    listing the folder's CSVs): it is a skipped row, and the other photos are ingested."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.jpg").write_bytes(jpeg(1))
    (src / "loop.jpg").symlink_to("loop.jpg")
    if labelled:
        write_csv(src / "metadata.csv", [{"id": "ok", "lat": "1", "lon": "2"}, {"id": "loop", "lat": "3", "lon": "4"}])
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(**({} if labelled else {
        "coordinates": "optional"})), progress=False)
    assert m["count"] == 1 and sum(m["skipped"].values()) == 1, m["skipped"]


# -- URL lists: schemes and addresses ---------------------------------------------------------------

def url_list(tmp_path: Path, urls: dict[str, str]) -> Path:
    src = tmp_path / "list"
    src.mkdir(exist_ok=True)
    write_csv(src / "urls.csv", [{"id": k, "lat": "10", "lon": "20", "url": v} for k, v in urls.items()])
    return src / "urls.csv"


def test_url_list_accepts_only_http_and_s3(tmp_path, opened):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg(99))
    urls = {
        "file-url": f"file://{outside / 'secret.jpg'}",
        "dev-zero": "file:///dev/zero",
        "bare-absolute": str(outside / "secret.jpg"),
        "bare-relative": "../outside/secret.jpg",
        "ftp": "ftp://example.org/x.jpg",
        "data": "data:image/jpeg;base64,AAAA",
        "gopher": "gopher://127.0.0.1:70/x",
    }
    src = url_list(tmp_path, urls)
    opened.paths.clear()
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(), progress=False)
    assert m["skipped"] == {"refused_url": len(urls)} and m["count"] == 0
    assert opened.under(outside) == [] and opened.under("/dev/zero") == []


def test_private_addresses_get_no_request_without_the_option(tmp_path, server):
    _, base, requests = server
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as s:  # a closed port: must read exactly like the open one
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    urls = {
        "loopback": f"{base}/img.jpg",
        "loopback-closed-port": f"http://127.0.0.1:{closed}/img.jpg",
        "localhost-name": f"http://localhost:{port}/img.jpg",
        "loopback-v6": f"http://[::1]:{port}/img.jpg",
        "mapped-v6": f"http://[::ffff:127.0.0.1]:{port}/img.jpg",
        "decimal-ip": f"http://2130706433:{port}/img.jpg",
        "metadata-service": "http://169.254.169.254/latest/meta-data/",
        "rfc1918": "http://10.1.2.3/img.jpg",
        "unspecified": f"http://0.0.0.0:{port}/img.jpg",
        "https-private": f"https://127.0.0.1:{port}/img.jpg",
    }
    before = len(requests)
    m = ingest("folder", str(tmp_path / "root"), source=str(url_list(tmp_path, urls)), config=cfg(),
               progress=False)
    assert requests[before:] == []  # the server saw no request at all
    # one generic reason for all of them: an open and a closed port cannot be told apart
    assert m["skipped"] == {"refused_address": len(urls)} and m["count"] == 0


def test_private_addresses_are_fetched_with_the_option(tmp_path, server, monkeypatch):
    _, base, requests = server
    src = url_list(tmp_path, {"loopback": f"{base}/img.jpg"})
    before = len(requests)
    m = ingest("folder", str(tmp_path / "a"), source=str(src), config=cfg(allow_private_addresses=True),
               progress=False)
    assert m["count"] == 1 and requests[before:] == ["/img.jpg"]
    monkeypatch.setenv("LOCDIFF_ALLOW_PRIVATE_ADDRESSES", "1")  # the environment variable works too
    m = ingest("folder", str(tmp_path / "b"), source=str(src), config=cfg(), progress=False)
    assert m["count"] == 1 and requests[before:] == ["/img.jpg", "/img.jpg"]


def test_cli_flag_allows_private_addresses(tmp_path, server, capsys):
    _, base, requests = server
    src = url_list(tmp_path, {"loopback": f"{base}/img.jpg"})
    args = ["data", "ingest", "folder", "--source", str(src)]
    assert main([*args, "--root", str(tmp_path / "a")]) == 0
    assert "skipped: refused_address 1" in capsys.readouterr().out
    assert main([*args, "--root", str(tmp_path / "b"), "--allow-private-addresses"]) == 0
    assert "folder: 1 images in 1 shards; skipped: none" in capsys.readouterr().out


def test_a_private_source_url_is_a_clear_error_and_gets_no_request(tmp_path, server, capsys):
    root, base, requests = server
    write_csv(root / "meta.csv", [{"id": "a", "lat": "1", "lon": "2", "file": "img.jpg"}])
    before = len(requests)
    for source in (f"{base}/meta.csv", base):
        with pytest.raises(SourceError, match=r"not a public address.*--allow-private-addresses"):
            ingest("folder", str(tmp_path / "r"), source=source, config=cfg(), progress=False)
        rc = main(["data", "ingest", "folder", "--root", str(tmp_path / "r"), "--source", source])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "not a public address" in err
    assert requests[before:] == []


def test_a_url_with_credentials_is_refused_and_its_password_written_nowhere(tmp_path, server, capsys, caplog):
    """user:password@ in --source, --root or a URL list: never sent (reads are anonymous), so refused before any
    request, in one line that does not repeat the password (no manifest, log line or message holds it)."""
    root, base, requests = server
    write_csv(root / "meta.csv", [{"id": "a", "lat": "1", "lon": "2", "file": "img.jpg"}])
    secret = "pw-" + "5ecret"
    with_password = base.replace("http://", f"http://alice:{secret}@")
    before = len(requests)
    for flag, value in (("--source", f"{with_password}/meta.csv"), ("--source", with_password),
                        ("--root", f"s3://AKIAX:{secret}@bucket/root")):
        args = {"--root": str(tmp_path / "r"), "--source": str(root), flag: value}
        rc = main(["data", "ingest", "folder", "--allow-private-addresses", *(x for kv in args.items() for x in kv)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and f"{flag}: the " in err and "credentials" in err, err
        assert secret not in err
    src = url_list(tmp_path, {"a": f"{with_password}/img.jpg"})
    m = ingest("folder", str(tmp_path / "u"), source=str(src), config=cfg(allow_private_addresses=True),
               progress=False)
    assert m["skipped"] == {"refused_url": 1} and m["count"] == 0
    assert requests[before:] == [] and not (tmp_path / "r").exists()
    assert secret not in caplog.text and secret not in capsys.readouterr().err
    assert not [p for p in (tmp_path / "u").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("command", ["train s3", "train http", "data export"])
def test_a_table_url_with_credentials_is_refused_without_repeating_them(tmp_path, capsys, monkeypatch, command):
    """s3://KEY:SECRET@bucket/... (read by botocore as a bucket name, echoed in its message) or
    http://user:password@host/t.parquet is refused before any request by every reader, in one line naming the
    URL without its credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("LOCDIFF_S3_TIMEOUT", "1")
    secret = "pw-" + "5ecret"
    scheme = "http" if command == "train http" else "s3"
    url = f"{scheme}://AKIAX:{secret}@bucket/t.parquet"
    args = ["train", "--config", "tiny", "--train", url, "--out", str(tmp_path / "run"), "--no-progress"]
    if command == "data export":
        args = ["data", "export", "embeddings", "--root", f"s3://AKIAX:{secret}@bucket/root", "--encoder", "clip",
                "--out", str(tmp_path / "t.parquet")]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"{scheme}://bucket/" in err and "credentials" in err, err
    assert secret not in err and not (tmp_path / "run").exists()


def test_redirects_are_checked_like_the_first_url(tmp_path, server, opened):
    _, base, requests = server
    urls = {"to-file": f"{base}/redirect?to=file:///etc/passwd",
            "to-s3": f"{base}/redirect?to=s3://bucket/key.jpg",
            "loop": f"{base}/redirect?to={base}/redirect?to={base}/redirect?to={base}/redirect?to="
                    f"{base}/redirect?to={base}/redirect?to={base}/img.jpg",
            "ok": f"{base}/redirect?to=/img.jpg"}
    m = ingest("folder", str(tmp_path / "root"), source=str(url_list(tmp_path, urls)),
               config=cfg(allow_private_addresses=True), progress=False)
    assert m["skipped"] == {"refused_url": 2, "missing_file": 1} and m["count"] == 1
    assert opened.under("/etc/passwd") == []


def test_the_checked_address_is_the_one_connected_to(tmp_path, server, monkeypatch):
    """DNS rebinding: a name that resolves to a public address when checked and to 127.0.0.1 on any
    later lookup. The fetch resolves once and connects to the address it checked, so the local server
    never sees the request (the public address is unreachable from here: counted as unreachable)."""
    _, base, requests = server
    port = int(base.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    answers = {"n": 0}

    def rebinding(host, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        if host != "rebind.example":
            return real(host, *args, **kw)
        answers["n"] += 1
        ip = "93.184.216.34" if answers["n"] == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    before = len(requests)
    m = ingest("folder", str(tmp_path / "root"),
               source=str(url_list(tmp_path, {"rebind": f"http://rebind.example:{port}/img.jpg"})),
               config=cfg(timeout=1), progress=False)
    assert answers["n"] == 1 and requests[before:] == []
    assert m["skipped"] == {"unreachable": 1}


# -- endless streams and byte limits ----------------------------------------------------------------

def test_an_endless_stream_stops_at_the_byte_limit(tmp_path, server):
    _, base, requests = server
    urls = {"endless": f"{base}/endless", "ok": f"{base}/img.jpg"}
    m = ingest("folder", str(tmp_path / "root"), source=str(url_list(tmp_path, urls)),
               config=cfg(allow_private_addresses=True, max_image_bytes=2_000_000), progress=False)
    assert m["skipped"] == {"too_big": 1} and m["count"] == 1


def test_a_local_file_above_the_byte_limit_is_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.jpg").write_bytes(jpeg(1))
    (src / "huge.jpg").write_bytes(jpeg(2) + b"\0" * 300_000)
    (src / "zero.jpg").symlink_to("/dev/zero")
    write_csv(src / "metadata.csv", [{"id": "ok.jpg", "lat": "1", "lon": "2"},
                                     {"id": "huge.jpg", "lat": "1", "lon": "2"},
                                     {"id": "zero.jpg", "lat": "1", "lon": "2"}])
    m = ingest("folder", str(tmp_path / "root"), source=str(src), config=cfg(max_image_bytes=100_000),
               progress=False)
    assert m["skipped"] == {"too_big": 1, "outside_source": 1} and m["count"] == 1


# -- decompression bombs ----------------------------------------------------------------------------

def test_decompression_bombs_are_counted_and_the_ingest_completes(tmp_path, capsys):
    bomb = png_declaring(50_000, 50_000)
    assert len(bomb) <= 80  # the 74-byte kind of the issue
    big = png_declaring(11_000, 11_000, bits=1, colour=0, rows=True)  # a real 121 Mpx bilevel image
    assert Image.open(io.BytesIO(big)).size == (11_000, 11_000)
    jpeg_bomb = bytearray(jpeg(5))  # a JPEG whose frame header says 60000 x 60000
    sof = jpeg_bomb.index(b"\xff\xc0")
    jpeg_bomb[sof + 5: sof + 9] = struct.pack(">HH", 60_000, 60_000)
    src = tmp_path / "src"
    src.mkdir()
    files = {"good1.jpg": jpeg(1), "bomb.png": bomb, "big.png": big, "bomb.jpg": bytes(jpeg_bomb),
             "good2.jpg": jpeg(2)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    write_csv(src / "metadata.csv", [{"id": n, "lat": "1", "lon": "2"} for n in files])
    rc = main(["data", "ingest", "folder", "--root", str(tmp_path / "root"), "--source", str(src)])
    assert rc == 0
    assert "folder: 2 images in 1 shards; skipped: too_large 3" in capsys.readouterr().out
    m = read_manifest(stage_dir(str(tmp_path / "root"), "folder", "images"))
    assert sorted(m["skipped_examples"]["too_large"]) == ["big.png", "bomb.jpg", "bomb.png"]
    assert [s["json"]["id"] for s in stored(tmp_path / "root")] == ["good1.jpg", "good2.jpg"]


def test_bombs_are_refused_even_when_warnings_are_errors(tmp_path):
    import warnings

    from locdiff.data.images import load_rgb, prepare_image
    from locdiff.data.validation import RecordError

    big = png_declaring(9_000, 9_000, bits=1, colour=0, rows=True)  # between PIL's warning and error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (lambda: prepare_image(big), lambda: load_rgb(big), lambda: load_rgb(png_declaring(50_000, 50_000))):
            with pytest.raises(RecordError) as err:
                fn()
            assert err.value.reason == "too_large"
    # a higher limit lets the same image through (decoded: 81 Mpx of 1 bit)
    assert load_rgb(big, max_pixels=100_000_000, max_side=64).size == (64, 64)


def test_the_enospc_errno_is_what_the_guard_matches():
    """(Sanity of the disk-full guard used by ingest: other OSErrors pass through unchanged.)"""
    from locdiff.data.storage import NoSpaceError, disk_full_is_an_error

    with pytest.raises(NoSpaceError, match=r"^/x/y: no space left on device"):
        with disk_full_is_an_error("/x/y"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):
        with disk_full_is_an_error("/x/y"):
            raise PermissionError(errno.EACCES, "denied")
