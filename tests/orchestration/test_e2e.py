"""What `make demo` does, on tiny data: the local stack up (infra/start.sh), `prefect deploy`,
`prefect deployment run` through the CLI, the process worker runs the pipeline (Ray Train inside), the
results read back through MLflow's API, the stack down (infra/stop.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flows import demo
from tests.orchestration.conftest import REPO, TINY_OVERRIDES, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.server
@pytest.mark.timeout(600)
def test_stack_deploy_run_and_read_back(tiny_data, tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("PREFECT_PORT", str(free_port()))
    monkeypatch.setenv("MLFLOW_PORT", str(free_port()))
    env = demo.stack_env(state)
    subprocess.run([str(REPO / "infra" / "start.sh")], cwd=REPO, env=env, check=True, timeout=240)
    pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
    assert set(pids) == {"prefect-server", "prefect-worker", "mlflow-server"}
    try:
        demo.deploy(env)
        ds = lambda name, split: {"name": name, "source": "embeddings", "path": str(tiny_data[split])}  # noqa: E731
        params = {"config": "tiny", "root": str(tmp_path / "root"), "workers": 2, "overrides": TINY_OVERRIDES,
                  "train_data": ds("e2e-train", "train"), "tests": [ds("e2e-test", "test")]}
        # a URL carrying credentials is refused by the API before the run (and its parameters) is stored
        with pytest.raises(RuntimeError, match="should not be valid"):
            demo.trigger(env, {**params, "root": "s3://AKIAKEY:s3cret@bucket/root"})
        flow_run_id = demo.trigger(env, params)
        request = urllib.request.Request(f"{env['PREFECT_API_URL']}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            stored = response.read().decode()
        assert flow_run_id in stored and "s3cret" not in stored
        lines: list[str] = []
        final = demo.follow(flow_run_id, env, timeout_s=420, echo=lines.append)
        worker_log = (state / "logs" / "prefect-worker.log").read_text()[-4000:]
        assert final == "Completed", "\n".join(lines[-40:]) + worker_log
        text = "\n".join(lines)
        for task in ("ingest e2e-train", "train tiny", "evaluate e2e-test", "promote", "embed e2e-test (flow)",
                     "train-locdiff"):
            assert f"  {task}: Finished in state Completed()" in text, text  # each finished task named
        assert all(" Finished in state" not in line or ": Finished in state" in line for line in lines)
        assert "  ingest e2e-train: 600 samples" in text and "ingest e2e-train (flow): Finished" in text
        assert "train tiny: train: starting a local Ray for 2 workers" in text, text  # not silent meanwhile

        run_id, results = demo.results_from_mlflow(env, "tiny-e2e-train")
        assert set(results) == {"e2e-test"}
        assert {"acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km", "geoscore"} \
            <= set(results["e2e-test"])
        from mlflow.tracking import MlflowClient

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        names = [a.path for a in client.list_artifacts(run_id, "plots/e2e-test")]
        assert any(n.endswith("worldmap.png") for n in names)
        assert any(n.endswith("error_cdf.png") for n in names)
        # artifacts are served through the server into the state folder
        assert any((state / "mlflow" / "artifacts").rglob("worldmap.png"))
        last = " ".join(demo.summary(env, run_id, flow_run_id).split())  # the demo's last paragraph, unwrapped
        geoscore = float(client.get_model_version("locdiff", "1").tags["e2e-test/geoscore"])
        assert "`locdiff` version 1; it holds the alias `champion`" in last
        assert f"GeoScore: {geoscore:,.0f} on e2e-test" in last
        assert f"{env['MLFLOW_TRACKING_URI']}/#/models/locdiff/versions/1" in last and flow_run_id in last
    finally:
        subprocess.run([str(REPO / "infra" / "stop.sh")], cwd=REPO, env=env, timeout=120)
    assert not any(_alive(pid) for pid in pids.values())
    assert not list((state / "pids").glob("*.pid"))


def test_unreachable_prefect_server_says_what_to_start():
    with pytest.raises(demo.ServiceUnavailable, match="infra/start.sh"):
        demo.check_prefect_api(f"http://127.0.0.1:{free_port()}/api", timeout=2)


def test_start_fails_clearly_when_a_port_is_taken(tmp_path):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**demo.stack_env(tmp_path / "state"), "PREFECT_PORT": str(server.server_port)}
        proc = subprocess.run([str(REPO / "infra" / "start.sh")], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
    finally:
        server.shutdown()
    assert proc.returncode != 0
    assert f"port {server.server_port}" in proc.stderr and "PREFECT_PORT" in proc.stderr
    assert not list(Path(tmp_path / "state" / "pids").glob("*.pid"))


def test_demo_ends_with_start_sh_line_when_a_port_is_taken(tmp_path):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**demo.stack_env(tmp_path / "state"), "PREFECT_PORT": str(server.server_port)}
        proc = subprocess.run([sys.executable, "-m", "flows.demo", "--n-train", "4", "--n-test", "2", "--data",
                               str(tmp_path / "photos")], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        server.shutdown()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr  # start.sh's line, no traceback after it
    assert f"port {server.server_port}" in lines[0] and "PREFECT_PORT" in lines[0]
