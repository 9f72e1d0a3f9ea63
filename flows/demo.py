"""`make demo`: from photos to a served location, through the real local stack.

    python -m flows.demo [--n-train 3000] [--config tiny] [--stop]

1. writes synthetic geotagged photos (locdiff.worlds.synth_photos: JPEGs whose look varies with the place, at
   cities of the offline gazetteer) and a tiny randomly initialised CLIP built from a config (no download)
   to data/demo-photos unless they are there;
2. starts the local stack (infra/start.sh: Prefect server + process worker, MLflow server);
3. deploys prefect.yaml (`prefect deploy --name train-locdiff`);
4. triggers `prefect deployment run 'train-locdiff/train-locdiff'` on the photos: ingest, embed with the
   tiny CLIP, train (Ray Train), evaluate, register the pyfunc model `locdiff` (alias `champion`);
5. follows the flow run (states and log lines) until it ends;
6. prints the accuracy table (from MLflow);
7. locates a few new photos (and an unreadable file) with
   `locdiff locate --run models:/locdiff@champion` and prints that table;
8. ends with a paragraph naming the registered model version, its alias, its GeoScore and the pages of
   the MLflow and Prefect UIs to open.
The encoder is random, so the accuracy says nothing about LocDiff: the path is the point.

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
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

from locdiff.evaluation import accuracy_markdown
from locdiff.tracking import CHAMPION, DEFAULT_EXPERIMENT, METRIC_NAMES, REGISTERED_MODEL
from locdiff.worlds.synth_photos import tiny_clip, write_photos

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENT = "train-locdiff/train-locdiff"
FINAL_LOG_GRACE_S = 15.0  # how long `follow` waits for a finished run's last log lines


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
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import LogSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0, seen, last_state, last_progress = time.monotonic(), set(), None, None
    last_line, final_at, flow_finished = t0, None, False
    names: dict = {}  # task run id -> its name ("ingest photos-train", "train tiny", ...)

    def out(line: str) -> None:
        nonlocal last_line
        echo(f"[{time.monotonic() - t0:6.0f}s] {line}")
        last_line = time.monotonic()

    def task_name(client, task_run_id) -> str:
        if task_run_id not in names:
            try:
                names[task_run_id] = client.read_task_run(task_run_id).name
            except Exception:  # noqa: BLE001 - a name is a nicety; the line is printed anyway
                names[task_run_id] = "task"
        return names[task_run_id]

    # explicitly this stack's API: inside another settings context (a test harness, a profile) the
    # environment variable alone would not win
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state.name if run.state else "?"
            if state != last_state:
                out(f"flow run {run.name}: {state}")
                last_state = state
            subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            flow_names = {r.id: r.name for r in subflows}  # "ingest photos-train", "train tiny", ...
            ids = [flow_run_id] + [r.id for r in subflows]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                    sort=LogSort.TIMESTAMP_ASC, limit=200, offset=max(0, len(seen) - 50))
            for entry in logs:
                if entry.id not in seen:
                    seen.add(entry.id)
                    lines = (entry.message or "").splitlines() or [""]
                    subflow = not entry.task_run_id and entry.flow_run_id in flow_names
                    who = (task_name(client, entry.task_run_id) if entry.task_run_id
                           else flow_names.get(entry.flow_run_id, DEPLOYMENT.split("/")[0]))
                    if lines[0].startswith(f"{who}: "):  # the message names its stage itself
                        who = ""
                    elif subflow and lines[0].startswith("Finished in state"):
                        who = f"{who} (flow): "  # the stage's flow, after its task of the same name
                    else:
                        who = f"{who}: "
                    out(f"  {who}{lines[0]}")  # whole lines: a long one wraps in the terminal, never cut
                    flow_finished |= (entry.flow_run_id == flow_run_id and not entry.task_run_id
                                      and lines[0].startswith("Finished in state"))
                    for more in lines[1:]:
                        echo(f"{'':9}    {more}")
            try:
                progress = training_progress(env)
            except Exception:  # noqa: BLE001 - progress is best effort; the flow's state decides
                progress = None
            if progress and progress != last_progress:
                out(f"  {progress}")
                last_progress = progress
            elif run.state and not run.state.is_final() and time.monotonic() - last_line > 20:
                try:
                    wrappers = {r.parent_task_run_id for r in subflows}  # the task run standing for a subflow
                    running = [r.name for r in client.read_task_runs(flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=ids))) if r.state and r.state.is_running() and r.id not in wrappers]
                except Exception:  # noqa: BLE001 - best effort, as above
                    running = []
                out(f"  still working: {', '.join(running) or state} ({time.monotonic() - last_line:.0f} s since "
                    "the last line)")
            if run.state and run.state.is_final():
                # the run's own last lines reach the API after its state (the worker sends logs in batches):
                # read them until its "Finished in state" line is in, for at most FINAL_LOG_GRACE_S
                final_at = final_at or time.monotonic()
                if flow_finished or time.monotonic() - final_at > FINAL_LOG_GRACE_S:
                    return state
                time.sleep(1)
                continue
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"flow run {flow_run_id} still {state} after {timeout_s:.0f} s")
            time.sleep(3)


def results_from_mlflow(env: dict[str, str], run_name_prefix: str = "") -> tuple[str, dict[str, dict]]:
    """(run id, {dataset: metrics}) of the newest training run, read through MLflow's API."""
    from mlflow.tracking import MlflowClient

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


def write_demo_photos(data: Path, n_train: int, n_test: int, n_new: int = 6) -> dict[str, Path]:
    """Photos (train, test: with metadata.csv; new: without, each with its GPS tag, plus an unreadable
    file) and the tiny CLIP."""
    paths = {"train": data / "train", "test": data / "test", "new": data / "new", "clip": data / "tiny-clip"}
    stamp = data / "photos.json"
    want = {"n_train": n_train, "n_test": n_test, "n_new": n_new, "gps": True}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return paths
    print(f"== writing {n_train} + {n_test} geotagged photos and a tiny CLIP to {data}", flush=True)
    write_photos(paths["train"], n_train, seed=1)
    write_photos(paths["test"], n_test, seed=2)
    write_photos(paths["new"], n_new, seed=3, prefix="new", metadata=False, gps=True)  # tagged, as a phone's
    (paths["new"] / "unreadable.jpg").write_bytes(b"this is not a JPEG")
    tiny_clip(paths["clip"])
    stamp.write_text(json.dumps(want))
    return paths


def locate_new_photos(env: dict[str, str], folder: Path) -> str:
    """`locdiff locate --run models:/locdiff@champion FOLDER`: its table (and the skipped file's line)."""
    shown = str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)
    cmd = [sys.executable, "-m", "locdiff", "locate", "--run", "models:/locdiff@champion", shown,
           "--top-k", "3", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"locdiff locate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    skipped = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("locdiff locate: skipped"))
    return f"$ locdiff locate --run models:/locdiff@champion {shown} --top-k 3\n" + proc.stdout + \
        (f"\n{skipped}" if skipped else "")


def summary(env: dict[str, str], run_id: str, flow_run_id: str) -> str:
    """The last paragraph: the registered model version, the `champion` alias, its GeoScore and where to
    click in the two UIs."""

    from mlflow.tracking import MlflowClient

    url, ui = env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"].removesuffix("/api")
    client = MlflowClient(tracking_uri=url)
    exp = client.get_run(run_id).info.experiment_id
    mine = sorted((v for v in client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{run_id}'")),
                  key=lambda v: int(v.version))
    champ = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    version = mine[-1].version if mine else champ.version
    scores = {k.rsplit("/", 1)[0]: float(v) for k, v in (mine[-1] if mine else champ).tags.items()
              if k.endswith("/geoscore")}
    score = "; ".join(f"{s:,.0f} on {name}" for name, s in sorted(scores.items())) or "not recorded"
    alias = (f"it holds the alias `{CHAMPION}`" if str(champ.version) == str(version) else
             f"the alias `{CHAMPION}` stays on version {champ.version}, whose mean GeoScore is not beaten")
    text = (f"The model is registered in MLflow as `{REGISTERED_MODEL}` version {version}; {alias}. "
            f"`models:/{REGISTERED_MODEL}@{CHAMPION}` is what `locdiff locate`, `make serve` and the "
            f"locate-photos flow use. GeoScore: {score} (GeoGuessr's points per photo, 5000 x exp(-error / "
            "1492.7 km): 5000 at the spot, 0 far away, averaged over the test photos; a new version takes "
            f"the alias only when its mean GeoScore over the test sets beats the champion's). The encoder "
            "is random here, so the numbers say nothing about LocDiff.")
    return "\n".join([textwrap.fill(text, 110), "Where to click:",
                      f"  the model version, its GeoScore tags and alias: {url}/#/models/{REGISTERED_MODEL}/"
                      f"versions/{version}",
                      f"  the training run (metrics, world map, error CDF, reliability plot): "
                      f"{url}/#/experiments/{exp}/runs/{run_id}",
                      f"  the pipeline's tasks and their logs (Prefect): {ui}/runs/flow-run/{flow_run_id}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="model config (configs/model/NAME.yaml)")
    parser.add_argument("--n-train", type=int, default=3_000, help="training photos")
    parser.add_argument("--n-test", type=int, default=300, help="test photos")
    parser.add_argument("--data", default="data/demo-photos", help="where the photos and the tiny CLIP go")
    parser.add_argument("--root", default="data/demo", help="the pipeline's storage root")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. train.steps=500 (repeatable)")
    parser.add_argument("--stop", action="store_true", help="stop the local stack at the end")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    env = stack_env()

    data = (REPO / args.data).resolve()
    paths = write_demo_photos(data, args.n_train, args.n_test)
    print("== starting the local stack (infra/start.sh)", flush=True)
    if subprocess.run([str(REPO / "infra" / "start.sh")], cwd=REPO, env=env).returncode != 0:
        return 2  # start.sh said why, in one line
    try:
        print("== deploying train-locdiff (prefect.yaml)", flush=True)
        deploy(env)
        clip = str(paths["clip"])
        params = {
            "config": args.config, "root": args.root, "workers": 2, "gpus_per_worker": 0, "resume": True,
            "overrides": args.overrides,
            "train_data": {"name": "photos-train", "source": "folder", "path": str(paths["train"]),
                           "encoder": clip},
            "tests": [{"name": "photos-test", "source": "folder", "path": str(paths["test"]), "encoder": clip}],
        }
        flow_run_id = trigger(env, params)
        print(f"== prefect deployment run '{DEPLOYMENT}': flow run {flow_run_id}", flush=True)
        state = follow(flow_run_id, env)
        if state != "Completed":
            ui = env["PREFECT_API_URL"].removesuffix("/api")
            print(f"flow run ended {state}; see {ui}/runs/flow-run/{flow_run_id} and "
                  f"{env['LOCDIFF_STATE']}/logs/prefect-worker.log", file=sys.stderr)
            return 1
        run_id, results = results_from_mlflow(env, f"{Path(args.config).stem}-photos-train")
        print("\n" + accuracy_markdown(results, title="LocDiff on synthetic photos through a random tiny CLIP "
                                                      "(from MLflow)"))
        print("== locating new photos with the registered champion model", flush=True)
        print(locate_new_photos(env, paths["new"]) + "\n")
        print(summary(env, run_id, flow_run_id))
        print(f"\ndemo finished in {time.monotonic() - t0:.0f} s; `make stop` stops the stack")
        return 0
    finally:
        if args.stop:
            subprocess.run([str(REPO / "infra" / "stop.sh")], cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
