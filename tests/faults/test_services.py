"""Services and flows: the pipeline's preflight names an unreachable MLflow server in one line before
anything is written, and a Prefect flow that fails ends with one readable line (flows/errors.py), the
original error chained, through a real Prefect API (prefect_test_harness)."""

from __future__ import annotations

import os
import socket

import pytest

from locdiff.errors import describe

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_names_an_unreachable_mlflow_server(tmp_path):
    from locdiff import pipeline
    from locdiff.tracking import TrackingUnavailable

    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    root = tmp_path / "root"
    with pytest.raises(TrackingUnavailable) as err:
        pipeline.preflight("tiny", str(root), tracking_uri=uri)
    line = describe(err.value)
    assert "\n" not in line and line == str(err.value)
    assert line.startswith(f"MLflow tracking server {uri} is not reachable (") and "infra/start.sh" in line
    assert not root.exists()  # checked before the root is created


def test_the_credentials_of_a_tracking_uri_are_never_repeated(tmp_path):
    import http.server
    import threading

    from locdiff import Geolocator, pipeline
    from locdiff.tracking import TrackingUnavailable

    port = _free_port()
    with pytest.raises(TrackingUnavailable) as err:  # nothing listens there
        pipeline.preflight("tiny", str(tmp_path / "root"), tracking_uri=f"http://user:s3cret@127.0.0.1:{port}")
    assert str(err.value).startswith(f"MLflow tracking server http://127.0.0.1:{port} is not reachable (")
    assert "s3cret" not in str(err.value) and "user" not in str(err.value)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://user:s3cret@127.0.0.1:{server.server_port}"
    try:  # a server that answers is found with credentials in its URI too (MLflow sends them)
        pipeline.preflight("tiny", str(tmp_path / "root"), tracking_uri=uri)
        with pytest.raises(ValueError) as err:  # the registry's answer (a 404 here) names the server without them
            Geolocator.load("models:/locdiff@champion", tracking_uri=uri)
        assert str(err.value).endswith(f"(tracking URI http://127.0.0.1:{server.server_port})")
    finally:
        server.shutdown()


def test_one_line_keeps_one_line_errors_and_rewrites_the_rest():
    from flows.errors import FlowFailed, one_line
    from locdiff.errors import UserError

    with pytest.raises(UserError, match="^x.csv: row 3: lat 123 is not in"), one_line():
        raise UserError("x.csv: row 3: lat 123 is not in [-90, 90]")
    with pytest.raises(FlowFailed) as err, one_line():
        raise NotADirectoryError(20, "Not a directory", "/data/file.txt/root")
    assert str(err.value) == "/data/file.txt/root: a part of this path is not a directory; check the path"
    assert isinstance(err.value.__cause__, NotADirectoryError)
    with pytest.raises(FlowFailed) as err, one_line():
        {}["missing"]
    assert str(err.value) == "unexpected KeyError: 'missing' (see the task log for the traceback)"
    with pytest.raises(FlowFailed) as err, one_line():
        raise RuntimeError("PytorchStreamReader failed reading zip archive:\n  failed finding central directory")
    assert "\n" not in str(err.value) and str(err.value).startswith("a torch file is corrupt or truncated")


def test_a_failed_flow_is_one_line(prefect_api, world, tmp_path):
    from flows.ingest import ingest
    from flows.params import DataSet

    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where the storage root's parent folder should be")
    root = blocker / "root"
    state = ingest(DataSet(name="emb", source="embeddings", path=str(world.test)), str(root), return_state=True)
    assert state.is_failed()
    assert state.message == (f"Flow run encountered an exception: FlowFailed: {root}: a part of this path is "
                             "not a directory; check the path")
    # a user error keeps its type and its line
    state = ingest(DataSet(name="emb", source="embeddings", path=str(tmp_path / "absent.parquet")),
                   str(tmp_path / "root"), return_state=True)
    assert state.is_failed() and "\n" not in state.message
    assert str(tmp_path / "absent.parquet") in state.message and "FlowFailed" not in state.message
