"""Credentials stay out of Ray's run state and MLflow params; a local Ray listens on 127.0.0.1 only.

One real run in its own process (tests/security/ray_job.py): fake AWS and MLflow secrets in the
environment, a moto S3 server on 127.0.0.1 as the storage root (so the Ray workers really need the
credentials), a SQLite MLflow store, `locdiff.pipeline.train` on Ray Train with 2 workers. Then every place
Ray or MLflow keeps state is searched for the secret strings: Ray's session folder (logs and exported
Train run state), the checkpoints and run state under the S3 storage root, Ray's State API and the Train
run state (which holds `train_loop_config`), the run folder, the MLflow store and its params.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
TAG = uuid.uuid4().hex[:12]
SECRETS = {
    "AWS_ACCESS_KEY_ID": f"AKIAFAKE{TAG.upper()}",
    "AWS_SECRET_ACCESS_KEY": f"fake-aws-secret-{TAG}",
    "AWS_SESSION_TOKEN": f"fake-aws-session-{TAG}",
    "MLFLOW_TRACKING_PASSWORD": f"fake-mlflow-password-{TAG}",
    "MLFLOW_TRACKING_TOKEN": f"fake-mlflow-token-{TAG}",
}
LOOPBACK = {"127.0.0.1", "::1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the job once; yield its report and every file it left, by where it came from."""
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    work = tmp_path_factory.mktemp("secrets")
    data = write_benchmark(work / "synth", SynthConfig(n_train=256, n_test=8, n_unseen=8, dim=16, seed=0))
    port = _free_port()
    moto = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="sec")
        # The job's environment: this one without any Ray, AWS or MLflow setting, then the fakes.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        env.update(SECRETS)
        env.update({
            "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
            # Ray Train's run state (it holds train_loop_config) kept, and also written to disk as
            # export events: the most any deployment could store.
            "RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_ENABLE_EXPORT_API_WRITE": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "LOCDIFF_TEST_RAY_TMP": ray_tmp, "LOCDIFF_TEST_ROOT": "s3://sec/root",
            "LOCDIFF_TEST_TRAIN": str(data["train"]), "LOCDIFF_TEST_RUN_DIR": str(work / "run"),
        })
        report_path = work / "report.json"
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "security" / "ray_job.py"), str(report_path)],
                              cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(report_path.read_text())
        files: dict[str, bytes] = {}
        for base in (Path(ray_tmp), work / "run", work):
            for path in base.rglob("*"):
                if path.is_file() and not path.is_symlink() and path != report_path:
                    files[str(path)] = path.read_bytes()[:64 << 20]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="sec"):
            for obj in page.get("Contents", []):
                files[f"s3://sec/{obj['Key']}"] = s3.get_object(Bucket="sec", Key=obj["Key"])["Body"].read()
        yield {"report": report, "files": files, "stdout": proc.stdout + proc.stderr,
               "tracking_uri": env["MLFLOW_TRACKING_URI"], "session": ray_tmp}
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _holding(haystacks: dict[str, bytes | str], needle: str) -> list[str]:
    return [name for name, data in haystacks.items()
            if needle.encode() in (data if isinstance(data, bytes) else data.encode())]


def test_no_secret_in_ray_run_state_storage_or_mlflow(job):
    from locdiff import tracking

    report, files = job["report"], job["files"]
    run_id = report["record"]["mlflow_run_id"]
    assert report["record"]["step"] == 8  # trained through Ray, checkpoints on S3
    assert any(name.startswith("s3://sec/root/ray/") for name in files)
    state = {f"ray state {k}": json.dumps(v) for k, v in report["state"].items()}
    # The search looks where the training's settings land: the MLflow run id travels in
    # train_loop_config, which Ray keeps in its Train run state.
    assert _holding({"train_runs": state["ray state train_runs"]}, run_id)
    params = tracking.read_run(run_id, tracking_uri=job["tracking_uri"])["params"]
    assert params.get("train.steps") == "8"
    flat_params = {"mlflow params": json.dumps(params)}
    for name, secret in SECRETS.items():
        assert not _holding(state, secret), f"{name} in Ray's run state"
        assert not _holding(flat_params, secret), f"{name} in MLflow params"
        assert not _holding(files, secret), f"{name} written to {_holding(files, secret)}"
        assert secret not in job["stdout"], f"{name} in the job's output"


def test_local_ray_listens_on_loopback_only_and_wants_the_token(job):
    """Every socket Ray's processes listen on is on 127.0.0.1: after `ensure_ray`, during the training
    (sampled every 0.5 s) and after it. The one exception is torch.distributed's rendezvous store, which
    rank 0 of a DDP training opens for the training's duration: torch binds it to every interface and has
    no setting to change that (infra/README.md); it must be that one socket, in a Train worker, and gone
    after the training."""
    report = job["report"]
    start, during, after = (report[k] for k in ("listening_at_start", "listening_during", "listening_after"))
    names = {s["process"] for s in start}
    assert {"gcs_server", "raylet"} <= names and len(start) >= 6, start  # the sampling sees Ray
    assert any(s["process"].startswith("ray::RayTrainWo") for s in during)  # and saw the training
    assert report["node_ip"] == "127.0.0.1"
    for when, sockets in (("after ensure_ray", start), ("after the training", after)):
        exposed = [s for s in sockets if s["ip"] not in LOOPBACK]
        assert not exposed, f"Ray listens beyond this machine {when}: {exposed}"
    train_workers = {s["pid"] for s in during if s["process"].startswith("ray::RayTrainWo")}
    exposed = [s for s in during if s["ip"] not in LOOPBACK]
    assert all(s["pid"] in train_workers for s in exposed) and len({(s["pid"], s["port"]) for s in exposed}) <= 1, \
        f"Ray listens beyond this machine during the training: {exposed}"
    assert report["auth_mode"] == "token"
    assert report["dashboard_without_token"] == 401
    assert report["dashboard_with_token"] == 200
