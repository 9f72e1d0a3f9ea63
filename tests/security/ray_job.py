"""Driver for tests/security/test_secrets.py, run in its own process (a fresh local Ray, its own env).

    python tests/security/ray_job.py REPORT.json

Reads its settings from the environment the test gives it (fake credentials, an S3 endpoint, an SQLite
MLflow store, LOCDIFF_TEST_* paths); ingests a small embeddings table into an s3:// root, trains through
`locdiff.pipeline.train` (Ray Train, 2 workers, checkpoints to the S3 root, MLflow params and steps),
and writes a JSON report: the sockets Ray's processes listened on while it ran, what the dashboard
answers with and without the token, and Ray's run state (jobs, actors, tasks, Train runs) as text.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in found]
        found.update(kids)
        frontier.extend(kids)
    return found


def _ip(hex_addr: str) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp{,6}: the address as 32-bit words in host (little-endian) order
    ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    return str(mapped or ip)


def listening_sockets(pids: set[int]) -> list[dict]:
    """TCP sockets in LISTEN state owned by `pids` (from /proc, no psutil needed)."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in owner:  # 0A: LISTEN
                continue
            addr, port = cols[1].split(":")
            pid = owner[cols[9]]
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                name = "?"
            out.append({"ip": _ip(addr), "port": int(port, 16), "pid": pid, "process": name})
    return out


def _http(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _http_text(url: str, token: str) -> str:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except OSError as err:  # a busy machine: the other dumps still cover the run state
        return f"unavailable: {err}"


def main(report_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    from locdiff import pipeline
    from locdiff.distributed import ensure_ray

    seen: dict[tuple, dict] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for s in listening_sockets(_descendants(os.getpid())):
                seen[(s["ip"], s["port"], s["process"])] = s
            stop.wait(0.5)

    ensure_ray(num_cpus=2, _temp_dir=os.environ["LOCDIFF_TEST_RAY_TMP"])
    import ray

    gcs = ray.get_runtime_context().gcs_address  # other Ray instances may run on this machine
    time.sleep(2.0)  # the dashboard's agents come up after ray.init returns
    at_start = listening_sockets(_descendants(os.getpid()))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    root = os.environ["LOCDIFF_TEST_ROOT"]
    spec = pipeline.DataSpec(name="sec", source="embeddings", path=os.environ["LOCDIFF_TEST_TRAIN"])
    pipeline.ingest(spec, root)
    record = pipeline.train("tiny", spec, root, os.environ["LOCDIFF_TEST_RUN_DIR"], degree=6,
                            overrides=["train.steps=8", "train.checkpoint_every=4", "train.log_every=2",
                                       "train.batch_size=32", "train.warmup_steps=2",
                                       "network.widths=[32, 16]", "network.cond_dim=32",
                                       "network.time_dim=16", "train.val_samples=16",
                                       "hybrid.tune_on_val=false", "predict.samples=2", "predict.steps=2"],
                            num_workers=2, cpus_per_worker=0.5)
    stop.set()
    sampler.join()
    after = listening_sockets(_descendants(os.getpid()))
    if ray.get_runtime_context().gcs_address != gcs:
        raise RuntimeError("the local Ray was restarted during the job")

    token = os.environ.get("RAY_AUTH_TOKEN")
    from ray._private.worker import get_dashboard_url

    dashboard = f"http://{get_dashboard_url()}"
    from ray.util import state

    dumps = {name: [str(item) for item in fn(address=gcs, detail=True, limit=10_000)]
             for name, fn in {"jobs": state.list_jobs, "actors": state.list_actors,
                              "tasks": state.list_tasks, "workers": state.list_workers}.items()}
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    runs = ray.get(actor.get_train_runs.remote()) if actor is not None else {}
    dumps["train_runs"] = [r.model_dump_json() for r in runs.values()]
    dumps["jobs_api"] = _http_text(f"{dashboard}/api/jobs/", token)
    report = {
        "record": record,
        "node_ip": ray.nodes()[0]["NodeManagerAddress"],
        "dashboard": dashboard,
        "listening_at_start": at_start,
        "listening_during": list(seen.values()),
        "listening_after": after,
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        "dashboard_without_token": _http(f"{dashboard}/api/version", None),
        "dashboard_with_token": _http(f"{dashboard}/api/version", token) if token else None,
        "state": dumps,
    }
    Path(report_path).write_text(json.dumps(report, indent=1, default=str))
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
