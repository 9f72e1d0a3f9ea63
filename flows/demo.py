"""`make demo`: the whole pipeline on the synthetic benchmark, through the real local stack.

    python -m flows.demo [--n-train 20000] [--config tiny] [--stop]

1. writes the synthetic benchmark (`locdiff synth`) to data/synth unless it is there;
2. starts the local stack (infra/start.sh: Prefect server + process worker, MLflow server);
3. deploys prefect.yaml (`prefect deploy --name train-locdiff`);
4. triggers `prefect deployment run 'train-locdiff/train-locdiff'` with the demo data sets;
5. follows the flow run (states and log lines) until it ends;
6. prints the accuracy table (from MLflow) and the URLs of the Prefect and MLflow UIs.

The stack keeps running for browsing the UIs; `make stop` (infra/stop.sh) stops it (`--stop` here does it
at the end). Settings: LOCDIFF_STATE, PREFECT_PORT, MLFLOW_PORT as for infra/start.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENT = "train-locdiff/train-locdiff"


class ServiceUnavailable(RuntimeError):
    """A server the demo needs does not answer."""


def stack_env(state: Path | None = None) -> dict[str, str]:
    """The environment of the local stack (what `source .state/env` gives a shell)."""
    state = Path(state or os.environ.get("LOCDIFF_STATE", REPO / ".state")).resolve()
    prefect_port = os.environ.get("PREFECT_PORT", "4200")
    mlflow_port = os.environ.get("MLFLOW_PORT", "5000")
    return {**os.environ, "LOCDIFF_STATE": str(state), "PREFECT_HOME": str(state / "prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "PWD": str(REPO)}


def check_prefect_api(url: str, timeout: float = 5.0) -> None:
    """Raise ServiceUnavailable naming what to start when the Prefect API does not answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise ServiceUnavailable(f"Prefect API {url} is not reachable ({problem}). Start the local stack with "
                             "`infra/start.sh` (then `source .state/env`), or set PREFECT_API_URL to a "
                             "running Prefect server.")


def _run(cmd: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc.stdout


def deploy(env: dict[str, str]) -> None:
    """`prefect --no-prompt deploy --name train-locdiff` from the repo root."""
    check_prefect_api(env["PREFECT_API_URL"])
    _run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--name", "train-locdiff"],
         env, "prefect deploy")


def trigger(env: dict[str, str], params: dict[str, object]) -> str:
    """`prefect deployment run 'train-locdiff/train-locdiff' --param k=JSON ...`; returns the flow run id."""
    cmd = [str(Path(sys.executable).parent / "prefect"), "deployment", "run", DEPLOYMENT]
    for key, value in params.items():
        cmd += ["--param", f"{key}={json.dumps(value)}"]
    out = _run(cmd, env, "prefect deployment run")
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    if not match:
        raise RuntimeError(f"no flow run id in the output of prefect deployment run:\n{out}")
    return match.group(1)


def training_progress(env: dict[str, str]) -> str | None:
    """'step S/N, loss L' of the newest running training run in MLflow (logged at every checkpoint)."""
    from mlflow.tracking import MlflowClient

    from locdiff.tracking import DEFAULT_EXPERIMENT

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or "loss" not in runs[0].data.metrics:
        return None
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    last = max(history, key=lambda m: m.step)
    total = runs[0].data.params.get("train.steps", "?")
    return f"training step {last.step}/{total}, loss {last.value:.4f}"


def follow(flow_run_id: str, env: dict[str, str], *, timeout_s: float = 1800, echo=print) -> str:
    """Print the flow run's state changes, log lines and training progress until it ends; return the
    final state name."""
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import LogSort

    t0, seen, last_state, last_progress = time.monotonic(), set(), None, None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state.name if run.state else "?"
            if state != last_state:
                echo(f"[{time.monotonic() - t0:6.0f}s] flow run {run.name}: {state}")
                last_state = state
            ids = [flow_run_id] + [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                    sort=LogSort.TIMESTAMP_ASC, limit=200, offset=max(0, len(seen) - 50))
            for entry in logs:
                if entry.id not in seen:
                    seen.add(entry.id)
                    first = entry.message.splitlines()[0] if entry.message else ""
                    echo(f"[{time.monotonic() - t0:6.0f}s]   {first[:160]}")
            try:
                progress = training_progress(env)
            except Exception:  # noqa: BLE001 - progress is best effort; the flow's state decides
                progress = None
            if progress and progress != last_progress:
                echo(f"[{time.monotonic() - t0:6.0f}s]   {progress}")
                last_progress = progress
            if run.state and run.state.is_final():
                return state
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"flow run {flow_run_id} still {state} after {timeout_s:.0f} s")
            time.sleep(3)


def results_from_mlflow(env: dict[str, str], run_name_prefix: str = "") -> tuple[str, dict[str, dict]]:
    """(run id, {dataset: metrics}) of the newest training run, read through MLflow's API."""
    from mlflow.tracking import MlflowClient

    from locdiff.tracking import DEFAULT_EXPERIMENT, METRIC_NAMES

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if exp is None:
        raise RuntimeError(f"MLflow at {env['MLFLOW_TRACKING_URI']} has no {DEFAULT_EXPERIMENT!r} "
                           "experiment: the runs were logged to another store (delete the pipeline's "
                           "runs/ folder under --root to train again)")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags
                  and r.info.run_name.startswith(run_name_prefix))
    results: dict[str, dict] = {}
    for key, value in parent.data.metrics.items():
        if "/" in key:
            dataset, name = key.rsplit("/", 1)
            if name in METRIC_NAMES or name == "n":
                results.setdefault(dataset, {})[name] = value
    return parent.info.run_id, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="model config (configs/model/NAME.yaml)")
    parser.add_argument("--n-train", type=int, default=20_000, help="synthetic training images")
    parser.add_argument("--n-test", type=int, default=2_000, help="synthetic test images (test_unseen: half)")
    parser.add_argument("--data", default="data/synth", help="where the synthetic benchmark goes")
    parser.add_argument("--root", default="data/demo", help="the pipeline's storage root")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. train.steps=500 (repeatable)")
    parser.add_argument("--stop", action="store_true", help="stop the local stack at the end")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    env = stack_env()

    data = (REPO / args.data).resolve()
    if not (data / "synth.json").exists():
        print(f"== writing the synthetic benchmark to {data} ({args.n_train} training images)")
        from locdiff.synth import SynthConfig, write_benchmark

        write_benchmark(data, SynthConfig(n_train=args.n_train, n_test=args.n_test,
                                          n_unseen=max(1, args.n_test // 2)))
    print("== starting the local stack (infra/start.sh)", flush=True)
    subprocess.run([str(REPO / "infra" / "start.sh")], cwd=REPO, env=env, check=True)
    try:
        print("== deploying train-locdiff (prefect.yaml)", flush=True)
        deploy(env)
        params = {
            "config": args.config, "root": args.root, "workers": 2, "gpus_per_worker": 0, "resume": True,
            "overrides": args.overrides,
            "train_data": {"name": "synth-train", "source": "embeddings",
                           "path": str(data / "train.parquet")},
            "tests": [{"name": "synth-test", "source": "embeddings", "path": str(data / "test.parquet")},
                      {"name": "synth-test-unseen", "source": "embeddings",
                       "path": str(data / "test_unseen.parquet")}],
        }
        flow_run_id = trigger(env, params)
        print(f"== prefect deployment run '{DEPLOYMENT}': flow run {flow_run_id}", flush=True)
        state = follow(flow_run_id, env)
        if state != "Completed":
            ui = env["PREFECT_API_URL"].removesuffix("/api")
            print(f"flow run ended {state}; see {ui}/runs/flow-run/{flow_run_id} and "
                  f"{env['LOCDIFF_STATE']}/logs/prefect-worker.log", file=sys.stderr)
            return 1
        run_id, results = results_from_mlflow(env, f"{Path(args.config).stem}-synth-train")
        from locdiff.pipeline import accuracy_markdown

        print("\n" + accuracy_markdown(results, title="LocDiff on the synthetic benchmark (from MLflow)"))
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        print(f"Prefect UI: {ui}/runs/flow-run/{flow_run_id}")
        mlflow_url = env["MLFLOW_TRACKING_URI"]
        exp = __import__("mlflow").tracking.MlflowClient(mlflow_url).get_run(run_id).info.experiment_id
        print(f"MLflow UI:  {mlflow_url}/#/experiments/{exp}/runs/{run_id}")
        print(f"demo finished in {time.monotonic() - t0:.0f} s; `make stop` stops the stack")
        return 0
    finally:
        if args.stop:
            subprocess.run([str(REPO / "infra" / "stop.sh")], cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
