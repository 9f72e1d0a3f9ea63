"""The services the tests need, each started once per session and only when a test asks for it:

- `moto_s3`: a real S3 endpoint (moto server on 127.0.0.1) with fake credentials in the environment;
  `make_bucket(endpoint, name)` adds a bucket;
- `ray_local`: a local Ray (2 CPUs) through the project's `ensure_ray` (token auth, 127.0.0.1);
- `prefect_api`: a real Prefect API (prefect_test_harness).

Tests are marked by the services they use (the markers follow the fixtures, so the tiers cannot drift):
`ray`, `prefect`, `s3` (and `server`, `slow` set by hand). `make test-fast` deselects them all.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# The tests never write the user's caches. huggingface_hub reads HF_HOME once, when it is first imported, so the
# session's temporary caches are set here, before any test module is collected; removed when the session ends.
TEST_CACHE = Path(tempfile.mkdtemp(prefix="locdiff-test-cache-"))
os.environ["HF_HOME"] = str(TEST_CACHE / "huggingface")
os.environ["LOCDIFF_CACHE"] = str(TEST_CACHE / "locdiff")
for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_var, None)  # each would take precedence over HF_HOME

# fixture name -> the marker of the service it starts
SERVICE_MARKERS = {"ray_local": "ray", "prefect_api": "prefect", "moto_s3": "s3"}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in SERVICE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    deadline = time.time() + 30
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(moto_s3):
    """One local Ray (2 CPUs) for every test of the session that trains or embeds on Ray. It starts after
    the S3 endpoint's environment is set, so that the workers inherit it and Ray is not restarted."""
    pytest.importorskip("ray")
    from locdiff.distributed import ensure_ray, stop_local_ray

    ensure_ray(num_cpus=2)
    yield
    stop_local_ray()


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API for the session (its own SQLite database in a temporary profile)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
