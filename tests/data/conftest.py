"""Session servers for the data tests: a real HTTP server and a real S3 endpoint (moto server), both on
127.0.0.1, serving the generated fixtures; every source is read through them by its normal code path."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest

from . import fixtures as fx

HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; /datasets/osv5m/osv5m/resolve/REV/PATH serves osv5m/PATH the way the Hub's
    resolve endpoint does (X-Repo-Commit and ETag headers), so huggingface_hub downloads from it."""

    def log_message(self, *args: object) -> None:
        pass

    def translate_path(self, path: str) -> str:
        prefix = "/datasets/osv5m/osv5m/resolve/"
        if path.startswith(prefix):
            rest = path[len(prefix):].split("/", 1)[1]
            path = "/osv5m/" + rest
        return super().translate_path(path)

    def end_headers(self) -> None:
        if self.path.startswith("/datasets/"):
            local = self.translate_path(self.path.split("?", 1)[0])
            if os.path.isfile(local):
                etag = hashlib.sha256(Path(local).read_bytes()).hexdigest()
                self.send_header("X-Repo-Commit", HF_COMMIT)
                self.send_header("ETag", f'"{etag}"')
        super().end_headers()


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(folder served over HTTP, its base URL)."""
    root = tmp_path_factory.mktemp("http")
    handler = functools.partial(Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def s3(moto_s3):
    """The session's S3 endpoint (moto server on 127.0.0.1) with the buckets of the data tests; yields the
    endpoint URL. The data layer's and Hugging Face's caches are the session's temporary ones (tests/conftest.py)."""
    from tests.conftest import make_bucket

    for bucket in ("fixtures", "data"):
        make_bucket(moto_s3, bucket)
    return moto_s3


def upload(local: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.put(str(local) + "/", url.removeprefix("s3://") + "/", recursive=True)


BUILDERS = {
    "im2gps3k": fx.build_im2gps3k, "yfcc26k": fx.build_yfcc26k, "yfcc4k": fx.build_yfcc4k,
    "osv5m": fx.build_osv5m, "gws15k": fx.build_gws15k, "folder": fx.build_folder,
}


@pytest.fixture(scope="session")
def sources(served, s3, tmp_path_factory):
    """Every source's fixture, twice: over HTTP and in S3. name -> {"http": (url, Expect),
    "s3": (url, Expect), "local": (path, Expect)}."""
    root, base = served
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    out: dict[str, dict[str, tuple[str, fx.Expect]]] = {}
    s3_local = tmp_path_factory.mktemp("s3src")
    for name in [*BUILDERS, "mp16"]:
        entry = {}
        for kind, folder, url in (("http", root / name, f"{base}/{name}"),
                                  ("s3", s3_local / name, f"s3://fixtures/{name}")):
            if name == "mp16":
                exp = fx.build_mp16(folder, url, dead)
            else:
                exp = BUILDERS[name](folder, url)
            entry[kind] = (url, exp)
            entry[f"{kind}_dir"] = folder
        out[name] = entry
    upload(s3_local, "s3://fixtures")
    return out
